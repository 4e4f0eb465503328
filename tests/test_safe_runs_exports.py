"""Safe runs, second round (issue #28), the exports: push_to_hub.py never deletes a folder it did not make (finding
1), a dry run leaves the committed hub_cards/ alone (4), a rerun into a finished evaluation rewrites nothing (9),
evaluate.py --checkpoint works with a local-dir: model (10), and every recorded command line is shell-quoted (15).
Everything is written under pytest's tmp_path."""
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _recipes import load_recipe
from conftest import needs_fashion_mnist

import timm_hpm  # noqa: F401  (registers the models)
from timm_hpm.hub import UPLOAD_MANIFEST, push_folder, save_for_hub, unverified_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'results' / 'fashion_mnist'
MSA4 = RESULTS / 'eval_hpm_msa4_1000' / 'eval.json'
SHIPPED = 'hpm_small_cnn.fmnist_hpm'
EVALUATE = ROOT / 'recipes' / 'evaluate.py'
TINY_MSA = ['--dataset', 'synthetic', '--eps', '0.05', '--n-examples', '8', '--batch-size', '8', '--batchings',
            'default', '--surrogates', 'dynamic', '--apgd-iters', '1', '--autoattack-iters', '1', '--square-queries',
            '2', '--n-target-classes', '1', '--target-n-target-classes', '1', '--combine-rounds', '0', '--device',
            'cpu']


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (the lock file of a run aside) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file() and p.name != 'run.lock'}


def _tiny_hpm(seed: int):
    torch.manual_seed(seed)
    model = timm.create_model('hpm_preact_resnet18', in_chans=1, img_size=8, num_classes=4).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    return model


def _evaluate(*args, timeout=600):
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def push_to_hub():
    return load_recipe('push_to_hub')


@pytest.fixture()
def checkout(push_to_hub, tmp_path, monkeypatch):
    """The recipe's checkout played by a copy (its hub_cards/), the working folder: a test of the old behaviour
    writes there, never into the real one."""
    root = tmp_path / 'checkout'
    (root / 'hub_cards').mkdir(parents=True)
    for card in (ROOT / 'hub_cards').iterdir():
        (root / 'hub_cards' / card.name).write_bytes(card.read_bytes())
    monkeypatch.chdir(root)
    return root


def _probe(out: Path, *extra):
    """The issue's command: the shipped model's weights with their committed MSA result, a dry run."""
    return ['--model', SHIPPED, '--results', str(MSA4), '--repo-id', f'timm-hpm/{SHIPPED}', '--dry-run', '--out',
            str(out), *map(str, extra)]


# ---------------------------------------------------------------- finding 1: --out is never deleted
def test_push_to_hub_refuses_an_out_folder_it_did_not_make(push_to_hub, checkout, tmp_path):
    keep = tmp_path / 'keep'
    keep.mkdir()
    (keep / 'thesis.txt').write_text('x\n')
    with pytest.raises(SystemExit, match=r'holds files this script did not write \(thesis\.txt.*new or empty folder'):
        push_to_hub.main(_probe(keep, '--cards-dir', tmp_path / 'cards'))
    assert (keep / 'thesis.txt').read_text() == 'x\n' and [p.name for p in keep.iterdir()] == ['thesis.txt']
    assert not (tmp_path / 'cards').exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.keep')] == []  # no staging folder left


def test_push_to_hub_never_assembles_over_the_run_it_publishes(push_to_hub, checkout, tmp_path):
    """--run R/final --out R (--allow-mismatched-results): refused, the fine-tuning run intact."""
    run = tmp_path / 'R'
    save_for_hub(_tiny_hpm(0), run / 'final')
    (run / 'config.yaml').write_text('model:\n  name: hpm_preact_resnet18\n')
    (run / 'checkpoints' / 'checkpoint_2').mkdir(parents=True)
    (run / 'checkpoints' / 'checkpoint_2' / 'model.safetensors').write_bytes(b'weights')
    before = _snapshot(run)
    with pytest.raises(SystemExit, match='an input of this command; nothing was changed'):
        push_to_hub.main(['--run', str(run / 'final'), '--results', str(MSA4), '--repo-id', 'timm-hpm/x',
                          '--dry-run', '--allow-mismatched-results', '--out', str(run)])
    assert _snapshot(run) == before


def test_an_upload_folder_is_reassembled_replacing_only_its_own_files(push_to_hub, checkout, tmp_path):
    """A folder push_to_hub.py assembled is reassembled in place: its files are replaced (one it no longer writes is
    removed), a file the user added is kept and never uploaded, nor is the manifest."""
    out = tmp_path / 'upload'
    base = RESULTS / 'eval_base_1000' / 'eval.json'
    push_to_hub.main(_probe(out, '--base-results', base))
    manifest = json.loads((out / UPLOAD_MANIFEST).read_text())
    assert 'eval_base.json' in manifest['files'] and manifest['written_by'] == 'recipes/push_to_hub.py'
    (out / 'notes.txt').write_text('mine')
    push_to_hub.main(_probe(out))
    assert (out / 'notes.txt').read_text() == 'mine' and not (out / 'eval_base.json').exists()
    files = json.loads((out / UPLOAD_MANIFEST).read_text())['files']
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ['notes.txt', UPLOAD_MANIFEST])

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            pass

        def file_exists(self, repo_id, filename, **kwargs):
            return False

        def upload_folder(self, *, folder_path, allow_patterns=None, **kwargs):
            self.uploaded = sorted(p.name for p in Path(folder_path).iterdir()
                                   if allow_patterns is None or p.name in allow_patterns)

    api = RecordingApi()
    push_folder(out, 'timm-hpm/x', api=api)
    assert api.uploaded == sorted(files) and 'notes.txt' not in api.uploaded


# ---------------------------------------------------------------- finding 4: a dry run leaves hub_cards/ alone
def test_a_dry_run_writes_no_card_into_the_checkout(push_to_hub, checkout, tmp_path):
    real, played = _snapshot(ROOT / 'hub_cards'), _snapshot(checkout / 'hub_cards')
    out = tmp_path / 'upload'
    push_to_hub.main(_probe(out))  # the probe without --cards-dir
    assert _snapshot(checkout / 'hub_cards') == played and _snapshot(ROOT / 'hub_cards') == real
    assert sorted(p.name for p in checkout.iterdir()) == ['hub_cards']  # nothing else written there either
    card = (out / 'README.md').read_text()
    assert (checkout / 'hub_cards' / f'{SHIPPED}.md').read_text() != card  # the probe's card has other figures


def test_an_explicit_cards_dir_never_replaces_another_card_silently(push_to_hub, checkout, tmp_path):
    """--cards-dir (what build_zoo.py --cards-dir passes): a different card there is kept unless --overwrite-card;
    the same card again is fine."""
    cards = checkout / 'hub_cards'
    committed = (cards / f'{SHIPPED}.md').read_bytes()
    with pytest.raises(SystemExit, match=r'holds another card.*--overwrite-card'):
        push_to_hub.main(_probe(tmp_path / 'upload', '--cards-dir', cards))
    assert (cards / f'{SHIPPED}.md').read_bytes() == committed and not (tmp_path / 'upload').exists()
    push_to_hub.main(_probe(tmp_path / 'upload', '--cards-dir', cards, '--overwrite-card'))
    card = (tmp_path / 'upload' / 'README.md').read_bytes()
    assert (cards / f'{SHIPPED}.md').read_bytes() == card != committed
    push_to_hub.main(_probe(tmp_path / 'upload', '--cards-dir', cards))  # the same card: no refusal
    assert (cards / f'{SHIPPED}.md').read_bytes() == card


