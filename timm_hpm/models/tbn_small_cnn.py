"""TBN-SmallCNN: SmallCNN with batch norm after each convolution, evaluated with test-batch statistics.

The second batch-dependent defence beside HPM (``timm_hpm.benchmark`` measures both): the test-time normalisation
defence, where batch norm keeps normalising each batch with its own mean and variance at inference
(:class:`~timm_hpm.layers.batch_stats_norm.BatchStatsNorm2d`). Its predictions depend on the batch (the other images,
the batch size, the order), so standard AutoAttack, which attacks and re-batches images as if they did not, is not
a valid robustness figure for it. ``norm_stats='running'`` (or ``set_norm_stats(model, 'running')``,
``NormStatsView(model, 'running')``) gives the same network with its running statistics: plain, batch-independent
batch norm.

The architecture is TRADES' SmallCNN (``timm_hpm/models/small_cnn.py``) with a ``BatchStatsNorm2d`` after each of its
four convolutions (before the ReLU): ``features`` is conv, bn, relu, conv, bn, relu, pool, conv, bn, relu, conv, bn,
relu, pool. Inputs are 1 x 28 x 28 images in [0, 1] (no normalisation). Trained on Fashion-MNIST with PGD-AT
(``recipes/configs/fashion_mnist_tbn.yaml``).
"""
from typing import Any, Dict, Tuple, Union

import torch.nn as nn
from timm.models import register_model

from ..layers.batch_stats_norm import NORM_STATS, BatchStatsNorm2d
from ._builder import build_family, family_cfgs, hub_id
from .small_cnn import SHIPPED_WEIGHTS, SmallCNN, _cfg

__all__ = ['TBNSmallCNN']


class TBNSmallCNN(SmallCNN):
    """SmallCNN with a :class:`BatchStatsNorm2d` after each convolution.

    Args:
        norm_stats: what eval mode normalises with: ``'batch'`` (the test batch's statistics: the defence,
            batch-dependent) or ``'running'`` (the running statistics: plain batch norm).
        Other arguments: :class:`~timm_hpm.models.small_cnn.SmallCNN`'s.
    """
    _stage_ends = (6, 13, 14)

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: Union[int, Tuple[int, int]] = 28,
                 hidden: int = 200, drop_rate: float = 0.5, global_pool: str = 'flatten', norm_stats: str = 'batch'):
        if norm_stats not in NORM_STATS:
            raise ValueError(f'norm_stats must be one of {NORM_STATS}, got {norm_stats!r}')
        super().__init__(num_classes=num_classes, in_chans=in_chans, img_size=img_size, hidden=hidden,
                         drop_rate=drop_rate, global_pool=global_pool)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), BatchStatsNorm2d(32, stats=norm_stats), nn.ReLU(),
            nn.Conv2d(32, 32, 3), BatchStatsNorm2d(32, stats=norm_stats), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), BatchStatsNorm2d(64, stats=norm_stats), nn.ReLU(),
            nn.Conv2d(64, 64, 3), BatchStatsNorm2d(64, stats=norm_stats), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.feature_info = [dict(num_chs=32, reduction=1, module='features.5'),
                             dict(num_chs=64, reduction=2, module='features.12'),
                             dict(num_chs=64, reduction=4, module='features.13')]

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """As SmallCNN's, for this ``features`` layout: the first convolution (and its norm), then each layer
        (``coarse``: each stage, features[1:6] and features[6:13]), then the two fully connected layers."""
        blocks = [(r'^features\.[1-5]\.', (0,)), (r'^features\.([6-9]|1[0-2])\.', (1,))] if coarse \
            else r'^features\.(\d+)\.'
        return dict(stem=r'^features\.0\.', blocks=blocks, pre_logits=r'^fc[12]\.' if coarse else r'^fc([12])\.')


def _create(variant: str, pretrained: bool = False, **kwargs) -> TBNSmallCNN:
    return build_family(TBNSmallCNN, variant, pretrained, classifier='fc',
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2)), **kwargs)


default_cfgs = family_cfgs({
    # PGD-AT (Linf eps 0.1) on Fashion-MNIST from scratch: recipes/configs/fashion_mnist_tbn.yaml
    'tbn_small_cnn.fmnist_pgdat': _cfg(
        file=str(SHIPPED_WEIGHTS / 'tbn_small_cnn.fmnist_pgdat.safetensors'),
        hf_hub_id=hub_id('tbn_small_cnn.fmnist_pgdat'),
        license='apache-2.0', num_classes=10, origin_url='recipes/configs/fashion_mnist_tbn.yaml',
        paper_ids='arXiv:1901.08573',  # the architecture's paper (TRADES' SmallCNN); the defence is ours to test
        paper_name='test-time batch normalisation (batch-dependent) on TRADES\' SmallCNN'),
})


@register_model
def tbn_small_cnn(pretrained: bool = False, **kwargs) -> TBNSmallCNN:
    """SmallCNN with batch norm that uses the test batch's statistics in eval mode (``norm_stats='running'``:
    the running statistics)."""
    return _create('tbn_small_cnn', pretrained, **kwargs)
