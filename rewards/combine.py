"""Weighted combination of several verifiers into one.

The combined reward is the weighted mean over the parts that apply:

    reward = sum(w_i * r_i for applying parts) / sum(w_i for applying parts)

A part returning None does not apply and its weight drops out, so the remaining weights
renormalise (math 1.0 + format 0.5 on a sample where math does not apply gives the format
reward itself, not a third of it). If no part applies, the combination does not apply
either (Score.applied is False). A part that fails (raises, returns garbage) applies with
reward 0 and its failure is recorded. Each part's reward is logged as a sub-score under its
label, and its own sub-scores as "<label>/<name>".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .contract import Sample, Score, call, failed, in_thread, is_async, normalize, score_fn


@dataclass(frozen=True)
class Part:
    """One verifier in a combination, with its weight (> 0) and call keyword arguments."""

    verifier: Any
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    label: str = ""


class Combined:
    """A verifier made of weighted parts; itself follows the contract (async `score`)."""

    def __init__(self, parts: Sequence[Part]):
        if not parts:
            raise ValueError("a combination needs at least one verifier")
        for part in parts:
            score_fn(part.verifier)
            if not part.weight > 0:
                raise ValueError(f"weight of {part.label or part.verifier!r} must be > 0")
        self.parts: list[Part] = []
        for i, p in enumerate(parts):
            label = p.label or f"part{i}"
            if any(q.label == label for q in self.parts):
                label = f"{label}#{i}"  # sub-score names must stay distinct
            self.parts.append(Part(p.verifier, p.weight, p.kwargs, label))

    async def _one(self, part: Part, sample: Sample) -> Score:
        try:
            if is_async(part.verifier):
                result = await call(part.verifier, sample, part.kwargs)
            else:
                result = await in_thread(score_fn(part.verifier), sample, **part.kwargs)
        except Exception as exc:
            return failed(f"raised {type(exc).__name__}: {exc}")
        return normalize(result)

    async def score(self, sample: Sample) -> Score:
        scores = await asyncio.gather(*(self._one(p, sample) for p in self.parts))
        subscores: dict[str, float] = {}
        failures, total, weight = [], 0.0, 0.0
        for part, s in zip(self.parts, scores, strict=True):
            if s.failure:
                failures.append(f"{part.label}: {s.failure}")
            if not s.applied:
                continue
            subscores[part.label] = s.reward
            subscores.update({f"{part.label}/{k}": v for k, v in s.subscores.items()})
            total += part.weight * s.reward
            weight += part.weight
        failure = "; ".join(failures) or None
        if weight == 0.0:
            return Score(0.0, subscores, failure, applied=False)
        return Score(total / weight, subscores, failure)


def combine(*weighted: tuple[Any, float]) -> Combined:
    """`combine((verify_math, 1.0), (my_format_check, 0.2))` without going through YAML."""
    return Combined([Part(v, float(w), {}, getattr(v, "__name__", "")) for v, w in weighted])
