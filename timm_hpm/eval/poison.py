"""Batch poisoning: what an attacker who controls some members of a batch can do to the others.

A batch-dependent head (HPM's dynamic head: its batch prototypes are means over the batch) classifies each image
with statistics of the whole batch, so a user who batches untrusted inputs with trusted ones gives the untrusted
ones a say in the trusted ones' predictions. The protocol: in each fixed batch of B images, the attacker controls
k members (drawn at random, seeded) and perturbs them, within eps of their clean images or anywhere in [0, 1]
("unbounded"), to flip the predictions of the B - k untouched members, which are left exactly as they are. The
figure is the fraction of the untouched members classified correctly on the clean batch (the victims) whose
prediction the poisoned batch flips, the poisoned batch evaluated whole by the target. A batch-independent model
gives exactly 0.

The attack (v2, :class:`PoisonConfig` holds every strength option) runs several PGD runs on the k poisoned images
and keeps the realised batch that flips the most victims over all of them (every iterate is scored on the target,
each run's best batch is scored again whole through the target's own forward):

- objectives (``objectives``): ``margin_sum``, the sum over the victims of their margin (best wrong logit minus
  true logit) capped at 0 (v1's attack, which lets the hardest victims dominate); ``soft_count``, the sum of
  ``sigmoid(margin / temperature)``, a smooth count of flipped victims that weights the victims closest to flipping
  most; ``top_m``, the capped margins of the ``top_m`` still-correct victims closest to flipping only;
- each objective through each gradient view (e.g. the dynamic head through its straight-through estimator, and the
  soft head), ``restarts`` times (random starts, then the clean images);
- ``anneal``: the soft head with its temperature annealed from the head's tau toward the hard assignment of the
  dynamic head (HPM heads);
- ``target_classes`` class-directed runs: for the classes that the victims closest to flipping are closest to, the
  poisoned members start as batch images the FC head assigns to that class (projected into the ball), are kept
  assigned to it, and push the victims toward it (``soft_count`` on the margin toward the class plus the untargeted
  one);
- schedules: ``steps`` per run within eps, ``unbounded_steps`` (default 6 x ``steps``) unbounded (half of it for
  the class-directed runs); Adam-normalised ascent steps, cosine step-size decay.

For an HPM model whose features are per-sample (eval mode), the untouched members' pre-logit features are computed
once and only the k poisoned images go through the backbone at each step (the head sees the whole batch); the
realised batch is scored through the target's full forward. ``feature_bound``: the same objectives on k free
pre-logit feature vectors with no image behind them (the starts include the realised batch's poisoned features):
what k poisoned members could do at most if any feature vector were reachable, an upper bound on any image attack
only up to the optimiser finding the relaxed optimum, reported beside the realised figure.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..attacks import check_count, check_eps, check_flag, check_images, option_label, project, random_init
from ..attacks._ball import NORMS
from ..report import markdown_table
from .run_folder import data_fingerprint, model_fingerprint
from .run_header import make_header, read_run_settings
from .settings_schema import comparable
from .unit_store import POISON_FILE, read_poison_batches, write_header, write_poison_batch

__all__ = ['POISON_FRACTIONS', 'POISON_OBJECTIVES', 'PoisonConfig', 'poison_counts', 'poison_batch', 'run_poisoning',
           'poisoning_table']

#: k/B: one member, then 1%, 5%, 10% and 25% of the batch (rounded, at least one member).
POISON_FRACTIONS = (0.01, 0.05, 0.10, 0.25)

#: The objectives the attack ascends (see the module's docstring).
POISON_OBJECTIVES = ('margin_sum', 'soft_count', 'top_m')

#: The ``recipes/evaluate.py --protocol poison`` flag of each setting: a setting's error names both.
CLI_FLAGS = {'eps': '--eps', 'norm': '--norm', 'steps': '--poison-steps', 'seed': '--seed',
             'batch_size': '--batch-size', 'unbounded_steps': '--poison-unbounded-steps',
             'restarts': '--poison-restarts', 'objectives': '--poison-objectives',
             'target_classes': '--poison-target-classes', 'anneal': '--poison-anneal/--no-poison-anneal',
             'top_m': '--poison-top-m', 'temperature': '--poison-temperature',
             'feature_bound': '--poison-feature-bound/--no-poison-feature-bound'}


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
        'flag': '--poison-steps', 'help': 'with --protocol poison: PGD steps of each poisoning run within eps'})
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


def _check_views(gradient_views) -> None:
    if not isinstance(gradient_views, dict) or not gradient_views:
        raise ValueError('gradient_views must name at least one model whose gradient the attack follows '
                         f'(a dict name -> model), got {gradient_views!r}; without one nothing is attacked')


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float('-inf')).amax(1)
    return wrong - true


def _objective(name: str, margins: torch.Tensor, cfg: PoisonConfig) -> torch.Tensor:
    """What a run ascends, from the victims' margins (> 0: flipped)."""
    if name == 'margin_sum':
        return margins.clamp(max=0.0).sum()
    if name == 'soft_count':
        return torch.sigmoid(margins / cfg.temperature).sum()
    # top_m: the still-correct victims closest to flipping (the flipped ones stay out: their margin is capped)
    still = margins.detach() < 0
    if not bool(still.any()):
        return margins.sum() * 0.0
    ranked = margins.detach().masked_fill(~still, float('-inf'))
    chosen = ranked.topk(min(cfg.top_m, int(still.sum()))).indices
    return margins[chosen].clamp(max=0.0).sum()


# ---------------------------------------------------------------------------------------------- the batch's forward
class _Batch:
    """One batch with its poisoned members and victims: the logits of a poisoned batch through a gradient view and
    through the target. With an HPM model whose backbone is per-sample (``fast``), the clean members' pre-logit
    features are computed once and the head runs on the whole batch's features."""

    def __init__(self, target, views, x, y, poisoned, victims, clean_logits):
        self.target, self.views, self.x, self.y = target, views, x, y
        self.poisoned, self.victims = poisoned, victims
        self.y_victims = y[victims]
        self.fast = False
        self.head = None
        self.num_classes = clean_logits.shape[1]
        self._setup_fast(clean_logits)

    # -- the per-sample path of an HPM model
    def _setup_fast(self, clean_logits) -> None:
        from ..models import get_hpm_head, is_hpm_model
        from .views import ModelView
        target = self.target
        if not isinstance(target, ModelView) or target.amp or target.mode is None:
            return
        model = getattr(target.model, 'module', target.model)
        if not is_hpm_model(model) or model.training or model.hpm_head is None:
            return
        modes = {}
        for name, view in self.views.items():
            if not isinstance(view, ModelView) or view.model is not target.model or view.amp or view.mode is None:
                return
            modes[name] = view.mode
        self.model, self.head, self.modes = model, get_hpm_head(model), modes
        with torch.no_grad():
            feats = self.features(self.x)
            alone = self.features(self.x[self.poisoned])
            logits = self.head_logits(feats, target.mode)
        if not (torch.allclose(alone, feats[self.poisoned], rtol=1e-4, atol=1e-4)
                and torch.allclose(logits, clean_logits, rtol=1e-4, atol=1e-4)
                and bool((logits.argmax(1) == clean_logits.argmax(1)).all())):
            self.head = None  # features depend on the batch or the head on more than them: the whole-image path
            return
        self.fast, self.clean_features = True, feats

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True).float()

    def head_logits(self, feats: torch.Tensor, mode: str, tau: Optional[float] = None) -> torch.Tensor:
        with self.head.using_mode(mode), _head_tau(self.head, tau):
            return self.head(feats).float()

    def batch_features(self, xp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fp = self.features(xp)
        return self.clean_features.index_copy(0, self.poisoned, fp), fp

    # -- what a run needs at each step
    def logits(self, xp: torch.Tensor, view: str, tau: Optional[float] = None):
        """(logits through ``view`` (with grad), the target's logits (no grad), the poisoned members' FC logits or
        None). ``view``: a gradient view's name, or ``'anneal'`` (the soft head at temperature ``tau``)."""
        if self.fast:
            feats, fp = self.batch_features(xp)
            mode = 'soft' if view == 'anneal' else self.modes[view]
            out = self.head_logits(feats, mode, tau if view == 'anneal' else None)
            if mode == self.target.mode and view != 'anneal':
                scored = out.detach()
            else:
                with torch.no_grad():
                    scored = self.head_logits(feats.detach(), self.target.mode)
            return out, scored, self.head.fc_forward(fp)
        x_batch = self.x.index_copy(0, self.poisoned, xp)
        out = self.views[view](x_batch).float()
        if self.views[view] is self.target:
            scored = out.detach()
        else:
            with torch.no_grad():
                scored = self.target(x_batch).float()
        return out, scored, None

    def flipped(self, scored: torch.Tensor) -> int:
        return int((self.victims & (scored.argmax(1) != self.y)).sum())

    def realised(self, xp: torch.Tensor) -> int:
        """Victims flipped by the poisoned batch evaluated whole by the target (its own forward on the images)."""
        with torch.no_grad():
            return self.flipped(self.target(self.x.index_copy(0, self.poisoned, xp)).float())


@contextlib.contextmanager
def _head_tau(head, tau: Optional[float]):
    """The head's temperature set to ``tau`` for a forward (its checked setter), restored after."""
    if tau is None:
        yield
        return
    previous = head.tau
    head.tau = float(tau)
    try:
        yield
    finally:
        head.tau = previous


# ----------------------------------------------------------------------------------------------------- the attack
def poison_batch(target: Callable, gradient_views: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor, k: int,
                 eps: float, norm: str = 'Linf', steps: int = 100, seed: int = 0, **options) -> dict:
    """Poison ``k`` random members of the batch ``x`` to flip the others; returns the members poisoned, the
    untouched members correct on the clean batch (``victims``), how many of them the best realised poisoned batch
    flips (``flipped``, the batch evaluated whole by ``target``), each run's count (``by_run``), the run that gave
    the best batch and, where it was computed, the feature-space bound (``feature_bound``). ``eps``/``norm``/
    ``steps``/``seed`` and ``options`` (the other :class:`PoisonConfig` fields): as :class:`PoisonConfig` checks
    them; ``eps`` may be the unbounded radius (the ball that holds all of [0, 1]: the runs then take
    ``unbounded_steps``); ``k`` in [1, B - 1]; ``gradient_views``: at least one."""
    cfg = PoisonConfig(eps=eps, norm=norm, steps=steps, seed=seed, **options)
    _check_views(gradient_views)
    check_images(x, y)
    b = x.shape[0]
    _check_k(k, b)
    generator = torch.Generator().manual_seed(seed)
    poisoned = torch.randperm(b, generator=generator)[:k].sort().values.to(x.device)
    untouched = torch.ones(b, dtype=torch.bool, device=x.device)
    untouched[poisoned] = False
    with torch.no_grad():
        clean_logits = target(x).float()
    victims = untouched & (clean_logits.argmax(1) == y)
    record = {'k': k, 'poisoned': poisoned.tolist(), 'victims': int(victims.sum()), 'flipped': 0, 'best_run': None,
              'by_run': {}}
    if not bool(victims.any()):
        return record
    bounded = eps < _unbounded_eps(x, norm)
    batch = _Batch(target, gradient_views, x, y, poisoned, victims, clean_logits)
    record['fast'] = batch.fast
    best_xp = x[poisoned].clone()
    for run in _plan(batch, cfg, clean_logits):
        count, xp = _run(batch, cfg, run, eps, norm, bounded, generator)
        record['by_run'][run['name']] = count
        if count > record['flipped']:
            record['flipped'], record['best_run'], best_xp = count, run['name'], xp
    if cfg.feature_bound and batch.fast:
        record['feature_bound'] = max(record['flipped'], _feature_bound(batch, cfg, best_xp, clean_logits))
    return record


def _plan(batch: _Batch, cfg: PoisonConfig, clean_logits: torch.Tensor) -> List[dict]:
    """The runs of one attack: each objective through each view, ``restarts`` times; the annealed run; the
    class-directed runs."""
    runs = []
    for r in range(cfg.restarts):
        start = 'random' if r % 2 == 0 else 'clean'
        for objective in cfg.objectives:
            for view in batch.views:
                runs.append({'name': f'{objective}/{view}/{start}{r}', 'objective': objective, 'view': view,
                             'start': start})
    first = next(iter(batch.views))
    dynamic = next((v for v, mode in getattr(batch, 'modes', {}).items() if mode == batch.target.mode), first)
    if cfg.anneal and batch.fast:
        runs.append({'name': 'soft_count/anneal', 'objective': 'soft_count', 'view': 'anneal', 'start': 'clean'})
    for c in _directed_classes(batch, clean_logits, cfg.target_classes):
        runs.append({'name': f'class_{c}/{dynamic}', 'objective': 'soft_count', 'view': dynamic, 'start': 'class',
                     'cls': c})
    return runs


def _directed_classes(batch: _Batch, clean_logits: torch.Tensor, n: int) -> List[int]:
    """The ``n`` classes that the victims closest to flipping are closest to: the runner-up classes of the tenth
    of the victims with the largest margins (at least 5 of them), the class of the victim closest to flipping first
    (ties: the class more of them are closest to)."""
    if n == 0:
        return []
    logits = clean_logits[batch.victims]
    yv = batch.y_victims
    margins = _margin(logits, yv)
    runner_up = logits.scatter(1, yv[:, None], float('-inf')).argmax(1)
    close = margins.argsort(descending=True)[:max(5, logits.shape[0] // 10)]
    counts = torch.bincount(runner_up[close], minlength=batch.num_classes).float()
    best = torch.full((batch.num_classes,), float('-inf')).scatter_reduce(
        0, runner_up[close].cpu(), margins[close].cpu(), 'amax')
    order = sorted(range(batch.num_classes), key=lambda c: (-best[c].item(), -counts[c].item(), c))
    return [c for c in order[:n] if counts[c] > 0] or order[:1]


def _start(batch: _Batch, run: dict, eps: float, norm: str, generator) -> torch.Tensor:
    x_clean = batch.x[batch.poisoned]
    if run['start'] == 'clean':
        return x_clean.clone()
    if run['start'] == 'class':  # batch images the target assigns to the class, cycled, projected into the ball
        with torch.no_grad():
            donors = (batch.target(batch.x).argmax(1) == run['cls']).nonzero().squeeze(1)
        if donors.numel():
            pick = donors[torch.randperm(donors.numel(), generator=generator)]
            pick = pick.repeat(-(-x_clean.shape[0] // pick.numel()))[:x_clean.shape[0]]
            return project(batch.x[pick], x_clean, eps, norm)
    return random_init(x_clean, eps, norm, generator)


def _run(batch: _Batch, cfg: PoisonConfig, run: dict, eps: float, norm: str, bounded: bool, generator
         ) -> Tuple[int, torch.Tensor]:
    """One PGD run on the poisoned members: its best realised batch's count (scored whole by the target) and its
    poisoned images. Adam-normalised ascent steps, cosine step-size decay; the annealed run lowers the soft head's
    temperature geometrically from the head's tau to a hundredth of it."""
    steps = cfg.steps if bounded else cfg.steps_unbounded if run['start'] != 'class' else \
        max(1, cfg.steps_unbounded // 2)
    x_clean = batch.x[batch.poisoned]
    xp = _start(batch, run, eps, norm, generator)
    first, second = torch.zeros_like(xp), torch.zeros_like(xp)
    eta0 = eps / 4 if bounded else eps / 10
    tau0 = batch.head.tau if batch.head is not None else 1.0
    cls = run.get('cls')
    best, best_xp = -1, xp.clone()
    for t in range(steps + 1):
        xp = xp.detach().requires_grad_(t < steps)
        with torch.set_grad_enabled(t < steps):
            tau = tau0 * 0.01 ** (t / steps) if run['view'] == 'anneal' else None
            out, scored, fc = batch.logits(xp, run['view'], tau)
            count = batch.flipped(scored)
            if count > best:
                best, best_xp = count, xp.detach().clone()
            if t == steps:
                break
            logits = out[batch.victims]
            margins = _margin(logits, batch.y_victims)
            loss = _objective(run['objective'], margins, cfg)
            if cls is not None:
                other = batch.y_victims != cls
                toward = logits[other, cls] - logits[other].gather(1, batch.y_victims[other][:, None]).squeeze(1)
                loss = loss + _objective('soft_count', toward, cfg)
                if fc is not None:  # keep the poisoned members assigned to the class
                    loss = loss + _margin(fc, torch.full_like(batch.poisoned, cls)).neg().clamp(max=1.0).sum()
            grad, = torch.autograd.grad(loss, xp, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(xp)
        first.mul_(0.9).add_(grad, alpha=0.1)
        second.mul_(0.999).addcmul_(grad, grad, value=0.001)
        direction = (first / (1 - 0.9 ** (t + 1))) / ((second / (1 - 0.999 ** (t + 1))).sqrt() + 1e-12)
        if norm == 'Linf':
            direction = direction.clamp(-1.0, 1.0)
        else:
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (xp.ndim - 1))
        eta = eta0 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t / steps)))
        xp = project(xp.detach() + eta * direction, x_clean, eps, norm)
    if best > 0:
        best = batch.realised(best_xp)  # the count is the target's, on the whole poisoned batch
    return best, best_xp


def _feature_bound(batch: _Batch, cfg: PoisonConfig, best_xp: torch.Tensor, clean_logits: torch.Tensor) -> int:
    """The most victims k free pre-logit feature vectors (no image behind them) flip, found by Adam on the
    soft_count objective through the target head from the realised batch's poisoned features, the clean ones and
    features of the members assigned to each directed class."""
    with torch.no_grad():
        starts = [batch.features(best_xp), batch.clean_features[batch.poisoned].clone()]
        predicted = clean_logits.argmax(1)
        for c in _directed_classes(batch, clean_logits, max(cfg.target_classes, 1)):
            donors = (predicted == c).nonzero().squeeze(1)
            if donors.numel():
                starts.append(batch.clean_features[donors[torch.arange(batch.poisoned.numel()) % donors.numel()]])
        lr = float(batch.clean_features.pow(2).mean().sqrt()) or 1.0
    steps = cfg.steps_unbounded
    best = 0
    for start in starts:
        fp = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([fp], lr=lr)
        for t in range(steps + 1):
            feats = batch.clean_features.index_copy(0, batch.poisoned, fp)
            logits = batch.head_logits(feats, batch.target.mode)
            best = max(best, batch.flipped(logits.detach()))
            if t == steps:
                break
            loss = -_objective('soft_count', _margin(logits[batch.victims], batch.y_victims), cfg)
            fp.grad, = torch.autograd.grad(loss, fp)
            for group in optimiser.param_groups:
                group['lr'] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (t + 1) / steps)))
            optimiser.step()
    return best


def _unbounded_eps(x: torch.Tensor, norm: str) -> float:
    """The radius whose ball holds all of [0, 1]: 1 for Linf, the box's diagonal for L2."""
    return 1.0 if norm == 'Linf' else float(x[0].numel()) ** 0.5


def run_poisoning(target: Callable, gradient_views: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor,
                  batch_size: int, eps: float, out: Path, norm: str = 'Linf', steps: int = 100, seed: int = 0,
                  progress: bool = True, **options) -> List[dict]:
    """The protocol on the fixed batches of ``batch_size`` (in order) of ``x``, for every k of
    :func:`poison_counts` and for ``eps`` and unbounded perturbations. One line per finished batch in
    ``out/batches.jsonl`` (:mod:`timm_hpm.eval.unit_store`: whole, fsync-ed): a killed run resumes, skipping
    finished batches; settings that differ from the folder's (every attack setting, model weights or images) are
    refused. Returns the aggregated records ``{k, eps,
    bounded, flipped_fraction, flipped, victims, batches}``, with ``feature_bound`` (the sum over the batches) where
    every batch computed it.

    Every setting is checked before the folder is touched (:class:`PoisonConfig`: eps, norm, steps >= 1, seed and
    the strength ``options``; ``batch_size`` >= 2; at least one gradient view; a non-empty batch of images in [0, 1]
    with its labels): a ValueError naming the setting, never a table of 0% flipped from an attack that did not
    run."""
    cfg = PoisonConfig(eps=eps, norm=norm, steps=steps, seed=seed, **options)
    check_count(batch_size, 'batch_size', 2, CLI_FLAGS['batch_size'],
                what='poisoning needs batches of at least 2 images: one to poison, one to flip')
    _check_views(gradient_views)
    check_images(x, y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {'batch_size': batch_size, 'eps': eps, 'norm': norm, 'steps': steps, 'seed': seed,
                'n_examples': x.shape[0], 'views': list(gradient_views), 'attack_version': 2,
                'attack': cfg.strength(),
                'model_sha256': model_fingerprint(getattr(target, 'model', target)),
                'data_sha256': data_fingerprint(x, y)}
    _check_settings(out, settings)
    strength = {k: v for k, v in cfg.to_dict().items() if k not in ('eps', 'norm', 'steps', 'seed')}
    radii = [(eps, True), (_unbounded_eps(x, norm), False)]
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    units, done = [], read_poison_batches(out)
    for index, (xb, yb) in enumerate(tqdm(batches, desc='poisoning batches', disable=not progress)):
        if index in done:
            units.append(done[index])
            continue
        if xb.shape[0] < 2:
            continue  # a last batch of one image has nobody to poison
        records = [dict(poison_batch(target, gradient_views, xb, yb, k, radius, norm, steps,
                                     seed=seed * 1_000_003 + index * 101 + k, **strength), eps=radius,
                        bounded=bounded)
                   for radius, bounded in radii for k in poison_counts(xb.shape[0])]
        unit = {'index': index, 'size': xb.shape[0], 'records': records}
        write_poison_batch(out, unit)
        units.append(unit)
    return _aggregate(units, batch_size)


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a folder of a poisoning run with other settings (any schema version this code reads); a new run
    writes its settings in the header of its batches file (:mod:`timm_hpm.eval.run_header`; they hold the model's
    and the images' fingerprints)."""
    stored = read_run_settings(out)
    if stored is not None:
        found = comparable(stored)
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            if 'attack' in changed and isinstance(found.get('attack'), dict):
                changed += sorted(f'attack.{k}' for k in set(found['attack']) | set(settings['attack'])
                                  if found['attack'].get(k) != settings['attack'].get(k))
            raise ValueError(f'{out} holds a poisoning run with other settings ({", ".join(changed)}); use '
                             'another --out folder (its results are never overwritten).')
    else:
        write_header(out / POISON_FILE, make_header(settings))


def _aggregate(units: Iterable[dict], batch_size: int) -> List[dict]:
    totals: Dict[tuple, dict] = {}
    for unit in units:
        for r in unit['records']:
            key = (r['k'], r['eps'], r['bounded'])
            t = totals.setdefault(key, {'k': r['k'], 'batch_size': batch_size, 'eps': r['eps'], 'bounded': r['bounded'],
                                        'flipped': 0, 'victims': 0, 'batches': 0, 'feature_bound': 0})
            t['flipped'] += r['flipped']
            t['victims'] += r['victims']
            t['batches'] += 1
            t.setdefault('_bounds', 0)
            if 'feature_bound' in r:
                t['_bounds'] += 1
            if t['feature_bound'] is not None:
                t['feature_bound'] = None if r['victims'] and 'feature_bound' not in r else \
                    t['feature_bound'] + r.get('feature_bound', 0)
    rows = sorted(totals.values(), key=lambda t: (not t['bounded'], t['k']))
    for t in rows:
        t['flipped_fraction'] = t['flipped'] / t['victims'] if t['victims'] else 0.0
        if t.pop('_bounds') == 0 or t['feature_bound'] is None:
            t.pop('feature_bound')
    return rows


def poisoning_table(rows: Sequence[dict], norm: str = 'Linf') -> str:
    """The Markdown table of :func:`run_poisoning`'s records; with the feature-space bound where it was computed
    (k free feature vectors with no image behind them: what the poisoned members could do at most)."""
    bound = any('feature_bound' in r for r in rows)
    body = [[f"{r['k']} of {r['batch_size']}", f"{r['eps']:.4g}" if r['bounded'] else 'unbounded ([0, 1])',
             f"{100 * r['flipped_fraction']:.1f}%", f"{r['flipped']} / {r['victims']}"]
            + ([f"{r['feature_bound']} / {r['victims']}" if 'feature_bound' in r else '-'] if bound else [])
            for r in rows]
    return markdown_table(['poisoned members (k of B)', f'{norm} eps of the poisoned', 'untouched flipped',
                           'flipped / untouched correct']
                          + (['feature-space bound (no image behind the k)'] if bound else []), body)
