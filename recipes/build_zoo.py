"""Build one model-zoo entry end to end, and publish it (a dry run unless --push). The code and its documentation:
``timm_hpm.cli.build_zoo``; from an install: ``timm-hpm-zoo``. The manifest is timm_hpm/zoo/zoo.yaml
(``recipes/zoo.yaml`` links to it).

    python recipes/build_zoo.py hpm_small_cnn.fmnist_hpm --device cpu            # CPU entry, dry-run publish
    python recipes/build_zoo.py --table                                          # the README's zoo table
"""
import sys

from timm_hpm.cli.build_zoo import cli

if __name__ == '__main__':
    sys.exit(cli())
