"""Reused runs (issue #28, second round): wherever a run is reused, the configuration asked for is compared with the
one its folder records, and a mismatch is refused naming the settings, with nothing rewritten or deleted.

- recipes/finetune.py --resume of a finished run: with its own settings a no-op (config.yaml, final/ and every other
  file byte-identical), with another step budget refused (it used to rewrite config.yaml to the new budget and keep
  the old weights in final/); an interrupted run is not shortened below the steps its checkpoint trained;
- recipes/study.py reuses a fine-tune only when the run folder's config.yaml is the candidate's configuration (a
  changed candidate, or a second study giving the name to another configuration in the shared --runs folder, used
  to be scored on the old model);
- recipes/study.py without matplotlib stops before any work unless --no-figure; its recorded command is
  shell-quoted.
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _recipes import load_recipe

import timm_hpm
from timm_hpm.attacks import normalized_view
from timm_hpm.study import read_scores
from timm_hpm.train import ConfigError, RunFolderError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'
RECIPE = ROOT / 'recipes' / 'finetune.py'


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, str(RECIPE), '--device', 'cpu', *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))


def _digest(folder: Path) -> dict:
    """Every file under ``folder`` (run.lock aside: a lock taken and released) by its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != 'run.lock'}


@pytest.fixture(scope='module')
def finetune():
    return load_recipe('finetune')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished three-step run (checkpoints at steps 2 and 3)."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    result = _cli(['--config', CONFIG, '--output-dir', out, '--max-steps', 3, '--set', 'train.eval_pgd_steps=0'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['checkpoint_2', 'checkpoint_3']
    return out


def test_a_finished_run_resumed_with_another_budget_is_refused_and_left_as_it_was(finetune, finished_run, tmp_path):
    """The probe: --resume <finished run> --max-steps <fewer> exited 0, rewrote config.yaml to the new budget and
    left the longer run's weights in final/. Now it is refused naming the key, and no file changes; a longer budget
    or other epochs are refused as well (a finished run's weights are never replaced)."""
    run = shutil.copytree(finished_run, tmp_path / 'run')
    before = _digest(run)
    refused = _cli(['--resume', run, '--max-steps', 2])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert 'train.max_steps 3 -> 2' in refused.stderr and 'Traceback' not in refused.stderr
    assert 'another --output-dir' in refused.stderr and f'delete {run / "final"}' in refused.stderr
    assert _digest(run) == before
    for budget in (['--max-steps', '5'], ['--epochs', '1']):
        with pytest.raises(ConfigError, match='has finished'):
            finetune.main(['--resume', str(run), '--device', 'cpu', *budget])
        assert _digest(run) == before, budget
    assert yaml.safe_load((run / 'config.yaml').read_text())['train']['max_steps'] == 3


def test_a_finished_run_resumed_with_its_own_settings_is_a_no_op(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / 'run')
    before = _digest(run)
    for extra in ([], ['--max-steps', 3]):  # its own budget, given or not
        same = _cli(['--resume', run, *extra])
        assert same.returncode == 0, same.stderr[-3000:]
        assert 'nothing to do' in same.stderr
        assert _digest(run) == before  # config.yaml, final/, log, checkpoints, fingerprints: byte-identical


def test_an_interrupted_run_is_not_shortened_below_its_checkpoint(finetune, finished_run, tmp_path):
    """A run stopped after its step-3 checkpoint (no final/) resumed with a 2-step budget would write the 3-step
    weights under a config that says 2: refused before anything is read or written. Deleting final/ on purpose
    (what the refusal for a finished run advises) lets a longer budget go on from the checkpoint."""
    run = shutil.copytree(finished_run, tmp_path / 'run')
    shutil.rmtree(run / 'final')
    before = _digest(run)
    with pytest.raises(RunFolderError, match=r'trained 3 steps, more than the budget of 2 steps'):
        finetune.main(['--resume', str(run), '--max-steps', '2', '--device', 'cpu'])
    assert _digest(run) == before  # log.jsonl included: nothing truncated
    finetune.main(['--resume', str(run), '--max-steps', '4', '--device', 'cpu'])
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    assert {'step': 3, 'budget_change': {'train.max_steps': [3, 4]}} in log and max(r['step'] for r in log) == 4
    assert yaml.safe_load((run / 'config.yaml').read_text())['train']['max_steps'] == 4
    assert (run / 'final' / 'model.safetensors').is_file()


