"""Reward workers: scoring that runs beside the learner, optionally as Ray actors.

`RewardWorker` is a plain class holding a Scorer; it takes samples as `Sample`s or plain
dicts and returns plain dicts, so it can sit behind any process boundary. `remote_worker`
starts it as a Ray actor so slow verifiers (code sandboxes, model judges) do not block the
learner; ray is imported only there, and that path is not exercised by this package's
tests (ray is not a dependency of `rewards`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from .contract import Sample
from .scorer import Isolation, Scorer


class RewardWorker:
    """Scores batches with one verifier spec (registered name, `module:attr` or a list)."""

    def __init__(
        self,
        spec: Any,
        *,
        kwargs: dict | None = None,
        timeout_s: float = 30.0,
        max_concurrency: int = 8,
        isolation: Isolation = "thread",
    ):
        self.scorer = Scorer(
            spec,
            kwargs=kwargs,
            timeout_s=timeout_s,
            max_concurrency=max_concurrency,
            isolation=isolation,
        )

    def score(self, samples: Sequence[Sample | Mapping[str, Any]]) -> list[dict]:
        batch = [s if isinstance(s, Sample) else Sample(**s) for s in samples]
        return [asdict(score) for score in self.scorer.score(batch)]

    def close(self) -> None:
        self.scorer.close()


def remote_worker(spec: Any, *, num_cpus: float = 1, **options: Any) -> Any:
    """Start a RewardWorker as a Ray actor; call `.score.remote(samples)` on the handle."""
    import ray  # only here: ray is needed just for remote workers

    return ray.remote(num_cpus=num_cpus)(RewardWorker).remote(spec, **options)
