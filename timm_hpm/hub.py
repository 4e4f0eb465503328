"""Hub-ready folders: ``model.safetensors`` + a timm ``config.json`` that rebuilds the model exactly.

``timm.create_model('local-dir:<folder>', pretrained=True)`` (or ``hf-hub:<repo>`` once pushed) returns
the same weights, prototypes and HPM options.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn
from timm.models._hub import save_for_hf

from .models._hpm import is_hpm_model

__all__ = ['save_for_hub', 'reconstruction_args']


def reconstruction_args(model: nn.Module) -> Dict[str, Any]:
    """Model arguments that the weights cannot carry: the HPM head's current options and any input
    normalisation held in non-persistent buffers (the DeepMind WideResNets)."""
    args: Dict[str, Any] = {}
    if is_hpm_model(model) and model.hpm_head is not None:
        args['hpm_cfg'] = model.hpm_head.hpm_config()
    persistent = set(model.state_dict())
    for name in ('mean', 'std'):
        buffer = dict(model.named_buffers()).get(name)
        if buffer is not None and name not in persistent:
            args[name] = [float(v) for v in buffer.flatten()]
    return args


def save_for_hub(model: nn.Module, folder: Union[str, Path], model_args: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` as a folder that ``timm.create_model('local-dir:<folder>', pretrained=True)`` loads.

    ``model`` must come from ``timm.create_model`` (its ``pretrained_cfg`` names the architecture).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if not cfg.get('architecture'):
        raise ValueError('save_for_hub needs a model created by timm.create_model (its pretrained_cfg names the '
                         'architecture); for another module, create the registered architecture and load its '
                         'state dict first.')
    folder = Path(folder)
    args = reconstruction_args(model)
    args.update(model_args or {})
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder
