"""Convert run folders of earlier versions to the current layout, in place::

    python -m timm_hpm.eval.migrate_runs results/fashion_mnist/eval_hpm_250 [more folders ...]

Each folder is searched for work folders (a ``settings.json``: ``<out>/attack``, ``<out>/poison``, sanity runs):
an evaluation's ``units/<batching>_<index>.json`` files become ``units.jsonl`` (adversarial images and stage
checkpoints move to ``unit_data/``), a poisoning run's ``batch_<index>.json`` files become ``batches.jsonl``, and a
settings file without a schema version is written in the current schema (:mod:`timm_hpm.eval.settings_schema`,
with the keys it filled recorded so eval.json re-aggregates the same). Nothing is recomputed, and what the old files
held is what the new one holds (entries in index order, the same figures).

Safe to rerun: a converted folder is left as it is. The new file is written whole before any old file is removed; a
folder holding both layouts is only accepted when the new file holds exactly what the old files that are left hold
(a migration that was interrupted while removing them: it is finished), and refused otherwise, changing nothing.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from ..runfiles import run_lock, write_atomic, write_text_atomic
from .settings_schema import upgrade_settings
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


def _convert(work: Path, store: Path, legacy: List[Path], read: Callable[[Path], dict], key: Callable) -> List[str]:
    """Write ``store`` from the ``legacy`` files (in ``key`` order) and remove them; see the module's docstring for
    a folder that holds both."""
    pairs = sorted(((f, read(f)) for f in legacy), key=lambda pair: key(pair[1]))
    if store.exists():
        held: Dict = {key(e): e for _, e in read_lines(store)}
        differing = [f.name for f, e in pairs if held.get(key(e)) != e]
        if differing:
            raise UnitFileError(f'{work} holds both {store.name} and files of the earlier layout that differ from it '
                                f'({differing[:3]}{"..." if len(differing) > 3 else ""}); nothing was changed. Keep '
                                'one of the two (move the other away) and migrate again.')
        done = [f'{work}: finished an interrupted migration ({len(legacy)} old files left)']
    else:
        _write_lines(store, [e for _, e in pairs])
        done = [f'{work}: {len(pairs)} file{"s" * (len(pairs) != 1)} -> {store.name}']
    for f in legacy:
        f.unlink()
    return done


def _migrate_units(work: Path) -> List[str]:
    units = work / LEGACY_UNITS_DIR
    if not units.is_dir():
        return []
    files = sorted(p for p in units.iterdir())
    binary = [p for p in files if p.suffix == '.safetensors']
    other = [p for p in files if p.suffix != '.json' and p not in binary and '.tmp' not in p.name]
    if other:
        raise UnitFileError(f'{units} holds files that are no units ({[p.name for p in other][:3]}); move them away '
                            'and migrate again (nothing was changed).')
    done = _convert(work, work / UNITS_FILE, [p for p in files if p.suffix == '.json'], _legacy_unit,
                    lambda e: (e['batching'], e['index']))
    for p in binary:  # adversarial images and stage checkpoints
        (work / UNIT_DATA_DIR).mkdir(exist_ok=True)
        os.replace(p, work / UNIT_DATA_DIR / p.name)
    for p in units.iterdir():  # the leftovers of atomic writes a kill interrupted: never results
        p.unlink()
    units.rmdir()
    return done


def _migrate_poison(work: Path) -> List[str]:
    legacy = sorted(work.glob('batch_*.json'))
    if not legacy:
        return []
    return _convert(work, work / POISON_FILE, legacy, _legacy_poison_batch, lambda e: e['index'])


def _migrate_settings(work: Path) -> List[str]:
    path = work / 'settings.json'
    text = path.read_text()
    stored = json.loads(text)
    upgraded = upgrade_settings(stored)  # a newer schema: refused
    if upgraded == stored:
        return []
    write_text_atomic(path, json.dumps(upgraded, indent=2 if '\n' in text.strip() else None))
    return [f'{path}: settings schema {stored.get("schema_version", 1)} -> {upgraded["schema_version"]}']


def migrate_work_folder(work: Path) -> List[str]:
    """Convert one work folder (it holds a ``settings.json``); returns what was done (empty: already current)."""
    work = Path(work)
    with run_lock(work, 'folder'):  # never under a run that is writing it
        upgrade_settings(json.loads((work / 'settings.json').read_text()))  # a newer schema: refused before anything
        return _migrate_units(work) + _migrate_poison(work) + _migrate_settings(work)


def _is_work_folder(folder: Path) -> bool:
    """A run's work folder: its settings and its units (either layout) or fingerprints."""
    names = (LEGACY_UNITS_DIR, UNITS_FILE, POISON_FILE, 'fingerprint.json')
    return (folder / 'settings.json').is_file() and (any((folder / name).exists() for name in names)
                                                     or any(folder.glob('batch_*.json')))


def migrate_folder(folder: Path) -> List[str]:
    """Convert every work folder under ``folder`` (itself included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder')
    works = sorted(p.parent for p in folder.rglob('settings.json') if _is_work_folder(p.parent))
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
