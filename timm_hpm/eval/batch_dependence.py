"""Does a model's prediction for an image depend on the rest of its batch? A cheap test on clean images.

A batch-independent model (every image classified from itself alone) gets a valid robustness figure from standard
AutoAttack. A batch-dependent one (an HPM dynamic head, batch norm with test-batch statistics, any test-time
adaptation over the batch) does not: AutoAttack attacks and re-batches images as if the others did not move, and a
batch can be poisoned. :func:`batch_dependence` measures, on a few hundred clean images, how much the logits and
predictions change when the same images are scored

* again, in the same batches (``repeat``: a change here means the model is not deterministic);
* in batches of other sizes (``batch_size_1``, ``batch_size_32``, ...; the reference is batches of ``batch_size``
  in the given order);
* in a seeded random order (``permuted``) and in label order (``class_sorted``: the order a class-folder dataset
  yields; needs the labels), batched at ``batch_size``;
* with the other members of their batch changed (``other_members``: the first half of each batch kept, the rest
  replaced by other clean images, or by copies of the kept ones when the images make a single batch).

Each test reports the fraction of predictions that changed and the largest absolute logit change. A test flags
batch dependence when its largest logit change exceeds the float tolerance ``atol + rtol * max|reference logit|``
(convolution kernels may round differently at other batch sizes: a batch-independent model can move by ~1e-6,
never by the tolerance). A batch-independent model gives zero prediction changes everywhere.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .batching import make_batchings
from .checks import check_eval_ready

__all__ = ['batch_dependence', 'check_clean_images', 'check_logits', 'DEFAULT_BATCH_SIZES']

#: The other batch sizes the test re-batches at, beside the reference batch size.
DEFAULT_BATCH_SIZES = (1, 32)


def check_clean_images(x, y=None, num_classes: Optional[int] = None, what: str = 'images') -> None:
    """Images as every evaluation here takes them: a float tensor (N, C, H, W) with values in [0, 1], no NaN or inf;
    labels (when given) an integer tensor (N,) of class indices. A ValueError that says what to do otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f'{what} must be a torch.Tensor of shape (N, C, H, W) with values in [0, 1], got '
                         f'{type(x).__name__}; convert with torch.as_tensor(...) (and .permute(0, 3, 1, 2) for '
                         'channels-last arrays)')
    if x.ndim != 4:
        hint = ('a single image (C, H, W)? add the batch dimension: x.unsqueeze(0); grey images (N, H, W)? add the '
                'channel dimension: x.unsqueeze(1)') if x.ndim == 3 else 'reshape it to (N, C, H, W)'
        raise ValueError(f'{what} must have shape (N, C, H, W), got {tuple(x.shape)}; {hint}')
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f'{what} are empty (shape {tuple(x.shape)}); pass at least one image')
    if not x.is_floating_point():
        hint = ' (8-bit images: x.float() / 255)' if x.dtype == torch.uint8 else ''
        raise ValueError(f'{what} must be a floating-point tensor with values in [0, 1], got {x.dtype}; convert with '
                         f'x.float(){hint}')
    finite = torch.isfinite(x.flatten(1)).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(f'{what} hold NaN or inf values (in images {bad}{"..." if int((~finite).sum()) > 5 else ""}); '
                         'drop or repair those images first')
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f'{what} must lie in [0, 1] (eps is measured in that range), got values in [{lo:.3g}, '
                         f'{hi:.3g}]; pass unnormalised images and put the normalisation inside the model '
                         '(timm_hpm.attacks.normalized_view(model) does it for a timm model)')
    if y is None:
        return
    if not isinstance(y, torch.Tensor):
        raise ValueError(f'labels must be a torch.Tensor of shape ({x.shape[0]},), got {type(y).__name__}; convert '
                         'with torch.as_tensor(labels)')
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f'labels must be an integer tensor of class indices, got {y.dtype}; one-hot labels: '
                         'y.argmax(1); float indices: y.long()')
    if y.shape != (x.shape[0],):
        hint = '; one-hot or per-class labels: y.argmax(1)' if y.ndim == 2 and y.shape[0] == x.shape[0] else ''
        raise ValueError(f'labels must have shape ({x.shape[0]},) (one class index per image), got '
                         f'{tuple(y.shape)}{hint}')
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f'labels must lie in [0, {num_classes - 1}] (the model has {num_classes} classes), got '
                         f'[{int(y.min())}, {int(y.max())}]')


