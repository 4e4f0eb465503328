"""The threat model's geometry, shared by every attack: the eps ball (Linf or L2) intersected with [0, 1]."""
from __future__ import annotations

from typing import Optional

import torch

NORMS = ('Linf', 'L2')


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The closest point of the eps ball around ``x`` (clipped to [0, 1]) to ``x_adv``, per sample."""
    delta = x_adv - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    else:
        length = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _per_sample((eps / length).clamp(max=1.0), delta)
    return (x + delta).clamp(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm``: the sign for Linf, the normalised gradient for L2."""
    if norm == 'Linf':
        return grad.sign()
    return grad / _per_sample(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)


def random_init(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator] = None,
                 boundary: bool = False) -> torch.Tensor:
    """A random point of the eps ball around ``x`` (clipped to [0, 1]); the noise is drawn on the CPU from
    ``generator``, so a seed gives the same start on every device.

    ``boundary=False``: Madry et al.'s PGD start, uniform in the Linf cube, or a uniform direction at a uniform
    radius for L2. ``boundary=True``: AutoAttack's APGD start, the noise scaled so that it reaches the ball's
    surface (Linf: its largest coordinate is eps; L2: its length is eps).
    """
    if norm == 'Linf':
        t = torch.rand(x.shape, generator=generator).to(x) * 2 - 1
        if boundary:
            t = t / _per_sample(t.flatten(1).abs().amax(1).clamp_min(1e-12), t)
    else:
        t = torch.randn(x.shape, generator=generator).to(x)
        t = t / _per_sample(t.flatten(1).norm(dim=1).clamp_min(1e-12), t)
        if not boundary:
            t = t * _per_sample(torch.rand(x.shape[0], generator=generator).to(x), t)
    return (x + eps * t).clamp(0.0, 1.0)
