"""Math verifier: answer extraction and a table of equal / unequal answer pairs."""

import pytest

# The GPU image lacks math-verify; there this module is skipped, not a collection error.
pytest.importorskip("math_verify")

import rewards
from rewards.math import equivalent, extract_answer, verify_math

# (gold, predicted, equal?) covering fractions, decimals, percentages, LaTeX forms,
# intervals, sets, units and plain mistakes.
PAIRS = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac12", "0.5", True),
    ("0.5", "\\frac{2}{4}", True),
    ("1/3", "0.3333333", True),
    ("1/3", "0.33", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("25%", "\\frac{1}{4}", True),
    ("50\\%", "5", False),
    ("1000", "1,000", True),
    ("1000", "10^3", True),
    ("1000", "1\\,000", True),
    ("1000000", "1{,}000{,}000", True),
    ("42", "42.0", True),
    ("42", "43", False),
    ("-3", "3", False),
    ("-3", "- 3", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("3\\sqrt{3}", "\\sqrt{27}", True),
    ("2\\sqrt{2}", "\\sqrt{2}", False),
    ("\\pi", "3.14159265", True),
    ("2\\pi", "6.28", False),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2", "x^3", False),
    ("x=3", "3", True),
    ("3", "x = 3", True),
    ("(1,2]", "(1, 2]", True),
    ("[0,1)", "\\left[0, 1\\right)", True),
    ("(1,2]", "[1,2]", False),
    ("(-\\infty, 2)", "(-\\infty, 2]", False),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1,2\\}", "1, 2", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("3", "3\\text{ cm}", True),
    ("12", "12 \\text{ apples}", True),
    ("5", "\\$5", True),
    ("90", "90^\\circ", True),
    ("7", "7 meters", True),
    ("7", "8 meters", False),
    ("\\text{(B)}", "B", True),
    ("B", "C", False),
    ("Monday", "monday", True),
    ("Monday", "Tuesday", False),
    ("0.25", "0.52", False),
    ("1000", "100", False),
    ("x+1", "x-1", False),
    ("\\frac{3}{4}", "75\\%", True),
    ("[2, 5]", "[2, 6]", False),
]


def test_table_is_large_and_balanced():
    assert len(PAIRS) >= 40
    assert sum(eq for *_, eq in PAIRS) >= 15 and sum(not eq for *_, eq in PAIRS) >= 15


@pytest.mark.parametrize(("gold", "predicted", "equal"), PAIRS)
def test_equivalence_table(gold, predicted, equal):
    assert equivalent(gold, predicted) is equal


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so we get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
        ("first \\boxed{1}, then corrected: \\boxed{ {2} }", "{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("the box \\boxed 7 is bare", "7"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("Thus the answer is 17.", "17"),
        ("The final answer is $x = 3$, as shown.", "x = 3"),
        ("**Answer:** 3.5.", "3.5"),
        ("Answer: 12 apples", "12 apples"),
        ("we add 3 and 4 to get 7 then subtract 2 giving 5", "5"),
        ("costs 1,250 dollars", "1,250"),
        ("no digits here", None),
        ("truncated \\boxed{\\frac{1}{", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_verifier_rewards_and_subscores():
    verify = rewards.get("math")
    assert verify is verify_math
    good = rewards.Sample("q", "... so \\boxed{0.5}", {"answer": "\\frac{1}{2}"})
    bad = rewards.Sample("q", "... so \\boxed{0.6}", {"answer": "\\frac{1}{2}"})
    none = rewards.Sample("q", "I do not know", {"answer": "1/2"})
    assert verify(good) == {"reward": 1.0, "extracted": 1.0}
    assert verify(bad) == {"reward": 0.0, "extracted": 1.0}
    assert verify(none) == {"reward": 0.0, "extracted": 0.0}
    assert verify(rewards.Sample("q", "\\boxed{2}", {"answer": "\\boxed{2}"}))["reward"] == 1.0
    assert verify(rewards.Sample("q", "\\boxed{2}", {"answer": 2}))["reward"] == 1.0


def test_does_not_apply_without_answer():
    assert verify_math(rewards.Sample("q", "\\boxed{2}", {"test": "..."})) is None


def test_huge_answer_is_rejected_quickly():
    assert not equivalent("1", "1+" * 2000 + "1")


def test_runs_off_the_main_thread():
    # math-verify's SIGALRM guard fails off the main thread; the scorer uses threads.
    samples = [rewards.Sample("q", f"\\boxed{{{i}/2}}", {"answer": str(i / 2)}) for i in range(6)]
    scores = rewards.score_batch("math", samples, timeout_s=60)
    assert [s.reward for s in scores] == [1.0] * 6
    assert all(s.failure is None for s in scores)
