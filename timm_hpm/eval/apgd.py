"""Auto-PGD (Croce & Hein, ICML 2020) on whole, fixed batches.

AutoAttack's own APGD attacks only the points still classified correctly, as a sub-batch; for a
batch-dependent model (the dynamic HPM head) that changes the predictions being attacked. This version
always calls the model on the full batch, sums the per-sample losses, and keeps per-sample step sizes
and best iterates. It follows the published algorithm: momentum 0.75, step size 2 eps halved at the
checkpoints ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` when fewer than
``rho = 0.75`` of the steps since the last checkpoint increased the loss, or when neither the step size
nor the best loss changed.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F

__all__ = ['apgd', 'apgd_targeted', 'dlr_loss', 'targeted_dlr_loss', 'checkpoints']

Model = Callable[[torch.Tensor], torch.Tensor]


def checkpoints(n_iter: int) -> List[int]:
    """Iterations at which the step size may be halved."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * n_iter) for v in p[1:] if v <= 1})


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio, per sample (needs >= 3 classes)."""
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float('-inf'))
    z_other = other.max(1).values
    return -(z_y - z_other) / (sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, per sample (needs >= 4 classes)."""
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (sorted_logits[:, 0] - 0.5 * (sorted_logits[:, 2] + sorted_logits[:, 3]) + 1e-12)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    delta = x_adv - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (x.ndim - 1)))
    return (x + delta).clamp(0.0, 1.0)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == 'Linf':
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    shape = x.shape
    if norm == 'Linf':
        t = torch.rand(shape, generator=generator).to(x) * 2 - 1
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
    else:
        t = torch.randn(shape, generator=generator).to(x)
        t = t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
    return (x + 0.5 * eps * t).clamp(0.0, 1.0)


def _loss_and_grad(model: Model, x_adv: torch.Tensor, loss_fn):
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        losses = loss_fn(logits)
        grad, = torch.autograd.grad(losses.sum(), x_adv)
    return losses.detach(), logits.detach(), grad.detach()


def apgd(
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        norm: str = 'Linf',
        n_iter: int = 100,
        loss: str = 'ce',
        target: Optional[torch.Tensor] = None,
        rho: float = 0.75,
        momentum: float = 0.75,
        random_start: bool = True,
        generator: Optional[torch.Generator] = None,
        counter: Optional[dict] = None,
) -> torch.Tensor:
    """APGD on the whole batch ``x``; returns per-sample best adversarial images.

    A sample's best iterate is its first misclassified one if any (then kept), else its highest-loss one.
    ``loss``: ``'ce'``, ``'dlr'``, ``'ce-targeted'`` or ``'dlr-targeted'`` (the latter two need ``target``).
    ``counter`` (a dict) accumulates ``forward`` and ``backward`` passes.
    """
    if norm not in ('Linf', 'L2'):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if loss.endswith('targeted') and target is None:
        raise ValueError(f'loss {loss!r} needs target classes')
    losses_by_name = {
        'ce': lambda z: F.cross_entropy(z, y, reduction='none'),
        'dlr': lambda z: dlr_loss(z, y),
        'ce-targeted': lambda z: -F.cross_entropy(z, target, reduction='none'),
        'dlr-targeted': lambda z: targeted_dlr_loss(z, y, target),
    }
    if loss not in losses_by_name:
        raise ValueError(f'unknown loss {loss!r}; choose from {sorted(losses_by_name)}')
    loss_fn = losses_by_name[loss]
    counter = counter if counter is not None else {}
    view = (-1,) + (1,) * (x.ndim - 1)
    x = x.detach()
    n = x.shape[0]
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    step = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)

    losses, logits, grad = _loss_and_grad(model, x_adv, loss_fn)
    counter['forward'] = counter.get('forward', 0) + 1
    counter['backward'] = counter.get('backward', 0) + 1
    fooled = logits.argmax(1) != y
    x_best = x_adv.clone()
    best_loss = losses.clone()
    x_best_adv = torch.where(fooled.view(view), x_adv, x)
    ever_fooled = fooled.clone()

    marks = set(checkpoints(n_iter))
    last_mark = 0
    increases = torch.zeros(n, device=x.device)
    best_at_last_mark = best_loss.clone()
    step_reduced_at_last_mark = torch.ones(n, dtype=torch.bool, device=x.device)
    x_prev = x_adv.clone()
    for k in range(n_iter):
        with torch.no_grad():
            z = _project(x_adv + step.view(view) * _direction(grad, norm), x, eps, norm)
            if k == 0:
                x_new = z
            else:
                x_new = _project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm)
        x_prev = x_adv
        x_adv = x_new
        new_losses, logits, grad = _loss_and_grad(model, x_adv, loss_fn)
        counter['forward'] += 1
        counter['backward'] += 1
        with torch.no_grad():
            fooled_now = logits.argmax(1) != y if not loss.endswith('targeted') else logits.argmax(1) != y
            newly = fooled_now & ~ever_fooled
            x_best_adv[newly] = x_adv[newly]
            ever_fooled |= fooled_now
            increases += (new_losses > losses).float()
            losses = new_losses
            improved = new_losses > best_loss
            x_best[improved] = x_adv[improved]
            best_loss = torch.where(improved, new_losses, best_loss)
            if k + 1 in marks:
                span = k + 1 - last_mark
                cond1 = increases < rho * span
                cond2 = ~step_reduced_at_last_mark & (best_at_last_mark >= best_loss)
                reduce = cond1 | cond2
                step = torch.where(reduce, step / 2, step)
                # Restart the reduced samples from their best point (AutoAttack's rule).
                x_adv = torch.where(reduce.view(view), x_best, x_adv)
                x_prev = torch.where(reduce.view(view), x_best, x_prev)
                if reduce.any():
                    _, _, grad_best = _loss_and_grad(model, x_adv, loss_fn)
                    counter['forward'] += 1
                    counter['backward'] += 1
                    grad = torch.where(reduce.view(view), grad_best, grad)
                step_reduced_at_last_mark = reduce
                best_at_last_mark = best_loss.clone()
                increases.zero_()
                last_mark = k + 1
    return torch.where(ever_fooled.view(view), x_best_adv, x_best).detach()


def apgd_targeted(
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        norm: str = 'Linf',
        n_iter: int = 100,
        n_target_classes: int = 9,
        generator: Optional[torch.Generator] = None,
        counter: Optional[dict] = None,
) -> Iterator[torch.Tensor]:
    """APGD-T: one run per target among the top ``n_target_classes`` wrong classes of the clean logits.

    Targeted DLR needs >= 4 classes; with fewer, targeted cross-entropy is used. Yields one candidate batch per
    target rank (each a realisable whole batch), lazily: a caller that has broken every sample stops early.
    """
    with torch.no_grad():
        logits = model(x)
    if counter is not None:
        counter['forward'] = counter.get('forward', 0) + 1
    num_classes = logits.shape[1]
    n_target_classes = min(n_target_classes, num_classes - 1)
    order = logits.scatter(1, y[:, None], float('-inf')).argsort(dim=1, descending=True)
    loss = 'dlr-targeted' if num_classes >= 4 else 'ce-targeted'
    for rank in range(n_target_classes):
        yield apgd(model, x, y, eps, norm, n_iter, loss=loss, target=order[:, rank], generator=generator,
                   counter=counter)
