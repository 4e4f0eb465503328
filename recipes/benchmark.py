"""Benchmark any model honestly, batch-dependent or not (the code and its documentation: ``timm_hpm.cli.benchmark``;
from an install: ``timm-hpm-benchmark`` or ``python -m timm_hpm.cli.benchmark``).

    python recipes/benchmark.py --model tbn_small_cnn.fmnist_pgdat --dataset fashion_mnist --eps 0.1 --n-examples 250 \
        --batch-size 250 --device cpu --out results/fashion_mnist/benchmark_tbn_full_250

The command that benchmark.json records begins ``python recipes/benchmark.py`` when this file ran.
"""
import sys

from timm_hpm.cli.benchmark import cli

if __name__ == '__main__':
    sys.exit(cli())
