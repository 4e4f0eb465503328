"""Safe fine-tuning runs (issue #12): nothing in a checkpoint folder is unpickled, a broken file is named, a run
folder is never silently overwritten or shared by two processes, a resumed run keeps its settings (only the step
budget may change), every --set counts and the budget is >= 1."""
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _recipes import load_recipe

from timm_hpm.train import parse_overrides, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'
RECIPE = ROOT / 'recipes' / 'finetune.py'
# accelerate's checkpoint file names: a folder written by accelerate's save_state holds these pickles.
ACCELERATE_NAMES = ('custom_checkpoint_0.pkl', 'random_states_0.pkl', 'optimizer.bin', 'scheduler.bin',
                    'sampler.bin', 'scaler.pt', 'pytorch_model.bin', 'dl_state_dict.bin')


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, str(RECIPE), '--device', 'cpu', *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def finetune():
    return load_recipe('finetune')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished two-step run with one checkpoint (step 2)."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    result = _cli(['--config', CONFIG, '--output-dir', out, '--max-steps', 2])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _resolve(finetune, argv):
    """The configuration recipes/finetune.py resolves from these arguments."""
    args = finetune.parse_args(argv)
    return resolve_config(args.config, args.resume, parse_overrides(args.set, args.epochs, args.max_steps),
                          args.output_dir)


def _copy(run: Path, dest: Path) -> Path:
    """A copy of the finished run as an interrupted one: its checkpoint, no final/ (a finished run is never
    resumed: tests/test_safe_runs_reuse.py)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / 'final')
    return dest


def _checkpoint(run: Path) -> Path:
    folders = sorted((run / 'checkpoints').iterdir())
    assert [f.name for f in folders] == ['checkpoint_2']
    return folders[0]


class CodeRunningPickle:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _plant(path: Path, marker: Path) -> None:
    torch.save(CodeRunningPickle(marker), path)


def test_the_planted_pickle_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / 'marker'
    _plant(tmp_path / 'evil.pt', marker)
    subprocess.run([sys.executable, '-c', f"import torch; torch.load({str(tmp_path / 'evil.pt')!r}, "
                                          "weights_only=False)"], check=True, timeout=120)
    assert marker.read_text() == 'code ran'


def _damage(path: Path, how: str, marker: Path) -> None:
    if how == 'pickle':
        _plant(path, marker)
    elif how == 'empty':
        path.write_bytes(b'')
    else:
        path.unlink()


@pytest.mark.parametrize('how, what', [('pickle', ''), ('empty', 'empty'), ('missing', 'missing')])
def test_every_checkpoint_file_is_read_safely_or_named(finetune, finished_run, tmp_path, caplog, how, what):
    """A code-running pickle, an empty file or no file at all under each file name of a real checkpoint folder:
    the resume stops with an error naming the file, and no code runs."""
    names = sorted(p.name for p in _checkpoint(finished_run).iterdir())
    assert {'model.safetensors', 'trainer_state.json'} <= set(names) and len(names) >= 4
    marker = tmp_path / 'marker'
    for name in names:
        run = _copy(finished_run, tmp_path / name)
        damaged = _checkpoint(run) / name
        _damage(damaged, how, marker)
        if how == 'missing' and name == 'trainer_state.json':
            # written last: without it the folder was cut short while saving and is skipped, saying so (here
            # there is no earlier checkpoint, so the run starts over)
            finetune.main(['--resume', str(run), '--device', 'cpu'])
            assert f'{damaged.parent} is incomplete' in caplog.text
            continue
        with pytest.raises(Exception) as error:
            finetune.main(['--resume', str(run), '--device', 'cpu'])
        assert not marker.exists(), f'resume unpickled the planted {name}'
        assert str(damaged) in str(error.value) and what in str(error.value), (name, error.value)


def test_accelerate_pickles_in_a_checkpoint_are_never_read(finetune, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / 'run')
    marker = tmp_path / 'marker'
    for name in ACCELERATE_NAMES:
        _plant(_checkpoint(run) / name, marker)
    finetune.main(['--resume', str(run), '--device', 'cpu'])
    assert not marker.exists()


def test_a_run_checkpointed_by_an_earlier_version_resumes(finetune, finished_run, tmp_path, caplog):
    """A run folder written before checkpoints took accelerate's naming (checkpoints/step_<k>) resumes from it."""
    run = _copy(finished_run, tmp_path / 'run')
    legacy = (run / 'checkpoints' / 'checkpoint_2').rename(run / 'checkpoints' / 'step_0000002')
    with caplog.at_level(logging.INFO):
        finetune.main(['--resume', str(run), '--max-steps', '3', '--device', 'cpu'])
    assert f'resumed from {legacy} (step 2)' in caplog.text
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['checkpoint_3', 'step_0000002']
    assert max(json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()) == 3


@pytest.mark.parametrize('name, content, what', [
    ('config.yaml', b'model: [unclosed', 'YAML'),
    ('config.yaml', b'', 'empty'),
    ('log.jsonl', b'{"step": 1}\n{"step": 2, "lo', 'line 2'),
])
def test_broken_run_files_are_named(finetune, finished_run, tmp_path, name, content, what):
    run = _copy(finished_run, tmp_path / 'run')
    (run / name).write_bytes(content)
    with pytest.raises(Exception) as error:
        finetune.main(['--resume', str(run), '--device', 'cpu'])
    assert str(run / name) in str(error.value) and what in str(error.value)


def test_empty_base_weights_are_named(tmp_path):
    from timm_hpm.train import ConfigError, load_config
    from timm_hpm.train.engine import build_model
    base = tmp_path / 'base.pt'
    base.write_bytes(b'')
    with pytest.raises(ConfigError, match=f'{base} is empty'):
        build_model(load_config(CONFIG, {'model.base': str(base)}))


