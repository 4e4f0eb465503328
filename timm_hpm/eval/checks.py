"""Checks before an evaluation runs: is the model ready, and is the protocol's figure a robustness figure for it."""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from ..models._hpm import is_hpm_model
from .views import BATCH_DEPENDENT_MODES

__all__ = ['unwrap', 'check_eval_ready', 'hpm_mode', 'protocol_warnings']


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a wrapper that keeps it as ``.module`` (DistributedDataParallel, a normalising view)."""
    return getattr(model, 'module', model)


def check_eval_ready(model: nn.Module) -> None:
    """Refuse models that would give meaningless figures, before any attack runs."""
    model = unwrap(model)
    if model.training:
        raise ValueError('the model is in training mode (batch norm statistics would change under attack); '
                         'call model.eval() first.')
    if is_hpm_model(model) and model.hpm_head is not None and not bool(model.hpm_head.prototypes_initialized):
        raise ValueError('the HPM head\'s dataset prototypes were never initialised from data (they still equal '
                         'the FC weights); fine-tune or call model.hpm_head.init_prototypes_(...) first.')


def hpm_mode(model: nn.Module) -> Optional[str]:
    """The mode of the model's HPM head (what an evaluation measures), ``None`` for a plain model."""
    model = unwrap(model)
    head = model.hpm_head if is_hpm_model(model) else None
    return None if head is None else head.mode


def protocol_warnings(model: nn.Module, protocol: str) -> List[str]:
    """Why a protocol's figure would not be a robustness figure for this model."""
    mode = hpm_mode(model)
    if protocol == 'autoattack' and mode in BATCH_DEPENDENT_MODES:
        return [f"AutoAttack on a batch-dependent HPM head (mode {mode!r}) is not a valid robustness figure for that "
                "head: its images are scored on fixed batches, but each attack treats the other images of the batch "
                "as if they did not move, so the figure can overstate the head's robustness. Use protocol 'msa' for "
                "this head, or evaluate a batch-independent mode ('static' or 'fc')."]
    return []
