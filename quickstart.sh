#!/usr/bin/env bash
# One entry point for README's quick start:
#   bash quickstart.sh demo   -> set up .venv and run the demo on the embedded default model
#   bash quickstart.sh test   -> set up .venv and run the whole test suite
# Torch is installed before the project so pip never pulls a CUDA build onto a CPU machine;
# an interpreter that already has torch (a GPU box) is reused through system site-packages.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}; shift || true
venv=${FERRET_VENV:-.venv}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    if "$py" -c "import torch" 2>/dev/null; then
        "$py" -m venv --system-site-packages "$venv"
    else
        "$py" -m venv "$venv"
    fi
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
if [ ! -f "$venv/.ferret-installed" ] || [ pyproject.toml -nt "$venv/.ferret-installed" ]; then
    pip install -q -e ".[train,demo,dev]"
    touch "$venv/.ferret-installed"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Keep the working directory off sys.path: the repository's kernels/ folder would otherwise
# shadow the unrelated `kernels` package that bitsandbytes and transformers probe for.
export PYTHONSAFEPATH=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ferret/torch_extensions}
case "$what" in
    demo) exec ferret demo "$@" ;;
    test)
        # The browser test drives Debian's chromium; install it where we may (root + apt).
        if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
                || echo "quickstart: could not install chromium; the browser test will be skipped" >&2
        fi
        export TRITON_INTERPRET=1
        exec python -m pytest kernels/ tests/ "$@" ;;
    *) echo "usage: bash quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac
