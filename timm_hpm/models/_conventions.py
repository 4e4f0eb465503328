"""timm's training conventions for the project's own families: gradient checkpointing with timm's
``checkpoint_seq`` (``set_grad_checkpointing``, what timm's ``train.py --grad-checkpointing`` calls) and the
``group_matcher`` regexes timm's layer-wise LR decay (``create_optimizer_v2(..., layer_decay=...)``) groups the
parameters by. Each family writes its own ``group_matcher`` (its module names are RobustBench's) and calls
:func:`checkpoint_blocks` in ``forward_features`` when ``grad_checkpointing`` is on, as timm's ResNet does."""
from typing import Iterable, List

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models._manipulate import MATCH_PREV_GROUP

__all__ = ['GradCheckpointingMixin', 'checkpoint_blocks', 'MATCH_PREV_GROUP']


class GradCheckpointingMixin:
    """``set_grad_checkpointing`` as timm's models have it. The family sets ``self.grad_checkpointing = False`` in
    its ``__init__`` (an instance attribute, which TorchScript needs) and checks
    ``self.grad_checkpointing and not torch.jit.is_scripting()`` in ``forward_features``."""
    grad_checkpointing: bool

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's
        ``checkpoint_seq``): less memory for more compute; the outputs and gradients are unchanged."""
        self.grad_checkpointing = enable


def _blocks(stages: Iterable[nn.Module]) -> List[nn.Module]:
    blocks: List[nn.Module] = []
    for stage in stages:
        # a stage is an nn.Sequential of blocks; a pruned stage (nn.Identity) is one segment of its own
        blocks.extend(stage if isinstance(stage, nn.Sequential) else [stage])
    return blocks


def checkpoint_blocks(stages: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run ``stages`` in order with timm's ``checkpoint_seq``, one checkpointed segment per block (the stages'
    ``nn.Sequential`` flattened, as timm's ResNet does with ``flatten=True``)."""
    return checkpoint_seq(_blocks(stages), x)
