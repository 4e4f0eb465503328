"""The table of finished benchmarks (``recipes/benchmark.py --out`` folders), from their benchmark.json files alone
(``python -m timm_hpm.cli.benchmark_table``; a checkout's ``recipes/benchmark_table.py`` runs it).

    python recipes/benchmark_table.py results/fashion_mnist/benchmark_tbn_full_250 \
        results/fashion_mnist/benchmark_tbn_running_250

One row per benchmark: the batch-dependence verdict (and its largest logit change), the protocol that ran, clean
accuracy, AutoAttack's own printout, AutoAttack re-scored on the fixed batches, MSA's realised worst case and
per-sample union on the fixed batches (batches of B in the dataset's order), the worst natural batch order (MSA's
realised figure on one image at a time, a shuffled and a class-sorted order), bounded poisoning (the accuracy of the
untouched members at the worst k, and the largest flipped fraction), the robust accuracy (the worst case measured),
and the attack budget. ``--update FILE`` rewrites the table between ``<!-- benchmark-table:start/end -->`` in FILE.
"""
import argparse
import json
from pathlib import Path

from timm_hpm.report import markdown_table, print_or_update


def pct(v) -> str:
    return '-' if v is None else f'{100 * v:.1f}%'


def row(report: dict) -> list:
    d = report['batch_dependence']
    change = max((t['max_logit_change'] for k, t in d['tests'].items() if k != 'repeat'), default=0.0)
    dependent = report['protocol'] != 'autoattack'
    result = report['evaluation']
    default = result['batchings']['default']
    natural = report.get('worst_natural_order')
    poison = report.get('poisoning') or {}
    poisoned = (f"{pct(poison['worst_untouched_acc'])} ({pct(poison['max_flipped_fraction'])} flipped)"
                if poison.get('ran') and poison.get('worst_untouched_acc') is not None else '-')
    return [f"`{report['model']}`", f"{d['verdict']} ({change:.2g})",
            'MSA + natural orders + poisoning' if dependent else 'AutoAttack (standard)',
            pct(report['clean_acc']), pct(default.get('autoattack_own_acc')), pct(default.get('autoattack_acc')),
            pct(default['realised_acc']) if dependent else '-', pct(default['union_acc']) if dependent else '-',
            f"{pct(natural['acc'])} ({natural['batching']})" if natural else '-', poisoned,
            f"**{pct(report['robust_acc'])}**", 'reduced' if report.get('reduced_budget') else 'full']


def table(folders) -> str:
    reports = [json.loads((Path(f) / 'benchmark.json').read_text()) for f in folders]
    first = reports[0]
    setting = ('dataset', 'n_examples', 'threat_model', 'eps', 'batch_size')
    differ = [k for k in setting if any(r[k] != first[k] for r in reports)]
    if differ:
        raise SystemExit(f'these benchmarks differ in {differ}: a table compares runs on the same images and threat '
                         'model; make one table per setting.')
    header = ['model', 'batch dependence (max logit change)', 'protocol', 'clean', "AutoAttack's own printout",
              'AutoAttack, fixed batches', 'MSA realised, fixed batches', 'MSA per-sample union, fixed batches',
              'worst natural order (MSA realised)',
              'poisoning: untouched accuracy (flipped)', 'robust (worst case)', 'budget']
    lines = [markdown_table(header, [row(r) for r in reports], 'lllrrrrrrrrl'), '']
    lines.append(f"{first['dataset']}, first {first['n_examples']} test images, {first['threat_model']} eps "
                 f"{first['eps']:.4g}, fixed batches of {first['batch_size']}; each row: `{first.get('command', '')}`"
                 if len(reports) == 1 else
                 f"{first['dataset']}, first {first['n_examples']} test images, {first['threat_model']} eps "
                 f"{first['eps']:.4g}, fixed batches of {first['batch_size']}. Each row is one "
                 '`python recipes/benchmark.py` run (its command is in its benchmark.json).')
    for r in reports:
        if r.get('reduced_budget'):
            lines.append(f"`{r['model']}`: reduced budget: {', '.join(r['reduced_budget'])}.")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('folders', nargs='+', type=Path, help='finished recipes/benchmark.py --out folders')
    p.add_argument('--update', type=Path, help='rewrite the table between the benchmark-table markers in this file')
    args = p.parse_args(argv)
    print_or_update(table(args.folders), args.update, 'benchmark-table')


if __name__ == '__main__':
    main()
