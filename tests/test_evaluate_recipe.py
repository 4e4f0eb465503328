"""recipes/evaluate.py end to end on a tiny HPM model: one process, two processes (accelerate, gloo), and a
real process kill followed by a resume all give the same JSON."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import timm_hpm  # noqa: F401  (registers the models)
from timm_hpm.hub import save_for_hub

ROOT = Path(__file__).resolve().parents[1]
ARGS = ['--dataset', 'synthetic', '--eps', '0.05', '--n-examples', '16', '--batch-size', '8', '--apgd-iters', '5',
        '--autoattack-iters', '5', '--square-queries', '20', '--n-target-classes', '1', '--target-n-target-classes', '1',
        '--device', 'cpu']
VOLATILE = ('attack_seconds', 'wall_seconds', 'machine', 'num_processes', 'command')


def _stable(path):
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if k not in VOLATILE}


def _tiny_hpm_folder(tmp_path_factory, name: str, in_chans: int) -> Path:
    """A local-dir folder of a tiny HPM model (random weights, seed 0, prototypes marked initialised)."""
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18', in_chans=in_chans, img_size=8, num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    save_for_hub(model, folder)
    return folder


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return _tiny_hpm_folder(tmp_path_factory, 'model', in_chans=1)


@pytest.fixture(scope='module')
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('ref')
    result = subprocess.run([sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model',
                             f'local-dir:{model_dir}', *ARGS, '--out', str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'MSA accuracy' in result.stdout
    return out / 'eval.json'


def test_result_has_robustbench_and_msa_fields(reference):
    result = json.loads(reference.read_text())
    for key in ('clean_acc', 'autoattack_acc', 'msa_acc', 'msa_union_acc', 'per_surrogate_acc', 'eps', 'dataset',
                'architecture', 'threat_model', 'batchings', 'passes', 'wall_seconds', 'n_examples'):
        assert key in result, key
    assert set(result['batchings']) == {'default', 'single', 'shuffled'}
    assert result['architecture'] == 'hpm_preact_resnet18'
    assert result['msa_acc'] <= result['autoattack_acc'] <= result['clean_acc']
    info = json.loads((reference.parent / 'model_info.json').read_text())
    assert info['clean_acc'] == f"{100 * result['clean_acc']:.2f}" and info['dataset'] == 'synthetic'


@pytest.mark.slow
def test_two_processes_give_the_same_json(model_dir, reference, tmp_path):
    out = tmp_path / 'two'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines',
         '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29533',
         str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}', *ARGS, '--out', str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / 'eval.json').read_text())['num_processes'] == 2
    assert _stable(out / 'eval.json') == _stable(reference)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_json(model_dir, reference, tmp_path):
    out = tmp_path / 'killed'
    cmd = [sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}', *ARGS,
           '--out', str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    def finished_units():  # the whole lines of the units file but its header
        units = out / 'attack' / 'units.jsonl'
        return max(units.read_bytes().count(b'\n') - 1, 0) if units.exists() else 0
    while time.time() < deadline and finished_units() < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = finished_units()
    assert 3 <= done < 20 and not (out / 'eval.json').exists()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _stable(out / 'eval.json') == _stable(reference)


def test_bad_arguments_fail_before_attacking(model_dir, tmp_path):
    base = [sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}',
            '--dataset', 'synthetic', '--device', 'cpu', '--out', str(tmp_path / 'x')]
    for extra, message in ((['--eps', '8'], 'did you mean 8/255'),
                           (['--eps', '8/255', '--dataset', 'fashion_mnist', '--n-examples', '20000'],
                            'larger than the fashion_mnist test set'),
                           (['--eps', '0.05', '--hpm-mode', 'static'], '--hpm-mode goes with --protocol autoattack')):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_hpm_mode_selects_the_attacked_head(model_dir, tmp_path):
    """--hpm-mode static evaluates the l2 head alone: its clean accuracy is the static head's."""
    out = tmp_path / 'static'
    result = subprocess.run([sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}',
                             *ARGS, '--protocol', 'autoattack', '--hpm-mode', 'static', '--out', str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'eval.json').read_text())
    assert record['hpm_mode'] == 'static' and record['protocol'] == 'autoattack'
    assert 'warnings' not in record  # a batch-independent head: a valid figure
    from timm_hpm.data import load_eval_tensors
    model = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    x, y = load_eval_tensors('synthetic', 16, pretrained_cfg=model.pretrained_cfg, num_classes=4,
                             image_size=model.pretrained_cfg['input_size'])
    with torch.no_grad(), model.hpm_head.using_mode('static'):
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert record['clean_acc'] == pytest.approx(expected)
    assert record['autoattack_acc'] <= record['clean_acc']


