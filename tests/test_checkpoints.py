"""Checkpoint folders of fine-tuning runs: named and rotated by the accelerator's ProjectConfiguration as accelerate's
automatic checkpoint naming does (checkpoints/checkpoint_<i>, the newest total_limit kept), written and read by
timm_hpm.train.checkpoint (nothing unpickled), and found next to the step_<k> folders of earlier versions."""
import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from timm_hpm.train.checkpoint import checkpoint_folders, latest_checkpoint, load_checkpoint, save_run_checkpoint


def _accelerator(run_dir, total_limit):
    return Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(run_dir), automatic_checkpoint_naming=True, total_limit=total_limit))


def _state(step):
    return {'global_step': step, 'epoch': 0, 'batches_done': step}


def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_checkpoints_are_named_by_step_and_the_newest_total_limit_kept(tmp_path):
    accelerator = _accelerator(tmp_path, total_limit=2)
    model, optimizer = _model_and_optimizer()
    names = []
    for step in (1, 2, 2, 3):  # a second save at the same step (an epoch end) replaces the first
        with torch.no_grad():
            model.weight.fill_(step)
        folder = save_run_checkpoint(accelerator, model, optimizer, _state(step))
        names.append(folder.name)
        assert folder.parent == tmp_path / 'checkpoints'
    assert names == ['checkpoint_1', 'checkpoint_2', 'checkpoint_2', 'checkpoint_3']
    assert accelerator.save_iteration == 3
    assert [p.name for p in checkpoint_folders(tmp_path)] == ['checkpoint_2', 'checkpoint_3']
    newest = latest_checkpoint(tmp_path)
    assert newest == tmp_path / 'checkpoints' / 'checkpoint_3'
    fresh, fresh_optimizer = _model_and_optimizer()
    assert load_checkpoint(accelerator, newest, fresh, fresh_optimizer)['global_step'] == 3
    assert torch.equal(fresh.weight, torch.full_like(fresh.weight, 3.0))


def test_folders_of_earlier_versions_are_found_and_rotated(tmp_path, caplog):
    """step_<k> folders (before accelerate's naming) sort by their step with the new ones: a run resumes from the
    newest complete one of either name, and rotation deletes the oldest of either name."""
    accelerator = _accelerator(tmp_path, total_limit=2)
    model, optimizer = _model_and_optimizer()
    legacy = save_run_checkpoint(accelerator, model, optimizer, _state(4))
    legacy = legacy.rename(tmp_path / 'checkpoints' / 'step_0000004')
    (tmp_path / 'checkpoints' / 'step_0000006').mkdir()  # killed while saving: no trainer_state.json
    (tmp_path / 'checkpoints' / 'notes_7.txt').write_text('not a checkpoint')
    assert latest_checkpoint(tmp_path) == legacy
    assert 'step_0000006 is incomplete' in caplog.text
    assert json.loads((legacy / 'trainer_state.json').read_text())['global_step'] == 4
    save_run_checkpoint(accelerator, model, optimizer, _state(6))
    assert [p.name for p in checkpoint_folders(tmp_path)] == ['step_0000006', 'checkpoint_6']
    assert latest_checkpoint(tmp_path) == tmp_path / 'checkpoints' / 'checkpoint_6'
    save_run_checkpoint(accelerator, model, optimizer, _state(8))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['checkpoint_6', 'checkpoint_8',
                                                                            'notes_7.txt']


def test_an_accelerator_without_automatic_naming_is_told_what_to_give(tmp_path):
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match='automatic_checkpoint_naming=True'):
        save_run_checkpoint(accelerator, model, optimizer, _state(1))
    assert not (tmp_path / 'checkpoints').exists()
