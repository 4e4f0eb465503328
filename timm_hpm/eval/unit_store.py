"""A run's finished units in one append-only JSON Lines file, so that a run folder holds a handful of files however
many batches it has (one file per unit made results outnumber the code).

``<run_dir>/units.jsonl`` (evaluation) and ``<out>/batches.jsonl`` (poisoning) hold one JSON object per line: the
run's header first (its settings and fingerprints, written once when the run starts: :mod:`timm_hpm.eval.run_header`),
then one line per finished unit, in the order they finished. A line is written whole by one ``write`` under an exclusive
``flock`` on the file (the processes of a sharded run append to the same file) and ``fsync``-ed before the next
unit starts, so a kill loses at most the unit in flight. What a kill can leave is a partial last line: readers
ignore it with a warning (that unit is recomputed) and the next append cuts it off. Any other unreadable or
malformed line, or two lines for the same unit, is a :class:`UnitFileError` naming the file and line: such figures
cannot be trusted and are never silently replaced.

Folders of earlier versions (one JSON file per unit in ``<run_dir>/units/``, ``<out>/batch_<index>.json``; a store
without a header, its settings in ``settings.json``) are read as they are (``--extend-from`` an old run, a finished
old run checked); a run that would write into one is refused: ``python -m timm_hpm.eval.migrate_runs <folder>``
converts it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from ..runfiles import append_jsonl as append_line
from ..runfiles import read_jsonl
from .run_header import MIGRATE_HINT, POISON_FILE, SETTINGS_FILE, UNITS_FILE, is_header, read_header
from .unit_checks import CHECKED_FIELDS, UNIT_KEYS, UnitFileError, UnitLine, check_unit, load_unit, read_unit_fields

__all__ = ['UNITS_FILE', 'POISON_FILE', 'LEGACY_UNITS_DIR', 'UNIT_DATA_DIR', 'read_lines', 'append_line',
           'units_layout', 'read_units', 'missing_units', 'write_unit', 'adversarial_path',
           'read_poison_batches', 'write_poison_batch', 'write_header', 'MIGRATE_HINT']

_logger = logging.getLogger(__name__)

LEGACY_UNITS_DIR = 'units'
#: Binary per-unit files: adversarial images (``save_adversarial``) and the stage checkpoint of a unit in flight.
UNIT_DATA_DIR = 'unit_data'


def read_lines(path: Path) -> List[Tuple[UnitLine, dict]]:
    """Every entry of a run's JSON Lines store with where it is (``<file>:<line>``); a partial last line (what a kill
    leaves) is dropped with a warning, any other unparsable line is a :class:`UnitFileError`."""
    return [(UnitLine(where), entry) for where, entry in read_jsonl(path, UnitFileError)]


def _read_keyed(path: Path, key: Callable[[dict, UnitLine], Hashable]) -> Dict[Hashable, dict]:
    """The entries of ``path`` by ``key`` (which checks them); two lines for one key are a :class:`UnitFileError`."""
    found: Dict[Hashable, Tuple[UnitLine, dict]] = {}
    for number, (where, entry) in enumerate(read_lines(path), 1):
        if is_header(entry):
            if number == 1:
                continue
            raise UnitFileError(f'{where} is a header, but a header is only ever the first line, written once when '
                                'the run starts (the file was edited or merged); restore it.')
        k = key(entry, where)
        if k in found:
            raise UnitFileError(f'{where} and {found[k][0]} both hold unit {k}: one unit is never computed twice, '
                                'so the file was edited or merged; delete the line that is wrong.')
        found[k] = (where, entry)
    return {k: entry for k, (_, entry) in found.items()}


def units_layout(run_dir: Path) -> Optional[str]:
    """``'jsonl'``, ``'legacy'`` (a ``units/`` folder of one file per unit) or None (no unit yet); a folder that
    holds both is refused (a half-done migration, or files copied together by hand)."""
    run_dir = Path(run_dir)
    new, old = (run_dir / UNITS_FILE).is_file(), (run_dir / LEGACY_UNITS_DIR).is_dir()
    if new and old:
        raise UnitFileError(f'{run_dir} holds both {UNITS_FILE} and a {LEGACY_UNITS_DIR}/ folder of an older '
                            f'version; run {MIGRATE_HINT} {run_dir} (it finishes an interrupted migration or says '
                            'what differs).')
    return 'jsonl' if new else 'legacy' if old else None


def _unit_key(fields: Optional[Sequence[str]]) -> Callable[[dict, UnitLine], Tuple[str, int]]:
    """The key of an entry, once it holds ``fields`` (None: a whole unit) and they pass :func:`check_unit`."""
    def key(entry: dict, where: UnitLine) -> Tuple[str, int]:
        batching, index = entry.get('batching'), entry.get('index')
        missing = [k for k in (fields or UNIT_KEYS) if k not in entry]
        if not isinstance(batching, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
            missing = ['batching (a name) and index (a count)'] + missing
        if missing:
            raise UnitFileError(f'unit file {where} lacks {missing}; delete that line and resume the run to '
                                'recompute its batch.')
        check_unit(entry, where, fields or CHECKED_FIELDS)
        return batching, index
    return key


def read_units(run_dir: Path, fields: Optional[Sequence[str]] = None) -> Dict[Tuple[str, int], dict]:
    """``(batching, index) -> unit`` of every finished unit of a run folder, checked (:func:`check_unit`), from
    its units file or, for a folder of an earlier version, its ``units/`` folder. ``fields``: what a reader that
    cannot recompute a unit needs (tables, cards): only those are required, and a legacy file that cannot be read
    is an error; None: whole units, a legacy file that cannot be read skipped with a warning (it is recomputed)."""
    run_dir = Path(run_dir)
    layout = units_layout(run_dir)
    if layout == 'jsonl':
        return _read_keyed(run_dir / UNITS_FILE, _unit_key(fields))
    found = {}
    for f in sorted((run_dir / LEGACY_UNITS_DIR).glob('*.json')) if layout else ():
        batching, index = f.stem.rsplit('_', 1)
        unit = load_unit(f) if fields is None else read_unit_fields(f, fields)
        if unit is not None:
            found[batching, int(index)] = unit
    return found


def missing_units(run_dir: Path, units: Sequence[tuple]) -> list:
    """The ``(batching, index, indices)`` of ``units`` that have no finished unit yet. A finished unit of other
    images than the plan's is a :class:`UnitFileError`; so is work left in a folder of an earlier version (it is
    converted first, never written in two layouts)."""
    done = read_units(run_dir)
    for b, i, idx in units:
        if (b, i) in done and list(done[b, i]['indices']) != list(idx):
            raise UnitFileError(f'{run_dir}: the unit of {b} batch {i} holds other images than this run\'s batch; '
                                'the units file was edited or belongs to another run.')
    missing = [u for u in units if (u[0], u[1]) not in done]
    if missing and (units_layout(run_dir) == 'legacy' or (Path(run_dir) / SETTINGS_FILE).exists()):
        raise UnitFileError(f'{run_dir} is a run folder of an earlier version (its settings in {SETTINGS_FILE}); '
                            f'convert it with {MIGRATE_HINT} {run_dir}, then resume.')
    return missing


def write_header(store: Path, header: dict) -> None:
    """Start a run's store with its header line (:func:`timm_hpm.eval.run_header.make_header`); refused when the
    store holds entries already (a partial line a kill left is cut off)."""
    store = Path(store)
    if store.exists() and read_lines(store):
        raise UnitFileError(f'{store} holds entries but no header; it is no run of this version: use a new folder.')
    append_line(store, header)


def _append_after_header(store: Path, entry: dict, wait_s: float = 60.0) -> None:
    """Append ``entry`` to a store that starts with its header. The main process writes the header before any
    work, so another process of the run waits for it (up to ``wait_s``); a store of an earlier version is refused."""
    if (store.parent / SETTINGS_FILE).exists():
        raise UnitFileError(f'{store.parent} is a run folder of an earlier version (its settings in {SETTINGS_FILE}); '
                            f'convert it with {MIGRATE_HINT} {store.parent}, then resume.')
    deadline = time.monotonic() + wait_s
    while read_header(store) is None:
        if time.monotonic() > deadline:
            raise UnitFileError(f'{store} has no header (the run\'s settings and fingerprints, written first); no unit '
                                'is written before it.')
        time.sleep(0.2)
    append_line(store, entry)


def write_unit(run_dir: Path, batching: str, index: int, unit: dict) -> None:
    """Append a finished unit to the run's units file (its batching and index first, then its fields)."""
    _append_after_header(Path(run_dir) / UNITS_FILE, {'batching': batching, 'index': index, **unit})


