"""TRADES-style WideResNet for CIFAR (Zhang et al. 2019): ReLU, no normalisation inside (inputs in [0, 1]).

State-dict keys and shapes equal RobustBench's ``WideResNet`` (the TRADES code base), used by many
WRN-34-10 / 34-20 RobustBench entries.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import generate_default_cfgs, register_model

from ._builder import build_family, hub_id
from ._common import check_image_size, cifar_cfg, FamilyHeadMixin

__all__ = ['TradesWideResNet']


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # Without a projection the residual is the raw input; with one, the pre-activated input.
        shortcut = x if self.equal_in_out else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TradesWideResNet(FamilyHeadMixin, nn.Module):
    """WideResNet-depth-width as in the TRADES code base (post-block BN-ReLU, inputs in [0, 1]).

    Args:
        depth: 6n + 4.
        widen_factor: widening factor.
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        block_drop_rate: dropout inside the residual blocks (the original ``dropRate``).
        sub_block1: add the unused ``sub_block1`` group that the original TRADES checkpoint carries (so it
            loads strictly); it takes no part in the forward and is frozen.
        img_size: the input size the model accepts (None accepts any).
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
    """
    classifier_name = 'fc'

    def __init__(
            self,
            depth: int = 34,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            block_drop_rate: float = 0.0,
            sub_block1: bool = False,
            img_size: Optional[Union[int, Tuple[int, int]]] = 32,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f'WideResNet depth must be 6n + 4, got {depth}')
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = channels[3]
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, block_drop_rate)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1, block_drop_rate)
            self.sub_block1.requires_grad_(False)  # unused in the forward: frozen, so DDP sees no unused grads
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, block_drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(channels[3], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=channels[1], reduction=1, module='block1'),
            dict(num_chs=channels[2], reduction=2, module='block2'),
            dict(num_chs=channels[3], reduction=4, module='block3'),
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))


def _create(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> TradesWideResNet:
    return build_family(TradesWideResNet, variant, pretrained, classifier='fc', hpm=hpm,
                        tag_model_args=_TAG_MODEL_ARGS, **kwargs)


# Per-weight model arguments: the original TRADES checkpoint carries an unused sub_block1.
_TAG_MODEL_ARGS = {'rb_zhang2019theoretically_cifar10': dict(sub_block1=True)}


def _cfg(**kwargs):
    return cifar_cfg(first_conv='conv1', classifier='fc', pool_size=(8, 8), **kwargs)


_TRADES = dict(paper_ids='arXiv:1901.08573', paper_name='Theoretically Principled Trade-off between Robustness '
               'and Accuracy', origin_url='https://github.com/yaodongyu/TRADES', license='mit')


default_cfgs = generate_default_cfgs({
    'trades_wrn34_10.rb_zhang2019theoretically_cifar10': _cfg(
        hf_hub_id=hub_id('trades_wrn34_10.rb_zhang2019theoretically_cifar10'), **_TRADES),
    'hpm_trades_wrn34_10.rb_zhang2019theoretically_cifar10': _cfg(
        hf_hub_id=hub_id('hpm_trades_wrn34_10.rb_zhang2019theoretically_cifar10'), **_TRADES),
    'trades_wrn34_20': _cfg(),
    'hpm_trades_wrn34_20': _cfg(),
})


@register_model
def trades_wrn34_10(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-34-10, TRADES style, RobustBench ``WideResNet`` keys."""
    return _create('trades_wrn34_10', pretrained, **dict(dict(depth=34, widen_factor=10), **kwargs))


@register_model
def trades_wrn34_20(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-34-20, TRADES style, RobustBench ``WideResNet`` keys."""
    return _create('trades_wrn34_20', pretrained, **dict(dict(depth=34, widen_factor=20), **kwargs))


@register_model
def hpm_trades_wrn34_10(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-34-10 (TRADES style) with the HPM l2-reclassifier head."""
    return _create('hpm_trades_wrn34_10', pretrained, hpm=True, **dict(dict(depth=34, widen_factor=10), **kwargs))


@register_model
def hpm_trades_wrn34_20(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-34-20 (TRADES style) with the HPM l2-reclassifier head."""
    return _create('hpm_trades_wrn34_20', pretrained, hpm=True, **dict(dict(depth=34, widen_factor=20), **kwargs))
