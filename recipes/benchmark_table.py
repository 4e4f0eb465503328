"""The table of finished benchmarks, from their benchmark.json files (the code: ``timm_hpm.cli.benchmark_table``).

    python recipes/benchmark_table.py results/fashion_mnist/benchmark_tbn_full_250 \
        results/fashion_mnist/benchmark_tbn_running_250 --update README.md
"""
from timm_hpm.cli.benchmark_table import main

if __name__ == '__main__':
    main()
