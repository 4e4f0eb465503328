"""HPM adversarial fine-tuning with accelerate (the code and its documentation: ``timm_hpm.cli.finetune``; from an
install: ``timm-hpm-finetune`` or ``accelerate launch -m timm_hpm.cli.finetune``).

    accelerate launch recipes/finetune.py --config recipes/configs/hpm_wrn28_10_cifar10.yaml
    accelerate launch recipes/finetune.py --resume runs/<run>/      # after a crash or kill; the budget may change
    python recipes/finetune.py --config ... --epochs 1 --device cpu              # without accelerate launch
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py ... --device cpu   # 2 CPU processes (gloo)
"""
import sys

from timm_hpm.cli.finetune import cli

if __name__ == '__main__':
    sys.exit(cli())
