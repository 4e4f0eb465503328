"""The budget-matched study: HPM candidates read against a control, on held-out images, with paired statistics.

The control is the base fine-tuned with plain PGD-AT through its own FC head with exactly an HPM candidate's
budget (steps, learning rate, trainable parameters, attack, seed): any HPM effect is what is left once the extra
adversarial steps are accounted for. A study (``recipes/study.py``, its YAML in ``recipes/configs/``) lists
candidates; each is expanded over the seeds, and a control is added for every budget and seed a fine-tuned
candidate uses. Every model is scored on the same held-out images (the end of the training split the fine-tunes
never see; never the test set) with the same attack: whole-batch APGD-CE and APGD-T through the target itself and,
for an HPM model, through its head's other modes (the surrogate part of MSA, without AutoAttack), the realised
batch counted. Per-image results are kept, so every HPM figure is compared with its control image by image.

A fine-tune is reused (finished, or resumed after an interruption) only when its run folder's ``config.yaml`` is the
configuration the study asks of it (:func:`check_run`): a candidate whose definition changed, or another study that
gives the same name to another configuration in a shared runs folder, is refused, naming the settings that differ.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .data import build_train_val
from .report import markdown_table, mean_difference, paired, paired_difference

__all__ = ['Candidate', 'expand_study', 'held_out', 'score_model', 'finetune', 'study_rows', 'study_table',
           'seed_summary', 'ranking_text', 'plot_study', 'check_run', 'run_config']

KINDS = ('hpm', 'control', 'inference')
#: What a control shares with the HPM candidate it is read against (besides the seed): the budget.
BUDGET_MATCHED = ('train.max_steps', 'train.epochs', 'train.trainable', 'train.lr', 'train.weight_decay',
                  'train.opt', 'attack.eps', 'attack.steps', 'attack.step_size')


@dataclass(frozen=True)
class Candidate:
    """One model of the study. ``kind``: ``hpm`` (fine-tuned from the HPM config with ``overrides``), ``control``
    (the control config with the same budget and seed), ``inference`` (a registered ``model`` whose head options
    ``hpm`` are changed at inference, no training). ``budget``: optimiser steps (0 for ``inference``)."""
    name: str
    kind: str
    seed: int
    budget: int
    overrides: Dict[str, Any] = field(default_factory=dict)
    control: Optional[str] = None  # the control it is read against (same budget and seed); None for the others
    model: Optional[str] = None
    hpm: Dict[str, Any] = field(default_factory=dict)
    eval_batch_size: Optional[int] = None  # None: the study's scoring batch size
    run: Optional[str] = None  # the fine-tune whose model this is (None: its own; another candidate's run)
    changes: Dict[str, Any] = field(default_factory=dict)  # what the candidate changes (the table's column)



def _control_for(overrides: Dict[str, Any], common: Dict[str, Any], seed: int) -> Candidate:
    """The control of an HPM candidate: the control config with the candidate's budget (:data:`BUDGET_MATCHED`)
    and seed, named by its budget and what differs from the study's common settings."""
    matched = {k: overrides[k] for k in BUDGET_MATCHED if k in overrides}
    budget = int(overrides['train.max_steps'])
    extra = ''.join(f"_{k.split('.')[-1]}-{v}" for k, v in matched.items()
                    if k != 'train.max_steps' and common.get(k) != v)
    return Candidate(f'control_{budget}{extra}/seed{seed}', 'control', seed, budget,
                     {**common, **matched, 'train.seed': seed},
                     changes={k: v for k, v in matched.items() if common.get(k) != v})


