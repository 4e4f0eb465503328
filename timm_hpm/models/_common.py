"""Pieces shared by the CIFAR-style families: dataset constants, pretrained cfg, input checks, and timm's
head and feature-extraction API (``forward_head``, ``reset_classifier``, ``forward_intermediates``,
``prune_intermediate_layers``)."""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import create_classifier, to_2tuple
from timm.models._features import feature_take_indices

from ..layers._fx import is_fx_tracing

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


def wrn_stages(depth: int, width: int) -> Tuple[int, List[int]]:
    """Blocks per stage and channels (stem, then the three stages) of a WideResNet-depth-width (depth = 6n + 4)."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f'WideResNet depth must be 6n + 4, got {depth}')
    return (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]


def block_stack(block: Callable[..., nn.Module], num_blocks: int, in_planes: int, out_planes: int, stride: int,
                **kwargs) -> nn.Sequential:
    """``num_blocks`` blocks, the first from ``in_planes`` with ``stride``, the others ``out_planes`` to
    ``out_planes`` with stride 1 (one stage of a ResNet-style network)."""
    return nn.Sequential(*[block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, **kwargs)
                           for i in range(num_blocks)])


def image_size_or_none(img_size: Optional[Union[int, Tuple[int, int]]]) -> Optional[Tuple[int, int]]:
    return None if img_size is None else tuple(to_2tuple(img_size))


def check_image_size(x: torch.Tensor, in_chans: Optional[int], img_size: Optional[Tuple[int, int]]) -> None:
    """A clear error for inputs the model was not built for (rather than a shape error deep inside).

    Reads only the tensor's metadata (no scan of its values: a model does not validate every batch; the
    evaluation and training entry points check ranges and NaN). Skipped while TorchScript compiles and while
    torch.fx traces, where the shapes are symbolic and the model's own layers check them.
    """
    if not torch.jit.is_scripting():
        if is_fx_tracing():
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'expected an image tensor, got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(f'expected a batch of images of shape (B, C, H, W), got shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'expected float images in [0, 1], got dtype {x.dtype}; convert integer images '
                            f'first, e.g. x.float() / 255.')
        if in_chans is not None and x.shape[1] != in_chans:
            raise ValueError(f'this model takes {in_chans}-channel images, got {x.shape[1]} channels '
                             f'(shape {tuple(x.shape)})')
        if img_size is not None and tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(f'this model takes {img_size[0]}x{img_size[1]} images, got {x.shape[-2]}x{x.shape[-1]}; '
                             f'resize the input or create the model with img_size=None to accept any size.')


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """``model.<name> = module`` for a dotted name (``nn.Module.set_submodule`` needs torch >= 2.3)."""
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class FamilyHeadMixin:
    """timm's classifier and feature API for a CIFAR-style family.

    A family sets ``classifier_name`` (its linear classifier's attribute: RobustBench's key names differ per
    family) and ``stage_names`` (the modules whose outputs ``feature_info`` lists), and defines
    ``forward_stem``, ``forward_norm``, ``prune_norm`` and ``forward_head`` (written out per family, so
    TorchScript sees plain attribute access). ``forward_features = forward_norm(stages(forward_stem(x)))``.
    """
    classifier_name: str
    stage_names: Sequence[str]

    def feature_stages(self) -> List[nn.Module]:
        """The stages, in order: the input of stage i + 1 is the output of stage i."""
        return [self.get_submodule(name) for name in self.stage_names]

    def prune_stages(self, keep: int) -> None:
        """Replace every stage after the first ``keep`` by an identity."""
        for name in self.stage_names[keep:]:
            set_submodule(self, name, nn.Identity())

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool=''`` also removes the pooling, so the
        model returns the unpooled feature map, as timm's models do."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, classifier = create_classifier(self.num_features, num_classes, pool_type=pool_type)
        setattr(self, self.classifier_name, classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the outputs of the stages in ``indices`` (all if None, the last n if an int);
        ``norm`` applies the final norm to the last stage's output, as ``forward_features`` does."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__} gives NCHW features only, got output_fmt={output_fmt!r}")
        stages = self.feature_stages()
        take_indices, max_index = feature_take_indices(len(stages), indices)
        last = len(stages) - 1
        x = self.forward_stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            if stop_early and i > max_index:
                break
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.forward_norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return self.forward_norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one ``indices`` needs (and the final norm and the head), as timm's
        ``features_only`` models do, so a feature extractor has no parameters without a gradient."""
        take_indices, max_index = feature_take_indices(len(self.feature_stages()), indices)
        self.prune_stages(max_index + 1)
        if prune_norm:
            self.prune_norm()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices
