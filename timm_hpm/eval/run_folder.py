"""An evaluation's run folder: its settings, its fingerprints, and one JSON file per unit (one fixed batch of one
batching) in ``<run_dir>/units/``; the finished units of other runs that a run may reuse (``extend_from``)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..runfiles import write_atomic, write_text_atomic
from .msa import MSAConfig

__all__ = ['unit_path', 'write_json_atomic', 'load_unit', 'model_fingerprint', 'data_fingerprint',
           'check_settings', 'check_fingerprint', 'reusable_units', 'copy_reusable', 'settings_as_run',
           'StageCheckpoint']

_logger = logging.getLogger(__name__)

#: What every unit file holds (the aggregate reads all of it).
UNIT_KEYS = ('clean', 'realised', 'union', 'candidates', 'passes', 'seconds', 'indices')


def unit_path(run_dir: Path, batching: str, index: int) -> Path:
    return run_dir / 'units' / f'{batching}_{index:06d}.json'


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))


def load_unit(path: Path, indices: Optional[Sequence[int]] = None) -> Optional[dict]:
    """A finished unit's result; ``None`` when there is none, or (with a warning) when its file cannot be read or
    does not hold the batch ``indices`` it should: such a unit is recomputed, never trusted or fatal."""
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        problem = None if isinstance(unit, dict) and all(k in unit for k in UNIT_KEYS) else 'fields missing'
        if problem is None and indices is not None and list(unit['indices']) != list(indices):
            problem = 'it holds another batch'
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        problem = f'{type(error).__name__}: {error}'
    if problem is not None:
        _logger.warning('unit file %s is unreadable (%s); recomputing that batch', path, problem)
        return None
    return unit


class StageCheckpoint:
    """A unit's progress after each finished stage of MSA (:func:`timm_hpm.eval.attack_batch`), so a batch that
    was stopped resumes at its next stage instead of from the start: one safetensors file next to the unit's
    (``<batching>_<index>.stages.safetensors``: the realised batch's tensors and the random generator's state, the
    bookkeeping as JSON in the file's metadata; nothing unpickled), written atomically after each stage and removed
    once the unit's result is written. A file that cannot be read or holds other images is ignored, with a warning
    (the batch starts over)."""

    def __init__(self, unit: Path, data_sha256: str):
        self.path = Path(unit).with_suffix('.stages.safetensors')
        self.data_sha256 = data_sha256

    def load(self):
        if not self.path.exists():
            return None
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), framework='pt') as f:
                meta = json.loads(f.metadata()['msa_progress'])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            problem = None if meta.get('data_sha256') == self.data_sha256 else 'it holds other images'
        except Exception as error:  # a truncated or foreign file: safetensors' and json's errors alike
            problem = f'{type(error).__name__}: {error}'
        if problem is not None:
            _logger.warning('stage checkpoint %s is unusable (%s); that batch starts over', self.path, problem)
            return None
        _logger.info('%s: resuming after stages %s', self.path.name, ', '.join(meta['done']))
        return tensors, meta

    def save(self, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file
        metadata = {'msa_progress': json.dumps(dict(meta, data_sha256=self.data_sha256))}
        write_atomic(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _hash_tensor(h, t: torch.Tensor) -> None:
    shape = t.shape
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f'{t.dtype}{tuple(shape)}'.encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b'')


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what decides a model's outputs: every parameter and buffer, and the module tree with its
    options (``repr``: e.g. the HPM head's mode, tau and alpha)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # the same fingerprint whatever the number of processes
    h = hashlib.sha256(repr(model).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of the evaluated images and labels."""
    h = hashlib.sha256()
    _hash_tensor(h, x)
    _hash_tensor(h, y.long())
    return h.hexdigest()


def settings_as_run(previous: dict) -> dict:
    """Stored settings with what a run of an earlier version actually did filled in for the options added since
    (before MSA v2: APGD-T through the target had the surrogates' target count, no transfer models, no combination
    round; before v3: no iterate was scored, the whole-batch APGD always ran), so such a run resumes or is extended
    with equivalent options."""
    msa = previous.get('msa')
    if isinstance(msa, dict) and 'target_n_target_classes' not in msa:
        msa = dict(msa, target_n_target_classes=msa.get('n_target_classes'), combine_rounds=0,
                   surrogate_models=msa.get('surrogate_models', []))
    if isinstance(msa, dict):
        msa = {'score_iterates': False, 'surrogate_apgd': True, **msa}
    return dict(previous, msa=msa) if isinstance(msa, dict) else previous


def check_settings(run_dir: Path, protocol: str, batch_size: int, batchings: Sequence[str], n: int, amp: bool,
                   cfg: MSAConfig, process_index: int) -> dict:
    """The run's settings; a folder that holds a run with other settings is refused, never overwritten."""
    settings = dict(protocol=protocol, batch_size=batch_size, batchings=list(batchings), n_examples=n, amp=amp,
                    msa=cfg.to_dict())
    settings_path = run_dir / 'settings.json'
    if settings_path.exists():
        previous = settings_as_run(json.loads(settings_path.read_text()))
        if previous != settings:
            raise ValueError(f'{run_dir} holds a run with other settings ({previous}); use a new --out folder or '
                             'the same settings to resume.')
    elif process_index == 0:
        write_json_atomic(settings_path, settings)
    return settings


def check_fingerprint(run_dir: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, write: bool) -> dict:
    """The fingerprints of the model and the images; a folder that holds a run of others is refused."""
    fingerprint = dict(model=model_fingerprint(model), data=data_fingerprint(x, y))
    path = run_dir / 'fingerprint.json'
    if path.exists():
        previous = json.loads(path.read_text())
        for key, what in (('model', 'another model (other weights or head options)'), ('data', 'other images')):
            if previous.get(key) != fingerprint[key]:
                raise ValueError(f'{run_dir} holds a run of {what}; use a new folder (--out) to evaluate this one.')
    elif write:
        write_json_atomic(path, fingerprint)
    return fingerprint


def _extendable(source: Path, settings: dict, model_fp: str) -> tuple:
    """``(run folder, its settings, its fingerprints)`` of a run this one may extend; refused (an error) when it
    is no run folder, has other settings (but for ``n_examples`` and ``batchings``) or evaluated another model."""
    if not (source / 'settings.json').exists() and (source / 'attack' / 'settings.json').exists():
        source = source / 'attack'  # the recipe's run folder
    if not (source / 'settings.json').exists():
        raise FileNotFoundError(f'{source} is not an evaluation run folder (no settings.json); pass the --out '
                                'folder of an earlier run.')
    previous = settings_as_run(json.loads((source / 'settings.json').read_text()))
    differences = sorted(k for k in set(previous) | set(settings)
                         if k not in ('n_examples', 'batchings') and previous.get(k) != settings.get(k))
    if differences:
        raise ValueError(f'cannot extend {source}: its settings differ in {differences}; only n_examples and '
                         'batchings may differ.')
    if not (source / 'fingerprint.json').exists():
        raise ValueError(f'cannot extend {source}: it has no fingerprint.json (it was made by an older version); '
                         'resume it once with this version to write one, or start from scratch.')
    previous_fp = json.loads((source / 'fingerprint.json').read_text())
    if previous_fp.get('model') != model_fp:
        raise ValueError(f'cannot extend {source}: it evaluated another model (other weights or head options).')
    return source, previous, previous_fp


def reusable_units(sources: Sequence[Path], settings: dict, model_fp: str, x: torch.Tensor,
                   y: torch.Tensor) -> Dict[tuple, Path]:
    """``(batching, index, tuple(indices)) -> unit file`` of the finished units of other runs that may be reused:
    same settings but for ``n_examples`` and ``batchings``, the same model, and the same images (a smaller run's
    images must equal the first ones of this run; a larger run's units are checked one by one against the
    image hash each unit carries)."""
    found: Dict[tuple, Path] = {}
    for source in sources:
        source, previous, previous_fp = _extendable(Path(source), settings, model_fp)
        n = previous['n_examples']
        prefix_checked = n <= len(y)
        if prefix_checked and previous_fp.get('data') != data_fingerprint(x[:n], y[:n]):
            raise ValueError(f'cannot extend {source}: its first {n} images differ from these.')
        for f in sorted((source / 'units').glob('*.json')):
            batching, index = f.stem.rsplit('_', 1)
            unit = load_unit(f)
            if unit is None:
                continue  # computed here instead
            idx = unit['indices']
            if not prefix_checked and (max(idx) >= len(y) or unit.get('data_sha256') !=
                                       data_fingerprint(x[idx], y[idx])):
                continue  # not among these examples, or not provably the same images
            found.setdefault((batching, int(index), tuple(idx)), f)
    return found


def copy_reusable(todo: list, reusable: Dict[tuple, Path], run_dir: Path, save_adversarial: bool,
                  extend_from: Sequence[Path]) -> list:
    """Copy the finished units of other runs that cover the same batches; returns the units still to compute."""
    left = []
    for batching, index, idx in todo:
        source, dest = reusable.get((batching, index, tuple(idx))), unit_path(run_dir, batching, index)
        if source is None or (save_adversarial and not source.with_suffix('.safetensors').exists()):
            left.append((batching, index, idx))  # not there, or this run keeps adversarial images and that one did not
            continue
        if save_adversarial:
            adv = source.with_suffix('.safetensors')
            write_atomic(dest.with_suffix('.safetensors'), lambda tmp: shutil.copyfile(adv, tmp))
        write_atomic(dest, lambda tmp: shutil.copyfile(source, tmp))  # the JSON last: its presence marks the unit done
    if len(left) < len(todo):
        _logger.info('reused %d finished units of %s', len(todo) - len(left), ', '.join(str(s) for s in extend_from))
    return left
