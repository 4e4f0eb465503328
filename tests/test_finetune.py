"""recipes/finetune.py through its real CLI on synthetic data: loss goes down, export loads with local-dir,
a killed run resumes to bitwise the same weights and prototypes, two processes (accelerate, gloo) keep
identical prototypes and weights on both ranks, and bad configurations fail before training."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_hpm
from timm_hpm.train import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'
RECIPE = ROOT / 'recipes' / 'finetune.py'


def _run(args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, str(RECIPE), '--config', str(CONFIG), '--device', 'cpu', *args],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """The uninterrupted reference, through `accelerate launch --cpu --num_processes 1`."""
    out = tmp_path_factory.mktemp('ref') / 'run'
    result = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1', '--num_machines', '1',
         '--mixed_precision', 'no', '--dynamo_backend', 'no', str(RECIPE), '--config', str(CONFIG), '--device', 'cpu',
         '--output-dir', str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_loss_goes_down_and_export_loads(reference_run):
    log = [json.loads(line) for line in (reference_run / 'log.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in log if 'loss' in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    epoch_ends = [r for r in log if r.get('epoch_end')]
    assert len(epoch_ends) == 2 and all('hpm_clean_acc' in r and 'fc_pgd_acc' in r for r in epoch_ends)
    model = timm.create_model(f"local-dir:{reference_run / 'final'}", pretrained=True).eval()
    assert timm_hpm.is_hpm_model(model) and bool(model.hpm_head.prototypes_initialized)
    assert model.hpm_head.alpha == 0.5 and model.hpm_head.momentum == 0.9
    saved = load_file(str(reference_run / 'final' / 'model.safetensors'))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert (reference_run / 'config.yaml').exists()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(reference_run, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, str(RECIPE), '--config', str(CONFIG), '--device', 'cpu', '--output-dir', str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / 'checkpoints' / 'checkpoint_4' / 'trainer_state.json').exists():
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / 'final').exists(), 'the run finished before it could be killed'
    result = subprocess.run([sys.executable, str(RECIPE), '--resume', str(out), '--device', 'cpu'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed from' in result.stderr
    a = load_file(str(reference_run / 'final' / 'model.safetensors'))
    b = load_file(str(out / 'final' / 'model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_keep_identical_prototypes_and_weights(tmp_path):
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def launch(*args):
        return subprocess.run(
            [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
             '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
             '29541', str(RECIPE), '--device', 'cpu', *args], capture_output=True, text=True, timeout=900, env=env)

    result = launch('--config', str(CONFIG), '--output-dir', str(out), '--set', 'data.batch_size=8')
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = {p.read_text() for p in out.glob('fingerprint_rank*.txt')}
    assert len(list(out.glob('fingerprint_rank*.txt'))) == 2 and len(fingerprints) == 1
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in log if 'loss' in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    model = timm.create_model(f"local-dir:{out / 'final'}", pretrained=True)
    assert bool(model.hpm_head.prototypes_initialized)
    # A finished run is never rewritten: a longer budget is refused (on both processes), the run left as it was.
    refused = launch('--resume', str(out), '--epochs', '3')
    assert refused.returncode != 0 and 'train.epochs 2 -> 3' in refused.stderr
    assert {p.read_text() for p in out.glob('fingerprint_rank*.txt')} == fingerprints
    # With final/ deleted on purpose (as the refusal says), both processes resume from the checkpoint (each its own
    # RNG state) and go on in step.
    shutil.rmtree(out / 'final')
    resumed = launch('--resume', str(out), '--epochs', '3')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {p.read_text() for p in out.glob('fingerprint_rank*.txt')}
    assert len(after) == 1 and after != fingerprints
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    per_epoch = next(r['step'] for r in log if r.get('epoch_end'))
    assert {'step': 2 * per_epoch, 'budget_change': {'train.epochs': [2, 3]}} in log
    assert [r['step'] for r in log if r.get('epoch_end')] == [per_epoch, 2 * per_epoch, 3 * per_epoch]


@pytest.mark.parametrize('override, message', [
    ({'model.name': 'hpm_wrn_nonexistent'}, 'unknown model'),
    ({'attack.eps': 8}, 'did you mean 8/255'),
    ({'attack.eps': 0.9}, 'not a sane Linf radius'),
    ({'train.learning_rate': 0.1}, "unknown key(s) ['learning_rate']"),
    ({'data.dataset': 'mnist'}, 'unknown dataset'),
    ({'model.hpm.alpah': 0.3}, 'unknown options'),
])
def test_bad_config_fails_before_training(override, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
        load_config(CONFIG, override)


def test_bad_config_through_the_cli(tmp_path):
    result = _run(['--output-dir', str(tmp_path / 'x'), '--set', 'attack.eps=8'])
    assert result.returncode == 2 and 'configuration error' in result.stderr and 'did you mean 8/255' in result.stderr
    assert not (tmp_path / 'x' / 'log.jsonl').exists()


def test_missing_dataset_offline_fails_before_training(tmp_path, monkeypatch):
    from timm_hpm.data import DatasetUnavailable, build_train_val
    with pytest.raises(DatasetUnavailable, match='not found'):
        build_train_val('cifar10', root=tmp_path / 'no_cifar_here')


@pytest.mark.parametrize('augment', [True, False])
def test_prototypes_see_only_the_training_part_unaugmented(augment):
    from timm_hpm.data import build_train_val, unaugmented
    train, val = build_train_val('synthetic', val_examples=32, synthetic_examples=96, augment=augment,
                                 image_size=(1, 8, 8), num_classes=4)
    plain = unaugmented(train)
    assert len(plain) == 96 and len(val) == 32
    assert all(torch.equal(plain[i][0], plain[i][0]) for i in range(3))  # deterministic, no augmentation
    held_out = {tuple(val[i][0].flatten().tolist()[:5]) for i in range(len(val))}
    assert not any(tuple(plain[i][0].flatten().tolist()[:5]) in held_out for i in range(len(plain)))


def test_trades_loss_against_its_definition():
    import torch.nn.functional as F
    from timm_hpm.train.engine import trades_loss
    y = torch.tensor([0, 1])
    clean = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(trades_loss(clean, clean, y, beta=6.0), F.cross_entropy(clean, y))
    adv = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    p = torch.softmax(clean, 1)
    kl = (p * (p.log() - torch.log_softmax(adv, 1))).sum(1).mean()
    torch.testing.assert_close(trades_loss(adv, clean, y, beta=2.0), F.cross_entropy(clean, y) + 2.0 * kl)


@pytest.mark.parametrize('objective, attack', [('base', 'pgd'), ('base', 'trades'), ('hpm', 'pgd'),
                                               ('hpm', 'trades')])
def test_training_loss_is_the_objectives_definition(objective, attack):
    """The loss a run trains on, per train.objective and attack.type: PGD-AT's CE of the adversarial logits, or
    TRADES' CE(clean) + beta KL(adv || clean); for HPM of both heads, FC weighted by lambda_fc, with the labels
    handed to the head (its EMA prototype update)."""
    import copy

    import torch.nn.functional as F
    from timm_hpm.train import build_model, training_loss
    plain = {'model.name': 'preact_resnet18', 'model.hpm': {}} if objective == 'base' else {}
    cfg = load_config(CONFIG, {'train.objective': objective, 'attack.type': attack, 'attack.beta': 3.0,
                               'train.lambda_fc': 0.5, **plain})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, x_adv, y = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    reference = copy.deepcopy(model)  # the same state: the forward passes update batch-norm and prototype buffers
    prototypes = model.hpm_head.dataset_prototypes.clone() if objective == 'hpm' else None

    def kl(adv, clean):
        p = torch.softmax(clean, 1)
        return (p * (p.log() - torch.log_softmax(adv, 1))).sum(1).mean()

    def trades(adv, clean):
        return F.cross_entropy(clean, y) + 3.0 * kl(adv, clean)

    loss = training_loss(model, x, x_adv, y, cfg)
    if objective == 'base':
        adv = reference(x_adv)
        expected = F.cross_entropy(adv, y) if attack == 'pgd' else trades(adv, reference(x))
    else:
        clean = reference(x, return_fc=True) if attack == 'trades' else None
        out = reference(x_adv, targets=y, return_fc=True)
        expected = (F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(out.fc_logits, y) if attack == 'pgd' else
                    trades(out.logits, clean.logits) + 0.5 * trades(out.fc_logits, clean.fc_logits))
        assert not torch.equal(model.hpm_head.dataset_prototypes, prototypes)  # the labels reached the head
    torch.testing.assert_close(loss, expected)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize('objective, name', [('hpm', 'hpm_preact_resnet18'), ('base', 'preact_resnet18')])
def test_trades_runs_for_both_objectives(tmp_path, objective, name):
    result = _run(['--output-dir', str(tmp_path / objective), '--max-steps', '2', '--set', 'attack.type=trades',
                   f'train.objective={objective}', f'model.name={name}'] +
                  (['model.hpm={}'] if objective == 'base' else []))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)['loss'] for line in (tmp_path / objective / 'log.jsonl').read_text().splitlines()
              if 'loss' in json.loads(line)]
    assert losses and all(l == l and l < 50 for l in losses)  # finite
    model = timm.create_model(f"local-dir:{tmp_path / objective / 'final'}", pretrained=True)
    assert timm_hpm.is_hpm_model(model) == (objective == 'hpm')


@pytest.mark.parametrize('max_steps, epochs, epochs_run', [(4, 3, 1), (7, 1, 2)])
def test_max_steps_is_the_budget_and_carries_the_whole_lr_schedule(tmp_path, max_steps, epochs, epochs_run):
    """max_steps is the step budget whatever train.epochs says (4 optimizer steps per epoch here): a budget shorter
    than the epochs stops early, a longer one runs more epochs (a 600-step budget once stopped at the end of the
    first 429-step epoch), and the cosine schedule anneals over exactly those steps."""
    result = _run(['--output-dir', str(tmp_path / 'r'), '--max-steps', str(max_steps), '--set', 'train.log_every=1',
                   'train.eval_pgd_steps=0', f'train.epochs={epochs}'])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / 'r' / 'log.jsonl').read_text().splitlines()]
    lrs = [r['lr'] for r in records if 'lr' in r]
    assert [r['step'] for r in records if 'lr' in r] == list(range(1, max_steps + 1))
    assert [r['epoch'] for r in records if 'epoch_end' in r] == list(range(epochs_run))
    base_lr = load_config(CONFIG).train.lr
    # timm's cosine in step mode: lr_k = base_lr * (1 + cos(pi k / n)) / 2 after k of n updates
    import math
    expected = [base_lr * (1 + math.cos(math.pi * k / max_steps)) / 2 for k in range(1, max_steps + 1)]
    assert lrs == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_channels_last_changes_only_the_memory_layout(tmp_path, monkeypatch):
    """train.channels_last puts the model and the training batches in NHWC and changes nothing else: the losses
    and the final weights are the default layout's within float rounding. Three input channels: with one, NHWC and
    NCHW strides coincide. L2 PGD: Linf PGD steps along sign(grad), which can turn a rounding difference in a
    near-zero gradient into another adversarial example (and a loss that differs in the third digit)."""
    import timm_hpm.train
    from _recipes import load_recipe
    finetune = load_recipe('finetune')
    training_loss = timm_hpm.train.training_loss
    seen = []

    def spy(model, x, x_adv, y, cfg):  # the layouts each training step sees: (option, batch NHWC, weights NHWC)
        nhwc = torch.channels_last
        seen.append((cfg.train.channels_last, x.is_contiguous(memory_format=nhwc) and not x.is_contiguous(),
                     all(p.is_contiguous(memory_format=nhwc) for p in model.parameters() if p.ndim == 4)))
        return training_loss(model, x, x_adv, y, cfg)
    monkeypatch.setattr(timm_hpm.train, 'training_loss', spy)
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with 2 threads the two layouts' kernels round differently: losses 2e-4 apart
    try:
        for channels_last in (False, True):
            out = tmp_path / f'channels_last_{channels_last}'
            finetune.main(['--config', str(CONFIG), '--output-dir', str(out), '--max-steps', '3', '--device', 'cpu',
                           '--set', 'model.model_args={in_chans: 3, img_size: 8, num_classes: 4}', 'attack.norm=L2',
                           'attack.eps=0.5', f'train.channels_last={str(channels_last).lower()}'])  # saved at step 2
            runs[channels_last] = out
    finally:
        torch.set_num_threads(threads)
    assert seen == [(False, False, False)] * 3 + [(True, True, True)] * 3
    losses = {k: [r['loss'] for r in map(json.loads, (out / 'log.jsonl').read_text().splitlines()) if 'loss' in r]
              for k, out in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    plain, nhwc = (load_file(str(runs[k] / 'final' / 'model.safetensors')) for k in (False, True))
    assert plain.keys() == nhwc.keys()
    for name in plain:
        torch.testing.assert_close(nhwc[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('objective', ['hpm', 'base'])
def test_per_image_attack_is_pgd_on_every_image_alone(objective):
    """attack.per_image: the training examples are PGD run on each image as its own batch of one (the dynamic
    head's batch prototypes from that image only), not on the whole batch; for the batch-independent base model
    (the control) the two are the same attack."""
    from timm_hpm.attacks import pgd
    from timm_hpm.train import build_model
    from timm_hpm.train.engine import adversarial_examples
    plain = {'model.name': 'preact_resnet18', 'model.hpm': {}} if objective == 'base' else {}
    overrides = {'train.objective': objective, 'attack.random_start': False, 'attack.steps': 3, **plain}
    cfg = load_config(CONFIG, {**overrides, 'attack.per_image': True})
    whole_cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 4
    g = torch.Generator()
    per_image = adversarial_examples(model, x, y, cfg, g)
    whole = adversarial_examples(model, x, y, whole_cfg, g)
    assert model.training  # the attack put it back
    model.eval()
    alone = torch.cat([pgd(model, x[i:i + 1], y[i:i + 1], cfg.eps, cfg.step_size, 3, 'Linf', random_start=False)
                       for i in range(len(x))])
    torch.testing.assert_close(per_image, alone)
    if objective == 'hpm':
        assert (per_image - whole).abs().amax() > 1e-3  # the batch changes the dynamic head's attack
    else:
        torch.testing.assert_close(per_image, whole)
