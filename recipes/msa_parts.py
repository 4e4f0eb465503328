"""What each part of MSA buys and costs, from finished evaluation runs (their unit files), on the same images.

    python recipes/msa_parts.py --runs results/fashion_mnist/eval_hpm_1000 results/fashion_mnist/eval_hpm_msa2_500 \
        --n 500 --autoattack results/fashion_mnist/eval_base_1000

Per run: clean, realised and union counts on the first ``--n`` examples (the units that cover them), each stage's
gain (how much its candidates that the realised batch took lowered the correct count; the cascade credits a stage
only with what the stages before it left standing), the images only this run's realised batches break compared
with the first run, and the cost (backward images and attack seconds, in all and by stage for runs that recorded
it) against ``--autoattack`` (a standard AutoAttack run on the same images) when given.
"""
import argparse
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--runs', type=Path, nargs='+', required=True, help='evaluate.py --out folders (MSA runs)')
    p.add_argument('--n', type=int, default=None, help='the first N examples (whole units); default: all finished')
    p.add_argument('--autoattack', type=Path, help='a standard AutoAttack run on the same images (the cost baseline)')
    p.add_argument('--batching', default='default')
    return p.parse_args(argv)


def parts_table(runs, n=None, autoattack=None, batching='default') -> str:
    from timm_hpm.eval.results import stage_breaks
    from timm_hpm.report import markdown_table
    parts = [stage_breaks(r / 'attack', batching, n) for r in runs]
    ref = stage_breaks(autoattack / 'attack', 'default', n) if autoattack else None
    first = parts[0]['robust']
    stages = list(dict.fromkeys(s for p in parts for s in p['gain']))
    rows = []
    for run, p in zip(runs, parts):
        common = sorted(set(first) & set(p['robust']))
        only_this = sum(1 for i in common if first[i] and not p['robust'][i])
        only_first = sum(1 for i in common if p['robust'][i] and not first[i])
        cost = (f"x{p['backward_images'] / ref['backward_images']:.2f} / x{p['seconds'] / ref['seconds']:.2f}"
                if ref and ref['n'] == p['n'] else 'unknown')
        by_stage = p['stage_backward_images']
        if by_stage is None:
            by_stage = 'not recorded'
        elif ref and ref['n'] == p['n']:
            by_stage = ', '.join(f"{s} x{b / ref['backward_images']:.2f}" for s, b in by_stage.items())
        else:
            by_stage = ', '.join(f'{s} {b}' for s, b in by_stage.items())
        rows.append([f'`{run}`', p['n'], p['clean'], p['realised'], p['union'],
                     *(p['gain'].get(s, '') for s in stages), f'{only_this} / {only_first}', p['backward_images'],
                     f"{p['seconds']:.0f}", cost, by_stage])
    return markdown_table(['run', 'images', 'clean', 'realised', 'union', *(f'gain: {s}' for s in stages),
                           'broken only here / only in the first run', 'backward images', 'attack s',
                           'cost vs AutoAttack (backward images / s)', 'backward images by stage'],
                          rows, 'lrrrr' + 'r' * len(stages) + 'rrrrl')


def main(argv=None):
    args = parse_args(argv)
    print(parts_table(args.runs, args.n, args.autoattack, args.batching))


if __name__ == '__main__':
    main()
