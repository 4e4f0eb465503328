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

The options: :mod:`.poison_config`; one batch's state and objectives: :mod:`.poison_state`; the protocol over a
dataset's fixed batches and its table: :mod:`.poison_run`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

from ..attacks import check_images, project, random_init
from .poison_config import POISON_FRACTIONS, POISON_OBJECTIVES, PoisonConfig, _check_k, _unbounded_eps, poison_counts
from .poison_state import _Batch, _check_views, _margin, _objective

__all__ = ['POISON_FRACTIONS', 'POISON_OBJECTIVES', 'PoisonConfig', 'poison_counts', 'poison_batch', 'run_poisoning',
           'poisoning_table']


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



# the protocol over a dataset's batches, here for ``from timm_hpm.eval.poison import ...`` (it imports poison_batch)
from .poison_run import _aggregate, poisoning_table, run_poisoning  # noqa: E402,F401
