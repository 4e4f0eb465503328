"""What each ingredient of the batch-poisoning attack buys: victims flipped with and without it, on the same batches.

    python recipes/poison_ingredients.py --model hpm_small_cnn.fmnist_hpm --dataset fashion_mnist --n-examples 500 \
        --batch-size 250 --eps 0.1 --ks 1 25 --device cpu --out results/fashion_mnist/poison_ingredients_500

The attack of ``timm_hpm.eval.poison`` (``PoisonConfig``'s defaults: full strength) is run on the fixed batches of
``--batch-size`` of the first ``--n-examples`` test images, for each k of ``--ks`` (default: every k of the
protocol), within ``--eps`` and unbounded, once as it is and once with each ingredient removed (an ablation: the
gain is full - without) or added (the gain is with - full); ``v1`` is the project's first attack (the capped margin
sum through each gradient view, one random start, ``steps`` steps for both radii). The poisoned members and the
victims are the protocol's (same seeds), so every column counts flips of the same victims. Writes ``ingredients.json``
and ``ingredients.md`` into ``--out``, which it refuses to overwrite; each (variant, batch, k, radius) is kept under
``--out/cells/`` as it finishes, so a killed run resumes with the same settings.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

#: name -> (what it is, PoisonConfig changes from the defaults, 'ablation' or 'addition')
VARIANTS = {
    'full': ('the default attack at full strength', {}, None),
    'v1': ('the first attack: capped margin sum through each view, one random start, short schedule',
           dict(objectives=('margin_sum',), restarts=1, anneal=False, target_classes=0, unbounded_steps='steps'),
           None),
    'soft_count': ('the soft-count objective (without: the capped margin sum)', dict(objectives=('margin_sum',)),
                   'ablation'),
    'long_schedule': ('6 x steps per unbounded run (without: steps)', dict(unbounded_steps='steps'), 'ablation'),
    'anneal': ('the soft-to-hard annealed run', dict(anneal=False), 'ablation'),
    'class_runs': ('the class-directed runs (3 classes)', dict(target_classes=0), 'ablation'),
    'soft_view': ('the runs through the soft head (without: the dynamic head only)', dict(views=('dynamic',)),
                  'ablation'),
    'top_m': ('the top-m objective (m = 5) beside soft_count', dict(objectives=('soft_count', 'top_m')), 'addition'),
    'margin_sum': ('the capped margin sum beside soft_count', dict(objectives=('soft_count', 'margin_sum')),
                   'addition'),
    'restarts': ('a second restart (clean start) of each objective and view', dict(restarts=2), 'addition'),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='hpm_small_cnn.fmnist_hpm')
    p.add_argument('--dataset', default='fashion_mnist')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--n-examples', type=int, default=500)
    p.add_argument('--batch-size', type=int, default=250)
    p.add_argument('--eps', type=float, default=0.1)
    p.add_argument('--norm', default='Linf')
    p.add_argument('--steps', type=int, default=100, help='PoisonConfig.steps (steps per run within eps)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--ks', type=int, nargs='+', default=None, help='the k to measure (default: the protocol\'s)')
    p.add_argument('--radii', nargs='+', choices=('eps', 'unbounded'), default=['eps', 'unbounded'])
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import timm
    import torch

    import timm_hpm  # noqa: F401  (registers the models)
    from timm_hpm.data import load_eval_tensors
    from timm_hpm.eval import ModelView
    from timm_hpm.eval.poison import PoisonConfig, _unbounded_eps, poison_batch, poison_counts
    from timm_hpm.report import markdown_table
    from timm_hpm.runfiles import write_text_atomic

    if (args.out / 'ingredients.json').exists():
        raise SystemExit(f'{args.out} holds finished results (ingredients.json); use another --out.')
    if 'full' not in args.variants:
        raise SystemExit('--variants must include full (every gain is measured against it)')
    PoisonConfig(eps=args.eps, norm=args.norm, steps=args.steps, seed=args.seed)
    model = timm.create_model(args.model, pretrained=True).eval().to(args.device)
    x, y = load_eval_tensors(args.dataset, args.n_examples, args.data_dir, model.pretrained_cfg,
                             num_classes=model.num_classes, image_size=model.pretrained_cfg['input_size'],
                             seed=args.seed)
    x, y = x.to(args.device), y.to(args.device)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings['command'] = shlex.join(['python', 'recipes/poison_ingredients.py'] + (argv or sys.argv[1:]))
    cells = args.out / 'cells'
    cells.mkdir(parents=True, exist_ok=True)
    stored = args.out / 'settings.json'
    compare = {k: v for k, v in settings.items() if k not in ('command', 'variants', 'out')}
    if stored.exists() and {k: v for k, v in json.loads(stored.read_text()).items()
                            if k not in ('command', 'variants', 'out')} != compare:
        raise SystemExit(f'{args.out} holds a run with other settings; use another --out.')
    write_text_atomic(stored, json.dumps(settings, indent=2))
    target = ModelView(model, 'dynamic')
    all_views = {'dynamic': target, 'soft': ModelView(model, 'soft')}
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size)))
    radii = [r for r in (('eps', args.eps), ('unbounded', _unbounded_eps(x, args.norm))) if r[0] in args.radii]
    results = {}
    for variant in args.variants:
        _, change, _ = VARIANTS[variant]
        change = dict(change)
        views = {v: all_views[v] for v in change.pop('views', tuple(all_views))}
        if change.get('unbounded_steps') == 'steps':
            change['unbounded_steps'] = args.steps
        for index, (xb, yb) in enumerate(batches):
            ks = args.ks or poison_counts(xb.shape[0])
            for k in ks:
                for radius_name, radius in radii:
                    path = cells / f'{variant}_b{index}_k{k}_{radius_name}.json'
                    if path.exists():
                        cell = json.loads(path.read_text())
                    else:
                        start = time.time()
                        record = poison_batch(target, views, xb, yb, k, radius, args.norm, args.steps,
                                              seed=args.seed * 1_000_003 + index * 101 + k, **change)
                        cell = dict(record, seconds=round(time.time() - start, 1))
                        write_text_atomic(path, json.dumps(cell))
                        print(variant, index, k, radius_name, cell['flipped'], '/', cell['victims'],
                              f"{cell['seconds']}s", flush=True)
                    key = (variant, k, radius_name)
                    t = results.setdefault(key, {'flipped': 0, 'victims': 0, 'seconds': 0.0, 'bound': 0})
                    t['flipped'] += cell['flipped']
                    t['victims'] += cell['victims']
                    t['seconds'] += cell['seconds']
                    t['bound'] += cell.get('feature_bound', 0)
    rows, records = [], []
    settings_ks = sorted({k for (_, k, _) in results})
    for variant in args.variants:
        what, _, kind = VARIANTS[variant]
        for radius_name, _ in radii:
            for k in settings_ks:
                r, full = results[(variant, k, radius_name)], results[('full', k, radius_name)]
                gain = None if kind is None else (full['flipped'] - r['flipped'] if kind == 'ablation'
                                                  else r['flipped'] - full['flipped'])
                records.append({'variant': variant, 'what': what, 'kind': kind, 'k': k, 'radius': radius_name,
                                'flipped': r['flipped'], 'victims': r['victims'], 'gain': gain,
                                'seconds': round(r['seconds'], 1),
                                **({'feature_bound': r['bound']} if variant == 'full' else {})})
                rows.append([variant, kind or '-', f'{k} of {args.batch_size}',
                             f'{args.eps:g}' if radius_name == 'eps' else 'unbounded',
                             f"{r['flipped']} / {r['victims']}", '-' if gain is None else f'{gain:+d}',
                             f"{r['seconds']:.0f}", what])
    table = markdown_table(['variant', 'kind', 'k', f'{args.norm} eps', 'flipped / victims',
                            'gain of the ingredient', 'CPU s', 'what'], rows)
    bound = [f"k = {rec['k']} ({rec['radius']}): {rec['feature_bound']}" for rec in records
             if rec['variant'] == 'full']
    text = (f"Poisoning ingredients: {args.model}, first {args.n_examples} {args.dataset} test images, fixed batches "
            f"of {args.batch_size}, the protocol's poisoned members and victims. Gain: full - without (ablation), "
            f"with - full (addition).\n\n{table}\n\nFeature-space bound of the full attack (k free feature vectors "
            f"with no image behind them, summed over the batches): {'; '.join(bound)}.\n\n"
            f"Command: `{settings['command']}`\n")
    write_text_atomic(args.out / 'ingredients.md', text)
    write_text_atomic(args.out / 'ingredients.json', json.dumps({'settings': settings, 'results': records},
                                                                indent=2))
    print(text)


if __name__ == '__main__':
    main()
