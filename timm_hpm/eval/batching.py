"""Batchings: the fixed batches an evaluation scores (the batch is part of what a batch-dependent model sees)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ['BATCHINGS', 'batch_order', 'make_batchings']

#: The batchings an evaluation can score. Appended to, never reordered: a unit's attack seed uses the position.
BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')


def batch_order(name: str, n: int, seed: int, labels: Optional[torch.Tensor] = None) -> List[int]:
    """The order in which a batching visits the first ``n`` examples (before it is cut into batches).

    ``class_sorted`` is the order a class-folder dataset yields (timm's and torchvision's folder datasets sort by
    class): label order, stable within a class, so a batch holds only a few classes."""
    if name in ('default', 'single'):
        return list(range(n))
    if name == 'shuffled':
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    if name == 'class_sorted':
        if labels is None or len(labels) != n:
            raise ValueError(f"the 'class_sorted' batching needs the {n} labels")
        return torch.sort(labels.detach().cpu(), stable=True).indices.tolist()
    raise ValueError(f'unknown batching {name!r}; choose from {BATCHINGS}')


def make_batchings(n: int, batch_size: int, names: Sequence[str], seed: int,
                   labels: Optional[torch.Tensor] = None) -> Dict[str, List[List[int]]]:
    """Fixed batchings of the first ``n`` examples, each its order cut into consecutive batches of ``batch_size``
    (``single``: of 1), the last one smaller, nothing dropped (as timm's ``validate.py`` batches a loader):
    ``default`` (the dataset's order), ``single``, ``shuffled`` (a seeded permutation) and ``class_sorted`` (label
    order, stable within a class; needs ``labels``)."""
    out = {}
    for name in names:
        order = batch_order(name, n, seed, labels)
        size = 1 if name == 'single' else batch_size
        out[name] = [order[i:i + size] for i in range(0, n, size)]
    return out
