"""The configuration reference, generated from the config dataclasses themselves.

Every key of `ExperimentConfig` with its default and what it means: the comment beside (or
the comment lines right above) the field's definition, wherever the field is defined (the
`algorithm` and `optim` sections are the learner's own classes). The README's configuration
section is this output (`python -m rl.config_doc` prints it); tests/rl/test_config.py checks
that the README matches it and that every key has a meaning, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from .config import ExperimentConfig

_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$")


def _comments(cls: type) -> dict[str, str]:
    """field name -> its comment, for the fields `cls` itself defines."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in cls.__dict__.get("__annotations__", {}):
            parts = [*above, match.group(2) or ""]
            out[match.group(1)] = " ".join(p for p in parts if p)
        above = []
    return out


def _meaning(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return _comments(klass).get(name, "")
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is dataclasses.MISSING:
        return _REQUIRED
    return f.default_factory()


class _Required:
    """The default of a field that has none (an eval set's name)."""


_REQUIRED = _Required()


def _shown(value: Any) -> str:
    if value is _REQUIRED:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def rows(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf key under `cls`, in definition order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(rows(tp, key + "."))
            continue
        out.append((key, _shown(_default(f)), _meaning(cls, f.name)))
        [item] = typing.get_args(tp) if typing.get_origin(tp) is list else [None]
        if dataclasses.is_dataclass(item):  # a list of sections (eval.sets): each entry's keys
            out.extend(rows(item, key + "[]."))
    return out


def reference() -> str:
    """The Markdown reference: one table per section."""
    lines = []
    for section in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[section.name]
        summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        lines += [f"**`{section.name}`**: {summary}", "", "| key | default | meaning |"]
        lines.append("| --- | --- | --- |")
        for key, default, meaning in rows(cls, section.name + "."):
            lines.append(f"| `{key}` | {default} | {meaning.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
