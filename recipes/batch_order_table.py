"""Clean accuracy by batch order and batch size: the figure a batch-dependent model gives depends on both.

    python recipes/batch_order_table.py --model hpm_small_cnn.fmnist_hpm small_cnn.fmnist_pgdat --n-test 1000

Scores the first ``--n-test`` test images in two orders, each at every ``--batch-sizes``:

* ``default``: the test set's own order (timm's ``validate.py`` with ``--dataset torch/fashion_mnist``);
* ``class_sorted``: label order, stable within a class: the order a class-folder dataset yields (timm's
  ``validate.py`` on an ImageFolder layout, with the files of a class named in test-set order).

Batches are batched as timm's ``validate.py`` batches its loader: consecutive slices of ``-b`` images of the order,
the last one smaller, nothing dropped. A batch-independent model gives the same figure everywhere. Writes
``table.json`` and ``table.md`` into ``--out`` (default ``results/<dataset>/batch_order_<n-test>``), which must
not exist yet: a table is never overwritten.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import timm
import torch
import torch.nn as nn

import timm_hpm
from timm_hpm.attacks import normalized_view
from timm_hpm.data import DATASETS, load_eval_tensors
from timm_hpm.eval import check_eval_ready, hpm_mode, make_batchings, model_fingerprint
from timm_hpm.report import markdown_table

ORDERS = ('default', 'class_sorted')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', nargs='+', required=True, help="timm names (with tag), 'local-dir:<folder>', ...")
    p.add_argument('--dataset', default='fashion_mnist', choices=DATASETS)
    p.add_argument('--data-dir', help='dataset folder (see recipes/evaluate.py)')
    p.add_argument('--n-test', type=int, default=1000, help='the first N test images')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32, 250])
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', type=Path, default=None, help='new folder (default results/<dataset>/batch_order_<N>)')
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1:
        p.error(f'batch sizes must be >= 1, got {args.batch_sizes}')
    return args


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Sequence[List[int]]) -> float:
    """Top-1 accuracy with one forward per batch (the batch is what a batch-dependent model sees)."""
    correct = sum(int((model(x[idx]).argmax(1) == y[idx]).sum()) for idx in batches)
    return correct / len(y)


def order_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_sizes: Sequence[int],
                orders: Sequence[str] = ORDERS) -> Dict[str, Dict[str, float]]:
    """``{order: {str(batch size): accuracy}}``, batched by the evaluation's own batchings."""
    return {order: {str(b): clean_accuracy(model, x, y, make_batchings(len(y), b, [order], seed=0, labels=y)[order])
                    for b in batch_sizes} for order in orders}


def to_markdown(record: dict) -> str:
    sizes = record['batch_sizes']
    rows = [[name, order, *(f'{100 * by_size[str(b)]:.1f}%' for b in sizes)]
            for name, entry in record['models'].items() for order, by_size in entry['accuracy'].items()]
    lines = [f"Clean accuracy on the first {record['n_test']} {record['dataset']} test images, by batch order and "
             'batch size (-b)', '',
             markdown_table(['model', 'order', *(f'-b {b}' for b in sizes)], rows, 'll' + 'r' * len(sizes))]
    lines += ['', record['batching'], '', record['orders_note']]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    out = args.out or Path('results') / args.dataset / f'batch_order_{args.n_test}'
    if out.exists():
        raise SystemExit(f'{out} exists: a table is never overwritten; pass a new --out folder.')
    record = dict(
        dataset=args.dataset, n_test=args.n_test, batch_sizes=args.batch_sizes, models={},
        batching="Batches: consecutive slices of -b images of the order, the last one smaller, nothing dropped "
                 "(as timm's validate.py batches its loader).",
        orders_note="default: the test set's order (timm's validate.py --dataset torch/fashion_mnist). class_sorted: "
                    "label order, stable within a class, as a class-folder dataset yields the images (timm's "
                    "validate.py on an ImageFolder of the test images, files named in test-set order).",
        command=shlex.join(['python', 'recipes/batch_order_table.py',
                            *map(str, argv if argv is not None else sys.argv[1:])]),  # shlex.split gives them back
        timm_hpm_version=timm_hpm.__version__, timm_version=timm.__version__, torch_version=torch.__version__)
    for name in args.model:
        model = normalized_view(timm.create_model(name, pretrained=True)).eval().to(args.device)
        check_eval_ready(model)
        base = getattr(model, 'module', model)
        x, y = load_eval_tensors(args.dataset, args.n_test, args.data_dir, base.pretrained_cfg,
                                 num_classes=base.num_classes, image_size=base.pretrained_cfg['input_size'])
        accuracy = order_table(model, x.to(args.device), y.to(args.device), args.batch_sizes)
        figures = {v for by_size in accuracy.values() for v in by_size.values()}
        record['models'][name] = dict(accuracy=accuracy, same_in_every_batching=len(figures) == 1,
                                      hpm_mode=hpm_mode(model),
                                      model_sha256=model_fingerprint(model))
    out.mkdir(parents=True)
    (out / 'table.json').write_text(json.dumps(record, indent=2) + '\n')
    table = to_markdown(record)
    (out / 'table.md').write_text(table)
    print(table)
    print(f"wrote {out / 'table.json'}")
    return record


if __name__ == '__main__':
    main()
