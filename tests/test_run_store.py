"""One file per run: the units file (timm_hpm.eval.unit_store), reading folders of the earlier layouts (one file per
unit; settings.json and fingerprint.json beside the units), their migration (timm_hpm.eval.migrate_runs) and the
settings' schema version. The header line itself: test_run_header.py."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from _units import header, to_v2
from test_msa import FAST, small_hpm
from test_poison import _dependent_batch

from timm_hpm.eval import MSAConfig, aggregate, evaluate, format_table, run_poisoning
from timm_hpm.eval import runner as runner_module
from timm_hpm.eval import unit_store
from timm_hpm.eval.migrate_runs import main as migrate_main
from timm_hpm.eval.migrate_runs import migrate_folder
from timm_hpm.eval.poison import _aggregate
from timm_hpm.eval.run_header import make_header
from timm_hpm.eval.settings_schema import SCHEMA_VERSION
from timm_hpm.eval.unit_checks import UNIT_KEYS, UnitFileError
from timm_hpm.eval.unit_store import (POISON_FILE, UNITS_FILE, read_poison_batches, read_units, write_header,
                                     write_unit)

CFG = MSAConfig(eps=0.05, **FAST)


def _unit(indices, flag=True):
    n = len(indices)
    return {'clean': [True] * n, 'realised': [flag] * n, 'union': [flag] * n, 'candidates': {'autoattack': [flag] * n},
            'passes': {'forward_images': 3 * n, 'backward_images': n}, 'seconds': 0.25, 'indices': list(indices)}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != 'run.lock'}


def _strip(result):
    return json.dumps({k: v for k, v in result.items() if k not in ('attack_seconds', 'machine')}, sort_keys=True)


def _to_legacy(run: Path) -> Path:
    """``run`` as the first versions wrote it: one file per unit in units/, settings without a schema version."""
    units = read_units(to_v2(run))
    (run / 'units').mkdir()
    for (batching, index), unit in units.items():
        fields = {k: v for k, v in unit.items() if k not in ('batching', 'index')}
        (run / 'units' / f'{batching}_{index:06d}.json').write_text(json.dumps(fields))
    (run / UNITS_FILE).unlink()
    settings = json.loads((run / 'settings.json').read_text())
    del settings['schema_version']
    (run / 'settings.json').write_text(json.dumps(settings))
    return run


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 32-image run in batches of 16 (two units), and its result."""
    model, x, y = small_hpm(n=32)
    run = tmp_path_factory.mktemp('finished') / 'attack'
    return model, x, y, run, evaluate(model, x, y, CFG, run, batch_size=16, progress=False)


def _copy(finished, tmp_path, name='run'):
    return Path(shutil.copytree(finished[3], tmp_path / name))


# ---------------------------------------------------------------- the store
def test_units_round_trip_in_one_file(tmp_path):
    written = {('default', i): _unit(range(4 * i, 4 * i + 4), flag=i % 2 == 0) for i in range(3)}
    written['single', 0] = _unit([7])
    write_header(tmp_path / UNITS_FILE, make_header({'protocol': 'msa'}))
    for (batching, index), unit in written.items():
        write_unit(tmp_path, batching, index, unit)
    assert [p.name for p in tmp_path.iterdir()] == [UNITS_FILE]
    assert len((tmp_path / UNITS_FILE).read_text().splitlines()) == 1 + 4
    read = read_units(tmp_path)
    assert {k: {f: v for f, v in u.items() if f not in ('batching', 'index')} for k, u in read.items()} == written
    assert all(read[k]['batching'] == k[0] and read[k]['index'] == k[1] for k in read)


@pytest.mark.parametrize('content, kept', [
    (b'', []), (b'{"a": 1}\n', [1]), (b'{"a": 1}\n{"a": 2', [1]), (b'{"a"', []), (b'{"a": 1}\n\n', [1]),
    (b'{"a": 1}\n{"a": 2, "x": "' + b'y' * 200_000 + b'"}\n', [1, 2]),  # a last line longer than one read
    (b'{"a": 1}\n{"a": 2, "x": "' + b'y' * 200_000, [1]),
])
def test_an_append_cuts_off_only_a_partial_last_line(tmp_path, content, kept):
    path = tmp_path / 'store.jsonl'
    path.write_bytes(content)
    unit_store.append_line(path, {'a': 9})
    assert [entry['a'] for _, entry in unit_store.read_lines(path)] == kept + [9]


