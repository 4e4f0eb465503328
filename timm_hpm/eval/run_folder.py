"""An evaluation's run folder: one append-only JSON Lines file (:mod:`timm_hpm.eval.unit_store`) that starts with
the run's settings (with their schema version) and fingerprints (its header: :mod:`timm_hpm.eval.run_header`),
then its finished units; and the finished units of other runs that a run may reuse (``extend_from``)."""
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
from .run_header import make_header, read_run_fingerprint, read_run_settings
from .settings_schema import comparable, settings_as_run
from .unit_checks import CHECKED_FIELDS, UNIT_KEYS, UnitFileError, check_unit, load_unit, read_unit_fields
from .unit_store import UNITS_FILE, adversarial_path, read_units, write_header, write_unit

__all__ = ['write_json_atomic', 'load_unit', 'read_unit_fields', 'check_unit', 'UnitFileError',
           'model_fingerprint', 'data_fingerprint', 'adversarial_path', 'read_units', 'write_unit',
           'check_settings', 'check_fingerprint', 'reusable_units', 'copy_reusable', 'settings_as_run',
           'StageCheckpoint', 'UNIT_KEYS', 'CHECKED_FIELDS']

_logger = logging.getLogger(__name__)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))


class StageCheckpoint:
    """A unit's progress after each finished stage of MSA (:func:`timm_hpm.eval.attack_batch`), so a batch that
    was stopped resumes at its next stage instead of from the start: one safetensors file next to the unit's
    adversarial images (:func:`adversarial_path`: ``unit_data/<batching>_<index>.stages.safetensors``; the realised
    batch's tensors and the random generator's state, the
    bookkeeping as JSON in the file's metadata; nothing unpickled), written atomically after each stage and removed
    once the unit's result is written. A file that cannot be read or holds other images is ignored, with a warning
    (the batch starts over)."""

    def __init__(self, unit: Path, data_sha256: str):  # unit: the unit's adversarial_path
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # no empty folder left in a run that saves no adversarial images
        except OSError:
            pass


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


def check_settings(run_dir: Path, protocol: str, batch_size: int, batchings: Sequence[str], n: int, amp: bool,
                   cfg: MSAConfig, process_index: int) -> dict:
    """The run's settings; a folder that holds a run with other settings is refused, never overwritten. The
    options are checked (:meth:`MSAConfig.validate`) before anything is written. A new run's settings are written
    by :func:`check_fingerprint` (given them), in the header of its units file with the fingerprints."""
    if not isinstance(cfg, MSAConfig):
        raise ValueError(f'cfg must be an MSAConfig, got {type(cfg).__name__}')
    cfg.validate()
    settings = dict(protocol=protocol, batch_size=batch_size, batchings=list(batchings), n_examples=n, amp=amp,
                    msa=cfg.to_dict())
    stored = read_run_settings(run_dir)
    if stored is not None:
        previous = comparable(stored)
        if previous != settings:
            raise ValueError(f'{run_dir} holds a run with other settings ({previous}); use a new --out folder or '
                             'the same settings to resume.')
    return settings


def check_fingerprint(run_dir: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, write: bool,
                      settings: Optional[dict] = None) -> dict:
    """The fingerprints of the model and the images; a folder that holds a run of others is refused. ``write``
    (the main process of a run that computes): a new run's header is written with ``settings`` (what
    :func:`check_settings` returned)."""
    fingerprint = dict(model=model_fingerprint(model), data=data_fingerprint(x, y))
    previous = read_run_fingerprint(run_dir)
    if previous is not None:
        for key, what in (('model', 'another model (other weights or head options)'), ('data', 'other images')):
            if previous.get(key) != fingerprint[key]:
                raise ValueError(f'{run_dir} holds a run of {what}; use a new folder (--out) to evaluate this one.')
    elif write and read_run_settings(run_dir) is None:  # a new run (a run of an earlier version: never rewritten)
        if settings is None:
            raise ValueError(f'{run_dir}: a new run needs its settings (check_settings) to write its header.')
        write_header(Path(run_dir) / UNITS_FILE, make_header(settings, fingerprint))
    return fingerprint


