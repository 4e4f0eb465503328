"""``convert_to_hpm``: put an HPM head on any timm model or plain module with a final ``nn.Linear``."""
from typing import Any, Dict, Optional, Type

import torch
import torch.nn as nn

from ..layers.hpm_head import HPMHead, check_hpm_options
from ._common import check_image_size, set_submodule

__all__ = ['convert_to_hpm', 'attach_hpm_head', 'HPMModelMixin', 'is_hpm_model', 'get_hpm_head']


class HPMModelMixin:
    """Mixed into a model's class by :func:`convert_to_hpm` (the class becomes ``HPM<Name>``).

    The classifier module is replaced in place by an :class:`HPMHead`, so state-dict keys stay those of
    the base model (plus the head's prototypes and scale) and every timm method keeps working: the model's
    own ``forward_head`` calls the head on the pre-logit features. The mixin adds ``hpm_head``, a
    ``forward(x, targets=None, return_fc=False)`` that hands labels to the head (for the EMA update) and can
    return the FC logits too, and an HPM-aware ``reset_classifier``. Under TorchScript, ``forward`` is the
    model's plain ``forward_head(forward_features(x))``.
    """
    hpm_classifier_name: str
    hpm_in_chans: Optional[int]
    __jit_unused_properties__ = ['hpm_head']  # an eager-mode convenience; TorchScript runs forward_head

    @property
    def hpm_head(self) -> Optional[HPMHead]:
        head = self.get_submodule(self.hpm_classifier_name)
        return head if isinstance(head, HPMHead) else None

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_fc: bool = False) -> torch.Tensor:
        """Logits of the HPM head in its current mode.

        Args:
            x: images (B, C, H, W).
            targets: labels; in training mode they update the dataset prototypes (EMA).
            return_fc: also return the FC logits of the same forward, as ``HPMOutput(logits, fc_logits)``.
        """
        if torch.jit.is_scripting():
            return self.forward_head(self.forward_features(x))
        return self._forward_hpm(x, targets, return_fc)

    @torch.jit.unused
    def _forward_hpm(self, x: torch.Tensor, targets: Optional[torch.Tensor], return_fc: bool):
        # Only the input's metadata is checked (no scan of its values: that belongs where data enters).
        check_image_size(x, self.hpm_in_chans, None)
        head = self.hpm_head
        if head is None:
            if targets is not None or return_fc:
                raise RuntimeError('this model has no HPM head (its classifier was reset to num_classes=0).')
            return self.forward_head(self.forward_features(x))
        features = self.forward_head(self.forward_features(x), pre_logits=True)
        return head(features, targets=targets, return_fc=return_fc)

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        head = self.hpm_head
        options = head.hpm_config() if head is not None else getattr(self, '_hpm_options', {})
        self._hpm_options = options
        base_reset = getattr(super(), 'reset_classifier', None)
        if base_reset is not None:
            base_reset(num_classes, *args, **kwargs)
        else:
            set_submodule(self, self.hpm_classifier_name,
                          nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())
        new = self.get_submodule(self.hpm_classifier_name)
        if isinstance(new, nn.Linear):
            set_submodule(self, self.hpm_classifier_name, HPMHead.from_linear(new, **options))
        if hasattr(self, 'num_classes'):
            self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.hpm_classifier_name)


class _ClassifierInput(Exception):
    """Carries the classifier's input out of a plain module's forward (raised by a pre-hook)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


def _stop_at_classifier(module: nn.Module, args: tuple):
    raise _ClassifierInput(args[0])


class _PlainModuleAPI:
    """timm's feature API for plain modules (e.g. RobustBench architectures) that lack it: the pre-logit
    features are the classifier's input, taken by a forward pre-hook that stops the forward there (so the head
    never runs on its way to the features)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit (pooled) features: the classifier's input."""
        handle = self.get_submodule(self.hpm_classifier_name).register_forward_pre_hook(_stop_at_classifier)
        try:
            super().forward(x)
        except _ClassifierInput as stop:
            return stop.features
        finally:
            handle.remove()
        raise RuntimeError(f'{type(self).__name__}.forward never called its classifier '
                           f'{self.hpm_classifier_name!r}: convert_to_hpm needs a model that applies it.')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.get_submodule(self.hpm_classifier_name)(x)


_HPM_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


