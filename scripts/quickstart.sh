#!/usr/bin/env bash
# Install keeprl into .venv (see scripts/_venv.sh), then run the quickstart experiment:
# GRPO on a tiny DSA-MoE policy with vLLM rollout workers in Ray actors (configs/quickstart.yaml).
# Each run gets a new directory under runs/; extra arguments are config overrides, e.g.
#   bash scripts/quickstart.sh trainer.total_steps=20
set -euo pipefail

KEEPRL_EXTRAS=
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$KEEPRL_ROOT"

keeprl train configs/quickstart.yaml "trainer.output_dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
