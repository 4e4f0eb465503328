#!/usr/bin/env bash
# timm's own train.py with --grad-checkpointing (set_grad_checkpointing, timm's checkpoint_seq) and --layer-decay
# (group_matcher) on a small HPM WideResNet, on the CPU: one epoch of two steps on 8 random 32x32 images.
#
#   bash recipes/checks/timm_grad_checkpointing.sh /path/to/pytorch-image-models [model [model kwargs ...]]
#
# The default model is hpm_wrn28_10 at depth 10, width 1 (the DeepMind WRN family, WRN-70-16's code path); e.g.
# `... hpm_wrn70_16 depth=16 width=1` names another (kwargs: train.py's --model-kwargs). Uses the
# installed timm and this project's .venv (or $PYTHON); writes only into a temporary folder ($TMPDIR). Fails unless
# train.py finishes, writes its checkpoint, and its forward passes went through torch's checkpoint (counted).
set -euo pipefail
timm_repo=$(cd "${1:?usage: $0 /path/to/pytorch-image-models [model [model kwargs ...]]}" && pwd)
shift
if [ $# -gt 0 ]; then
    model=$1
    shift
    model_kwargs=("$@")
else
    model=hpm_wrn28_10
    model_kwargs=(depth=10 width=1)
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# two classes of four random images, as class folders (timm's default train/validation splits)
"$python" - "$work/data" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split in ('train', 'validation'):
    for label in ('a', 'b'):
        folder = Path(sys.argv[1]) / split / label
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
PY

# train.py with timm_hpm imported first (registers the models), counting torch's checkpoint calls
"$python" - "$timm_repo/train.py" "$work/data" --model "$model" --model-kwargs "${model_kwargs[@]}" \
    --num-classes 2 --grad-checkpointing --layer-decay 0.7 --device cpu --epochs 1 --warmup-epochs 0 -b 4 \
    --lr 0.01 --no-aug --workers 0 --seed 0 --log-interval 1 --output "$work/train" --experiment check \
    > "$work/train.log" 2>&1 <<'PY' || { cat "$work/train.log"; exit 1; }
import atexit
import runpy
import sys

import torch.utils.checkpoint

import timm_hpm  # noqa: F401

calls = [0]
_checkpoint = torch.utils.checkpoint.checkpoint


def counted(*args, **kwargs):
    calls[0] += 1
    return _checkpoint(*args, **kwargs)


torch.utils.checkpoint.checkpoint = counted  # what timm's checkpoint_seq calls
atexit.register(lambda: print(f'checkpointed segments run: {calls[0]}'))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
PY
cat "$work/train.log"
[ -f "$work/train/check/last.pth.tar" ] || { echo "FAIL: train.py wrote no checkpoint" >&2; exit 1; }
segments=$(sed -n 's/^checkpointed segments run: //p' "$work/train.log")
[ "${segments:-0}" -gt 0 ] || { echo "FAIL: no forward pass went through torch's checkpoint" >&2; exit 1; }
echo "OK: timm's train.py --grad-checkpointing --layer-decay 0.7 on $model (${model_kwargs[*]}): $segments checkpointed segments"
