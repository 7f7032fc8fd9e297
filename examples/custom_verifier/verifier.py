"""Example custom verifier: reward a short final answer inside <answer>...</answer>.

Plugged in from YAML by its import path (see rewards.yaml beside this file):

    - name: examples.custom_verifier.verifier:concise_answer
      weight: 0.2
      kwargs: {max_words: 30}

It follows the keeprl verifier contract: a plain function of a `rewards.Sample` and keyword
options, returning a dict with "reward" plus sub-scores to log, or None when it does not
apply (here: samples whose metadata marks them as free-form).
"""

from __future__ import annotations

import re

from rewards import Sample


def concise_answer(sample: Sample, *, max_words: int = 50, tag: str = "answer") -> dict | None:
    """1.0 for a tagged answer of at most `max_words` words, 0.5 if longer, 0.0 if absent."""
    if sample.metadata.get("free_form"):
        return None
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", sample.response, re.DOTALL)
    if not found:
        return {"reward": 0.0, "words": 0.0}
    words = len(found[-1].split())
    return {"reward": 1.0 if words <= max_words else 0.5, "words": float(words)}
