"""Guards on the suite itself: where a test module may skip, it may not skip here.

Modules that need a package the GPU image lacks (ray, mlflow, math-verify) open with
`pytest.importorskip`, so `pytest -m gpu` collects there. On the project's CPU machines every
dependency is installed, and a module silently skipped for a missing or broken import would
hide its tests: this check imports every package the suite guards that way.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GUARD = re.compile(r"""pytest\.importorskip\(\s*["']([\w.]+)["']""")


def test_every_package_a_test_module_may_skip_for_imports_here() -> None:
    guarded = {name for path in TESTS.rglob("*.py") for name in GUARD.findall(path.read_text())}
    assert {"ray", "mlflow", "math_verify"} <= guarded  # the scan does see the guards
    failed = {}
    for name in sorted(guarded):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install skips a module as surely as a missing one
            failed[name] = f"{type(exc).__name__}: {exc}"
    assert not failed, f"test modules would be skipped for these imports: {failed}"