# --- recipes/study.py ---------------------------------------------------------------------------------------------

def _write_study(folder: Path, candidates: dict, common=None, name='study.yaml') -> Path:
    study = {'config': str(folder / 'hpm.yaml'), 'control_config': str(folder / 'control.yaml'),
             'common': {'train.max_steps': 1, **(common or {})},
             'scoring': {'n_val': 8, 'apgd_iters': 2, 'n_target_classes': 1, 'batch_size': 4},
             'candidates': candidates}
    (folder / name).write_text(yaml.safe_dump(study))
    return folder / name


@pytest.fixture(scope='module')
def study_recipe():
    return load_recipe('study')


@pytest.fixture(scope='module')
def finished_study(tmp_path_factory, study_recipe):
    """A scored one-candidate study (hpm and its control, one step each), in folders whose names hold a space."""
    folder = tmp_path_factory.mktemp('study') / 'a study'
    folder.mkdir()
    base = yaml.safe_load(CONFIG.read_text())
    base['data'].update(val_examples=16, synthetic_examples=48)
    base['train'].update(epochs=1, eval_pgd_steps=0)
    (folder / 'hpm.yaml').write_text(yaml.safe_dump(base))
    control = json.loads(json.dumps(base))
    control['model']['name'] = 'preact_resnet18'
    control['model'].pop('hpm')
    control['train']['objective'] = 'base'
    (folder / 'control.yaml').write_text(yaml.safe_dump(control))
    _write_study(folder, {'hpm': {}})
    argv = _study_args(folder)
    rows = study_recipe.main(argv)
    assert [r['name'] for r in rows] == ['control_1/seed0', 'hpm/seed0']
    return folder


def _study_args(folder: Path, out='out', study='study.yaml'):
    return ['--study', str(folder / study), '--out', str(folder / out), '--runs', str(folder / 'runs')]


def test_a_changed_candidate_is_refused_not_scored_on_the_old_model(study_recipe, finished_study, tmp_path):
    """The probe: change a candidate, delete its score as the refusal advises, rerun. The new score recorded the new
    option with the old model's per-image results, and the run's config.yaml still showed the old one. Now the old
    run is refused naming the setting; once its folder is deleted on purpose, the candidate is fine-tuned again and
    its score is the new model's."""
    folder = shutil.copytree(finished_study, tmp_path / 'a study')
    hpm_run, old_weights = folder / 'runs' / 'hpm' / 'seed0', (folder / 'runs' / 'hpm' / 'seed0' / 'final' /
                                                               'model.safetensors').read_bytes()
    _write_study(folder, {'hpm': {'model.hpm.alpha': 0.25}})
    with pytest.raises(SystemExit, match='rename the candidate, or remove its line'):
        study_recipe.main(_study_args(folder))
    _forget(folder / 'out', 'hpm/seed0')  # as that message advises
    runs_before = _digest(folder / 'runs')
    with pytest.raises(SystemExit) as refused:
        study_recipe.main(_study_args(folder))
    message = str(refused.value)
    assert str(hpm_run) in message and 'model.hpm.alpha 0.5 -> 0.25' in message and '--runs' in message
    assert 'hpm/seed0' not in read_scores(folder / 'out' / 'scores.jsonl')  # nothing scored on the old model
    assert _digest(folder / 'runs') == runs_before  # nothing rewritten, nothing deleted
    shutil.rmtree(hpm_run)  # deliberately, as the refusal says
    rows = study_recipe.main(_study_args(folder))
    assert [r['name'] for r in rows] == ['control_1/seed0', 'hpm/seed0']
    assert yaml.safe_load((hpm_run / 'config.yaml').read_text())['model']['hpm']['alpha'] == 0.25
    assert (hpm_run / 'final' / 'model.safetensors').read_bytes() != old_weights  # fine-tuned again
    model = timm.create_model(f"local-dir:{hpm_run / 'final'}", pretrained=True).eval()
    assert timm_hpm.get_hpm_head(model).alpha == 0.25
    score = read_scores(folder / 'out' / 'scores.jsonl')['hpm/seed0']
    assert score['definition']['overrides']['model.hpm.alpha'] == 0.25
    x, y = study_recipe_held_out(folder, model)
    with torch.no_grad():  # the per-image clean results are the new model's
        assert score['clean'] == (normalized_view(model)(x).argmax(1) == y).tolist()


