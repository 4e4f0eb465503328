"""timm_hpm.benchmark and its batch-dependence test, against truth: a batch-independent module changes nothing,
modules using batch statistics (plain, HPM's dynamic head, test-batch-statistics batch norm) are flagged, the base's
figure is recipes/evaluate.py's, bad inputs are refused with what to do. Tiny models, few images, small budgets."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _recipes import load_recipe
from conftest import needs_fashion_mnist

import timm_hpm
from timm_hpm.benchmark import BenchmarkResult, format_report
from timm_hpm.cli.benchmark_table import table as benchmark_table
from timm_hpm.eval.batch_dependence import batch_dependence
from timm_hpm.layers.batch_stats_norm import BatchStatsNorm2d, NormStatsView, norm_stats, set_norm_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(autoattack_iters=2, square_queries=5, apgd_iters=2, n_target_classes=1, target_n_target_classes=1,
            combine_rounds=1, poison_steps=2)


class PerImage(nn.Module):
    """Batch-independent by construction: elementwise products and per-row sums, no batch-sized kernels."""

    def __init__(self, in_features=3 * 8 * 8, num_classes=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=torch.Generator().manual_seed(0)))
        self.num_classes = num_classes

    def forward(self, x):
        return (x.flatten(1)[:, None, :] * self.weight[None]).sum(-1)


class BatchStats(PerImage):
    """The same, on features normalised with the statistics of the batch (as batch norm in training mode)."""

    def forward(self, x):
        return super().forward(F.batch_norm(x, None, None, training=True) * 0.2 + 0.5)


class Tiny(nn.Module):
    """A small conv net (batch-independent in eval mode; its convolutions may round differently by batch size)."""

    def __init__(self, norm=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = norm or nn.Identity()
        self.fc = nn.Linear(4 * 6 * 6, 4)
        self.num_classes = 4

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


# ------------------------------------------------------------------------------------------ the batch-dependence test

def test_a_batch_independent_module_gives_exactly_zero_changes():
    x, y = _data()
    r = batch_dependence(_model(PerImage), x, y, batch_size=8)
    assert r['verdict'] == 'batch-independent' and not r['batch_dependent'] and r['deterministic']
    assert set(r['tests']) == {'repeat', 'batch_size_1', 'batch_size_32', 'permuted', 'class_sorted', 'other_members'}
    for name, t in r['tests'].items():
        assert t['changed'] == 0 and t['fraction_changed'] == 0.0 and t['max_logit_change'] == 0.0, name
        assert t['compared'] == (12 if name == 'other_members' else 24)
    conv = batch_dependence(_model(Tiny), x, y, batch_size=8)  # kernels may round by batch size: within tolerance
    assert conv['verdict'] == 'batch-independent'
    assert all(t['changed'] == 0 and t['max_logit_change'] <= conv['tolerance'] for t in conv['tests'].values())


def test_a_module_using_batch_statistics_is_flagged_by_every_test():
    x, y = _data()
    r = batch_dependence(_model(BatchStats), x, y, batch_size=8)
    assert r['verdict'] == 'batch-dependent' and r['batch_dependent'] and r['deterministic']
    assert r['reasons'] == ['batch_size_1', 'batch_size_32', 'permuted', 'class_sorted', 'other_members']
    assert all(r['tests'][k]['max_logit_change'] > 100 * r['tolerance'] for k in r['reasons'])
    assert not r['tests']['repeat']['dependent'] and r['tests']['repeat']['max_logit_change'] == 0.0
    assert any(r['tests'][k]['changed'] > 0 for k in r['reasons'])
    # without labels there is no class-sorted test; a single batch still changes when its other members do
    single = batch_dependence(_model(BatchStats), x[:8], None, batch_size=8)
    assert 'class_sorted' not in single['tests'] and single['tests']['other_members']['dependent']


def test_a_nondeterministic_model_is_told_apart():
    class Noisy(PerImage):
        def forward(self, x):
            return super().forward(x) + torch.randn(x.shape[0], self.num_classes)
    x, y = _data()
    r = batch_dependence(_model(Noisy), x, y, batch_size=8)
    assert r['verdict'] == 'nondeterministic' and not r['deterministic']
    with pytest.raises(ValueError, match='randomised model needs an attack with expectation'):
        timm_hpm.benchmark(_model(Noisy), dataset=(x, y), eps=0.1, n_examples=8, batch_size=8, budget=TINY,
                           progress=False)


@needs_fashion_mnist
def test_the_base_is_independent_and_the_hpm_model_dependent_on_fashion_mnist():
    from timm_hpm.data import load_eval_tensors
    x, y = load_eval_tensors('fashion_mnist', 64)
    base = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True).eval()
    r = batch_dependence(base, x, y, batch_size=32)
    assert r['verdict'] == 'batch-independent' and all(t['changed'] == 0 for t in r['tests'].values())
    hpm = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).eval()
    r = batch_dependence(hpm, x, y, batch_size=32)
    assert r['verdict'] == 'batch-dependent' and r['tests']['batch_size_1']['max_logit_change'] > 0.1
    hpm.hpm_head.mode = 'static'  # the l2 head alone: batch-independent
    assert batch_dependence(hpm, x, y, batch_size=32)['verdict'] == 'batch-independent'


def test_a_timm_model_is_tested_in_its_normalised_view_and_must_be_in_eval_mode():
    model = timm.create_model('test_resnet', num_classes=4)
    x = torch.rand(6, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='call model.eval'):
        batch_dependence(model, x, batch_size=3)
    model.eval()
    assert batch_dependence(timm_hpm.attacks.normalized_view(model), x, batch_size=3)['verdict'] == \
        'batch-independent'


@pytest.mark.parametrize('bad, message', [
    (torch.rand(3, 8, 8), 'add the batch dimension: x.unsqueeze'),
    (torch.rand(2, 192), 'reshape it to'),
    (torch.rand(4, 3, 8, 8) * 255, 'put the normalisation inside the model'),
    (torch.full((4, 3, 8, 8), float('nan')), 'drop or repair those images'),
    ((torch.rand(4, 3, 8, 8) * 255).to(torch.uint8), r'x.float\(\) / 255'),
    ([[0.5]], 'must be a torch.Tensor'),
])
def test_bad_images_get_an_error_that_says_what_to_do(bad, message):
    with pytest.raises(ValueError, match=message):
        batch_dependence(_model(PerImage), bad, batch_size=2)
    x, y = _data(4)
    if isinstance(bad, torch.Tensor) and bad.ndim == 4:
        with pytest.raises(ValueError, match=message):
            timm_hpm.benchmark(_model(PerImage), dataset=(bad, y), eps=0.1, n_examples=4, batch_size=2,
                               progress=False)


def test_bad_labels_outputs_and_arguments_are_refused():
    x, y = _data(4)
    with pytest.raises(ValueError, match=r'y.argmax\(1\)'):
        batch_dependence(_model(PerImage), x, F.one_hot(y, 4), batch_size=2)
    with pytest.raises(ValueError, match='labels must be an integer tensor'):
        batch_dependence(_model(PerImage), x, y.float(), batch_size=2)
    with pytest.raises(ValueError, match='must lie in'):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y + 10), eps=0.1, n_examples=4, progress=False)

    class Tuple(PerImage):
        def forward(self, x):
            return super().forward(x), x
    with pytest.raises(ValueError, match='forward returns the logits only'):
        batch_dependence(_model(Tuple), x, y, batch_size=2)
    with pytest.raises(ValueError, match='give eps'):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y), n_examples=4)
    with pytest.raises(ValueError, match="'corruptions' is not an adversarial"):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y), threat_model='corruptions', eps=0.1)
    with pytest.raises(ValueError, match='unknown budget keys'):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y), eps=0.1, budget={'iters': 1})
    with pytest.raises(ValueError, match='more than the 4 images'):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y), eps=0.1, n_examples=5)
    with pytest.raises(ValueError, match="must start with 'default'"):
        timm_hpm.benchmark(_model(PerImage), dataset=(x, y), eps=0.1, batchings=['single'])


# ----------------------------------------------------------------------------------------------------- benchmark()

def test_a_batch_independent_module_gets_standard_autoattack(tmp_path):
    x, y = _data(8)
    result = timm_hpm.benchmark(_model(PerImage), n_examples=8, dataset=(x, y), threat_model='Linf', eps=0.05,
                                batch_size=4, budget=TINY, out=tmp_path / 'run', progress=False)
    assert isinstance(result, BenchmarkResult) and len(result) == 2
    clean, robust = result
    report = result.report
    assert report['protocol'] == 'autoattack' and report['batch_dependence']['verdict'] == 'batch-independent'
    assert clean == report['evaluation']['clean_acc'] and robust == report['evaluation']['autoattack_acc']
    assert 0.0 <= robust <= clean
    info = json.loads((tmp_path / 'run' / 'model_info.json').read_text())
    assert info['autoattack_acc'] == f'{100 * robust:.2f}' and info['clean_acc'] == f'{100 * clean:.2f}'
    assert 'standard AutoAttack' in info['footnote'] and 'batch-independent' in info['footnote']
    assert info['unreliable'] and 'reduced attack budget' in info['footnote']  # TINY is below full strength
    assert info['authors'].startswith('unknown')  # not credited to the HPM paper
    assert json.loads((tmp_path / 'run' / 'benchmark.json').read_text())['robust_acc'] == robust
    assert '**batch-independent**' in (tmp_path / 'run' / 'benchmark.md').read_text()
    with pytest.raises(FileExistsError, match='never overwritten'):
        timm_hpm.benchmark(_model(PerImage), n_examples=8, dataset=(x, y), eps=0.05, batch_size=4, budget=TINY,
                           out=tmp_path / 'run', progress=False)


def test_a_batch_statistics_module_gets_msa_natural_orders_and_poisoning(tmp_path):
    x, y = _data(12)
    model = _model(BatchStats)
    result = timm_hpm.benchmark(model, n_examples=12, dataset=(x, y), eps=0.05, batch_size=6, budget=TINY,
                                out=tmp_path / 'run', progress=False)
    report = result.report
    assert report['protocol'] == 'msa+poisoning' and report['batch_dependence']['batch_dependent']
    batchings = report['evaluation']['batchings']
    assert list(batchings) == ['default', 'single', 'shuffled', 'class_sorted']
    worst = min([b['realised_acc'] for b in batchings.values()] + [report['poisoning']['worst_untouched_acc']])
    assert result.robust_accuracy == worst == report['worst_case']['acc']
    assert result.robust_accuracy <= batchings['default']['autoattack_acc']  # never above AutoAttack, fixed batches
    assert report['worst_natural_order']['acc'] == min(batchings[b]['realised_acc'] for b in batchings
                                                        if b != 'default')
    assert report['poisoning']['ran'] and report['poisoning']['rows']
    info = json.loads((tmp_path / 'run' / 'model_info.json').read_text())
    assert info['autoattack_acc'] == f'{100 * worst:.2f}' and info['protocol'] == 'msa+poisoning'
    assert 'batch-dependent model' in info['footnote'] and 'poisoning' in info['footnote']
    assert 'HPM' not in info['footnote']  # not an HPM model
    assert 'standard AutoAttack, which re-batches' in format_report(report)


def test_a_killed_benchmark_resumes_to_the_same_result(tmp_path):
    x, y = _data(12)
    first = timm_hpm.benchmark(_model(BatchStats), n_examples=12, dataset=(x, y), eps=0.05, batch_size=6,
                               budget=TINY, out=tmp_path / 'run', progress=False)
    # as after a kill: the final files never written, some batches (MSA units, poisoning batches) not finished
    for name in ('benchmark.json', 'benchmark.md', 'model_info.json'):
        (tmp_path / 'run' / name).unlink()
    units = tmp_path / 'run' / 'attack' / 'units.jsonl'  # the first and last units' lines removed (not the header)
    lines = units.read_text().splitlines(keepends=True)
    units.write_text(''.join(lines[:1] + lines[2:-1]))
    batches = tmp_path / 'run' / 'poison' / 'batches.jsonl'  # the first poisoning batch's line removed
    lines = batches.read_text().splitlines(keepends=True)
    batches.write_text(''.join(lines[:1] + lines[2:]))
    again = timm_hpm.benchmark(_model(BatchStats), n_examples=12, dataset=(x, y), eps=0.05, batch_size=6,
                               budget=TINY, out=tmp_path / 'run', progress=False)
    assert tuple(again) == tuple(first)
    assert again.report['evaluation']['batchings'] == first.report['evaluation']['batchings']
    assert again.report['poisoning']['rows'] == first.report['poisoning']['rows']
    # another model into the same (unfinished) folder is refused
    (tmp_path / 'run' / 'benchmark.json').unlink()
    with pytest.raises(ValueError, match='another model'):
        timm_hpm.benchmark(_model(PerImage), n_examples=12, dataset=(x, y), eps=0.05, batch_size=6, budget=TINY,
                           out=tmp_path / 'run', progress=False)


def test_a_timm_model_is_benchmarked_with_its_normalisation_inside():
    model = timm.create_model('test_resnet', num_classes=4).eval()
    assert model.pretrained_cfg['mean'] != (0.0, 0.0, 0.0)  # an ImageNet-normalised model
    result = timm_hpm.benchmark(model, n_examples=4, dataset='synthetic', eps='4/255', batch_size=4, budget=TINY,
                                progress=False)
    clean, robust = result
    assert 0.0 <= robust <= clean <= 1.0
    assert result.report['protocol'] == 'autoattack' and result.report['model'] == 'test_resnet.r160_in1k'
    with pytest.raises(ValueError, match='call model.eval'):
        timm_hpm.benchmark(model.train(), n_examples=4, dataset='synthetic', eps='4/255', progress=False)


def test_the_hpm_model_gets_msa_through_its_head_views(tmp_path):
    model = timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).eval()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)  # labels the model gets right, so that the attacks have work
    result = timm_hpm.benchmark(model, n_examples=8, dataset=(x, y), eps=0.01, batch_size=4, budget=TINY,
                                batchings=['default', 'single'], out=tmp_path / 'run', progress=False)
    report = result.report
    assert report['batch_dependence']['verdict'] == 'batch-dependent' and report['protocol'] == 'msa+poisoning'
    from timm_hpm.eval.run_header import read_run_settings
    settings = read_run_settings(tmp_path / 'run' / 'attack')  # the runner's own protocol
    assert settings['protocol'] == 'msa' and settings['msa']['surrogates'] == ['fc', 'static', 'soft', 'dynamic']
    stages = set(report['evaluation']['batchings']['default']['per_surrogate_acc'])
    assert 'autoattack' in stages and stages <= {'autoattack', 'fc', 'static', 'soft', 'dynamic', 'combined'}
    assert report['poisoning']['gradient_views'] == ['dynamic', 'soft']
    assert "batchings left out: ['shuffled', 'class_sorted']" in report['reduced_budget']
    info = json.loads((tmp_path / 'run' / 'model_info.json').read_text())
    assert info['autoattack_acc'] == f'{100 * result.robust_accuracy:.2f}' and info['unreliable']


@needs_fashion_mnist
def test_the_base_figure_is_evaluate_recipes_autoattack_figure(tmp_path):
    """Same images, batch size, budget and seed: benchmark() and recipes/evaluate.py --protocol autoattack score
    every image alike."""
    argv = ['--model', 'small_cnn.fmnist_pgdat', '--protocol', 'autoattack', '--dataset', 'fashion_mnist', '--eps',
            '0.1', '--n-examples', '10', '--batch-size', '5', '--autoattack-iters', '3', '--square-queries', '20',
            '--device', 'cpu', '--out', str(tmp_path / 'evaluate')]
    evaluated = load_recipe('evaluate').main(argv)
    base = timm.create_model('small_cnn.fmnist_pgdat', pretrained=True).eval()
    result = timm_hpm.benchmark(base, n_examples=10, dataset='fashion_mnist', eps=0.1, batch_size=5,
                                budget=dict(autoattack_iters=3, square_queries=20), out=tmp_path / 'benchmark',
                                progress=False)
    assert result.report['protocol'] == 'autoattack'
    assert tuple(result) == (evaluated['clean_acc'], evaluated['autoattack_acc'])
    from timm_hpm.eval.unit_store import read_units
    benchmark_units = read_units(tmp_path / 'benchmark' / 'attack')
    for key, theirs in read_units(tmp_path / 'evaluate' / 'attack').items():
        ours = benchmark_units[key]
        assert ours['realised'] == theirs['realised'] and ours['autoattack_own'] == theirs['autoattack_own']
    info = json.loads((tmp_path / 'benchmark' / 'model_info.json').read_text())
    recipe_info = json.loads((tmp_path / 'evaluate' / 'model_info.json').read_text())
    assert info['autoattack_acc'] == recipe_info['autoattack_acc'] and info['clean_acc'] == recipe_info['clean_acc']


# ------------------------------------------------------------------------- test-batch-statistics batch norm (TBN)

def test_batch_stats_norm_trains_as_batch_norm_and_normalises_with_the_test_batch_in_eval():
    torch.manual_seed(0)
    ours, ref = BatchStatsNorm2d(4), nn.BatchNorm2d(4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    assert torch.equal(ours.train()(x), ref.train()(x))
    assert torch.equal(ours.running_mean, ref.running_mean) and torch.equal(ours.running_var, ref.running_var)
    running = ours.running_mean.clone()
    out = ours.eval()(x)
    assert torch.allclose(out, F.batch_norm(x, None, None, ours.weight, ours.bias, True), atol=1e-6)
    assert torch.equal(ours.running_mean, running)  # eval mode never updates the running statistics
    assert torch.allclose(ours(x[:3]), F.batch_norm(x[:3], None, None, ours.weight, ours.bias, True), atol=1e-6)
    ours.stats = 'running'
    assert torch.equal(ours(x), ref.eval()(x))


def test_a_batch_stats_network_is_dependent_and_its_running_view_independent(tmp_path):
    x, y = _data(12)
    model = _model(Tiny, BatchStatsNorm2d(4))
    assert norm_stats(model) == 'batch'
    assert batch_dependence(model, x, y, batch_size=6)['verdict'] == 'batch-dependent'
    running = NormStatsView(model, 'running')
    assert not running.training and batch_dependence(running, x, y, batch_size=6)['verdict'] == 'batch-independent'
    assert norm_stats(model) == 'batch'  # the view restores the model's own setting
    report = timm_hpm.benchmark(model, n_examples=12, dataset=(x, y), eps=0.05, batch_size=6, budget=TINY,
                                batchings=['default'], progress=False).report
    assert report['attacked_through'] == ['running_stats', 'the target itself']  # its running-statistics view
    assert report['surrogates'] == {'running_stats': {'batch_dependent': False}}
    set_norm_stats(model, 'running')
    assert timm_hpm.benchmark(model, n_examples=12, dataset=(x, y), eps=0.05, batch_size=6, budget=TINY,
                              progress=False).report['protocol'] == 'autoattack'
    with pytest.raises(ValueError, match='stats must be one of'):
        set_norm_stats(model, 'test')


def test_the_tbn_family_in_a_fresh_process():
    """``import timm_hpm`` registers tbn_small_cnn (checked in a fresh process, so nothing else imported it first): its
    eval mode uses test-batch statistics, norm_stats='running' the running ones."""
    code = '''
import json, torch, timm
import timm_hpm
from timm_hpm.eval.batch_dependence import batch_dependence
x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
out = {}
for stats in ('batch', 'running'):
    m = timm.create_model('tbn_small_cnn', norm_stats=stats).eval()
    out[stats] = batch_dependence(m, x, batch_size=8)['verdict']
m = timm.create_model('tbn_small_cnn', features_only=True).eval()
out['features'] = [tuple(f.shape[1:]) for f in m(x)]
print(json.dumps(out))
'''
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['batch'] == 'batch-dependent' and out['running'] == 'batch-independent'
    assert out['features'] == [[32, 24, 24], [64, 8, 8], [64, 4, 4]]


# ------------------------------------------------------------------------------------------------------ the recipe

def test_the_recipe_writes_the_report_and_refuses_a_finished_folder(tmp_path, capsys):
    from timm_hpm.cli import benchmark as recipe  # recipes/benchmark.py runs its cli()
    out = tmp_path / 'bench'
    argv = ['--model', 'small_cnn', '--no-pretrained', '--dataset', 'synthetic', '--eps', '0.05', '--n-examples',
            '6', '--batch-size', '3', '--detection-examples', '6', '--autoattack-iters', '2', '--square-queries',
            '5', '--device', 'cpu', '--out', str(out)]
    result = recipe.main(argv)
    report = json.loads((out / 'benchmark.json').read_text())
    assert report['robust_acc'] == result.robust_accuracy and report['protocol'] == 'autoattack'
    assert report['command'].startswith('python -m timm_hpm.cli.benchmark --model small_cnn')  # called from Python
    assert json.loads((out / 'model_info.json').read_text())['protocol'] == 'autoattack'
    assert 'Protocol: **autoattack**' in capsys.readouterr().out
    before = (out / 'benchmark.json').read_bytes()
    with pytest.raises(SystemExit, match='never overwritten'):
        recipe.main(argv)
    assert (out / 'benchmark.json').read_bytes() == before
    with pytest.raises(SystemExit, match='--norm-stats: SmallCNN has no BatchStatsNorm2d'):
        recipe.main(argv[:-1] + [str(tmp_path / 'other'), '--norm-stats', 'running'])


def test_the_table_recipe_reads_finished_benchmarks_and_updates_a_section(tmp_path):
    x, y = _data(12)
    for name, cls in (('plain', PerImage), ('stats', BatchStats)):
        timm_hpm.benchmark(_model(cls), n_examples=12, dataset=(x, y), eps=0.05, batch_size=6, budget=TINY,
                           model_name=name, out=tmp_path / name, progress=False)
    table = benchmark_table([tmp_path / 'plain', tmp_path / 'stats'])
    plain, stats = [line for line in table.splitlines() if line.startswith('| `')]
    assert 'batch-independent' in plain and 'AutoAttack (standard)' in plain
    assert 'batch-dependent' in stats and 'MSA + natural orders + poisoning' in stats
    report = json.loads((tmp_path / 'stats' / 'benchmark.json').read_text())
    assert f"**{100 * report['robust_acc']:.1f}%**" in stats and stats.endswith('| reduced |')
    readme = tmp_path / 'README.md'
    readme.write_text('a\n<!-- benchmark-table:start -->\nold\n<!-- benchmark-table:end -->\nb\n')
    load_recipe('benchmark_table').main([str(tmp_path / 'plain'), str(tmp_path / 'stats'), '--update', str(readme)])
    assert table in readme.read_text() and 'old' not in readme.read_text()
    timm_hpm.benchmark(_model(PerImage), n_examples=8, dataset=(x, y), eps=0.05, batch_size=4, budget=TINY,
                       out=tmp_path / 'other', progress=False)
    with pytest.raises(SystemExit, match='differ in'):
        load_recipe('benchmark_table').table([tmp_path / 'plain', tmp_path / 'other'])
