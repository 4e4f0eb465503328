"""Batch poisoning: what an attacker who controls some members of a batch can do to the others.

A batch-dependent head (HPM's dynamic head: its batch prototypes are means over the batch) classifies each image
with statistics of the whole batch, so a user who batches untrusted inputs with trusted ones gives the untrusted
ones a say in the trusted ones' predictions. The protocol: in each fixed batch of B images, the attacker controls
k members (drawn at random, seeded) and perturbs them, within eps of their clean images or anywhere in [0, 1]
("unbounded"), to flip the predictions of the B - k untouched members, which are left exactly as they are. The
figure is the fraction of the untouched members classified correctly on the clean batch whose prediction the
poisoned batch flips. A batch-independent model gives exactly 0.

The attack: PGD on the k poisoned images only, ascending the sum over the still-correct untouched members of their
margin (best wrong logit minus true logit, capped at 0 so that flipped members stop pulling), with the gradient of
each ``gradient_views`` model in turn (e.g. the dynamic head through its straight-through estimator, and the soft
head), every iterate scored on the target; the best iterate counts.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence

import torch
from tqdm import tqdm

from ..attacks import ascent_direction, check_count, check_eps, check_images, option_label, project, random_init
from ..attacks._ball import NORMS
from ..report import markdown_table
from ..runfiles import write_text_atomic
from .run_folder import data_fingerprint, model_fingerprint

__all__ = ['POISON_FRACTIONS', 'PoisonConfig', 'poison_counts', 'poison_batch', 'run_poisoning', 'poisoning_table']

#: k/B: one member, then 1%, 5%, 10% and 25% of the batch (rounded, at least one member).
POISON_FRACTIONS = (0.01, 0.05, 0.10, 0.25)

#: The ``recipes/evaluate.py --protocol poison`` flag of each setting: a setting's error names both.
CLI_FLAGS = {'eps': '--eps', 'norm': '--norm', 'steps': '--poison-steps', 'seed': '--seed',
             'batch_size': '--batch-size'}


@dataclass(frozen=True)
class PoisonConfig:
    """The poisoning attack's settings, checked when made: ``eps`` finite and > 0 (at most 1 for Linf, images in
    [0, 1]; the unbounded radius of L2 is the box's diagonal), ``steps`` >= 1 PGD steps (0 would score the random
    start as if it were an attack, a negative number nothing at all), an integer seed. A setting out of its range is
    a ValueError naming it, its value, its ``recipes/evaluate.py`` flag and the valid range. :func:`run_poisoning`
    and :func:`poison_batch` make one from their arguments."""
    eps: float
    norm: str = 'Linf'
    steps: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"{option_label('norm', self.norm, CLI_FLAGS['norm'])}: must be one of {list(NORMS)}")
        check_eps(self.eps, self.norm, 'eps', CLI_FLAGS['eps'])
        check_count(self.steps, 'steps', 1, CLI_FLAGS['steps'], what='PGD steps of each poisoning attack')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{option_label('seed', self.seed, CLI_FLAGS['seed'])}: must be an integer")

    def to_dict(self) -> dict:
        return asdict(self)


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


def poison_batch(target: Callable, gradient_views: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor, k: int,
                 eps: float, norm: str = 'Linf', steps: int = 100, seed: int = 0) -> dict:
    """Poison ``k`` random members of the batch ``x`` to flip the others; returns the members poisoned, the
    untouched members correct on the clean batch (``victims``) and how many of them the best poisoned batch
    flips (``flipped``), per gradient view and overall. ``eps``/``norm``/``steps``/``seed``: as
    :class:`PoisonConfig` checks them (``eps`` may be the unbounded radius, the ball that holds all of [0, 1]);
    ``k`` in [1, B - 1]; ``gradient_views``: at least one."""
    PoisonConfig(eps=eps, norm=norm, steps=steps, seed=seed)
    _check_views(gradient_views)
    check_images(x, y)
    b = x.shape[0]
    _check_k(k, b)
    generator = torch.Generator().manual_seed(seed)
    poisoned = torch.randperm(b, generator=generator)[:k].sort().values.to(x.device)
    untouched = torch.ones(b, dtype=torch.bool, device=x.device)
    untouched[poisoned] = False
    with torch.no_grad():
        victims = untouched & (target(x).argmax(1) == y)
    record = {'k': k, 'poisoned': poisoned.tolist(), 'victims': int(victims.sum()), 'flipped': 0, 'by_view': {}}
    if not bool(victims.any()):
        return record
    for name, view in gradient_views.items():
        flipped = _pgd_poison(target, view, x, y, poisoned, victims, eps, norm, steps, generator)
        record['by_view'][name] = flipped
        record['flipped'] = max(record['flipped'], flipped)
    return record


def _pgd_poison(target, view, x, y, poisoned, victims, eps, norm, steps, generator) -> int:
    """The most victims one PGD run on the poisoned members flips (every iterate scored on the target)."""
    x_clean = x[poisoned]
    xp = random_init(x_clean, eps, norm, generator)
    best = 0
    for t in range(steps + 1):
        xp = xp.detach().requires_grad_(t < steps)
        with torch.set_grad_enabled(t < steps):
            x_batch = x.index_copy(0, poisoned, xp)
            with torch.no_grad():
                best = max(best, int((victims & (target(x_batch).argmax(1) != y)).sum()))
            if t == steps:
                break
            margins = _margin(view(x_batch)[victims], y[victims])
            grad, = torch.autograd.grad(margins.clamp(max=0.0).sum(), xp)
        step = eps / 4 if t < steps // 2 else eps / 8 if t < 3 * steps // 4 else eps / 16
        xp = project(xp.detach() + step * ascent_direction(grad, norm), x_clean, eps, norm)
    return best


def _unbounded_eps(x: torch.Tensor, norm: str) -> float:
    """The radius whose ball holds all of [0, 1]: 1 for Linf, the box's diagonal for L2."""
    return 1.0 if norm == 'Linf' else float(x[0].numel()) ** 0.5


