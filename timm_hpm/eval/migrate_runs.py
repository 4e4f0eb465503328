"""Convert run folders of earlier versions to the current layout (one store with a header line), in place::

    python -m timm_hpm.eval.migrate_runs results/fashion_mnist/eval_hpm_250 [more folders ...]

Each folder is searched for work folders of earlier versions (a ``settings.json``: ``<out>/attack``,
``<out>/poison``, sanity runs). Each becomes one file, its store (``units.jsonl``, a poisoning run's
``batches.jsonl``): a header line with the settings (in the current schema, :mod:`timm_hpm.eval.settings_schema`,
the keys an upgrade filled recorded so eval.json re-aggregates the same) and the fingerprints of
``fingerprint.json`` (:mod:`timm_hpm.eval.run_header`), then the units: those of a version 2 store as they are, or
the one-file-per-unit ``units/<batching>_<index>.json`` and ``batch_<index>.json`` files of version 1 in index order
(adversarial images and stage checkpoints move to ``unit_data/``). Then ``fingerprint.json`` and ``settings.json``
are removed. Nothing is recomputed, and what the old files held is what the new one holds.

Safe to rerun: a converted folder is left as it is. The new file is written whole before any old file is removed; a
folder holding both layouts is only accepted when the new file holds exactly what the old files that are left hold
(a migration that was interrupted while removing them: it is finished), and refused otherwise, changing nothing.
The folder is locked (``run.lock``) while it is converted: never under a run that is writing it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from ..runfiles import run_lock, write_atomic
from .run_header import (FINGERPRINT_FILE, HEADER, SETTINGS_FILE, STORES, is_header, make_header, old_files,
                         read_run_settings)
from .settings_schema import SCHEMA_VERSION, read_settings
from .unit_checks import UNIT_KEYS, UnitFileError, check_unit
from .unit_store import LEGACY_UNITS_DIR, POISON_FILE, UNIT_DATA_DIR, UNITS_FILE, read_lines

__all__ = ['migrate_folder', 'migrate_work_folder', 'main']


def _legacy_unit(path: Path) -> dict:
    """A legacy unit file as its entry in the units file (batching and index first); refused when it is not a
    whole unit (a migration never drops or guesses figures)."""
    try:
        unit = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnitFileError(f'unit file {path} cannot be read ({error}); delete it (its batch is recomputed when '
                            'the run is resumed) and migrate again.') from None
    missing = [k for k in UNIT_KEYS if not isinstance(unit, dict) or k not in unit]
    if missing:
        raise UnitFileError(f'unit file {path} lacks {missing}; delete it and migrate again.')
    batching, index = path.stem.rsplit('_', 1)
    return {'batching': batching, 'index': int(index), **check_unit(unit, path)}


def _legacy_poison_batch(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_lines(path: Path, entries: List[dict]) -> None:
    def write(tmp):
        with open(tmp, 'w') as handle:
            handle.writelines(json.dumps(e) + '\n' for e in entries)
            handle.flush()
            os.fsync(handle.fileno())
    write_atomic(path, write)


def _same_header(stored: dict, header: dict) -> bool:
    """Whether a store's header holds what the old files hold (a fingerprint file already removed: not compared)."""
    stored, header = stored[HEADER], header[HEADER]
    return all(stored.get(k) == header.get(k) for k in header) and \
        all(k in header for k in stored if k != 'fingerprint')


def _check_held(work: Path, entries: List[dict], pairs: list, key: Callable) -> None:
    """Refuse a store whose entries differ from the old layout's files left beside it."""
    held: Dict = {key(e): e for e in entries}
    differing = [f.name for f, e in pairs if held.get(key(e)) != e]
    if differing:
        raise UnitFileError(f'{work} holds both a store and files of the earlier layout that differ from it '
                            f'({differing[:3]}{"..." if len(differing) > 3 else ""}); nothing was changed. Keep '
                            'one of the two (move the other away) and migrate again.')


