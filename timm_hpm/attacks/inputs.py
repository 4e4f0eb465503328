"""What every attack and evaluation checks and wraps: eps values, input images, normalisation, accuracy."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ['parse_eps', 'check_eps', 'check_count', 'check_flag', 'option_label', 'check_images', 'accuracy',
           'NormalizedInput', 'normalized_view', 'each_image_alone']


def option_label(name: str, value, flag: Optional[str] = None) -> str:
    """``name=value`` and, when the option has one, the command-line flag users know it by:
    ``apgd_iters=-3 (--apgd-iters)``: how every option check names what it refuses."""
    return f'{name}={value!r}' + (f' ({flag})' if flag else '')


def check_eps(eps, norm: Optional[str] = 'Linf', name: str = 'eps', flag: Optional[str] = None) -> float:
    """``eps`` as a float, or a ValueError naming the option: a finite number > 0, and for Linf at most 1 (images
    lie in [0, 1]: a larger ball holds nothing more, and a value above 1 is usually a missing /255). L2: finite > 0
    (the diagonal of the [0, 1] box grows with the image size); ``norm=None``: finite > 0 only."""
    label = option_label(name, eps, flag)
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f'{label}: must be a number, got {type(eps).__name__}')
    value = float(eps)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f'{label}: must be a finite number > 0 (the radius of the threat model)')
    if norm == 'Linf' and value > 1.0:
        raise ValueError(f'{label}: a Linf eps must lie in (0, 1] for images in [0, 1]; did you mean {value:g}/255?')
    return value


def check_count(value, name: str, minimum: int = 1, flag: Optional[str] = None, optional: bool = False,
                what: str = '') -> Optional[int]:
    """An integer budget (iterations, queries, target classes, steps, a batch size) of at least ``minimum``, or a
    ValueError naming the option, its value and the valid range (``optional``: None is allowed, meaning a
    default)."""
    if value is None and optional:
        return None
    label = option_label(name, value, flag)
    valid = f'an integer >= {minimum}' + (' or None' if optional else '') + (f' ({what})' if what else '')
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{label}: must be {valid}, got {type(value).__name__}')
    if value < minimum:
        raise ValueError(f'{label}: must be >= {minimum}' + (f' ({what})' if what else ''))
    return int(value)


def check_flag(value, name: str) -> bool:
    """A yes/no option: a bool, not a string or a number (``'false'`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f'{option_label(name, value)}: must be True or False, got {type(value).__name__}')
    return value


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
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f'no images to attack: x has shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise ValueError(f'images must be a floating-point tensor with values in [0, 1], got {x.dtype}')
    if not torch.isfinite(x).all():
        raise ValueError('images hold NaN or inf values.')
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f'images must lie in [0, 1] (eps is measured in that range), got [{lo:.3f}, {hi:.3f}]; '
                         'pass unnormalised images and put the normalisation inside the model.')
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f'labels must be a tensor of shape ({x.shape[0]},), got {type(y).__name__}')
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise ValueError(f'labels must be an integer tensor (class indices), got {y.dtype}')
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
