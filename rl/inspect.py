"""`keeprl inspect`: print one logged step's trajectories token by token, as the sampler saw them.

Where `keeprl replay` recomputes a step with the learner, inspect only reads what was stored:
for each trajectory a header (group, engine, weight version, finish reason, reward, verifier
sub-scores and failure, the task's reference answer, sampling parameters), the decoded prompt
and response, then one row per response token: its id and text, pi_old (the sampler's
log-prob under the truncated distribution), the kept set top-k/top-p left at that position,
and the experts each MoE layer routed the position that produced it to (routing row
len(prompt) - 1 + t for response token t). The source is a run directory (`<run>/rollouts`)
or a single step file. Tokens are decoded with the run's tokenizer (its config.yaml's
`model.tokenizer`; the character tokenizer for a step file outside a run directory).

The report is built as a plain dict first and the text is rendered from it, so `--json`
writes exactly what is printed (with the full kept sets rather than their first few tokens).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from rollout.store import RolloutFileError, RolloutStore, StepRollouts, read_file
from rollout.trajectory import Trajectory

from .cli import write_output
from .config import ExperimentConfig, build
from .run_dir import RunDir
from .tokenizer import CharTokenizer, Tokenizer, load_tokenizer

DEFAULT_LIMIT = 8  # trajectories shown when no --index is given; a step may hold hundreds
KEPT_SHOWN = 5  # kept tokens decoded per row of the text table; the JSON has all of them


class InspectError(ValueError):
    """A source, step or index that does not exist; the message says what does."""


def run_tokenizer(step_file: Path) -> Tokenizer:
    """The tokenizer of the run a step file belongs to (`<run>/rollouts/step_N.parquet`):
    its config's choice, or the character tokenizer outside a run directory."""
    run = RunDir(step_file.resolve().parent.parent)
    if not run.config.exists():
        return CharTokenizer()
    try:
        cfg = build(ExperimentConfig, yaml.safe_load(run.config.read_text()))
        return load_tokenizer(cfg.model)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InspectError(f"{run.config}: cannot build the run's tokenizer: {e}") from None


def load_step(
    source: str | Path, step: int | None, eval_set: str | None = None
) -> tuple[Path, StepRollouts]:
    """The stored step `step` of a run directory (or of its `rollouts/` directory), or the
    content of a single step file (then `step`, when given, must match it). With `eval_set`,
    the samples of that held-out set's evaluation after `step` updates (rl/evaluation.py).

    Returns the file read and its content. Raises InspectError for a missing source or step
    and RolloutFileError (rollout.store) for a damaged file. Nothing is created on disk.
    """
    path = Path(source)
    if path.is_file():
        rollouts = read_file(path)
        if step is not None and rollouts.step != step:
            raise InspectError(f"{path} holds step {rollouts.step}, not step {step}")
        return path, rollouts
    if not path.is_dir():
        raise InspectError(f"{path}: no such run directory or step file")
    # RolloutStore() creates its directory: look before constructing one.
    directory = RunDir(path).rollouts if RunDir(path).rollouts.is_dir() else path
    if eval_set is not None:
        directory = RunDir(path).eval / eval_set
        if not directory.is_dir():
            sets = sorted(p.name for p in RunDir(path).eval.glob("*/"))
            raise InspectError(f"{path}: no eval set {eval_set!r}; evaluated: {sets or 'none'}")
    store = RolloutStore(directory)
    steps = store.steps()
    if not steps:
        raise InspectError(f"{path}: no logged steps (no rollouts/step_*.parquet)")
    if step is None:
        raise InspectError(
            f"--step is required for a run directory; available steps: {_spans(steps)}"
        )
    if step not in steps:
        raise InspectError(f"{path}: step {step} is not stored; available steps: {_spans(steps)}")
    return store.path(step), store.read_step(step)


