"""Projected gradient descent (Madry et al. 2018) as a plain function, on whole fixed batches.

The model is always called on the full batch and the loss is summed over it, never re-batched, so a
batch-dependent model (the dynamic HPM head) is attacked on exactly the batch that is scored.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['pgd', 'parse_eps', 'check_images', 'accuracy', 'NormalizedInput', 'normalized_view']


def parse_eps(value, norm: str = 'Linf') -> float:
    """``'8/255'``, ``'0.031'`` or a number, as a float: in (0, 1] for Linf (images in [0, 1]), in (0, 100] for
    L2; anything else is a clear error."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if '/' in text:
                num, den = text.split('/')
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot parse eps {value!r}; write it as '8/255' or 0.031") from None
    else:
        eps = float(value)
    limit = 1.0 if norm == 'Linf' else 100.0
    if not 0.0 < eps <= limit:
        raise ValueError(f'{norm} eps must be in (0, {limit:g}] for images in [0, 1], got {eps} (from {value!r})'
                         + (f"; did you mean {value}/255?" if eps > 1 else ''))
    return eps


def check_images(x: torch.Tensor, y: Optional[torch.Tensor] = None, num_classes: Optional[int] = None) -> None:
    """Inputs of an attack: (B, C, H, W) images in [0, 1] without NaN; labels (B,) in range."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f'expected images of shape (B, C, H, W), got '
                         f'{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}')
    if not torch.isfinite(x).all():
        raise ValueError('images hold NaN or inf values.')
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f'images must lie in [0, 1] (eps is measured in that range), got [{lo:.3f}, {hi:.3f}]; '
                         'pass unnormalised images and put the normalisation inside the model.')
    if y is not None:
        if y.shape != (x.shape[0],):
            raise ValueError(f'labels must have shape ({x.shape[0]},), got {tuple(y.shape)}')
        if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f'labels must lie in [0, {num_classes - 1}]')


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == 'Linf':
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / flat).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def _step(grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    if norm == 'Linf':
        return step_size * grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return step_size * grad / g.view(-1, *([1] * (grad.ndim - 1)))


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
        generator: for the random start.
        init: a starting point (projected into the ball around ``x``), instead of the random start.
    Returns the adversarial images (detached), the best iterate is not tracked: the last one is returned.
    """
    if norm not in ('Linf', 'L2'):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if steps < 0:
        raise ValueError(f'steps must be >= 0, got {steps}')
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction='none'))
    x = x.detach()
    if init is not None:
        delta = _project(init.detach() - x, eps, norm)
    elif random_start:
        if norm == 'Linf':
            noise = torch.rand(x.shape, generator=generator, device='cpu').to(x) * 2 - 1
            delta = eps * noise
        else:
            noise = torch.randn(x.shape, generator=generator, device='cpu').to(x)
            radius = torch.rand(x.shape[0], generator=generator, device='cpu').to(x)
            delta = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * radius.view(-1, 1, 1, 1)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta), y).sum()
        grad, = torch.autograd.grad(loss, delta)
        delta = _project(delta.detach() + _step(grad, step_size, norm), eps, norm)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness of ``model`` on the whole batch ``x`` (one forward)."""
    return model(x).argmax(1) == y


class NormalizedInput(nn.Module):
    """``module((x - mean) / std)``: puts a timm-style (normalise-outside) model's normalisation inside, so data
    and attacks work on [0, 1] images. ``.module`` keeps the HPM head reachable (``get_hpm_head``)."""

    def __init__(self, module: nn.Module, mean, std):
        super().__init__()
        self.module = module
        device = next(module.parameters()).device
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                             persistent=False)
        self.num_classes = getattr(module, 'num_classes', None)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.normalize(x))


def normalized_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it takes [0, 1] images (its pretrained cfg has mean 0, std 1, as the CIFAR-style
    families do), else a :class:`NormalizedInput` view on it with the cfg's mean/std (timm's ImageNet models)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = tuple(cfg.get('mean') or (0.0,)), tuple(cfg.get('std') or (1.0,))
    if all(v == 0.0 for v in mean) and all(v == 1.0 for v in std):
        return model
    return NormalizedInput(model, mean, std)
