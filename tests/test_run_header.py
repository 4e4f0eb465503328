"""A run's settings and fingerprints in the header line of its units file (schema version 3,
timm_hpm.eval.run_header): written once, first, read back; folders of version 2 (settings.json and fingerprint.json
beside the units) still read and converted by timm_hpm.eval.migrate_runs."""
import json
from pathlib import Path

import pytest
from _units import header, to_v2
from test_run_store import CFG, _copy, finished  # noqa: F401  (finished: the fixture, shared)

from timm_hpm.eval import aggregate, evaluate, format_table
from timm_hpm.eval import runner as runner_module
from timm_hpm.eval import unit_store
from timm_hpm.eval.migrate_runs import migrate_folder
from timm_hpm.eval.run_header import read_run_fingerprint, read_run_settings
from timm_hpm.eval.unit_checks import UnitFileError
from timm_hpm.eval.unit_store import UNITS_FILE, read_units
from timm_hpm.eval.settings_schema import SCHEMA_VERSION


def _strip(result):
    return json.dumps({k: v for k, v in result.items() if k not in ('attack_seconds', 'machine')}, sort_keys=True)


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file() and p.name != 'run.lock')


def _snapshot(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in _files(folder)}


def _count_calls(monkeypatch) -> list:
    real, calls = runner_module.attack_batch, []
    monkeypatch.setattr(runner_module, 'attack_batch', lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_header_is_the_first_line_and_holds_the_settings_and_fingerprints(finished):
    model, x, y, run, result = finished
    assert _files(run) == [UNITS_FILE]
    lines = [json.loads(line) for line in (run / UNITS_FILE).read_text().splitlines()]
    assert list(lines[0]) == ['header'] and all('header' not in line for line in lines[1:]) and len(lines) == 3
    head = lines[0]['header']
    assert head["schema_version"] == SCHEMA_VERSION == 5 and head["settings"] == result["settings"]
    assert set(head['fingerprint']) == {'model', 'data'}
    assert read_run_fingerprint(run) == head['fingerprint']
    assert {k: v for k, v in read_run_settings(run).items() if k != 'schema_version'} == result['settings']


def test_a_resumed_run_writes_no_second_header(finished, tmp_path, monkeypatch):
    model, x, y, _, result = finished
    run = _copy(finished, tmp_path)
    head, first, _ = (run / UNITS_FILE).read_text().splitlines()
    (run / UNITS_FILE).write_text(f'{head}\n{first}\n')  # killed before its second unit
    calls = _count_calls(monkeypatch)
    assert _strip(evaluate(model, x, y, CFG, run, batch_size=16, progress=False)) == _strip(result)
    lines = (run / UNITS_FILE).read_text().splitlines()
    assert len(calls) == 1 and lines[:2] == [head, first] and sum('"header"' in line for line in lines) == 1


def test_a_run_killed_while_writing_its_header_starts_cleanly(finished, tmp_path, monkeypatch, caplog):
    model, x, y, _, result = finished
    run = _copy(finished, tmp_path)
    head = (run / UNITS_FILE).read_text().splitlines()[0]
    (run / UNITS_FILE).write_text(head[:len(head) // 2])  # a partial header line, nothing else
    assert read_run_settings(run) is None and read_units(run) == {}
    calls = _count_calls(monkeypatch)
    assert _strip(evaluate(model, x, y, CFG, run, batch_size=16, progress=False)) == _strip(result)
    lines = (run / UNITS_FILE).read_text().splitlines()
    assert len(calls) == 2 and lines[0] == head and len(lines) == 3


@pytest.mark.parametrize('where', ['second header', 'unit before the header'])
def test_a_header_anywhere_but_the_first_line_is_an_error_naming_file_and_line(finished, tmp_path, where):
    model, x, y, _, _ = finished
    run = _copy(finished, tmp_path)
    head, first, second = (run / UNITS_FILE).read_text().splitlines()
    lines = [head, first, head, second] if where == 'second header' else [first, head, second]
    (run / UNITS_FILE).write_text('\n'.join(lines) + '\n')
    line = 3 if where == 'second header' else 2
    with pytest.raises(UnitFileError, match=rf'{run / UNITS_FILE}:{line} is a header'):
        read_units(run)
    before = _snapshot(run)
    with pytest.raises(UnitFileError):
        evaluate(model, x, y, CFG, run, batch_size=16, progress=False)
    assert _snapshot(run) == before


def test_no_unit_is_written_before_the_header(tmp_path, monkeypatch):
    """Another process of a sharded run waits for the main process's header; none: an error, nothing written."""
    monkeypatch.setattr(unit_store._append_after_header, '__defaults__', (0.3,))
    with pytest.raises(UnitFileError, match='has no header'):
        unit_store.write_unit(tmp_path, 'default', 0, {'indices': [0]})
    assert not (tmp_path / UNITS_FILE).exists()


def test_a_version_2_folder_is_read_checked_and_migrated(finished, tmp_path, monkeypatch):
    model, x, y, _, result = finished
    run = to_v2(_copy(finished, tmp_path / 'out', 'attack'))
    assert _files(run) == ['fingerprint.json', 'settings.json', UNITS_FILE] and header(run) is None
    old = aggregate(run)
    assert _strip(old) == _strip(result)
    calls = _count_calls(monkeypatch)
    evaluate(model, x, y, CFG, run, batch_size=16, progress=False, finished=True)  # checked, nothing written
    with pytest.raises(ValueError, match='other images'):
        evaluate(model, x.flip(0), y.flip(0), CFG, run, batch_size=16, progress=False, finished=True)
    assert calls == [] and _files(run) == ['fingerprint.json', 'settings.json', UNITS_FILE]
    settings, fingerprint = (json.loads((run / name).read_text()) for name in ('settings.json', 'fingerprint.json'))
    migrate_folder(tmp_path / 'out')
    assert _files(run) == [UNITS_FILE]
    recorded = {k: v for k, v in settings.items() if k != 'schema_version'}
    assert header(run) == {"schema_version": SCHEMA_VERSION, "settings": recorded, "fingerprint": fingerprint}
    migrated = aggregate(run)
    assert json.dumps(migrated, indent=2) == json.dumps(old, indent=2) and format_table(migrated) == format_table(old)
    after = _snapshot(run)
    assert migrate_folder(tmp_path / 'out') == [] and _snapshot(run) == after  # idempotent


def test_work_left_in_a_version_2_folder_is_refused_until_it_is_migrated(finished, tmp_path, monkeypatch):
    model, x, y, _, result = finished
    run = to_v2(_copy(finished, tmp_path))
    first, _ = (run / UNITS_FILE).read_text().splitlines(keepends=True)
    (run / UNITS_FILE).write_text(first)  # version 2: no header; killed before its second unit
    before = _snapshot(run)
    with pytest.raises(UnitFileError, match='migrate_runs'):
        evaluate(model, x, y, CFG, run, batch_size=16, progress=False)
    assert _snapshot(run) == before
    migrate_folder(run)
    calls = _count_calls(monkeypatch)
    assert _strip(evaluate(model, x, y, CFG, run, batch_size=16, progress=False)) == _strip(result)
    assert len(calls) == 1 and _files(run) == [UNITS_FILE]
