"""DeepMind-style PreActResNet for CIFAR (Rebuffi et al. 2021, Gowal et al. 2021), as used by RobustBench's
PreActResNet-18 entries trained with generated data (Rebuffi2021Fixing_R18_*, Rade2021Helper_R18_*,
Gowal2021Improving_R18_ddpm_100m).

State-dict keys and shapes equal RobustBench's ``DMPreActResNet``: a RobustBench checkpoint loads with
``strict=True`` once its ``module.`` prefix is stripped. Unlike the original PreActResNet (preact_resnet.py), every
3x3 convolution that may stride pads TF-style ('SAME': bottom/right only when strided), the projection shortcut is a
3x3 convolution of the raw (not pre-activated) input, and the final BN-activation comes before pooling. Inputs are
images in [0, 1]; the per-dataset mean/std normalisation happens inside, in non-persistent buffers (a model
argument, set per pretrained tag, not a checkpoint entry).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_act_layer
from timm.models import register_model

from ._builder import build_family, family_cfgs
from ._common import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, block_stack, check_image_size,
                      cifar_cfg, FamilyHeadMixin, image_size_or_none)
from ._conventions import checkpoint_blocks, GradCheckpointingMixin, MATCH_PREV_GROUP

__all__ = ['DMPreActResNet']


def _same_pad(stride: int) -> List[int]:
    """TF 'SAME' padding of a 3x3 convolution: symmetric for stride 1, bottom/right only for stride 2."""
    if stride not in (1, 2):
        raise ValueError(f'unsupported stride {stride}')
    return [1, 1, 1, 1] if stride == 1 else [0, 1, 0, 1]


class DMPreActBlock(nn.Module):
    """Pre-activation basic block; the strided convolutions ('SAME' padded) are the first one and the shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self._pad = _same_pad(stride)
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act_layer()
        self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act_layer()
        self.conv_2d_2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False) \
            if stride != 1 or in_planes != out_planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        # The projection shortcut sees the raw input (the DM WideResNet's sees the pre-activated one).
        shortcut = self.shortcut(F.pad(x, self._pad)) if self.shortcut is not None else x
        out = self.conv_2d_1(F.pad(out, self._pad))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        return out + shortcut


