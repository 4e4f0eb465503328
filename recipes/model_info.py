"""RobustBench ``model_info.json`` from finished evaluations (the code: ``timm_hpm.cli.model_info``).

    python recipes/model_info.py results/fashion_mnist/eval_hpm_msa4_1000/eval.json [more eval.json ...]
"""
from timm_hpm.cli.model_info import main

if __name__ == '__main__':
    main()
