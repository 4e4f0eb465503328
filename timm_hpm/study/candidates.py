"""A study's candidates: each HPM candidate over its seeds, and the budget-matched control it is read against."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ['Candidate', 'expand_study', 'BUDGET_MATCHED', 'KINDS']

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
