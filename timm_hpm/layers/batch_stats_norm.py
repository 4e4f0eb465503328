"""Batch norm that normalises with the statistics of the test batch: the test-time normalisation defence.

Some defences (and many deployments: "prediction-time batch normalisation", test-time adaptation of the batch-norm
statistics) keep batch norm in its training behaviour at inference: each batch is normalised with its own mean and
variance instead of the running statistics. The model's prediction for an image then depends on the other images of
its batch, as an HPM head's does: a standard AutoAttack figure is not valid for it, and a batch of inputs can be
poisoned. :class:`BatchStatsNorm2d` is such a layer: in training it is ``nn.BatchNorm2d`` (batch statistics, running
statistics updated); in eval mode it normalises with the statistics of the batch it is given (``stats='batch'``, the
defence) or with the running statistics (``stats='running'``, plain batch norm: batch-independent). The running
statistics are never updated in eval mode.

``set_norm_stats(model, stats)`` switches every such layer of a model; :class:`NormStatsView` is a view on a model
with the other statistics (sharing the weights), e.g. the running-statistics network as a differentiable,
batch-independent surrogate for attacks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['NORM_STATS', 'BatchStatsNorm2d', 'batch_stats_layers', 'set_norm_stats', 'norm_stats', 'using_norm_stats',
           'NormStatsView']

#: What an eval-mode :class:`BatchStatsNorm2d` normalises with: the test batch's statistics, or the running ones.
NORM_STATS = ('batch', 'running')


def _check_stats(stats) -> str:
    if stats not in NORM_STATS:
        raise ValueError(f'stats must be one of {NORM_STATS} (the statistics eval mode normalises with), got {stats!r}')
    return stats


class BatchStatsNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose eval-mode forward normalises with the test batch's statistics (``stats='batch'``)
    or the running statistics (``stats='running'``). Training mode is ``nn.BatchNorm2d``'s."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, stats: str = 'batch'):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.stats = _check_stats(stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            factor = 0.0 if self.momentum is None else self.momentum
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor,
                                self.eps)
        if self.stats == 'batch':  # the test batch's statistics; the running ones are left as they are
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, stats={self.stats!r}'  # part of a model's fingerprint (timm_hpm.eval)


def batch_stats_layers(model: nn.Module) -> List[BatchStatsNorm2d]:
    """The :class:`BatchStatsNorm2d` layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, BatchStatsNorm2d)]


def norm_stats(model: nn.Module):
    """What ``model``'s :class:`BatchStatsNorm2d` layers normalise with in eval mode (``'batch'`` or ``'running'``),
    ``None`` when it has none; a ValueError when they disagree."""
    found = {m.stats for m in batch_stats_layers(model)}
    if len(found) > 1:
        raise ValueError(f'the BatchStatsNorm2d layers of this model disagree ({sorted(found)}); set them with '
                         'set_norm_stats(model, stats)')
    return found.pop() if found else None


def set_norm_stats(model: nn.Module, stats: str) -> nn.Module:
    """Every :class:`BatchStatsNorm2d` of ``model`` normalises with ``stats`` in eval mode; returns ``model``."""
    _check_stats(stats)
    layers = batch_stats_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no BatchStatsNorm2d layer whose statistics could be set')
    for m in layers:
        m.stats = stats
    return model


@contextlib.contextmanager
def using_norm_stats(model: nn.Module, stats: str) -> Iterator[nn.Module]:
    """``model`` with ``stats`` for the duration of the block, each layer back to its own afterwards."""
    _check_stats(stats)
    layers = batch_stats_layers(model)
    before = [m.stats for m in layers]
    try:
        for m in layers:
            m.stats = stats
        yield model
    finally:
        for m, s in zip(layers, before):
            m.stats = s


class NormStatsView(nn.Module):
    """A view on ``model`` whose :class:`BatchStatsNorm2d` layers normalise with ``stats`` during its forward
    (sharing the weights; the model's own setting is restored after each call)."""

    def __init__(self, model: nn.Module, stats: str = 'running'):
        super().__init__()
        if not batch_stats_layers(model):
            raise ValueError(f'{type(model).__name__} has no BatchStatsNorm2d layer: a {stats!r}-statistics view '
                             'would be the model itself')
        self.model = model
        self.stats = _check_stats(stats)
        self.num_classes = getattr(model, 'num_classes', None)
        self.train(model.training)  # the view is in the model's mode (a new module would start in training mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with using_norm_stats(self.model, self.stats):
            return self.model(x)

    def extra_repr(self) -> str:
        return f'stats={self.stats!r}'
