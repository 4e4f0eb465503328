"""Running a study (what ``recipes/study.py`` does): check what is reused, fine-tune and score what is missing, write
the tables and the figure. Finished fine-tunes and scores are kept, so the same command resumes."""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .candidates import Candidate, expand_study
from .report import (budget_trend, cost_rows, cost_table, plot_budget, plot_study, ranking_text, seed_summary,
                     study_rows, study_table)
from .runs import check_run, finetune, stop_finetunes
from .scoring import held_out, score_model, scoring_config
from .store import ScoreStore

__all__ = ['Study', 'run_study', 'select', 'stored_score']


def stored_score(store: ScoreStore, name: str, definition: dict, who: str = '') -> Optional[dict]:
    """``name``'s finished score (None when there is none), refused when it was made with another definition (the
    candidate, the scoring options or the attack itself changed since: a score from before definitions recorded
    the attack is stale too)."""
    record = store.get(name)
    if record is not None and _as_today(record.get('definition')) != definition:
        raise SystemExit(f'{store.path} scored {who or name} as {record.get("definition")}, the study now defines it '
                         f'as {definition}: rename the candidate, or remove its line ("name": "{name}") from that '
                         'file, to rescore it.')
    return record


def _as_today(definition):
    """A stored score's definition with the MSA options added since it was made filled in as what its attack ran
    (:func:`~timm_hpm.eval.settings_schema.msa_options_as_today`): an option added at the value that reproduces the
    earlier attack leaves the score valid."""
    from ..eval.settings_schema import msa_options_as_today
    if not isinstance(definition, dict) or not isinstance(definition.get('attack'), dict):
        return definition
    return dict(definition, attack=msa_options_as_today(definition['attack'])[0])


def select(candidates: Sequence[Candidate], only: Optional[Sequence[str]], study_path) -> set:
    """The names to fine-tune and score: every candidate, or those of ``only`` (names without /seed) and their
    controls."""
    if not only:
        return {c.name for c in candidates}
    unknown = set(only) - {c.name.split('/')[0] for c in candidates}
    if unknown:
        raise SystemExit(f'--only {sorted(unknown)}: not candidates of {study_path}')
    keep = {c.name for c in candidates if c.name.split('/')[0] in set(only)}
    return keep | {c.control for c in candidates if c.name in keep and c.control}