def _forget(out: Path, name: str) -> None:
    """Remove ``name``'s line from the study's scores.jsonl (what the refusal tells the user to do)."""
    path = out / 'scores.jsonl'
    path.write_text(''.join(line + '\n' for line in path.read_text().splitlines()
                            if json.loads(line)['name'] != name))


def study_recipe_held_out(folder: Path, model):
    from timm_hpm.study import held_out
    return held_out(load_config(folder / 'hpm.yaml'), 8, model)


def test_a_second_study_giving_a_name_to_other_settings_is_refused(study_recipe, finished_study, tmp_path):
    """The probe: a second study file, its own --out, the shared --runs: its lr-0.05 control was the first study's
    lr-0.01 run. Now it stops before any work, naming the setting; the first study's runs are untouched."""
    folder = shutil.copytree(finished_study, tmp_path / 'a study')
    _write_study(folder, {'hpm': {}}, common={'train.lr': 0.05}, name='second.yaml')
    runs_before = _digest(folder / 'runs')
    with pytest.raises(SystemExit) as refused:
        study_recipe.main(_study_args(folder, out='second', study='second.yaml'))
    message = str(refused.value)
    assert str(folder / 'runs' / 'control_1' / 'seed0') in message and 'train.lr 0.01 -> 0.05' in message
    assert not (folder / 'second' / 'scores.jsonl').exists()
    assert _digest(folder / 'runs') == runs_before


def test_an_unchanged_study_reuses_its_runs_and_records_a_shell_quoted_command(study_recipe, finished_study,
                                                                               tmp_path, monkeypatch):
    """Rerun as it was (matplotlib missing, --no-figure): every run and score is reused, no false mismatch; the
    recorded command, paths with spaces, splits back into the arguments."""
    folder = shutil.copytree(finished_study, tmp_path / 'a study')
    before = {'runs': _digest(folder / 'runs'), 'scores': (folder / 'out' / 'scores.jsonl').read_bytes(),
              'png': (folder / 'out' / 'study.png').read_bytes()}
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    argv = _study_args(folder) + ['--no-figure']
    rows = study_recipe.main(argv)
    assert [r['name'] for r in rows] == ['control_1/seed0', 'hpm/seed0']
    assert {'runs': _digest(folder / 'runs'), 'scores': (folder / 'out' / 'scores.jsonl').read_bytes(),
            'png': (folder / 'out' / 'study.png').read_bytes()} == before
    command = json.loads((folder / 'out' / 'study.json').read_text())['command']
    assert ' ' in str(folder) and shlex.split(command) == ['python', 'recipes/study.py', *argv]


def test_the_study_without_matplotlib_stops_before_any_work(study_recipe, finished_study, tmp_path, monkeypatch):
    """The probe: without matplotlib the study fine-tuned and scored everything, then crashed drawing the figure
    (so --update never ran). Now it stops at once, saying so and naming --no-figure; nothing is created."""
    folder = tmp_path / 'fresh'
    folder.mkdir()
    for name in ('hpm.yaml', 'control.yaml', 'study.yaml'):
        shutil.copy(finished_study / name, folder / name)
    study = yaml.safe_load((folder / 'study.yaml').read_text())
    study.update(config=str(folder / 'hpm.yaml'), control_config=str(folder / 'control.yaml'))
    (folder / 'study.yaml').write_text(yaml.safe_dump(study))
    readme = folder / 'README.md'
    readme.write_text('<!-- heldout-study:start -->\nold\n<!-- heldout-study:end -->\n')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    with pytest.raises(SystemExit) as stopped:
        study_recipe.main(_study_args(folder) + ['--update', str(readme)])
    assert 'needs matplotlib' in str(stopped.value) and '--no-figure' in str(stopped.value)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'control.yaml', 'hpm.yaml', 'study.yaml']
    assert 'old' in readme.read_text()
