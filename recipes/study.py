"""The budget-matched HPM study on held-out images: every candidate against a control with the same budget.

    python recipes/study.py --study studies/fashion_mnist/configs/study.yaml --out studies/fashion_mnist/results/study

Each candidate of the study YAML is fine-tuned (``recipes/finetune.py``, into ``<runs>/<candidate>/seed<s>``) for
each seed, with a control (the base fine-tuned with plain PGD-AT, same steps, learning rate, trainable parameters,
attack and seed) for every budget and seed; inference-time candidates change a shipped model's head options without
training. Every model is scored on the same held-out images (never the test set) by timm_hpm.study.score_model;
per-image results go to ``<out>/scores.jsonl`` (one line per model, appended as each is scored; an earlier
version's ``<out>/scores/`` folder is brought into it) and the table (difference to the control, paired standard
error, sign test) to ``<out>/study.json``, ``<out>/study.md`` and ``<out>/study.png``. Finished fine-tunes and
scores are kept: rerun the command after an interruption, or with more candidates or seeds. The steps are
timm_hpm.study.runner's; the command runs any study YAML.

Before any work, every finished score and every fine-tune the study would reuse is checked against what the study
defines now: a score made with another definition, or a run folder whose ``config.yaml`` differs from the candidate's
configuration (its definition changed, or another study gave the name to another configuration in the same --runs
folder), stops the study naming what differs; nothing is deleted or retrained in its place. The figure needs
matplotlib: without it the study stops at once, before any fine-tune, saying so (``--no-figure`` runs it without
the figure), rather than failing at the end, after the work.
"""
import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--study', type=Path, required=True, help='YAML: config, control_config, seeds, common, scoring, '
                                                              'candidates {name: options}')
    p.add_argument('--out', type=Path, required=True, help='folder for study.json/.md/.png and the per-image scores')
    p.add_argument('--runs', type=Path, default=Path('runs/study'), help='where the candidates are fine-tuned')
    p.add_argument('--only', nargs='*', help='candidates (names without /seed) to run; default all')
    p.add_argument('--report-only', action='store_true',
                   help='fine-tune and score nothing: write the tables and figures from the finished scores')
    p.add_argument('--device', default='cpu', choices=['cpu', 'auto'], help='the fine-tunes\' device')
    p.add_argument('--jobs', type=int, default=1, metavar='N',
                   help='fine-tunes at a time, each on cores/N threads, while the finished ones are scored')
    p.add_argument('--update', type=Path, default=None, metavar='README',
                   help="also write the table into that file's generated section 'heldout-study'")
    p.add_argument('--no-figure', action='store_true',
                   help='do not draw <out>/study.png (which needs matplotlib); the tables are written as always')
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_figure:  # the figure is asked for: without matplotlib, stop now rather than after all the work
        from timm_hpm.analysis.figures import require_matplotlib
        try:
            require_matplotlib(f'recipes/study.py (its figure {args.out / "study.png"})')
        except ImportError as error:
            raise SystemExit(f'{error}; or pass --no-figure to run the study without the figure.') from None
    import yaml

    from timm_hpm.report import check_section, update_section
    from timm_hpm.study.runner import Study, run_study

    if args.update is not None:  # refuse a wrong --update before hours of work, not after
        try:
            check_section(args.update, 'heldout-study')
        except ValueError as error:
            raise SystemExit(f'--update: {error}')
    if args.jobs < 1:
        raise SystemExit(f'--jobs {args.jobs}: give 1 or more')
    study = Study(yaml.safe_load(args.study.read_text()), args.out, args.runs, REPO, args.device, args.jobs)
    rows, table = run_study(study, args.study, args.only, 'python recipes/study.py ' + shlex.join(map(str, argv)),
                            figure=not args.no_figure, report_only=args.report_only)
    print(table)
    if args.update is not None:
        update_section(args.update, 'heldout-study', table)
    return rows


if __name__ == '__main__':
    main()