@dataclass
class Study:
    """One study as the command sees it: its YAML, where it runs (``runs``), writes (``out``), its settings and how
    many fine-tunes run at a time (``jobs``)."""
    spec: dict
    out: Path
    runs: Path
    repo: Path
    device: str = 'cpu'
    jobs: int = 1  # fine-tunes at a time (each on its share of the cores)

    def __post_init__(self):
        from ..train import load_config
        self.candidates = expand_study(self.spec)
        self.config = self.repo / self.spec['config']
        self.control_config = self.repo / self.spec['control_config']
        self.scoring = self.spec.get('scoring', {})
        self.base_cfg = load_config(self.config)
        self.eps, self.norm = self.base_cfg.eps, self.base_cfg.attack.norm
        # in every score's definition: a changed attack makes a score stale
        self.attack = scoring_config(self.eps, self.norm, self.scoring).to_dict()
        self.batch_size = self.scoring.get('batch_size', 250)
        self._images = None

    @property
    def threads(self) -> Optional[int]:
        """Each fine-tune's CPU threads with ``jobs`` > 1 (its share of the cores); None: torch's default."""
        return max(1, len(os.sched_getaffinity(0)) // self.jobs) if self.jobs > 1 else None

    def definition_of(self, c: Candidate) -> dict:
        return dict(kind=c.kind, overrides=c.overrides, model=c.model, hpm=c.hpm, run=c.run,
                    eval_batch_size=c.eval_batch_size or self.batch_size, scoring=self.scoring, attack=self.attack)

    def base_definition(self) -> dict:
        return dict(kind='base', model=self.spec['base_model'], eval_batch_size=self.batch_size,
                    scoring=self.scoring, attack=self.attack)

    @staticmethod
    def fine_tuned(c: Candidate) -> bool:
        """Fine-tuned here (or before, by this candidate or the one its model_of names), not a registered model."""
        return not (c.kind == 'inference' and c.run is None)

    def run_of(self, c: Candidate):
        return self.runs / (c.run or c.name), self.control_config if c.kind == 'control' else self.config

    def check_runs(self, store: ScoreStore, keep: set) -> None:
        """Before any work: every finished score, and every run folder the study would reuse (for a score to make,
        or the run a finished score came from), is what the study defines now."""
        from ..train import ConfigError, RunFolderError
        for c in self.candidates:
            stored_score(store, c.name, self.definition_of(c))
            if self.fine_tuned(c) and (c.name in keep or c.name in store):
                run_dir, train_config = self.run_of(c)
                try:
                    check_run(train_config, run_dir, c.overrides, c.name)
                except (RunFolderError, ConfigError) as error:
                    raise SystemExit(f'error: {error}') from None

    def model_of(self, c: Candidate, pending: Optional[dict] = None):
        """The candidate's model, fine-tuned first when it is not yet (or resumed; or waited for, when its fine-tune
        is one of ``pending``'s), its inference options applied, and the seconds its fine-tune took (None: none
        ran)."""
        import timm

        import timm_hpm
        from ..train import ConfigError, RunFolderError
        seconds = None
        if not self.fine_tuned(c):
            model = timm.create_model(c.model, pretrained=True).eval()
        else:
            run_dir, train_config = self.run_of(c)
            try:  # checked again: another process may have written the run since
                started = (pending or {}).pop(run_dir, None)
                seconds = (started.result() if started is not None
                           else finetune(train_config, run_dir, c.overrides, self.device, c.name))
            except (RunFolderError, ConfigError) as error:
                raise SystemExit(f'error: {error}') from None
            model = timm.create_model(f"local-dir:{run_dir / 'final'}", pretrained=True).eval()
        for key, value in c.hpm.items():  # inference-time head options; the others stay as trained
            setattr(timm_hpm.get_hpm_head(model), key, value)
        return model, seconds

    def score(self, model, batch_size: int) -> dict:
        if self._images is None:
            self._images = held_out(self.base_cfg, self.scoring.get('n_val', 2000), model)
        x, y = self._images
        return score_model(model, x, y, self.eps, self.norm, self.scoring, batch_size)

    def score_candidates(self, store: ScoreStore, keep: set) -> dict:
        """name -> score of every candidate scored (before, or now when it is in ``keep``). What is made now goes
        seed by seed (each candidate with its control), so a killed study has kept whole pairs; with ``jobs`` > 1
        the fine-tunes run that many at a time while the finished ones are scored."""
        from tqdm import tqdm
        todo = sorted((c for c in self.candidates if c.name in keep
                       and stored_score(store, c.name, self.definition_of(c)) is None), key=lambda c: c.seed)
        with self.fine_tunes(todo) as pending:
            for c in tqdm(todo, desc='study candidates'):
                model, seconds = self.model_of(c, pending)
                tic = time.time()
                record = self.score(model, c.eval_batch_size or self.batch_size)
                # the cost, as this machine ran it: seconds (wall) of the fine-tune (None: made before) and the
                # scoring, and how many fine-tunes shared the cores (each on train_threads threads; None: all)
                record.update(train_seconds=seconds, score_seconds=round(time.time() - tic, 1), jobs=self.jobs,
                              train_threads=self.threads, candidate=c.name, definition=self.definition_of(c))
                store.add(c.name, record)
        return {c.name: store.get(c.name) for c in self.candidates if c.name in store}

    @contextmanager
    def fine_tunes(self, todo: Sequence[Candidate]):
        """With ``jobs`` > 1: the fine-tunes ``todo`` needs, started ``jobs`` at a time in that order, each on its
        share of the cores (run folder -> future of its seconds); else nothing is started ahead ({})."""
        if self.jobs <= 1:
            yield {}
            return
        pending = {}
        # threads, not processes: each fine-tune is a subprocess (timm_hpm.cli.finetune), the pool only waits on it
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            for c in todo:
                run_dir, train_config = self.run_of(c)
                if self.fine_tuned(c) and run_dir not in pending:
                    pending[run_dir] = pool.submit(finetune, train_config, run_dir, c.overrides, self.device, c.name,
                                                   self.threads)
            yield pending
        except BaseException:  # stopped (an error, Ctrl-C): the fine-tunes running beside end too
            pool.shutdown(wait=False, cancel_futures=True)
            stop_finetunes()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score_base(self, store: ScoreStore, make: bool = True) -> Optional[dict]:
        """The base's score (the reference of inference-time candidates without a control), made when missing (and
        ``make``)."""
        if not self.spec.get('base_model'):
            return None
        definition = self.base_definition()
        if stored_score(store, 'base', definition, 'the base') is None and make:
            import timm
            model = timm.create_model(self.spec['base_model'], pretrained=True).eval()
            store.add('base', dict(self.score(model, self.batch_size), definition=definition))
        return store.get('base')


def write_report(study: Study, scores: dict, base: Optional[dict], study_path, command: str,
                 figure: bool = True) -> tuple:
    """``study.json``, ``study.md`` and (``figure``) ``study.png`` in the study's ``out`` from ``scores``; the rows
    and the Markdown written."""
    import timm_hpm
    from ..runfiles import write_text_atomic
    rows = study_rows(study.candidates, scores, base)
    summary = seed_summary(study.candidates, scores)
    trend, cost = budget_trend(study.candidates, summary), cost_rows(study.candidates, scores)
    table = (study_table(rows) + '\n\n' + ranking_text(summary)) if summary else study_table(rows)
    if cost:
        table += ('\n\nWhat the budgets cost here (wall minutes on this machine as it was loaded at the time, the mean '
                  'over the models timed):\n\n' + cost_table(cost))
    write_text_atomic(study.out / 'study.json', json.dumps(
        {'study': str(study_path), 'scoring': study.scoring, 'eps': study.eps, 'norm': study.norm, 'rows': rows,
         'ranking': summary, 'budget_trend': [{k: r[k] for k in ('name', 'budget', 'seeds', 'difference')}
                                              for r in trend], 'cost': cost,
         'base': {k: base[k] for k in ('clean_acc', 'robust_acc')} if base else None,
         'timm_hpm_version': timm_hpm.__version__, 'command': command}, indent=2))
    write_text_atomic(study.out / 'study.md', table + '\n')
    if figure:
        plot_study(summary, rows, study.out / 'study.png',
                   f'every HPM candidate against its budget-matched control ({len(summary)} candidates)')
        if trend:
            plot_budget(trend, rows, study.out / 'study_budget.png')
    else:
        for name in ('study.png', 'study_budget.png'):
            if (study.out / name).exists():
                print(f'--no-figure: {study.out / name} is an earlier run\'s figure, not redrawn from this table',
                      file=sys.stderr)
    return rows, table


def run_study(study: Study, study_path, only: Optional[List[str]], command: str, figure: bool = True,
              report_only: bool = False) -> tuple:
    """The whole study under ``out``'s lock: an earlier version's per-model score files brought into
    ``scores.jsonl``, every reuse checked, what is missing fine-tuned and scored (nothing with ``report_only``), the
    report written; the rows and the Markdown table."""
    from ..runfiles import run_lock
    keep = set() if report_only else select(study.candidates, only, study_path)
    with run_lock(study.out, '--out'):
        store = ScoreStore(study.out)
        converted = store.convert_old_layout()
        if converted:
            print(f'{converted} scores of the earlier per-model layout brought into {store.path}', file=sys.stderr)
        study.check_runs(store, keep)
        scores = study.score_candidates(store, keep)  # --only limits what is made; the table has every score
        base = study.score_base(store, make=not report_only)
        return write_report(study, scores, base, study_path, command, figure)
