"""Safe evaluation runs (issue #28, second round): budgets and eps are checked once, in the configuration objects
(MSAConfig, PoisonConfig) that msa(), the poisoning protocol, the study's scoring and recipes/evaluate.py all build,
with a ValueError naming the option, its value, its flag and the valid range; msa() checks its own arguments; a
unit file with wrong types or short flag lists is refused, naming the file."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from _recipes import load_recipe

import timm_hpm
from timm_hpm.eval import (MSAConfig, PoisonConfig, aggregate, evaluate, msa, poison_batch, robust_flags,
                            run_poisoning)
from timm_hpm.eval.results import stage_breaks
from timm_hpm.eval.run_folder import UnitFileError
from timm_hpm.eval.unit_store import read_units
from _units import entries, write_entries
from timm_hpm.hub import save_for_hub

ROOT = Path(__file__).resolve().parents[1]
K = 4
FAST = dict(apgd_iters=3, autoattack=False, n_target_classes=1, target_n_target_classes=1, combine_rounds=1)


def _small_hpm(n=16, seed=0):
    torch.manual_seed(seed)
    model = timm_hpm.convert_to_hpm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, K)))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model.hpm_head.fc_forward(feats).argmax(1)
        model.hpm_head.init_prototypes_([(feats, y)])
    return model.eval(), x, y


# --- finding 6: budgets of zero or below, through recipes/evaluate.py ------------------------------------------

@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """A local-dir folder of a tiny HPM model (random weights, prototypes marked initialised)."""
    folder = tmp_path_factory.mktemp('model')
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18', in_chans=1, img_size=8, num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    save_for_hub(model, folder)
    return folder


CLI = ['--dataset', 'synthetic', '--eps', '0.05', '--n-examples', '8', '--batch-size', '8', '--device', 'cpu']


@pytest.mark.parametrize('args, message', [
    (['--protocol', 'poison', '--poison-steps', '-1'], r'steps=-1 \(--poison-steps\): must be >= 1'),
    (['--protocol', 'poison', '--poison-steps', '0'], r'steps=0 \(--poison-steps\): must be >= 1'),
    (['--apgd-iters', '-3'], r'apgd_iters=-3 \(--apgd-iters\): must be >= 1'),
    (['--square-queries', '-5'], r'square_queries=-5 \(--square-queries\): must be >= 1'),
    (['--combine-rounds', '-1'], r'combine_rounds=-1 \(--combine-rounds\): must be >= 0'),
    (['--n-target-classes', '0'], r'n_target_classes=0 \(--n-target-classes\): must be >= 1'),
    (['--autoattack-iters', '0'], r'autoattack_iters=0 \(--autoattack-iters\): must be >= 1'),
])
def test_the_recipe_refuses_budgets_of_zero_or_below_and_writes_no_result(model_dir, tmp_path, args, message):
    """The issue's probes: each was run, and its '0.0% flipped' or accuracy written as a measurement."""
    evaluate_recipe = load_recipe('evaluate')
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match=message):  # before the folder, the model or the images are touched
        evaluate_recipe.main(['--model', f'local-dir:{model_dir}', *CLI, *args, '--out', str(out)])
    assert not out.exists()
    assert not (out / 'poison' / 'batches.jsonl').exists() and not (out / 'attack' / 'units.jsonl').exists()


def test_the_recipe_fails_with_the_option_named_on_the_command_line(model_dir, tmp_path):
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model',
                             f'local-dir:{model_dir}', *CLI, '--protocol', 'poison', '--poison-steps', '0', '--out',
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'steps=0 (--poison-steps): must be >= 1' in result.stderr
    assert '0.0%' not in result.stdout and not (out / 'eval.json').exists()


