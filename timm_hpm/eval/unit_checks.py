"""What a unit (one fixed batch of one batching: its per-image flags, passes and time) must hold to be read as
figures: the checks every reader applies to a stored unit, whatever the file it comes from."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

__all__ = ['UNIT_KEYS', 'CHECKED_FIELDS', 'UnitFileError', 'UnitLine', 'check_unit', 'load_unit', 'read_unit_fields']

_logger = logging.getLogger(__name__)

#: What every unit file holds (the aggregate reads all of it).
UNIT_KEYS = ('clean', 'realised', 'union', 'candidates', 'passes', 'seconds', 'indices')


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


class UnitLine(str):
    """Where a unit was read in a run's units file: ``<file>:<line>`` (:mod:`timm_hpm.eval.unit_store`)."""


def check_unit(unit: dict, path: Union[Path, UnitLine], fields: Iterable[str] = CHECKED_FIELDS) -> dict:
    """``unit`` (parsed from ``path``: a legacy unit file, or a :class:`UnitLine` of a run's units file) if its
    ``fields`` hold what they should (types; flag lists as long as its ``indices``), else a :class:`UnitFileError`
    naming the file (and line), what is wrong and what to do."""
    problem = _unit_problem(unit, tuple(fields))
    if problem is not None:
        what = 'that line' if isinstance(path, UnitLine) else 'that file'
        raise UnitFileError(f'unit file {path} is malformed: {problem}. Its figures cannot be used; delete {what} '
                            'and resume the run (or rerun the evaluation into the same --out folder) to recompute '
                            'its batch.')
    return unit


def read_unit_fields(path: Path, fields: Sequence[str]) -> dict:
    """The legacy unit file at ``path`` for a reader that cannot recompute it (tables, cards): parsed, ``fields``
    present and checked (:func:`check_unit`); any problem is a ValueError naming the file."""
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
    """A legacy unit file's result; ``None`` when there is none, or (with a warning) when it cannot be read, lacks
    fields or does not hold the batch ``indices`` it should. Wrong types or flag lists of another length than its
    indices (an edited, foreign or damaged file) are a :class:`UnitFileError` naming the file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        problem = None if isinstance(unit, dict) and all(k in unit for k in UNIT_KEYS) else 'fields missing'
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problem = f'{type(error).__name__}: {error}'
    if problem is None:
        check_unit(unit, path)
        if indices is not None and list(unit['indices']) != list(indices):
            problem = 'it holds another batch'
    if problem is not None:
        _logger.warning('unit file %s is unreadable (%s); it is not used', path, problem)
        return None
    return unit
