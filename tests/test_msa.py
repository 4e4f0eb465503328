"""MSA and the AutoAttack adapter against truth: a linear HPM head whose Linf robust accuracy has a closed form,
a gradient-masking toy, a batch-dependent toy that fools AutoAttack's own bookkeeping, the ordering of the
figures, resume after a failure, and bad input."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm_hpm
from timm_hpm.attacks import apgd
from timm_hpm.eval import MSAConfig, ModelView, attack_batch, evaluate, format_table, hpm_mode, make_autoattack
from timm_hpm.eval import run_folder as run_folder_module
from timm_hpm.eval import runner as runner_module
from timm_hpm.eval import unit_store
from timm_hpm.runfiles import FolderInUse

from _units import entries, units as finished_units, write_entries

FAST = dict(apgd_iters=20, autoattack_iters=20, square_queries=200, n_target_classes=3)
D, K = 12, 4


def linear_hpm(seed=0):
    """A 4-class HPM head on flattened 1x1xD images with alpha=1: the dynamic head equals the static l2 head,
    whose logit differences are linear in x, so the exact Linf robust accuracy is known."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Flatten(), nn.Linear(D, K))
    model = timm_hpm.convert_to_hpm(base, alpha=1.0, gamma_init=1.0)
    with torch.no_grad():
        model.hpm_head.dataset_prototypes.copy_(0.5 + 0.2 * torch.randn(K, D, generator=g))
        model.hpm_head.weight.copy_(torch.randn(K, D, generator=g))
        model.hpm_head.prototypes_initialized.fill_(True)
    return model.eval()


def linear_truth(mu, x, y, eps):
    """Robust iff for every j != y: 2 x.(mu_y - mu_j) - |mu_y|^2 + |mu_j|^2 > eps * 2 |mu_y - mu_j|_1."""
    x = x.flatten(1)
    robust = torch.ones(len(y), dtype=torch.bool)
    for j in range(K):
        diff = mu[y] - mu[j]
        margin = 2 * (x * diff).sum(1) - (mu[y] ** 2).sum(1) + (mu[j] ** 2).sum()
        robust &= (y == j) | (margin > eps * 2 * diff.abs().sum(1))
    return robust


