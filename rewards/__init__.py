"""Rewards for GRPO: the verifier plug-in contract, built-in verifiers and their sandbox.

    import rewards
    verify = rewards.get("math")                      # or "code", "agent:trip", "pkg.mod:fn"
    score = rewards.score_batch(verify, [rewards.Sample("1+1?", r"\\boxed{2}", {"answer": "2"})])

See docs/rewards.md for the contract, the built-in verifiers and the sandbox's guarantees.
This package uses nothing else of keeprl.
"""

from .combine import Combined, Part, combine
from .contract import Sample, Score, normalize
from .registry import REGISTRY, build, from_config, get, load
from .scorer import Scorer, live_verifier_threads, score_batch, score_one

__all__ = [
    "REGISTRY",
    "Combined",
    "Part",
    "Sample",
    "Score",
    "Scorer",
    "build",
    "combine",
    "from_config",
    "get",
    "live_verifier_threads",
    "load",
    "normalize",
    "score_batch",
    "score_one",
]
