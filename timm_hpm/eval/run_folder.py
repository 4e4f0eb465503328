"""An evaluation's run folder: its settings, its fingerprints, and one JSON file per unit (one fixed batch of one
batching) in ``<run_dir>/units/``; the finished units of other runs that a run may reuse (``extend_from``)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..runfiles import write_atomic, write_text_atomic
from .msa import MSAConfig

__all__ = ['unit_path', 'write_json_atomic', 'load_unit', 'read_unit_fields', 'check_unit', 'UnitFileError',
           'model_fingerprint', 'data_fingerprint',
           'check_settings', 'check_fingerprint', 'reusable_units', 'copy_reusable', 'settings_as_run',
           'StageCheckpoint']

_logger = logging.getLogger(__name__)

#: What every unit file holds (the aggregate reads all of it).
UNIT_KEYS = ('clean', 'realised', 'union', 'candidates', 'passes', 'seconds', 'indices')


def unit_path(run_dir: Path, batching: str, index: int) -> Path:
    return run_dir / 'units' / f'{batching}_{index:06d}.json'


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))


class UnitFileError(ValueError):
    """A unit file that parses but does not hold what a unit holds (a field of the wrong type, a flag list of
    another length than the unit's indices): its figures cannot be trusted, and it is not silently redone."""


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _flags_problem(value, n: int, what: str) -> Optional[str]:
    """Why ``value`` is not a list of ``n`` per-image flags (bools; 0/1 are read as bools), or None."""
    if not isinstance(value, list):
        return f'{what} must be a list of {n} true/false flags (one per index), got {type(value).__name__}'
    if len(value) != n:
        return f"{what} holds {len(value)} flags for the unit's {n} indices"
    bad = [v for v in value if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)))]
    return f'{what} must hold true/false flags, found {bad[0]!r}' if bad else None


def _passes_problem(value, what: str) -> Optional[str]:
    if not isinstance(value, dict) or not all(_is_count(value.get(k)) for k in ('forward_images', 'backward_images')):
        return f'{what} must map forward_images and backward_images to counts >= 0, got {value!r}'
    return None


def _mapping_problem(value, what: str, item) -> Optional[str]:
    """Why ``value`` is not a dict from names to items ``item(v, f'{what}[name]')`` accepts, or None."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return f'{what} must map names to values, got {type(value).__name__}'
    return next((p for p in (item(v, f'{what}[{k!r}]') for k, v in value.items()) if p is not None), None)


def _stages_problem(unit: dict) -> Optional[str]:
    value = unit['stages']
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"'stages' must be a list of candidate names, got {value!r}"
    missing = [v for v in value if v not in (unit.get('candidates') or {})]
    return f"'stages' names candidates the unit does not hold: {missing}" if missing else None


def _unit_problem(unit: dict, fields: Sequence[str]) -> Optional[str]:
    """What is wrong with the ``fields`` of a parsed unit (each present one is checked; ``indices`` always), or
    None."""
    idx = unit.get('indices')
    if not isinstance(idx, list) or not idx or not all(_is_count(i) for i in idx):
        return f"'indices' must be a non-empty list of image indices (integers >= 0), got {idx!r}"
    if len(set(idx)) != len(idx):
        return "'indices' names an image twice"
    n = len(idx)
    checks = {
        'clean': lambda v: _flags_problem(v, n, "'clean'"),
        'realised': lambda v: _flags_problem(v, n, "'realised'"),
        'union': lambda v: _flags_problem(v, n, "'union'"),
        'autoattack_own': lambda v: None if v is None else _flags_problem(v, n, "'autoattack_own'"),
        'candidates': lambda v: _mapping_problem(v, "'candidates'", lambda f, what: _flags_problem(f, n, what)),
        'stages': lambda v: _stages_problem(unit),
        'passes': lambda v: _passes_problem(v, "'passes'"),
        'stage_passes': lambda v: _mapping_problem(v, "'stage_passes'", _passes_problem),
        'seconds': lambda v: None if _is_seconds(v) else f"'seconds' must be a number >= 0, got {v!r}",
        'stage_seconds': lambda v: _mapping_problem(
            v, "'stage_seconds'", lambda t, what: None if _is_seconds(t) else f'{what} must be a number >= 0'),
        'data_sha256': lambda v: None if isinstance(v, str) else f"'data_sha256' must be a string, got {v!r}",
    }
    for field in fields:
        if field in unit and field in checks:
            problem = checks[field](unit[field])
            if problem is not None:
                return problem
    return None


#: Every field of a unit that is read (those not in UNIT_KEYS are optional: older units lack them).
CHECKED_FIELDS = UNIT_KEYS + ('autoattack_own', 'stages', 'stage_passes', 'stage_seconds', 'data_sha256')


def check_unit(unit: dict, path: Path, fields: Iterable[str] = CHECKED_FIELDS) -> dict:
    """``unit`` (parsed from ``path``) if its ``fields`` hold what they should (types; flag lists as long as its
    ``indices``), else a :class:`UnitFileError` naming the file, what is wrong and what to do."""
    problem = _unit_problem(unit, tuple(fields))
    if problem is not None:
        raise UnitFileError(f'unit file {path} is malformed: {problem}. Its figures cannot be used; delete that file '
                            'and resume the run (or rerun the evaluation into the same --out folder) to recompute '
                            'its batch.')
    return unit


def read_unit_fields(path: Path, fields: Sequence[str]) -> dict:
    """The unit at ``path`` for a reader that cannot recompute it (tables, cards): parsed, ``fields`` present and
    checked (:func:`check_unit`); any problem is a ValueError naming the file."""
    try:
        unit = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnitFileError(f'unit file {path} cannot be read ({type(error).__name__}: {error}); delete it and '
                            'resume the run to recompute its batch.') from None
    missing = [f for f in fields if not isinstance(unit, dict) or f not in unit]
    if missing:
        raise UnitFileError(f'unit file {path} lacks {missing}; delete it and resume the run to recompute its '
                            'batch.')
    return check_unit(unit, path, fields)


def load_unit(path: Path, indices: Optional[Sequence[int]] = None) -> Optional[dict]:
    """A finished unit's result; ``None`` when there is none, or (with a warning) when its file cannot be read,
    lacks fields or does not hold the batch ``indices`` it should: such a unit is recomputed. A unit whose fields
    are there but hold the wrong types, or flag lists of another length than its indices (no write of this package
    makes one: an edited, foreign or damaged file), is a :class:`UnitFileError` (a ValueError) naming the file,
    never read as figures nor silently replaced."""
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        problem = None if isinstance(unit, dict) and all(k in unit for k in UNIT_KEYS) else 'fields missing'
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        problem = f'{type(error).__name__}: {error}'
    if problem is None:
        check_unit(unit, path)
        if indices is not None and list(unit['indices']) != list(indices):
            problem = 'it holds another batch'
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
    """The run's settings; a folder that holds a run with other settings is refused, never overwritten. The
    options are checked (:meth:`MSAConfig.validate`) before anything is written."""
    if not isinstance(cfg, MSAConfig):
        raise ValueError(f'cfg must be an MSAConfig, got {type(cfg).__name__}')
    cfg.validate()
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
