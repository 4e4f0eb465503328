"""Checkpoints into models: a flat state dict from a training checkpoint, and timm's ``pretrained_filter_fn`` that
lets an HPM model load a base checkpoint (and a plain model an HPM one)."""
import logging
from typing import Any, Dict, Mapping, Sequence

import torch
import torch.nn as nn

from ._hpm import is_hpm_model

__all__ = ['clean_checkpoint', 'hpm_checkpoint_filter']

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
_UNINITIALISED_WARNING = ('the dataset prototypes start at the FC weights and must be initialised from data before '
                          'the HPM head is used (timm_hpm.train.init_prototypes or model.hpm_head.init_prototypes_).')


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

    The HPM entries belong to the classifier, so they follow timm's rule for a changed head: when the model
    has another number of classes than the checkpoint (or none), timm drops the classifier's weight and bias,
    and the prototypes and the l2 scale go with them (same warning). A plain model loading an HPM checkpoint
    takes everything but the HPM entries.
    """
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
