"""Publishing: the card generated from results JSON parses with huggingface_hub's ModelCard and carries the
numbers; results measured on other weights are refused (or, when allowed, stated in the card); the repo id is
validated; the push goes through a recording stand-in for HfApi; --dry-run touches no network; an existing
card is not overwritten unless asked; the token is never printed; an offline Hub is a clear error."""
import fnmatch
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _recipes import load_recipe
from huggingface_hub import ModelCard

import timm_hpm
from timm_hpm.cards import render_card
from timm_hpm.hub import CardExistsError, push_folder, save_for_hub

ROOT = Path(__file__).resolve().parents[1]
# A real evaluation run folder (recipes/evaluate.py --protocol msa on the shipped hpm_small_cnn.fmnist_hpm).
SHIPPED_RESULTS = ROOT / 'results' / 'fashion_mnist' / 'eval_hpm_1000' / 'eval.json'


def _result(protocol='msa', **extra):
    base = {'name': 'local-dir:runs/x/final', 'dataset': 'fashion_mnist', 'architecture': 'hpm_small_cnn',
            'protocol': protocol, 'n_examples': 1000, 'clean_acc': 0.8123, 'autoattack_acc': 0.6543,
            'threat_model': 'Linf', 'eps': 0.1, 'batch_size': 128, 'command': 'python recipes/evaluate.py ...',
            'batchings': {'default': {'clean_acc': 0.8123, 'realised_acc': 0.6012, 'union_acc': 0.5901,
                                      'autoattack_acc': 0.6543}},
            'settings': {'msa': {'surrogates': ['fc', 'static', 'soft', 'dynamic']}}}
    if protocol == 'msa':
        base.update(msa_acc=0.6012, msa_union_acc=0.5901)
    base.update(extra)
    return base


def _fingerprint_as_evaluate_does(folder: Path, run: Path) -> None:
    """The header of attack/units.jsonl that recipes/evaluate.py --model local-dir:<folder> --out <run> writes (its
    settings and fingerprints)."""
    from timm_hpm.attacks import normalized_view
    from timm_hpm.eval import model_fingerprint
    model = normalized_view(timm.create_model(f'local-dir:{folder}', pretrained=True)).eval()
    (run / 'attack').mkdir(parents=True)
    header = {'schema_version': 3, 'settings': {'protocol': 'msa'},
              'fingerprint': {'model': model_fingerprint(model), 'data': '0'}}
    (run / 'attack' / 'units.jsonl').write_text(json.dumps({'header': header}) + '\n')


@pytest.fixture()
def run_folder(tmp_path):
    model = timm.create_model('hpm_small_cnn').eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    folder = save_for_hub(model, tmp_path / 'run' / 'final')
    (tmp_path / 'run' / 'config.yaml').write_text('model:\n  name: hpm_small_cnn\n')
    (tmp_path / 'eval.json').write_text(json.dumps(_result()))
    _fingerprint_as_evaluate_does(folder, tmp_path)
    (tmp_path / 'base_eval.json').write_text(json.dumps(_result('autoattack', name='small_cnn', clean_acc=0.83,
                                                                autoattack_acc=0.62)))
    return folder