# ---------------------------------------------------------------- safe runs (issue #12)
def _evaluate(model_dir, out, *extra, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}',
                           *ARGS, *extra, '--out', str(out)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_a_second_run_into_a_busy_out_folder_fails_at_once_naming_the_holder(model_dir, tmp_path):
    from timm_hpm.runfiles import run_lock
    out = tmp_path / 'busy'
    with run_lock(out):  # this test process plays the first run
        result = _evaluate(model_dir, out, timeout=120)
    assert result.returncode != 0
    assert f'in use by another run (pid {os.getpid()} ' in result.stderr, result.stderr[-2000:]
    assert not (out / 'attack').exists()  # refused before any work


def test_results_of_another_run_are_never_overwritten(model_dir, reference, tmp_path):
    before = reference.read_bytes()
    refused = _evaluate(model_dir, reference.parent, '--protocol', 'autoattack', '--eps', '0.1')
    assert refused.returncode != 0 and 'other settings' in refused.stderr, refused.stderr[-2000:]
    assert reference.read_bytes() == before
    copied = tmp_path / 'copied'  # results without the run that made them (attack/ not copied)
    copied.mkdir()
    (copied / 'eval.json').write_bytes(before)
    refused = _evaluate(model_dir, copied)
    assert refused.returncode != 0 and 'without the run that made them' in refused.stderr, refused.stderr[-2000:]
    assert (copied / 'eval.json').read_bytes() == before and not (copied / 'attack').exists()


def test_autoattack_on_a_dynamic_head_warns_and_records_the_mode(model_dir, tmp_path):
    out = tmp_path / 'dynamic'
    result = _evaluate(model_dir, out, '--protocol', 'autoattack')
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mode 'dynamic') is not a valid robustness figure" in result.stderr
    record = json.loads((out / 'eval.json').read_text())
    assert record['hpm_mode'] == 'dynamic'
    assert any('not a valid robustness figure' in w for w in record['warnings'])
    assert 'WARNING: AutoAttack on a batch-dependent HPM head' in (out / 'eval.md').read_text()


@pytest.mark.slow
def test_a_sharded_run_into_a_busy_out_folder_stops_every_process(model_dir, tmp_path):
    """The main process holds the lock for the whole sharded run; when it cannot, no process starts work."""
    from timm_hpm.runfiles import run_lock
    out = tmp_path / 'busy'
    with run_lock(out):
        result = subprocess.run(
            [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
             '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
             '29534', str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{model_dir}', *ARGS, '--out',
             str(out)], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode != 0
    assert result.stderr.count(f'in use by another run (pid {os.getpid()} ') >= 2, result.stderr[-3000:]  # both ranks
    assert not (out / 'attack').exists()


def test_the_recipes_choices_and_msa_defaults_are_the_packages_and_the_readmes():
    """evaluate.py writes its choices out (its --help imports nothing heavy); they must be the package's, and its
    MSA defaults, MSAConfig's and the README's description must agree."""
    import re

    from _recipes import load_recipe

    from timm_hpm.data import DATASETS
    from timm_hpm.eval import BATCHINGS, MSAConfig
    recipe = load_recipe('evaluate')
    assert recipe.DATASETS == DATASETS and recipe.BATCHINGS == BATCHINGS and recipe.HPM_MODES == timm_hpm.HPM_MODES
    args = recipe.parse_args(['--model', 'm', '--dataset', 'synthetic', '--eps', '0.1'])
    cfg = MSAConfig(eps=0.1)
    readme = (ROOT / 'README.md').read_text()
    documented = dict(kv.split('=') for kv in re.search(r'<!-- msa-defaults: (.*?) -->', readme).group(1).split())
    for key in ('apgd_iters', 'n_target_classes', 'target_n_target_classes', 'combine_rounds', 'completion_rounds',
                'search_sweeps'):
        assert getattr(args, key) == getattr(cfg, key) == int(documented[key]), key
    assert list(args.surrogates) == list(cfg.surrogates) == documented['surrogates'].split(',')
    assert (not args.no_score_iterates) == cfg.score_iterates == (documented['score_iterates'] == 'True')
    assert args.base_surrogate is False and not cfg.surrogate_models and documented['base_surrogate'] == 'False'
    assert f'{cfg.apgd_iters} iterations' in readme and f'{cfg.n_target_classes} target classes per surrogate' in readme
    assert f"AutoAttack's {cfg.target_n_target_classes} through the target" in readme
    assert f'up to {cfg.combine_rounds} whole-batch combinations' in readme


def test_surrogate_models_are_the_named_ones_and_the_recorded_base_only_on_request():
    from _recipes import load_recipe
    recipe = load_recipe('evaluate')

    def names(*extra, model='hpm_small_cnn.fmnist_hpm', protocol='msa'):
        args = recipe.parse_args(['--model', model, '--dataset', 'fashion_mnist', '--eps', '0.1', '--protocol',
                                  protocol, *extra])
        return recipe.surrogate_model_names(args)

    assert names() == [] and names('--no-base-surrogate') == []
    assert names('--base-surrogate') == ['small_cnn.fmnist_pgdat']
    assert names('--surrogate-model', 'x', '--base-surrogate') == ['x', 'small_cnn.fmnist_pgdat']
    assert names('--surrogate-model', 'small_cnn.fmnist_pgdat', '--base-surrogate') == ['small_cnn.fmnist_pgdat']
    assert names('--surrogate-model', 'x', '--surrogate-model', 'y') == ['x', 'y']
    assert names('--base-surrogate', '--no-pretrained') == []  # random weights: no recorded base applies
    assert names('--base-surrogate', model='small_cnn.fmnist_pgdat') == []  # not an HPM tag: nothing recorded
    assert names('--base-surrogate', protocol='autoattack') == []


def test_help_imports_nothing_heavy():
    """--help answers before the evaluation's heavy imports (accelerate, the data, AutoAttack). The code is the
    package's (timm_hpm.cli.evaluate): importing it imports the package first, which registers its models (torch,
    timm); the attack options are generated from MSAConfig's and PoisonConfig's fields, so timm_hpm.eval is imported
    too."""
    code = ('import sys, runpy; sys.argv = ["evaluate.py", "--help"]\n'
            'try:\n    runpy.run_path(%r, run_name="__main__")\n'
            'except SystemExit:\n    pass\n'
            'print(sorted(m for m in ("accelerate", "timm_hpm.data", "autoattack") if m in sys.modules))'
            % str(ROOT / 'recipes' / 'evaluate.py'))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == '[]'


@pytest.fixture(scope='module')
def rgb_model_dir(tmp_path_factory):
    """A tiny HPM model on three channels: with one, NHWC and NCHW strides coincide."""
    return _tiny_hpm_folder(tmp_path_factory, 'rgb_model', in_chans=3)


def test_channels_last_changes_only_the_memory_layout(rgb_model_dir, tmp_path, monkeypatch):
    """--channels-last runs the model on NHWC images and changes nothing else: every per-sample result of MSA
    (clean, each stage's breaks, realised) and the model's fingerprint are the default layout's. L2: AutoAttack's L2
    step flattens the attack's images with ``.view``, which NHWC images would break."""
    from _recipes import load_recipe
    recipe = load_recipe('evaluate')
    load_model, layouts = recipe.load_model, set()

    def spy(*args, **kwargs):  # records the layout of the images the stem convolution sees
        model = load_model(*args, **kwargs)
        stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_pre_hook(lambda module, inputs: layouts.add(
            inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous()))
        return model
    monkeypatch.setattr(recipe, 'load_model', spy)
    args = ['--model', f'local-dir:{rgb_model_dir}', '--dataset', 'synthetic', '--norm', 'L2', '--eps', '0.05',
            '--n-examples', '16', '--batch-size', '8', '--batchings', 'default', '--apgd-iters', '1',
            '--autoattack-iters', '1', '--square-queries', '2', '--n-target-classes', '1',
            '--target-n-target-classes', '1', '--combine-rounds', '1', '--device', 'cpu']
    runs = {}
    for channels_last in (False, True):
        layouts.clear()
        runs[channels_last] = tmp_path / f'channels_last_{channels_last}'
        recipe.main(args + ['--channels-last'] * channels_last + ['--out', str(runs[channels_last])])
        assert layouts == {channels_last}
    from timm_hpm.eval.unit_store import read_units
    units = sorted(read_units(runs[False] / 'attack'))
    assert units == sorted(read_units(runs[True] / 'attack')) and len(units) == 2

    def unit(run, key):
        timed = ('seconds', 'stage_seconds')
        return {k: v for k, v in read_units(run / 'attack')[key].items() if k not in timed}
    plain = [unit(runs[False], name) for name in units]
    assert plain == [unit(runs[True], name) for name in units]
    held = [r for u in plain for r, c in zip(u['realised'], u['clean']) if c]  # of the clean-correct images
    assert True in held and False in held  # both outcomes are compared
    assert _stable(runs[True] / 'eval.json') == _stable(runs[False] / 'eval.json')
    from timm_hpm.eval.run_header import read_run_fingerprint  # the header of attack/units.jsonl
    assert read_run_fingerprint(runs[True] / 'attack') == read_run_fingerprint(runs[False] / 'attack')
