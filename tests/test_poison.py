"""The batch-poisoning protocol: k controlled members of a fixed batch against the B - k untouched ones."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm_hpm
from timm_hpm.eval import ModelView, poison_counts, poisoning_table, run_poisoning
from timm_hpm.eval import poison as poison_module

ROOT = Path(__file__).resolve().parents[1]
D, K = 12, 4


def test_poison_counts_are_one_member_and_the_fractions_of_the_batch():
    assert poison_counts(250) == [1, 3, 13, 25, 63]  # 1, 1%, 5%, 10%, 25% (rounded half up)
    assert poison_counts(32) == [1, 2, 3, 8]
    assert poison_counts(2) == [1]
    with pytest.raises(ValueError, match='at least 2'):
        poison_counts(1)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 1, 1, D, generator=g)


def test_a_batch_independent_model_is_never_flipped(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K)).eval()
    x = _images(32)
    with torch.no_grad():
        y = model(x).argmax(1)
    rows = run_poisoning(model, {'model': model}, x, y, 16, 0.1, tmp_path, steps=10, progress=False)
    assert [r['k'] for r in rows if r['bounded']] == poison_counts(16)
    assert all(r['flipped'] == 0 and r['flipped_fraction'] == 0.0 for r in rows)
    assert all(r['victims'] == 2 * (16 - r['k']) and r['batches'] == 2 for r in rows)  # every untouched one correct
    assert {r['bounded'] for r in rows} == {True, False} and max(r['eps'] for r in rows) == 1.0


def _batch_prototype_hpm():
    """An HPM head that classifies with batch prototypes only (alpha 0): a member's prediction depends on the
    other members assigned to each class."""
    g = torch.Generator().manual_seed(1)
    model = timm_hpm.convert_to_hpm(nn.Sequential(nn.Flatten(), nn.Linear(D, K)), alpha=0.0, gamma_init=1.0)
    with torch.no_grad():
        model.hpm_head.weight.copy_(torch.randn(K, D, generator=g))
        model.hpm_head.dataset_prototypes.copy_(0.5 + 0.2 * torch.randn(K, D, generator=g))
        model.hpm_head.prototypes_initialized.fill_(True)
    return model.eval()


def test_unbounded_poison_flips_untouched_members_of_a_batch_prototype_head(tmp_path):
    model = _batch_prototype_hpm()
    x = _images(16, seed=2)
    target = ModelView(model, 'dynamic')
    with torch.no_grad():
        y = target(x).argmax(1)  # the clean batch's own predictions: every member starts correct
    rows = run_poisoning(target, {'dynamic': target, 'soft': ModelView(model, 'soft')}, x, y, 16, 0.05, tmp_path,
                         steps=30, progress=False)
    unbounded = {r['k']: r for r in rows if not r['bounded']}
    assert unbounded[4]['flipped'] > 0 and 0 < unbounded[4]['flipped_fraction'] <= 1
    table = poisoning_table(rows)
    assert table.splitlines()[0].startswith('| poisoned members (k of B) |') and 'unbounded ([0, 1])' in table


def test_a_finished_run_resumes_without_recomputing_and_refuses_other_settings(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K)).eval()
    x = _images(8)
    with torch.no_grad():
        y = model(x).argmax(1)
    first = run_poisoning(model, {'model': model}, x, y, 4, 0.1, tmp_path, steps=3, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError('a finished batch was recomputed')
    monkeypatch.setattr(poison_module, 'poison_batch', fail)
    assert run_poisoning(model, {'model': model}, x, y, 4, 0.1, tmp_path, steps=3, progress=False) == first
    with pytest.raises(ValueError, match='steps'):
        run_poisoning(model, {'model': model}, x, y, 4, 0.1, tmp_path, steps=4, progress=False)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    with pytest.raises(ValueError, match='model_sha256'):
        run_poisoning(model, {'model': model}, x, y, 4, 0.1, tmp_path, steps=3, progress=False)


def test_the_recipe_writes_the_poisoning_results(tmp_path):
    import timm

    from timm_hpm.hub import save_for_hub
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18', in_chans=1, img_size=8, num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    folder = tmp_path / 'model'
    save_for_hub(model, folder)
    out = tmp_path / 'out'
    cmd = [sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{folder}', '--dataset',
           'synthetic', '--eps', '0.05', '--n-examples', '8', '--batch-size', '8', '--protocol', 'poison',
           '--poison-steps', '3', '--device', 'cpu', '--out', str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'eval.json').read_text())
    assert record['protocol'] == 'poison' and record['batch_size'] == 8
    assert {'k', 'eps', 'flipped_fraction'} <= set(record['poisoning'][0])
    assert [r['k'] for r in record['poisoning'] if r['bounded']] == poison_counts(8)
    assert 'untouched flipped' in (out / 'eval.md').read_text()
    again = subprocess.run(cmd[:-6] + ['--protocol', 'msa', '--device', 'cpu', '--out', str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and 'would be overwritten' in again.stderr  # another protocol's results stay
