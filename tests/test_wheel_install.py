"""Everything works from an install: a wheel built from the sources, installed into a fresh virtual environment,
run from a folder outside the repository. The package reads nothing outside itself (the shipped weights, the
model-card template, the fine-tuning configs and the zoo manifest are package data) and its command-line tools are
its own modules: a 2-step fine-tune (``accelerate launch -m timm_hpm.cli.finetune`` with a packaged config, by name),
an 8-image MSA evaluation of the fine-tuned model (``timm-hpm-evaluate``), the zoo table (``timm-hpm-zoo --table``),
a benchmark (``timm-hpm-benchmark``) and a card export (``timm-hpm-push --dry-run``).

The fresh environment gets torch, timm and the other dependencies from this one's site-packages through a ``.pth``
path line (nothing is downloaded or reinstalled). A path line does not run the ``.pth`` files of the folder it adds,
so this checkout's editable install (a finder that a ``.pth`` there installs) stays invisible: ``timm_hpm`` is the
wheel's, which the first test checks."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RESULTS = ROOT / 'results' / 'fashion_mnist' / 'eval_hpm_1000' / 'eval.json'
TINY_MSA = ['--dataset', 'synthetic', '--eps', '0.05', '--n-examples', '8', '--batch-size', '8', '--batchings',
            'default', '--surrogates', 'dynamic', '--apgd-iters', '1', '--autoattack-iters', '1', '--square-queries',
            '2', '--n-target-classes', '1', '--target-n-target-classes', '1', '--combine-rounds', '0', '--device',
            'cpu']

pytestmark = pytest.mark.slow

# Run by the installed package: it is the wheel's, its data is there, it loads the shipped models offline and
# renders a model card.
CHECK = '''
import json, sys
from pathlib import Path
import timm, torch
from safetensors.torch import load_file
import timm_hpm
from timm_hpm.cards import render_card
from timm_hpm.cli import CONFIG_DIR, packaged_configs
from timm_hpm.hub import save_for_hub
from timm_hpm.zoo import DEFAULT_MANIFEST, load_manifest

site, repo_weights, results, out = map(Path, sys.argv[1:])
package = Path(timm_hpm.__file__).resolve().parent
assert package.is_relative_to(site.resolve()), timm_hpm.__file__
assert CONFIG_DIR.resolve().is_relative_to(package) and DEFAULT_MANIFEST.resolve().is_relative_to(package)
assert {'test_synthetic', 'fashion_mnist_hpm', 'hpm_wrn28_10_cifar10'} <= set(packaged_configs())
entries = load_manifest()  # every entry checked, its config read from the package
assert all(e.config_path.resolve().is_relative_to(package) for e in entries.values())
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


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """``(venv, site-packages, env, work folder)``: the wheel installed in a fresh virtual environment, the environment
    variables its commands run with and an empty folder outside the repository to run them in."""
    tmp = tmp_path_factory.mktemp('wheel')
    # Built from a copy of what the wheel is made of, so that no build output lands in the working tree.
    source = tmp / 'source'
    shutil.copytree(ROOT / 'timm_hpm', source / 'timm_hpm', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy2(ROOT / name, source / name)
    # No network and no second torch: the build uses this environment's setuptools, the install adds only timm-hpm.
    _pip('wheel', '--no-deps', '--no-build-isolation', '--no-index', '--wheel-dir', tmp / 'dist', source, cwd=tmp)
    wheel, = (tmp / 'dist').glob('timm_hpm-*.whl')
    venv = tmp / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    _pip('--python', python, 'install', '--no-deps', '--no-index', wheel, cwd=tmp)
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies: this environment's site-packages, added after the install (pip saw an empty environment).
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ('purelib', 'platlib'))
    (site / '_timm_hpm_test_dependencies.pth').write_text(''.join(f'{path}\n' for path in ours))
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    env.update(HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONNOUSERSITE='1',
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    work = tmp / 'work'
    work.mkdir()
    return venv, site, env, work


def _run(installed, *command, timeout=300):
    venv, _, env, work = installed
    program = venv / 'bin' / command[0]
    result = subprocess.run([str(program), *map(str, command[1:])], cwd=work, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f'{shlex.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def test_the_wheel_is_what_runs_and_ships_its_data(installed):
    """The installed package is the wheel's (not this checkout's), ships its weights, configs and zoo manifest, loads
    the shipped models offline and renders a model card."""
    venv, site, _, work = installed
    result = _run(installed, 'python', '-c', CHECK, site, ROOT / 'timm_hpm' / 'weights' /
                  'small_cnn.fmnist_pgdat.safetensors', SHIPPED_RESULTS, work / 'export')
    assert 'library_name: timm' in result.stdout and '69.00%' in result.stdout  # the shipped model's MSA figure
    assert {p.name for p in (venv / 'bin').glob('timm-hpm-*')} == {'timm-hpm-finetune', 'timm-hpm-evaluate',
                                                                  'timm-hpm-push', 'timm-hpm-zoo',
                                                                  'timm-hpm-benchmark'}


def test_finetune_evaluate_zoo_table_and_card_export_from_an_install(installed):
    _, _, _, work = installed
    # a 2-step fine-tune with the packaged synthetic config, named as such, under accelerate launch -m
    run = work / 'finetune'
    _run(installed, 'python', '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1', '--num_machines',
         '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'timm_hpm.cli.finetune', '--config',
         'test_synthetic', '--max-steps', '2', '--device', 'cpu', '--output-dir', run)
    steps = [json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()]
    assert max(steps) == 2 and (run / 'final' / 'model.safetensors').is_file()

    # an 8-image MSA evaluation of the fine-tuned model, by the console script
    argv = ['--model', f'local-dir:{run / "final"}', *TINY_MSA, '--out', work / 'eval']
    printed = _run(installed, 'timm-hpm-evaluate', *argv).stdout
    assert 'MSA accuracy' in printed
    result = json.loads((work / 'eval' / 'eval.json').read_text())
    assert result['n_examples'] == 8 and result['msa_acc'] is not None
    assert shlex.split(result['command']) == ['python', '-m', 'timm_hpm.cli.evaluate', *map(str, argv)]

    # a benchmark of a plain timm model (found batch-independent: standard AutoAttack), by the console script
    _run(installed, 'timm-hpm-benchmark', '--model', 'small_cnn', '--no-pretrained', '--dataset', 'synthetic',
         '--eps', '0.05', '--n-examples', '6', '--batch-size', '3', '--detection-examples', '6',
         '--autoattack-iters', '2', '--square-queries', '5', '--device', 'cpu', '--out', work / 'bench')
    report = json.loads((work / 'bench' / 'benchmark.json').read_text())
    assert report['protocol'] == 'autoattack' and report['command'].startswith('python -m timm_hpm.cli.benchmark')

    # the zoo table from the packaged manifest
    table = _run(installed, 'timm-hpm-zoo', '--table').stdout
    assert '| `hpm_small_cnn.fmnist_hpm` |' in table and '| shipped |' in table
    assert len(table.strip().splitlines()) == 2 + 6

    # a card export (dry run) of the shipped model with its committed results, copied with their run folder; the
    # upload folder goes to runs/hub/<name> under the working folder (no --out)
    shutil.copytree(SHIPPED_RESULTS.parent, work / 'committed')
    printed = _run(installed, 'timm-hpm-push', '--model', 'hpm_small_cnn.fmnist_hpm', '--results',
                   'committed/eval.json', '--repo-id', 'a/b', '--dry-run').stdout
    assert 'dry run: would upload' in printed
    card = (work / 'runs' / 'hub' / 'b' / 'README.md').read_text()
    assert 'library_name: timm' in card and '69.00%' in card
