#!/usr/bin/env bash
# Install keeprl into .venv (see scripts/_venv.sh) and run the demo. Arguments go to
# `keeprl demo`, e.g. bash scripts/quickstart.sh --tokens 64 --seed 1
set -euo pipefail

KEEPRL_EXTRAS=
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$KEEPRL_ROOT"

keeprl demo "$@"