@pytest.mark.parametrize('change, message', [
    (dict(eps=-0.1), r'eps=-0.1 \(--eps\): must be a finite number > 0'),
    (dict(eps=float('inf')), r'eps=inf \(--eps\): must be a finite number > 0'),
    (dict(eps=float('nan')), r'eps=nan \(--eps\): must be a finite number > 0'),
    (dict(eps=0.0), r'eps=0.0 \(--eps\): must be a finite number > 0'),
    (dict(eps=5), r'eps=5 \(--eps\): a Linf eps must lie in \(0, 1\].*5/255'),
    (dict(eps=float('inf'), norm='L2'), r'eps=inf \(--eps\): must be a finite number > 0'),
    (dict(eps='0.1'), r"eps='0.1' \(--eps\): must be a number"),
    (dict(norm='L3'), r"norm='L3' \(--norm\): must be one of \['Linf', 'L2'\]"),
    (dict(apgd_iters=0), r'apgd_iters=0 \(--apgd-iters\): must be >= 1'),
    (dict(apgd_iters=2.5), r'apgd_iters=2.5 \(--apgd-iters\): must be an integer >= 1'),
    (dict(apgd_iters=True), r'apgd_iters=True \(--apgd-iters\): must be an integer >= 1'),
    (dict(target_n_target_classes=-1), r'target_n_target_classes=-1 \(--target-n-target-classes\): must be >= 1'),
    (dict(square_queries=0), r'square_queries=0 \(--square-queries\): must be >= 1'),
    (dict(surrogates='fc'), r"surrogates='fc' \(--surrogates\): must be a list of names, not one string"),
    (dict(surrogates=('fc', 'nope')), r"unknown \['nope'\]"),
    (dict(cascade='no'), r"cascade='no': must be True or False"),
    (dict(seed=1.5), r'seed=1.5 \(--seed\): must be an integer'),
    (dict(autoattack_version='fast'), r"autoattack_version='fast': must be one of"),
    (dict(autoattack=False, surrogate_apgd=False), r'no attack is on'),
])
def test_msa_config_refuses_each_option_out_of_range_naming_it(change, message):
    with pytest.raises(ValueError, match=message):
        MSAConfig(**{'eps': 0.1, **change})
    with pytest.raises(ValueError, match=message):  # dataclasses.replace checks too (the runner's sanity checks)
        dataclasses.replace(MSAConfig(eps=0.1), **change)


def test_msa_config_accepts_the_edges_of_each_range():
    cfg = MSAConfig(eps=1.0, apgd_iters=1, n_target_classes=1, target_n_target_classes=1, combine_rounds=0,
                    autoattack_iters=1, square_queries=1, surrogates=())
    assert cfg.to_dict()['combine_rounds'] == 0
    assert MSAConfig(eps=3.0, norm='L2').eps == 3.0  # L2: finite and > 0


def test_the_study_scoring_config_gets_the_same_checks():
    from timm_hpm.study import scoring_config
    assert scoring_config(0.1, 'Linf', {'apgd_iters': 2}).apgd_iters == 2
    with pytest.raises(ValueError, match=r'apgd_iters=0 \(--apgd-iters\): must be >= 1'):
        scoring_config(0.1, 'Linf', {'apgd_iters': 0})
    with pytest.raises(ValueError, match=r'combine_rounds=-2 .*must be >= 0'):
        scoring_config(0.1, 'Linf', {'combine_rounds': -2})


@pytest.mark.parametrize('change, message', [
    (dict(steps=0), r'steps=0 \(--poison-steps\): must be >= 1'),
    (dict(steps=-1), r'steps=-1 \(--poison-steps\): must be >= 1'),
    (dict(eps=-0.1), r'eps=-0.1 \(--eps\): must be a finite number > 0'),
    (dict(eps=float('nan')), r'eps=nan \(--eps\)'),
    (dict(eps=5.0), r'eps=5.0 \(--eps\): a Linf eps must lie in \(0, 1\]'),
    (dict(norm='L1'), r"norm='L1' \(--norm\)"),
])
def test_poisoning_settings_are_checked_before_the_folder_is_touched(tmp_path, change, message):
    model, x, y = _small_hpm(n=8)
    with pytest.raises(ValueError, match=message):
        PoisonConfig(**{'eps': 0.1, **change})
    out = tmp_path / 'poison'
    kwargs = {'eps': 0.1, 'steps': 3, **change}
    with pytest.raises(ValueError, match=message):
        run_poisoning(model, {'model': model}, x, y, 4, kwargs.pop('eps'), out, progress=False, **kwargs)
    assert not out.exists()


def test_poisoning_refuses_a_batch_size_k_or_views_that_attack_nothing(tmp_path):
    model, x, y = _small_hpm(n=8)
    for batch_size in (1, 0, -4):
        with pytest.raises(ValueError, match=rf'batch_size={batch_size} \(--batch-size\): must be'):
            run_poisoning(model, {'model': model}, x, y, batch_size, 0.1, tmp_path / 'p', steps=2, progress=False)
    with pytest.raises(ValueError, match='at least one model'):
        run_poisoning(model, {}, x, y, 4, 0.1, tmp_path / 'p', steps=2, progress=False)
    with pytest.raises(ValueError, match='no images'):
        run_poisoning(model, {'model': model}, x[:0], y[:0], 4, 0.1, tmp_path / 'p', steps=2, progress=False)
    assert not (tmp_path / 'p').exists()
    for k in (0, 4, -1):
        with pytest.raises(ValueError, match=rf'k={k}: .* in \[1, 3\]'):
            poison_batch(model, {'model': model}, x[:4], y[:4], k, 0.1, steps=2)
    with pytest.raises(ValueError, match=r'steps=0 \(--poison-steps\)'):
        poison_batch(model, {'model': model}, x[:4], y[:4], 1, 0.1, steps=0)
    # a valid run still runs: the unbounded radius (1 for Linf) is a valid eps
    rows = run_poisoning(model, {'model': model}, x, y, 4, 0.1, tmp_path / 'ok', steps=1, progress=False)
    assert {r['bounded'] for r in rows} == {True, False} and all(r['batches'] == 2 for r in rows)


# --- finding 8: msa()'s own arguments --------------------------------------------------------------------------

@pytest.mark.parametrize('eps, message', [
    (-0.1, r'eps=-0.1: must be a finite number > 0'),
    (float('inf'), r'eps=inf: must be a finite number > 0'),
    (float('nan'), r'eps=nan: must be a finite number > 0'),
    (5, r'eps=5: a Linf eps must lie in \(0, 1\]'),
])
def test_msa_refuses_an_eps_that_is_not_a_radius(eps, message):
    """Before: -0.1 returned a figure while perturbing by 0.1, inf gave NaN images and 0%, 5 was accepted, nan was
    refused with 'eps=nan but config.eps=nan: give one'."""
    model, x, y = _small_hpm(n=8)
    with pytest.raises(ValueError, match=message):
        msa(model, x, y, eps, config=None)
    with pytest.raises(ValueError, match=message):
        msa(model, x, y, eps, config=MSAConfig(eps=0.1, **FAST))
    with pytest.raises(ValueError, match='eps=0.2 but config.eps=0.1: give one'):
        msa(model, x, y, 0.2, config=MSAConfig(eps=0.1, **FAST))


def test_msa_refuses_a_batch_size_below_one_and_empty_or_mismatched_inputs():
    model, x, y = _small_hpm(n=8)
    cfg = MSAConfig(eps=0.1, **FAST)
    for batch_size in (0, -2, 2.5):
        with pytest.raises(ValueError, match=rf'batch_size={batch_size}: must be'):  # 0 silently meant one batch
            msa(model, x, y, 0.1, batch_size=batch_size, config=cfg)
    with pytest.raises(ValueError, match=r'no images to attack: x has shape \(0, 1, 8, 8\)'):  # was min() of empty
        msa(model, x[:0], y[:0], 0.1, config=cfg)
    with pytest.raises(ValueError, match=r'labels must have shape \(8,\)'):
        msa(model, x, y[:5], 0.1, config=cfg)
    with pytest.raises(ValueError, match='labels must be an integer tensor'):
        msa(model, x, y.float(), 0.1, config=cfg)
    with pytest.raises(ValueError, match=r'images must lie in \[0, 1\]'):
        msa(model, x * 3, y, 0.1, config=cfg)
    with pytest.raises(ValueError, match='NaN or inf'):
        msa(model, x.clone().index_fill_(0, torch.tensor([2]), float('nan')), y, 0.1, config=cfg)
    changed = MSAConfig(eps=0.1, **FAST)
    changed.apgd_iters = -1  # a config changed after it was made is checked again
    with pytest.raises(ValueError, match=r'apgd_iters=-1 \(--apgd-iters\): must be >= 1'):
        msa(model, x, y, 0.1, config=changed)


def test_a_valid_msa_config_still_runs():
    model, x, y = _small_hpm(n=8)
    eps = 0.1
    result = msa(model, x, y, eps, batch_size=4, config=MSAConfig(eps=eps, **FAST))
    assert result['x_adv'].shape == x.shape and bool(torch.isfinite(result['x_adv']).all())
    assert float((result['x_adv'] - x).abs().amax()) <= eps + 1e-6
    assert 0.0 <= result['union_acc'] <= result['robust_acc'] <= result['clean_acc'] <= 1.0


# --- finding 13: unit files with wrong types or short flag lists ------------------------------------------------

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    model, x, y = _small_hpm(n=8)
    run = tmp_path_factory.mktemp('run') / 'attack'
    result = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), run, batch_size=4, progress=False)
    return model, x, y, run, result


def _copy(finished_run, tmp_path):
    model, x, y, run, result = finished_run
    dest = tmp_path / 'run' / 'attack'
    shutil.copytree(run, dest)
    return dest, Unit(dest), entries(dest)[0]