class DMPreActResNet(GradCheckpointingMixin, FamilyHeadMixin, nn.Module):
    """PreActResNet, DeepMind style (SiLU/Swish, 'SAME' padding, normalisation inside).

    Args:
        num_blocks: blocks per stage ((2, 2, 2, 2) for depth 18, (3, 4, 6, 3) for 34).
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        act_layer: activation name or class ('silu' for the Swish models).
        mean, std: per-channel input normalisation applied inside the model.
        padding: zero padding added to the input before normalisation.
        img_size: the input size the model accepts (None accepts any).
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
    """
    classifier_name = 'logits'
    stage_names = ('layer_0', 'layer_1', 'layer_2', 'layer_3')

    def __init__(
            self,
            num_blocks: Sequence[int] = (2, 2, 2, 2),
            num_classes: int = 10,
            in_chans: int = 3,
            act_layer: Union[str, type] = 'silu',
            mean: Union[Tuple[float, ...], float] = CIFAR10_MEAN,
            std: Union[Tuple[float, ...], float] = CIFAR10_STD,
            padding: int = 0,
            img_size: Optional[Union[int, Tuple[int, int]]] = 32,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f'num_blocks must be four positive stage depths, got {num_blocks}')
        act_layer = get_act_layer(act_layer)
        widths = (64, 128, 256, 512)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = image_size_or_none(img_size)
        self.padding = padding
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = widths[-1]
        self.register_buffer('mean', torch.as_tensor(mean, dtype=torch.float32).expand(in_chans).reshape(
            in_chans, 1, 1).clone(), persistent=False)
        self.register_buffer('std', torch.as_tensor(std, dtype=torch.float32).expand(in_chans).reshape(
            in_chans, 1, 1).clone(), persistent=False)
        self.conv_2d = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        self.feature_info = []
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            setattr(self, f'layer_{i}', block_stack(DMPreActBlock, n, in_planes, planes, 1 if i == 0 else 2,
                                                    act_layer=act_layer))
            in_planes = planes
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** i, module=f'layer_{i}'))
        self.batchnorm = nn.BatchNorm2d(widths[-1])
        self.relu = act_layer()
        self.global_pool, self.logits = create_classifier(widths[-1], num_classes, pool_type=global_pool)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        if self.padding > 0:
            x = F.pad(x, (self.padding, self.padding, self.padding, self.padding))
        return self.conv_2d((x - self.mean) / self.std)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.batchnorm(x))

    def prune_norm(self) -> None:
        self.batchnorm, self.relu = nn.Identity(), nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): the stem, then each block (``coarse``: each stage), the
        final norm with the last of them; the classifier is left to timm's last group."""
        blocks = r'^layer_(\d+)\.' if coarse else r'^layer_(\d+)\.(\d+)\.'
        return dict(stem=r'^conv_2d\.', blocks=[(blocks, None), (r'^batchnorm\.', MATCH_PREV_GROUP)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks([self.layer_0, self.layer_1, self.layer_2, self.layer_3], x)
        else:
            x = self.layer_3(self.layer_2(self.layer_1(self.layer_0(x))))
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.logits(x)


def _create_dm_preact(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> DMPreActResNet:
    return build_family(DMPreActResNet, variant, pretrained, classifier='logits', hpm=hpm,
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    return cifar_cfg(first_conv='conv_2d', classifier='logits', pool_size=(4, 4), **kwargs)


_CIFAR10 = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)
_CIFAR100 = dict(mean=CIFAR100_MEAN, std=CIFAR100_STD)

# Per-weight model arguments the checkpoint cannot carry (normalisation buffers are non-persistent).
_TAG_MODEL_ARGS = {
    'rb_rebuffi2021fixing_ddpm_cifar10': _CIFAR10,
    'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2': _CIFAR10,
    'rb_rebuffi2021fixing_ddpm_cifar100': _CIFAR100,
    'rb_rade2021helper_ddpm_cifar10': _CIFAR10,
    'rb_rade2021helper_extra_cifar10': _CIFAR10,
    'rb_rade2021helper_ddpm_cifar10_l2': _CIFAR10,
    'rb_rade2021helper_ddpm_cifar100': _CIFAR100,
    'rb_gowal2021improving_ddpm_100m_cifar10': _CIFAR10,
}

# The papers as RobustBench's model_info links them.
_REBUFFI2021 = dict(paper_ids='arXiv:2103.01946', paper_name='Fixing Data Augmentation to Improve Adversarial '
                    'Robustness', origin_url='https://arxiv.org/abs/2103.01946', license='unknown')
_RADE2021 = dict(paper_ids='openreview:BuD2LmNaU3a', paper_name='Helper-based Adversarial Training: Reducing '
                 'Excessive Margin to Achieve a Better Accuracy vs. Robustness Trade-off',
                 origin_url='https://openreview.net/forum?id=BuD2LmNaU3a', license='unknown')
_GOWAL2021 = dict(paper_ids='arXiv:2110.09468', paper_name='Improving Robustness using Generated Data',
                  origin_url='https://arxiv.org/abs/2110.09468', license='unknown')

# tag -> (number of classes, the weights' facts)
_TAGS = {
    'rb_rebuffi2021fixing_ddpm_cifar10': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_ddpm_cifar100': (100, _REBUFFI2021),
    'rb_rade2021helper_ddpm_cifar10': (10, _RADE2021),
    'rb_rade2021helper_extra_cifar10': (10, _RADE2021),
    'rb_rade2021helper_ddpm_cifar10_l2': (10, _RADE2021),
    'rb_rade2021helper_ddpm_cifar100': (100, _RADE2021),
    'rb_gowal2021improving_ddpm_100m_cifar10': (10, _GOWAL2021),
}


def _weights(arch: str):
    # RobustBench's weights (not published here yet: no location, so timm does not list them as pretrained; loading
    # goes through timm_hpm.robustbench).
    return {f'{arch}.{tag}': _cfg(num_classes=n, **facts) for tag, (n, facts) in _TAGS.items()}


default_cfgs = family_cfgs({
    **_weights('dm_preact_resnet18'),
    **_weights('hpm_dm_preact_resnet18'),
}, _TAG_MODEL_ARGS)


@register_model
def dm_preact_resnet18(pretrained: bool = False, **kwargs) -> DMPreActResNet:
    """PreActResNet-18, DeepMind style (SiLU), RobustBench ``DMPreActResNet`` keys."""
    return _create_dm_preact('dm_preact_resnet18', pretrained, **dict(dict(num_blocks=(2, 2, 2, 2)), **kwargs))


@register_model
def hpm_dm_preact_resnet18(pretrained: bool = False, **kwargs) -> DMPreActResNet:
    """PreActResNet-18 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_preact('hpm_dm_preact_resnet18', pretrained, hpm=True,
                             **dict(dict(num_blocks=(2, 2, 2, 2)), **kwargs))
