"""Benchmark any model honestly, batch-dependent or not: a command line over ``timm_hpm.benchmark``
(``timm-hpm-benchmark``, ``python -m timm_hpm.cli.benchmark``; a checkout's ``recipes/benchmark.py`` runs it).

    python recipes/benchmark.py --model small_cnn.fmnist_pgdat --dataset fashion_mnist --eps 0.1 --n-examples 250 \
        --batch-size 250 --device cpu --out results/fashion_mnist/benchmark_base_250
    python recipes/benchmark.py --model tbn_small_cnn.fmnist_pgdat --dataset fashion_mnist --eps 0.1 ...
    python recipes/benchmark.py --model tbn_small_cnn.fmnist_pgdat --norm-stats running ...   # running statistics
    python recipes/benchmark.py --model wrn28_10.<tag> --dataset cifar10 --eps 8/255 --out runs/benchmark/wrn

First the batch-dependence test (a few hundred clean images: permuted, re-batched at 1, 32 and B, class-sorted,
other members changed), then standard AutoAttack for a batch-independent model (the figure ``recipes/evaluate.py
--protocol autoattack`` gives with the same images, batch size, budget and seed), or MSA on fixed batches in the
natural batch orders and the batch-poisoning protocol for a batch-dependent one (its robust accuracy: the worst case
measured). Writes ``benchmark.json`` (the report), ``benchmark.md`` (its tables), ``model_info.json`` (RobustBench's
entry, ``autoattack_acc`` the worst case, the footnote saying which protocol ran and why) and the work files
(``batch_dependence.json``, ``attack/``, ``poison/``) into ``--out``. A killed run resumes from ``--out``; a folder
holding a finished benchmark is refused, never overwritten.
"""
import argparse
import shlex
import sys
from pathlib import Path

from timm_hpm import HPM_MODES
from timm_hpm.benchmark import BATCHINGS, MSA_BUDGET_FIELDS
from timm_hpm.cli.config_args import add_config_arguments, option_values
from timm_hpm.data import DATASETS
from timm_hpm.eval.msa_config import MSAConfig
from timm_hpm.eval.poison import PoisonConfig



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True, help="timm name (with tag), 'local-dir:<folder>' or 'hf-hub:<repo>'")
    p.add_argument('--checkpoint', help="weights file (safetensors or weights-only .pt) to load into --model")
    p.add_argument('--no-pretrained', action='store_true', help='random weights (for smoke tests only)')
    p.add_argument('--dataset', required=True, choices=DATASETS, help='the test split of this dataset')
    p.add_argument('--data-dir', help='dataset folder (CIFAR: torchvision layout; ImageNet: ImageFolder root)')
    p.add_argument('--threat-model', default='Linf', choices=['Linf', 'L2'])
    p.add_argument('--eps', default=None, help="'8/255', 0.1, ... (default: RobustBench's for CIFAR and ImageNet)")
    p.add_argument('--n-examples', type=int, default=1000, help='the first N test images')
    p.add_argument('--batch-size', type=int, default=128, help='B: the fixed batch size that is scored')
    p.add_argument('--hpm-mode', choices=HPM_MODES, help="an HPM model's head mode (default: the model's own)")
    p.add_argument('--norm-stats', choices=['batch', 'running'],
                   help="a model with test-batch-statistics batch norm (tbn_small_cnn): what eval mode normalises "
                        "with ('running': the same network with its running statistics)")
    p.add_argument('--surrogate-model', action='append', default=[], metavar='NAME',
                   help='another model MSA attacks through (a timm name, local-dir: or hf-hub:; repeatable)')
    p.add_argument('--batchings', nargs='+', default=list(BATCHINGS), choices=BATCHINGS,
                   help='a batch-dependent model\'s batchings (fewer than all is a reduced run)')
    p.add_argument('--detection-examples', type=int, default=256, help='images of the batch-dependence test')
    budget = p.add_argument_group('attack budget (default: full strength; lower is a reduced, unreliable run)')
    add_config_arguments(budget, MSAConfig, only=MSA_BUDGET_FIELDS)  # the options of timm-hpm-evaluate
    add_config_arguments(budget, PoisonConfig, only=('steps',))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default=None, help="'cpu', 'cuda', ... (default: cuda when available)")
    p.add_argument('--out', type=Path, default=None, help='run folder (default runs/benchmark/<model>)')
    return p.parse_args(argv)


def load_model(name: str, checkpoint=None, pretrained: bool = True):
    """``--model`` in eval mode (timm_hpm.benchmark puts a timm model's normalisation inside itself)."""
    from timm_hpm.cli.evaluate import create_model
    return create_model(name, checkpoint, pretrained).eval()


def main(argv=None):
    args = parse_args(argv)
    import torch

    import timm_hpm
    from timm_hpm.benchmark import format_report
    from timm_hpm.layers.batch_stats_norm import set_norm_stats
    model = load_model(args.model, args.checkpoint, not args.no_pretrained)
    if args.hpm_mode:
        timm_hpm.get_hpm_head(model).mode = args.hpm_mode
    if args.norm_stats:
        try:
            set_norm_stats(model, args.norm_stats)
        except ValueError as error:
            raise SystemExit(f'--norm-stats: {error}') from None
    name = args.model + (f' (norm_stats={args.norm_stats})' if args.norm_stats else '') + \
        (f' (hpm mode {args.hpm_mode})' if args.hpm_mode else '')
    surrogates = {s.replace('/', '_').replace(':', '_'): load_model(s) for s in args.surrogate_model}
    out = args.out or Path('runs/benchmark') / args.model.replace('/', '_').replace(':', '_')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    budget = dict(option_values(MSAConfig, args, MSA_BUDGET_FIELDS),
                  poison_steps=option_values(PoisonConfig, args, ('steps',))['steps'])
    from timm_hpm.cli import recorded_program
    command = shlex.join([*recorded_program('recipes/benchmark.py', 'timm_hpm.cli.benchmark'),
                          *map(str, sys.argv[1:] if argv is None else argv)])
    try:
        result = timm_hpm.benchmark(model, n_examples=args.n_examples, dataset=args.dataset,
                                    threat_model=args.threat_model, model_name=name, data_dir=args.data_dir,
                                    device=device, batch_size=args.batch_size, eps=args.eps, surrogates=surrogates,
                                    out=out, budget=budget, batchings=args.batchings,
                                    detection_examples=args.detection_examples, seed=args.seed,
                                    metadata={'command': command, 'threads': torch.get_num_threads()})
    except FileExistsError as error:
        raise SystemExit(str(error)) from None
    print(format_report(result.report))
    print(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.md'} and {out / 'model_info.json'}")
    return result


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-benchmark``, ``python -m timm_hpm.cli.benchmark``,
    recipes/benchmark.py): its exit status."""
    main(argv)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
