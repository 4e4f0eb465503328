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


# --- v2: the attack at full strength ----------------------------------------------------------------------------
from timm_hpm.eval import PoisonConfig, poison_batch  # noqa: E402

_V1 = dict(objectives=('margin_sum',), restarts=1, anneal=False, target_classes=0, feature_bound=False)


def _hpm_views(model):
    target = ModelView(model, 'dynamic')
    return target, {'dynamic': target, 'soft': ModelView(model, 'soft')}


def test_a_batch_independent_model_gives_zero_under_every_objective_and_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K)).eval()
    x = _images(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    for eps in (0.1, 1.0):
        record = poison_batch(model, {'model': model}, x, y, 3, eps, steps=5, restarts=2, target_classes=K,
                              objectives=poison_module.POISON_OBJECTIVES)
        assert record['victims'] == 9 and record['flipped'] == 0
        assert len(record['by_run']) >= 6 and set(record['by_run'].values()) == {0}
    # an HPM head in static mode is batch-independent too: the feature path and the bound give 0
    static = _batch_prototype_hpm()
    target = ModelView(static, 'static')
    with torch.no_grad():
        y = target(x).argmax(1)
    record = poison_batch(target, {'static': target}, x, y, 3, 1.0, steps=5,
                          objectives=poison_module.POISON_OBJECTIVES)
    assert record['fast'] and record['flipped'] == 0 and record['feature_bound'] == 0


def _dependent_batch(n=16, seed=2):
    model = _batch_prototype_hpm()
    x = _images(n, seed=seed)
    target, views = _hpm_views(model)
    with torch.no_grad():
        y = target(x).argmax(1)
    return model, x, y, target, views


def test_the_feature_space_bound_is_at_least_the_image_attack():
    model, x, y, target, views = _dependent_batch()
    for k, eps in ((1, 1.0), (4, 0.05), (4, 1.0)):
        record = poison_batch(target, views, x, y, k, eps, steps=10)
        assert record['fast'] and record['feature_bound'] >= record['flipped']
        assert record['feature_bound'] <= record['victims']


def test_the_stronger_attack_flips_at_least_as_many_as_v1_and_its_count_is_the_targets():
    model, x, y, target, views = _dependent_batch()
    for k in (1, 4):
        old = poison_batch(target, views, x, y, k, 1.0, steps=30, unbounded_steps=30, **_V1)
        new = poison_batch(target, views, x, y, k, 1.0, steps=30, objectives=poison_module.POISON_OBJECTIVES)
        assert set(old['by_run']) == {'margin_sum/dynamic/random0', 'margin_sum/soft/random0'}
        assert new['flipped'] >= max(old['by_run'].values()) and new['flipped'] == max(new['by_run'].values())
        assert new['flipped'] <= new['victims']
    assert new['flipped'] > 0
    # the feature path (per-sample features, the head on the whole batch) gives the whole-image path's result
    slow = {name: (lambda images, v=v: v(images)) for name, v in views.items()}
    kwargs = dict(steps=8, anneal=False, feature_bound=False, target_classes=0)  # both paths' runs
    fast = poison_batch(target, views, x, y, 4, 1.0, **kwargs)
    plain = poison_batch(lambda images: target(images), slow, x, y, 4, 1.0, **kwargs)
    assert fast['fast'] and not plain['fast']
    assert fast['by_run'] == plain['by_run'] and fast['flipped'] == plain['flipped']


def test_the_attack_is_deterministic_given_the_seed():
    model, x, y, target, views = _dependent_batch()
    first = poison_batch(target, views, x, y, 4, 1.0, steps=10, seed=3)
    assert poison_batch(target, views, x, y, 4, 1.0, steps=10, seed=3) == first
    assert poison_batch(target, views, x, y, 4, 1.0, steps=10, seed=4)['poisoned'] != first['poisoned']


@pytest.mark.parametrize('change, message', [
    (dict(unbounded_steps=0), r'unbounded_steps=0 \(--poison-unbounded-steps\): must be >= 1'),
    (dict(unbounded_steps=2.5), r'unbounded_steps=2.5 \(--poison-unbounded-steps\): must be an integer'),
    (dict(restarts=0), r'restarts=0 \(--poison-restarts\): must be >= 1'),
    (dict(objectives=()), r'objectives=\(\) \(--poison-objectives\): must be a non-empty tuple'),
    (dict(objectives='soft_count'), r"objectives='soft_count' \(--poison-objectives\): must be a non-empty tuple"),
    (dict(objectives=('soft_count', 'hinge')), r"objectives=.*unknown: \['hinge'\]"),
    (dict(objectives=('top_m', 'top_m')), r'objectives=.*\(repeated\)'),
    (dict(target_classes=-1), r'target_classes=-1 \(--poison-target-classes\): must be >= 0'),
    (dict(anneal='yes'), r"anneal='yes': must be True or False"),
    (dict(top_m=0), r'top_m=0 \(--poison-top-m\): must be >= 1'),
    (dict(temperature=0.0), r'temperature=0.0 \(--poison-temperature\): must be a finite number > 0'),
    (dict(temperature=float('inf')), r'temperature=inf \(--poison-temperature\)'),
    (dict(temperature=True), r'temperature=True \(--poison-temperature\)'),
    (dict(feature_bound=1), r'feature_bound=1: must be True or False'),
])
def test_each_strength_option_is_checked_before_the_folder_is_touched(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        PoisonConfig(eps=0.1, **change)
    model, x, y, target, views = _dependent_batch(n=8)
    out = tmp_path / 'p'
    with pytest.raises(ValueError, match=message):
        run_poisoning(target, views, x, y, 4, 0.1, out, steps=2, progress=False, **change)
    with pytest.raises(ValueError, match=message):
        poison_batch(target, views, x, y, 1, 0.1, steps=2, **change)
    assert not out.exists()


def test_the_defaults_are_full_strength_and_recorded_so_a_resume_refuses_other_strengths(tmp_path):
    cfg = PoisonConfig(eps=0.1)
    assert cfg.steps_unbounded == 6 * cfg.steps and cfg.objectives == ('soft_count',) and cfg.anneal
    assert cfg.target_classes >= 1 and cfg.feature_bound
    model, x, y, target, views = _dependent_batch(n=8)
    rows = run_poisoning(target, views, x, y, 4, 0.05, tmp_path, steps=2, progress=False)
    from timm_hpm.eval.run_header import read_run_settings
    settings = read_run_settings(tmp_path)  # the header of batches.jsonl
    assert settings['attack_version'] == 2 and settings['attack'] == cfg.strength() | {'steps': 2}
    assert all('feature_bound' in r and r['feature_bound'] >= r['flipped'] for r in rows)
    assert 'feature-space bound' in poisoning_table(rows)
    for change in (dict(restarts=2), dict(objectives=('top_m',)), dict(unbounded_steps=5), dict(anneal=False)):
        with pytest.raises(ValueError, match=rf'attack\.{next(iter(change))}'):
            run_poisoning(target, views, x, y, 4, 0.05, tmp_path, steps=2, progress=False, **change)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    model, x, y, target, views = _dependent_batch(n=16)
    whole = run_poisoning(target, views, x, y, 8, 0.05, tmp_path / 'whole', steps=4, progress=False)
    real = poison_module.poison_batch
    calls = []

    def dies_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > len(poison_counts(8)) * 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(poison_module, 'poison_batch', dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_poisoning(target, views, x, y, 8, 0.05, tmp_path / 'cut', steps=4, progress=False)
    from timm_hpm.eval.unit_store import POISON_FILE, read_poison_batches
    assert sorted(read_poison_batches(tmp_path / 'cut')) == [0]
    monkeypatch.setattr(poison_module, 'poison_batch', real)
    assert run_poisoning(target, views, x, y, 8, 0.05, tmp_path / 'cut', steps=4, progress=False) == whole
    assert (tmp_path / 'cut' / POISON_FILE).read_text() == (tmp_path / 'whole' / POISON_FILE).read_text()
