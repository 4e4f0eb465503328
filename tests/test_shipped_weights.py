"""The Fashion-MNIST study's weights ship with the package and load offline, as registered timm models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import needs_fashion_mnist
from safetensors.torch import load_file

import timm_hpm  # noqa: F401  (registers the models)
from timm_hpm.data import load_eval_tensors
from timm_hpm.models.small_cnn import SHIPPED_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_files_are_package_data():
    for name in ('small_cnn.fmnist_pgdat', 'small_cnn.fmnist_control', 'hpm_small_cnn.fmnist_hpm'):
        path = SHIPPED_WEIGHTS / f'{name}.safetensors'
        assert path.is_file() and path.stat().st_size < 3_000_000, path
    assert 'weights/*.safetensors' in (ROOT / 'pyproject.toml').read_text()


def test_load_offline_in_a_fresh_process():
    """No network, no HF cache: the tags load from the package's files."""
    code = ("import timm, timm_hpm; m = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True); "
            "h = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True); "
            "print(type(m).__name__, bool(h.hpm_head.prototypes_initialized))")
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME='/nonexistent-hf-home')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ['SmallCNN', 'True']


def test_weights_are_the_files_and_the_hpm_base_shares_the_backbone():
    base = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True)
    shipped = load_file(str(SHIPPED_WEIGHTS / 'small_cnn.fmnist_pgdat.safetensors'))
    assert all(torch.equal(v, shipped[k]) for k, v in base.state_dict().items())
    start = timm.create_model('hpm_small_cnn.fmnist_pgdat', pretrained=True)  # the fine-tuning start
    assert not bool(start.hpm_head.prototypes_initialized)
    assert torch.equal(start.hpm_head.weight, base.fc.weight)
    hpm = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True)
    assert bool(hpm.hpm_head.prototypes_initialized)
    # the head options a checkpoint cannot carry come from the tag; explicit hpm_cfg still wins
    from timm_hpm.models.small_cnn import _TAG_MODEL_ARGS
    for key, value in _TAG_MODEL_ARGS['fmnist_hpm']['hpm_cfg'].items():
        assert getattr(hpm.hpm_head, key) == value
    assert timm.create_model('hpm_small_cnn.fmnist_hpm', hpm_cfg=dict(alpha=1.0)).hpm_head.alpha == 1.0


@needs_fashion_mnist
def test_shipped_models_are_trained():
    """Truth on real data: clean accuracies on the study's test images equal its recorded figures (base, the HPM
    model's dynamic head in the study's fixed batches of 250, and its static l2 head)."""
    n = 1000
    x, y = load_eval_tensors('fashion_mnist', n)
    study = ROOT / 'results' / 'fashion_mnist'
    base = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True).eval()
    with torch.no_grad():
        acc = (base(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(json.loads((study / f'eval_base_{n}' / 'eval.json').read_text())['clean_acc'],
                                abs=1e-6) and acc > 0.7
    control = timm.create_model('small_cnn.fmnist_control', pretrained=True).eval()
    with torch.no_grad():
        acc = (control(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(json.loads((study / f'eval_control_{n}' / 'eval.json').read_text())['clean_acc'],
                                abs=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(control.state_dict().values(), base.state_dict().values()))
    hpm = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).eval()
    for mode in ('dynamic', 'static'):
        hpm.hpm_head.mode = mode
        with torch.no_grad():
            acc = torch.cat([hpm(xb).argmax(1) == yb for xb, yb in zip(x.split(250), y.split(250))]).float().mean()
        name = 'eval_hpm' if mode == 'dynamic' else 'eval_static'
        record = json.loads((study / f'{name}_{n}' / 'eval.json').read_text())
        assert acc.item() == pytest.approx(record['clean_acc'], abs=1e-6), mode
