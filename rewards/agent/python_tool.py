"""A code-execution environment: the model answers computational questions by running Python in
rewards' sandbox (rewards/sandbox.py) and submitting what it found.

Tools: `run_python(code)` runs the model's code as a fresh sandboxed process (no network, a
throw-away root, CPU/memory/process/wall-clock limits, stdlib only) and returns its exit
status, stdout and the tail of stderr; `submit(answer)` ends the episode. The tasks (counts,
sums, sequence terms with parameters drawn from the seed) are quick to compute in a few lines
and tedious by hand; each comes with a solution program, so every task is known solvable.

The sandbox must be able to isolate on this machine: where it cannot, run_python fails with
the sandbox's reason (the episode ends with "env_error"), never running model code unconfined.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from . import EnvironmentBroken, ToolCall, ToolError
from .spec import EnvSpec, ToolSpec

WALL_S = 5.0  # per run_python call; below the episode runner's default 10 s step limit
MAX_OUTPUT = 2000  # characters of stdout shown to the model


def _run(state: dict, code: str) -> str:
    from rewards.sandbox import SandboxConfig, SandboxUnavailable, run_python

    config = SandboxConfig(wall_s=WALL_S, cpu_s=int(WALL_S), memory_mb=512, output_bytes=1 << 16)
    try:
        result = run_python(code, config=config)
    except SandboxUnavailable as e:
        raise EnvironmentBroken(f"run_python needs the sandbox: {e}") from None
    state["runs"] = state.get("runs", 0) + 1
    if result.timed_out:
        return f"error: timed out after {WALL_S:g} s"
    out = result.stdout.decode(errors="replace")
    if len(out) > MAX_OUTPUT:
        out = out[:MAX_OUTPUT] + f"\n... ({len(out) - MAX_OUTPUT} more characters)"
    text = f"exit {result.exit_code}\n{out}"
    if result.exit_code != 0:
        err = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        text += "\nstderr:\n" + "\n".join(err)
    return text


def _submit(state: dict, answer: str) -> str:
    state["answer"], state["_done"] = answer.strip(), True
    return "submitted"


# Each kind: (question from parameters, solution program printing the answer).
Kind = tuple[Callable[[random.Random], dict], Callable[[dict], str], Callable[[dict], str]]


def _primes() -> Kind:
    def params(rng: random.Random) -> dict:
        return {"n": rng.randrange(1_000, 50_000)}

    def question(p: dict) -> str:
        return f"What is the sum of all primes below {p['n']}?"

    def program(p: dict) -> str:
        return (
            f"n = {p['n']}\nsieve = bytearray([1]) * n\nsieve[:2] = b'\\x00\\x00'\n"
            "for i in range(2, int(n ** 0.5) + 1):\n"
            "    if sieve[i]:\n        sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))\n"
            "print(sum(i for i in range(n) if sieve[i]))\n"
        )

    return params, question, program


def _divisible() -> Kind:
    def params(rng: random.Random) -> dict:
        a, b = rng.sample(range(3, 30), 2)
        return {"n": rng.randrange(10_000, 1_000_000), "a": a, "b": b}

    def question(p: dict) -> str:
        return (
            f"How many integers from 1 to {p['n']} are divisible by {p['a']} or by {p['b']} "
            "but not by both?"
        )

    def program(p: dict) -> str:
        return (
            f"n, a, b = {p['n']}, {p['a']}, {p['b']}\n"
            "print(sum((k % a == 0) != (k % b == 0) for k in range(1, n + 1)))\n"
        )

    return params, question, program


def _fibonacci() -> Kind:
    def params(rng: random.Random) -> dict:
        return {"k": rng.randrange(100, 5_000), "m": rng.randrange(1_000, 100_000)}

    def question(p: dict) -> str:
        return f"What is the {p['k']}-th Fibonacci number (F(1) = F(2) = 1) modulo {p['m']}?"

    def program(p: dict) -> str:
        return (
            f"k, m = {p['k']}, {p['m']}\na, b = 0, 1\n"
            "for _ in range(k):\n    a, b = b, (a + b) % m\nprint(a)\n"
        )

    return params, question, program


def _digits() -> Kind:
    def params(rng: random.Random) -> dict:
        return {"base": rng.randrange(2, 20), "exp": rng.randrange(50, 400)}

    def question(p: dict) -> str:
        return f"What is the sum of the decimal digits of {p['base']} ** {p['exp']}?"

    def program(p: dict) -> str:
        return f"print(sum(int(d) for d in str({p['base']} ** {p['exp']})))\n"

    return params, question, program


KINDS = {"primes": _primes(), "divisible": _divisible(), "fibonacci": _fibonacci()}
KINDS["digits"] = _digits()


def _answer(program: str) -> str:
    """The solution program's output, computed here (trusted code, no sandbox needed)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(program, "<solution>", "exec"), {})  # our own program, not the model's
    return buf.getvalue().strip()


def _make_task(rng: random.Random) -> tuple[dict, list[ToolCall]]:
    kind = rng.choice(sorted(KINDS))
    params, question, program = KINDS[kind]
    p = params(rng)
    code = program(p)
    answer = _answer(code)
    task = {"kind": kind, "question": question(p), "answer": answer}
    return task, [ToolCall("run_python", {"code": code}), ToolCall("submit", {"answer": answer})]


def _verify(state: dict, task: dict) -> float:
    return float(str(state.get("answer", "")).strip() == task["answer"])


def _check_code(state: dict, code: str) -> str:
    if not code.strip():
        raise ToolError("run_python needs some code")
    return _run(state, code)


spec = EnvSpec(
    name="python",
    tools=(
        ToolSpec(
            "run_python",
            "run a Python program (stdlib only, no network, 5 s) and see its output",
            {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "the program"}},
                "required": ["code"],
            },
            _check_code,
        ),
        ToolSpec(
            "submit",
            "submit the final answer and end the episode",
            {
                "type": "object",
                "properties": {"answer": {"type": "string", "description": "the answer"}},
                "required": ["answer"],
            },
            _submit,
        ),
    ),
    make_task=_make_task,
    initial_state=lambda task: {"answer": None},
    prompt=lambda task: f"{task['question']} Compute it with the tools, then submit.",
    verify=_verify,
    max_steps=8,
)
