"""The model-zoo manifest (timm_hpm/zoo/zoo.yaml, timm_hpm/zoo/), its table, recipes/build_zoo.py end to end on the
Fashion-MNIST entry (reduced budget, dry-run push, a second run skips every step) and the CPU rehearsal of a CIFAR
entry at full model size (recipes/benchmarks/rehearse_zoo.py)."""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import timm_hpm
from timm_hpm.robustbench import ROBUSTBENCH_MODELS
from timm_hpm.zoo import (DEFAULT_MANIFEST, BuildOptions, ZooError, build_command, build_record, check_build_record,
                          load_manifest, override_eval, parse_entry, plan_steps, zoo_table)

from _recipes import RECIPES, load_recipe
from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load(DEFAULT_MANIFEST.read_text())['entries']
RB_TAGS = ['hpm_wrn28_10.rb_wang2023better_cifar10', 'hpm_wrn28_10.rb_wang2023better_cifar100',
           'hpm_wrn70_16.rb_wang2023better_cifar10', 'hpm_wrn70_16.rb_wang2023better_cifar100',
           'hpm_resnet50.rb_salman2020do_imagenet']
FMNIST = 'hpm_small_cnn.fmnist_hpm'


@pytest.fixture(scope='module')
def entries():
    return load_manifest()


def test_manifest_lists_every_published_tag(entries):
    assert list(entries) == [FMNIST] + RB_TAGS
    used = {e.config for e in entries.values()}
    assert {p.stem for p in (ROOT / 'timm_hpm' / 'configs').glob('hpm_*.yaml')} <= used  # packaged configs, by name
    for tag in RB_TAGS:
        rb = entries[tag].robustbench  # the base's facts come from the RobustBench table
        assert rb in ROBUSTBENCH_MODELS and f'{timm_hpm.hpm_variant(rb.architecture)}.{rb.tag}' == tag
    assert entries[FMNIST].base in timm_hpm.list_models(pretrained=True)


def _broken(index, **changes):
    raw = json.loads(json.dumps(RAW[index]))
    for dotted, value in changes.items():
        *path, key = dotted.split('__')
        node = raw
        for part in path:
            node = node[part]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return raw


@pytest.mark.parametrize('index,changes,message', [
    (1, dict(colour='red'), "unknown keys \\['colour'\\]"),
    (1, dict(card=None), "missing keys \\['card'\\]"),
    (1, dict(tag='hpm_wrn28_10.no_such_tag'), 'not a registered model.tag'),
    (1, dict(base='rb:NoSuchModel'), 'not in the supported table'),
    (1, dict(base='rb:Wang2023Better_WRN-70-16'), 'is hpm_wrn70_16.rb_wang2023better_cifar10'),
    (1, dict(eval__eps='4/255'), "not RobustBench's 8/255"),
    (1, dict(eval__batchings=['sorted']), 'batchings'),
    (1, dict(eval__apgd_iters=0), 'apgd_iters: must be a positive integer'),
    (1, dict(config='hpm_wrn28_10_cifar100'), 'trains on cifar100'),
    (1, dict(config='no_such'), 'no such file'),
    (1, dict(card__repo_id='no-namespace'), 'user or organisation'),
    (1, dict(card__license='mit'), "pretrained cfg says 'unknown'"),
    (1, dict(hardware='tpu'), "'cpu' or 'gpu'"),
    (0, dict(base='small_cnn.fmnist_control_missing'), 'neither rb:'),
    (5, dict(config='hpm_wrn28_10_cifar10'), 'not the architecture'),
])
def test_manifest_entry_errors_name_the_field(index, changes, message):
    with pytest.raises(ZooError, match=message):
        parse_entry(_broken(index, **changes), index)


