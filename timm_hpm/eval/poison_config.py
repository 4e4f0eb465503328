"""The batch-poisoning attack's options (:class:`PoisonConfig`, every strength option with its command-line flag)
and the poisoned-member counts k of a batch (:func:`poison_counts`); the attack is :mod:`timm_hpm.eval.poison`."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

import torch

from ..attacks import check_count, check_eps, check_flag, option_label
from ..attacks._ball import NORMS

__all__ = ['POISON_FRACTIONS', 'POISON_OBJECTIVES', 'CLI_FLAGS', 'PoisonConfig', 'poison_counts']


#: k/B: one member, then 1%, 5%, 10% and 25% of the batch (rounded, at least one member).
POISON_FRACTIONS = (0.01, 0.05, 0.10, 0.25)

#: The objectives the attack ascends (see the module's docstring).
POISON_OBJECTIVES = ('margin_sum', 'soft_count', 'top_m')


@dataclass(frozen=True)
class PoisonConfig:
    """The poisoning attack's settings, checked when made. A setting out of its range is a ValueError naming it,
    its value, its ``recipes/evaluate.py`` flag and the valid range. :func:`run_poisoning` and
    :func:`poison_batch` make one from their arguments; the defaults are the attack at full strength.

    - ``eps``: finite and > 0 (at most 1 for Linf, images in [0, 1]; the unbounded radius of L2 is the box's
      diagonal); ``norm``: Linf or L2; ``seed``: an integer;
    - ``steps`` >= 1: steps of each run within eps (0 would score the start as if it were an attack);
      ``unbounded_steps`` >= 1 or None (6 x ``steps``): steps of each unbounded run (the class-directed runs take
      half);
    - ``restarts`` >= 1: runs of each objective through each gradient view (a random start, then the clean images,
      alternating);
    - ``objectives``: a non-empty tuple of distinct names from :data:`POISON_OBJECTIVES` (default ``soft_count``
      only: the others bought no flip it did not, ``recipes/poison_ingredients.py``);
    - ``target_classes`` >= 0: class-directed runs (0: none), at most the number of classes (fewer are run when
      the model has fewer classes);
    - ``anneal``: the annealed soft-to-hard run (HPM heads with per-sample features);
    - ``top_m`` >= 1: the victims the ``top_m`` objective concentrates on;
    - ``temperature`` > 0 (finite): the logit scale of ``soft_count``'s sigmoid;
    - ``feature_bound``: also optimise k free feature vectors (HPM heads with per-sample features).
    """
    # metadata: each setting's recipes/evaluate.py flag and help (timm_hpm.cli.config_args generates the options)
    eps: float = field(metadata={'flag': '--eps', 'help': "'8/255', 0.031, ...", 'required': True, 'type': None})
    norm: str = field(default='Linf', metadata={'flag': '--norm', 'help': 'threat model', 'choices': list(NORMS)})
    steps: int = field(default=100, metadata={
        'flag': '--poison-steps', 'help': 'PGD steps of each poisoning run within eps'})
    seed: int = field(default=0, metadata={'flag': '--seed', 'help': 'attack seeds (each batch derives its own)'})
    unbounded_steps: Optional[int] = field(default=None, metadata={
        'flag': '--poison-unbounded-steps',
        'help': 'steps of each unbounded poisoning run (default: 6 x --poison-steps)'})
    restarts: int = field(default=1, metadata={
        'flag': '--poison-restarts', 'help': 'runs per objective and gradient view'})
    objectives: Tuple[str, ...] = field(default=('soft_count',), metadata={
        'flag': '--poison-objectives',
        'help': 'soft_count (victims closest to flipping weigh most), top_m, margin_sum'})
    target_classes: int = field(default=3, metadata={
        'flag': '--poison-target-classes', 'help': 'class-directed runs (victims pushed toward one class), 0: none'})
    anneal: bool = field(default=True, metadata={
        'flag': '--poison-anneal', 'help': 'a run through the soft head annealed toward the hard assignment',
        'action': 'boolean_optional'})
    top_m: int = field(default=5, metadata={
        'flag': '--poison-top-m', 'help': 'victims the top_m objective concentrates on'})
    temperature: float = field(default=0.02, metadata={
        'flag': '--poison-temperature', 'help': "soft_count's sigmoid temperature (logits)"})
    feature_bound: bool = field(default=True, metadata={
        'flag': '--poison-feature-bound', 'action': 'boolean_optional',
        'help': 'also the feature-space bound: k free feature vectors with no image behind them'})

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"{option_label('norm', self.norm, CLI_FLAGS['norm'])}: must be one of {list(NORMS)}")
        check_eps(self.eps, self.norm, 'eps', CLI_FLAGS['eps'])
        check_count(self.steps, 'steps', 1, CLI_FLAGS['steps'], what='PGD steps of each poisoning run within eps')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{option_label('seed', self.seed, CLI_FLAGS['seed'])}: must be an integer")
        check_count(self.unbounded_steps, 'unbounded_steps', 1, CLI_FLAGS['unbounded_steps'], optional=True,
                    what='PGD steps of each unbounded poisoning run; None: 6 x steps')
        check_count(self.restarts, 'restarts', 1, CLI_FLAGS['restarts'],
                    what='runs of each objective through each gradient view')
        objectives = self.objectives
        label = option_label('objectives', objectives, CLI_FLAGS['objectives'])
        if isinstance(objectives, str) or not isinstance(objectives, (tuple, list)) or not objectives:
            raise ValueError(f'{label}: must be a non-empty tuple of names from {list(POISON_OBJECTIVES)}')
        unknown = [o for o in objectives if o not in POISON_OBJECTIVES]
        if unknown or len(set(objectives)) != len(objectives):
            raise ValueError(f'{label}: must be distinct names from {list(POISON_OBJECTIVES)}'
                             + (f' (unknown: {unknown})' if unknown else ' (repeated)'))
        object.__setattr__(self, 'objectives', tuple(objectives))
        check_count(self.target_classes, 'target_classes', 0, CLI_FLAGS['target_classes'],
                    what='class-directed poisoning runs; 0: none')
        check_flag(self.anneal, 'anneal')
        check_count(self.top_m, 'top_m', 1, CLI_FLAGS['top_m'],
                    what='victims closest to flipping that the top_m objective concentrates on')
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"{option_label('temperature', t, CLI_FLAGS['temperature'])}: must be a finite number "
                             "> 0 (the logit scale of the soft_count objective's sigmoid)")
        object.__setattr__(self, 'temperature', float(t))
        check_flag(self.feature_bound, 'feature_bound')

    @property
    def steps_unbounded(self) -> int:
        return 6 * self.steps if self.unbounded_steps is None else self.unbounded_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d['objectives'] = list(self.objectives)
        return d

    def strength(self) -> dict:
        """The settings that decide the attack (all but eps, norm and seed), as recorded in a run folder."""
        d = self.to_dict()
        for key in ('eps', 'norm', 'seed'):
            d.pop(key)
        return d


def _check_k(k, batch_size: int) -> int:
    """A number of poisoned members: at least 1, at most B - 1 (someone must be left to flip)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= batch_size - 1:
        raise ValueError(f'k={k!r}: the number of poisoned members must be an integer in [1, {batch_size - 1}] for '
                         f'a batch of {batch_size} (one poisoned member at least, one untouched member to flip)')
    return int(k)


