"""Build one model-zoo entry (timm_hpm/zoo/zoo.yaml) end to end, and publish it (a dry run unless --push).

    timm-hpm-zoo hpm_small_cnn.fmnist_hpm --device cpu                     # CPU entry, dry-run publish
    timm-hpm-zoo hpm_wrn28_10.rb_wang2023better_cifar10 --launcher accelerate
    timm-hpm-zoo hpm_wrn28_10.rb_wang2023better_cifar10 --launcher accelerate --push
    timm-hpm-zoo <tag> --status                                            # which steps are done
    timm-hpm-zoo <tag> --until finetune                                    # stop after a step
    timm-hpm-zoo --table                                                   # the README's zoo table
    timm-hpm-zoo --list

(``python -m timm_hpm.cli.build_zoo``; in a checkout, ``python recipes/build_zoo.py`` runs this module.)

Steps, in ``--out`` (default runs/zoo/<tag>): ``base/`` (a RobustBench base: its checkpoint from --model-dir in
RobustBench's layout, downloaded when missing, exported as a local-dir folder), ``finetune/`` (timm_hpm.cli.finetune
with the entry's config), ``eval_base/`` (timm_hpm.cli.evaluate, the base under standard AutoAttack), ``eval_hpm/``
(timm_hpm.cli.evaluate, the HPM model under MSA, the base as a transfer surrogate), ``hub/`` and ``cards/``
(timm_hpm.cli.push_to_hub; --dry-run unless --push). The card goes to ``<out>/cards`` unless ``--cards-dir`` names
another folder (``--cards-dir hub_cards`` updates the repository's card); a different card already there is replaced
only with ``--overwrite-card``, so a rehearsal never replaces a card silently. A step whose output exists is skipped;
a step that was interrupted resumes (finetune.py --resume, evaluate.py's finished batches). ``--launcher accelerate``
runs fine-tuning and evaluation under ``accelerate launch`` (``--launch-args`` passes its options), sharded over its
processes. ``<out>/build.json`` records the entry and the overrides; a folder holding another build is refused.

Rehearsal overrides (tiny budgets: recipes/benchmarks/rehearse_zoo.py): ``--max-steps``, ``--set KEY=VALUE`` (the
fine-tuning config), ``--eval-set KEY=VALUE`` (the entry's evaluation settings: n_examples, batch_size,
apgd_iters, autoattack_iters, square_queries, ...).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    from timm_hpm.zoo import DEFAULT_MANIFEST
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('tag', nargs='?', help='a manifest entry (see --list)')
    p.add_argument('--manifest', type=Path, default=DEFAULT_MANIFEST,
                   help='the zoo manifest (default: the one shipped with timm-hpm, timm_hpm/zoo/zoo.yaml)')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--status', action='store_true', help="print the entry's steps and which are done")
    what.add_argument('--table', action='store_true', help='print the zoo table (Markdown) and exit')
    what.add_argument('--list', action='store_true', help='print the tags of the manifest and exit')
    p.add_argument('--here', action='store_true', help='with --table: status as found on this machine')
    p.add_argument('--out', type=Path, help='build folder (default runs/zoo/<tag>)')
    p.add_argument('--data-dir', help='dataset folder (CIFAR: torchvision or binary layout; ImageNet: ImageFolder root)')
    p.add_argument('--model-dir', default='./models', help="RobustBench's layout <dir>/<dataset>/<threat>/<Name>.pt")
    p.add_argument('--device', choices=['cpu'], help='force the CPU (fine-tuning and evaluation)')
    p.add_argument('--launcher', choices=['python', 'accelerate'], default='python')
    p.add_argument('--launch-args', default='', help="options of accelerate launch, e.g. '--multi_gpu --num_processes 8'")
    p.add_argument('--max-steps', type=int, help='fine-tuning step budget (overrides the config)')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='fine-tuning config overrides (finetune.py --set)')
    p.add_argument('--eval-set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='evaluation settings overrides, e.g. n_examples=4 apgd_iters=1')
    p.add_argument('--cards-dir', type=Path, help='where push_to_hub.py writes the card (default <out>/cards; give '
                                                  'hub_cards to update the repository\'s cards)')
    p.add_argument('--overwrite-card', action='store_true',
                   help="replace a different card already in --cards-dir (and, with --push, the Hub repo's card)")
    p.add_argument('--push', action='store_true', help='upload (default: a dry run, nothing sent)')
    p.add_argument('--until', metavar='STEP', help='stop after this step (e.g. finetune: fine-tune on one machine, '
                                                   'evaluate on another); the same command without it goes on')
    args = p.parse_args(argv)
    if not (args.table or args.list) and not args.tag:
        p.error('name an entry (see --list), or --table / --list')
    return args


def parse_eval_sets(pairs):
    import yaml
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep:
            raise SystemExit(f'--eval-set {pair!r}: expected KEY=VALUE')
        changes[key] = yaml.safe_load(value) if key != 'eps' else value
    return changes


def main(argv=None) -> int:
    args = parse_args(argv)
    from timm_hpm.runfiles import write_text_atomic
    from timm_hpm.zoo import (BuildOptions, ZooError, build_record, check_build_record, load_manifest, override_eval,
                              plan_steps, zoo_table)
    try:
        entries = load_manifest(args.manifest)
    except ZooError as error:
        raise SystemExit(f'manifest error: {error}')
    if args.list:
        print('\n'.join(entries))
        return 0
    if args.table:
        print(zoo_table(entries, here=args.here))
        return 0
    if args.tag not in entries:
        raise SystemExit(f'{args.tag!r} is not in {args.manifest}; entries: {", ".join(entries)}')
    try:
        entry = override_eval(entries[args.tag], parse_eval_sets(args.eval_set))
    except ZooError as error:
        raise SystemExit(f'--eval-set: {error}')
    opts = BuildOptions(out=args.out or Path('runs') / 'zoo' / entry.tag, data_dir=args.data_dir,
                        model_dir=args.model_dir, device=args.device, launcher=args.launcher,
                        launch_args=args.launch_args.split(), max_steps=args.max_steps, sets=list(args.set),
                        push=args.push, cards_dir=args.cards_dir, overwrite_card=args.overwrite_card)
    steps = plan_steps(entry, opts)
    if args.status:
        for step in steps:
            print(f"{'done   ' if step.is_done else 'pending'} {step.name:12s} {step.description}")
        return 0

    record = build_record(entry, opts)
    try:
        check_build_record(opts.out / 'build.json', record)
    except ZooError as error:
        raise SystemExit(f'error: {error}')
    if args.until and args.until not in [step.name for step in steps]:
        raise SystemExit(f'--until {args.until}: not a step of this build; its steps: '
                         f'{", ".join(step.name for step in steps)}')
    opts.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(opts.out / 'build.json', json.dumps(record, indent=2))
    return run_steps(entry, opts, args.until)


def run_steps(entry, opts, until=None) -> int:
    """Each step of the build in order, skipped when done; a failed step stops the build (rerun to resume).
    ``until``: the name of the last step to run."""
    from timm_hpm.runfiles import write_text_atomic
    from timm_hpm.zoo import export_base, format_command, plan_steps
    timings = {}
    for step in plan_steps(entry, opts):  # planned again as each step may change the next (finetune --resume)
        if step.is_done:
            print(f'[build_zoo] {step.name}: done, skipped ({step.done})', flush=True)
            timings[step.name] = 'skipped'
            continue
        print(f'[build_zoo] {step.name}: {step.description}', flush=True)
        tic = time.perf_counter()
        if step.command is None:
            export_base(entry, opts.model_dir, opts.out / 'base')
        else:
            print(f'[build_zoo]   {format_command(step.command)}', flush=True)
            result = subprocess.run(step.command, stdout=subprocess.PIPE if step.name == 'push' else None, text=True)
            if step.name == 'push' and result.stdout:
                print(result.stdout, end='')
            if result.returncode:
                print(f'[build_zoo] {step.name} failed (exit {result.returncode}); rerun the same command to '
                      'resume.', file=sys.stderr)
                return result.returncode
            if step.name == 'push':
                write_text_atomic(step.done, json.dumps({'repo_id': entry.card.repo_id, 'time': time.time(),
                                                         'output': result.stdout[-4000:]}, indent=2))
        if not step.is_done:
            print(f'[build_zoo] {step.name} ended without {step.done}', file=sys.stderr)
            return 1
        timings[step.name] = round(time.perf_counter() - tic, 1)
        if step.name == until:
            print(f'[build_zoo] {entry.tag}: stopped after {until} (--until) in {opts.out} ({json.dumps(timings)}); '
                  'the same command without --until goes on')
            return 0
    print(f'[build_zoo] {entry.tag}: built in {opts.out} ({json.dumps(timings)})')
    return 0


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-zoo``, ``python -m timm_hpm.cli.build_zoo``, recipes/build_zoo.py): its
    exit status."""
    return main(argv)


if __name__ == '__main__':
    sys.exit(cli())
