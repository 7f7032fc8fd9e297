"""`keeprl replay`: look at a logged step the way the learner saw it.

replay reloads the trajectories of one step from the Parquet store and the weights that
sampled them (the checkpoint of the previous step, or the initial policy for step 0),
recomputes the learner's log-probs with Keep Routing and Keep Sampling Mask each on and off,
and reports where sampler and learner disagree: per variant the mean and max |log pi_old -
log pi_theta|, the worst tokens decoded, the routing disagreement per MoE layer, and
optionally the rewards a different verifier would give. The report prints and can be
written as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import rewards as rewards_pkg
from policy import load_pretrained
from rollout import RolloutStore

from . import checkpoint as ckpt
from .batch import Batch
from .cli import write_output
from .config import ConfigError, ExperimentConfig, build
from .logprobs import routing_disagreement, token_logprobs
from .run_dir import RunDir
from .tokenizer import Tokenizer, load_tokenizer

VARIANTS = {  # name -> (keep_routing, keep_sampling_mask)
    "routing+mask": (True, True),
    "mask only": (False, True),
    "routing only": (True, False),
    "neither": (False, False),
}


def _weights_for(run: RunDir, cfg: ExperimentConfig, version: int) -> Path:
    """The verified policy directory holding weight version `version`."""
    try:
        path = run.weights(version, cfg.model.checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; replay needs the weights that sampled the step") from None
    if version:
        ckpt.verify(path.parent)  # damaged weights would be replayed as a huge "mismatch"
    return path


def replay(
    run_dir: str | Path, step: int, *, verifier: str | None = None, top: int = 10
) -> dict[str, Any]:
    """The mismatch report of one logged step (see module docstring)."""
    run = RunDir(run_dir)
    cfg = build(ExperimentConfig, yaml.safe_load(run.config.read_text()))
    logged = RolloutStore(run.rollouts).read_step(step)
    trajs = logged.trajectories
    versions = {t.weight_version for t in trajs}
    if len(versions) != 1:
        raise ConfigError(f"step {step} mixes weight versions {sorted(versions)}")
    policy = load_pretrained(_weights_for(run, cfg, versions.pop()))
    batch = Batch.from_trajectories(trajs, [r or 0.0 for r in logged.rewards], logged.group_ids)
    tok = load_tokenizer(cfg.model)
    mask = batch.response_mask
    report: dict[str, Any] = {
        "run": str(run.path),
        "step": step,
        "sequences": len(trajs),
        "response_tokens": int(mask.sum()),
        "variants": {},
    }
    with torch.no_grad():
        for name, (routing, sampling_mask) in VARIANTS.items():
            logp, _, used = token_logprobs(
                policy, batch, keep_routing=routing, keep_sampling_mask=sampling_mask
            )
            gap = (batch.old_logprobs - logp).abs() * mask
            report["variants"][name] = {
                "gap_mean": float(gap.sum() / mask.sum()),
                "gap_max": float(gap.max()),
                "per_sequence_gap_mean": (gap.sum(-1) / mask.sum(-1).clamp_min(1)).tolist(),
            }
            if name == "routing+mask":
                report["worst_tokens"] = _worst(batch, logp, gap, tok, top)
            if name == "mask only":
                _, by_layer, routed = routing_disagreement(used, batch)
                share = by_layer.double() / routed.clamp_min(1)
                report["routing_disagreement_by_layer"] = share.tolist()
    if verifier:
        report["rescored"] = _rescore(trajs, logged, verifier, tok)
    return report


def _worst(
    batch: Batch, logp: torch.Tensor, gap: torch.Tensor, tok: Tokenizer, top: int
) -> list[dict[str, Any]]:
    flat = gap.flatten().topk(min(top, int((gap > 0).sum()) or 1))
    out = []
    for value, idx in zip(flat.values.tolist(), flat.indices.tolist(), strict=True):
        row, pos = divmod(idx, gap.shape[1])
        out.append(
            {
                "sequence": row,
                "position": pos,
                "token": tok.decode([int(batch.input_ids[row, pos])]),
                "context": tok.decode(batch.input_ids[row, max(0, pos - 12) : pos].tolist()),
                "sampler_logprob": float(batch.old_logprobs[row, pos]),
                "learner_logprob": float(logp[row, pos]),
                "gap": value,
            }
        )
    return out


def _rescore(trajs: list, logged: Any, verifier: str, tok: Tokenizer) -> dict[str, Any]:
    """Score the logged responses again with another verifier (references are stored in each
    trajectory's `extra` by the trainer)."""
    if any(RunDir.reference_of(t) is None for t in trajs):
        raise ConfigError("these rollouts carry no task references to re-score against")
    scores = rewards_pkg.score_batch(
        rewards_pkg.get(verifier),
        [
            rewards_pkg.Sample(
                tok.decode(t.prompt_ids), tok.decode(t.response_ids), RunDir.reference_of(t)
            )
            for t in trajs
        ],
    )
    return {
        "verifier": verifier,
        "logged_mean": sum(r or 0 for r in logged.rewards) / len(trajs),
        "rescored_mean": sum(s.reward for s in scores) / len(scores),
        "failures": sum(s.failure is not None for s in scores),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"replay of {r['run']} step {r['step']}: {r['sequences']} sequences, "
        f"{r['response_tokens']} response tokens",
        "",
        f"{'variant':<14} {'mean |gap|':>12} {'max |gap|':>12}",
    ]
    for name, v in r["variants"].items():
        lines.append(f"{name:<14} {v['gap_mean']:>12.3e} {v['gap_max']:>12.3e}")
    lines += [
        "",
        "routing disagreement without Keep Routing, by MoE layer: "
        + ", ".join(f"{x:.3f}" for x in r["routing_disagreement_by_layer"]),
        "",
        "worst tokens (Keep Routing + Keep Sampling Mask):",
    ]
    for w in r["worst_tokens"]:
        lines.append(
            f"  seq {w['sequence']:>3} pos {w['position']:>4} {w['context']!r:>20} -> "
            f"{w['token']!r:<6} sampler {w['sampler_logprob']:8.4f} "
            f"learner {w['learner_logprob']:8.4f} gap {w['gap']:.2e}"
        )
    if "rescored" in r:
        s = r["rescored"]
        lines.append(
            f"\nre-scored with {s['verifier']}: mean {s['rescored_mean']:.3f} "
            f"(logged {s['logged_mean']:.3f}), {s['failures']} failures"
        )
    return "\n".join(lines)


def main(args: Any) -> int:
    """The `keeprl replay RUN_DIR --step N [--json OUT]` handler."""
    try:
        report = replay(args.run_dir, args.step, verifier=args.verifier, top=args.top)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"keeprl replay: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        write_output(args.json, json.dumps(report, indent=1))
        print(f"\nreport written to {args.json}")
    return 0
