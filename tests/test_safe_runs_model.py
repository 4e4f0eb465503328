"""Safe runs, second round (issue #28), the model side: one check of the HPM options at every entry point (3), a
non-finite image cannot change the other images' predictions (7), an HPM checkpoint without part of its head state
is refused (11), and weights with a NaN or an inf are refused naming the tensor (14)."""
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import timm_hpm
from timm_hpm import HPMHead, convert_to_hpm
from timm_hpm.hub import save_for_hub
from timm_hpm.layers import HPMOptionError
from timm_hpm.models import PretrainedWeightsUnavailable, UnusableWeights
from timm_hpm.train import ConfigError, build_model, load_config, parse_overrides
from timm_hpm.train.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'
HPM_KEYS = ('log_gamma', 'dataset_prototypes', 'prototypes_initialized')

# (option, bad value, what the message must say about the valid values)
BAD_OPTIONS = [
    ('alpha', 1.5, '[0, 1]'), ('alpha', -0.1, '[0, 1]'), ('alpha', 'abc', '[0, 1]'), ('alpha', float('nan'), '[0, 1]'),
    ('momentum', 2, '[0, 1]'), ('momentum', -0.5, '[0, 1]'),
    ('gamma_init', -1, '> 0'), ('gamma_init', 0, '> 0'), ('gamma_init', float('inf'), 'finite'),
    ('tau', 0, '> 0'), ('tau', -1.0, '> 0'), ('tau', float('inf'), 'finite'), ('tau', None, '> 0'),
    ('tau', True, '> 0'), ('pseudo_labels', 'yes', 'true or false'), ('mode', 'bogus', 'dynamic'),
]


def _bad_option_message(name, value, valid):
    return lambda message: name in message and valid in message and (name == 'mode' or repr(value) in message)


def _small_hpm(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('hpm_small_cnn', **kwargs)
    head = model.hpm_head
    with torch.no_grad():
        head.dataset_prototypes.normal_()
        head.prototypes_initialized.fill_(True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- 3: HPM options
@pytest.mark.parametrize('name, value, valid', BAD_OPTIONS)
def test_every_entry_point_refuses_a_bad_hpm_option_naming_it(name, value, valid, tmp_path):
    check = _bad_option_message(name, value, valid)
    # the head's constructor
    with pytest.raises(HPMOptionError) as info:
        HPMHead(4, 3, **{name: value})
    assert check(str(info.value)), str(info.value)
    # setting the option on an existing head (attribute or set_options): refused, and nothing changes
    head = HPMHead(4, 3, alpha=0.25)
    before = head.hpm_config()
    with pytest.raises(HPMOptionError):
        setattr(head, name, value)
    with pytest.raises(HPMOptionError):
        head.set_options(**{'alpha': 0.75, 'mode': 'static', name: value})  # a good one first: not set either
    assert head.hpm_config() == before
    # convert_to_hpm: refused before the model is touched
    plain = timm.create_model('small_cnn')
    with pytest.raises(HPMOptionError):
        convert_to_hpm(plain, **{name: value})
    assert isinstance(plain.fc, nn.Linear) and not timm_hpm.is_hpm_model(plain)
    # model creation with hpm_cfg, with and without weights (a headless model too): an option error, never a
    # "could not load pretrained weights"
    weights = tmp_path / 'w.safetensors'
    save_file(timm.create_model('hpm_small_cnn').state_dict(), weights)
    for kwargs in (dict(), dict(num_classes=0), dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))):
        with pytest.raises(HPMOptionError) as info:
            timm.create_model('hpm_small_cnn', hpm_cfg={name: value}, **kwargs)
        assert not isinstance(info.value, PretrainedWeightsUnavailable)
        assert 'Could not load pretrained weights' not in str(info.value) and check(str(info.value))


