"""Export + model card + push to the Hugging Face Hub (the code and its documentation: ``timm_hpm.cli.push_to_hub``;
from an install: ``timm-hpm-push``).

    python recipes/push_to_hub.py --run runs/<run>/final --results runs/<run>/eval.json --repo-id <org>/<name> --dry-run
"""
import sys

from timm_hpm.cli.push_to_hub import cli

if __name__ == '__main__':
    sys.exit(cli())