def test_build_zoo_writes_its_card_into_the_build_unless_told(tmp_path):
    from timm_hpm.zoo import BuildOptions, load_manifest, plan_steps
    entry = load_manifest(ROOT / 'recipes' / 'zoo.yaml')[SHIPPED]

    def push_step(**options):
        command = plan_steps(entry, BuildOptions(out=tmp_path / 'build', **options))[-1].command
        return command[command.index('--cards-dir') + 1], '--overwrite-card' in command
    assert push_step() == (str(tmp_path / 'build' / 'cards'), False)
    assert push_step(cards_dir=Path('hub_cards')) == ('hub_cards', False)
    assert push_step(cards_dir=Path('hub_cards'), overwrite_card=True) == ('hub_cards', True)
    build_zoo = load_recipe('build_zoo')
    assert build_zoo.parse_args([SHIPPED, '--overwrite-card']).overwrite_card


# ---------------------------------------------------------------- finding 9: finished results are never rewritten
@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    """A local-dir folder of a tiny HPM model, in a path with a space."""
    return save_for_hub(_tiny_hpm(0), tmp_path_factory.mktemp('tiny') / 'my model')


def test_a_rerun_into_a_finished_evaluation_reports_it_and_rewrites_nothing(tiny_dir, tmp_path):
    out = tmp_path / 'my runs' / 'eval'
    argv = ['--model', f'local-dir:{tiny_dir}', *TINY_MSA, '--out', str(out)]
    first = _evaluate(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert {'eval.json', 'eval.md', 'model_info.json', 'log_rank0.txt'} <= set(before)
    again = _evaluate(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'this evaluation is finished' in again.stdout and 'MSA accuracy' in again.stdout
    assert _snapshot(out) == before  # eval.json (wall_seconds, num_processes), eval.md, logs, units: byte for byte
    # finding 15: the recorded command gives the arguments back, spaces and all
    command = json.loads((out / 'eval.json').read_text())['command']
    assert shlex.split(command) == ['python', 'recipes/evaluate.py', *argv]


def test_a_finished_evaluation_with_a_lost_batch_is_refused_not_recomputed(tiny_dir, tmp_path):
    out = tmp_path / 'eval'
    argv = ['--model', f'local-dir:{tiny_dir}', *TINY_MSA, '--out', str(out)]
    assert _evaluate(*argv).returncode == 0
    units = out / 'attack' / 'units.jsonl'  # its first unit's line removed (line 2: line 1 is the header)
    lines = units.read_text().splitlines(keepends=True)
    units.write_text(''.join(lines[:1] + lines[2:]))
    before = _snapshot(out)
    refused = _evaluate(*argv)
    assert refused.returncode != 0 and 'finished results are never recomputed in place' in refused.stderr, \
        refused.stderr[-3000:]
    assert _snapshot(out) == before


def test_a_rerun_into_a_finished_poisoning_run_rewrites_nothing(tiny_dir, tmp_path):
    out = tmp_path / 'poison'
    argv = ['--model', f'local-dir:{tiny_dir}', '--dataset', 'synthetic', '--eps', '0.1', '--n-examples', '8',
            '--batch-size', '8', '--protocol', 'poison', '--poison-steps', '1', '--device', 'cpu', '--out', str(out)]
    assert _evaluate(*argv).returncode == 0
    before = _snapshot(out)
    again = _evaluate(*argv)
    assert again.returncode == 0 and 'this evaluation is finished' in again.stdout, again.stderr[-3000:]
    assert _snapshot(out) == before


@needs_fashion_mnist
def test_rerunning_the_committed_headline_evaluation_rewrites_nothing(tmp_path):
    """The issue's probe on a copy of results/fashion_mnist/eval_hpm_msa4_1000 (wall_seconds 2437.6 on 4
    processes): its own recorded command, into the copy, reports it and leaves every file as it was."""
    out = tmp_path / 'eval_hpm_msa4_1000'
    for path in MSA4.parent.rglob('*'):
        if path.is_file():
            (out / path.relative_to(MSA4.parent)).parent.mkdir(parents=True, exist_ok=True)
            (out / path.relative_to(MSA4.parent)).write_bytes(path.read_bytes())
    before = _snapshot(out)
    recorded = shlex.split(json.loads(MSA4.read_text())['command'])
    argv = recorded[2:recorded.index('--out')] + ['--out', str(out)]
    again = _evaluate(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'this evaluation is finished' in again.stdout
    assert _snapshot(out) == before
    result = json.loads((out / 'eval.json').read_text())
    assert (result['wall_seconds'], result['num_processes']) == (2437.6, 4)


# ---------------------------------------------------------------- finding 10: --checkpoint with a local-dir: model
def test_checkpoint_loads_into_a_local_dir_model(tiny_dir, tmp_path):
    from safetensors.torch import save_file
    evaluate = load_recipe('evaluate')
    other = _tiny_hpm(1)
    checkpoint = tmp_path / 'other weights.safetensors'
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(checkpoint))
    loaded = evaluate.load_model(f'local-dir:{tiny_dir}', str(checkpoint))  # [0, 1] inputs: the model itself
    assert loaded.state_dict().keys() == other.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    with pytest.raises(SystemExit, match='no such file'):
        evaluate.load_model(f'local-dir:{tiny_dir}', str(tmp_path / 'missing.safetensors'))
    # the recipe end to end: the weights evaluated (their fingerprint) are the checkpoint's, not the folder's
    out = tmp_path / 'poison'
    done = _evaluate('--model', f'local-dir:{tiny_dir}', '--checkpoint', checkpoint, '--dataset', 'synthetic', '--eps',
                     '0.1', '--n-examples', '8', '--batch-size', '8', '--protocol', 'poison', '--poison-steps', '1',
                     '--device', 'cpu', '--out', out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert unverified_results(out / 'eval.json', other) is None
    assert 'another model' in unverified_results(out / 'eval.json', _tiny_hpm(0))


# ---------------------------------------------------------------- finding 15: recorded commands are shell-quoted
def test_zoo_commands_are_shell_quoted(tmp_path):
    from timm_hpm.zoo import format_command
    command = ['python', 'recipes/evaluate.py', '--out', str(tmp_path / 'a b'), '--note', "it's", '--eps', '8/255']
    assert shlex.split(format_command(command)) == command


def test_push_to_hub_records_its_command_shell_quoted(push_to_hub, checkout, tmp_path):
    argv = _probe(tmp_path / 'up load')
    push_to_hub.main(argv)
    command = json.loads((tmp_path / 'up load' / UPLOAD_MANIFEST).read_text())['command']
    assert shlex.split(command) == ['python', '-m', 'timm_hpm.cli.push_to_hub', *argv]  # main() of the module


def test_batch_order_table_records_its_command_shell_quoted(tiny_dir, tmp_path):
    batch_order = load_recipe('batch_order_table')
    argv = ['--model', f'local-dir:{tiny_dir}', '--dataset', 'synthetic', '--n-test', '8', '--batch-sizes', '4',
            '--out', str(tmp_path / 'batch order')]
    record = batch_order.main(argv)
    assert shlex.split(record['command']) == ['python', 'recipes/batch_order_table.py', *argv]
    assert json.loads((tmp_path / 'batch order' / 'table.json').read_text())['command'] == record['command']


def test_quickstart_records_its_command_shell_quoted(tmp_path, monkeypatch):
    """Every step's output already there (the committed runs stand in): the quick start only writes its record."""
    quickstart = load_recipe('quickstart')
    out = tmp_path / 'quick start'
    (out / 'finetune' / 'final').mkdir(parents=True)
    (out / 'finetune' / 'final' / 'model.safetensors').write_bytes(b'')
    for folder, source in (('eval_base', RESULTS / 'eval_base_1000'), ('eval_hpm', RESULTS / 'eval_hpm_msa4_1000'),
                           ('sensitivity', RESULTS / 'sensitivity_500')):
        (out / folder).mkdir()
        name = 'sensitivity.json' if folder == 'sensitivity' else 'eval.json'
        (out / folder / name).write_bytes((source / name).read_bytes())

    def no_step(*args):
        raise AssertionError('a step ran')
    monkeypatch.setattr(quickstart.Step, 'start', no_step)
    argv = ['--out', str(out), '--n-test', '1000']
    record = quickstart.main(argv)
    assert shlex.split(record['command']) == ['python', 'recipes/quickstart.py', *argv]