def test_card_metadata_and_numbers(run_folder):
    config = json.loads((run_folder / 'config.json').read_text())
    base = _result('autoattack', name='small_cnn', clean_acc=0.83, autoattack_acc=0.62)
    text = render_card(_result(), 'timm-hpm/hpm_small_cnn.fmnist', config, base_result=base,
                       training_config='model: {}', base_model='timm-hpm/small_cnn.fmnist', license='mit')
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data['library_name'] == 'timm' and data['license'] == 'mit'
    assert data['base_model'] == 'timm-hpm/small_cnn.fmnist'
    assert data['datasets'] == ['zalando-datasets/fashion_mnist']
    # the model-index holds this model's results only (the Hub lists every entry as this model's): clean and MSA
    metrics = {m['name']: m['value'] for m in data['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Clean accuracy': 81.23, 'Robust accuracy, MSA worst case (Linf, eps=0.1)': 60.12}
    assert '60.12%' in text and 'hf-hub:timm-hpm/hpm_small_cnn.fmnist' in text and 'arXiv:2606.01746' in text
    # the base stays in the text table; no column carries AutoAttack alone on this batch-dependent model
    assert '| base (small_cnn) | 83.00% | 62.00% | AutoAttack (standard) |' in text
    assert '| AutoAttack |' not in text and 'AutoAttack (fixed batches)' not in text
    # without per-image results the verdict gives the figures and says they are unpaired
    assert ('**Compared with its base (60.12% vs 62.00%; not compared image by image): see the table.**'
            in text.split('An HPM')[0])


def test_card_refuses_results_that_do_not_fit(run_folder):
    config = json.loads((run_folder / 'config.json').read_text())
    with pytest.raises(ValueError, match='MSA result'):
        render_card(_result('autoattack'), 'a/b', config)
    with pytest.raises(ValueError, match='different threat models'):
        render_card(_result(), 'a/b', config, base_result=_result('autoattack', eps=0.2))


class RecordingApi:
    def __init__(self, existing_card=False):
        self.calls = []
        self.existing_card = existing_card

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', repo_id, kwargs))

    def file_exists(self, repo_id, filename, **kwargs):
        self.calls.append(('file_exists', repo_id, filename))
        return self.existing_card

    def upload_folder(self, *, repo_id, folder_path, commit_message, allow_patterns=None, **kwargs):
        # what HfApi.upload_folder sends: the files that match allow_patterns (all of them without)
        self.calls.append(('upload_folder', repo_id, sorted(
            p.name for p in Path(folder_path).iterdir()
            if allow_patterns is None or any(fnmatch.fnmatch(p.name, pattern) for pattern in allow_patterns))))
        return 'https://huggingface.co/fake/commit'


def _push_to_hub():
    return load_recipe('push_to_hub')


def _assemble(run_folder, tmp_path, extra=(), results=None, source=None):
    push_to_hub = _push_to_hub()
    args = push_to_hub.parse_args([*(source or ['--run', str(run_folder)]), '--results',
                                   str(results or tmp_path / 'eval.json'),
                                   '--base-results', str(tmp_path / 'base_eval.json'), '--repo-id',
                                   'timm-hpm/hpm_small_cnn.test', '--out', str(tmp_path / 'upload'),
                                   '--cards-dir', str(tmp_path / 'cards'), *extra])
    return push_to_hub.assemble(args)


def test_results_of_other_weights_are_refused_unless_allowed(run_folder, tmp_path):
    """The shipped model's real results with a run folder of other weights: refused, nothing written; allowed
    explicitly, the card says the figures are not verified to be this model's."""
    with pytest.raises(SystemExit, match='measured on another model.*--allow-mismatched-results'):
        _assemble(run_folder, tmp_path, results=SHIPPED_RESULTS)
    assert not (tmp_path / 'upload').exists() and not (tmp_path / 'cards').exists()
    folder = _assemble(run_folder, tmp_path, results=SHIPPED_RESULTS, extra=['--allow-mismatched-results'])
    card = (folder / 'README.md').read_text()
    assert 'not verified to be of this model' in card and 'measured on another model' in card
    assert ModelCard(card).data.to_dict()['model-index'][0]['results'][0]['metrics']  # still a valid card


def test_results_of_these_weights_are_accepted(tmp_path):
    """The shipped model with its own evaluation run: matched through the fingerprint evaluate.py recorded."""
    (tmp_path / 'base_eval.json').write_text(json.dumps(_result('autoattack', name='small_cnn', clean_acc=0.83,
                                                                autoattack_acc=0.62)))
    folder = _assemble(None, tmp_path, results=SHIPPED_RESULTS, source=['--model', 'hpm_small_cnn.fmnist_hpm'])
    card = (folder / 'README.md').read_text()
    assert 'not verified' not in card and '69.00%' in card  # the shipped model's MSA accuracy


def test_paired_comparison_against_hand_counts():
    """Image 1 only the other keeps, images 2 and 3 only the model: +1 of 4 images = +25 points; the exact two-sided
    sign test of 1 vs 2 discordant images is 2 * (C(3,0) + C(3,1)) / 2^3 = 1; the interval from the per-image
    differences (0, -1, 1, 1): mean 0.25, sample sd sqrt(0.91667), SE = sd / 2."""
    from timm_hpm.cards import paired_comparison
    c = paired_comparison({0: True, 1: False, 2: True, 3: True}, {0: True, 1: True, 2: False, 3: False}, 'x')
    half_width = 1.959964 * (0.9166667 ** 0.5) / 2
    assert (c['only_other'], c['only_model'], c['n'], c['difference'], c['p']) == (1, 2, 4, '+25.0', '1')
    assert (c['ci_low'], c['ci_high']) == (f'{100 * (0.25 - half_width):+.1f}', f'{100 * (0.25 + half_width):+.1f}')
    with pytest.raises(ValueError, match='different images'):
        paired_comparison({0: True}, {1: True}, 'x')


def test_card_compares_with_the_base_and_the_budget_matched_control(tmp_path):
    """The shipped model's committed test runs: the control's row and the paired lines against the base and the
    control, counted from the runs' per-image unit files (the counts the README's study section gives). Runs over
    other images are refused."""
    results = ROOT / 'results' / 'fashion_mnist'
    (tmp_path / 'base_eval.json').write_bytes((results / 'eval_base_1000' / 'eval.json').read_bytes())
    folder = _assemble(None, tmp_path, results=results / 'eval_hpm_msa4_1000' / 'eval.json',
                       source=['--model', 'hpm_small_cnn.fmnist_hpm'],
                       extra=['--control-results', str(results / 'eval_control_1000' / 'eval.json')])
    card = (folder / 'README.md').read_text()
    assert '| budget-matched control (small_cnn.fmnist_control) | 79.60% | 70.30% | AutoAttack (standard) |' in card
    assert '| **this model** (hpm_small_cnn.test) | 78.20% | **68.20%** | MSA, worst case over batchings' in card
    # the first lines say it in plain words, from the paired comparison (its interval below 0: less robust)
    assert card.split('# hpm_small_cnn.test\n\n')[1].startswith(
        '**Compared with its base (68.20% vs 70.30%; not compared image by image): see the table; with its '
        'budget-matched control (68.20% vs 70.30%: -2.1 points, 95% CI -3.5 to -0.7, p = 0.0046): less robust '
        'than.**')
    assert ('against the budget-matched control (`small_cnn.fmnist_control`) under AutoAttack: 36 images only it '
            'keeps, 15 only this model keeps, difference\n  -2.1 points (95% CI -3.5 to -0.7), p = 0.0046') in card
    assert 'against the base' not in card  # base_eval.json copied out of its run folder: no per-image results
    metrics = {m['name']: m['value'] for m in ModelCard(card).data.to_dict()['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Clean accuracy': 78.2, 'Robust accuracy, MSA worst case (Linf, eps=0.1)': 68.2}
    assert (folder / 'eval_control.json').is_file()
    with pytest.raises(SystemExit, match='different images'):
        _assemble(None, tmp_path, results=results / 'eval_hpm_msa4_1000' / 'eval.json',
                  source=['--model', 'hpm_small_cnn.fmnist_hpm'],
                  extra=['--control-results', str(results / 'eval_static_250' / 'eval.json')])


def test_card_gives_the_batch_order_figures_of_these_weights_only(run_folder, tmp_path):
    """The shipped model's row of the committed batch-order table (found by its fingerprint) goes into the card:
    the class-sorted figure is what timm's validate.py gives on a class-folder dataset. Another model's table is
    refused."""
    (tmp_path / 'base_eval.json').write_text(json.dumps(_result('autoattack', name='small_cnn', clean_acc=0.83,
                                                                autoattack_acc=0.62)))
    table = ROOT / 'results' / 'fashion_mnist' / 'batch_order_1000' / 'table.json'
    folder = _assemble(None, tmp_path, results=SHIPPED_RESULTS, source=['--model', 'hpm_small_cnn.fmnist_hpm'],
                       extra=['--batch-order', str(table)])
    card = (folder / 'README.md').read_text()
    assert "what timm's `validate.py` gives" in card
    assert '| class_sorted | 79.40% | 72.30% | 75.40% |' in card and '| default | 79.40% | 78.00% | 78.20% |' in card
    assert (folder / 'batch_order.json').is_file()
    with pytest.raises(SystemExit, match='no row measured on these weights'):
        _assemble(run_folder, tmp_path, extra=['--batch-order', str(table)])


def test_card_gives_the_poisoning_figures_of_these_weights_only(run_folder, tmp_path):
    """A real --protocol poison run on the weights being pushed goes into the card (its table and command); the
    same results with other weights are refused."""
    poison_out = tmp_path / 'poison_run'
    done = subprocess.run([sys.executable, str(ROOT / 'recipes' / 'evaluate.py'), '--model', f'local-dir:{run_folder}',
                           '--dataset', 'synthetic', '--eps', '0.1', '--n-examples', '8', '--batch-size', '8',
                           '--protocol', 'poison', '--poison-steps', '2', '--device', 'cpu', '--out', str(poison_out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = _assemble(run_folder, tmp_path, extra=['--poisoning-results', str(poison_out / 'eval.json')])
    card = (folder / 'README.md').read_text()
    assert '### Batching untrusted inputs with trusted ones: batch poisoning' in card
    assert '| 1 of 8 | Linf eps 0.1 |' in card and '| 2 of 8 | unbounded (anywhere in [0, 1]) |' in card
    assert (folder / 'eval_poisoning.json').is_file()
    with pytest.raises(SystemExit, match='measured on another model'):
        _assemble(None, tmp_path, results=SHIPPED_RESULTS, source=['--model', 'hpm_small_cnn.fmnist_hpm'],
                  extra=['--poisoning-results', str(poison_out / 'eval.json')])


def test_results_without_their_run_folder_are_refused(run_folder, tmp_path):
    copied = tmp_path / 'elsewhere' / 'eval.json'
    copied.parent.mkdir()
    copied.write_text((tmp_path / 'eval.json').read_text())
    with pytest.raises(SystemExit, match=r'cannot be matched.*fingerprint.*missing'):
        _assemble(run_folder, tmp_path, results=copied)


@pytest.mark.parametrize('repo_id, message', [('bad repo!!', 'alphanumeric'), ('a/b/c', 'namespace'),
                                              ('noslash', "'<user or organisation>/<name>'")])
def test_repo_id_is_validated_in_dry_runs(run_folder, tmp_path, repo_id, message):
    push_to_hub = _push_to_hub()
    with pytest.raises(SystemExit, match=message):
        push_to_hub.main(['--run', str(run_folder), '--results', str(tmp_path / 'eval.json'), '--repo-id', repo_id,
                          '--out', str(tmp_path / 'upload'), '--cards-dir', str(tmp_path / 'cards'), '--dry-run'])
    assert not (tmp_path / 'upload').exists()


def test_push_uploads_the_right_files(run_folder, tmp_path):
    folder = _assemble(run_folder, tmp_path)
    api = RecordingApi()
    push_folder(folder, 'timm-hpm/hpm_small_cnn.test', api=api)
    assert api.calls[0][0] == 'create_repo'
    uploaded = api.calls[-1]
    assert uploaded[0] == 'upload_folder'
    assert uploaded[2] == ['README.md', 'config.json', 'eval_base.json', 'eval_hpm.json', 'model.safetensors',
                           'training_config.yaml']
    assert (tmp_path / 'cards' / 'hpm_small_cnn.test.md').read_text() == (folder / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert timm_hpm.is_hpm_model(loaded)


def test_existing_card_is_kept_unless_asked(run_folder, tmp_path):
    folder = _assemble(run_folder, tmp_path)
    api = RecordingApi(existing_card=True)
    with pytest.raises(CardExistsError, match='overwrite'):
        push_folder(folder, 'timm-hpm/x', api=api)
    assert not any(c[0] == 'upload_folder' for c in api.calls)
    push_folder(folder, 'timm-hpm/x', api=api, overwrite_card=True)
    assert api.calls[-1][0] == 'upload_folder'


def test_dry_run_touches_no_network_and_never_prints_the_token(run_folder, tmp_path):
    guard = ('import socket\n'
             'def _no(*a, **k): raise AssertionError("network used in a dry run")\n'
             'socket.socket.connect = _no\nsocket.create_connection = _no\n'
             'import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name="__main__")\n')
    env = {'HF_TOKEN': 'hf_supersecret_token_value', 'PATH': '/usr/bin:/bin'}
    result = subprocess.run(
        [sys.executable, '-c', guard, str(ROOT / 'recipes' / 'push_to_hub.py'), '--run', str(run_folder),
         '--results', str(tmp_path / 'eval.json'), '--repo-id', 'timm-hpm/hpm_small_cnn.dry', '--out',
         str(tmp_path / 'dry'), '--cards-dir', str(tmp_path / 'cards'), '--dry-run'],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'nothing sent' in result.stdout and 'README.md' in result.stdout
    assert 'supersecret' not in result.stdout + result.stderr


def test_offline_hub_push_is_a_clear_error(run_folder, tmp_path, monkeypatch):
    folder = _assemble(run_folder, tmp_path)

    def unreachable(*args, **kwargs):
        raise OSError('unreachable')

    monkeypatch.setattr(socket, 'create_connection', unreachable)
    with pytest.raises(ConnectionError, match='unreachable.*ready to push later'):
        push_folder(folder, 'timm-hpm/x')


def test_offline_hub_pretrained_load_fails_within_seconds(monkeypatch):
    import time

    def unreachable(*args, **kwargs):
        raise OSError('unreachable')

    monkeypatch.setattr(socket, 'create_connection', unreachable)
    start = time.time()
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='local-dir'):
        timm.create_model('hpm_preact_resnet18.rb_andriushchenko2020understanding_cifar10', pretrained=True)
    assert time.time() - start < 10


def test_converted_timm_model_saves_as_its_hpm_variant(tmp_path):
    model = timm_hpm.convert_to_hpm(timm.create_model('resnet50', layers=(1, 1, 1, 1)))
    save_for_hub(model, tmp_path / 'r50', model_args={'layers': [1, 1, 1, 1]})
    assert json.loads((tmp_path / 'r50' / 'config.json').read_text())['architecture'] == 'hpm_resnet50'
    loaded = timm.create_model(f"local-dir:{tmp_path / 'r50'}", pretrained=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_help_says_where_the_token_comes_from_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        _push_to_hub().parse_args(['--help'])
    assert done.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    assert '$HF_TOKEN' in text and 'hf auth login' in text and '(default: ' in text
