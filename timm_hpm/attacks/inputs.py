"""What every attack and evaluation checks and wraps: eps values, input images, normalisation, accuracy."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ['parse_eps', 'check_images', 'accuracy', 'NormalizedInput', 'normalized_view', 'each_image_alone']


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


def each_image_alone(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> logits`` with every image of ``x`` run through ``model`` as its own batch of one: for a
    batch-dependent model (the dynamic HPM head, whose batch prototypes come from the batch), the logits and
    gradients each image would get alone. For a batch-independent model in eval mode it changes nothing.

    ``torch.func.vmap`` over single-image batches rather than a Python loop of one forward per image: the same
    values and gradients (tested against PGD run image by image), with the operators still run on the whole batch.
    The model must be vmap-compatible in its current mode (eval mode: no batch-norm statistics update, no prototype
    update)."""
    return torch.func.vmap(lambda image: model(image.unsqueeze(0)).squeeze(0))
