"""PreActResNet-18 for CIFAR (He et al. 2016, pre-activation), inputs in [0, 1], no normalisation inside.

State-dict keys and shapes equal RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2])`` (e.g. the
Andriushchenko2020Understanding entry). Also the small model of the CPU studies (``in_chans=1``,
``img_size=28`` for Fashion-MNIST).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import generate_default_cfgs, register_model

from ._builder import build_family
from ._common import block_stack, check_image_size, cifar_cfg, FamilyHeadMixin, image_size_or_none
from ._conventions import checkpoint_blocks, GradCheckpointingMixin, MATCH_PREV_GROUP

__all__ = ['PreActResNet']


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut takes the raw input, as in the reference PreActResNet.
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(GradCheckpointingMixin, FamilyHeadMixin, nn.Module):
    """Pre-activation ResNet for small images.

    Args:
        num_blocks: blocks per stage.
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        bn_before_fc: a final BN-ReLU before pooling (some checkpoints have it: keys ``bn.*``).
        img_size: the input size the model accepts (None accepts any).
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
    """
    classifier_name = 'linear'
    stage_names = ('layer1', 'layer2', 'layer3', 'layer4')

    def __init__(
            self,
            num_blocks: Sequence[int] = (2, 2, 2, 2),
            num_classes: int = 10,
            in_chans: int = 3,
            bn_before_fc: bool = False,
            img_size: Optional[Union[int, Tuple[int, int]]] = 32,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = image_size_or_none(img_size)
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = 64
        self.feature_info = []
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            setattr(self, f'layer{i + 1}', block_stack(PreActBlock, n, in_planes, planes, 1 if i == 0 else 2))
            in_planes = planes if n else in_planes
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** i, module=f'layer{i + 1}'))
        self.bn = nn.BatchNorm2d(widths[-1]) if bn_before_fc else None
        self.global_pool, self.linear = create_classifier(widths[-1], num_classes, pool_type=global_pool)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        return self.conv1(x)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(x)) if self.bn is not None else x

    def prune_norm(self) -> None:
        self.bn = None

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay), as timm's ResNet: the stem, then each block (``coarse``:
        each stage), the final norm (``bn_before_fc``) with the last of them; the classifier is left to timm's last
        group."""
        blocks = r'^layer(\d+)\.' if coarse else r'^layer(\d+)\.(\d+)\.'
        return dict(stem=r'^conv1\.', blocks=[(blocks, None), (r'^bn\.', MATCH_PREV_GROUP)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks([self.layer1, self.layer2, self.layer3, self.layer4], x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)


def _create(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> PreActResNet:
    return build_family(PreActResNet, variant, pretrained, classifier='linear', hpm=hpm,
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    return cifar_cfg(first_conv='conv1', classifier='linear', pool_size=(4, 4), **kwargs)


_ANDRIUSHCHENKO = dict(paper_ids='arXiv:2007.02617', paper_name='Understanding and Improving Fast Adversarial '
                       'Training', origin_url='https://github.com/tml-epfl/understanding-fast-adv-training',
                       license='unknown')

# Not published yet (no location: timm does not list them as pretrained); loaded through timm_hpm.robustbench.
default_cfgs = generate_default_cfgs({
    'preact_resnet18.rb_andriushchenko2020understanding_cifar10': _cfg(**_ANDRIUSHCHENKO),
    'hpm_preact_resnet18.rb_andriushchenko2020understanding_cifar10': _cfg(**_ANDRIUSHCHENKO),
})


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-18 for 32x32 images, RobustBench ``PreActResNet`` keys."""
    return _create('preact_resnet18', pretrained, **kwargs)


@register_model
def hpm_preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-18 with the HPM l2-reclassifier head."""
    return _create('hpm_preact_resnet18', pretrained, hpm=True, **kwargs)