def test_broken_checkpoint_through_the_cli_says_what_to_do(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / 'run')
    (_checkpoint(run) / 'trainer_state.json').write_text('{"global_step": ')
    result = _cli(['--resume', run])
    assert result.returncode == 2, result.stderr[-3000:]
    assert str(_checkpoint(run) / 'trainer_state.json') in result.stderr and 'Traceback' not in result.stderr


def test_checkpoint_is_marked_complete_by_an_atomic_trainer_state(finetune, tmp_path, monkeypatch):
    """trainer_state.json is the last file of a checkpoint and is written by rename (never half-written)."""
    replaced, real_replace = [], os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', recording_replace)
    run = tmp_path / 'run'
    finetune.main(['--config', str(CONFIG), '--output-dir', str(run), '--max-steps', '2', '--device', 'cpu'])
    folder = _checkpoint(run)
    assert (folder / 'trainer_state.json') in [dst for _, dst in replaced]
    assert all(src.parent == folder and src.name != 'trainer_state.json' for src, dst in replaced
               if dst == folder / 'trainer_state.json')
    newest = max(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == 'trainer_state.json'
    assert not [p for p in run.rglob('*') if '.tmp' in p.name]


def _digest(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob('*'))
            if p.is_file() and p.name != 'run.lock'}


def test_fresh_run_into_a_run_folder_is_refused_unless_overwrite(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / 'run')
    before = _digest(run)
    refused = _cli(['--config', CONFIG, '--output-dir', run, '--max-steps', 1])
    assert refused.returncode == 2
    assert str(run) in refused.stderr and '--resume' in refused.stderr and '--overwrite' in refused.stderr
    assert _digest(run) == before
    both = _cli(['--resume', run, '--overwrite'])
    assert both.returncode == 2 and 'not allowed with' in both.stderr
    replaced = _cli(['--config', CONFIG, '--output-dir', run, '--max-steps', 1, '--overwrite'])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert yaml.safe_load((run / 'config.yaml').read_text())['train']['max_steps'] == 1
    assert [p.name for p in (run / 'checkpoints').iterdir()] == ['checkpoint_1']
    assert max(json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()) == 1


@pytest.mark.slow
def test_second_process_fails_at_once_naming_the_holder(tmp_path):
    """A run holds its folder's lock: a second run (fresh or --resume) fails at once naming the holder; after the
    holder is killed, its stale lock is taken over by a resume."""
    run = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, str(RECIPE), '--config', str(CONFIG), '--device', 'cpu',
                               '--output-dir', str(run), '--set', 'train.epochs=1000'], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / 'checkpoints' / 'checkpoint_2' / 'trainer_state.json').exists():
            time.sleep(0.05)
        assert holder.poll() is None, 'the first run ended early'
        for args in (['--config', CONFIG, '--output-dir', run, '--overwrite'], ['--resume', run]):
            second = _cli(args)
            assert second.returncode == 2, second.stderr[-3000:]
            assert f'pid {holder.pid}' in second.stderr and socket.gethostname() in second.stderr, second.stderr
        assert holder.poll() is None, 'the second process disturbed the first'
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # a short budget to finish fast, one step past the newest checkpoint (a resume never shortens a run below it)
    newest = max(int(p.name.split('_')[1]) for p in (run / 'checkpoints').glob('checkpoint_*')
                 if (p / 'trainer_state.json').exists())
    resumed = _cli(['--resume', run, '--set', 'train.epochs=1', '--max-steps', newest + 1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'stale' in resumed.stderr and f'pid {holder.pid}' in resumed.stderr


def test_resume_refuses_changed_settings(finetune, finished_run):
    with pytest.raises(Exception, match=r'train\.lr.*0\.01.*0\.5') as error:
        _resolve(finetune, ['--resume', str(finished_run), '--set', 'train.lr=0.5'])
    assert 'train.max_steps' in str(error.value)  # says what may change


def test_resume_takes_a_new_budget_and_logs_when(finetune, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / 'run')
    finetune.main(['--resume', str(run), '--max-steps', '3', '--device', 'cpu'])
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    changes = [r for r in log if 'budget_change' in r]
    assert changes == [{'step': 2, 'budget_change': {'train.max_steps': [2, 3]}}]
    assert max(r['step'] for r in log) == 3
    assert yaml.safe_load((run / 'config.yaml').read_text())['train']['max_steps'] == 3


def test_every_set_counts(finetune):
    cfg, _ = _resolve(finetune, ['--config', str(CONFIG), '--set', 'train.lr=0.5', '--set', 'attack.steps=3',
                                 'train.seed=7'])
    assert (cfg.train.lr, cfg.attack.steps, cfg.train.seed) == (0.5, 3, 7)


@pytest.mark.parametrize('value', [0, -3])
def test_budget_must_be_at_least_one_step(finetune, value, tmp_path):
    with pytest.raises(Exception, match=r'train\.max_steps.*>= 1'):
        _resolve(finetune, ['--config', str(CONFIG), '--max-steps', str(value)])
    result = _cli(['--config', CONFIG, '--output-dir', tmp_path / 'r', '--max-steps', value])
    assert result.returncode == 2 and '>= 1' in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'r' / 'log.jsonl').exists()


def test_no_arguments_print_usage_instead_of_training(tmp_path):
    """A recipe needs --config or --resume: with neither it says so (exit 2), it does not start a default run."""
    result = subprocess.run([sys.executable, str(RECIPE)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and 'give --config' in result.stderr and 'usage:' in result.stderr
    assert not any(tmp_path.iterdir())
