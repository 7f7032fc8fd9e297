"""Code verifier: run the response's program against the task's tests in the sandbox.

Reference forms:
- {"test": "<source defining check(candidate)>", "entry_point": "<function name>"}: the
  response defines the function and the test calls check(<function>). Each top-level
  `assert` in check's body is one test case, so the reward can be a fraction; asserts
  inside loops or helpers belong to the statement that holds them, and if check has no
  top-level assert the whole call is one case. A test source without `check` is taken as
  module-level asserts (MBPP style), one case each. An optional "prefix" is put before a
  response that does not define the entry point itself (HumanEval's completion form: the
  prompt is the function's signature and docstring, the response its body).
- {"io": [{"input": "<stdin>", "output": "<expected stdout>"}, ...]}: the response is a
  program; each case runs it afresh and compares stdout line by line.
The response may be bare code or contain fenced blocks: the last python block that defines
the entry point wins, else the last python (or untagged) block.

Reward = passed / total, or all-or-nothing with `all_or_nothing=True`. A solution that
times out, crashes or floods output simply fails its cases. Each job is one sandbox run
(`rewards.sandbox`); the results come back through a nonce-tagged line that the solution
cannot forge in "io" mode. In "test" mode the solution shares a process with the asserts,
so a determined solution could fake its own results; the sandbox guards the host, not the
grade there.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets

from . import sandbox
from .contract import Sample

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_code_harness.py")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "")


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The program in `response`: the most plausible fenced python block, or the text itself."""
    if "```" not in response:
        return response
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS] or [b for _, b in blocks]
    if not python:
        return response
    if entry_point:
        with_entry = [body for body in python if _defines(body, entry_point)]
        if with_entry:
            return with_entry[-1]
    return python[-1]


def _defines(code: str, entry_point: str) -> bool:
    """Whether `code` defines the function `entry_point` (at any indentation)."""
    pattern = rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\("
    return re.search(pattern, code, re.M) is not None


def _record_call(index: int, passed: bool) -> ast.stmt:
    text = f"print('\\nKEEPRL-CASE {index} {int(passed)}', flush=True)"
    return ast.parse(text).body[0]


def _wrap_asserts(body: list[ast.stmt]) -> tuple[list[ast.stmt], int]:
    """Wrap each top-level assert so its outcome is printed instead of stopping the run."""
    out, count = [], 0
    for stmt in body:
        if not isinstance(stmt, ast.Assert):
            out.append(stmt)
            continue
        handler = ast.ExceptHandler(type=ast.Name("BaseException", ast.Load()), name=None)
        handler.body = [_record_call(count, False)]
        out.append(ast.Try([stmt], [handler], [_record_call(count, True)], []))
        count += 1
    return out, count


def instrument_test(source: str) -> tuple[str, int, bool]:
    """Rewrite test source so each case reports itself; returns (source, cases, has_check)."""
    tree = ast.parse(source)
    check = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None
    )
    if check is None:
        tree.body, total = _wrap_asserts(tree.body)
        return ast.unparse(ast.fix_missing_locations(tree)), total, False
    check.body, total = _wrap_asserts(check.body)
    return ast.unparse(ast.fix_missing_locations(tree)), total, True


def _job(sample: Sample, code: str) -> tuple[dict, dict] | None:
    ref = sample.reference
    if "io" in ref:
        cases = [{"input": str(c.get("input", "")), "output": str(c["output"])} for c in ref["io"]]
        return {"mode": "io", "cases": cases, "total": len(cases)}, {"solution.py": code}
    if "test" in ref:
        test, total, has_check = instrument_test(ref["test"])
        if has_check and not ref.get("entry_point"):
            raise ValueError("code reference with check(candidate) needs an 'entry_point'")
        # check() without a top-level assert: the whole call is the one case.
        whole = has_check and total == 0
        job = {
            "mode": "test",
            "total": 1 if whole else total,
            "whole": whole,
            "entry_point": ref.get("entry_point", "") if has_check else "",
        }
        return job, {"solution.py": code, "test.py": test}
    return None


def verify_code(
    sample: Sample,
    *,
    all_or_nothing: bool = False,
    case_timeout_s: float = 5.0,
    memory_mb: int = 1024,
    allow_unsandboxed: bool = False,
) -> dict | None:
    """Run the response's code against reference tests; reward = fraction of cases passed."""
    entry = sample.reference.get("entry_point")
    code = extract_code(sample.response, entry)
    prefix = sample.reference.get("prefix")
    if prefix and entry and not _defines(code, entry):
        code = prefix + code
    built = _job(sample, code)
    if built is None:
        return None  # not a code task
    job, files = built
    if job["total"] == 0:
        raise ValueError("code reference has no test cases")
    with open(_HARNESS) as f:
        files["harness.py"] = f.read()
    nonce = secrets.token_hex(16)
    job.update(nonce=nonce, case_timeout_s=case_timeout_s)
    runs = job["total"] if job["mode"] == "io" else 1
    config = sandbox.SandboxConfig(
        wall_s=min(runs * case_timeout_s + 5.0, 120.0),
        cpu_s=int(case_timeout_s) + 1,
        memory_mb=memory_mb,
        allow_unsandboxed=allow_unsandboxed,
    )
    res = sandbox.run(
        [sandbox.PYTHON, "-I", "-S", "harness.py"],
        files=files,
        stdin=json.dumps(job),
        config=config,
    )
    if res.setup_error:
        raise RuntimeError(f"sandbox failed to start: {res.setup_error}")
    marker = f"KEEPRL-RESULT {nonce} ".encode()
    found = [line for line in res.stdout.splitlines() if line.startswith(marker)]
    passed = json.loads(found[-1][len(marker) :])["passed"] if found else 0
    total = job["total"]
    reward = float(passed == total) if all_or_nothing else passed / total
    return {
        "reward": reward,
        "passed": float(passed),
        "total": float(total),
        "harness_lost": float(not found),
    }
