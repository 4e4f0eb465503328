"""The README's main job, offline on Fashion-MNIST: shipped base -> HPM fine-tune -> AutoAttack vs MSA -> figure.

    python recipes/quickstart.py --out runs/quickstart            # (recipes/quickstart.sh also sets up .venv)

Steps, each a recipe run in its own process, each resumable (run the command again after an interruption and
finished steps are skipped):

1. ``recipes/finetune.py``: HPM fine-tuning of the shipped PGD-AT base ``small_cnn.fmnist_pgdat`` with
   ``recipes/configs/fashion_mnist_hpm.yaml`` for ``--steps`` optimizer steps;
2. ``recipes/evaluate.py --protocol autoattack``: the base (FC head) under standard AutoAttack;
3. ``recipes/sensitivity.py``: FC head vs l2 head of the fine-tuned model (figure);
4. ``recipes/evaluate.py --protocol msa``: the fine-tuned HPM model (dynamic head) under the Mixed Surrogate
   Attack with its default stages, on the same images, in fixed batches of ``--batch-size``.

The steps share the cores (``--jobs``, default: the cores this process may use): the fine-tune and the
sensitivity curve on one, AutoAttack on the base beside them, then MSA's batches over every core (``accelerate
launch``, one process per core; the batches are independent). Each step's output goes to ``<out>/logs/<step>.log``
and the progress line below shows every running step's latest progress. These models are small: torch gains
little from a second thread on them, so two one-thread processes do about twice the work of one two-thread one.

Everything is evaluated on the first ``--n-test`` test images, Linf eps 0.1, with attack iterations reduced so the
job takes about 15 minutes on 2 CPU cores, set-up included (the printed table states them; pass
``--autoattack-iters 100 --square-queries 5000 --apgd-iters 100`` for full strength). Writes ``quickstart.json``
and ``quickstart.md`` (the table) in ``--out`` and prints the table.
"""
import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from tqdm import tqdm

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
    # 500: two batches of 250, one per core under MSA; the README's tables use the first 1,000
    p.add_argument('--n-test', type=int, default=500, help='test images evaluated (the first n)')
    p.add_argument('--batch-size', type=int, default=250, help='the fixed evaluation batch size B_eval')
    p.add_argument('--eps', default='0.1')
    # Attack iterations: reduced so the whole job takes about 15 minutes on 2 CPU cores; the README's study table
    # runs AutoAttack and MSA at full strength (100 iterations, 5000 Square queries).
    p.add_argument('--apgd-iters', type=int, default=20, help="MSA's surrogate APGD iterations (full: 100)")
    p.add_argument('--autoattack-iters', type=int, default=20, help="AutoAttack's APGD/FAB iterations (full: 100)")
    p.add_argument('--square-queries', type=int, default=300, help="AutoAttack's Square queries (full: 5000)")
    p.add_argument('--sensitivity-iters', type=int, default=20, help='APGD iterations per point of the curve')
    p.add_argument('--sensitivity-examples', type=int, default=500, help='test images of the sensitivity curves')
    p.add_argument('--jobs', type=int, default=None,
                   help='cores the steps share (default: the cores this process may use; 1: one step at a time)')
    p.add_argument('--readme', type=Path, help="also write the table into this file's quickstart-run section")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error(f'--jobs must be >= 1, got {args.jobs}')
    return args


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container or ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Step:
    """One recipe run: its name, heading, arguments (after the interpreter), the file it writes last (there: the
    step is done) and the cores it uses (``launch``: that many accelerate processes, one thread each)."""
    name: str
    heading: str
    args: List[str]
    done_file: Path
    cores: int = 1
    launch: int = 1
    log: Optional[Path] = None
    started: Optional[float] = None
    process: Optional[subprocess.Popen] = field(default=None, repr=False)

    def done(self) -> bool:
        return self.done_file.exists()

    def command(self) -> List[str]:
        if self.launch == 1:
            return [sys.executable, *self.args]
        return [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(self.launch),
                '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                '--main_process_port', str(_free_port()), *self.args]

    def start(self, threads: int) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        print(f'\n=== {self.heading} (log: {self.log})\n$ {shlex.join(["python", *map(str, self.args)])}', flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(self.log, 'w') as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.started = time.time()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def latest_progress(log: Path, width: int = 60) -> str:
    """The last progress line a step wrote (tqdm redraws with carriage returns), shortened to ``width``."""
    try:
        with open(log, 'rb') as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    lines = [line.strip() for line in re.split(r'[\r\n]', tail) if line.strip()]
    return lines[-1][-width:] if lines else ''


def run_steps(steps: List[Step], after: Dict[str, str], cores: int) -> Dict[str, float]:
    """Runs the steps not yet done, each once the step it comes ``after`` is done and enough cores are free, in
    the order given; shows every running step's progress; a failed step stops the others and exits with its log's
    end. Returns the seconds each step took."""
    todo = [s for s in steps if not s.done()]
    running: List[Step] = []
    timings: Dict[str, float] = {}
    with tqdm(total=len(todo), desc='quick start steps', unit='step', dynamic_ncols=True) as bar:
        while todo or running:
            for step in list(todo):
                ready = after.get(step.name) is None or next(s for s in steps if s.name == after[step.name]).done()
                free = cores - sum(s.cores for s in running)
                if ready and (step.cores <= free or not running):
                    step.start(max(1, step.cores // step.launch))
                    todo.remove(step)
                    running.append(step)
            time.sleep(1)
            for step in list(running):
                code = step.process.poll()
                if code is None:
                    continue
                running.remove(step)
                if code != 0:
                    for other in running:
                        other.process.terminate()
                    sys.stderr.write(latest_lines(step.log))
                    raise SystemExit(f'{step.heading} failed (exit {code}); its output: {step.log}. '
                                     'Run the command again to resume.')
                timings[step.name] = round(time.time() - step.started, 1)
                bar.write(f'=== {step.heading}: done in {timings[step.name]:.0f} s')
                bar.update()
            bar.set_postfix_str(' | '.join(f'{s.name}: {latest_progress(s.log)}' for s in running), refresh=True)
    return timings


def latest_lines(log: Path, n: int = 30) -> str:
    lines = log.read_text(errors='replace').replace('\r', '\n').splitlines()
    return '\n'.join(lines[-n:]) + '\n'


def check_finetune(out: Path, args) -> List[str]:
    """The fine-tune's ``--set`` options, after checking that a fine-tune already in ``out`` (finished, or to
    resume) has the configuration asked for."""
    from timm_hpm.study import check_run
    from timm_hpm.train import RunFolderError
    sets = ['train.eval_pgd_steps=0', 'train.log_every=10']
    if args.train_examples:
        sets.append(f'data.train_examples={args.train_examples}')
    overrides = {k: yaml.safe_load(v) for k, v in (s.split('=', 1) for s in sets)}
    overrides['train.max_steps'] = args.steps
    try:
        check_run(CONFIG, out / 'finetune', overrides, 'the quick start')
    except RunFolderError as error:
        raise SystemExit(f'{error} (or pass another --out)') from None
    return sets


def plan(out: Path, args, cores: int) -> List[Step]:
    """The four steps, in the order they start."""
    ft = out / 'finetune'
    resume = ['--resume', ft] if (ft / 'config.yaml').exists() else ['--config', CONFIG, '--output-dir', ft]
    hpm_model = f'local-dir:{ft / "final"}'
    common = ['--dataset', 'fashion_mnist', '--eps', args.eps, '--n-examples', args.n_test,
              '--batch-size', args.batch_size, '--device', 'cpu', '--autoattack-iters', args.autoattack_iters,
              '--square-queries', args.square_queries]
    msa_processes = max(1, min(cores, -(-args.n_test // args.batch_size)))  # one process per core, per batch at most
    steps = [
        Step('finetune', '1/4 HPM fine-tuning of the shipped base',
             ['recipes/finetune.py', *resume, '--max-steps', args.steps, '--device', 'cpu',
              '--set', *check_finetune(out, args)], ft / 'final' / 'model.safetensors'),
        Step('eval_base', '2/4 base (FC head) under AutoAttack',
             ['recipes/evaluate.py', '--model', BASE, '--protocol', 'autoattack', *common,
              '--out', out / 'eval_base'], out / 'eval_base' / 'eval.json'),
        Step('sensitivity', '3/4 sensitivity: FC head vs l2 head',
             ['recipes/sensitivity.py', '--model', hpm_model, '--dataset', 'fashion_mnist', '--eps-max', '0.2',
              '--n-examples', min(args.sensitivity_examples, args.n_test), '--apgd-iters', args.sensitivity_iters,
              '--out', out / 'sensitivity'], out / 'sensitivity' / 'sensitivity.json'),
        # MSA with its default stages; --batchings default: the batching the table reports (MSA's default also
        # scores the images one by one and shuffled, the figures of the evaluation section)
        Step('eval_hpm', '4/4 HPM (dynamic head) under MSA',
             ['recipes/evaluate.py', '--model', hpm_model, '--protocol', 'msa', *common, '--batchings', 'default',
              '--apgd-iters', args.apgd_iters, '--out', out / 'eval_hpm'], out / 'eval_hpm' / 'eval.json',
             cores=msa_processes, launch=msa_processes),
    ]
    for step in steps:
        step.args = [str(a) for a in step.args]
        step.log = out / 'logs' / f'{step.name}.log'
    return steps


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # a step that is already done is not timed again: it keeps the time a previous run measured for it
    previous = out / 'quickstart.json'
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    cores = args.jobs or available_cores()
    steps = plan(out, args, cores)
    timings = dict(earlier.get('timings_s', {}))
    ran = run_steps(steps, {'sensitivity': 'finetune', 'eval_hpm': 'finetune'}, cores)
    timings.update(ran)
    results = {key: json.loads((out / f'eval_{key}' / 'eval.json').read_text()) for key in ('base', 'hpm')}
    sensitivity = json.loads((out / 'sensitivity' / 'sensitivity.json').read_text())

    rows = summary_rows(results, args)
    table = format_table(rows, args) + '\n\nSensitivity of the fine-tuned model (FC head vs static l2 head; ' \
        f"{sensitivity['n_examples']} test images):\n\n" + format_summary(sensitivity)
    # seconds: the wall time of the runs that computed the steps (steps run side by side: less than their sum)
    this_run = round(time.time() - start, 1)
    record = dict(command=shlex.join(['python', 'recipes/quickstart.py',  # shell-quoted: shlex.split gives it back
                                      *map(str, argv if argv is not None else sys.argv[1:])]),
                  base=BASE, config=str(CONFIG.relative_to(REPO)), steps=args.steps, n_test=args.n_test,
                  eps=results['base']['eps'], rows=rows, timings_s=timings, cores=cores,
                  seconds=round(earlier.get('seconds', 0.0) + (this_run if ran else 0.0), 1),
                  this_run_seconds=this_run, figure=str(out / 'sensitivity' / 'sensitivity.png'))
    (out / 'quickstart.json').write_text(json.dumps(record, indent=2))
    (out / 'quickstart.md').write_text(table + '\n')
    print('\n' + table)
    if args.readme:
        from timm_hpm.report import update_section
        update_section(args.readme, 'quickstart-run', f"Measured here with `{record['command']}` ({cores} cores): "
                       f"{record['seconds']:.0f} s in all, steps side by side "
                       f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n\n{table}")
    print(f"\nwrote {out / 'quickstart.json'}, {out / 'quickstart.md'} and {record['figure']} "
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
