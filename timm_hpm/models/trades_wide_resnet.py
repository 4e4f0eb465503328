"""TRADES-style WideResNet for CIFAR (Zhang et al. 2019): ReLU, no normalisation inside (inputs in [0, 1]).

State-dict keys and shapes equal RobustBench's ``WideResNet`` (the TRADES code base), used by many
WRN-28-10 / 34-10 / 34-20 RobustBench entries (Carmon2019Unlabeled, Sehwag2021Proxy, Cui2023Decoupled ...).
"""
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import generate_default_cfgs, register_model

from ._builder import build_family
from ._common import block_stack, check_image_size, cifar_cfg, FamilyHeadMixin, image_size_or_none, wrn_stages
from ._conventions import checkpoint_blocks, GradCheckpointingMixin, MATCH_PREV_GROUP

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
        self.convShortcut = None if in_planes == out_planes else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # Without a projection the residual is the raw input; with one, the pre-activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = block_stack(BasicBlock, num_layers, in_planes, out_planes, stride, drop_rate=drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TradesWideResNet(GradCheckpointingMixin, FamilyHeadMixin, nn.Module):
    """WideResNet-depth-width as in the TRADES code base (post-block BN-ReLU, inputs in [0, 1]).

    Args:
        depth: 6n + 4.
        widen_factor: widening factor.
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        block_drop_rate: dropout inside the residual blocks (the original ``dropRate``).
        img_size: the input size the model accepts (None accepts any).
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
    """

    def __init__(
            self,
            depth: int = 34,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            block_drop_rate: float = 0.0,
            img_size: Optional[Union[int, Tuple[int, int]]] = 32,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        n, channels = wrn_stages(depth, widen_factor)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = image_size_or_none(img_size)
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = channels[3]
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, block_drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, block_drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.global_pool, self.fc = create_classifier(channels[3], num_classes, pool_type=global_pool)
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

    classifier_name = 'fc'
    stage_names = ('block1', 'block2', 'block3')

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        return self.conv1(x)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))

    def prune_norm(self) -> None:
        self.bn1, self.relu = nn.Identity(), nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): the stem, then each block (``coarse``: each block group),
        the final norm with the last of them; the classifier is left to timm's last group."""
        blocks = r'^block(\d+)\.' if coarse else r'^block(\d+)\.layer\.(\d+)\.'
        return dict(stem=r'^conv1\.', blocks=[(blocks, None), (r'^bn1\.', MATCH_PREV_GROUP)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            groups = (self.block1, self.block2, self.block3)
            x = checkpoint_blocks([g.layer if isinstance(g, NetworkBlock) else g for g in groups], x)
        else:
            x = self.block3(self.block2(self.block1(x)))
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)


#: The TRADES code base's checkpoints carry ``sub_block1``, a block group its forward never uses: dropped on load,
#: so the model has no parameter that never gets a gradient.
_UNUSED_CHECKPOINT_MODULES = ('sub_block1',)


def _create(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> TradesWideResNet:
    return build_family(TradesWideResNet, variant, pretrained, classifier='fc', hpm=hpm,
                        unused_checkpoint_modules=_UNUSED_CHECKPOINT_MODULES,
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs):
    return cifar_cfg(first_conv='conv1', classifier='fc', pool_size=(8, 8), **kwargs)


def _facts(paper_ids: str, paper_name: str, origin_url: str, license: str = 'unknown'):
    return dict(paper_ids=paper_ids, paper_name=paper_name, origin_url=origin_url, license=license)


def _arxiv(arxiv_id: str, paper_name: str):
    # the paper as RobustBench's model_info links it
    return _facts(f'arXiv:{arxiv_id}', paper_name, f'https://arxiv.org/abs/{arxiv_id}')


_TRADES = _facts('arXiv:1901.08573', 'Theoretically Principled Trade-off between Robustness and Accuracy',
                 'https://github.com/yaodongyu/TRADES', 'mit')
_CARMON2019 = _arxiv('1905.13736', 'Unlabeled Data Improves Adversarial Robustness')
_WU2020 = _arxiv('2004.05884', 'Adversarial Weight Perturbation Helps Robust Generalization')
_CUI2020 = _arxiv('2011.11164', 'Learnable Boundary Guided Adversarial Training')
_SEHWAG2021 = _arxiv('2104.09425', 'Robust Learning Meets Generative Models: Can Proxy Distributions Improve '
                     'Adversarial Robustness?')
_JIA2022 = _arxiv('2203.06616', 'LAS-AT: Adversarial Training with Learnable Attack Strategy')
_ADDEPALLI2022 = _arxiv('2210.15318', 'Efficient and Effective Augmentation Strategy for Adversarial Training')
_CUI2023 = _arxiv('2305.13948', 'Decoupled Kullback-Leibler Divergence Loss')

# architecture -> {tag: (number of classes, the weights' facts)}; none of these checkpoints normalises its input.
# The first tag of an architecture is its default cfg (CIFAR-10, or untagged).
_ARCH_TAGS = {
    'trades_wrn28_10': {'rb_carmon2019unlabeled_cifar10': (10, _CARMON2019)},
    'trades_wrn34_10': {
        'rb_zhang2019theoretically_cifar10': (10, _TRADES),
        'rb_sehwag2021proxy_cifar10_l2': (10, _SEHWAG2021),
        'rb_wu2020adversarial_cifar10_l2': (10, _WU2020),
        'rb_sehwag2021proxy_cifar100': (100, _SEHWAG2021),
        'rb_cui2023decoupled_cifar100': (100, _CUI2023),
        'rb_cui2023decoupled_autoaug_cifar100': (100, _CUI2023),
        'rb_addepalli2022efficient_cifar100': (100, _ADDEPALLI2022),
        'rb_cui2020learnable_lbgat9_cifar100': (100, _CUI2020),
    },
    'trades_wrn34_20': {'': (10, {}), 'rb_jia2022las_at_cifar100': (100, _JIA2022)},
}


def _weights(arch: str):
    # Not published yet (no location: timm does not list them as pretrained); loaded through timm_hpm.robustbench.
    return {f'{name}.{tag}' if tag else name: _cfg(num_classes=n, **facts)
            for tag, (n, facts) in _ARCH_TAGS[arch].items() for name in (arch, f'hpm_{arch}')}


default_cfgs = generate_default_cfgs({k: v for arch in _ARCH_TAGS for k, v in _weights(arch).items()})


@register_model
def trades_wrn28_10(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-28-10, TRADES style, RobustBench ``WideResNet`` keys."""
    return _create('trades_wrn28_10', pretrained, **dict(dict(depth=28, widen_factor=10), **kwargs))


@register_model
def hpm_trades_wrn28_10(pretrained: bool = False, **kwargs) -> TradesWideResNet:
    """WideResNet-28-10 (TRADES style) with the HPM l2-reclassifier head."""
    return _create('hpm_trades_wrn28_10', pretrained, hpm=True, **dict(dict(depth=28, widen_factor=10), **kwargs))


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