def _spans(steps: list[int]) -> str:
    """Ascending ints as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def token_text(tok: Tokenizer, token_id: int) -> str:
    """One token as text; BOS, EOS and ids outside the vocabulary get a visible name, since
    the tokenizer decodes them to nothing."""
    if token_id == tok.bos_id:
        return "<bos>"
    if token_id == tok.eos_id:
        return "<eos>"
    return tok.decode([token_id]) or f"<unk {token_id}>"


def _shown(text: str) -> str:
    """A token for the table: quoted so whitespace shows, except token_text's <names>."""
    special = len(text) > 1 and text.startswith("<") and text.endswith(">")
    return text if special else repr(text)


def _token_rows(t: Trajectory, tok: Tokenizer) -> list[dict[str, Any]]:
    rows = []
    n_prompt = len(t.prompt_ids)
    for pos, token_id in enumerate(t.response_ids):
        kept = [int(k) for k in t.kept_ids[pos]]
        route = n_prompt - 1 + pos  # the position whose forward produced this token
        experts = t.routing[route].tolist() if 0 <= route < len(t.routing) else None
        rows.append(
            {
                "position": pos,
                "id": token_id,
                "text": token_text(tok, token_id),
                "logprob": float(t.logprobs[pos]),
                "kept_size": len(kept),  # 0: sampling did not truncate (the whole vocabulary)
                "kept_ids": kept,
                "experts": experts,  # [n_moe_layers][top_k]
            }
        )
    return rows


def trajectory_report(
    logged: StepRollouts, index: int, tok: Tokenizer | None = None
) -> dict[str, Any]:
    """Everything inspect shows of trajectory `index` of a step, JSON-ready."""
    tok = tok or CharTokenizer()
    t = logged.trajectories[index]
    return {
        "index": index,
        "group_id": logged.group_ids[index],
        "prompt_index": t.prompt_index,
        "engine": t.engine,
        "weight_version": t.weight_version,
        "finish_reason": t.finish_reason,
        "reward": logged.rewards[index],
        "subscores": logged.subscores[index],
        "failure": logged.failures[index],
        "reference": RunDir.reference_of(t),
        "sampling": {
            "temperature": t.sampling.temperature,
            "top_p": t.sampling.top_p,
            "top_k": t.sampling.top_k,
            "max_tokens": t.sampling.max_tokens,
            "seed": t.sampling.seed,
            "stop_token_ids": list(t.sampling.stop_token_ids),
        },
        "prompt_ids": t.prompt_ids,
        "prompt": tok.decode(t.prompt_ids),
        "response_ids": t.response_ids,
        "response": tok.decode(t.response_ids),
        "routing_shape": list(t.routing.shape),
        "tokens": _token_rows(t, tok),
        "turns": _turns(t, tok),
    }


def _turns(t: Trajectory, tok: Tokenizer) -> list[dict[str, Any]] | None:
    """A multi-turn episode's turns (role, token span, text, and the episode's end reason on
    the last); None for a single-turn trajectory. Spans index prompt + response tokens."""
    episode = t.extra.get("episode")
    if episode is None:
        return None
    ids = [*t.prompt_ids, *t.response_ids]
    turns = [
        {"role": role, "start": a, "end": b, "text": tok.decode(ids[a:b])}
        for role, a, b in episode["turns"]
    ]
    segment, segments = episode.get("segment", 0), episode.get("segments", 1)
    if segments > 1:  # an overflow strategy continued the episode in a new context
        turns[0]["segment"] = f"segment {segment + 1} of {segments}"
    if segment + 1 < segments:
        turns[-1]["continues"] = f"context rewritten; continues in segment {segment + 2}"
    else:
        turns[-1]["end_reason"] = episode["end_reason"]
    return turns


def inspect_step(
    source: str | Path,
    step: int | None,
    *,
    index: int | None = None,
    limit: int | None = None,
    eval_set: str | None = None,
) -> dict[str, Any]:
    """The report of one logged step: trajectory `index`, or the first `limit` (None:
    DEFAULT_LIMIT, 0: all); with `eval_set`, of that set's evaluation after `step` updates."""
    limit = DEFAULT_LIMIT if limit is None else limit
    path, logged = load_step(source, step, eval_set)
    total = len(logged.trajectories)
    if index is not None:
        if not 0 <= index < total:
            raise InspectError(
                f"step {logged.step} has {total} trajectories (indices 0-{total - 1}); "
                f"there is no index {index}"
            )
        shown = [index]
    else:
        shown = list(range(total if limit <= 0 else min(limit, total)))
    tok = run_tokenizer(path)
    return {
        "file": str(path),
        "step": logged.step,
        "total": total,
        "trajectories": [trajectory_report(logged, i, tok) for i in shown],
    }


def _number(x: float | None, fmt: str = ".3f") -> str:
    return "none" if x is None else format(x, fmt)


def _format_trajectory(r: dict[str, Any], step: int, tok: Tokenizer) -> list[str]:
    s = r["sampling"]
    layers, top_k = r["routing_shape"][1:]
    subscores = ", ".join(f"{k} {_number(v)}" for k, v in sorted(r["subscores"].items()))
    lines = [
        f"== step {step}  trajectory {r['index']}  group {r['group_id']}  "
        f"prompt {r['prompt_index']}  engine {r['engine']}  weights v{r['weight_version']}  "
        f"finish {r['finish_reason']}",
        f"   reward {_number(r['reward'])}  subscores {{{subscores}}}  "
        f"failure {r['failure'] or 'none'}  reference {r['reference']!r}",
        f"   sampling temperature={s['temperature']} top_p={s['top_p']} top_k={s['top_k']} "
        f"max_tokens={s['max_tokens']} seed={s['seed']} stop={s['stop_token_ids']}",
        f"prompt   {r['prompt']!r}",
        f"response {r['response']!r}",
    ]
    for turn in r.get("turns") or []:  # an agent episode, turn by turn
        if "segment" in turn:
            lines.append(f"   {turn['segment']}")
        ends = f"  (episode ends: {turn['end_reason']})" if "end_reason" in turn else ""
        ends += f"  ({turn['continues']})" if "continues" in turn else ""
        lines.append(
            f"   {turn['role']:<9} tokens [{turn['start']}, {turn['end']})  {turn['text']!r}{ends}"
        )
    lines += [
        f"{'pos':>5} {'id':>6}  {'token':<8} {'pi_old':>9} {'kept':>5}  "
        f"{'kept tokens':<36} experts per MoE layer ({layers} layers, top-{top_k})",
    ]
    for row in r["tokens"]:
        kept = row["kept_ids"]
        head = " ".join(_shown(token_text(tok, k)) for k in kept[:KEPT_SHOWN])
        if len(kept) > KEPT_SHOWN:
            head += " ..."
        if kept and row["id"] not in kept:
            head += " (sampled token not kept!)"  # a sampler bug: pi_old is then meaningless
        experts = (
            "-"
            if row["experts"] is None
            else " | ".join(",".join(map(str, layer)) for layer in row["experts"])
        )
        lines.append(
            f"{row['position']:>5} {row['id']:>6}  {_shown(row['text']):<8} {row['logprob']:>9.4f} "
            f"{row['kept_size'] or 'all':>5}  {head or '-':<36} {experts}"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one block per trajectory."""
    tok = run_tokenizer(Path(report["file"]))
    lines = []
    shown = len(report["trajectories"])
    if shown < report["total"]:
        lines += [
            f"showing {shown} of the {report['total']} trajectories of step {report['step']} "
            "(--index I picks one, --limit 0 shows all)",
            "",
        ]
    for r in report["trajectories"]:
        lines += _format_trajectory(r, report["step"], tok) + [""]
    return "\n".join(lines).rstrip("\n")


def main(args: Any) -> int:
    """The `keeprl inspect RUN_DIR_OR_PARQUET [--step N] [--index I] [--json OUT]` handler."""
    try:
        report = inspect_step(
            args.source, args.step, index=args.index, limit=args.limit, eval_set=args.eval
        )
    except (InspectError, RolloutFileError, OSError) as e:
        print(f"keeprl inspect: {e}", file=sys.stderr)
        return 2
    try:
        print(format_report(report), flush=True)
    except BrokenPipeError:  # `keeprl inspect ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.json:
        write_output(args.json, json.dumps(report, indent=1))
        print(f"\nreport written to {args.json}")
    return 0
