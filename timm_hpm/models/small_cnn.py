"""SmallCNN (Zhang et al. 2019, the TRADES MNIST model): four 3x3 convolutions and two 200-unit layers.

The project's CPU-scale family: adversarial training on Fashion-MNIST fits in tens of minutes on two cores.
Inputs are 1 x 28 x 28 images in [0, 1] (no normalisation). The pre-logit features are the 200-d output of
the second fully connected layer; ``fc`` is the linear classifier the HPM head replaces.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, register_model

from ._builder import build_family, family_cfgs, hub_id
from ._common import check_image_size, cifar_cfg, FamilyHeadMixin, image_size_or_none
from ._conventions import GradCheckpointingMixin

__all__ = ['SmallCNN']


class SmallCNN(GradCheckpointingMixin, FamilyHeadMixin, nn.Module):
    """Args:
        num_classes: classifier size (0 for a feature extractor).
        in_chans: input channels.
        img_size: input size (the fully connected layers are sized for it).
        hidden: width of the two fully connected layers.
        drop_rate: dropout between the fully connected layers (the original uses 0.5).
        global_pool: ``'flatten'`` (the architecture: the feature map is flattened into the two fully connected
            layers) or ``''`` (no head at all: the model returns the unpooled feature map; needs
            ``num_classes=0``), as timm's ``global_pool=''``.
    """
    classifier_name = 'fc'
    # the feature levels: after the first two convolutions, after the next two, after the last max-pool
    _stage_ends = (4, 9, 10)

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: Union[int, Tuple[int, int]] = 28,
                 hidden: int = 200, drop_rate: float = 0.5, global_pool: str = 'flatten'):
        super().__init__()
        size = image_size_or_none(img_size)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h = ((size[0] - 4) // 2 - 4) // 2
        w = ((size[1] - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f'SmallCNN needs images of at least 16x16, got {size}')
        self.fc1 = nn.Linear(64 * h * w, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.num_features = 64  # channels of forward_features, as timm counts them
        self.head_hidden_size = hidden  # the pre-logit features
        self.global_pool = ''
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        self.feature_info = [dict(num_chs=32, reduction=1, module='features.3'),
                             dict(num_chs=64, reduction=2, module='features.8'),
                             dict(num_chs=64, reduction=4, module='features.9')]

    def feature_stages(self) -> List[nn.Module]:
        bounds = zip((0,) + self._stage_ends[:-1], self._stage_ends)
        return [self.features[start:end] for start, end in bounds]

    def prune_stages(self, keep: int) -> None:
        for i in range(self._stage_ends[keep - 1], len(self.features)):
            self.features[i] = nn.Identity()

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:  # the fully connected layers are this model's head: a feature extractor has none
            self.fc1, self.fc2 = nn.Identity(), nn.Identity()
        return take_indices

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.in_chans, self.img_size)
        return x

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prune_norm(self) -> None:
        pass  # no final norm

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): the first convolution, then each convolution (``coarse``:
        each stage of ``feature_stages``: features[0:4], features[4:9]), then the two fully connected layers; the
        classifier ``fc`` is left unmatched: timm puts it in the last group."""
        blocks = [(r'^features\.[1-3]\.', (0,)), (r'^features\.[4-8]\.', (1,))] if coarse else r'^features\.(\d+)\.'
        return dict(stem=r'^features\.0\.', blocks=blocks, pre_logits=r'^fc[12]\.' if coarse else r'^fc([12])\.')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.feature_stages(), x)  # one segment per stage (a block is a layer here)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == '':
            return x  # no head: the unpooled feature map (num_classes is 0)
        x = torch.relu(self.fc1(x.flatten(1)))
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        x = torch.relu(self.fc2(x))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('flatten', ''):
                raise ValueError(f"SmallCNN flattens its feature map into fully connected layers "
                                 f"(global_pool='flatten') or has no head (global_pool=''), got {global_pool!r}.")
            if global_pool == '' and num_classes > 0:
                raise ValueError("global_pool='' returns the unpooled feature map: it needs num_classes=0.")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()


def _create(variant: str, pretrained: bool = False, hpm: bool = False, **kwargs) -> SmallCNN:
    return build_family(SmallCNN, variant, pretrained, classifier='fc', hpm=hpm,
                        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs):
    return cifar_cfg(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,), first_conv='features.0', classifier='fc',
                     pool_size=(4, 4), **kwargs)


#: Weights that ship inside the package (small enough, and the study's results are reproducible offline).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / 'weights'


def _shipped(name_tag: str, file_tag: str = None, **kwargs):
    """A pretrained cfg whose weights are a file in the package (loaded offline, ``file_tag`` names it when
    another tag's weights are reused); the same weights are meant for the Hub under the project's organisation."""
    return _cfg(file=str(SHIPPED_WEIGHTS / f'{file_tag or name_tag}.safetensors'), hf_hub_id=hub_id(name_tag),
                **kwargs)


# Trained by this project (recipes/configs/fashion_mnist_*.yaml; the architecture is TRADES' SmallCNN).
_FMNIST = dict(license='apache-2.0', num_classes=10, paper_ids='arXiv:1901.08573',
               paper_name='Theoretically Principled Trade-off between Robustness and Accuracy (SmallCNN)',
               origin_url='recipes/configs/fashion_mnist_base.yaml')
_FMNIST_HPM = dict(_FMNIST, paper_ids='arXiv:2606.01746', origin_url='recipes/tune_hpm.py',
                   paper_name='Sensitivity as a Double-Edged Sword (HPM)')
# The HPM options a checkpoint cannot carry (they are not tensors): those the fine-tuning run used.
_TAG_MODEL_ARGS = {'fmnist_hpm': {'hpm_cfg': dict(alpha=0.5, tau=1.0, momentum=0.9)}}
default_cfgs = family_cfgs({
    # PGD-AT (Linf eps 0.1) on Fashion-MNIST from scratch: recipes/configs/fashion_mnist_base.yaml
    'small_cnn.fmnist_pgdat': _shipped('small_cnn.fmnist_pgdat', **_FMNIST),
    # the budget-matched control: the base fine-tuned with plain PGD-AT and the HPM model's exact budget
    # (recipes/configs/fashion_mnist_control.yaml); every HPM figure is read against it
    'small_cnn.fmnist_control': _shipped('small_cnn.fmnist_control', **dict(
        _FMNIST, origin_url='recipes/configs/fashion_mnist_control.yaml')),
    # HPM fine-tuned from it: the best candidate of studies/fashion_mnist/configs/hpm_sweep.yaml
    'hpm_small_cnn.fmnist_hpm': _shipped('hpm_small_cnn.fmnist_hpm', **_FMNIST_HPM),
    # the HPM model with the base's weights (prototypes still to be initialised from data: the fine-tuning start)
    'hpm_small_cnn.fmnist_pgdat': _shipped('hpm_small_cnn.fmnist_pgdat', 'small_cnn.fmnist_pgdat', **_FMNIST_HPM),
}, _TAG_MODEL_ARGS, hpm_bases={'hpm_small_cnn.fmnist_hpm': 'small_cnn.fmnist_pgdat'})


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """SmallCNN (TRADES' MNIST model) for 28x28 grey images."""
    return _create('small_cnn', pretrained, **kwargs)


@register_model
def hpm_small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """SmallCNN with the HPM l2-reclassifier head."""
    return _create('hpm_small_cnn', pretrained, hpm=True, **kwargs)
