#!/usr/bin/env bash
# Install keeprl with its test extra into .venv (see scripts/_venv.sh) and run the whole check:
# ruff lint, ruff format check, then pytest. Arguments go to pytest, e.g.
#   bash scripts/test.sh tests/test_cli.py
#   bash scripts/test.sh -m slow
#   KEEPRL_TORCH_SPEC=torch bash scripts/test.sh -m gpu     # on a CUDA machine
set -euo pipefail

KEEPRL_EXTRAS=test
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$KEEPRL_ROOT"

ruff check .
ruff format --check .
python -m pytest "$@"