def _convert(work: Path, store: Path, header: dict, legacy: List[Path], read: Callable[[Path], dict],
             key: Callable) -> List[str]:
    """Write ``store`` (``header``, then its units: those of a store without a header, or of the ``legacy`` files in
    ``key`` order) and remove the ``legacy`` files; see the module's docstring for a folder that holds both."""
    pairs = sorted(((f, read(f)) for f in legacy), key=lambda pair: key(pair[1]))
    lines = [e for _, e in read_lines(store)] if store.exists() else []
    stored_header = lines.pop(0) if lines and is_header(lines[0]) else None
    if stored_header is not None and not _same_header(stored_header, header):
        raise UnitFileError(f'{store}:1 is a header that differs from {work}/{SETTINGS_FILE} and '
                            f'{FINGERPRINT_FILE}; nothing was changed. Keep one of the two and migrate again.')
    if lines or stored_header is not None:
        _check_held(work, lines, pairs, key)
    else:
        lines = [e for _, e in pairs]
    if stored_header is None:
        _write_lines(store, [header] + lines)
    for f in legacy:
        f.unlink()
    n = len(pairs) or len(lines)
    what = f'{n} {"file" if pairs else "unit"}{"s" * (n != 1)}{" of one per unit" if pairs else ""}'
    return [f'{work}: {what} and {SETTINGS_FILE} -> {store.name} (version {SCHEMA_VERSION}: settings and fingerprints '
            'in its header)'
            if stored_header is None else f'{work}: finished an interrupted migration']


def _legacy_units(work: Path) -> List[Path]:
    """The unit files of a ``units/`` folder (refused when it holds files that are no units)."""
    units = work / LEGACY_UNITS_DIR
    if not units.is_dir():
        return []
    files = sorted(units.iterdir())
    other = [p for p in files if p.suffix not in ('.json', '.safetensors') and '.tmp' not in p.name]
    if other:
        raise UnitFileError(f'{units} holds files that are no units ({[p.name for p in other][:3]}); move them away '
                            'and migrate again (nothing was changed).')
    return [p for p in files if p.suffix == '.json']


def _remove_units_dir(work: Path) -> None:
    """Move adversarial images and stage checkpoints to ``unit_data/``, drop the leftovers of interrupted atomic
    writes (never results), and remove the ``units/`` folder."""
    units = work / LEGACY_UNITS_DIR
    if not units.is_dir():
        return
    for p in sorted(units.iterdir()):
        if p.suffix == '.safetensors':
            (work / UNIT_DATA_DIR).mkdir(exist_ok=True)
            os.replace(p, work / UNIT_DATA_DIR / p.name)
        else:
            p.unlink()
    units.rmdir()


def migrate_work_folder(work: Path) -> List[str]:
    """Convert one work folder (it holds a ``settings.json``: versions 1 and 2) to the current version; returns what
    was done (empty: already current)."""
    work = Path(work)
    if not (work / SETTINGS_FILE).exists():
        read_run_settings(work)  # a store with a header already (a newer schema: refused)
        return []
    with run_lock(work, 'folder'):  # never under a run that is writing it
        if not (work / SETTINGS_FILE).exists():
            return []
        settings = read_settings(work / SETTINGS_FILE)  # a newer schema: refused before anything
        fp = work / FINGERPRINT_FILE
        header = make_header(settings, json.loads(fp.read_text()) if fp.exists() else None)
        batches = sorted(work.glob('batch_*.json'))
        if batches or (work / POISON_FILE).exists():
            done = _convert(work, work / POISON_FILE, header, batches, _legacy_poison_batch, lambda e: e['index'])
        else:
            done = _convert(work, work / UNITS_FILE, header, _legacy_units(work), _legacy_unit,
                            lambda e: (e['batching'], e['index']))
            _remove_units_dir(work)
        for f in old_files(work):  # settings.json last: it marks a folder still to convert
            f.unlink()
        return done


def _is_work_folder(folder: Path) -> bool:
    """A run's work folder: its settings and its units (either layout) or fingerprints."""
    names = (LEGACY_UNITS_DIR, UNITS_FILE, POISON_FILE, FINGERPRINT_FILE)
    return (folder / SETTINGS_FILE).is_file() and (any((folder / name).exists() for name in names)
                                                     or any(folder.glob('batch_*.json')))


def migrate_folder(folder: Path) -> List[str]:
    """Convert every work folder under ``folder`` (itself included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder')
    works = sorted({p.parent for p in folder.rglob(SETTINGS_FILE) if _is_work_folder(p.parent)}
                   | {p.parent for name in STORES for p in folder.rglob(name)})
    done = []
    for work in works:
        done += migrate_work_folder(work)
    return done


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m timm_hpm.eval.migrate_runs',
                                description=__doc__.split('\n')[0].rstrip(':'))
    p.add_argument('folders', type=Path, nargs='+', help='run folders (or folders that hold run folders)')
    args = p.parse_args(argv)
    for folder in args.folders:
        try:
            done = migrate_folder(folder)
        except (UnitFileError, ValueError, FileNotFoundError) as error:
            raise SystemExit(f'migrate_runs: {error}') from None
        print('\n'.join(done) if done else f'{folder}: already in the current layout')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