def linear_problem(n=240, eps=0.03, seed=0):
    model = linear_hpm(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = 0.35 + 0.3 * torch.rand(n, 1, 1, D, generator=g)  # interior: the [0, 1] box never binds at this eps
    with torch.no_grad():
        model.hpm_head.mode = 'static'
        y = model(x).argmax(1)
        model.hpm_head.mode = 'dynamic'
    return model, x, y, linear_truth(model.hpm_head.dataset_prototypes, x, y, eps)


@pytest.mark.parametrize('protocol', ['autoattack', 'msa'])
def test_linear_head_reaches_closed_form(tmp_path, protocol):
    eps = 0.03
    model, x, y, truth = linear_problem(eps=eps)
    assert 0.2 < truth.float().mean() < 0.9  # a non-trivial problem
    result = evaluate(model, x, y, MSAConfig(eps=eps, **FAST), tmp_path, protocol=protocol, batch_size=60,
                      progress=False)
    got = result['msa_acc'] if protocol == 'msa' else result['autoattack_acc']
    assert abs(got - float(truth.float().mean())) <= 1 / len(y)
    assert result['clean_acc'] == 1.0


class MaskedLinear(nn.Module):
    """The forward of a linear model, with no input gradient (a hard, STE-like step would do the same)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.flatten(1).detach()) + 0.0 * x.flatten(1)[:, :1]


class Flat(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.flatten(1))


def centred_linear():
    """Linear with the decision regions meeting near the centre of the data (balanced classes)."""
    linear = nn.Linear(D, K)
    with torch.no_grad():
        linear.bias.copy_(-linear.weight @ torch.full((D,), 0.5))
    return linear


def test_gradient_masking_is_seen_through():
    torch.manual_seed(0)
    linear = centred_linear()
    x = 0.35 + 0.3 * torch.rand(200, 1, 1, D)
    with torch.no_grad():
        y = linear(x.flatten(1)).argmax(1)
    eps = 0.015
    w, b = linear.weight.detach(), linear.bias.detach()
    truth = torch.ones(len(y), dtype=torch.bool)
    for j in range(K):
        diff = w[y] - w[j]
        truth &= (y == j) | ((x.flatten(1) * diff).sum(1) + b[y] - b[j] > eps * diff.abs().sum(1))
    target = ModelView(MaskedLinear(linear), batch_dependent=False)
    whitebox = (target(apgd(target, x, y, eps, n_iter=20)).argmax(1) == y).float().mean()
    # White-box APGD on the masked model moves only by its random start: a gross overestimate.
    assert whitebox > truth.float().mean() + 0.15
    cfg = MSAConfig(eps=eps, autoattack=False, **{k: v for k, v in FAST.items() if k != 'square_queries'})
    result = attack_batch(target, {'smooth': ModelView(Flat(linear), batch_dependent=False)}, x, y, cfg, seed=0,
                          num_classes=K)
    assert abs(sum(result['realised']) - int(truth.sum())) <= 1
    assert 0.1 * len(y) < int(truth.sum()) < 0.9 * len(y)  # a non-trivial problem


class BatchSizeSensitive(nn.Module):
    """Linear on a full batch of ``full`` images; on any smaller batch every prediction is shifted (wrong)."""

    def __init__(self, linear, full):
        super().__init__()
        self.linear, self.full = linear, full

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits if x.shape[0] >= self.full else logits.roll(1, dims=1)


def test_autoattack_own_accuracy_is_not_trusted_for_batch_dependent_models(tmp_path):
    torch.manual_seed(1)
    linear = centred_linear()
    n = 64
    x = 0.35 + 0.3 * torch.rand(n, 1, 1, D)
    with torch.no_grad():
        y = linear(x.flatten(1)).argmax(1)
    model = BatchSizeSensitive(linear, full=n).eval()
    eps = 0.01
    attacks = ['apgd-ce', 'apgd-t']
    adversary = make_autoattack(model, eps, version='custom', attacks=attacks, num_classes=K, n_iter=20, seed=0)
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=n)
    own = float((y_adv == y).float().mean())  # AutoAttack's own bookkeeping (sub-batches of robust points)
    with torch.no_grad():
        fixed_batch_truth = float((model(x_adv).argmax(1) == y).float().mean())
    assert own < fixed_batch_truth - 0.3  # AutoAttack's own figure is wrong for this model
    cfg = MSAConfig(eps=eps, autoattack_version='custom', autoattack_attacks=attacks, autoattack_iters=20)
    ours = attack_batch(ModelView(model, batch_dependent=True), {}, x, y, cfg, seed=0, num_classes=K)
    assert sum(ours['candidates']['autoattack']) / n == fixed_batch_truth  # ours: the same images, scored whole
    assert sum(ours['autoattack_own']) / n == own  # AutoAttack's own verdict is kept beside, for the comparison


def small_hpm(seed=0, n=48):
    torch.manual_seed(seed)
    model = timm_hpm.convert_to_hpm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, K)))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model.hpm_head.fc_forward(feats).argmax(1)
        model.hpm_head.init_prototypes_([(feats, y)])
    return model.eval(), x, y


def test_msa_worst_case_below_every_surrogate_and_autoattack(tmp_path):
    model, x, y = small_hpm(n=24)
    cfg = MSAConfig(eps=0.05, **FAST)
    result = evaluate(model, x, y, cfg, tmp_path, protocol='msa', batch_size=8,
                      batchings=('default', 'single', 'shuffled'), progress=False)
    for batching in result['batchings'].values():
        assert batching['realised_acc'] <= min(batching['per_surrogate_acc'].values()) + 1e-9
        assert batching['realised_acc'] <= batching['autoattack_acc']
        assert batching['union_acc'] <= batching['realised_acc']
        assert batching['realised_acc'] <= batching['clean_acc']
    assert result['msa_acc'] == min(b['realised_acc'] for b in result['batchings'].values())
    assert result['msa_acc'] <= result['autoattack_acc']
    assert result['msa_union_acc'] <= result['msa_acc']
    assert result['passes']['backward_images'] > 0
    assert result['per_surrogate_acc']['autoattack'] == result['autoattack_acc']


def test_each_stage_records_its_cost(tmp_path):
    """A unit records each stage's backward images (they add up to the unit's, the clean forward has none) and
    seconds; stage_breaks sums them over the units, and says None for a run with a unit from before they were
    recorded."""
    from timm_hpm.eval.results import stage_breaks
    model, x, y = small_hpm(n=16)
    evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), tmp_path, protocol='msa', batch_size=8, progress=False)
    for unit in finished_units(tmp_path):
        stages = unit['stage_passes']
        assert list(stages)[0] == 'autoattack' and list(stages)[-1] == 'combined'
        assert sum(s['backward_images'] for s in stages.values()) == unit['passes']['backward_images']
        assert stages['autoattack']['backward_images'] > 0 and stages['combined']['backward_images'] == 0
        assert set(unit['stage_seconds']) == set(stages) and all(t >= 0 for t in unit['stage_seconds'].values())
    parts = stage_breaks(tmp_path)
    assert sum(parts['stage_backward_images'].values()) == parts['backward_images']
    lines = entries(tmp_path)
    del lines[0]['stage_passes']
    write_entries(tmp_path, lines)
    assert stage_breaks(tmp_path)['stage_backward_images'] is None


def _strip(result):
    return {k: v for k, v in result.items() if k not in ('attack_seconds', 'machine')}


def test_resume_after_failure_gives_the_same_result(tmp_path, monkeypatch):
    model, x, y = small_hpm()
    cfg = MSAConfig(eps=0.05, **FAST)
    reference = evaluate(model, x, y, cfg, tmp_path / 'ref', batch_size=16, progress=False)
    real = runner_module.attack_batch
    calls = {'n': 0}

    def failing(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 2:
            raise KeyboardInterrupt('killed')
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, 'attack_batch', failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, cfg, tmp_path / 'run', batch_size=16, progress=False)
    assert len(finished_units(tmp_path / 'run')) == 1
    monkeypatch.setattr(runner_module, 'attack_batch', real)
    resumed = evaluate(model, x, y, cfg, tmp_path / 'run', batch_size=16, progress=False)
    assert json.dumps(_strip(resumed), sort_keys=True) == json.dumps(_strip(reference), sort_keys=True)


def test_a_batch_stopped_between_stages_resumes_at_its_next_stage(tmp_path, monkeypatch):
    """A batch stopped in its third stage (static, after AutoAttack and fc) restarts from its stage checkpoint:
    the earlier stages are not run again, and the unit (every candidate, the realised batch, the union, the
    passes of each stage and in all) is the uninterrupted run's. A checkpoint of other images is ignored."""
    from timm_hpm.eval.msa_stages import SurrogateStage
    from timm_hpm.eval.run_folder import StageCheckpoint
    model, x, y = small_hpm(n=16)
    cfg = MSAConfig(eps=0.05, **FAST)
    run = dict(protocol='msa', batch_size=16, batchings=('default',), progress=False)
    evaluate(model, x, y, cfg, tmp_path / 'ref', **run)
    real, ran, stop = SurrogateStage.run, [], ['static']

    def stopped_in_static(stage, ctx):
        ran.append(stage.name)
        if stage.name in stop:
            stop.clear()
            raise KeyboardInterrupt('killed')
        return real(stage, ctx)
    monkeypatch.setattr(SurrogateStage, 'run', stopped_in_static)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, cfg, tmp_path / 'run', **run)
    unit = unit_store.adversarial_path(tmp_path / 'run', 'default', 0)
    checkpoint = StageCheckpoint(unit, run_folder_module.data_fingerprint(x, y))
    assert finished_units(tmp_path / 'run') == [] and checkpoint.load()[1]['done'] == ['autoattack', 'fc']
    assert StageCheckpoint(unit, 'other images').load() is None
    ran.clear()
    evaluate(model, x, y, cfg, tmp_path / 'run', **run)
    assert ran == ['static', 'soft', 'dynamic'] and not checkpoint.path.exists()

    def stable(run):
        return {k: v for k, v in finished_units(run)[0].items() if k not in ('seconds', 'stage_seconds')}
    reference = stable(tmp_path / 'ref')
    assert stable(tmp_path / 'run') == reference and reference['passes']['backward_images'] > 0


def test_resume_refuses_other_settings(tmp_path):
    model, x, y = small_hpm()
    evaluate(model, x[:16], y[:16], MSAConfig(eps=0.05, **FAST), tmp_path, batch_size=16, progress=False)
    with pytest.raises(ValueError, match='other settings'):
        evaluate(model, x[:16], y[:16], MSAConfig(eps=0.1, **FAST), tmp_path, batch_size=16, progress=False)


def test_extending_a_smaller_run_equals_the_larger_run_from_scratch(tmp_path, monkeypatch):
    model, x, y = small_hpm()
    cfg = MSAConfig(eps=0.05, **FAST)
    batchings = ('default', 'shuffled')
    reference = evaluate(model, x, y, cfg, tmp_path / 'ref', batch_size=16, batchings=batchings, progress=False)
    evaluate(model, x[:32], y[:32], cfg, tmp_path / 'small', batch_size=16, batchings=batchings, progress=False)
    evaluate(model, x[:16], y[:16], cfg, tmp_path / 'default_only', batch_size=16, progress=False)
    real, calls = runner_module.attack_batch, []
    monkeypatch.setattr(runner_module, 'attack_batch', lambda *a, **k: calls.append(1) or real(*a, **k))
    grown = evaluate(model, x, y, cfg, tmp_path / 'grown', batch_size=16, batchings=batchings, progress=False,
                     extend_from=[tmp_path / 'default_only', tmp_path / 'small'])
    assert json.dumps(_strip(grown), sort_keys=True) == json.dumps(_strip(reference), sort_keys=True)
    # default batches 0 and 1 cover the same examples in both runs; a 32-image shuffle is another permutation
    assert len(calls) == 1 + 3
    calls.clear()  # a run of more batchings reuses the default batches of a default-only run
    evaluate(model, x[:16], y[:16], cfg, tmp_path / 'more_batchings', batch_size=16, batchings=batchings,
             progress=False, extend_from=[tmp_path / 'default_only'])
    assert len(calls) == 1
    calls.clear()  # a larger run's batches are reused one by one, when their images are provably the same
    evaluate(model, x[:16], y[:16], cfg, tmp_path / 'from_larger', batch_size=16, batchings=batchings,
             progress=False, extend_from=[tmp_path / 'ref'])
    assert len(calls) == 1
    calls.clear()
    evaluate(model, 1 - x[:16], y[:16], cfg, tmp_path / 'other_images', batch_size=16, progress=False,
             extend_from=[tmp_path / 'ref'])
    assert len(calls) == 1


