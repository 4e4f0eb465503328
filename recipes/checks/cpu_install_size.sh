#!/usr/bin/env bash
# The size of a CPU-only install: a fresh venv, torch's CPU build, then this package (the README's Install).
#   bash recipes/checks/cpu_install_size.sh [VENV]      # default: a new temporary folder
# TORCH names what gives the CPU build (default: PyTorch's CPU index); e.g. a local wheel where that index is not
# reachable: TORCH="/path/torch-2.13.0+cpu-...whl torchvision==0.28.0".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV=${1:-$(mktemp -d)/venv}
TORCH=${TORCH:-"torch torchvision --index-url https://download.pytorch.org/whl/cpu"}
python3 -m venv "$VENV"
# shellcheck disable=SC2086  # TORCH is a list of pip arguments
"$VENV/bin/pip" install -q --disable-pip-version-check $TORCH
"$VENV/bin/pip" install -q --disable-pip-version-check "$ROOT"
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -iE '^(torch|torchvision|triton|nvidia)' || true
if "$VENV/bin/pip" list 2>/dev/null | grep -qiE '^nvidia'; then
    echo "CUDA libraries were installed: the torch build is not CPU-only" >&2
    exit 1
fi
du -sh "$VENV"
