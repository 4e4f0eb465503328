"""Shared model-building helpers: timm's ``build_model_with_cfg`` plus the HPM conversion, checkpoint
filtering and errors that say what to do when pretrained weights cannot be had."""
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from ..layers.hpm_head import HPM_OPTIONS
from ._hpm import attach_hpm_head, is_hpm_model

__all__ = ['HF_HUB_ORG', 'hub_id', 'PretrainedWeightsUnavailable', 'clean_checkpoint', 'hpm_checkpoint_filter',
           'check_local_dir', 'build_family']

_logger = logging.getLogger(__name__)

#: The Hugging Face Hub organisation that hosts every timm-hpm weight.
HF_HUB_ORG = 'timm-hpm'

_PREFIXES = ('module.', 'model.', '_orig_mod.')
_NESTED_KEYS = ('state_dict', 'model_state_dict', 'model')


def hub_id(model_name_tag: str) -> str:
    """``'<org>/<model>.<tag>'``: where the weights of a registered ``model.tag`` live on the Hub."""
    return f'{HF_HUB_ORG}/{model_name_tag}'


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (not published yet, offline Hub, missing or corrupt file)."""


def clean_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A flat state dict from a training checkpoint: unwraps ``state_dict``/``model`` nesting and strips the
    ``module.`` (DataParallel), ``model.`` (RobustBench wrappers) and ``_orig_mod.`` (torch.compile) prefixes
    shared by every key."""
    state_dict = dict(checkpoint)
    for key in _NESTED_KEYS:
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = dict(state_dict[key])
            break
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'checkpoint entries are not tensors: {bad[:5]}; expected a state dict.')
    return state_dict


_HEAD_STATE = ('log_gamma', 'dataset_prototypes', 'prototypes_initialized')
_UNINITIALISED_WARNING = ('the dataset prototypes start at the FC weights and must be initialised from data before '
                          'the HPM head is used (timm_hpm.train.init_prototypes or model.hpm_head.init_prototypes_).')


def _without_head_state(state_dict: Dict[str, torch.Tensor], classifier: Any) -> Dict[str, torch.Tensor]:
    """The state dict less the HPM entries of ``classifier`` (prototypes, their flag and the l2 scale)."""
    if not isinstance(classifier, str):
        return state_dict
    head_keys = {f'{classifier}.{entry}' for entry in _HEAD_STATE}
    return {k: v for k, v in state_dict.items() if k not in head_keys}


