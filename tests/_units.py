"""Test helpers for a run folder's units file (timm_hpm.eval.unit_store): its units as dicts, an edited copy written
back (the tests that damage or change a unit on purpose), its header, and a run turned into a folder of version 2
(settings.json and fingerprint.json beside a units file without a header)."""
import json
from pathlib import Path
from typing import Optional

from timm_hpm.eval.run_header import is_header
from timm_hpm.eval.unit_store import UNITS_FILE, read_units


def units(run: Path, batching: str = 'default') -> list:
    """The finished units of one batching, in index order."""
    return [u for (b, _), u in sorted(read_units(run).items()) if b == batching]


def _lines(run: Path, store: str = UNITS_FILE) -> list:
    return [json.loads(line) for line in (Path(run) / store).read_text().splitlines()]


def header(run: Path, store: str = UNITS_FILE) -> Optional[dict]:
    """The header line's content (settings, fingerprints), or None (a folder of an earlier version)."""
    lines = _lines(run, store)
    return lines[0]['header'] if lines and is_header(lines[0]) else None


def entries(run: Path) -> list:
    """Every unit line of the run's units file, parsed (the header left out)."""
    return [e for e in _lines(run) if not is_header(e)]


def write_entries(run: Path, lines: list) -> None:
    """Replace the units of the run's units file by ``lines`` (dicts, or raw strings written as they are); its
    header, if it has one, stays its first line."""
    head = header(run)
    lines = ([{'header': head}] if head is not None else []) + list(lines)
    (Path(run) / UNITS_FILE).write_text(''.join((s if isinstance(s, str) else json.dumps(s)) + '\n' for s in lines))


def to_v2(work: Path, store: str = UNITS_FILE) -> Path:
    """``work`` (a version 3 work folder) as version 2 wrote it: settings.json (with ``schema_version: 2``) and
    fingerprint.json beside a store without a header."""
    work = Path(work)
    lines = _lines(work, store)
    head = lines.pop(0)['header']
    settings = dict(head['settings'], schema_version=2)
    if head.get('filled_by_upgrade'):
        settings['filled_by_upgrade'] = head['filled_by_upgrade']
    (work / 'settings.json').write_text(json.dumps(settings))
    if 'fingerprint' in head:
        (work / 'fingerprint.json').write_text(json.dumps(head['fingerprint']))
    (work / store).write_text(''.join(json.dumps(e) + '\n' for e in lines))
    return work
