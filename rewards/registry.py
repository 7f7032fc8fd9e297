"""The built-in verifier registry and the one loader that resolves names and `module:attr` paths.

`get("math")` looks the name up in REGISTRY; `get("my_pkg.rewards:judge")` imports
`my_pkg.rewards` (installed, or under the current directory) and takes `judge`. A class is
instantiated with no arguments; a function or an object with a `score` method is returned as
is. `from_config` turns the YAML list

    - {name: math, weight: 1.0}
    - {name: my_pkg.rewards:judge, weight: 0.5, kwargs: {strict: true}}

into one combined verifier, failing on unknown keys with the closest valid name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .combine import Combined, Part
from .contract import score_fn

# Values are import paths, resolved lazily so `import rewards` stays light (math pulls in
# sympy). Agent environments are registered as "agent:<env>".
REGISTRY: dict[str, str] = {
    "math": "rewards.math:verify_math",
    "code": "rewards.code:verify_code",
    "agent:calculator": "rewards.agent.calculator:verifier",
    "agent:trip": "rewards.agent.trip:verifier",
}

ENTRY_KEYS = ("name", "weight", "kwargs", "label")


def _closest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _import(module_name: str) -> Any:
    """Import a plug-in module from the installed packages or, failing that, from the current
    directory, as `python -m` would: `keeprl train` run from a project's root finds the
    project's verifiers without installing them (a console script's sys.path lacks it)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path:
            raise
        sys.path.append(here)  # after the installed packages: it shadows none of them
        return importlib.import_module(module_name)


def load(path: str) -> Any:
    """Import `module:attr` (attr may be dotted) and return the object."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:attr', got {path!r}")
    try:
        obj: Any = _import(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for verifier {path!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ValueError(f"{module_name!r} has no attribute {attr!r}{_closest(part, names)}")
        obj = getattr(obj, part)
    return obj


def get(name_or_path: str) -> Any:
    """Resolve a registered name or a `module:attr` path to a verifier."""
    if name_or_path in REGISTRY:
        obj = load(REGISTRY[name_or_path])
    elif ":" in name_or_path and not name_or_path.startswith("agent:"):
        obj = load(name_or_path)
    else:
        raise ValueError(
            f"unknown verifier {name_or_path!r}{_closest(name_or_path, list(REGISTRY))} "
            f"(registered: {', '.join(REGISTRY)}; or give a 'module:attr' path)"
        )
    if inspect.isclass(obj):
        obj = obj()
    score_fn(obj)  # raises TypeError if it does not follow the contract
    return obj


def _check_kwargs(verifier: Any, kwargs: Mapping[str, Any], where: str) -> None:
    """Fail at config time, not mid-run, on a keyword the verifier does not take."""
    try:
        params = inspect.signature(score_fn(verifier)).parameters
    except (TypeError, ValueError):
        return  # some callables (builtins, C extensions) have no signature to check
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [
        n for n, p in list(params.items())[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    for key in kwargs:
        if key not in names:
            raise ValueError(f"{where}.kwargs: unknown key {key!r}{_closest(key, names)}")


def from_config(spec: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Combined:
    """Build a combined verifier from a YAML-loaded list of {name, weight, kwargs, label}."""
    entries = [spec] if isinstance(spec, Mapping) else list(spec)
    if not entries:
        raise ValueError("rewards: the list of verifiers is empty")
    parts = []
    for i, entry in enumerate(entries):
        where = f"rewards[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'name', got {entry!r}")
        for key in entry:
            if key not in ENTRY_KEYS:
                raise ValueError(
                    f"{where}: unknown key {key!r}{_closest(str(key), ENTRY_KEYS)} "
                    f"(valid keys: {', '.join(ENTRY_KEYS)})"
                )
        if "name" not in entry:
            raise ValueError(f"{where}: missing 'name' (a registered name or 'module:attr')")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight: must be a number > 0, got {weight!r}")
        kwargs = entry.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{where}.kwargs: must be a mapping, got {kwargs!r}")
        verifier = get(entry["name"])
        _check_kwargs(verifier, kwargs, where)
        label = str(entry.get("label", entry["name"]))
        parts.append(Part(verifier, float(weight), dict(kwargs), label))
    labels = [p.label for p in parts]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"rewards: duplicate label(s) {dupes}; give each entry its own 'label'")
    return Combined(parts)


def build(spec: Any) -> Any:
    """A verifier from anything config can hold: a name/path string, a list/dict of entries,
    or an already-built verifier object (returned unchanged)."""
    if isinstance(spec, str):
        return get(spec)
    if isinstance(spec, (list, tuple, Mapping)):
        return from_config(spec)
    score_fn(spec)
    return spec
