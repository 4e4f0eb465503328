"""The README's main job, offline on Fashion-MNIST: shipped base -> HPM fine-tune -> AutoAttack vs MSA -> figure.

    python recipes/quickstart.py --out runs/quickstart            # (recipes/quickstart.sh also sets up .venv)

Steps, each a recipe run in its own process with its own progress bar, each resumable (run the command again
after an interruption and finished steps are skipped):

1. ``recipes/finetune.py``: HPM fine-tuning of the shipped PGD-AT base ``small_cnn.fmnist_pgdat`` with
   ``recipes/configs/fashion_mnist_hpm.yaml`` for ``--steps`` optimizer steps;
2. ``recipes/evaluate.py --protocol autoattack``: the base (FC head) under standard AutoAttack;
3. ``recipes/evaluate.py --protocol msa``: the fine-tuned HPM model (dynamic head) under the Mixed Surrogate
   Attack, on the same images, in fixed batches of ``--batch-size``;
4. ``recipes/sensitivity.py``: FC head vs l2 head of the fine-tuned model (figure).

Everything is evaluated on the first ``--n-test`` test images, Linf eps 0.1, with attack budgets reduced so the
job takes about 16 minutes on 2 CPU cores (the printed table states them; pass ``--autoattack-iters 100
--square-queries 5000 --apgd-iters 100`` for full strength). Writes ``quickstart.json`` and ``quickstart.md``
(the table) in ``--out`` and prints the table.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from timm_hpm.analysis import format_summary
from timm_hpm.eval import stage_label, stage_order
from timm_hpm.report import markdown_table

REPO = Path(__file__).resolve().parent.parent
BASE = 'small_cnn.fmnist_pgdat'
CONFIG = REPO / 'recipes' / 'configs' / 'fashion_mnist_hpm.yaml'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', type=Path, default=Path('runs/quickstart'))
    p.add_argument('--steps', type=int, default=150, help='HPM fine-tuning steps (batch 128)')
    p.add_argument('--train-examples', type=int, default=None, help='a prefix of the training split (default: all)')
    p.add_argument('--n-test', type=int, default=1000, help='test images evaluated (the first n)')
    p.add_argument('--batch-size', type=int, default=250, help='the fixed evaluation batch size B_eval')
    p.add_argument('--eps', default='0.1')
    # Attack budgets: reduced so the whole job takes about 16 minutes on 2 CPU cores (971 s measured); the README's
    # study table runs AutoAttack and MSA at full strength (100 iterations, 5000 Square queries).
    p.add_argument('--apgd-iters', type=int, default=20, help="MSA's surrogate APGD iterations (full: 100)")
    p.add_argument('--autoattack-iters', type=int, default=20, help="AutoAttack's APGD/FAB iterations (full: 100)")
    p.add_argument('--square-queries', type=int, default=300, help="AutoAttack's Square queries (full: 5000)")
    p.add_argument('--sensitivity-iters', type=int, default=20, help='APGD iterations per point of the curve')
    p.add_argument('--sensitivity-examples', type=int, default=500, help='test images of the sensitivity curves')
    p.add_argument('--readme', type=Path, help="also write the table into this file's quickstart-run section")
    return p.parse_args(argv)


def run(step: str, args: list) -> None:
    print(f'\n=== {step} ===\n$ {shlex.join(["python", *map(str, args)])}', flush=True)
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=REPO)


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # a step that is already done is not timed again: it keeps the time a previous run measured for it
    previous = out / 'quickstart.json'
    timings = json.loads(previous.read_text()).get('timings_s', {}) if previous.is_file() else {}

    ft = out / 'finetune'
    tic = time.time()
    sets = ['train.eval_pgd_steps=0', 'train.log_every=10']
    if args.train_examples:
        sets.append(f'data.train_examples={args.train_examples}')
    # a fine-tune already there (finished, or to resume) is reused only with the configuration asked for
    from timm_hpm.study import check_run
    from timm_hpm.train import RunFolderError
    overrides = dict(s.split('=', 1) for s in sets)
    overrides['train.max_steps'] = args.steps
    try:
        check_run(CONFIG, ft, {k: yaml.safe_load(str(v)) for k, v in overrides.items()}, 'the quick start')
    except RunFolderError as error:
        raise SystemExit(f'{error} (or pass another --out)') from None
    if not (ft / 'final' / 'model.safetensors').exists():
        resume = ['--resume', ft] if (ft / 'config.yaml').exists() else ['--config', CONFIG, '--output-dir', ft]
        run('1/4 HPM fine-tuning of the shipped base', ['recipes/finetune.py', *resume, '--max-steps', args.steps,
                                                      '--device', 'cpu', '--set', *sets])
        timings['finetune'] = round(time.time() - tic, 1)
    hpm_model = f'local-dir:{ft / "final"}'

    common = ['--dataset', 'fashion_mnist', '--eps', args.eps, '--n-examples', args.n_test,
              '--batch-size', args.batch_size, '--device', 'cpu', '--autoattack-iters', args.autoattack_iters,
              '--square-queries', args.square_queries]
    results = {}
    for key, step, model, protocol, extra in (
            ('base', '2/4 base (FC head) under AutoAttack', BASE, 'autoattack', []),
            ('hpm', '3/4 HPM (dynamic head) under MSA', hpm_model, 'msa',
             # the MSA it was measured with (README): 3 APGD-T targets through every view, no combination round,
             # no iterate scored (MSA v2; rerun the quick start to measure it with v3 and drop these pins)
             ['--batchings', 'default', '--apgd-iters', args.apgd_iters, '--target-n-target-classes', 3,
              '--combine-rounds', 0, '--no-score-iterates'])):
        tic = time.time()
        folder = out / f'eval_{key}'
        if not (folder / 'eval.json').exists():
            run(step, ['recipes/evaluate.py', '--model', model, '--protocol', protocol, *common, *extra,
                       '--out', folder])
            timings[f'eval_{key}'] = round(time.time() - tic, 1)
        results[key] = json.loads((folder / 'eval.json').read_text())

    tic = time.time()
    sens = out / 'sensitivity'
    if not (sens / 'sensitivity.json').exists():
        run('4/4 sensitivity: FC head vs l2 head', [
            'recipes/sensitivity.py', '--model', hpm_model, '--dataset', 'fashion_mnist', '--eps-max', '0.2',
            '--n-examples', min(args.sensitivity_examples, args.n_test), '--apgd-iters', args.sensitivity_iters,
            '--out', sens])
        timings['sensitivity'] = round(time.time() - tic, 1)
    sensitivity = json.loads((sens / 'sensitivity.json').read_text())

    rows = summary_rows(results, args)
    table = format_table(rows, args) + '\n\nSensitivity of the fine-tuned model (FC head vs static l2 head; ' \
        f"{sensitivity['n_examples']} test images):\n\n" + format_summary(sensitivity)
    record = dict(command=shlex.join(['python', 'recipes/quickstart.py',  # shell-quoted: shlex.split gives it back
                                      *map(str, argv if argv is not None else sys.argv[1:])]),
                  base=BASE, config=str(CONFIG.relative_to(REPO)), steps=args.steps, n_test=args.n_test,
                  eps=results['base']['eps'], rows=rows, timings_s=timings, seconds=round(sum(timings.values()), 1),
                  this_run_seconds=round(time.time() - start, 1),
                  figure=str(sens / 'sensitivity.png'))
    (out / 'quickstart.json').write_text(json.dumps(record, indent=2))
    (out / 'quickstart.md').write_text(table + '\n')
    print('\n' + table)
    if args.readme:
        import torch

        from timm_hpm.report import update_section
        update_section(args.readme, 'quickstart-run', f"Measured here with `{record['command']}` "
                       f"({torch.get_num_threads()} threads): {record['seconds']:.0f} s in all "
                       f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n\n{table}")
    print(f"\nwrote {out / 'quickstart.json'}, {out / 'quickstart.md'} and {sens / 'sensitivity.png'} "
          f"in {record['seconds']:.0f} s")
    return record


def summary_rows(results: dict, args) -> list:
    base = results['base']['batchings']['default']
    hpm = results['hpm']['batchings']['default']
    rows = [dict(model=f'base `{BASE}`', head='fc', attack='AutoAttack (standard cascade)',
                 clean=base['clean_acc'], robust=base['realised_acc'])]
    for name in stage_order(results['hpm']['settings'], hpm['per_surrogate_acc']):  # the cascade's order
        rows.append(dict(model='HPM (fine-tuned)', head='dynamic',
                         attack=f"MSA stage: {stage_label(name, 'APGD-CE/T through')}",
                         clean=hpm['clean_acc'], robust=hpm['per_surrogate_acc'][name]))
    rows.append(dict(model='HPM (fine-tuned)', head='dynamic', attack='**MSA (worst case, realised batches)**',
                     clean=hpm['clean_acc'], robust=hpm['realised_acc']))
    return rows


def format_table(rows: list, args) -> str:
    lines = [f'Fashion-MNIST, first {args.n_test} test images, Linf eps {args.eps}, fixed batches of {args.batch_size}. '
             f'Attack budget: AutoAttack {args.autoattack_iters} APGD/FAB iterations and {args.square_queries} Square '
             f'queries, MSA surrogates {args.apgd_iters} APGD iterations'
             + (' (reduced for the quick start: the README study table uses 100 and 5000).'
                if (args.autoattack_iters, args.square_queries, args.apgd_iters) != (100, 5000, 100) else '.')
             + ' An MSA stage row is the best candidate batch of that stage; the worst case is the realised batch.',
             '', markdown_table(['model', 'head', 'attack', 'clean', 'robust'],
                                [[r['model'], r['head'], r['attack'], f"{100 * r['clean']:.1f}%",
                                  f"{100 * r['robust']:.1f}%"] for r in rows], 'lllrr')]
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