def _extendable(source: Path, settings: dict, model_fp: str) -> tuple:
    """``(run folder, its settings, its fingerprints)`` of a run this one may extend; refused (an error) when it
    is no run folder, has other settings (but for ``n_examples`` and ``batchings``) or evaluated another model.
    Folders of every version are read (:mod:`timm_hpm.eval.run_header`)."""
    if read_run_settings(source) is None and read_run_settings(source / 'attack') is not None:
        source = source / 'attack'  # the recipe's run folder
    stored = read_run_settings(source)
    if stored is None:
        raise FileNotFoundError(f'{source} is not an evaluation run folder (no settings); pass the --out '
                                'folder of an earlier run.')
    previous = comparable(stored)
    differences = sorted(k for k in set(previous) | set(settings)
                         if k not in ('n_examples', 'batchings') and previous.get(k) != settings.get(k))
    if differences:
        raise ValueError(f'cannot extend {source}: its settings differ in {differences}; only n_examples and '
                         'batchings may differ.')
    previous_fp = read_run_fingerprint(source)
    if previous_fp is None:
        raise ValueError(f'cannot extend {source}: it has no fingerprints (it was made by an older version); '
                         'start from scratch.')
    if previous_fp.get('model') != model_fp:
        raise ValueError(f'cannot extend {source}: it evaluated another model (other weights or head options).')
    return source, previous, previous_fp


def reusable_units(sources: Sequence[Path], settings: dict, model_fp: str, x: torch.Tensor,
                   y: torch.Tensor) -> Dict[tuple, tuple]:
    """``(batching, index, tuple(indices)) -> (run folder, unit)`` of the finished units of other runs that may be
    reused: same settings but for ``n_examples`` and ``batchings``, the same model, and the same images (a smaller
    run's images must equal the first ones of this run; a larger run's units are checked one by one against the
    image hash each unit carries). Folders of either layout (:mod:`timm_hpm.eval.unit_store`) are read."""
    found: Dict[tuple, tuple] = {}
    for source in sources:
        source, previous, previous_fp = _extendable(Path(source), settings, model_fp)
        n = previous['n_examples']
        prefix_checked = n <= len(y)
        if prefix_checked and previous_fp.get('data') != data_fingerprint(x[:n], y[:n]):
            raise ValueError(f'cannot extend {source}: its first {n} images differ from these.')
        for (batching, index), unit in sorted(read_units(source).items()):
            idx = unit['indices']
            if not prefix_checked and (max(idx) >= len(y) or unit.get('data_sha256') !=
                                       data_fingerprint(x[idx], y[idx])):
                continue  # not among these examples, or not provably the same images
            found.setdefault((batching, index, tuple(idx)), (source, unit))
    return found


def _copy_unit(source: Path, unit: dict, run_dir: Path, batching: str, index: int, save_adversarial: bool) -> None:
    if save_adversarial:
        adv, dest = adversarial_path(source, batching, index), adversarial_path(run_dir, batching, index)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, lambda tmp: shutil.copyfile(adv, tmp))
    fields = {k: v for k, v in unit.items() if k not in ('batching', 'index')}
    write_unit(run_dir, batching, index, fields)  # the unit last: its line marks it done


def copy_reusable(todo: list, reusable: Dict[tuple, tuple], run_dir: Path, save_adversarial: bool,
                  extend_from: Sequence[Path]) -> list:
    """Copy the finished units of other runs that cover the same batches; returns the units still to compute."""
    left = []
    for batching, index, idx in todo:
        source, unit = reusable.get((batching, index, tuple(idx)), (None, None))
        if source is None or (save_adversarial and not adversarial_path(source, batching, index).exists()):
            left.append((batching, index, idx))  # not there, or this run keeps adversarial images and that one did not
            continue
        _copy_unit(source, unit, run_dir, batching, index, save_adversarial)
    if len(left) < len(todo):
        _logger.info('reused %d finished units of %s', len(todo) - len(left), ', '.join(str(s) for s in extend_from))
    return left