def test_extending_refuses_another_model_other_settings_or_other_images(tmp_path):
    model, x, y = small_hpm()
    cfg = MSAConfig(eps=0.05, **FAST)
    evaluate(model, x[:16], y[:16], cfg, tmp_path / 'small', batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"differ in \['msa'\]"):
        evaluate(model, x, y, MSAConfig(eps=0.1, **FAST), tmp_path / 'a', batch_size=16, progress=False,
                 extend_from=[tmp_path / 'small'])
    with pytest.raises(ValueError, match='first 16 images differ'):
        evaluate(model, x.flip(0), y.flip(0), cfg, tmp_path / 'b', batch_size=16, progress=False,
                 extend_from=[tmp_path / 'small'])
    with pytest.raises(FileNotFoundError, match='not an evaluation run folder'):
        evaluate(model, x, y, cfg, tmp_path / 'c', batch_size=16, progress=False, extend_from=[tmp_path / 'none'])
    timm_hpm.get_hpm_head(model).mode = 'static'  # same weights, another head: another model
    with pytest.raises(ValueError, match='another model'):
        evaluate(model, x, y, cfg, tmp_path / 'd', batch_size=16, progress=False, extend_from=[tmp_path / 'small'])
    with pytest.raises(ValueError, match='holds a run of another model'):  # resuming is checked the same way
        evaluate(model, x[:16], y[:16], cfg, tmp_path / 'small', batch_size=16, progress=False)