def test_a_run_writes_one_units_file_and_a_schema_version(finished):
    run = finished[3]
    assert sorted(p.name for p in run.iterdir() if p.name != 'run.lock') == [UNITS_FILE]
    assert header(run)["schema_version"] == SCHEMA_VERSION == 5
    assert sorted(read_units(run)) == [('default', 0), ('default', 1)]
    assert 'schema_version' not in finished[4]['settings']  # eval.json records the evaluation's settings


def test_a_partial_last_line_is_ignored_with_a_warning_and_its_unit_redone(finished, tmp_path, monkeypatch, caplog):
    model, x, y, _, result = finished
    run = _copy(finished, tmp_path)
    head, first, second = (run / UNITS_FILE).read_text().splitlines()
    (run / UNITS_FILE).write_text(f'{head}\n{first}\n{second[:len(second) // 2]}')  # killed while writing the second
    with caplog.at_level('WARNING', logger=unit_store.__name__):
        assert list(read_units(run)) == [('default', 0)]
    assert any(f'{run / UNITS_FILE}:3: a partial last line' in r.getMessage() for r in caplog.records)
    real, calls = runner_module.attack_batch, []
    monkeypatch.setattr(runner_module, 'attack_batch', lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = evaluate(model, x, y, CFG, run, batch_size=16, progress=False)
    assert len(calls) == 1 and _strip(resumed) == _strip(result)
    lines = (run / UNITS_FILE).read_text().splitlines()
    assert lines[:2] == [head, first] and len(lines) == 3  # the other unit kept, the partial line cut off


def test_a_damaged_middle_line_is_an_error_naming_file_and_line(finished, tmp_path):
    run = _copy(finished, tmp_path)
    head, first, second = (run / UNITS_FILE).read_text().splitlines()
    (run / UNITS_FILE).write_text(f'{head}\n{first[:30]}\n{second}\n')
    with pytest.raises(UnitFileError, match=rf'{run / UNITS_FILE}:2 is not a JSON object'):
        read_units(run)
    with pytest.raises(UnitFileError, match=rf'{run / UNITS_FILE}:2'):
        evaluate(*finished[:3], CFG, run, batch_size=16, progress=False)
    partial = json.dumps({'batching': 'default', 'index': 0, 'indices': [0]})  # parses, but is no whole unit
    (run / UNITS_FILE).write_text(f'{head}\n{partial}\n{second}\n')
    with pytest.raises(UnitFileError, match=rf'unit file {run / UNITS_FILE}:2 lacks'):
        aggregate(run)


def test_two_lines_for_one_unit_are_an_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    head, first, second = (run / UNITS_FILE).read_text().splitlines()
    (run / UNITS_FILE).write_text('\n'.join([head, first, second, first]) + '\n')
    with pytest.raises(UnitFileError, match=rf"{run / UNITS_FILE}:4 and {run / UNITS_FILE}:2 both hold unit "
                                            r"\('default', 0\)"):
        read_units(run)


# ---------------------------------------------------------------- --extend-from
@pytest.mark.parametrize('layout', ['v3', 'v2', 'legacy'])
def test_extending_a_run_of_any_layout_equals_the_run_from_scratch(finished, tmp_path, monkeypatch, layout):
    model, x, y, _, _ = finished
    small = tmp_path / 'small'
    evaluate(model, x[:16], y[:16], CFG, small, batch_size=16, progress=False)
    {'v3': lambda run: run, 'v2': to_v2, 'legacy': _to_legacy}[layout](small)
    before = _snapshot(small)
    real, calls = runner_module.attack_batch, []
    monkeypatch.setattr(runner_module, 'attack_batch', lambda *a, **k: calls.append(1) or real(*a, **k))
    grown = evaluate(model, x, y, CFG, tmp_path / 'grown', batch_size=16, progress=False, extend_from=[small])
    assert len(calls) == 1 and _strip(grown) == _strip(finished[4])  # batch 0 reused
    assert _snapshot(small) == before and unit_store.units_layout(tmp_path / 'grown') == 'jsonl'
    assert sorted(p.name for p in (tmp_path / 'grown').iterdir() if p.name != 'run.lock') == [UNITS_FILE]


def test_a_legacy_folder_is_read_but_never_written_into(finished, tmp_path):
    model, x, y, _, result = finished
    run = _to_legacy(_copy(finished, tmp_path))
    assert _strip(aggregate(run)) == _strip(result)
    (run / 'units' / 'default_000001.json').unlink()
    with pytest.raises(UnitFileError, match='migrate_runs'):
        evaluate(model, x, y, CFG, run, batch_size=16, progress=False)
    assert not (run / UNITS_FILE).exists()


# ---------------------------------------------------------------- migration
def test_migration_gives_the_same_aggregate_and_is_idempotent(finished, tmp_path, capsys):
    model, x, y, _, result = finished
    run = _to_legacy(_copy(finished, tmp_path / 'out', 'attack'))  # an evaluate.py --out folder's work folder
    legacy_result = aggregate(run)
    assert migrate_main([str(tmp_path / 'out')]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name != 'run.lock') == [UNITS_FILE]
    assert header(run)['schema_version'] == SCHEMA_VERSION and header(run)['fingerprint']['model']
    migrated = aggregate(run)
    assert json.dumps(migrated, indent=2) == json.dumps(legacy_result, indent=2)
    assert format_table(migrated) == format_table(legacy_result)
    after = _snapshot(tmp_path / 'out')
    assert migrate_main([str(tmp_path / 'out')]) == 0 and 'already in the current layout' in capsys.readouterr().out
    assert _snapshot(tmp_path / 'out') == after
    resumed = evaluate(model, x, y, CFG, run, batch_size=16, progress=False, finished=True)  # checked, nothing written
    assert _strip(resumed) == _strip(result) and _snapshot(tmp_path / 'out') == after



@pytest.mark.parametrize('version, missing', [(3, ('completion_rounds', 'search_sweeps')), (4, ('search_sweeps',))])
def test_an_earlier_version_reads_as_one_without_the_later_stages(finished, tmp_path, version, missing):
    """A header of schema 3 (before MSA's completion stage and local search) or 4 (before the local search): read
    as completion_rounds 0 / search_sweeps 0 and marked as filled, so the run is checked, resumed or extended with
    today's defaults, and eval.json embeds its settings as recorded."""
    model, x, y, _, result = finished
    run = _copy(finished, tmp_path)
    lines = (run / UNITS_FILE).read_text().splitlines()
    head = json.loads(lines[0])
    head['header']['schema_version'] = version
    for key in missing:
        del head['header']['settings']['msa'][key]
    (run / UNITS_FILE).write_text('\n'.join([json.dumps(head)] + lines[1:]) + '\n')
    recorded = {k: v for k, v in result['settings'].items()}
    recorded['msa'] = {k: v for k, v in recorded['msa'].items() if k not in missing}
    assert aggregate(run)['settings'] == recorded  # as the run recorded them
    before = _snapshot(run)
    again = evaluate(model, x, y, CFG, run, batch_size=16, progress=False, finished=True)  # checked, nothing written
    assert _strip(again) == _strip(dict(result, settings=recorded)) and _snapshot(run) == before
    for key in missing:  # a run with the stage is another evaluation
        with pytest.raises(ValueError, match=key):
            evaluate(model, x, y, dataclasses.replace(CFG, **{key: 1}), run, batch_size=16, progress=False,
                     finished=True)


def test_migrating_earlier_settings_keeps_eval_json_as_recorded(finished, tmp_path):
    """A settings file of schema 1 that lacks options added since: the migration fills them in (what that run
    did) and records which, so the aggregate still embeds the settings as the run recorded them."""
    run = _to_legacy(_copy(finished, tmp_path))
    settings = json.loads((run / 'settings.json').read_text())
    del settings['msa']['score_iterates']
    (run / 'settings.json').write_text(json.dumps(settings))
    legacy_result = aggregate(run)
    migrate_folder(run)
    upgraded = header(run)
    assert upgraded['settings']['msa']['score_iterates'] is False
    assert upgraded['filled_by_upgrade'] == ['msa.score_iterates']
    assert json.dumps(aggregate(run), indent=2) == json.dumps(legacy_result, indent=2)


def test_migration_refuses_both_layouts_unless_it_was_interrupted(finished, tmp_path):
    run = _to_legacy(_copy(finished, tmp_path))
    legacy = _snapshot(run)
    migrate_folder(run)
    migrated = _snapshot(run)
    (run / 'units').mkdir()  # interrupted after writing the new file, one old file and the settings left: finished
    (run / 'units' / 'default_000001.json').write_bytes(legacy['units/default_000001.json'])
    (run / 'settings.json').write_bytes(legacy['settings.json'])
    with pytest.raises(UnitFileError, match='interrupted migration'):
        aggregate(run)  # never read half-converted
    assert 'interrupted' in migrate_folder(run)[0] and _snapshot(run) == migrated
    settings = json.loads(legacy['settings.json'])  # settings that differ from the header: refused
    (run / 'settings.json').write_text(json.dumps(dict(settings, batch_size=8)))
    with pytest.raises(UnitFileError, match='header that differs'):
        migrate_folder(run)
    (run / 'settings.json').write_bytes(legacy['settings.json'])
    (run / 'units').mkdir()  # an old file that differs from the new one: refused, nothing changed
    unit = json.loads(legacy['units/default_000001.json'])
    (run / 'units' / 'default_000001.json').write_text(json.dumps(dict(unit, seconds=unit['seconds'] + 1)))
    before = _snapshot(run)
    with pytest.raises(UnitFileError, match='differ from it'):
        migrate_folder(run)
    assert _snapshot(run) == before
    with pytest.raises(UnitFileError, match='holds both'):
        read_units(run)


def test_migrating_a_poisoning_run_keeps_its_rows(tmp_path):
    model, x, y, target, views = _dependent_batch(n=16)
    out = tmp_path / 'poison'
    rows = run_poisoning(target, views, x, y, 8, 0.05, out, steps=2, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != 'run.lock') == [POISON_FILE]
    assert header(out, POISON_FILE)['schema_version'] == SCHEMA_VERSION
    batches = read_poison_batches(out)
    to_v2(out, POISON_FILE)
    assert read_poison_batches(out) == batches
    assert run_poisoning(target, views, x, y, 8, 0.05, out, steps=2, progress=False) == rows  # version 2 read
    for index, batch in batches.items():  # the first layout: one file per batch, settings without a version
        (out / f'batch_{index:05d}.json').write_text(json.dumps(batch))
    (out / POISON_FILE).unlink()
    settings = json.loads((out / 'settings.json').read_text())
    del settings['schema_version']
    (out / 'settings.json').write_text(json.dumps(settings, indent=2))
    assert run_poisoning(target, views, x, y, 8, 0.05, out, steps=2, progress=False) == rows  # read as it is
    migrate_folder(tmp_path)
    assert sorted(p.name for p in out.iterdir() if p.name != 'run.lock') == [POISON_FILE]
    assert header(out, POISON_FILE)['settings'] == {k: v for k, v in settings.items()}
    assert read_poison_batches(out) == batches
    assert _aggregate([batches[i] for i in sorted(batches)], 8) == rows
    assert run_poisoning(target, views, x, y, 8, 0.05, out, steps=2, progress=False) == rows


# ---------------------------------------------------------------- schema version
def test_a_newer_settings_schema_is_refused(finished, tmp_path):
    model, x, y, _, _ = finished
    run = _copy(finished, tmp_path)
    lines = (run / UNITS_FILE).read_text().splitlines(keepends=True)
    newer = {'header': dict(header(run), schema_version=SCHEMA_VERSION + 1)}
    (run / UNITS_FILE).write_text(json.dumps(newer) + '\n' + ''.join(lines[1:]))
    before = _snapshot(run)
    for call in (lambda: evaluate(model, x, y, CFG, run, batch_size=16, progress=False), lambda: aggregate(run),
                 lambda: migrate_folder(run)):
        with pytest.raises(ValueError, match='written by a newer timm-hpm.*upgrade timm-hpm'):
            call()
    assert _snapshot(run) == before


def test_a_unit_entry_needs_every_unit_field(tmp_path):
    write_header(tmp_path / UNITS_FILE, make_header({'protocol': 'msa'}))
    write_unit(tmp_path, 'default', 0, {k: v for k, v in _unit([0]).items() if k != 'passes'})
    with pytest.raises(UnitFileError, match=r":2 lacks \['passes'\]"):
        read_units(tmp_path)
    assert set(UNIT_KEYS) <= set(_unit([0]))
