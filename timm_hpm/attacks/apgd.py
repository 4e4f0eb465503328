"""Auto-PGD (Croce & Hein, ICML 2020) on whole, fixed batches.

AutoAttack's own APGD attacks only the points still classified correctly, as a sub-batch; for a
batch-dependent model (the dynamic HPM head) that changes the predictions being attacked. This version
always calls the model on the full batch, sums the per-sample losses, and keeps per-sample step sizes
and best iterates. It follows the published algorithm and AutoAttack's code: a random start on the ball's
surface (full eps), momentum 0.75, step size 2 eps halved at the checkpoints
``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` when fewer than ``rho = 0.75`` of the
steps since the last checkpoint increased the loss, or when neither the step size nor the best loss changed;
a sample whose step is halved restarts from its best point.

The per-sample best images it returns come from different iterates: for a batch-dependent model they were never
evaluated together. ``observe`` sees every whole batch the attack evaluates (with the model's logits on it), so that
a caller can score those concrete batches instead (MSA does, see :mod:`timm_hpm.eval.msa`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F

from ._ball import ascent_direction, check_norm, project, random_init
from .inputs import check_count, check_eps

__all__ = ['apgd', 'apgd_targeted', 'dlr_loss', 'targeted_dlr_loss', 'checkpoints', 'APGD_LOSSES']

Model = Callable[[torch.Tensor], torch.Tensor]
APGD_LOSSES = ('ce', 'dlr', 'ce-targeted', 'dlr-targeted')


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
    z_other = logits.scatter(1, y[:, None], float('-inf')).max(1).values
    return -(z_y - z_other) / (sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, per sample (needs >= 4 classes)."""
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (sorted_logits[:, 0] - 0.5 * (sorted_logits[:, 2] + sorted_logits[:, 3]) + 1e-12)


def _loss_fn(loss: str, y: torch.Tensor, target: Optional[torch.Tensor]) -> Callable:
    if loss not in APGD_LOSSES:
        raise ValueError(f'unknown loss {loss!r}; choose from {list(APGD_LOSSES)}')
    if loss.endswith('targeted') and target is None:
        raise ValueError(f'loss {loss!r} needs target classes')
    return {
        'ce': lambda z: F.cross_entropy(z, y, reduction='none'),
        'dlr': lambda z: dlr_loss(z, y),
        'ce-targeted': lambda z: -F.cross_entropy(z, target, reduction='none'),
        'dlr-targeted': lambda z: targeted_dlr_loss(z, y, target),
    }[loss]


Observer = Callable[[torch.Tensor, torch.Tensor], None]


def _check_budget(eps: float, n_iter: int) -> None:
    """A radius and a number of iterations APGD can run with (0 iterations: the random start alone); the bound on a
    Linf eps is the callers' (:func:`~timm_hpm.attacks.check_eps`), the geometry is valid for any radius."""
    check_count(n_iter, 'n_iter', 0, what='iterations of APGD')
    check_eps(eps, norm=None)


def _loss_and_grad(model: Model, x_adv: torch.Tensor, loss_fn, observe: Optional[Observer] = None):
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        losses = loss_fn(logits)
        grad, = torch.autograd.grad(losses.sum(), x_adv)
    if observe is not None:
        observe(x_adv.detach(), logits.detach())
    return losses.detach(), logits.detach(), grad.detach()


def _start(x: torch.Tensor, eps: float, norm: str, x_init: Optional[torch.Tensor], random_start: bool,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """APGD's first iterate: ``x_init`` projected onto the ball around ``x`` when given, else (``random_start``) a
    random point on the ball's surface (full eps, as AutoAttack starts), else ``x`` itself."""
    if x_init is not None:
        if x_init.shape != x.shape:
            raise ValueError(f'x_init has shape {tuple(x_init.shape)}, x {tuple(x.shape)}: give one start per image')
        return project(x_init.detach(), x, eps, norm)
    return random_init(x, eps, norm, generator, boundary=True) if random_start else x.clone()


def _next_iterate(x: torch.Tensor, x_adv: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                  eps: float, norm: str, momentum: Optional[float]) -> torch.Tensor:
    """APGD's next iterate: an ascent step of each sample's own size, projected onto the ball around ``x``; with
    ``momentum`` (every step but the first) combined with the previous step and projected again."""
    view = (-1,) + (1,) * (x.ndim - 1)
    z = project(x_adv + step.view(view) * ascent_direction(grad, norm), x, eps, norm)
    if momentum is not None:
        z = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm)
    return z


def _restart_from_best(model: Model, loss_fn, observe: Optional[Observer], reduce: torch.Tensor, step: torch.Tensor,
                       x_best: torch.Tensor, x_adv: torch.Tensor, x_prev: torch.Tensor, grad: torch.Tensor):
    """A checkpoint's restart: the ``reduce`` samples' step halved, their iterate (and previous iterate) moved to
    their best point, and their gradient taken there (one more pass of the whole batch, only if any restarts).
    Returns the new ``step, x_adv, x_prev, grad``."""
    view = (-1,) + (1,) * (x_adv.ndim - 1)
    step = torch.where(reduce, step / 2, step)
    x_adv = torch.where(reduce.view(view), x_best, x_adv)
    x_prev = torch.where(reduce.view(view), x_best, x_prev)
    if reduce.any():
        grad = torch.where(reduce.view(view), _loss_and_grad(model, x_adv, loss_fn, observe)[2], grad)
    return step, x_adv, x_prev, grad


@torch.no_grad()
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
        observe: Optional[Observer] = None,
        x_init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """APGD on the whole batch ``x``; returns per-sample best adversarial images: a sample's first misclassified
    iterate if any (then kept), else its highest-loss one. ``loss``: one of :data:`APGD_LOSSES` (the targeted two
    need ``target``). ``observe(x_adv, logits)`` is called with every batch the model is evaluated on (the start,
    each iterate, each restart from the best points). ``x_init``: the start instead of a random one (projected onto
    the ball around ``x``)."""
    check_norm(norm)
    _check_budget(eps, n_iter)
    loss_fn = _loss_fn(loss, y, target)
    view = (-1,) + (1,) * (x.ndim - 1)
    x = x.detach()
    x_adv = _start(x, eps, norm, x_init, random_start, generator)
    step = torch.full((x.shape[0],), 2.0 * eps, device=x.device, dtype=x.dtype)
    losses, logits, grad = _loss_and_grad(model, x_adv, loss_fn, observe)
    ever_fooled = logits.argmax(1) != y
    x_first_fooled = torch.where(ever_fooled.view(view), x_adv, x)
    x_best, best_loss = x_adv.clone(), losses.clone()

    marks, last_mark = set(checkpoints(n_iter)), 0
    increases = torch.zeros_like(losses)
    best_at_last_mark, reduced_at_last_mark = best_loss.clone(), torch.ones_like(ever_fooled)
    x_prev = x_adv
    for k in range(n_iter):
        x_prev, x_adv = x_adv, _next_iterate(x, x_adv, x_prev, grad, step, eps, norm, momentum if k > 0 else None)
        new_losses, logits, grad = _loss_and_grad(model, x_adv, loss_fn, observe)
        fooled_now = logits.argmax(1) != y
        newly = fooled_now & ~ever_fooled
        x_first_fooled[newly] = x_adv[newly]
        ever_fooled |= fooled_now
        increases += (new_losses > losses).to(increases.dtype)
        losses = new_losses
        improved = new_losses > best_loss
        x_best[improved] = x_adv[improved]
        best_loss = torch.where(improved, new_losses, best_loss)
        if k + 1 not in marks:
            continue
        # A checkpoint: halve the step of the stalled samples and restart them from their best point.
        reduce = (increases < rho * (k + 1 - last_mark)) | (~reduced_at_last_mark & (best_at_last_mark >= best_loss))
        step, x_adv, x_prev, grad = _restart_from_best(model, loss_fn, observe, reduce, step, x_best, x_adv, x_prev,
                                                       grad)
        reduced_at_last_mark, best_at_last_mark, last_mark = reduce, best_loss.clone(), k + 1
        increases.zero_()
    return torch.where(ever_fooled.view(view), x_first_fooled, x_best).detach()


def apgd_targeted(
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        norm: str = 'Linf',
        n_iter: int = 100,
        n_target_classes: int = 9,
        generator: Optional[torch.Generator] = None,
        observe: Optional[Observer] = None,
) -> Iterator[torch.Tensor]:
    """APGD-T: one run per target among the top ``n_target_classes`` wrong classes of the clean logits.

    Targeted DLR needs >= 4 classes; with fewer, targeted cross-entropy is used. Yields one candidate batch per
    target rank, lazily: a caller that has broken every sample stops early. ``observe``: as in :func:`apgd`.
    """
    check_norm(norm)
    _check_budget(eps, n_iter)
    check_count(n_target_classes, 'n_target_classes', 1, what='target classes of APGD-T')
    with torch.no_grad():
        logits = model(x)
    num_classes = logits.shape[1]
    order = logits.scatter(1, y[:, None], float('-inf')).argsort(dim=1, descending=True)
    loss = 'dlr-targeted' if num_classes >= 4 else 'ce-targeted'
    for rank in range(min(n_target_classes, num_classes - 1)):
        yield apgd(model, x, y, eps, norm, n_iter, loss=loss, target=order[:, rank], generator=generator,
                   observe=observe)