def test_bad_input_fails_before_any_attack(tmp_path):
    model, x, y = small_hpm()
    cfg = MSAConfig(eps=0.05, **FAST)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        evaluate(model, x * 3, y, cfg, tmp_path / 'a', progress=False)
    with pytest.raises(ValueError, match='training mode'):
        evaluate(model.train(), x, y, cfg, tmp_path / 'b', progress=False)
    model.eval()
    with pytest.raises(ValueError, match='needs an HPM model'):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, K)).eval(), x, y, cfg, tmp_path / 'c', progress=False)
    fresh = timm_hpm.convert_to_hpm(nn.Sequential(nn.Flatten(), nn.Linear(64, K))).eval()
    with pytest.raises(ValueError, match='never initialised'):
        evaluate(fresh, x, y, cfg, tmp_path / 'd', progress=False)
    with pytest.raises(ValueError, match='labels'):
        evaluate(model, x, y[:-1], cfg, tmp_path / 'e', progress=False)


class DetachedFlatten(nn.Module):
    """Flattens with no gradient to the input: every white-box surrogate sees zero gradients."""

    def forward(self, x):
        return x.flatten(1).detach() + 0.0 * x.flatten(1)


def test_sanity_checks_pass_on_an_honest_model_and_flag_gradient_masking(tmp_path):
    from timm_hpm.eval.runner import sanity_checks
    eps = 0.03
    model, x, y, _ = linear_problem(n=40, eps=eps)
    cfg = MSAConfig(eps=eps, **FAST)
    honest = sanity_checks(model, x, y, cfg, tmp_path / 'honest', batch_size=20, progress=False)
    assert honest['warnings'] == []
    values = list(honest['robust_acc_by_eps'].values())
    assert values == sorted(values, reverse=True) and values[-1] <= 0.25

    masked = linear_hpm()
    masked[0] = DetachedFlatten()  # same forward, no input gradient
    flagged = sanity_checks(masked.eval(), x, y, MSAConfig(eps=eps, **{**FAST, 'square_queries': 300}),
                            tmp_path / 'masked', batch_size=20, progress=False)
    assert any('gradient masking suspected' in w for w in flagged['warnings'])


# ---------------------------------------------------------------- safe runs (issue #12): lock, corrupt units, modes
_HOLDER = '''
import sys, time
sys.path.insert(0, {tests!r})
from test_msa import FAST, MSAConfig, evaluate, runner_module, small_hpm
real = runner_module.attack_batch
runner_module.attack_batch = lambda *a, **k: time.sleep(120) or real(*a, **k)  # holds the folder for a while
model, x, y = small_hpm()
evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), {run!r}, batch_size=16, progress=False)
'''


def test_a_second_run_into_a_busy_folder_fails_at_once_naming_the_holder(tmp_path):
    """Two independent runs into one folder would both compute every batch: the second is refused at once; once
    the first is killed (kill -9), its lock is gone and the folder resumes."""
    import subprocess
    import sys
    import time
    run = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', _HOLDER.format(tests=str(Path(__file__).parent), run=str(run))],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / 'units.jsonl').exists():  # its header, written under the lock
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read() if holder.poll() else ''
            time.sleep(0.1)
        model, x, y = small_hpm()
        calls = []
        real = runner_module.attack_batch
        runner_module.attack_batch = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            start = time.time()
            with pytest.raises(FolderInUse, match=f'in use by another run \\(pid {holder.pid} '):
                evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), run, batch_size=16, progress=False)
            assert time.time() - start < 10 and calls == []  # at once, before any batch
        finally:
            runner_module.attack_batch = real
    finally:
        holder.kill()
        holder.wait()
    result = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), run, batch_size=16, progress=False)
    assert 0 <= result['msa_acc'] <= result['clean_acc']


