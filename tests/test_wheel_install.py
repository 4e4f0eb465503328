"""A regular (non-editable) install works on its own: a wheel built from the sources and installed into an empty
folder renders a model card and loads the shipped models offline, from its package data alone."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RESULTS = ROOT / 'results' / 'fashion_mnist' / 'eval_hpm_1000' / 'eval.json'

# Run by the installed package, from a folder outside the repository.
CHECK = '''
import json, sys
from pathlib import Path
import timm, torch
from safetensors.torch import load_file
import timm_hpm
from timm_hpm.cards import render_card
from timm_hpm.hub import save_for_hub

site, repo_weights, results, out = map(Path, sys.argv[1:])
assert Path(timm_hpm.__file__).resolve().is_relative_to(site.resolve()), timm_hpm.__file__
base = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True)
shipped = load_file(str(repo_weights))
assert shipped.keys() == base.state_dict().keys()
assert all(torch.equal(base.state_dict()[k], v) for k, v in shipped.items())
folder = save_for_hub(timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).eval(), out)
card = render_card(json.loads(results.read_text()), 'timm-hpm/hpm_small_cnn.fmnist_hpm',
                   json.loads((folder / 'config.json').read_text()))
print(card)
'''


def _pip(*args, cwd):
    result = subprocess.run([sys.executable, '-m', 'pip', '--disable-pip-version-check', *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_wheel_renders_cards_and_loads_shipped_weights(tmp_path):
    # Built from a copy of what the wheel is made of, so that no build output lands in the working tree.
    source = tmp_path / 'source'
    shutil.copytree(ROOT / 'timm_hpm', source / 'timm_hpm', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy2(ROOT / name, source / name)
    # No network and no second torch: the build uses this environment's setuptools, the install adds only timm-hpm.
    _pip('wheel', '--no-deps', '--no-build-isolation', '--no-index', '--wheel-dir', tmp_path / 'dist', source,
         cwd=tmp_path)
    wheel, = (tmp_path / 'dist').glob('timm_hpm-*.whl')
    site = tmp_path / 'site'
    _pip('install', '--no-deps', '--no-index', '--target', site, wheel, cwd=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-c', CHECK, site, ROOT / 'timm_hpm' / 'weights' / 'small_cnn.fmnist_pgdat.safetensors',
         SHIPPED_RESULTS, tmp_path / 'export'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'library_name: timm' in result.stdout and '69.00%' in result.stdout  # the shipped model's MSA figure
