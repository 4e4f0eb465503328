"""RobustBench base checkpoints, read safely into this package's key-compatible architectures.

A declarative table of the supported RobustBench entries (timm_hpm/robustbench_table.py: names, datasets, threat
models, our architectures and tags, where RobustBench hosts the files, RobustBench's reported figures), and a
loader that reads RobustBench's own folder layout ``<model_dir>/<dataset>/<threat>/<Name>.pt`` with
``torch.load(weights_only=True)`` (a pickle that would run code is refused), strips the ``module.``/``model.``
prefixes and loads strictly. When online, a missing file is downloaded from where RobustBench hosts it.
``robustbench`` itself is optional: where a working copy imports, :func:`load_with_robustbench` uses it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Dict, Optional, Union

import timm
import torch
import torch.nn as nn

from .eval.results import reduced_budget
from .models import clean_checkpoint, hpm_variant
from .robustbench_table import ROBUSTBENCH_MODELS, RobustBenchEntry

__all__ = ['RobustBenchEntry', 'ROBUSTBENCH_MODELS', 'get_entry', 'checkpoint_path', 'read_checkpoint',
           'load_robustbench_model', 'download_checkpoint', 'robustbench_available', 'load_with_robustbench',
           'model_info', 'reduced_budget', 'CheckpointError']

DEFAULT_MODEL_DIR = os.environ.get('ROBUSTBENCH_MODEL_DIR', './models')


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe, corrupt or for another architecture."""


def get_entry(name: str, dataset: Optional[str] = None, threat_model: Optional[str] = None) -> RobustBenchEntry:
    matches = [e for e in ROBUSTBENCH_MODELS if e.name == name and (dataset is None or e.dataset == dataset)
               and (threat_model is None or e.threat_model == threat_model)]
    if not matches:
        known = sorted({e.name for e in ROBUSTBENCH_MODELS})
        raise KeyError(f'RobustBench model {name!r} ({dataset or "any dataset"}, {threat_model or "any threat"}) is '
                       f'not in the supported table; supported: {known}')
    if len(matches) > 1:
        raise KeyError(f'{name!r} exists for ' + ', '.join(f'{e.dataset}/{e.threat_model}' for e in matches) +
                       '; pass dataset= and threat_model=')
    return matches[0]


def checkpoint_path(entry: RobustBenchEntry, model_dir: Union[str, Path] = DEFAULT_MODEL_DIR) -> Path:
    """RobustBench's own layout: ``<model_dir>/<dataset>/<threat>/<Name>.pt``."""
    return Path(model_dir) / entry.dataset / entry.threat_model / f'{entry.name}.pt'


def read_checkpoint(path: Union[str, Path], checkpoint_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A flat state dict from a checkpoint file: safetensors, or ``torch.load(weights_only=True)`` (plain
    containers of tensors only: a pickle that would construct other objects or run code is refused).

    Kept on purpose instead of timm's ``load_state_dict``: the timm releases this package allows (>= 1.0.16)
    default to ``weights_only=False`` and, on a TypeError raised while loading, retry with a plain ``torch.load``,
    which a crafted file could use to get unpickled; and timm's prefix cleaning differs (see ``clean_checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            checkpoint = load_file(str(path))
        else:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, SafetensorError ...
        raise CheckpointError(f'refusing or unable to read {path}: {type(error).__name__}: {error}. Only '
                              'weights are read (safetensors or torch.load(weights_only=True)); a checkpoint '
                              'holding other pickled objects must be converted by its author.') from error
    if checkpoint_key and isinstance(checkpoint, dict) and checkpoint_key in checkpoint:
        checkpoint = checkpoint[checkpoint_key]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict.')
    try:
        state_dict = clean_checkpoint(checkpoint)
    except ValueError as error:
        raise CheckpointError(f'{path}: {error}') from error
    # RobustBench's ImageNet wrappers carry their input normalisation; ours lives in the pretrained cfg.
    return {k: v for k, v in state_dict.items() if not k.startswith('normalize.')}


def download_checkpoint(entry: RobustBenchEntry, destination: Path, timeout: float = 10.0) -> Path:
    """Download from Google Drive, where RobustBench hosts the file, with ``torch.hub.download_url_to_file`` (a
    clear error within ``timeout`` seconds when the host is unreachable; torch's download has no read timeout)."""
    host = 'drive.google.com'
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise CheckpointError(
            f'{entry.name}: not in {destination.parent} and {host} is unreachable ({error}). Download it elsewhere '
            f'(RobustBench gdrive id {entry.gdrive_id}) and put it at {destination}.') from error
    destination.parent.mkdir(parents=True, exist_ok=True)
    url = f'https://drive.google.com/uc?export=download&confirm=t&id={entry.gdrive_id}'
    part = destination.with_suffix('.part')
    torch.hub.download_url_to_file(url, str(part), progress=True)
    with open(part, 'rb') as f:
        is_page = f.read(512).lstrip()[:1] == b'<'  # a checkpoint starts with a zip or pickle header, never '<'
    if is_page:
        part.unlink()
        raise CheckpointError(f'{entry.name}: Google Drive answered with a web page instead of the file '
                              f'(quota or consent page); download id {entry.gdrive_id} by hand to {destination}.')
    os.replace(part, destination)
    return destination


def load_robustbench_model(name: str, dataset: Optional[str] = None, threat_model: Optional[str] = None,
                           model_dir: Union[str, Path] = DEFAULT_MODEL_DIR, download: bool = True, hpm: bool = False,
                           **kwargs) -> nn.Module:
    """A RobustBench checkpoint in our architecture (``hpm=True``: in its ``hpm_`` variant, prototypes
    uninitialised). Strict: a wrong architecture fails with the missing and unexpected keys."""
    entry = get_entry(name, dataset, threat_model)
    path = checkpoint_path(entry, model_dir)
    if not path.is_file():
        if not download:
            raise CheckpointError(f'{entry.name}: no checkpoint at {path} (download=False).')
        download_checkpoint(entry, path)
    state_dict = read_checkpoint(path, entry.checkpoint_key)
    arch = hpm_variant(entry.architecture) if hpm else entry.architecture
    model_name = entry.name_tag(hpm)
    model_args = {**entry.model_args, **kwargs}
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict),
                                 **model_args)
    except RuntimeError as error:
        if 'Error(s) in loading state_dict' not in str(error):
            raise
        with torch.device('meta'):
            expected = timm.create_model(model_name, **model_args).state_dict()
        matched = sum(1 for k, v in state_dict.items() if k in expected and expected[k].shape == v.shape)
        raise CheckpointError(
            f'{path} does not fit {arch} (RobustBench entry {entry.name}, {entry.dataset}/{entry.threat_model}): '
            f'{matched} of its {len(state_dict)} tensors match the model\'s {len(expected)} by name and shape; '
            f'is it the checkpoint of another architecture? Details:\n{error}') from None


