"""Projected gradient descent (Madry et al. 2018) as a plain function, on whole fixed batches.

The model is always called on the full batch and the loss is summed over it, never re-batched, so a
batch-dependent model (the dynamic HPM head) is attacked on exactly the batch that is scored.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._ball import ascent_direction, check_norm, project, random_init

__all__ = ['pgd']


def pgd(
        model: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        step_size: Optional[float] = None,
        steps: int = 10,
        norm: str = 'Linf',
        random_start: bool = True,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Untargeted PGD in an ``eps`` ball (``Linf`` or ``L2``) intersected with [0, 1].

    Args:
        model: maps images to logits; called on the whole batch.
        step_size: defaults to ``2.5 * eps / steps`` (Madry et al.).
        loss_fn: ``(logits, y) -> per-sample loss``; default cross-entropy. The batch loss is the sum.
        generator: for the random start (Madry et al.'s: uniform in the ball).
        init: a starting point (projected into the ball around ``x``), instead of the random start.
    Returns the adversarial images (detached), the best iterate is not tracked: the last one is returned.
    """
    check_norm(norm)
    if steps < 0:
        raise ValueError(f'steps must be >= 0, got {steps}')
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction='none'))
    x = x.detach()
    if init is not None:
        x_adv = project(init.detach(), x, eps, norm)
    elif random_start:
        x_adv = random_init(x, eps, norm, generator)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y).sum()
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = project(x_adv.detach() + step_size * ascent_direction(grad, norm), x, eps, norm)
    return x_adv.detach()

