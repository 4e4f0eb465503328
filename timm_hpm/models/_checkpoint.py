"""Checkpoints into models: a flat state dict from a training checkpoint, and timm's ``pretrained_filter_fn`` that
lets an HPM model load a base checkpoint (and a plain model an HPM one) and refuses weights that cannot be used
(non-finite values, an HPM checkpoint without part of its head state)."""
import logging
from typing import Any, Dict, Mapping, Sequence

import torch
import torch.nn as nn

from ._hpm import is_hpm_model
from ._weights import UnusableWeights

__all__ = ['clean_checkpoint', 'hpm_checkpoint_filter', 'check_finite_weights']

_logger = logging.getLogger(__name__)

_PREFIXES = ('module.', 'model.', '_orig_mod.')
_NESTED_KEYS = ('state_dict', 'model_state_dict', 'model')


def clean_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A flat state dict from a training checkpoint: unwraps ``state_dict``/``model`` nesting and strips the
    ``module.`` (DataParallel), ``model.`` (RobustBench wrappers) and ``_orig_mod.`` (torch.compile) prefixes
    shared by every key.

    Kept on purpose instead of timm's ``clean_state_dict``: timm strips ``module.``/``_orig_mod.`` key by key (a
    model's own submodule called ``module`` would lose its name) and knows neither RobustBench's ``model.``
    wrapper nor the ``model_state_dict`` nesting; here a prefix goes only when every key has it."""
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
_UNINITIALISED_WARNING = ('the dataset prototypes start at the FC weights, flagged uninitialised, and must be '
                          'initialised from data before the HPM head is used: fine-tune it (recipes/finetune.py '
                          'initialises them first), or call timm_hpm.train.init_prototypes or '
                          'model.hpm_head.init_prototypes_.')


def check_finite_weights(state_dict: Mapping[str, torch.Tensor]) -> None:
    """:class:`UnusableWeights` naming the first floating-point tensor with a NaN or an inf (a model with such
    weights classifies nothing, and evaluating it would report 0% without a word)."""
    for key, value in state_dict.items():
        if not (value.is_floating_point() or value.is_complex()) or value.device.type == 'meta':
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise UnusableWeights(
                f'the tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {value.numel()}: the file is '
                'corrupt or was saved from a run that diverged. Use weights saved before the divergence (an earlier '
                'checkpoint of the run, with a lower learning rate), or copy/download the file again.')


def _without_head_state(state_dict: Dict[str, torch.Tensor], classifier: Any) -> Dict[str, torch.Tensor]:
    """The state dict less the HPM entries of ``classifier`` (prototypes, their flag and the l2 scale)."""
    if not isinstance(classifier, str):
        return state_dict
    head_keys = {f'{classifier}.{entry}' for entry in _HEAD_STATE}
    return {k: v for k, v in state_dict.items() if k not in head_keys}


def hpm_checkpoint_filter(state_dict: Mapping[str, Any], model: nn.Module, unused_modules: Sequence[str] = ()
                          ) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: clean the checkpoint, and let an HPM model load a *base* checkpoint.

    ``unused_modules``: top-level modules that a family's checkpoints carry and its architecture does not have
    (declared by the family file, see ``build_family``); their entries are dropped.

    A base checkpoint (a plain model's, e.g. RobustBench's) has the FC weights but no HPM entries; those are
    filled with the prototypes set to the FC rows and ``prototypes_initialized`` False, with a warning: the
    prototypes must then be initialised from data (``timm_hpm.train.init_prototypes``) before use.

    An HPM checkpoint has all three HPM entries (``dataset_prototypes``, ``prototypes_initialized``,
    ``log_gamma``); one with some of them but not all is refused (:class:`UnusableWeights`): it was cut short or
    edited, and filling the gap would make up prototypes (e.g. the FC rows flagged initialised by the checkpoint's
    own flag). Its backbone and FC weights can still serve as a base checkpoint: load the file into the plain
    architecture (which ignores the HPM entries), convert it with ``timm_hpm.convert_to_hpm`` and initialise the
    prototypes by fine-tuning.

    The HPM entries belong to the classifier, so they follow timm's rule for a changed head: when the model
    has another number of classes than the checkpoint (or none), timm drops the classifier's weight and bias,
    and the prototypes and the l2 scale go with them (same warning). A plain model loading an HPM checkpoint
    takes everything but the HPM entries.

    Every floating-point tensor that is loaded must be finite (:func:`check_finite_weights`).
    """
    state_dict = _filter(state_dict, model, unused_modules)
    check_finite_weights(state_dict)
    return state_dict


def _filter(state_dict: Mapping[str, Any], model: nn.Module, unused_modules: Sequence[str]) -> Dict[str, torch.Tensor]:
    state_dict = clean_checkpoint(state_dict)
    if unused_modules:
        state_dict = {k: v for k, v in state_dict.items() if k.split('.', 1)[0] not in unused_modules}
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
    if missing and len(missing) < len(_HEAD_STATE):
        present = [f'{name}.{k}' for k in _HEAD_STATE if k not in missing]
        raise UnusableWeights(
            f'an HPM checkpoint (it has {present}) without {[f"{name}.{k}" for k in missing]}: its head state is '
            'incomplete (the file was cut short or edited), and loading it would make up what is missing. Save the '
            'fine-tuned model again (timm_hpm.hub.save_for_hub), or use the file as a base checkpoint: load it into '
            'the plain architecture (without hpm_; it ignores the HPM entries), convert it with '
            'timm_hpm.convert_to_hpm and initialise the prototypes by fine-tuning (recipes/finetune.py).')
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
