"""Offline pretrained loading through timm's own paths: a hand-populated Hugging Face cache with
HF_HUB_OFFLINE=1, ``local-dir:``, ``pretrained_cfg_overlay=dict(file=...)``, and the errors when weights
are missing or corrupt."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_hpm
from timm_hpm.hub import save_for_hub

TAG = 'hpm_preact_resnet18.rb_andriushchenko2020understanding_cifar10'


def _trained_like_model():
    torch.manual_seed(0)
    model = timm.create_model(TAG, hpm_cfg=dict(alpha=0.3, tau=2.0))
    with torch.no_grad():
        model.hpm_head.dataset_prototypes.normal_()
        model.hpm_head.log_gamma.fill_(-1.5)
        model.hpm_head.prototypes_initialized.fill_(True)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _populate_hf_cache(cache, repo_id, files):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = 'a' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name, writer in files.items():
        writer(snapshot / name)
    return snapshot


def _run_offline(code, cache):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / 'hf_home'))
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_registered_tag_loads_from_hand_populated_hf_cache(tmp_path):
    """A tag once published (its cfg then names its Hub repository) loads through timm's Hub download."""
    model = _trained_like_model()
    save_file(model.state_dict(), tmp_path / 'expected.safetensors')
    cache = tmp_path / 'hub'
    _populate_hf_cache(cache, timm_hpm.hub_id(TAG), {
        'model.safetensors': lambda p: save_file(model.state_dict(), p)})
    result = _run_offline(f"""
        import timm, timm_hpm, torch
        from safetensors.torch import load_file
        model = timm.create_model({TAG!r}, pretrained=True,
                                  pretrained_cfg_overlay=dict(hf_hub_id=timm_hpm.hub_id({TAG!r})))
        expected = load_file({str(tmp_path / 'expected.safetensors')!r})
        got = model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        print('OK', model.hpm_head.prototypes_initialized.item())
    """, cache)
    assert result.returncode == 0, result.stderr
    assert 'OK True' in result.stdout


def test_hf_hub_prefix_loads_from_hand_populated_cache(tmp_path):
    """A pushed repo (config.json + model.safetensors) read back offline with 'hf-hub:<repo>'."""
    model = _trained_like_model()
    model.hpm_head.mode = 'soft'
    export = save_for_hub(model, tmp_path / 'export')
    save_file(model.state_dict(), tmp_path / 'expected.safetensors')
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.save(model(x), tmp_path / 'expected_out.pt')
    torch.save(x, tmp_path / 'x.pt')
    repo = 'someone/hpm-test'
    cache = tmp_path / 'hub'
    _populate_hf_cache(cache, repo, {name: (lambda p, n=name: p.write_bytes((export / n).read_bytes()))
                                     for name in ('config.json', 'model.safetensors')})
    result = _run_offline(f"""
        import timm, timm_hpm, torch
        from safetensors.torch import load_file
        model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
        expected = load_file({str(tmp_path / 'expected.safetensors')!r})
        got = model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert model.hpm_head.hpm_config() == {model.hpm_head.hpm_config()!r}
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(x), torch.load({str(tmp_path / 'expected_out.pt')!r}, weights_only=True))
        print('OK')
    """, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'OK' in result.stdout


@pytest.mark.parametrize('published', [True, False])
def test_missing_weights_offline_give_a_clear_message(tmp_path, published):
    overlay = f'pretrained_cfg_overlay=dict(hf_hub_id=timm_hpm.hub_id({TAG!r}))' if published else ''
    result = _run_offline(f"""
        import timm, timm_hpm
        try:
            timm.create_model({TAG!r}, pretrained=True, {overlay})
        except timm_hpm.PretrainedWeightsUnavailable as e:
            print(e)
    """, tmp_path / 'empty_hub')
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert f"'{timm_hpm.HF_HUB_ORG}/{TAG}'" in message
    assert 'pretrained_cfg_overlay=dict(file=' in message and 'local-dir:' in message
    assert ('not published yet' in message) != published


def test_local_dir_round_trip_keeps_weights_prototypes_and_options(tmp_path):
    model = _trained_like_model()
    model.hpm_head.mode = 'static'  # changed after creation: must still round-trip
    save_for_hub(model, tmp_path / 'export')
    config = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert config['architecture'] == 'hpm_preact_resnet18'
    assert config['model_args']['hpm_cfg'] == model.hpm_head.hpm_config()
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    _assert_same(model, loaded)
    assert loaded.hpm_head.hpm_config() == model.hpm_head.hpm_config()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_local_dir_keeps_inside_normalisation(tmp_path):
    model = timm.create_model('hpm_wrn28_10.rb_wang2023better_cifar100', width=1).eval()
    save_for_hub(model, tmp_path / 'wrn')
    loaded = timm.create_model(f"local-dir:{tmp_path / 'wrn'}", pretrained=True).eval()
    torch.testing.assert_close(loaded.mean, model.mean)
    torch.testing.assert_close(loaded.std, model.std)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_pretrained_file_overlay(tmp_path):
    model = _trained_like_model()
    save_file(model.state_dict(), tmp_path / 'w.safetensors')
    loaded = timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    _assert_same(model, loaded)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='nope.safetensors'):
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')))


def test_corrupt_file_is_reported(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'\x00' * 100)
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='bad.safetensors'):
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_pickled_code_is_refused(tmp_path, capfd):
    evil = tmp_path / 'evil.pth'
    torch.save({'conv1.weight': torch.zeros(1), 'payload': _RunsCode()}, evil)
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='evil.pth') as info:
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert 'weights_only' in str(info.value) or isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert 'pwned' not in capfd.readouterr().out


def test_wrong_architecture_names_the_keys(tmp_path):
    other = timm.create_model('hpm_wrn28_10', width=1)
    save_file(other.state_dict(), tmp_path / 'other.safetensors')
    with pytest.raises(RuntimeError, match='Missing key'):
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'other.safetensors')))


def test_empty_weight_file_and_broken_local_dir_config_are_named(tmp_path):
    empty = tmp_path / 'model.pt'
    empty.touch()
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match=r"model.pt' \(it is empty: 0 bytes"):
        timm.create_model('small_cnn', pretrained=True, pretrained_cfg_overlay=dict(file=str(empty)))
    (tmp_path / 'config.json').write_text('{"architecture": ')
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='config.json: not a readable model config'):
        timm_hpm.models.check_local_dir(f'local-dir:{tmp_path}')
    (tmp_path / 'config.json').write_text('{"num_classes": 10}')
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='names no "architecture"'):
        timm_hpm.models.check_local_dir(f'local-dir:{tmp_path}')


def test_plain_model_takes_an_hpm_checkpoint_without_its_hpm_entries():
    hpm = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True)
    plain = timm.create_model('small_cnn', pretrained=True,
                              pretrained_cfg_overlay=dict(file=hpm.pretrained_cfg['file']))
    assert set(plain.state_dict()) == {k for k in hpm.state_dict() if k.split('.')[-1] not in (
        'log_gamma', 'dataset_prototypes', 'prototypes_initialized')}
    assert all(torch.equal(v, hpm.state_dict()[k]) for k, v in plain.state_dict().items())
