"""The `keeprl` command line: one subcommand per job, each run by a module of its own.

Subcommands are listed in `COMMANDS`. Each handler module is imported only when its
subcommand runs, so `keeprl --help` stays fast and does not pull in torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .run_dir import nearest_existing

PACKAGES = ("policy", "rl", "rollout", "rewards", "kernels")


@dataclass(frozen=True, kw_only=True)
class Command:
    """One subcommand: its help line, how it adds its options, and the module that runs it.

    The handler module must define `main(args: argparse.Namespace) -> int`.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str
    # Options naming files the command writes: checked before the work (output_file_problem).
    outputs: tuple[str, ...] = ()


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--tokens", type=int, default=32, help="number of tokens to generate (default: 32)"
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. trainer.total_steps=10",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in trainer.output_dir from its last intact checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the earlier keeprl run in trainer.output_dir and start over",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config before running"
    )


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by keeprl train")
    parser.add_argument("--step", type=int, required=True, help="the logged step to replay")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("--verifier", help="re-score the responses with this verifier")
    parser.add_argument("--top", type=int, default=10, help="worst tokens to list")


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="RUN_DIR_OR_PARQUET", help="a run directory, or one step's Parquet file"
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="the logged step to show (required for a run directory)",
    )
    parser.add_argument(
        "--index", type=int, metavar="I", help="show only this trajectory of the step"
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="without --index, show the first N trajectories; 0 shows all (default: 8)",
    )
    parser.add_argument(
        "--eval",
        metavar="SET",
        help="show the held-out eval set SET's samples of the evaluation after --step updates",
    )
    parser.add_argument("--json", metavar="OUT", help="also write what is shown to this JSON file")


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory written by keeprl train"
    )
    parser.add_argument(
        "--out", metavar="PNG", help="the PNG to write (default: RUN_DIR/curves.png)"
    )
    parser.add_argument(
        "--metrics",
        metavar="A,B",
        help="comma-separated metric names, one panel each (default: reward_mean, accuracy "
        "and kl, those the run logged)",
    )


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for train"
    )
    parser.add_argument(
        "--gpus", type=int, nargs="+", required=True, metavar="N", help="GPU counts to plan for"
    )
    parser.add_argument(
        "--gpu", nargs="+", choices=["h100", "h200"], default=["h200"], help="GPU kinds"
    )
    parser.add_argument(
        "--preset",
        help="plan this policy preset instead of the config's model (e.g. a released model "
        "whose checkpoint is not on this machine)",
    )
    parser.add_argument(
        "--rollout-gpus",
        type=int,
        metavar="R",
        help="disaggregated: R of the GPUs sample, the rest train (default: colocated)",
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=512, help="prompt length (default: 512)"
    )
    parser.add_argument(
        "--avg-tokens", type=int, help="mean trained sequence length (default: prompt + max_tokens)"
    )
    parser.add_argument(
        "--fp8-rollout",
        action="store_true",
        help="the rollout engines serve FP8 weights and KV cache (as the released checkpoint)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the plans to this JSON file")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="CHECKPOINT_OR_RUN",
        help="a run directory, one of its checkpoints, or a policy directory",
    )
    parser.add_argument(
        "--config", help="experiment YAML with eval sets (default: the run's own config)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for train"
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="of a run: the policy after N updates (0: the initial policy; default: the "
        "newest checkpoint's)",
    )
    parser.add_argument(
        "--json",
        metavar="OUT",
        help="the JSON report (default: RUN/eval/report_<N>.json, or ./keeprl-eval.json)",
    )


COMMANDS: dict[str, Command] = {
    "replay": Command(
        help="recompute a logged step's learner log-probs and report sampler/learner mismatch",
        add_arguments=_replay_arguments,
        handler="rl.replay",
        outputs=("json",),
    ),
    "inspect": Command(
        help="print a logged step's trajectories token by token: pi_old, kept sets, routing",
        add_arguments=_inspect_arguments,
        handler="rl.inspect",
        outputs=("json",),
    ),
    "plot": Command(
        help="plot a run's per-step metrics (reward, accuracy, KL) to a PNG",
        add_arguments=_plot_arguments,
        handler="rl.plot",
        outputs=("out",),
    ),
    "train": Command(
        help="run a GRPO experiment from a YAML config",
        add_arguments=_train_arguments,
        handler="rl.trainer",
    ),
    "eval": Command(
        help="evaluate a policy on the config's held-out eval sets (pass@k, accuracy)",
        add_arguments=_eval_arguments,
        handler="rl.evaluation",
        outputs=("json",),
    ),
    "plan": Command(
        help="estimate memory per GPU and step time of a config on N H100s or H200s",
        add_arguments=_plan_arguments,
        handler="rl.plan",
        outputs=("json",),
    ),
    "demo": Command(
        help="build a tiny DSA policy, run it, and print what it did",
        add_arguments=_demo_arguments,
        handler="rl.demo",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The full `keeprl` parser, one subparser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="keeprl",
        description="GRPO post-training for DeepSeek-V3.2-style DSA models.",
    )
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments), run the chosen subcommand, return its code.

    With no subcommand, prints the help and returns 2, the usual code for a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = COMMANDS[args.command]
    for name in command.outputs:
        problem = output_file_problem(getattr(args, name))
        if problem:
            print(f"keeprl {args.command}: --{name}: {problem}", file=sys.stderr)
            return 2
    _log_to_stderr()
    handler = importlib.import_module(command.handler)
    return handler.main(args)


def output_file_problem(path: str | None) -> str | None:
    """Why `path` cannot be written as an output file (None: it can, or no path was given;
    missing parent directories are created by the writer). Handlers check their `--json` /
    `--out` paths with it before the work, not after."""
    if not path:
        return None
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"{path} is a directory"
    probe = nearest_existing(Path(target).parent)
    if not probe.is_dir():
        return f"cannot write {path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        return f"cannot write {path}: permission denied"
    return None


def write_output(path: str, text: str) -> None:
    """Write an output file checked by output_file_problem, creating its directories."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it), not the one at creation."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """Show keeprl's own INFO lines (warm-start stages, weight updates) on stderr; other
    libraries' loggers keep their settings."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in PACKAGES:
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