def expand_study(study: dict) -> List[Candidate]:
    """The candidates of a study YAML (``candidates``: name -> options; ``seeds``; ``common``; ``budget``), each over
    its seeds (a candidate's own ``seeds`` wins), plus one control per (budget, seed) that a candidate needs.

    A candidate's options: config overrides (``train.max_steps: 600``, ``model.hpm.alpha: 0.25``, ...), or the
    keys ``inference`` (head options applied to ``model`` without training; with ``train.max_steps``, the budget
    that model was fine-tuned with, it is read against that budget's control, else against the base), ``model``,
    ``seeds``, ``eval_batch_size`` and ``model_of`` (score another candidate's fine-tuned model, of the same seed,
    e.g. at another batch size; with ``inference``, that model with its head options changed)."""
    unknown = set(study) - {'config', 'control_config', 'common', 'seeds', 'scoring', 'candidates', 'base_model'}
    if unknown:
        raise ValueError(f'unknown study keys {sorted(unknown)}')
    seeds = list(study.get('seeds', [0]))
    common = dict(study.get('common', {}))
    out: Dict[str, Candidate] = {}
    for name, options in study['candidates'].items():
        options = dict(options or {})
        if '/' in name:
            raise ValueError(f"candidate name {name!r}: no '/' (it names the seed)")
        cand_seeds = options.pop('seeds', None) or seeds
        model, hpm = options.pop('model', None), options.pop('inference', None)
        eval_bs = options.pop('eval_batch_size', None)
        model_of = options.pop('model_of', None)
        if model_of is not None and model_of not in study['candidates']:
            raise ValueError(f'candidate {name!r}: model_of {model_of!r} is not a candidate')
        if model_of is not None:
            options = {k: v for k, v in (study['candidates'][model_of] or {}).items()
                       if k not in ('seeds', 'eval_batch_size')}
        for seed in ([0] if hpm is not None and model_of is None else cand_seeds):
            if hpm is not None and model_of is None:
                # a registered model: read against the control of the budget it was fine-tuned with, when given
                ctl = _control_for({**common, **options}, common, seed) if 'train.max_steps' in options else None
                if ctl is not None:
                    out.setdefault(ctl.name, ctl)
                c = Candidate(f'{name}/seed{seed}', 'inference', seed, ctl.budget if ctl else 0, {},
                              ctl.name if ctl else None, model or study.get('model'), dict(hpm), eval_bs)
            else:
                # a model fine-tuned here (its own run, or model_of's run of the same seed; with ``inference``, its
                # head options changed), read against the control of that run's budget and seed
                overrides = {**common, **options, 'train.seed': seed}
                ctl = _control_for(overrides, common, seed)
                out.setdefault(ctl.name, ctl)
                c = Candidate(f'{name}/seed{seed}', 'hpm' if hpm is None else 'inference', seed, ctl.budget,
                              overrides, ctl.name, hpm=dict(hpm or {}), eval_batch_size=eval_bs,
                              run=f'{model_of}/seed{seed}' if model_of else None, changes=options)
            out[c.name] = c
    return sorted(out.values(), key=lambda c: (c.kind != 'control', c.budget, c.name))


