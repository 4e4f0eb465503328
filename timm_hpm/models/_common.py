"""Pieces shared by the CIFAR-style families: dataset constants, pretrained cfg, the timm head API."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_cfg(**kwargs):
    """Pretrained cfg of a CIFAR-style model: images in [0, 1] (mean 0, std 1 outside: any normalisation
    is inside the model, as RobustBench expects), 32 x 32, no crop."""
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'fixed_input_size': True, 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0), **kwargs,
    }


def check_image_size(x: torch.Tensor, in_chans: int, img_size: Optional[Union[int, Tuple[int, int]]]) -> None:
    """A clear error for inputs the model was not built for (rather than a shape error deep inside)."""
    if x.ndim != 4:
        raise ValueError(f'expected a batch of images of shape (B, C, H, W), got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'this model takes {in_chans}-channel images, got {x.shape[1]} channels '
                         f'(shape {tuple(x.shape)})')
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if tuple(x.shape[-2:]) != size:
            raise ValueError(f'this model takes {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]}; '
                             f'resize the input or create the model with img_size=None to accept any size.')


class FamilyHeadMixin:
    """timm's classifier API for a family with ``global_pool``, ``drop_rate`` and a linear classifier whose
    attribute name is ``classifier_name``."""
    classifier_name: str

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        setattr(self, self.classifier_name,
                nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