def test_a_torn_last_unit_is_recomputed_with_a_warning(tmp_path, monkeypatch, caplog):
    """The units file's last line cut short (what a kill while writing it leaves) is ignored with a warning and its
    batch recomputed; the other unit is kept."""
    model, x, y = small_hpm(n=32)
    cfg = MSAConfig(eps=0.05, **FAST)
    reference = evaluate(model, x, y, cfg, tmp_path, batch_size=16, progress=False)
    path = tmp_path / unit_store.UNITS_FILE
    head, first, second = path.read_text().splitlines()
    path.write_text(f'{head}\n{first}\n{second[:40]}')
    real, calls = runner_module.attack_batch, []
    monkeypatch.setattr(runner_module, 'attack_batch', lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level('WARNING', logger=unit_store.__name__):
        resumed = evaluate(model, x, y, cfg, tmp_path, batch_size=16, progress=False)
    assert len(calls) == 1
    assert any(f'{path}:3' in r.getMessage() and 'computed again' in r.getMessage() for r in caplog.records)
    assert path.read_text().splitlines()[:2] == [head, first] and len(path.read_text().splitlines()) == 3
    assert json.dumps(_strip(resumed), sort_keys=True) == json.dumps(_strip(reference), sort_keys=True)


def test_a_unit_is_never_seen_half_written(tmp_path, monkeypatch):
    """A unit's line counts only once written whole: a run killed while writing it leaves no unit that counts as
    done, and the resume cuts the partial line off before appending."""
    model, x, y = small_hpm(n=16)
    cfg = MSAConfig(eps=0.05, **FAST)
    from timm_hpm import runfiles
    real_write = runfiles.os.write

    def killed(fd, data):
        if b'"batching"' not in bytes(data):  # the header: written whole
            return real_write(fd, data)
        real_write(fd, bytes(data)[:len(data) // 2])
        raise KeyboardInterrupt('killed while writing')

    monkeypatch.setattr(runfiles.os, 'write', killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, cfg, tmp_path, batch_size=16, progress=False)
    monkeypatch.undo()
    assert (tmp_path / unit_store.UNITS_FILE).stat().st_size > 0 and finished_units(tmp_path) == []
    assert evaluate(model, x, y, cfg, tmp_path, batch_size=16, progress=False)['batchings']['default']['batches'] == 1
    assert len(entries(tmp_path)) == 1


def test_autoattack_on_a_batch_dependent_head_warns(tmp_path, caplog):
    model, x, y = small_hpm(n=16)
    cfg = MSAConfig(eps=0.05, **FAST)
    with caplog.at_level('WARNING', logger=runner_module.__name__):
        result = evaluate(model, x, y, cfg, tmp_path / 'dynamic', protocol='autoattack', batch_size=16,
                          progress=False)
    assert any("mode 'dynamic') is not a valid robustness figure" in r.getMessage() for r in caplog.records)
    assert any('not a valid robustness figure' in w for w in result['warnings'])
    assert hpm_mode(model) == 'dynamic'
    caplog.clear()
    with timm_hpm.get_hpm_head(model).using_mode('static'):  # batch-independent: a valid figure, no warning
        assert hpm_mode(model) == 'static'
        result = evaluate(model, x, y, cfg, tmp_path / 'static', protocol='autoattack', batch_size=16,
                          progress=False)
    assert 'warnings' not in result and not caplog.records
    assert hpm_mode(nn.Linear(2, 2)) is None


def test_stages_are_reported_in_the_order_they_ran():
    """eval.md's cumulative stage table follows the run (AutoAttack on the target, then fc, static, soft, dynamic),
    re-aggregated from a committed run's unit files."""
    run = Path(__file__).resolve().parents[1] / 'results' / 'fashion_mnist' / 'eval_hpm_class_sorted_b32_250' / 'attack'
    result = runner_module.aggregate(run)
    assert list(result['per_surrogate_acc']) == ['autoattack', 'fc', 'static', 'soft', 'dynamic']
    table = format_table(result)
    assert table.index('| autoattack |') < table.index('| fc |') < table.index('| dynamic |')


def test_stage_names_and_labels():
    """A candidate's stage is what precedes its slash; stages keep the cascade's order, unknown ones after, sorted."""
    from timm_hpm.eval.stages import candidate_name, candidate_stage, stage_label, stage_order
    names = [candidate_name(None, 'autoattack'), candidate_name('fc', 'apgd-ce'), candidate_name('fc', 'apgd-t1'),
             candidate_name('static', 'autoattack')]
    assert names == ['autoattack', 'fc/apgd-ce', 'fc/apgd-t1', 'static/autoattack']
    assert [candidate_stage(n) for n in names] == ['autoattack', 'fc', 'fc', 'static']
    settings = {'msa': {'surrogates': ['static', 'fc']}}
    assert stage_order(settings, {'fc': 1, 'zz': 2, 'autoattack': 3, 'b': 4}) == ['autoattack', 'fc', 'b', 'zz']
    assert stage_order(settings, ['combined', 'a', 'static']) == ['static', 'combined', 'a']
    assert stage_label('combined') == "combinations of every stage's breaks"
    assert stage_label('autoattack') == 'AutoAttack on the target'
    assert stage_label('fc') == 'APGD-CE/T via fc' and stage_label('fc', 'via') == 'via fc'


def test_stage_breaks_credit_each_stage_with_what_it_added(tmp_path):
    """Two units written as the runner writes them: the gains add up to clean - realised, a candidate the realised
    batch did not take gains nothing but its new breaks are counted, and --n keeps whole units."""
    import json

    from timm_hpm.eval.results import stage_breaks
    unit = {'indices': [0, 1, 2, 3], 'clean': [True, True, True, False], 'union': [False, False, True, False],
            'realised': [False, True, True, False], 'stages': ['autoattack', 'fc/apgd-ce', 'dynamic/apgd-ce'],
            'candidates': {'autoattack': [False, True, True, False], 'fc/apgd-ce': [False, True, True, False],
                           'dynamic/apgd-ce': [True, False, True, False]},  # breaks 1 but loses 0: not taken
            'passes': {'forward_images': 10, 'backward_images': 4}, 'seconds': 1.5}
    unit_store.write_header(tmp_path / unit_store.UNITS_FILE, {'header': {'schema_version': 3, 'settings': {}}})
    unit_store.write_unit(tmp_path, 'default', 0, unit)
    unit_store.write_unit(tmp_path, 'default', 1, dict(unit, indices=[4, 5, 6, 7]))
    parts = stage_breaks(tmp_path)
    assert parts['gain'] == {'autoattack': 2, 'fc': 0, 'dynamic': 0} and parts['new']['dynamic'] == 2
    assert sum(parts['gain'].values()) == parts['clean'] - parts['realised'] == 6 - 4
    assert parts['backward_images'] == 8 and parts['robust'][1] and not parts['robust'][4]
    assert stage_breaks(tmp_path, n=4)['n'] == 4 and stage_breaks(tmp_path, n=7)['n'] == 4


def test_a_run_of_the_earlier_msa_defaults_resumes_with_equivalent_options(tmp_path):
    """settings.json written before MSA v2 (no target_n_target_classes, combine_rounds, surrogate_models) or v3 (no
    score_iterates): resumed with the options that run used it is accepted, with the newer defaults refused."""
    import json
    from dataclasses import replace

    from _units import to_v2
    model, x, y = small_hpm()
    old = MSAConfig(eps=0.05, **FAST, target_n_target_classes=3, combine_rounds=0, score_iterates=False)
    evaluate(model, x[:16], y[:16], old, tmp_path, batch_size=16, progress=False)
    stored = json.loads((to_v2(tmp_path) / 'settings.json').read_text())
    for key in ('target_n_target_classes', 'combine_rounds', 'surrogate_models', 'score_iterates'):
        del stored['msa'][key]
    del stored['schema_version']  # a settings file of those versions: schema 1
    (tmp_path / 'settings.json').write_text(json.dumps(stored))
    evaluate(model, x[:16], y[:16], old, tmp_path, batch_size=16, progress=False)  # resumes: nothing recomputed
    for newer in (dict(target_n_target_classes=9), dict(score_iterates=True)):
        with pytest.raises(ValueError, match='other settings'):
            evaluate(model, x[:16], y[:16], replace(old, **newer), tmp_path, batch_size=16, progress=False)
