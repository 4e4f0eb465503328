"""MSA's stage names and their labels: the one place that builds them.

A unit file's ``candidates`` are named ``autoattack`` (AutoAttack's cascade on the target) or
``<surrogate>/<attack>`` (``fc/apgd-ce``, ``fc/apgd-t1``, ..., ``fc/autoattack``, and ``combined/round1``, ...); a
*stage* is the part before the slash (``autoattack``, ``fc``, ``static``, ..., ``combined``). For a batch-dependent
surrogate each APGD run also has ``<surrogate>/<attack>:best-iterate`` (the whole batch it evaluated that broke the
most), ``...:best-iterate-spliced`` (that batch's images in the realised batch) and ``...:iterates`` (per sample:
correct in every batch the run evaluated; a per-sample union, not one batch). ``realised`` and ``union`` are the
batch after every stage and the per-sample union over all candidates.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

__all__ = ['AUTOATTACK', 'COMPLETION', 'COMBINED', 'ITERATES', 'candidate_name', 'candidate_stage',
           'is_per_sample_union', 'stage_order', 'stage_label']

#: The stage (and candidate) of AutoAttack's cascade run on the target itself.
AUTOATTACK = 'autoattack'
#: The stage after the last surrogate (with ``completion_rounds``): the realised batch completed through the target.
COMPLETION = 'completion'
#: The stage after the last surrogate (and the completion): whole-batch combinations of every stage's breaks.
COMBINED = 'combined'

#: The suffix of a candidate that is the per-sample union over every batch one attack run evaluated.
ITERATES = ':iterates'


def candidate_name(surrogate: Optional[str], attack: str) -> str:
    """A candidate batch's name: ``attack`` on the target (``surrogate=None``), else ``<surrogate>/<attack>``."""
    return attack if surrogate is None else f'{surrogate}/{attack}'


def candidate_stage(name: str) -> str:
    """The stage a candidate belongs to: ``fc/apgd-t1`` -> ``fc``, ``autoattack`` -> ``autoattack``."""
    return name.split('/')[0]


def is_per_sample_union(name: str) -> bool:
    """Whether a candidate is a per-sample union over several batches (``...:iterates``), not one batch."""
    return name.endswith(ITERATES)


def stage_order(settings: dict, stages: Iterable[str]) -> List[str]:
    """MSA's stages (those in ``stages``) in the order they run: AutoAttack on the target, the surrogates as
    configured (``settings``: a run's settings), the completion, then the combinations; any other stage after them,
    sorted."""
    stages = list(stages)
    msa = settings.get('msa', {})
    ran = [AUTOATTACK, *msa.get('surrogates', []), *msa.get('surrogate_models', []), COMPLETION, COMBINED]
    return [s for s in ran if s in stages] + sorted(s for s in stages if s not in ran)


def stage_label(stage: str, surrogate_prefix: str = 'APGD-CE/T via') -> str:
    """A stage's label in a table: ``AutoAttack on the target``, ``combinations of every stage's breaks``, or
    ``<surrogate_prefix> <surrogate>``."""
    if stage == AUTOATTACK:
        return 'AutoAttack on the target'
    if stage == COMPLETION:
        return 'the realised batch completed through the target'
    return "combinations of every stage's breaks" if stage == COMBINED else f'{surrogate_prefix} {stage}'
