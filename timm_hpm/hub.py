"""Hub-ready folders: ``model.safetensors`` + a timm ``config.json`` that rebuilds the model exactly.

``timm.create_model('local-dir:<folder>', pretrained=True)`` (or ``hf-hub:<repo>`` once pushed) returns
the same weights, prototypes and HPM options.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch.nn as nn
from timm.models._hub import save_for_hf

from .models import hpm_variant, is_hpm_variant
from .models._hpm import is_hpm_model

__all__ = ['save_for_hub', 'reconstruction_args', 'push_folder', 'hub_reachable', 'CardExistsError',
           'unverified_results', 'UPLOAD_MANIFEST', 'upload_files']

#: The file that ``recipes/push_to_hub.py`` writes into an upload folder it assembled: the files it wrote there (the
#: ones uploaded) and its command. A folder without it was not assembled by push_to_hub.py: it is never replaced.
UPLOAD_MANIFEST = '.timm_hpm_upload.json'


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
    model_config = None
    arch = cfg['architecture']
    if is_hpm_model(model) and not is_hpm_variant(arch):
        # A timm model converted with convert_to_hpm: reload it as the registered hpm_ variant.
        import timm
        if not timm.is_model(hpm_variant(arch)):
            raise ValueError(f'{arch} has no registered HPM variant ({hpm_variant(arch)}), so a local-dir/hf-hub load could not '
                             'rebuild the HPM head; register one (see timm_hpm/models/timm_families.py).')
        model_config = {'architecture': hpm_variant(arch)}
    save_for_hf(model, str(folder), model_config=model_config, model_args=args, safe_serialization=True)
    return folder


def unverified_results(results: Union[str, Path], model: nn.Module) -> Optional[str]:
    """None when ``results`` (the eval.json of a recipes/evaluate.py run) were measured on ``model``, else why they
    cannot be said to be.

    evaluate.py records the SHA-256 of the model it evaluated (weights, buffers and head options) in the header of
    ``<run>/attack/units.jsonl`` (of ``<run>/poison/batches.jsonl`` for ``--protocol poison``; the
    ``fingerprint.json`` or ``poison/settings.json`` of earlier versions) next to ``<run>/eval.json``; it is compared
    with the same fingerprint of ``model``, taken as evaluate.py takes it (on its [0, 1]-input view).
    """
    from .attacks import normalized_view
    from .eval import model_fingerprint
    from .eval.run_header import read_run_fingerprint, read_run_settings
    results = Path(results)
    attack, poison = results.parent / 'attack', results.parent / 'poison'
    path = attack
    try:
        if read_run_settings(attack) is None and read_run_settings(poison) is not None:
            path, recorded = poison, read_run_settings(poison).get('model_sha256')
        else:
            recorded = (read_run_fingerprint(attack) or {}).get('model')
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f'{results} cannot be matched to these weights: {path} is unreadable ({type(error).__name__}: {error}).'
    if recorded is None:
        return (f'{results} cannot be matched to these weights: the fingerprint of the model in {path}, which '
                'recipes/evaluate.py writes with eval.json, is missing.')
    actual = model_fingerprint(normalized_view(model).eval())
    if recorded != actual:
        return (f'{results} were measured on another model: its fingerprint in {path} is {recorded[:16]}..., that of '
                f'these weights and head options {actual[:16]}...')
    return None


def upload_files(folder: Union[str, Path]) -> Optional[List[str]]:
    """The files of an upload folder that ``recipes/push_to_hub.py`` assembled (the list in its
    :data:`UPLOAD_MANIFEST`); None for a folder without that file (e.g. one :func:`save_for_hub` wrote), or with one
    that cannot be read."""
    path = Path(folder) / UPLOAD_MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())['files']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and '/' not in f and f not in ('.', '..')
                                              for f in files):
        return None
    return files


class CardExistsError(RuntimeError):
    """The Hub repo already has a model card and overwriting was not asked for."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint answers a TCP connection within ``timeout`` seconds (False at once
    under HF_HUB_OFFLINE=1).

    For uploads only (:func:`push_folder`): downloads rely on huggingface_hub's own offline handling (the local
    cache when the endpoint does not answer), but an upload has no such fallback and would fail only after the
    client's connection timeouts, with a less helpful message."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    parsed = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def push_folder(folder: Union[str, Path], repo_id: str, *, api=None, private: bool = False,
                overwrite_card: bool = False, commit_message: str = 'Upload timm-hpm model', timeout: float = 5.0):
    """Upload a Hub-ready folder (weights, config.json, README.md card, results) with huggingface_hub.

    Creates the repo if needed; refuses to replace an existing README.md unless ``overwrite_card``. The token
    comes from huggingface_hub's usual sources (HF_TOKEN, ``hf auth login``) and is never printed or logged. Of a
    folder that ``recipes/push_to_hub.py`` assembled, only the files it wrote are uploaded (:func:`upload_files`:
    not its manifest, nor anything else found there).
    """
    from huggingface_hub import HfApi
    folder = Path(folder)
    files = upload_files(folder)
    if not (folder / 'model.safetensors').is_file() or not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder} is not a Hub-ready folder (model.safetensors and config.json expected).')
    if api is None:
        if not hub_reachable(timeout):
            raise ConnectionError('the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE=1): nothing was '
                                  f'uploaded; {folder} is ready to push later.')
        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    card = (folder / 'README.md').exists() and (files is None or 'README.md' in files)
    if card and api.file_exists(repo_id, 'README.md') and not overwrite_card:
        raise CardExistsError(f'{repo_id} already has a model card; pass overwrite_card=True (--overwrite-card) to '
                              'replace it.')
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             allow_patterns=files)
