"""Shared model building: timm's ``build_model_with_cfg`` plus the HPM conversion, the per-tag model arguments
of the family files, and errors that say what to do when pretrained weights cannot be had."""
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg

from ..layers.hpm_head import HPM_OPTIONS, HPMOptionError, check_hpm_options
from ._checkpoint import clean_checkpoint, hpm_checkpoint_filter
from ._hpm import attach_hpm_head
from ._weights import (HF_HUB_ORG, PretrainedWeightsUnavailable, UnusableWeights, check_local_dir, hub_errors,
                       hub_id, unavailable_message, weights_location)

__all__ = ['HF_HUB_ORG', 'hub_id', 'PretrainedWeightsUnavailable', 'clean_checkpoint', 'hpm_checkpoint_filter',
           'check_local_dir', 'build_family', 'family_cfgs', 'pretrained_model_args', 'hpm_base_model']

#: ``'model.tag'`` -> the model arguments that tag's checkpoint cannot carry (filled by the family files through
#: :func:`family_cfgs`: one table per family, beside its pretrained cfgs).
_TAG_MODEL_ARGS: Dict[str, Dict[str, Any]] = {}
#: ``'hpm_model.tag'`` -> the ``'model.tag'`` its weights were fine-tuned from (filled through :func:`family_cfgs`).
_HPM_BASES: Dict[str, str] = {}


def family_cfgs(cfgs: Dict[str, Dict[str, Any]], tag_model_args: Optional[Mapping[str, Dict[str, Any]]] = None,
                hpm_bases: Optional[Mapping[str, str]] = None):
    """timm's ``generate_default_cfgs`` for a family file, recording its per-tag model arguments and, for HPM
    weights fine-tuned by this project, the ``model.tag`` each was fine-tuned from (``hpm_bases``: MSA attacks
    through it by default, a transfer surrogate).

    ``tag_model_args``: tag -> arguments a checkpoint cannot carry (e.g. the input normalisation held in
    non-persistent buffers, or the HPM options under ``hpm_cfg``, which are not tensors); they apply to every
    model of ``cfgs`` registered with that tag, and explicit kwargs win.
    """
    for name in cfgs:
        arch, _, tag = name.partition('.')
        if tag in (tag_model_args or {}):
            _TAG_MODEL_ARGS[name] = dict(tag_model_args[tag])
    unknown = sorted(set(hpm_bases or {}) - set(cfgs))
    if unknown:
        raise ValueError(f'hpm_bases names tags this family does not register: {unknown}')
    _HPM_BASES.update(hpm_bases or {})
    return generate_default_cfgs(cfgs)


def hpm_base_model(name_tag: str) -> Optional[str]:
    """The ``model.tag`` the HPM weights ``name_tag`` were fine-tuned from, when its family file records it."""
    return _HPM_BASES.get(name_tag)


def pretrained_model_args(name_tag: str) -> Dict[str, Any]:
    """The model arguments a registered ``model.tag`` implies: its pretrained cfg's ``num_classes`` and its
    family's per-tag arguments (``hpm_cfg`` included), for code that creates the model without the tag."""
    try:
        cfg = get_pretrained_cfg(name_tag, allow_unregistered=False)
    except RuntimeError:  # timm: a registered model with another tag, or no such model
        cfg = None
    if cfg is None:
        raise KeyError(f'{name_tag!r} is not a registered model.tag')
    return {'num_classes': cfg.num_classes, **_TAG_MODEL_ARGS.get(name_tag, {})}


def build_family(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        classifier: str,
        hpm: bool = False,
        hpm_cfg: Optional[Dict[str, Any]] = None,
        unused_checkpoint_modules: Sequence[str] = (),
        **kwargs,
) -> nn.Module:
    """``build_model_with_cfg`` for a family, optionally as an HPM model.

    Args:
        model_cls: the family's class (or a callable taking the model kwargs).
        classifier: name of the linear classifier module (the pretrained cfg's ``classifier``).
        hpm: put an :class:`HPMHead` in place of the classifier.
        hpm_cfg: HPM head options (``mode``, ``tau``, ``alpha``, ``momentum``, ``gamma_init``, ``pseudo_labels``);
            the tag's own (:func:`family_cfgs`) are the defaults. Checked before anything is built or loaded: a
            bad one raises :class:`~timm_hpm.layers.HPMOptionError` (never a weight-loading error).
        unused_checkpoint_modules: top-level modules that the family's checkpoints carry and its architecture
            does not have (dropped on load by :func:`hpm_checkpoint_filter`).
        kwargs: model arguments and ``build_model_with_cfg`` options (``feature_cfg``, ``features_only`` ...).
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    tag_args = dict(_TAG_MODEL_ARGS.get(f'{variant}.{cfg.tag}', {}))
    tag_hpm_cfg = tag_args.pop('hpm_cfg', {})
    for key, value in tag_args.items():
        kwargs.setdefault(key, value)
    if hpm:
        options = {**tag_hpm_cfg, **(hpm_cfg or {})}
        unknown = set(options) - set(HPM_OPTIONS)
        if unknown:
            raise HPMOptionError(f'unknown hpm_cfg options {sorted(unknown)}; valid: {", ".join(HPM_OPTIONS)}.')
        options = check_hpm_options(options)

        def factory(**model_kwargs):
            return attach_hpm_head(model_cls(**model_kwargs), classifier, options, allow_headless=True)
    else:
        if hpm_cfg:
            raise TypeError(f'{variant} is not an HPM model; hpm_cfg applies to the hpm_* models only.')
        factory = model_cls
    if not pretrained:
        return _record_input_size(build_model_with_cfg(factory, variant, False, **kwargs), kwargs)
    if not (cfg.has_weights or cfg.state_dict):
        # timm would warn and go on with random weights; a user who asked for weights gets an error instead
        raise PretrainedWeightsUnavailable(unavailable_message(variant, cfg, LookupError('no weight location')))
    filter_fn = functools.partial(hpm_checkpoint_filter, unused_modules=tuple(unused_checkpoint_modules))
    try:
        # From the Hub, an unreachable endpoint falls back to the local cache inside huggingface_hub itself
        # (no retries; HF_HUB_OFFLINE=1 skips the network), and a cache miss raises LocalEntryNotFoundError.
        model = build_model_with_cfg(factory, variant, True, pretrained_filter_fn=filter_fn, **kwargs)
    except HPMOptionError:
        raise  # an option error is not about the weights
    except UnusableWeights as error:
        # the weights were read, and their content is refused (hpm_checkpoint_filter): no advice about the Hub
        name = f'{variant}.{cfg.tag}' if cfg.tag else variant
        raise UnusableWeights(f'pretrained weights for {name!r} from {weights_location(cfg)}: {error}') from None
    except hub_errors() as error:
        if 'Error(s) in loading state_dict' in str(error):
            raise  # the weights were found but do not fit: torch's message names the missing/unexpected keys
        raise PretrainedWeightsUnavailable(unavailable_message(variant, cfg, error)) from error
    return _record_input_size(model, kwargs)


def _record_input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> nn.Module:
    """Keep ``pretrained_cfg['input_size']`` (and mean/std lengths) true to an ``in_chans``/``img_size`` override,
    so data pipelines and evaluation that read the cfg build the right inputs."""
    cfg = model.pretrained_cfg
    c, h, w = cfg.get('input_size') or (3, 224, 224)
    in_chans = kwargs.get('in_chans', c)
    img_size = kwargs.get('img_size')
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if (in_chans, h, w) != tuple(cfg.get('input_size') or ()):
        cfg['input_size'] = (in_chans, h, w)
        for key in ('mean', 'std'):
            values = tuple(cfg.get(key) or ())
            if values and len(values) != in_chans and len(set(values)) == 1:
                cfg[key] = (values[0],) * in_chans
    return model
