"""Packaging guards, chiefly the `kernels` name clash.

Our `kernels` package shares its import name with the Hugging Face hub-kernels distribution.
transformers decides whether hub kernels are usable (`is_kernels_available`) by finding a module
named `kernels`, mapping it to a distribution through package metadata (keeprl, once we are
installed), and checking that distribution's version against a window; when no metadata answers,
it imports the module and reads `__version__`. If it ever took our package for theirs, it would
import hub-kernels names from it and break any program that loads transformers (vLLM included).

Each probe runs in a fresh interpreter whose working directory is outside the repo, so what it
sees is the installed keeprl, not the checkout by accident of `sys.path`. transformers is part
of the `test` extra: if it is missing these tests fail rather than skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Names the hub-kernels package exports and transformers imports from `kernels` once it believes
# the package is theirs. Defining any of them here would turn a clean ImportError into a
# half-working import.
HUB_KERNELS_NAMES = (
    "__version__",
    "get_kernel",
    "get_local_kernel",
    "has_kernel",
    "load_kernel",
    "kernelize",
    "Device",
    "Mode",
    "LayerRepository",
    "LocalLayerRepository",
    "register_kernel_mapping",
    "use_kernel_mapping",
    "use_kernel_forward_from_hub",
    "replace_kernel_forward_from_hub",
)

_KERNELS_PROBE = """
import json, sys
import kernels
print(json.dumps({
    "file": kernels.__file__,
    "names": sorted(vars(kernels)),
    "heavy_imports": sorted(m for m in ("torch", "triton") if m in sys.modules),
}))
"""

_TRANSFORMERS_PROBE = """
import importlib.metadata, json
from transformers.utils import import_utils

result = {
    "available": bool(import_utils.is_kernels_available()),
    "window": [import_utils.KERNELS_MIN_VERSION, import_utils.KERNELS_MAX_VERSION],
    "keeprl_version": importlib.metadata.version("keeprl"),
    "kernels_distributions": importlib.metadata.packages_distributions().get("kernels", []),
}
try:
    # Private helper: only used to name, in a failure message, the version transformers read.
    result["attributed"] = import_utils._is_package_available("kernels", return_version=True)
except Exception as exc:
    result["attributed"] = repr(exc)

try:
    from transformers.integrations import hub_kernels
except Exception as exc:
    result["hub_kernels_import"] = repr(exc)
else:
    result["hub_kernels_import"] = "ok"
    try:
        hub_kernels.get_kernel("kernels-community/keeprl-probe")
        result["get_kernel"] = "returned"
    except ImportError:
        result["get_kernel"] = "ImportError"
    except Exception as exc:
        result["get_kernel"] = repr(exc)
print(json.dumps(result))
"""

# The same question with package metadata silenced for `kernels` and `keeprl`, as when the repo
# is on PYTHONPATH without being installed: transformers then imports `kernels` and reads its
# `__version__`.
_NO_METADATA_PROBE = """
import importlib.metadata, json

_version = importlib.metadata.version

def _version_without_ours(name):
    if name.replace("_", "-").lower() in ("kernels", "keeprl"):
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)

importlib.metadata.version = _version_without_ours

from transformers.utils import import_utils

print(json.dumps({
    "available": bool(import_utils.is_kernels_available()),
    "attributed": import_utils._is_package_available("kernels", return_version=True),
}))
"""


def _probe(code: str, cwd: Path) -> dict[str, Any]:
    """Run `code` in a fresh interpreter in `cwd` and return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"probe failed:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside-repo")


@pytest.fixture(scope="module")
def kernels_probe(outside: Path) -> dict[str, Any]:
    return _probe(_KERNELS_PROBE, outside)


@pytest.fixture(scope="module")
def transformers_probe(outside: Path) -> dict[str, Any]:
    return _probe(_TRANSFORMERS_PROBE, outside)


def test_import_kernels_is_this_repo(kernels_probe: dict[str, Any]) -> None:
    assert Path(kernels_probe["file"]) == REPO / "kernels" / "__init__.py"


def test_kernels_defines_no_hub_kernels_names(kernels_probe: dict[str, Any]) -> None:
    clashing = sorted(set(HUB_KERNELS_NAMES) & set(kernels_probe["names"]))
    assert not clashing, f"kernels/__init__.py defines hub-kernels names: {clashing}"


def test_kernels_import_is_cheap(kernels_probe: dict[str, Any]) -> None:
    # transformers may import `kernels` just to read its version.
    assert kernels_probe["heavy_imports"] == []


def test_only_keeprl_ships_kernels(transformers_probe: dict[str, Any]) -> None:
    # Another distribution providing `kernels` (the hub-kernels one, pulled in by a dependency)
    # would make `import kernels` depend on path order.
    assert transformers_probe["kernels_distributions"] == ["keeprl"]


def test_transformers_does_not_take_kernels_for_hub_kernels(
    transformers_probe: dict[str, Any],
) -> None:
    assert transformers_probe["available"] is False, (
        f"transformers reads `kernels` as {transformers_probe['attributed']}"
    )


def test_keeprl_version_is_outside_the_hub_kernels_window(
    transformers_probe: dict[str, Any],
) -> None:
    # transformers attributes keeprl's version to `kernels`: a release inside its window would
    # make every transformers program try to use our package as hub kernels.
    from packaging.version import Version

    low, high = (Version(v) for v in transformers_probe["window"])
    ours = Version(transformers_probe["keeprl_version"])
    assert not (low <= ours < high), f"keeprl {ours} lies in transformers' window [{low}, {high})"


def test_hub_kernels_integration_sees_no_kernels(transformers_probe: dict[str, Any]) -> None:
    # Importing it pulls hub-kernels names from `kernels` when transformers thinks it usable.
    assert transformers_probe["hub_kernels_import"] == "ok"
    # Its loader must refuse with the "kernels is not installed" ImportError, not try ours.
    assert transformers_probe["get_kernel"] == "ImportError"


def test_transformers_without_metadata_does_not_take_kernels(outside: Path) -> None:
    probe = _probe(_NO_METADATA_PROBE, outside)
    assert probe["available"] is False, f"transformers reads `kernels` as {probe['attributed']}"