def run_poisoning(target: Callable, gradient_views: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor,
                  batch_size: int, eps: float, out: Path, norm: str = 'Linf', steps: int = 100, seed: int = 0,
                  progress: bool = True) -> List[dict]:
    """The protocol on the fixed batches of ``batch_size`` (in order) of ``x``, for every k of
    :func:`poison_counts` and for ``eps`` and unbounded perturbations. One JSON file per batch under ``out``
    (written atomically): a killed run resumes, skipping finished batches; settings that differ from the
    folder's (settings, model weights or images) are refused. Returns the aggregated records ``{k, eps, bounded,
    flipped_fraction, flipped, victims, batches}``.

    Every setting is checked before the folder is touched (:class:`PoisonConfig`: eps, norm, steps >= 1, seed;
    ``batch_size`` >= 2; at least one gradient view; a non-empty batch of images in [0, 1] with its labels): a
    ValueError naming the setting, never a table of 0% flipped from an attack that did not run."""
    PoisonConfig(eps=eps, norm=norm, steps=steps, seed=seed)
    check_count(batch_size, 'batch_size', 2, CLI_FLAGS['batch_size'],
                what='poisoning needs batches of at least 2 images: one to poison, one to flip')
    _check_views(gradient_views)
    check_images(x, y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {'batch_size': batch_size, 'eps': eps, 'norm': norm, 'steps': steps, 'seed': seed,
                'n_examples': x.shape[0], 'views': list(gradient_views),
                'model_sha256': model_fingerprint(getattr(target, 'model', target)),
                'data_sha256': data_fingerprint(x, y)}
    _check_settings(out / 'settings.json', settings)
    radii = [(eps, True), (_unbounded_eps(x, norm), False)]
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    units = []
    for index, (xb, yb) in enumerate(tqdm(batches, desc='poisoning batches', disable=not progress)):
        path = out / f'batch_{index:05d}.json'
        if path.exists():
            units.append(json.loads(path.read_text()))
            continue
        if xb.shape[0] < 2:
            continue  # a last batch of one image has nobody to poison
        records = [dict(poison_batch(target, gradient_views, xb, yb, k, radius, norm, steps,
                                     seed=seed * 1_000_003 + index * 101 + k), eps=radius, bounded=bounded)
                   for radius, bounded in radii for k in poison_counts(xb.shape[0])]
        unit = {'index': index, 'size': xb.shape[0], 'records': records}
        write_text_atomic(path, json.dumps(unit))
        units.append(unit)
    return _aggregate(units, batch_size)


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        found = json.loads(path.read_text())
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise ValueError(f'{path.parent} holds a poisoning run with other settings ({", ".join(changed)}); use '
                             'another --out folder (its results are never overwritten).')
    else:
        write_text_atomic(path, json.dumps(settings, indent=2))


def _aggregate(units: Iterable[dict], batch_size: int) -> List[dict]:
    totals: Dict[tuple, dict] = {}
    for unit in units:
        for r in unit['records']:
            key = (r['k'], r['eps'], r['bounded'])
            t = totals.setdefault(key, {'k': r['k'], 'batch_size': batch_size, 'eps': r['eps'], 'bounded': r['bounded'],
                                        'flipped': 0, 'victims': 0, 'batches': 0})
            t['flipped'] += r['flipped']
            t['victims'] += r['victims']
            t['batches'] += 1
    rows = sorted(totals.values(), key=lambda t: (not t['bounded'], t['k']))
    for t in rows:
        t['flipped_fraction'] = t['flipped'] / t['victims'] if t['victims'] else 0.0
    return rows


def poisoning_table(rows: Sequence[dict], norm: str = 'Linf') -> str:
    """The Markdown table of :func:`run_poisoning`'s records."""
    body = [[f"{r['k']} of {r['batch_size']}", f"{r['eps']:.4g}" if r['bounded'] else 'unbounded ([0, 1])',
             f"{100 * r['flipped_fraction']:.1f}%", f"{r['flipped']} / {r['victims']}"] for r in rows]
    return markdown_table(['poisoned members (k of B)', f'{norm} eps of the poisoned', 'untouched flipped',
                           'flipped / untouched correct'], body)