def hpm_checkpoint_filter(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: clean the checkpoint, and let an HPM model load a *base* checkpoint.

    A base checkpoint (a plain model's, e.g. RobustBench's) has the FC weights but no HPM entries; those are
    filled with the prototypes set to the FC rows and ``prototypes_initialized`` False, with a warning: the
    prototypes must then be initialised from data (``timm_hpm.train.init_prototypes``) before use.

    The HPM entries belong to the classifier, so they follow timm's rule for a changed head: when the model
    has another number of classes than the checkpoint (or none), timm drops the classifier's weight and bias,
    and the prototypes and the l2 scale go with them (same warning). A plain model loading an HPM checkpoint
    takes everything but the HPM entries.
    """
    state_dict = clean_checkpoint(state_dict)
    if not is_hpm_model(model):
        return _without_head_state(state_dict, (getattr(model, 'pretrained_cfg', None) or {}).get('classifier'))
    name = model.hpm_classifier_name
    head = model.hpm_head
    weight = state_dict.get(f'{name}.weight')
    if weight is None:
        return state_dict
    if head is None or weight.shape[0] != head.num_classes:
        if head is not None:
            _logger.warning(f'the checkpoint has {weight.shape[0]} classes and the model {head.num_classes}: the '
                            f'classifier is not loaded, and ' + _UNINITIALISED_WARNING)
        return _without_head_state(state_dict, name)
    missing = [k for k in _HEAD_STATE if f'{name}.{k}' not in state_dict]
    if missing:
        _logger.warning('loading a base (non-HPM) checkpoint into an HPM model: ' + _UNINITIALISED_WARNING)
        fill = {
            'log_gamma': head.log_gamma.detach().clone(),
            'dataset_prototypes': weight.detach().clone(),
            'prototypes_initialized': torch.tensor(False),
        }
        for key in missing:
            state_dict[f'{name}.{key}'] = fill[key]
    return state_dict


def check_local_dir(name: str) -> None:
    """A clear error for a ``local-dir:<folder>`` model whose config.json is missing or broken (timm reads it
    before any of this package's code runs, and would fail with a bare JSONDecodeError or KeyError)."""
    if not name.startswith('local-dir:'):
        return
    config = Path(name[len('local-dir:'):]) / 'config.json'
    try:
        architecture = json.loads(config.read_text()).get('architecture')
    except (OSError, ValueError, AttributeError) as error:
        raise PretrainedWeightsUnavailable(
            f'{config}: not a readable model config ({type(error).__name__}: {error}); a local-dir: folder holds '
            f'the config.json and model.safetensors that timm_hpm.hub.save_for_hub writes.') from None
    if not architecture:
        raise PretrainedWeightsUnavailable(f'{config} names no "architecture"; a local-dir: folder holds the '
                                           'config.json and model.safetensors that timm_hpm.hub.save_for_hub writes.')


def _pretrained_source(variant: str, kwargs: Mapping[str, Any]) -> tuple:
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    return cfg.tag, cfg


def _unavailable_message(variant: str, cfg, error: BaseException) -> str:
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if cfg.source == 'local-dir' or cfg.file:
        empty = cfg.file and Path(cfg.file).is_file() and Path(cfg.file).stat().st_size == 0
        where = f'the file {cfg.file!r}' + (' (it is empty: 0 bytes; copy it again)' if empty else '')
    elif cfg.hf_hub_id:
        where = f'the Hugging Face Hub repository {cfg.hf_hub_id!r} (model.safetensors)'
    else:
        where = (f'anywhere: they are not published yet (planned: the Hugging Face Hub repository '
                 f'{hub_id(name)!r}; the README\'s model table says how to build them)')
    return (
        f'Could not load pretrained weights for {name!r} from {where}: {type(error).__name__}: {error}\n'
        f'timm-hpm weights are expected on the Hub under the organisation {HF_HUB_ORG!r}; if they are not '
        f'published or you are offline, load a local copy instead:\n'
        f"  timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='/path/model.safetensors'))\n"
        f"  timm.create_model('local-dir:/path/to/folder', pretrained=True)   # config.json + model.safetensors\n"
        f'or create it with pretrained=False.')


@contextlib.contextmanager
def _offline_if_unreachable(cfg):
    """When the weights would come from the Hub and the Hub does not answer within seconds, load in offline
    mode (the local cache, or an immediate clear error) instead of minutes of retries."""
    from_hub = cfg.hf_hub_id and not (cfg.file or cfg.state_dict or cfg.source == 'local-dir')
    if not from_hub:
        yield
        return
    from huggingface_hub import constants
    from ..hub import hub_reachable
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    _logger.warning('the Hugging Face Hub is unreachable: using the local cache only (offline mode).')
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _hub_errors() -> tuple:
    errors = [OSError, ValueError, RuntimeError, EOFError]
    try:
        from huggingface_hub import errors as hub_errors
        errors += [hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    try:
        import httpx
        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import pickle
        errors.append(pickle.UnpicklingError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def build_family(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        classifier: str,
        hpm: bool = False,
        hpm_cfg: Optional[Dict[str, Any]] = None,
        tag_model_args: Optional[Mapping[str, Dict[str, Any]]] = None,
        pretrained_filter_fn: Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]] = (
            hpm_checkpoint_filter),
        **kwargs,
) -> nn.Module:
    """``build_model_with_cfg`` for a family, optionally as an HPM model.

    Args:
        model_cls: the family's class (or a callable taking the model kwargs).
        classifier: name of the linear classifier module (the pretrained cfg's ``classifier``).
        hpm: put an :class:`HPMHead` in place of the classifier.
        hpm_cfg: HPM head options (``mode``, ``tau``, ``alpha``, ``momentum``, ``gamma_init``).
        tag_model_args: per-pretrained-tag model arguments that a checkpoint cannot carry (e.g. the input
            normalisation held in non-persistent buffers, or the HPM options under ``hpm_cfg``, which are not
            tensors); explicit kwargs win.
        pretrained_filter_fn: timm's checkpoint filter (a family's own must call :func:`hpm_checkpoint_filter`).
        kwargs: model arguments and ``build_model_with_cfg`` options (``feature_cfg``, ``features_only`` ...).
    """
    tag, cfg = _pretrained_source(variant, kwargs)
    tag_args = dict((tag_model_args or {}).get(tag, {}))
    tag_hpm_cfg = tag_args.pop('hpm_cfg', {})
    for key, value in tag_args.items():
        kwargs.setdefault(key, value)
    if hpm:
        options = {**tag_hpm_cfg, **(hpm_cfg or {})}
        unknown = set(options) - set(HPM_OPTIONS)
        if unknown:
            raise TypeError(f'unknown hpm_cfg options {sorted(unknown)}; valid: {", ".join(HPM_OPTIONS)}.')

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
        raise PretrainedWeightsUnavailable(_unavailable_message(variant, cfg, LookupError('no weight location')))
    try:
        with _offline_if_unreachable(cfg):
            model = build_model_with_cfg(factory, variant, True, pretrained_filter_fn=pretrained_filter_fn,
                                         **kwargs)
    except _hub_errors() as error:
        if 'Error(s) in loading state_dict' in str(error):
            raise  # the weights were found but do not fit: torch's message names the missing/unexpected keys
        raise PretrainedWeightsUnavailable(_unavailable_message(variant, cfg, error)) from error
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

