"""A run's settings and fingerprints: the header line of its store (schema versions 3 and 4), or the files of earlier
versions.

A work folder (``<out>/attack``, ``<out>/poison``, a sanity run) holds one file, its store (``units.jsonl`` or
``batches.jsonl``, :mod:`timm_hpm.eval.unit_store`), whose first line is the run's header, written once when the run
starts, before any unit::

    {"header": {"schema_version": 5, "settings": {...}, "fingerprint": {"model": "...", "data": "..."}}}

``settings``: the run's settings as it recorded them (an evaluation's protocol, batches and MSA options; a poisoning
run's attack settings, which hold its own ``model_sha256`` and ``data_sha256``); ``filled_by_upgrade`` (only in a
header migrated from an earlier version: the options :mod:`timm_hpm.eval.settings_schema` filled in; a version 3
header is upgraded when read, not rewritten); ``fingerprint``
(evaluations: the SHA-256 of the model and of the images; absent where the run never recorded one). Every later line
is a unit; a second header, or a unit before the header, is a :class:`UnitFileError` naming the file and line.

Earlier versions kept them in ``settings.json`` (without ``schema_version``: version 1; version 2) and
``fingerprint.json`` beside the units: still read here, converted by ``python -m timm_hpm.eval.migrate_runs``. A
folder holding both a header and a ``settings.json`` (a migration that was interrupted) is refused until it is run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from .settings_schema import SCHEMA_VERSION, comparable, read_settings, upgrade_settings
from .unit_checks import UnitFileError

__all__ = ['HEADER', 'SETTINGS_FILE', 'FINGERPRINT_FILE', 'UNITS_FILE', 'POISON_FILE', 'STORES',
           'MIGRATE_HINT', 'is_header', 'make_header', 'read_header',
           'header_settings', 'store_of', 'read_run_settings', 'read_run_fingerprint', 'old_files']

HEADER = 'header'
SETTINGS_FILE = 'settings.json'
FINGERPRINT_FILE = 'fingerprint.json'
UNITS_FILE, POISON_FILE = 'units.jsonl', 'batches.jsonl'  # the store of an evaluation, of a poisoning run
STORES = (UNITS_FILE, POISON_FILE)
#: What converts a folder of an earlier version (the errors that refuse one say it).
MIGRATE_HINT = 'python -m timm_hpm.eval.migrate_runs'


def is_header(entry: dict) -> bool:
    return isinstance(entry, dict) and HEADER in entry


def make_header(settings: dict, fingerprint: Optional[dict] = None) -> dict:
    """The header line of a run of ``settings`` (current-schema settings, as :func:`read_run_settings` returns or
    a new run checks them: bookkeeping keys are kept apart) and ``fingerprint`` (None: the run has none)."""
    filled = settings.get('filled_by_upgrade')
    header = {'schema_version': SCHEMA_VERSION, 'settings': comparable(settings)}
    if filled:
        header['filled_by_upgrade'] = list(filled)
    if fingerprint is not None:
        header['fingerprint'] = dict(fingerprint)
    return {HEADER: header}


def read_header(store: Path) -> Optional[dict]:
    """The header of ``store`` (its first line's ``header``), None when the file is missing or empty, its first line
    is unfinished (a run killed while writing it: it starts over) or is a unit (a store of version 2)."""
    try:
        with open(store, 'rb') as handle:
            first = handle.readline()
    except FileNotFoundError:
        return None
    if not first.endswith(b'\n'):
        return None
    try:
        entry = json.loads(first)
    except (UnicodeDecodeError, ValueError):
        raise UnitFileError(f'{store}:1 is not a JSON object: the file is damaged; restore it.') from None
    if not is_header(entry):
        return None
    header = entry[HEADER]
    if not isinstance(header, dict) or not isinstance(header.get('settings'), dict) or \
            not isinstance(header.get('fingerprint', {}), dict):
        raise UnitFileError(f'{store}:1 is a malformed header (it must hold schema_version, settings and, where '
                            'recorded, fingerprint as objects); restore the file.')
    return header


def header_settings(header: dict, where: str) -> dict:
    """The settings of a header in the current schema (with ``schema_version`` and ``filled_by_upgrade``, as
    :func:`timm_hpm.eval.settings_schema.read_settings` returns a settings file's)."""
    stored = dict(header['settings'], schema_version=header.get('schema_version'))
    if header.get('filled_by_upgrade'):
        stored['filled_by_upgrade'] = header['filled_by_upgrade']
    try:
        return upgrade_settings(stored)
    except ValueError as error:
        raise ValueError(f'{where}: {error}') from None


def store_of(work: Path) -> Optional[Path]:
    """The store of a work folder (the first of :data:`STORES` that exists), or None."""
    return next((Path(work) / name for name in STORES if (Path(work) / name).is_file()), None)


def _header_of(work: Path) -> Optional[dict]:
    """The folder's header; refused when it also holds a settings file of an earlier version."""
    store = store_of(work)
    header = read_header(store) if store is not None else None
    if header is not None and (Path(work) / SETTINGS_FILE).exists():
        raise UnitFileError(f'{work} holds both a header in {store.name} and a {SETTINGS_FILE} of an earlier version '
                            f'(an interrupted migration?); run {MIGRATE_HINT} {work}.')
    return header


def read_run_settings(work: Path) -> Optional[dict]:
    """The current-schema settings of a work folder: its store's header (version 3), else its ``settings.json``
    (versions 1 and 2); None when it has neither (no run started there)."""
    work = Path(work)
    header = _header_of(work)
    if header is not None:
        return header_settings(header, f'{store_of(work)}:1')
    return read_settings(work / SETTINGS_FILE) if (work / SETTINGS_FILE).is_file() else None


def read_run_fingerprint(work: Path) -> Optional[dict]:
    """The fingerprints (``model``, ``data``) of an evaluation's work folder: its header's, else its
    ``fingerprint.json``; None when it recorded none."""
    work = Path(work)
    header = _header_of(work)
    if header is not None:
        return header.get('fingerprint')
    path = work / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def old_files(work: Path) -> List[Path]:
    """The settings and fingerprint files of an earlier version in ``work`` (a version 3 folder has none)."""
    return [Path(work) / name for name in (SETTINGS_FILE, FINGERPRINT_FILE) if (Path(work) / name).exists()]
