"""Views on a model for the attacks: an HPM head's mode, bf16 autocast and pass counting, sharing the weights."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..layers.hpm_head import HPM_MODES
from ..models._hpm import get_hpm_head

__all__ = ['PassCounter', 'ModelView', 'hpm_views', 'BATCH_DEPENDENT_MODES']

BATCH_DEPENDENT_MODES = ('dynamic', 'soft')


class PassCounter:
    """Images through forward and backward passes."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def as_dict(self) -> Dict[str, int]:
        return {'forward_images': self.forward, 'backward_images': self.backward}


class ModelView(nn.Module):
    """A view on a model: optional HPM mode, optional bf16 autocast, pass counting. Shares the weights."""

    def __init__(self, model: nn.Module, mode: Optional[str] = None, counter: Optional[PassCounter] = None,
                 amp: bool = False, batch_dependent: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.mode = mode
        self.counter = counter
        self.amp = amp
        self.batch_dependent = mode in BATCH_DEPENDENT_MODES if batch_dependent is None else batch_dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counter is not None:
            self.counter.forward += x.shape[0]
            if torch.is_grad_enabled() and x.requires_grad:
                self.counter.backward += x.shape[0]
        mode_ctx = get_hpm_head(self.model).using_mode(self.mode) if self.mode else contextlib.nullcontext()
        amp_ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with mode_ctx, amp_ctx:
            return self.model(x).float()


def hpm_views(model: nn.Module, surrogates: Sequence[str], counter: PassCounter, amp: bool = False):
    """The target (``dynamic``) and the surrogate views of an HPM model."""
    unknown = [s for s in surrogates if s not in HPM_MODES]
    if unknown:
        raise ValueError(f'unknown surrogates {unknown}; choose from {HPM_MODES}')
    get_hpm_head(model)
    target = ModelView(model, 'dynamic', counter, amp)
    return target, {s: ModelView(model, s, counter, amp) for s in surrogates}