def _hpm_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    if cls not in _HPM_CLASSES:
        bases = (HPMModelMixin, cls) if hasattr(cls, 'forward_features') else (HPMModelMixin, _PlainModuleAPI, cls)
        _HPM_CLASSES[cls] = type(f'HPM{cls.__name__}', bases, {'__module__': cls.__module__,
                                                              '__doc__': cls.__doc__})
    return _HPM_CLASSES[cls]


def _find_classifier_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('classifier')
    if isinstance(name, (tuple, list)):
        if len(name) != 1:
            raise ValueError(f'model has several classifiers {tuple(name)}; pass classifier=<name> to '
                             'convert_to_hpm to choose one.')
        name = name[0]
    if name:
        return name
    if hasattr(model, 'get_classifier'):
        classifier = model.get_classifier()
        for module_name, module in model.named_modules():
            if module is classifier and module_name:
                return module_name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f'{type(model).__name__} has no nn.Linear classifier to convert; pass classifier=<module '
                         'name> if the classifier has another name.')
    return linears[-1]


def _first_conv_in_chans(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_conv = cfg.get('first_conv')
    if isinstance(first_conv, (tuple, list)):
        first_conv = first_conv[0] if first_conv else None
    if first_conv:
        try:
            module = model.get_submodule(first_conv)
            return getattr(module, 'in_channels', None)
        except AttributeError:
            pass
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def is_hpm_model(model: nn.Module) -> bool:
    return isinstance(model, HPMModelMixin)


def get_hpm_head(model: nn.Module) -> HPMHead:
    """The HPM head of a converted model (also through a DDP/accelerate wrapper); a clear error otherwise."""
    model = getattr(model, 'module', model)
    head = model.hpm_head if isinstance(model, HPMModelMixin) else None
    if head is None:
        raise ValueError(f'{type(model).__name__} has no HPM head; create an hpm_* model or call '
                         'timm_hpm.convert_to_hpm(model) first.')
    return head


def convert_to_hpm(model: nn.Module, *, classifier: Optional[str] = None, **hpm_options: Any) -> nn.Module:
    """Replace ``model``'s linear classifier by an :class:`HPMHead` reusing the trained FC weights (in place).

    Works on timm models (the classifier is found through ``pretrained_cfg['classifier']`` or
    ``get_classifier()``) and on plain modules whose classifier is their last ``nn.Linear`` (e.g. RobustBench
    architectures); ``classifier='name'`` names it explicitly. ``hpm_options`` are :class:`HPMHead` options
    (``mode``, ``tau``, ``alpha``, ``momentum``, ``gamma_init``, ``pseudo_labels``), checked before the model is
    touched (:class:`~timm_hpm.layers.HPMOptionError`). Returns the same model object.
    """
    if isinstance(model, HPMModelMixin):
        raise ValueError('model already has an HPM head; change its options with model.hpm_head.set_options(...) '
                         'instead.')
    return attach_hpm_head(model, classifier or _find_classifier_name(model), hpm_options, allow_headless=False)


def attach_hpm_head(model: nn.Module, name: str, hpm_options: Dict[str, Any], allow_headless: bool) -> nn.Module:
    """The conversion itself; ``allow_headless`` accepts an ``nn.Identity`` classifier (``num_classes=0``),
    as timm's factories must. The options are checked first (also for a headless model, which keeps them for
    ``reset_classifier``)."""
    hpm_options = check_hpm_options(hpm_options)
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f'{type(model).__name__} has no module named {name!r} to use as classifier.') from None
    if isinstance(linear, nn.Linear):
        set_submodule(model, name, HPMHead.from_linear(linear, **hpm_options))
    elif not (allow_headless and isinstance(linear, nn.Identity)):
        raise TypeError(
            f"the classifier {name!r} of {type(model).__name__} is {type(linear).__name__}, not nn.Linear: HPM "
            f"reuses a trained linear classifier (a model created with num_classes=0 has none).")
    in_chans = _first_conv_in_chans(model)
    model.__class__ = _hpm_class(type(model))
    model.hpm_classifier_name = name
    model.hpm_in_chans = in_chans
    model._hpm_options = dict(hpm_options)
    if isinstance(linear, nn.Linear):
        if not hasattr(model, 'num_features'):
            model.num_features = linear.in_features
        if not hasattr(model, 'num_classes'):
            model.num_classes = linear.out_features
        if not getattr(model, 'pretrained_cfg', None):
            model.pretrained_cfg = dict(classifier=name, num_classes=linear.out_features)
    return model