def held_out(cfg, n: int, model) -> tuple:
    """The first ``n`` held-out images (the last ``data.val_examples`` of the training split) as tensors in [0, 1]."""
    _, val = build_train_val(cfg.data.dataset, cfg.data.data_dir, cfg.data.val_examples, cfg.data.train_examples,
                             augment=False, image_size=model.pretrained_cfg['input_size'],
                             num_classes=model.num_classes, seed=cfg.train.seed, pretrained_cfg=model.pretrained_cfg)
    n = min(n, len(val))
    items = [val[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def scoring_config(eps: float, norm: str, scoring: dict):
    """The attack that scores the study's models (an :class:`~timm_hpm.eval.MSAConfig` without AutoAttack), from
    the study's ``scoring`` options (``apgd_iters``, ``n_target_classes``, ``combine_rounds``); everything else is
    MSA's default, so its ``to_dict()`` belongs in a score's definition (a changed attack makes old scores stale)."""
    from .eval import MSAConfig
    return MSAConfig(eps=eps, norm=norm, autoattack=False, apgd_iters=scoring.get('apgd_iters', 20),
                     n_target_classes=scoring.get('n_target_classes', 3),
                     target_n_target_classes=scoring.get('n_target_classes', 3),
                     combine_rounds=scoring.get('combine_rounds', 3))


def score_model(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, scoring: dict,
                batch_size: int) -> dict:
    """Per-image clean and robust correctness of ``model`` (eval mode; an HPM model's dynamic head) on fixed
    batches: whole-batch APGD-CE and APGD-T (``scoring``: ``apgd_iters``, ``n_target_classes``) through the target
    and, for an HPM model, through its head's modes, every iterate through a batch-dependent view scored; the
    realised batches count (:func:`scoring_config`)."""
    from .attacks import normalized_view
    from .eval import msa
    from .models import is_hpm_model
    view = normalized_view(model).eval()
    cfg = scoring_config(eps, norm, scoring)
    hpm = is_hpm_model(model)
    surrogates = None if hpm else {}
    result = msa(view, x, y, eps, surrogates=surrogates, batch_size=batch_size, config=cfg, batch_dependent=hpm)
    with torch.no_grad():
        clean = torch.cat([view(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    return {'clean': clean.tolist(), 'robust': result['correct'].tolist(), 'clean_acc': result['clean_acc'],
            'robust_acc': result['robust_acc'], 'union_acc': result['union_acc']}


def _sets(overrides: Dict[str, Any]) -> List[str]:
    """The ``--set KEY=VALUE`` items that give ``recipes/finetune.py`` these overrides."""
    return [f'{k}={json.dumps(v)}' for k, v in overrides.items()]


def run_config(config: Path, overrides: Dict[str, Any]):
    """The configuration ``recipes/finetune.py --config config --set <overrides>`` resolves (and records in its run
    folder's ``config.yaml``), read the way it reads it."""
    from .train import load_config, parse_overrides
    return load_config(config, parse_overrides(_sets(overrides)))


def check_run(config: Path, run_dir: Path, overrides: Dict[str, Any], name: str = '') -> None:
    """Refuse to reuse the fine-tune in ``run_dir`` (finished, or to be resumed) unless its recorded configuration
    (``config.yaml``) is the one asked for (``config`` with ``overrides``), output folder aside: a
    :class:`~timm_hpm.train.RunFolderError` names the settings that differ and what to do. A folder without a run
    passes; a finished run without its ``config.yaml`` is refused (it cannot be checked)."""
    from .train import ConfigError, RunFolderError, load_config
    from .train.config import config_changes
    from .train.runs import describe_changes, run_finished
    run_dir = Path(run_dir)
    who = f"{name}'s fine-tune" if name else 'the fine-tune'
    saved = run_dir / 'config.yaml'
    if not saved.is_file():
        if run_finished(run_dir):
            raise RunFolderError(f'{run_dir} holds finished weights but no config.yaml, so it cannot be checked to be '
                                 f'{who}: use another --runs folder, or delete {run_dir} yourself to fine-tune again.')
        return
    try:
        recorded = load_config(saved)
    except ConfigError as error:
        raise RunFolderError(f'{run_dir} holds a run whose configuration cannot be checked to be {who} ({error}): '
                             f'use another --runs folder, or delete {run_dir} yourself to fine-tune again.') from None
    changes = config_changes(recorded, run_config(config, overrides))
    if changes:
        raise RunFolderError(
            f'{run_dir} holds a fine-tune with another configuration than {who} ({saved} -> what the study asks: '
            f'{describe_changes(changes)}). It is not reused: give this study its own --runs folder (or the candidate '
            f'another name), or delete {run_dir} yourself (and the scores made from it) to fine-tune it again.')


def finetune(config: Path, run_dir: Path, overrides: Dict[str, Any], device: str = 'cpu', name: str = ''
             ) -> Optional[float]:
    """Fine-tune with ``python -m timm_hpm.cli.finetune`` (what ``recipes/finetune.py`` runs) into ``run_dir``
    (resuming an interrupted run); seconds taken, or None when the run had finished before. A run already there is
    reused only with the configuration asked for (:func:`check_run`; ``name``, the candidate, names it in the
    refusal)."""
    from .train.runs import run_finished
    check_run(config, run_dir, overrides, name)
    if run_finished(run_dir):
        return None
    if (run_dir / 'config.yaml').exists():
        cmd = ['--resume', str(run_dir)]
    else:
        sets = _sets(overrides)
        cmd = ['--config', str(config), '--output-dir', str(run_dir)] + (['--set'] + sets if sets else [])
    tic = time.time()
    subprocess.run([sys.executable, '-m', 'timm_hpm.cli.finetune', *cmd, '--device', device], check=True)
    return round(time.time() - tic, 1)


def study_rows(candidates: Sequence[Candidate], scores: Dict[str, dict], base: Optional[dict] = None) -> List[dict]:
    """One row per scored candidate: clean and robust accuracy on the held-out images, and, for every candidate
    that has a scored control, the paired difference to it (robust, in points) with its standard error, 95%
    interval and exact sign-test p. Inference-time candidates are read against the base (``base``)."""
    rows = []
    for c in candidates:
        s = scores.get(c.name)
        if s is None:
            continue
        row = {'name': c.name, 'kind': c.kind, 'budget': c.budget, 'seed': c.seed, 'clean_acc': s['clean_acc'],
               'robust_acc': s['robust_acc'], 'overrides': dict(c.changes),
               'inference': c.hpm, 'eval_batch_size': c.eval_batch_size}
        reference = scores.get(c.control) if c.control else base if c.kind == 'inference' else None
        if reference is not None:
            row['vs'] = c.control or 'base'
            row['difference'] = paired_difference(reference['robust'], s['robust'])
            row['sign_test'] = paired(dict(enumerate(reference['robust'])), dict(enumerate(s['robust'])))['p']
        rows.append(row)
    return rows


def study_table(rows: Sequence[dict]) -> str:
    """The Markdown table of :func:`study_rows`."""
    def pct(v):
        return f'{100 * v:.1f}%'
    body = []
    for r in rows:
        change = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in {**r['overrides'], **r['inference']}.items()
                           if k != 'train.max_steps') or '(defaults)'
        if r['eval_batch_size']:
            change += f", eval batch {r['eval_batch_size']}"
        d = r.get('difference')
        vs = (f"{100 * d['difference']:+.1f} ± {100 * d['se']:.1f} (p = {r['sign_test']:.2g}) vs {r['vs']}"
              if d else '')
        body.append([r['name'], r['kind'], r['budget'], change, pct(r['clean_acc']), pct(r['robust_acc']), vs])
    return markdown_table(['candidate', 'kind', 'steps', 'change', 'clean', 'robust (held-out)',
                           'robust difference, points ± 1 SE (sign test)'], body, 'llrlrrl')


def seed_summary(candidates: Sequence[Candidate], scores: Dict[str, dict]) -> List[dict]:
    """Every scored HPM and inference-time candidate over its scored seeds, best first by mean held-out robust
    accuracy: the seeds, mean clean and robust accuracy and, when every seed's control is scored, the difference to
    the control averaged over the seeds image by image (the images are the sampling unit: the seeds share them), with
    its standard error and 95% interval."""
    groups: Dict[str, List[Candidate]] = {}
    for c in candidates:
        if c.kind != 'control' and c.name in scores:
            groups.setdefault(c.name.split('/')[0], []).append(c)
    out = []
    for name, cs in groups.items():
        row = {'name': name, 'kind': cs[0].kind, 'seeds': [c.seed for c in cs], 'model': cs[0].model,
               'clean_acc': sum(scores[c.name]['clean_acc'] for c in cs) / len(cs),
               'robust_acc': sum(scores[c.name]['robust_acc'] for c in cs) / len(cs)}
        if all(c.control in scores for c in cs):
            if len({len(scores[k]['robust']) for c in cs for k in (c.name, c.control)}) != 1:
                raise ValueError(f'{name}: its seeds and controls were scored on different numbers of images')
            per_seed = [[int(bool(h)) - int(bool(k)) for h, k in zip(scores[c.name]['robust'],
                                                                     scores[c.control]['robust'])] for c in cs]
            row['difference'] = mean_difference([sum(d) / len(d) for d in zip(*per_seed)])
            row['vs'] = sorted({c.control.split('/')[0] for c in cs})
        out.append(row)
    return sorted(out, key=lambda r: -r['robust_acc'])


def ranking_text(summary: Sequence[dict], top: int = 3) -> str:
    """The first ``top`` candidates of :func:`seed_summary` in one paragraph, each with its number of seeds and its
    difference to the control; a candidate there with fewer than two seeds is marked (the study wants two; a
    registered model changed at inference has one training run by construction: a ``model_of`` candidate with the
    same options gives its configuration more seeds)."""
    items = []
    for i, r in enumerate(summary[:top], 1):
        n = len(r['seeds'])
        d = r.get('difference')
        notes = [f"{n} seed{'s' if n > 1 else ''}"]
        if d:
            notes.append(f"{100 * d['difference']:+.1f} ± {100 * d['se']:.1f} points vs {' / '.join(r['vs'])}")
        if n < 2:
            notes.append(f"the registered `{r['model']}`, one training run" if r.get('model')
                         else 'a second seed is due')
        items.append(f"{i}. `{r['name']}` {100 * r['robust_acc']:.1f}% at {100 * r['clean_acc']:.1f}% clean "
                     f"({'; '.join(notes)})")
    return (f'Top {len(items)} by held-out robust accuracy, mean over seeds (difference to the control averaged over '
            'the seeds image by image, ± 1 SE): ' + '; '.join(items) + '.') if items else ''


def plot_study(summary: Sequence[dict], rows: Sequence[dict], path: Path, title: str) -> None:
    """Each candidate's paired difference to its budget-matched control (held-out robust accuracy, points), best
    first: the mean over its seeds with its 95% interval (:func:`seed_summary`), each seed's own difference as a
    dot (``rows``, :func:`study_rows`), a line at 0 (the control). One row per candidate, named on the axis, so no
    label overlaps another. Candidates without a scored control are left out (the table lists them). A PNG at
    ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    shown = sorted((r for r in summary if r.get('difference')), key=lambda r: r['difference']['difference'])
    per_seed: Dict[str, List[float]] = {}
    for r in rows:
        if r.get('difference') and r['kind'] != 'control':
            per_seed.setdefault(r['name'].split('/')[0], []).append(100 * r['difference']['difference'])
    fig, ax = plt.subplots(figsize=(7.2, 1.2 + 0.28 * max(len(shown), 1)))
    for i, r in enumerate(shown):
        d = r['difference']
        low, high = (100 * v for v in d['ci95'])
        colour = 'tab:red' if high < 0 else 'tab:green' if low > 0 else 'tab:grey'
        ax.plot([low, high], [i, i], color=colour, linewidth=2)
        ax.plot([100 * d['difference']], [i], 'o', color=colour)
        dots = per_seed.get(r['name'], [])
        if len(dots) > 1:
            ax.plot(dots, [i] * len(dots), '|', color='black', markersize=8)
    ax.axvline(0, color='black', linewidth=1)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r['name']} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})" for r in shown],
                       fontsize=8)
    ax.set_xlabel('held-out robust accuracy minus the control, points (95% interval; | each seed)', fontsize=9)
    ax.set_xlim(right=max(0.5, ax.get_xlim()[1]))  # the control's line never at the edge
    ax.set_title(title, fontsize=10)
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