def robustbench_available() -> bool:
    """Whether a *working* robustbench imports (its PyPI release does not import beside current timm)."""
    try:
        from robustbench.utils import load_model  # noqa: F401
        return True
    except Exception:
        return False


def load_with_robustbench(name: str, dataset: str, threat_model: str, model_dir: Union[str, Path] = DEFAULT_MODEL_DIR):
    """RobustBench's own ``load_model`` (its architecture and loading), when a working robustbench is installed."""
    if not robustbench_available():
        raise ImportError('robustbench is not importable here; use load_robustbench_model (our architectures).')
    from robustbench.utils import load_model
    return load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)


#: Who a model_info entry credits by default: this package's HPM models (a reconstruction of the paper's method).
HPM_AUTHORS, HPM_VENUE = 'timm-hpm (reconstruction of Wang, 2026)', 'arXiv, 2026'


def model_info(result: dict, name: str, paper: str = 'arXiv:2606.01746', base: Optional[str] = None,
               authors: str = HPM_AUTHORS, venue: str = HPM_VENUE) -> dict:
    """A RobustBench ``model_info`` JSON entry for an evaluated model (from recipes/evaluate.py's result).

    RobustBench ranks by ``autoattack_acc``, so that field holds the worst case the evaluation measured: for a
    batch-dependent model evaluated with MSA (``--protocol msa``) the realised MSA figure (the worst batching), which
    is at most AutoAttack's on the same fixed batches; AutoAttack on the target alone goes into
    ``autoattack_target_acc`` and the per-sample union bound into ``msa_union_acc``. ``unreliable`` is true when any
    attack ran below full strength (:func:`reduced_budget`), and the footnote names what ran, on which batchings,
    and what was reduced. ``paper``, ``authors`` and ``venue`` credit the model (default: this package's HPM
    models; ``timm_hpm.benchmark`` passes 'unknown' for a model that is not one)."""
    def pct(v):
        return f'{100 * v:.2f}' if v is not None else None

    protocol = result.get('protocol') or (result.get('settings') or {}).get('protocol')
    msa = protocol == 'msa' and result.get('msa_acc') is not None
    worst = result['msa_acc'] if msa else result.get('autoattack_acc')
    reduced = reduced_budget(result)
    batchings = list(result.get('batchings') or {})
    n = result.get('n_examples')
    if msa:
        footnote = (f'Batch-dependent model (HPM head, mode {result.get("hpm_mode") or "dynamic"}): autoattack_acc is '
                    f'the worst case of the Mixed Surrogate Attack (AutoAttack on the target and whole-batch APGD '
                    f'through its surrogates, a realised adversarial batch scored whole) over the fixed batchings '
                    f'{batchings} of {result.get("batch_size")} images, on the first {n} test examples; AutoAttack on '
                    f'the target alone, re-scored on the same batches: {pct(result.get("autoattack_acc"))}%; per-sample '
                    f'union of every candidate (a bound, not one batch): {pct(result.get("msa_union_acc"))}%')
    else:
        footnote = f'Standard AutoAttack on the first {n} test examples'
        if result.get('hpm_mode') in ('dynamic', 'soft'):
            footnote += (f' of a batch-dependent head (mode {result["hpm_mode"]}): not a valid robustness figure for '
                         'it; evaluate with --protocol msa')
    if base:
        footnote += f'; base model {base}'
    if reduced:
        footnote += '; reduced attack budget: ' + ', '.join(reduced)
    return {
        'link': f'https://arxiv.org/abs/{paper.split(":", 1)[-1]}' if paper.startswith('arXiv:') else paper,
        'name': name,
        'authors': authors,
        'additional_data': False,
        'number_forward_passes': 1,
        'dataset': result.get('dataset'),
        'venue': venue,
        'architecture': result.get('architecture'),
        'eps': str(result.get('eps')),
        'clean_acc': pct(result['clean_acc']),
        'reported': 'unknown',
        'autoattack_acc': pct(worst),
        'autoattack_target_acc': pct(result.get('autoattack_acc')) if msa else None,
        'msa_acc': pct(result.get('msa_acc')) if msa else None,
        'msa_union_acc': pct(result.get('msa_union_acc')) if msa else None,
        'footnote': footnote + '.',
        'unreliable': bool(reduced) or result.get('hpm_mode') in ('dynamic', 'soft') and not msa,
    }
