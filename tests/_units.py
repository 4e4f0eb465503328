"""Test helpers for a run folder's units file (timm_hpm.eval.unit_store): its entries as dicts, and an edited copy
written back (the tests that damage or change a unit on purpose)."""
import json
from pathlib import Path

from timm_hpm.eval.unit_store import UNITS_FILE, read_units


def units(run: Path, batching: str = 'default') -> list:
    """The finished units of one batching, in index order."""
    return [u for (b, _), u in sorted(read_units(run).items()) if b == batching]


def entries(run: Path) -> list:
    """Every line of the run's units file, parsed."""
    return [json.loads(line) for line in (Path(run) / UNITS_FILE).read_text().splitlines()]


def write_entries(run: Path, lines: list) -> None:
    """Replace the run's units file by ``lines`` (dicts, or raw strings written as they are)."""
    (Path(run) / UNITS_FILE).write_text(''.join((s if isinstance(s, str) else json.dumps(s)) + '\n' for s in lines))