def poison_counts(batch_size: int) -> List[int]:
    """The numbers k of poisoned members for a batch of ``batch_size``: 1 and each of :data:`POISON_FRACTIONS`
    (rounded half up, at least 1, at most B - 1), without repeats."""
    check_count(batch_size, 'batch_size', 2, CLI_FLAGS['batch_size'],
                what='poisoning needs batches of at least 2 images: one to poison, one to flip')
    ks = [1] + [min(max(1, int(f * batch_size + 0.5)), batch_size - 1) for f in POISON_FRACTIONS]
    return sorted(set(ks))


def _unbounded_eps(x: torch.Tensor, norm: str) -> float:
    """The radius whose ball holds all of [0, 1]: 1 for Linf, the box's diagonal for L2."""
    return 1.0 if norm == 'Linf' else float(x[0].numel()) ** 0.5


def _flag(f) -> str:
    flag = f.metadata['flag']
    return f"{flag}/--no-{flag[2:]}" if f.metadata.get('action') == 'boolean_optional' else flag


#: The ``timm-hpm-evaluate --protocol poison`` flag of each setting (from the fields' metadata): a setting's error
#: names both.
CLI_FLAGS = {**{f.name: _flag(f) for f in fields(PoisonConfig) if 'flag' in f.metadata}, 'batch_size': '--batch-size'}