def adversarial_path(run_dir: Path, batching: str, index: int) -> Path:
    """Where a unit's adversarial images are saved (``save_adversarial``); its stage checkpoint is next to it."""
    legacy = units_layout(run_dir) == 'legacy'
    return Path(run_dir) / (LEGACY_UNITS_DIR if legacy else UNIT_DATA_DIR) / f'{batching}_{index:06d}.safetensors'


def _poison_key(entry: dict, where: UnitLine) -> int:
    index, size, records = entry.get('index'), entry.get('size'), entry.get('records')
    if not (isinstance(index, int) and isinstance(size, int) and isinstance(records, list)) or isinstance(index, bool):
        raise UnitFileError(f'poisoning batch {where} is malformed: it must hold index, size and records; delete '
                            'that line and resume the run to recompute its batch.')
    return index


def read_poison_batches(out: Path) -> Dict[int, dict]:
    """``index -> batch`` of a poisoning run's finished batches (its batches file, or an earlier version's
    ``batch_<index>.json`` files)."""
    out = Path(out)
    legacy = sorted(out.glob('batch_*.json'))
    if (out / POISON_FILE).is_file():
        if legacy:
            raise UnitFileError(f'{out} holds both {POISON_FILE} and batch_*.json files of an older version; run '
                                f'{MIGRATE_HINT} {out.parent}.')
        return _read_keyed(out / POISON_FILE, _poison_key)
    return {int(f.stem.split('_')[1]): json.loads(f.read_text()) for f in legacy}


def write_poison_batch(out: Path, batch: dict) -> None:
    """Append a finished poisoning batch; refused in a folder of an earlier version (convert it first)."""
    out = Path(out)
    if any(out.glob('batch_*.json')):
        raise UnitFileError(f'{out} is a poisoning run of an earlier version (one file per batch); convert it with '
                            f'{MIGRATE_HINT} {out.parent}, then resume.')
    _append_after_header(out / POISON_FILE, batch)
