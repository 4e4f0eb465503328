"""DeepMind-style WideResNet for CIFAR (Gowal et al. 2020), as used by the strongest RobustBench CIFAR
checkpoints (Wang2023Better, Cui2023Decoupled, Gowal2021, Rebuffi2021).

State-dict keys and shapes equal RobustBench's ``DMWideResNet``: a RobustBench checkpoint loads with
``strict=True`` once its ``module.`` prefix is stripped. Inputs are images in [0, 1]; the per-dataset
mean/std normalisation happens inside, in non-persistent buffers (so it is a model argument, set per
pretrained tag, not a checkpoint entry).

Over 250 lines on purpose: a third of the file is the table of RobustBench tags (data, one line per checkpoint),
kept here because a checkpoint's quirks live with its tag.
"""
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_act_layer
from timm.models import register_model

from ._builder import build_family, family_cfgs
from ._common import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, block_stack, check_image_size,
                      cifar_cfg, FamilyHeadMixin, image_size_or_none, wrn_stages)
from ._conventions import checkpoint_blocks, GradCheckpointingMixin, MATCH_PREV_GROUP

__all__ = ['DMWideResNet']


class _Block(nn.Module):
    """Pre-activation basic block with TF 'SAME' padding for the strided convolution."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'unsupported stride {stride}')
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act_layer()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act_layer()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) \
            if in_planes != out_planes else None
        # 'SAME' padding as in the original JAX models: symmetric for stride 1, bottom/right for stride 2.
        self._pad = [1, 1, 1, 1] if stride == 1 else [0, 1, 0, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        # With a projection shortcut, the shortcut sees the pre-activated input (as in the reference models).
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv_0(F.pad(out, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return shortcut + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self.block = block_stack(_Block, num_blocks, in_planes, out_planes, stride, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(GradCheckpointingMixin, FamilyHeadMixin, nn.Module):
    """WideResNet-depth-width, DeepMind style (pre-activation, SiLU/Swish, normalisation inside).

    Args:
        depth: 6n + 4.
        width: widening factor.
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        act_layer: activation name or class ('silu' for Swish models, 'relu' for the original ones).
        mean, std: per-channel input normalisation applied inside the model.
        padding: zero padding added to the input before normalisation (some RobustBench models use 2).
        img_size: the input size the model accepts (None accepts any).
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
    """

    def __init__(
            self,
            depth: int = 28,
            width: int = 10,
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
        act_layer = get_act_layer(act_layer)
        num_blocks, channels = wrn_stages(depth, width)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = image_size_or_none(img_size)
        self.padding = padding
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = channels[3]
        self.register_buffer('mean', torch.as_tensor(mean, dtype=torch.float32).expand(in_chans).reshape(
            in_chans, 1, 1).clone(), persistent=False)
        self.register_buffer('std', torch.as_tensor(std, dtype=torch.float32).expand(in_chans).reshape(
            in_chans, 1, 1).clone(), persistent=False)
        self.init_conv = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(num_blocks, channels[0], channels[1], 1, act_layer=act_layer),
            _BlockGroup(num_blocks, channels[1], channels[2], 2, act_layer=act_layer),
            _BlockGroup(num_blocks, channels[2], channels[3], 2, act_layer=act_layer),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3])
        self.relu = act_layer()
        self.global_pool, self.logits = create_classifier(channels[3], num_classes, pool_type=global_pool)
        self.feature_info = [
            dict(num_chs=channels[1], reduction=1, module='layer.0'),
            dict(num_chs=channels[2], reduction=2, module='layer.1'),
            dict(num_chs=channels[3], reduction=4, module='layer.2'),
        ]

    classifier_name = 'logits'
    stage_names = ('layer.0', 'layer.1', 'layer.2')

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        if self.padding > 0:
            x = F.pad(x, (self.padding, self.padding, self.padding, self.padding))
        return self.init_conv((x - self.mean) / self.std)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.batchnorm(x))

    def prune_norm(self) -> None:
        self.batchnorm, self.relu = nn.Identity(), nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): the stem, then each block (``coarse``: each block group),
        the final norm with the last of them; the classifier is left to timm's last group."""
        blocks = r'^layer\.(\d+)\.' if coarse else r'^layer\.(\d+)\.block\.(\d+)\.'
        return dict(stem=r'^init_conv\.', blocks=[(blocks, None), (r'^batchnorm\.', MATCH_PREV_GROUP)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks([g.block if isinstance(g, _BlockGroup) else g for g in self.layer], x)
        else:
            x = self.layer(x)
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.logits(x)


def _create_dm_wrn(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> DMWideResNet:
    return build_family(DMWideResNet, variant, pretrained, classifier='logits', hpm=hpm,
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs):
    return cifar_cfg(first_conv='init_conv', classifier='logits', pool_size=(8, 8), **kwargs)


_CIFAR10 = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)
_CIFAR100 = dict(mean=CIFAR100_MEAN, std=CIFAR100_STD)


def _facts(arxiv_id: str, paper_name: str):
    # the paper as RobustBench's model_info links it
    return dict(paper_ids=f'arXiv:{arxiv_id}', paper_name=paper_name, origin_url=f'https://arxiv.org/abs/{arxiv_id}',
                license='unknown')


_WANG2023 = dict(paper_ids='arXiv:2302.04638', paper_name='Better Diffusion Models Further Improve Adversarial '
                 'Training', origin_url='https://github.com/wzekai99/DM-Improves-AT', license='unknown')
_GOWAL2020 = _facts('2010.03593', 'Uncovering the Limits of Adversarial Training against Norm-Bounded Adversarial '
                    'Examples')
_REBUFFI2021 = _facts('2103.01946', 'Fixing Data Augmentation to Improve Adversarial Robustness')
_GOWAL2021 = _facts('2110.09468', 'Improving Robustness using Generated Data')
_PANG2022 = _facts('2202.10103', 'Robustness and Accuracy Could Be Reconcilable by (Proper) Definition')
_XU2023 = _facts('2302.03015', 'Exploring and Exploiting Decision Boundary Dynamics for Adversarial Robustness')
_CUI2023 = _facts('2305.13948', 'Decoupled Kullback-Leibler Divergence Loss')
_BARTOLDSON2024 = _facts('2404.09349', 'Adversarial Robustness Limits via Scaling-Law and Human-Alignment Studies')

# tag -> (number of classes, the weights' facts). The normalisation follows the dataset (non-persistent buffers, so
# a model argument: _TAG_MODEL_ARGS); every one of these checkpoints uses SiLU/Swish, the family's default.
_TAGS = {
    'rb_wang2023better_cifar10': (10, _WANG2023),
    'rb_wang2023better_cifar100': (100, _WANG2023),
    'rb_wang2023better_cifar10_l2': (10, _WANG2023),  # the L2 (eps 0.5) weights
    'rb_gowal2020uncovering_extra_cifar10': (10, _GOWAL2020),
    'rb_gowal2020uncovering_cifar10_l2': (10, _GOWAL2020),
    'rb_gowal2020uncovering_extra_cifar10_l2': (10, _GOWAL2020),
    'rb_gowal2020uncovering_cifar100': (100, _GOWAL2020),
    'rb_gowal2020uncovering_extra_cifar100': (100, _GOWAL2020),
    'rb_rebuffi2021fixing_cutmix_ddpm_cifar10': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_cutmix_extra_cifar10': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_cutmix_extra_cifar10_l2': (10, _REBUFFI2021),
    'rb_rebuffi2021fixing_cutmix_ddpm_cifar100': (100, _REBUFFI2021),
    'rb_gowal2021improving_ddpm_100m_cifar10': (10, _GOWAL2021),
    'rb_pang2022robustness_cifar10': (10, _PANG2022),
    'rb_pang2022robustness_cifar100': (100, _PANG2022),
    'rb_xu2023exploring_cifar10': (10, _XU2023),
    'rb_cui2023decoupled_cifar10': (10, _CUI2023),
    'rb_cui2023decoupled_cifar100': (100, _CUI2023),
    'rb_bartoldson2024adversarial_cifar10': (10, _BARTOLDSON2024),
}

# Per-weight model arguments the checkpoint cannot carry (normalisation buffers are non-persistent).
_TAG_MODEL_ARGS = {tag: _CIFAR100 if n == 100 else _CIFAR10 for tag, (n, _) in _TAGS.items()}

# architecture -> the tags of RobustBench weights it has (CIFAR-10 first: the first tag is the default cfg)
_ARCH_TAGS = {
    'wrn28_10': ('rb_wang2023better_cifar10', 'rb_wang2023better_cifar100', 'rb_wang2023better_cifar10_l2',
                 'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2', 'rb_rebuffi2021fixing_cutmix_ddpm_cifar100',
                 'rb_gowal2021improving_ddpm_100m_cifar10', 'rb_xu2023exploring_cifar10', 'rb_cui2023decoupled_cifar10',
                 'rb_cui2023decoupled_cifar100'),
    'wrn70_16': ('rb_wang2023better_cifar10', 'rb_wang2023better_cifar100', 'rb_wang2023better_cifar10_l2',
                 'rb_gowal2020uncovering_extra_cifar10', 'rb_gowal2020uncovering_cifar10_l2',
                 'rb_gowal2020uncovering_extra_cifar10_l2', 'rb_gowal2020uncovering_cifar100',
                 'rb_gowal2020uncovering_extra_cifar100', 'rb_rebuffi2021fixing_cutmix_ddpm_cifar10',
                 'rb_rebuffi2021fixing_cutmix_extra_cifar10', 'rb_rebuffi2021fixing_cutmix_ddpm_cifar10_l2',
                 'rb_rebuffi2021fixing_cutmix_extra_cifar10_l2', 'rb_rebuffi2021fixing_cutmix_ddpm_cifar100',
                 'rb_gowal2021improving_ddpm_100m_cifar10', 'rb_pang2022robustness_cifar10',
                 'rb_pang2022robustness_cifar100'),
    'wrn82_8': ('rb_bartoldson2024adversarial_cifar10',),
    'wrn94_16': ('rb_bartoldson2024adversarial_cifar10',),
    'wrn106_16': ('rb_rebuffi2021fixing_cutmix_ddpm_cifar10',),
}


def _weights(arch: str):
    # RobustBench's weights, converted when a session with the data and a GPU builds the tag (not published yet:
    # no location here, so timm does not list them as pretrained; loading goes through timm_hpm.robustbench).
    return {f'{name}.{tag}': _cfg(num_classes=_TAGS[tag][0], **_TAGS[tag][1])
            for tag in _ARCH_TAGS[arch] for name in (arch, f'hpm_{arch}')}


default_cfgs = family_cfgs({k: v for arch in _ARCH_TAGS for k, v in _weights(arch).items()}, _TAG_MODEL_ARGS)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-28-10, DeepMind style (SiLU), RobustBench ``DMWideResNet`` keys."""
    return _create_dm_wrn('wrn28_10', pretrained, **dict(dict(depth=28, width=10), **kwargs))


@register_model
def wrn70_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-70-16, DeepMind style (SiLU), RobustBench ``DMWideResNet`` keys."""
    return _create_dm_wrn('wrn70_16', pretrained, **dict(dict(depth=70, width=16), **kwargs))


@register_model
def hpm_wrn28_10(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-28-10 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_wrn('hpm_wrn28_10', pretrained, hpm=True, **dict(dict(depth=28, width=10), **kwargs))


@register_model
def hpm_wrn70_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-70-16 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_wrn('hpm_wrn70_16', pretrained, hpm=True, **dict(dict(depth=70, width=16), **kwargs))


@register_model
def wrn82_8(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-82-8, DeepMind style (SiLU), RobustBench ``DMWideResNet`` keys."""
    return _create_dm_wrn('wrn82_8', pretrained, **dict(dict(depth=82, width=8), **kwargs))


@register_model
def wrn94_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-94-16, DeepMind style (SiLU), RobustBench ``DMWideResNet`` keys."""
    return _create_dm_wrn('wrn94_16', pretrained, **dict(dict(depth=94, width=16), **kwargs))


@register_model
def wrn106_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-106-16, DeepMind style (SiLU), RobustBench ``DMWideResNet`` keys."""
    return _create_dm_wrn('wrn106_16', pretrained, **dict(dict(depth=106, width=16), **kwargs))


@register_model
def hpm_wrn82_8(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-82-8 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_wrn('hpm_wrn82_8', pretrained, hpm=True, **dict(dict(depth=82, width=8), **kwargs))


@register_model
def hpm_wrn94_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-94-16 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_wrn('hpm_wrn94_16', pretrained, hpm=True, **dict(dict(depth=94, width=16), **kwargs))


@register_model
def hpm_wrn106_16(pretrained: bool = False, **kwargs) -> DMWideResNet:
    """WideResNet-106-16 (DeepMind style) with the HPM l2-reclassifier head."""
    return _create_dm_wrn('hpm_wrn106_16', pretrained, hpm=True, **dict(dict(depth=106, width=16), **kwargs))
