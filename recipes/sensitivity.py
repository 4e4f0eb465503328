"""Sensitivity analysis: the FC head vs the l2 head of one HPM model, in input and feature space.

    python recipes/sensitivity.py --model hpm_small_cnn.fmnist_hpm --dataset fashion_mnist --eps-max 0.2 \
        --n-examples 1000 --out results/fashion_mnist/sensitivity

Writes ``sensitivity.json`` (the APGD accuracy curve per head, per-sample margins, margin-gradient norms and
flip distances, and their medians) and ``sensitivity.png`` (three panels). Both heads are batch-independent
views of the same weights (``fc`` and ``static``; see ``timm_hpm.analysis``). A finished curve point is kept
in ``partial.json``, so an interrupted run resumes.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import timm
import torch

import timm_hpm
from timm_hpm.analysis import (ANALYSIS_HEADS, feature_sensitivity, format_summary, plot_sensitivity,
                               robust_accuracy_curve, summarize)
from timm_hpm.attacks import parse_eps
from timm_hpm.data import DATASETS, load_eval_tensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help="an HPM model: timm name with tag, 'local-dir:<folder>', 'hf-hub:<repo>'")
    p.add_argument('--dataset', required=True, choices=DATASETS)
    p.add_argument('--data-dir')
    p.add_argument('--norm', default='Linf', choices=['Linf', 'L2'])
    p.add_argument('--eps-max', required=True, help="largest eps of the curve, e.g. 0.2 or 16/255")
    p.add_argument('--eps-points', type=int, default=6, help='points of the curve from 0 to --eps-max')
    p.add_argument('--apgd-iters', type=int, default=50)
    p.add_argument('--n-examples', type=int, default=1000)
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', type=Path, default=Path('runs/sensitivity'))
    return p.parse_args(argv)


def display_name(model: str) -> str:
    """The model as a figure names it: a local-dir: folder relative to the working directory when it is under it,
    else by its last two path components (never a machine's absolute path)."""
    if not model.startswith('local-dir:'):
        return model
    path = Path(model[len('local-dir:'):]).resolve()
    try:
        return f'local-dir:{path.relative_to(Path.cwd())}'
    except ValueError:
        return f'local-dir:.../{Path(*path.parts[-2:])}'


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    eps_max = parse_eps(args.eps_max, args.norm)
    eps_values = [round(eps_max * i / (args.eps_points - 1), 6) for i in range(args.eps_points)]
    args.out.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(args.model, pretrained=True).eval()
    if not timm_hpm.is_hpm_model(model):
        raise SystemExit(f'{args.model} is not an HPM model: the analysis compares its FC and l2 heads. '
                         'Use an hpm_* model (or convert a fine-tuned one).')
    x, y = load_eval_tensors(args.dataset, args.n_examples, args.data_dir, model.pretrained_cfg,
                             num_classes=model.num_classes, image_size=model.pretrained_cfg['input_size'],
                             seed=args.seed)

    # The curve, one (head, eps) point at a time, kept in partial.json so a killed run resumes.
    partial_path = args.out / 'partial.json'
    settings = dict(model=args.model, n=len(y), eps=eps_values, iters=args.apgd_iters, norm=args.norm, seed=args.seed)
    partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    if partial.get('settings') != settings:
        partial = {'settings': settings, 'points': {}}
    for head in ANALYSIS_HEADS:
        for eps in eps_values:
            key = f'{head}@{eps}'
            if key in partial['points']:
                continue
            acc = robust_accuracy_curve(model, x, y, [eps], heads=(head,), norm=args.norm, n_iter=args.apgd_iters,
                                        batch_size=args.batch_size, seed=args.seed)[head][0]
            partial['points'][key] = acc
            partial_path.write_text(json.dumps(partial))
            print(f'{head} eps={eps:.4f}: accuracy {100 * acc:.1f}%', flush=True)
    curves = {h: [partial['points'][f'{h}@{e}'] for e in eps_values] for h in ANALYSIS_HEADS}

    per_sample = feature_sensitivity(model, x, y, batch_size=args.batch_size)
    result = {
        'model': args.model, 'dataset': args.dataset, 'n_examples': len(y),
        'command': shlex.join(['python', 'recipes/sensitivity.py', *(argv if argv is not None else sys.argv[1:])]),
        'timm_hpm_version': timm_hpm.__version__,
        'robust_accuracy': {'eps': eps_values, 'norm': args.norm, 'attack': f'APGD-CE then APGD-DLR, '
                            f'{args.apgd_iters} iterations each, on the samples still robust',
                            'accuracy': curves},
        'summary': summarize(per_sample),
        'per_sample': per_sample,
        'gamma': float(timm_hpm.get_hpm_head(model).gamma.detach()),
        'seconds': round(time.time() - start, 1),
    }
    (args.out / 'sensitivity.json').write_text(json.dumps(result, indent=1))
    plot_sensitivity(result, args.out / 'sensitivity.png',
                     title=f'{display_name(args.model)} on {args.dataset} ({len(y)} test images)')
    print(format_summary(result))
    print(f"wrote {args.out / 'sensitivity.json'} and {args.out / 'sensitivity.png'}")
    return result


if __name__ == '__main__':
    main()