@pytest.mark.parametrize('item, key, valid', [
    ('model.hpm.alpha=1.5', 'model.hpm.alpha', '[0, 1]'), ('model.hpm.momentum=2', 'model.hpm.momentum', '[0, 1]'),
    ('model.hpm.gamma_init=-1', 'model.hpm.gamma_init', '> 0'), ('model.hpm.tau=0', 'model.hpm.tau', '> 0'),
    ('model.hpm.alpha=abc', 'model.hpm.alpha', '[0, 1]'), ('model.hpm.pseudo_labels=maybe', 'model.hpm.pseudo_labels',
                                                           'true or false'),
    ('train.lambda_fc=-1', 'train.lambda_fc', '>= 0'),
])
def test_finetune_config_refuses_a_bad_option_before_anything_runs(item, key, valid, tmp_path):
    value = item.partition('=')[2]
    overrides = parse_overrides([item])  # as recipes/finetune.py reads --set
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, overrides)
    message = str(info.value)
    assert key in message and value in message and valid in message, message
    # the same with an hf-hub:/local-dir: base, the path that used to set the options on the loaded head unchecked
    overrides['model.base'] = f'local-dir:{tmp_path}'
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(CONFIG, overrides)


def test_local_dir_base_takes_valid_options_through_the_checked_setter(tmp_path):
    model = _small_hpm()
    save_for_hub(model, tmp_path / 'export')
    cfg = FinetuneConfig()
    cfg.model.name = 'hpm_small_cnn'
    cfg.model.base = f"local-dir:{tmp_path / 'export'}"
    cfg.model.hpm = dict(alpha=0.3, tau=2, momentum=1.0)
    built = build_model(cfg.validate())
    assert built.hpm_head.hpm_config() == dict(model.hpm_head.hpm_config(), alpha=0.3, tau=2.0, momentum=1.0)
    assert isinstance(built.hpm_head.tau, float)
    torch.testing.assert_close(built.hpm_head.dataset_prototypes, model.hpm_head.dataset_prototypes)
    # a config changed after validate() (or built by hand) still cannot give the loaded head a bad option
    cfg.model.hpm = dict(alpha=0.3, tau=0)
    with pytest.raises(HPMOptionError, match='tau'):
        build_model(cfg)
    # and a head whose options were set so still writes a config.json that timm.create_model accepts
    save_for_hub(built, tmp_path / 'again')
    assert json.loads((tmp_path / 'again' / 'config.json').read_text())['model_args']['hpm_cfg']['alpha'] == 0.3
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'again'}", pretrained=True)
    assert reloaded.hpm_head.hpm_config() == built.hpm_head.hpm_config()


# ------------------------------------------------------------------------------ 7: a non-finite image in a batch
@pytest.mark.parametrize('mode', ['dynamic', 'soft'])
@pytest.mark.parametrize('bad_value', [float('nan'), float('inf')])
def test_a_non_finite_row_leaves_the_other_rows_as_in_the_batch_without_it(mode, bad_value):
    torch.manual_seed(1)
    head = HPMHead(6, 4, mode=mode, alpha=0.4, tau=0.7).eval()
    with torch.no_grad():
        head.dataset_prototypes.normal_()
        head.prototypes_initialized.fill_(True)
    features = torch.randn(7, 6, requires_grad=True)
    bad = torch.zeros(7, 6)
    bad[3, 2] = bad_value
    poisoned = features + bad
    keep = [0, 1, 2, 4, 5, 6]
    with pytest.warns(UserWarning, match='not finite') as record:
        logits = head(poisoned)
    assert sum('not finite' in str(w.message) for w in record) == 1
    reference = head(features[keep])  # the batch without that image, computed on its own
    torch.testing.assert_close(logits[keep], reference)
    assert torch.equal(logits[keep].argmax(1), reference.argmax(1))
    assert torch.isnan(logits[3]).all()
    # the gradients of the other rows are those of the batch without it (the STE path included)
    grad, = torch.autograd.grad(logits[keep].sum(), features)
    reference_grad, = torch.autograd.grad(reference.sum(), features)
    torch.testing.assert_close(grad[keep], reference_grad[keep])
    assert torch.equal(grad[3], torch.zeros(6))
    with warnings.catch_warnings(record=True) as again:  # once per head
        warnings.simplefilter('always')
        head(poisoned)
    assert not [w for w in again if 'not finite' in str(w.message)]


def test_one_nan_pixel_does_not_erase_a_model_batch():
    model = _small_hpm()
    torch.manual_seed(2)
    x = torch.rand(8, 1, 28, 28)
    x_bad = x.clone()
    x_bad[5, 0, 10, 10] = float('nan')
    keep = [i for i in range(8) if i != 5]
    with torch.no_grad():
        for mode in ('dynamic', 'soft', 'static'):
            model.hpm_head.mode = mode
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                logits = model(x_bad)
            reference = model(x[keep])
            torch.testing.assert_close(logits[keep], reference, msg=mode)
            assert torch.equal(logits[keep].argmax(1), reference.argmax(1))
            assert torch.isnan(logits[5]).all()


def test_a_non_finite_image_under_vmap_is_left_out_silently():
    """Each image as its own batch (attack.per_image, torch.func.vmap): no data-dependent read of the mask."""
    from timm_hpm.attacks import each_image_alone
    model = _small_hpm()
    x = torch.rand(4, 1, 28, 28)
    x[2, 0, 3, 3] = float('nan')
    with torch.no_grad():
        logits = each_image_alone(model)(x)
        alone = torch.cat([model(x[i:i + 1]) for i in (0, 1, 3)])
    torch.testing.assert_close(logits[[0, 1, 3]], alone)
    assert torch.isnan(logits[2]).all()


# -------------------------------------------------------- 11: an HPM checkpoint without part of its head state
def _export_without(tmp_path, missing):
    model = _small_hpm()
    folder = save_for_hub(model, tmp_path / 'export')
    state = load_file(str(folder / 'model.safetensors'))
    for key in missing:
        del state[f'fc.{key}']
    save_file(state, str(folder / 'model.safetensors'))
    return model, folder


@pytest.mark.parametrize('missing', [('dataset_prototypes',), ('prototypes_initialized',), ('log_gamma',),
                                     ('dataset_prototypes', 'log_gamma')])
def test_an_hpm_checkpoint_missing_head_state_is_refused(missing, tmp_path):
    model, folder = _export_without(tmp_path, missing)
    with pytest.raises(UnusableWeights) as info:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    message = str(info.value)
    assert all(f"'fc.{key}'" in message for key in missing), message
    assert str(folder) in message and 'convert_to_hpm' in message
    assert 'Could not load pretrained weights' not in message  # not the advice for a missing or offline file
    # the documented way out: the plain architecture takes the backbone and FC weights, the new head starts
    # uninitialised
    plain = timm.create_model('small_cnn', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    torch.testing.assert_close(plain.fc.weight, model.hpm_head.weight)
    assert not bool(convert_to_hpm(plain).hpm_head.prototypes_initialized)


def test_a_base_checkpoint_still_loads_flagged_uninitialised_with_a_warning(tmp_path, caplog):
    model, folder = _export_without(tmp_path, HPM_KEYS)
    with caplog.at_level(logging.WARNING):
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    head = loaded.hpm_head
    assert not bool(head.prototypes_initialized)
    torch.testing.assert_close(head.dataset_prototypes, model.hpm_head.weight)  # the FC rows
    assert 'base (non-HPM) checkpoint' in caplog.text and 'fine-tun' in caplog.text


# ------------------------------------------------------------------------------------ 14: non-finite weights
@pytest.mark.parametrize('name, key, value', [
    ('small_cnn', 'fc1.weight', float('nan')), ('hpm_small_cnn', 'features.5.bias', float('-inf')),
    ('hpm_small_cnn', 'fc.dataset_prototypes', float('nan')), ('hpm_small_cnn', 'fc.log_gamma', float('inf')),
])
def test_weights_with_a_non_finite_value_are_refused_naming_the_tensor(name, key, value, tmp_path):
    state = timm.create_model(name).state_dict()
    state[key].view(-1)[0] = value
    path = tmp_path / 'nan.safetensors'
    save_file(state, str(path))
    with pytest.raises(UnusableWeights) as info:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert repr(key) in message and 'non-finite' in message and str(path) in message, message
    with pytest.raises(UnusableWeights, match=key):  # a state dict handed over directly (RobustBench's path)
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    if name.startswith('hpm_'):
        folder = save_for_hub(timm.create_model(name), tmp_path / 'export')
        save_file(state, str(folder / 'model.safetensors'))
        with pytest.raises(UnusableWeights, match=key):
            timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_finite_weights_still_load(tmp_path):
    model = _small_hpm()
    path = tmp_path / 'ok.safetensors'
    save_file(model.state_dict(), str(path))
    loaded = timm.create_model('hpm_small_cnn', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert math.isfinite(float(loaded.hpm_head.gamma.detach()))
