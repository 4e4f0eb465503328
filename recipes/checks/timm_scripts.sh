#!/usr/bin/env bash
# timm's own validate.py and train.py on Fashion-MNIST, used as a timm user would (README: "Using timm's own
# scripts"). Writes results/fashion_mnist/timm_scripts/ (refuses to overwrite it; OUT=... picks another).
#
#   bash recipes/checks/timm_scripts.sh /path/to/pytorch-image-models
#
# 1. the first 1,000 test images as a class-folder dataset (sorted by class, as every folder dataset is) and
#    the first 5,000 training images as its train split (recipes/fashion_mnist_folder.py);
# 2. validate.py on the shipped HPM model and its base at batch sizes 1, 32 and 250;
# 3. train.py: one epoch of (clean) fine-tuning of the shipped HPM model, with hpm_cfg pseudo_labels, then
#    validate.py --checkpoint on its output, and how far its dataset prototypes moved.
set -euo pipefail
timm_repo=$(cd "${1:?usage: $0 /path/to/pytorch-image-models}" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=${OUT:-$root/results/fashion_mnist/timm_scripts}
[ -e "$out" ] && { echo "$out exists: not overwriting another run's results (set OUT=...)" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# timm's scripts, with timm_hpm imported first (registers the models)
timm_script() { "$python" -c "import sys, runpy, timm_hpm; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" "$@"; }

"$python" "$root/recipes/fashion_mnist_folder.py" --split test --n 1000 --out "$work/data/validation"
"$python" "$root/recipes/fashion_mnist_folder.py" --split train --n 5000 --out "$work/data/train"
for model in hpm_small_cnn.fmnist_hpm small_cnn.fmnist_pgdat; do
    for b in 1 32 250; do
        timm_script "$timm_repo/validate.py" "$work/data/validation" --model "$model" --pretrained -b "$b" \
            --workers 0 --device cpu --results-file "$out/validate_${model}_b${b}.json" --results-format json \
            > "$out/validate_${model}_b${b}.log" 2>&1
    done
done
timm_script "$timm_repo/train.py" "$work/data" --model hpm_small_cnn.fmnist_hpm --pretrained \
    --model-kwargs "hpm_cfg={'pseudo_labels': True}" --device cpu --epochs 1 --warmup-epochs 0 -b 128 --lr 0.001 \
    --no-aug --workers 0 --seed 0 --output "$work/train" --experiment pseudo_labels > "$out/train.log" 2>&1
timm_script "$timm_repo/validate.py" "$work/data/validation" --model hpm_small_cnn --num-classes 10 \
    --checkpoint "$work/train/pseudo_labels/last.pth.tar" -b 250 --workers 0 --device cpu \
    --results-file "$out/validate_trained_b250.json" --results-format json > "$out/validate_trained_b250.log" 2>&1
"$python" - "$work/train/pseudo_labels/last.pth.tar" "$out" <<'PY'
import json, sys
from pathlib import Path

import timm
import timm_hpm  # noqa: F401
from timm.models import load_state_dict

trained = load_state_dict(sys.argv[1])  # torch.load(weights_only=True)
shipped = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).state_dict()
moved = (trained['fc.dataset_prototypes'] - shipped['fc.dataset_prototypes']).norm(dim=1)
relative = moved / shipped['fc.dataset_prototypes'].norm(dim=1)
out = Path(sys.argv[2])
figures = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob('validate_*.json'))}
summary = dict(
    top1={name: (r[0] if isinstance(r, list) else r)['top1'] for name, r in figures.items()},
    prototypes_moved_relative=[round(float(v), 4) for v in relative],
    prototypes_initialized=bool(trained['fc.prototypes_initialized']),
)
(out / 'summary.json').write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
