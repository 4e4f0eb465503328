"""Robustness evaluation: MSA for HPM models, AutoAttack for any model (the code and its documentation:
``timm_hpm.cli.evaluate``; from an install: ``timm-hpm-evaluate`` or ``accelerate launch -m timm_hpm.cli.evaluate``).

    accelerate launch recipes/evaluate.py --model hpm_wrn28_10.<tag> --dataset cifar10 --eps 8/255 --protocol msa
    python recipes/evaluate.py --model local-dir:runs/x/final --dataset fashion_mnist --eps 0.1 --device cpu

The command that eval.json records begins ``python recipes/evaluate.py`` when this file ran.
"""
import sys

from timm_hpm.cli.evaluate import cli

if __name__ == '__main__':
    sys.exit(cli())