class Unit:
    """The first unit of a run's units file (line 2, after the header): ``write_text`` replaces that line, the others
    are kept."""

    def __init__(self, run):
        self.run, self.path = run, run / 'units.jsonl'

    def __str__(self):
        return f'{self.path}:2'

    def write_text(self, text):
        write_entries(self.run, [text] + entries(self.run)[1:])

    def read_text(self):
        return self.path.read_text().splitlines()[1]


@pytest.mark.parametrize('field, value, message', [
    ('clean', 'True,True,True,True', r"'clean' must be a list of 4 true/false flags"),
    ('realised', None, r"'realised' must be a list of 4 true/false flags"),
    ('union', [True, 'no', True, True], r"'union' must hold true/false flags, found 'no'"),
    ('candidates', ['a'], r"'candidates' must map names to values"),
    ('passes', {'forward_images': '12'}, r"'passes' must map forward_images and backward_images to counts"),
    ('seconds', 'fast', r"'seconds' must be a number >= 0"),
    ('indices', '0123', r"'indices' must be a non-empty list of image indices"),
    ('stages', ['no-such-candidate'], r"'stages' names candidates the unit does not hold"),
])
def test_a_unit_with_wrong_types_is_refused_naming_the_file(finished_run, tmp_path, field, value, message):
    """Before: aggregate crashed with a TypeError that did not name the file."""
    run, unit, data = _copy(finished_run, tmp_path)
    unit.write_text(json.dumps(dict(data, **{field: value})))
    pattern = rf"unit file {re.escape(str(unit))} is malformed: {message}.*delete that line"
    with pytest.raises(UnitFileError, match=pattern):
        aggregate(run)
    with pytest.raises(ValueError, match=pattern):
        read_units(run)


@pytest.mark.parametrize('field', ['clean', 'realised', 'union', 'candidates', 'autoattack_own'])
def test_a_unit_whose_flag_lists_are_shorter_than_its_indices_is_refused(finished_run, tmp_path, field):
    """Before: accepted, and counted as if the missing images did not exist."""
    run, unit, data = _copy(finished_run, tmp_path)
    if field == 'candidates':
        name = next(iter(data['candidates']))
        data['candidates'][name] = data['candidates'][name][:-1]
        what = f"'candidates'[{name!r}]"
    else:
        data[field] = [True, True, True]
        what = repr(field)
    unit.write_text(json.dumps(data))
    pattern = rf"unit file {re.escape(str(unit))} is malformed: {re.escape(what)} holds 3 flags for the unit's 4 "
    pattern += 'indices'
    with pytest.raises(UnitFileError, match=pattern + '.*delete that line'):
        aggregate(run)
    with pytest.raises(UnitFileError, match=re.escape(str(unit))):
        stage_breaks(run)


def test_robust_flags_refuse_a_short_or_mistyped_unit_naming_the_file(finished_run, tmp_path):
    run, unit, data = _copy(finished_run, tmp_path)
    folder = run.parent
    assert len(robust_flags(folder)) == 8
    unit.write_text(json.dumps(dict(data, realised=[True])))
    name = re.escape(str(unit))
    with pytest.raises(ValueError, match=rf"unit file {name} is malformed: 'realised' holds 1 flags"):
        robust_flags(folder)
    unit.write_text(json.dumps(dict(data, realised='1111')))
    with pytest.raises(ValueError, match=rf"unit file {name} is malformed: 'realised' must be a list"):
        robust_flags(folder)
    unit.write_text('{"indices": [0, 1')  # a damaged line that is not the last one
    with pytest.raises(ValueError, match=rf'{name} is not a JSON object: the file is damaged in the middle'):
        robust_flags(folder)


def test_resuming_over_a_malformed_unit_stops_naming_it_and_leaves_it(finished_run, tmp_path):
    model, x, y, _, result = finished_run
    run, unit, data = _copy(finished_run, tmp_path)
    bad = json.dumps(dict(data, realised=data['realised'][:2]))
    unit.write_text(bad)
    with pytest.raises(UnitFileError, match=rf"unit file {re.escape(str(unit))} is malformed"):
        evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), run, batch_size=4, progress=False)
    assert unit.read_text() == bad  # evidence kept: the user deletes it to recompute
    write_entries(run, entries(run)[1:])
    resumed = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), run, batch_size=4, progress=False)
    assert resumed['msa_acc'] == result['msa_acc'] and resumed['clean_acc'] == result['clean_acc']