def check_logits(logits, n: int, what: str = 'the model') -> torch.Tensor:
    """``logits`` if it is a float tensor (n, K) with K >= 2 and no NaN or inf, else a ValueError that says what
    the model must return."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f'{what} must return a logits tensor of shape (N, num_classes), got {type(logits).__name__}; '
                         'wrap it so that forward returns the logits only (e.g. out.logits or out[0])')
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise ValueError(f'{what} must return logits of shape ({n}, num_classes) for {n} images, got '
                         f'{tuple(logits.shape)}; a feature extractor (num_classes=0) cannot be benchmarked')
    if not logits.is_floating_point():
        raise ValueError(f'{what} must return floating-point logits, got {logits.dtype}')
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f'{what} returned NaN or inf logits on clean images; check its weights and inputs '
                         '(images in [0, 1], its normalisation inside)')
    return logits


@torch.no_grad()
def _logits(model: Callable, x: torch.Tensor, batches: Sequence[List[int]]) -> torch.Tensor:
    """The logits of every image of ``x``, each computed in its batch (one forward per batch), in x's order."""
    out: Optional[torch.Tensor] = None
    for idx in batches:
        logits = check_logits(model(x[idx]), len(idx)).float()
        if out is None:
            out = logits.new_zeros(x.shape[0], logits.shape[1])
        out[torch.as_tensor(idx, device=out.device)] = logits
    return out


def _compare(name: str, description: str, reference: torch.Tensor, other: torch.Tensor,
             rows: Optional[torch.Tensor], tolerance: float) -> dict:
    if rows is not None:
        reference, other = reference[rows], other[rows]
    change = float((other - reference).abs().max()) if reference.numel() else 0.0
    changed = int((other.argmax(1) != reference.argmax(1)).sum())
    return {'description': description, 'compared': int(reference.shape[0]), 'changed': changed,
            'fraction_changed': changed / max(int(reference.shape[0]), 1), 'max_logit_change': change,
            'dependent': change > tolerance}


def _check_arguments(model: Callable, x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int,
                     batch_sizes: Sequence[int], rtol: float, atol: float) -> None:
    """Every check of :func:`batch_dependence`'s arguments before the model runs: a ValueError that says what is
    wrong (a module not in eval mode, images or labels as :func:`check_clean_images` wants them, the batch sizes,
    the tolerance)."""
    if isinstance(model, nn.Module):
        check_eval_ready(model)
    check_clean_images(x, y)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be an integer >= 1 (the reference batch size), got {batch_size!r}')
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f'batch_sizes must be integers >= 1, got {list(batch_sizes)}')
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f'rtol and atol must be >= 0, got {rtol}, {atol}')


