"""The budget-matched HPM study on held-out images: every candidate against a control with the same budget.

    python recipes/study.py --study recipes/configs/fashion_mnist_study.yaml --out results/fashion_mnist/study

Each candidate of the study YAML is fine-tuned (``recipes/finetune.py``, into ``<runs>/<candidate>/seed<s>``) for
each seed, with a control (the base fine-tuned with plain PGD-AT, same steps, learning rate, trainable parameters,
attack and seed) for every budget and seed; inference-time candidates change a shipped model's head options without
training. Every model is scored on the same held-out images (never the test set) by timm_hpm.study.score_model;
per-image results go to ``<out>/scores/`` and the table (difference to the control, paired standard error, sign
test) to ``<out>/study.json``, ``<out>/study.md`` and ``<out>/study.png``. Finished fine-tunes and scores are kept:
rerun the command after an interruption, or with more candidates or seeds.

Before any work, every finished score and every fine-tune the study would reuse is checked against what the study
defines now: a score made with another definition, or a run folder whose ``config.yaml`` differs from the candidate's
configuration (its definition changed, or another study gave the name to another configuration in the same --runs
folder), stops the study naming what differs; nothing is deleted or retrained in its place. The figure needs
matplotlib: without it the study stops at once, before any fine-tune, saying so (``--no-figure`` runs it without
the figure), rather than failing at the end, after the work.
"""
import argparse
import json
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
    p.add_argument('--device', default='cpu', choices=['cpu', 'auto'], help='the fine-tunes\' device')
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
    import timm
    import yaml
    from tqdm import tqdm

    import timm_hpm
    from timm_hpm.report import check_section, update_section
    from timm_hpm.runfiles import run_lock, write_text_atomic
    from timm_hpm.study import (check_run, expand_study, finetune, held_out, plot_study, ranking_text, score_model,
                                scoring_config, seed_summary, study_rows, study_table)
    from timm_hpm.train import ConfigError, RunFolderError, load_config

    if args.update is not None:  # refuse a wrong --update before hours of work, not after
        try:
            check_section(args.update, 'heldout-study')
        except ValueError as error:
            raise SystemExit(f'--update: {error}')
    study = yaml.safe_load(args.study.read_text())
    candidates = expand_study(study)
    keep = {c.name for c in candidates}
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {c.name.split('/')[0] for c in candidates}
        if unknown:
            raise SystemExit(f'--only {sorted(unknown)}: not candidates of {args.study}')
        keep = {c.name for c in candidates if c.name.split('/')[0] in wanted}
        keep |= {c.control for c in candidates if c.name in keep and c.control}
    config, control_config = (REPO / study['config'], REPO / study['control_config'])
    scoring = study.get('scoring', {})
    base_cfg = load_config(config)
    eps, norm = base_cfg.eps, base_cfg.attack.norm
    attack = scoring_config(eps, norm, scoring).to_dict()  # in every score's definition: a changed attack is stale
    scores_dir = args.out / 'scores'

    def score_path(c):
        return scores_dir / f"{c.name.replace('/', '__')}.json"

    def definition_of(c):
        return dict(kind=c.kind, overrides=c.overrides, model=c.model, hpm=c.hpm, run=c.run,
                    eval_batch_size=c.eval_batch_size or scoring.get('batch_size', 250), scoring=scoring, attack=attack)

    def fine_tuned(c):  # fine-tuned here (or before, by this candidate or the one named by its model_of)
        return not (c.kind == 'inference' and c.run is None)  # (else a registered model)

    def run_of(c):
        return args.runs / (c.run or c.name), control_config if c.kind == 'control' else config

    with run_lock(args.out, '--out'):
        # Before any work: every finished score, and every run folder the study would reuse (for a score to make,
        # or the run a finished score came from), is what the study defines now.
        for c in candidates:
            if score_path(c).exists():
                stored_score(score_path(c), c.name, definition_of(c))
            if fine_tuned(c) and (c.name in keep or score_path(c).exists()):
                run_dir, train_config = run_of(c)
                try:
                    check_run(train_config, run_dir, c.overrides, c.name)
                except (RunFolderError, ConfigError) as error:
                    raise SystemExit(f'error: {error}') from None
        scores_dir.mkdir(parents=True, exist_ok=True)
        x = y = None
        scores = {}
        # --only limits what is fine-tuned and scored; the table has every candidate scored so far
        for c in tqdm(candidates, desc='study candidates'):
            path, definition = score_path(c), definition_of(c)
            if path.exists():
                scores[c.name] = stored_score(path, c.name, definition)
                continue
            if c.name not in keep:
                continue
            if not fine_tuned(c):
                model = timm.create_model(c.model, pretrained=True).eval()
                seconds = None
            else:
                run_dir, train_config = run_of(c)
                try:  # checked again: another process may have written the run since
                    seconds = finetune(train_config, run_dir, c.overrides, args.device, c.name)
                except (RunFolderError, ConfigError) as error:
                    raise SystemExit(f'error: {error}') from None
                model = timm.create_model(f"local-dir:{run_dir / 'final'}", pretrained=True).eval()
            for key, value in c.hpm.items():  # inference-time head options; the others stay as trained
                setattr(timm_hpm.get_hpm_head(model), key, value)
            if x is None:
                x, y = held_out(base_cfg, scoring.get('n_val', 2000), model)
            record = score_model(model, x, y, eps, norm, scoring, c.eval_batch_size or scoring.get('batch_size', 250))
            record.update(train_seconds=seconds, candidate=c.name, definition=definition)
            write_text_atomic(path, json.dumps(record))
            scores[c.name] = record
        base = None
        if study.get('base_model'):
            path = scores_dir / 'base.json'
            definition = dict(kind='base', model=study['base_model'], eval_batch_size=scoring.get('batch_size', 250),
                              scoring=scoring, attack=attack)
            if not path.exists():
                model = timm.create_model(study['base_model'], pretrained=True).eval()
                x, y = (x, y) if x is not None else held_out(base_cfg, scoring.get('n_val', 2000), model)
                record = score_model(model, x, y, eps, norm, scoring, scoring.get('batch_size', 250))
                write_text_atomic(path, json.dumps(dict(record, definition=definition)))
            base = stored_score(path, 'the base', definition)
        rows = study_rows(candidates, scores, base)
        summary = seed_summary(candidates, scores)
        table = (study_table(rows) + '\n\n' + ranking_text(summary)) if summary else study_table(rows)
        write_text_atomic(args.out / 'study.json', json.dumps(
            {'study': str(args.study), 'scoring': scoring, 'eps': eps, 'norm': norm, 'rows': rows,
             'ranking': summary,
             'base': {k: base[k] for k in ('clean_acc', 'robust_acc')} if base else None,
             'timm_hpm_version': timm_hpm.__version__,
             'command': 'python recipes/study.py ' + shlex.join(map(str, argv))}, indent=2))
        write_text_atomic(args.out / 'study.md', table + '\n')
        if not args.no_figure:
            plot_study(summary, rows, args.out / 'study.png',
                       f'every HPM candidate against its budget-matched control ({len(summary)} candidates)')
        elif (args.out / 'study.png').exists():
            print(f'--no-figure: {args.out / "study.png"} is an earlier run\'s figure, not redrawn from this table',
                  file=sys.stderr)
    print(table)
    if args.update is not None:
        update_section(args.update, 'heldout-study', table)
    return rows


def stored_score(path: Path, name: str, definition: dict) -> dict:
    """A finished score, refused when it was made with another definition (the candidate, the scoring options or
    the attack itself changed since: a score file from before definitions recorded the attack is stale too)."""
    record = json.loads(path.read_text())
    if record.get('definition') != definition:
        raise SystemExit(f'{path} scored {name} as {record.get("definition")}, the study now defines it as '
                         f'{definition}: rename the candidate or delete that file to rescore it.')
    return record


if __name__ == '__main__':
    main()
