"""The README's table of registered models, generated from timm's registry (never typed by hand).

    python -m timm_hpm.cli.model_table            # print the table
    python -m timm_hpm.cli.model_table --update README.md

(in a checkout, ``python recipes/model_table.py`` runs this module.)
"""
import argparse
from pathlib import Path

import timm
import torch

import timm_hpm
from timm_hpm.report import markdown_table, print_or_update


def model_table() -> str:
    rows = []
    for name in timm_hpm.list_models():
        with torch.device('meta'):
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        cfg = model.pretrained_cfg
        with_weights = set(timm.list_pretrained(f'{name}.*'))
        tags = [t for t in timm.list_models(f'{name}.*', include_tags=True) if '.' in t]
        size = 'x'.join(map(str, cfg['input_size']))
        rows.append([f'`{name}`', f'{params:.1f}', size, cfg['num_classes'],
                     _tags([t for t in tags if t in with_weights]), _tags([t for t in tags if t not in with_weights])])
    return markdown_table(['model', 'params (M)', 'input', 'num_classes', 'weights (shipped)',
                           'planned tags (not published)'], rows, 'lrlrll')


def _tags(names) -> str:
    return ', '.join(f"`{name.split('.', 1)[1]}`" for name in names) or '-'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--update', type=Path, help='rewrite the table between the markers in this file')
    args = parser.parse_args(argv)
    print_or_update(model_table(), args.update, 'model-table')


if __name__ == '__main__':
    main()
