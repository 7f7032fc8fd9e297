"""Shared by the benchmark scripts: naming the device and writing figures into docs/benchmarks.md.

Each script owns one section of the doc, between `<!-- key -->` and `<!-- /key -->` markers,
and rewrites only that section, so benchmarks run on different devices can share one file.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name and core count, as /proc/cpuinfo gives it."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_section(doc: Path, key: str, text: str) -> None:
    """Replace (or append) the section between <!-- key --> markers in doc."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        body = body.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(body)