def _cut(order: Sequence[int], size: int) -> List[List[int]]:
    """``order`` cut into consecutive batches of ``size`` (the last one shorter when it does not divide)."""
    order = list(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def batch_dependence(model: Callable, x: torch.Tensor, y: Optional[torch.Tensor] = None, batch_size: int = 128,
                     batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, seed: int = 0, rtol: float = 1e-4,
                     atol: float = 1e-5) -> dict:
    """Whether ``model``'s predictions on the clean images ``x`` (in [0, 1]) depend on their batch.

    Args:
        model: an ``nn.Module`` in eval mode (or any callable) taking [0, 1] images, returning (N, K) logits.
        x, y: a few hundred clean images (N, C, H, W) and, optionally, their labels (for the ``class_sorted``
            test).
        batch_size: the reference batch size B (the evaluation's); the images are scored in batches of B in their
            order, and every test is compared with that.
        batch_sizes: the other batch sizes to re-batch at (default 1 and 32; B itself is the reference).
        seed: the ``permuted`` order and the ``other_members`` draw.
        rtol, atol: the float tolerance of a logit change (``atol + rtol * max|reference logit|``).

    Returns ``batch_dependent`` (any test beyond tolerance), ``deterministic`` (the ``repeat`` test within
    tolerance), ``verdict`` (``'batch-dependent'``, ``'batch-independent'`` or ``'nondeterministic'``),
    ``reasons`` (the tests that flagged it), ``tests`` (per test: ``description``, ``compared`` images,
    ``changed`` predictions, ``fraction_changed``, ``max_logit_change``, ``dependent``), ``tolerance``,
    ``n_images``, ``batch_size`` and ``forward_images`` (its cost).
    """
    _check_arguments(model, x, y, batch_size, batch_sizes, rtol, atol)
    n = x.shape[0]
    forward = [0]

    def run(images: torch.Tensor, batches: Sequence[List[int]]) -> torch.Tensor:
        forward[0] += sum(len(b) for b in batches)
        return _logits(model, images, batches)

    reference = run(x, _cut(range(n), batch_size))
    if y is not None and int(y.min()) >= 0 and int(y.max()) >= reference.shape[1]:
        raise ValueError(f'labels must lie in [0, {reference.shape[1] - 1}] (the model returns '
                         f'{reference.shape[1]} logits), got up to {int(y.max())}')
    tolerance = atol + rtol * float(reference.abs().max())
    tests: Dict[str, dict] = {}
    tests['repeat'] = _compare('repeat', f'the same batches of {batch_size} again', reference,
                               run(x, _cut(range(n), batch_size)), None, tolerance)
    for size in dict.fromkeys(batch_sizes):
        if size != batch_size:
            tests[f'batch_size_{size}'] = _compare(f'batch_size_{size}', f're-batched at {size} (same order)',
                                                   reference, run(x, _cut(range(n), size)), None, tolerance)
    orders = make_batchings(n, batch_size, ['shuffled'] + (['class_sorted'] if y is not None else []), seed,
                            labels=y)
    tests['permuted'] = _compare('permuted', f'a seeded random order, batches of {batch_size}', reference,
                                 run(x, orders['shuffled']), None, tolerance)
    if y is not None:
        tests['class_sorted'] = _compare('class_sorted', f'label order (a class-folder dataset), batches of '
                                         f'{batch_size}', reference, run(x, orders['class_sorted']), None, tolerance)
    tests['other_members'] = _other_members(run, x, reference, _cut(range(n), batch_size), seed, tolerance)
    reasons = [name for name, t in tests.items() if t['dependent'] and name != 'repeat']
    deterministic = not tests['repeat']['dependent']
    verdict = 'nondeterministic' if not deterministic else 'batch-dependent' if reasons else 'batch-independent'
    return {'verdict': verdict, 'batch_dependent': bool(reasons), 'deterministic': deterministic, 'reasons': reasons,
            'tests': tests, 'tolerance': tolerance, 'rtol': rtol, 'atol': atol, 'n_images': n,
            'batch_size': batch_size, 'seed': seed, 'forward_images': forward[0]}


def _other_members(run, x: torch.Tensor, reference: torch.Tensor, batches: List[List[int]], seed: int,
                   tolerance: float) -> dict:
    """Each batch's first half kept, its other members replaced by other clean images (drawn, seeded, from the
    images outside the batch; copies of the kept ones when there are none); the kept images are compared."""
    g = torch.Generator().manual_seed(seed + 104729)
    n = x.shape[0]
    kept_rows, logits = [], []
    for idx in batches:
        if len(idx) < 2:
            continue  # a batch of one has no other member
        keep = idx[:(len(idx) + 1) // 2]
        slots = len(idx) - len(keep)
        outside = torch.tensor(sorted(set(range(n)) - set(idx)), dtype=torch.long)
        pool = outside if len(outside) else torch.tensor(keep, dtype=torch.long)
        pick = pool[torch.randperm(len(pool), generator=g)[:slots]] if len(pool) >= slots else \
            pool[torch.randint(len(pool), (slots,), generator=g)]
        images = torch.cat([x[keep], x[pick.to(x.device)]])
        out = run(images, [list(range(len(images)))])
        kept_rows += keep
        logits.append(out[:len(keep)])
    description = 'the first half of each batch kept, its other members replaced by other clean images'
    if not kept_rows:
        return {'description': description + ' (not run: batches of one image)', 'compared': 0, 'changed': 0,
                'fraction_changed': 0.0, 'max_logit_change': 0.0, 'dependent': False}
    rows = torch.tensor(kept_rows, dtype=torch.long, device=reference.device)
    return _compare('other_members', description, reference[rows], torch.cat(logits), None, tolerance)
