# Sourced by demo.sh and test.sh: makes ./.venv with PyTorch and this project installed.
# Idempotent: a stamp records what was installed, so a second run only checks and goes on.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
EXTRAS="${KAF_EXTRAS:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: Python 3.10 or newer is needed; found $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# A bare `pip install torch` pulls a CUDA build of several GB: take the CPU wheel where no NVIDIA GPU is.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing PyTorch with CUDA"
        "${PIP[@]}" torch
    else
        echo "setup: no NVIDIA GPU, installing the CPU build of PyTorch"
        "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

STAMP="$VENV/.kaf-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) extras=[$EXTRAS]"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "setup: installing KAF Segment${EXTRAS:+ with [$EXTRAS]}"
    "${PIP[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