def test_manifest_file_errors(tmp_path):
    path = tmp_path / 'zoo.yaml'
    path.write_text(yaml.safe_dump({'entries': [RAW[0], RAW[0]]}))
    with pytest.raises(ZooError, match='listed twice'):
        load_manifest(path)
    path.write_text(yaml.safe_dump({'models': []}))
    with pytest.raises(ZooError, match="one key, 'entries'"):
        load_manifest(path)


def test_zoo_table_is_generated_from_the_manifest(entries):
    table = zoo_table(entries)
    rows = table.splitlines()[2:]
    assert len(rows) == len(entries)
    for row, entry in zip(rows, entries.values()):
        assert f'`{entry.tag}`' in row and f'`{build_command(entry)}`' in row
        if entry.is_robustbench:
            rb = entry.robustbench
            assert f'| {rb.reported_clean}% | {rb.reported_autoattack}% |' in row
            assert 'needs a GPU' in row and 'the RobustBench checkpoint' in row
        else:
            assert '| shipped |' in row
    assert '--data-dir <ImageNet root>' in rows[-1]
    printed = subprocess.run([sys.executable, str(RECIPES / 'build_zoo.py'), '--table'], capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout
    assert printed.strip() == table


def test_batchings_match_evaluate():
    from timm_hpm.zoo import manifest
    from timm_hpm.eval import BATCHINGS
    assert set(manifest._BATCHINGS) == set(BATCHINGS)


def test_plan_steps_commands_and_resume(entries, tmp_path):
    entry = override_eval(entries[RB_TAGS[0]], {'n_examples': 4, 'apgd_iters': 1, 'square_queries': 3})
    opts = BuildOptions(out=tmp_path, model_dir='/m', data_dir='/d', launcher='accelerate',
                        launch_args=['--num_processes', '2'], max_steps=3, sets=['data.batch_size=2'])
    steps = {s.name: s for s in plan_steps(entry, opts)}
    assert list(steps) == ['base', 'finetune', 'eval_base', 'eval_hpm', 'hub_dry_run']
    assert steps['base'].command is None
    ft = steps['finetune'].command
    assert ft[1:4] == ['-m', 'accelerate.commands.launch', '--num_processes'] and '--config' in ft
    assert ft[ft.index('--set') + 1:ft.index('--set') + 4] == ['model.robustbench_dir=/m', 'data.data_dir=/d',
                                                                'data.batch_size=2']
    assert ft[-2:] == ['--max-steps', '3']
    base, hpm = steps['eval_base'].command, steps['eval_hpm'].command
    assert base[base.index('--model') + 1] == f'local-dir:{tmp_path / "base"}' and '--apgd-iters' not in base
    assert base[base.index('--square-queries') + 1] == '3' and base[base.index('--n-examples') + 1] == '4'
    assert '--surrogate-model' not in hpm  # evaluate.py's default: no transfer from the base
    with_base = override_eval(entry, {'base_surrogate': True})
    hpm_b = {s.name: s for s in plan_steps(with_base, opts)}['eval_hpm'].command
    assert hpm_b[hpm_b.index('--surrogate-model') + 1] == f'local-dir:{tmp_path / "base"}'
    assert hpm[hpm.index('--apgd-iters') + 1] == '1' and hpm[hpm.index('--batchings') + 1] == 'default'
    assert '--dry-run' in steps['hub_dry_run'].command
    (tmp_path / 'finetune').mkdir()
    (tmp_path / 'finetune' / 'config.yaml').write_text('{}')  # a started run: resumed, with its own settings
    ft = {s.name: s for s in plan_steps(entry, opts)}['finetune'].command
    assert '--resume' in ft and '--set' not in ft and ft[-2:] == ['--max-steps', '3']
    push = {s.name: s for s in plan_steps(entry, dataclasses.replace(opts, push=True))}['push']
    assert '--dry-run' not in push.command and push.done == tmp_path / 'pushed.json'
    fm = {s.name: s for s in plan_steps(entries[FMNIST], BuildOptions(out=tmp_path / 'f'))}
    assert 'base' not in fm and fm['eval_base'].command[fm['eval_base'].command.index('--model') + 1] == \
        'small_cnn.fmnist_pgdat'
    with pytest.raises(ZooError, match='n_examples'):
        override_eval(entry, {'n_examples': 0})


def test_build_record_refuses_another_build(entries, tmp_path):
    opts = BuildOptions(out=tmp_path, max_steps=2)
    record = build_record(entries[FMNIST], opts)
    (tmp_path / 'build.json').write_text(json.dumps(record))
    check_build_record(tmp_path / 'build.json', record)
    with pytest.raises(ZooError, match='max_steps'):
        check_build_record(tmp_path / 'build.json', build_record(entries[FMNIST], BuildOptions(out=tmp_path)))
    other = override_eval(entries[FMNIST], {'n_examples': 5})
    with pytest.raises(ZooError, match='entry.eval'):
        check_build_record(tmp_path / 'build.json', build_record(other, opts))


FMNIST_BUDGET = ['--device', 'cpu', '--max-steps', '2', '--set', 'data.batch_size=32', 'data.val_examples=64',
                 'data.train_examples=256', 'train.eval_pgd_steps=1', 'train.eval_batch_size=64', 'attack.steps=1',
                 '--eval-set', 'n_examples=8', 'batch_size=8', 'apgd_iters=2', 'autoattack_iters=2',
                 'square_queries=10', 'combine_rounds=1', 'n_target_classes=1', 'target_n_target_classes=1']


def _build(*args):
    return subprocess.run([sys.executable, str(RECIPES / 'build_zoo.py'), *args], capture_output=True, text=True,
                          cwd=ROOT)


@needs_fashion_mnist
def test_build_fashion_mnist_entry_reduced_budget(tmp_path):
    """The shipped entry built by the one command on a reduced budget: fine-tuning, the base under AutoAttack, the
    HPM model under MSA, the dry-run Hub folder with its card; a second run skips every step. The build is started
    with --until finetune (stops there) and finished by the same command without it."""
    out = tmp_path / 'build'
    wrong = _build(FMNIST, '--out', str(out), *FMNIST_BUDGET, '--until', 'evaluate')
    assert wrong.returncode != 0 and 'not a step of this build; its steps: finetune, eval_base' in wrong.stderr
    half = _build(FMNIST, '--out', str(out), *FMNIST_BUDGET, '--until', 'finetune')
    assert half.returncode == 0, half.stdout[-3000:] + half.stderr[-3000:]
    assert 'stopped after finetune (--until)' in half.stdout and (out / 'finetune' / 'final').is_dir()
    assert not (out / 'eval_base').exists()
    first = _build(FMNIST, '--out', str(out), *FMNIST_BUDGET)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert 'finetune: done, skipped' in first.stdout
    assert 'dry run: would upload' in first.stdout
    hub = sorted(p.name for p in (out / 'hub').iterdir())
    assert hub == ['.timm_hpm_upload.json', 'README.md', 'config.json', 'eval_base.json', 'eval_hpm.json',
                   'model.safetensors', 'training_config.yaml']  # the manifest: what push_to_hub.py wrote (uploaded)
    assert sorted(json.loads((out / 'hub' / '.timm_hpm_upload.json').read_text())['files']) == hub[1:]
    card = (out / 'cards' / 'hpm_small_cnn.fmnist_hpm.md').read_text()
    assert card == (out / 'hub' / 'README.md').read_text() and 'timm-hpm/small_cnn.fmnist_pgdat' in card
    hpm = json.loads((out / 'eval_hpm' / 'eval.json').read_text())
    base = json.loads((out / 'eval_base' / 'eval.json').read_text())
    assert hpm['n_examples'] == base['n_examples'] == 8 and hpm['msa_acc'] is not None
    assert base['name'] == 'small_cnn.fmnist_pgdat' and hpm['name'] == f'local-dir:{out / "finetune" / "final"}'
    assert yaml.safe_load((out / 'finetune' / 'config.yaml').read_text())['train']['max_steps'] == 2
    assert not (out / 'pushed.json').exists()

    second = _build(FMNIST, '--out', str(out), *FMNIST_BUDGET)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = [line for line in second.stdout.splitlines() if 'done, skipped' in line]
    assert [line.split()[1] for line in skipped] == ['finetune:', 'eval_base:', 'eval_hpm:', 'hub_dry_run:']
    status = _build(FMNIST, '--out', str(out), '--status', *FMNIST_BUDGET).stdout
    assert status.count('done   ') == 4
    other = _build(FMNIST, '--out', str(out), *FMNIST_BUDGET, '--max-steps', '3')
    assert other.returncode != 0 and 'holds a build with other settings (max_steps)' in other.stderr


def test_rehearsal_wrn28_10_cifar10_full_size(tmp_path):
    """The CIFAR-10 WRN-28-10 entry at full size (36.5M parameters, random weights in RobustBench's layout) on a
    fabricated CIFAR-10 folder: base export, 2 fine-tuning steps (build_zoo.py --until finetune), the test images
    relabelled, then AutoAttack and MSA (the dynamic surrogate and the base) on 2 images with 1 iteration and the
    dry-run Hub folder (the other CIFAR/ImageNet entries: python recipes/benchmarks/rehearse_zoo.py)."""
    rehearse = load_recipe(RECIPES / 'benchmarks' / 'rehearse_zoo.py')
    timings = rehearse.rehearse(RB_TAGS[0], tmp_path, extra=['--eval-set', 'n_examples=2', 'batch_size=2',
                                                                   'surrogates=dynamic', 'base_surrogate=true'])
    assert set(timings['steps']) == {'base', 'finetune', 'eval_base', 'eval_hpm', 'hub_dry_run'}
    build = tmp_path / 'build'
    import timm
    final = timm.create_model(f'local-dir:{build / "finetune" / "final"}', pretrained=True)
    assert sum(p.numel() for p in final.parameters()) > 36e6  # the real size
    hpm = json.loads((build / 'eval_hpm' / 'eval.json').read_text())
    transfer = hpm['settings']['msa']['surrogate_models']  # --eval-set base_surrogate=true: the exported base
    assert len(transfer) == 1 and transfer[0].startswith('local-dir:') and transfer[0].endswith('build_base')
    # one test image labelled with the base's prediction, one with the fine-tuned model's: both attacks had work
    assert hpm['n_examples'] == 2 and timings['clean_acc']['eval_base'] > 0 and timings['clean_acc']['eval_hpm'] > 0
    assert (build / 'hub' / 'README.md').is_file()
    config = yaml.safe_load((build / 'finetune' / 'config.yaml').read_text())
    assert config['model']['base'] == 'rb:Wang2023Better_WRN-28-10' and config['train']['mixed_precision'] == 'bf16'


def test_a_rehearsal_past_its_limit_stops_the_build_and_its_running_step():
    """build_zoo.py runs each step in a child process: on a timeout the whole process group is stopped, not
    build_zoo.py alone (which would leave the step computing and holding its run folder's lock)."""
    rehearse = load_recipe(RECIPES / 'benchmarks' / 'rehearse_zoo.py')
    step = 'import time; time.sleep(120)'
    build = (f'import subprocess, sys, time; step = subprocess.Popen([sys.executable, "-c", {step!r}]); '
             'print(step.pid, flush=True); time.sleep(120)')
    output, returncode = rehearse._run_build([sys.executable, '-c', build], timeout=10)
    assert returncode is None
    stat = Path(f'/proc/{int(output.split()[0])}/stat')

    def running() -> bool:  # neither gone nor dead and unreaped
        try:
            return stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z'
        except FileNotFoundError:
            return False
    deadline = time.time() + 10  # SIGKILL is sure, but a process closes its files before it is done exiting
    while running() and time.time() < deadline:
        time.sleep(0.05)
    assert not running()
