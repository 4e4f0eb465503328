"""RobustBench base checkpoints, offline: RobustBench's folder layout, DataParallel prefixes and nesting, strict
loading, refusal of pickles that run code, wrong architectures, and a clear error when the file is missing
and the host unreachable."""
from pathlib import Path
import os

import pytest
import timm
import torch

import timm_hpm
from timm_hpm import robustbench as rb
from timm_hpm.train import load_config
from timm_hpm.train.engine import build_model


def _write_rb_checkpoint(model_dir, entry, state_dict, wrap=None):
    path = rb.checkpoint_path(entry, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefixed = {f'module.{k}': v for k, v in state_dict.items()}  # as RobustBench's DataParallel checkpoints
    torch.save({wrap: prefixed} if wrap else prefixed, path)
    return path


def test_table_entries_name_registered_architectures_and_tags():
    for entry in rb.ROBUSTBENCH_MODELS:
        assert timm.is_model(entry.architecture), entry
        assert timm.is_model(timm_hpm.hpm_variant(entry.architecture)), entry
        assert entry.dataset in ('cifar10', 'cifar100', 'imagenet') and entry.threat_model in ('Linf', 'L2')
    assert rb.get_entry('Wang2023Better_WRN-28-10', 'cifar100', 'Linf').model_args['num_classes'] == 100
    with pytest.raises(KeyError, match='pass dataset= and threat_model='):
        rb.get_entry('Wang2023Better_WRN-28-10')
    with pytest.raises(KeyError, match='not in the supported table'):
        rb.get_entry('Nobody2099')


def test_entries_refer_to_registered_tags_whose_family_holds_the_facts():
    """The table names a tag; the number of classes, the normalisation and the paper come from the tag's cfg and its
    family file, so a model loaded through the table is the tagged model."""
    from timm_hpm.models._common import CIFAR100_MEAN
    for entry in rb.ROBUSTBENCH_MODELS:
        hpm_tag = f'{timm_hpm.hpm_variant(entry.architecture)}.{entry.tag}'
        assert hpm_tag in timm.list_models(include_tags=True), hpm_tag
        assert entry.model_args['num_classes'] == (1000 if entry.dataset == 'imagenet' else
                                                   100 if entry.dataset == 'cifar100' else 10), entry
        assert entry.paper.startswith(('arXiv:', 'openreview:', 'doi:', 'https://'))
    entry = rb.get_entry('Wang2023Better_WRN-28-10', 'cifar100', 'Linf')
    assert entry.model_args['mean'] == CIFAR100_MEAN and entry.name_tag() == 'wrn28_10.rb_wang2023better_cifar100'
    assert rb.get_entry('Salman2020Do_R50').name_tag() == 'resnet50'  # timm's own architecture, timm's own tags
    assert rb.get_entry('Salman2020Do_R50').name_tag(hpm=True) == 'hpm_resnet50.rb_salman2020do_imagenet'


def test_entries_carry_robustbench_reported_figures_and_imagenet_preprocessing():
    """RobustBench's leaderboard figures as it reports them (strings, percent), one row per (name, dataset, threat),
    and RobustBench's preprocessing for every ImageNet entry (from its tag), none for CIFAR."""
    seen = set()
    for entry in rb.ROBUSTBENCH_MODELS:
        key = (entry.name, entry.dataset, entry.threat_model)
        assert key not in seen, key
        seen.add(key)
        for figure in (entry.reported_clean, entry.reported_autoattack):
            assert figure is None or 0 < float(figure) < 100, entry
        if entry.reported_clean and entry.reported_autoattack:
            assert float(entry.reported_autoattack) < float(entry.reported_clean), entry
        assert entry.eps == ('4/255' if entry.dataset == 'imagenet' else '0.5' if entry.threat_model == 'L2' else
                             '8/255'), entry
        if entry.dataset == 'imagenet':
            assert entry.preprocessing in ('Res256Crop224', 'BicubicRes256Crop224', 'Res224', 'Crop288'), entry
        else:
            assert entry.preprocessing is None, entry
    gowal = rb.get_entry('Gowal2020Uncovering', 'cifar10', 'L2')
    assert (gowal.reported_clean, gowal.reported_autoattack, gowal.architecture) == ('90.90', '74.50', 'wrn70_16')
    assert rb.get_entry('Carmon2019Unlabeled').name_tag() == 'trades_wrn28_10.rb_carmon2019unlabeled_cifar10'
    r18 = rb.get_entry('Rebuffi2021Fixing_R18_ddpm', 'cifar100', 'Linf')
    assert r18.name_tag(hpm=True) == 'hpm_dm_preact_resnet18.rb_rebuffi2021fixing_ddpm_cifar100'
    assert r18.model_args['num_classes'] == 100
    assert rb.get_entry('Wong2020Fast').preprocessing == 'Crop288'
    assert rb.get_entry('Chen2024Data_WRN_50_2').name_tag(hpm=True) == 'hpm_wide_resnet50_2.rb_chen2024data_imagenet'


@pytest.mark.parametrize('wrap', [None, 'state_dict', 'last'])
def test_robustbench_layout_loads_strictly(tmp_path, wrap):
    entry = rb.get_entry('Andriushchenko2020Understanding')
    if wrap == 'state_dict':
        entry = rb.RobustBenchEntry(**{**entry.__dict__, 'checkpoint_key': None})
    source = timm.create_model('preact_resnet18').eval()
    path = _write_rb_checkpoint(tmp_path, entry, source.state_dict(), wrap=wrap)
    assert path == tmp_path / 'cifar10' / 'Linf' / 'Andriushchenko2020Understanding.pt'
    state_dict = rb.read_checkpoint(path, entry.checkpoint_key)
    model = timm.create_model('preact_resnet18', pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_load_robustbench_model_plain_and_hpm(tmp_path, monkeypatch):
    entry = rb.get_entry('Andriushchenko2020Understanding')
    source = timm.create_model('preact_resnet18').eval()
    _write_rb_checkpoint(tmp_path, entry, source.state_dict(), wrap='last')
    plain = rb.load_robustbench_model(entry.name, model_dir=tmp_path, download=False).eval()
    hpm = rb.load_robustbench_model(entry.name, model_dir=tmp_path, download=False, hpm=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), source(x))
        hpm.hpm_head.mode = 'fc'
        torch.testing.assert_close(hpm(x), source(x))
    assert not bool(hpm.hpm_head.prototypes_initialized)


def test_finetune_config_takes_a_robustbench_base(tmp_path):
    entry = rb.get_entry('Andriushchenko2020Understanding')
    source = timm.create_model('preact_resnet18').eval()
    _write_rb_checkpoint(tmp_path, entry, source.state_dict(), wrap='last')
    cfg = load_config(None, {'model.name': 'hpm_preact_resnet18', 'model.base': f'rb:{entry.name}',
                             'model.robustbench_dir': str(tmp_path), 'data.dataset': 'cifar10',
                             'attack.eps': '8/255'})
    model = build_model(cfg)
    torch.testing.assert_close(model.hpm_head.weight, source.linear.weight)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_pickle_that_runs_code_is_refused(tmp_path, capfd):
    path = tmp_path / 'evil.pt'
    torch.save({'conv1.weight': torch.zeros(1), 'x': _RunsCode()}, path)
    with pytest.raises(rb.CheckpointError, match='refusing or unable to read'):
        rb.read_checkpoint(path)
    assert 'pwned' not in capfd.readouterr().out


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    entry = rb.get_entry('Andriushchenko2020Understanding')
    other = timm.create_model('wrn28_10', width=1)
    _write_rb_checkpoint(tmp_path, entry, other.state_dict(), wrap='last')
    with pytest.raises(RuntimeError, match=r'(?s)Missing key.*Unexpected key') as error:
        rb.load_robustbench_model(entry.name, model_dir=tmp_path, download=False)
    first_line = str(error.value).splitlines()[0]
    path = rb.checkpoint_path(entry, tmp_path)
    n_model = len(timm.create_model('preact_resnet18').state_dict())
    assert isinstance(error.value, rb.CheckpointError)
    assert first_line.startswith(f'{path} does not fit preact_resnet18 (RobustBench entry {entry.name}')
    assert f'0 of its {len(other.state_dict())} tensors match the model\'s {n_model}' in first_line


def test_original_trades_checkpoint_loads_without_its_unused_block(tmp_path):
    """The TRADES checkpoint carries sub_block1, never used in its forward: it is dropped on load, and a model
    built from scratch has no such dead parameters."""
    entry = rb.get_entry('Zhang2019Theoretically')
    model = timm.create_model('trades_wrn34_10', widen_factor=1)
    assert not any(k.startswith('sub_block1.') for k in model.state_dict())
    state = dict(model.state_dict())
    state.update({k.replace('block1.', 'sub_block1.', 1): v.clone() for k, v in model.state_dict().items()
                  if k.startswith('block1.')})
    _write_rb_checkpoint(tmp_path, entry, state, wrap=None)
    loaded = rb.load_robustbench_model(entry.name, model_dir=tmp_path, download=False, widen_factor=1)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_missing_checkpoint_offline_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError('Name or service not known')

    monkeypatch.setattr(socket, 'create_connection', unreachable)
    start = time.time()
    with pytest.raises(rb.CheckpointError, match='unreachable.*put it at'):
        rb.load_robustbench_model('Wang2023Better_WRN-28-10', 'cifar10', 'Linf', model_dir=tmp_path)
    assert time.time() - start < 5
    with pytest.raises(rb.CheckpointError, match='download=False'):
        rb.load_robustbench_model('Wang2023Better_WRN-28-10', 'cifar10', 'Linf', model_dir=tmp_path, download=False)


def test_model_info_has_robustbench_fields():
    result = {'dataset': 'cifar10', 'architecture': 'hpm_wrn28_10', 'eps': 8 / 255, 'clean_acc': 0.9,
              'autoattack_acc': 0.7, 'msa_acc': 0.65, 'msa_union_acc': 0.6, 'batchings': {'default': {}},
              'n_examples': 1000, 'protocol': 'msa', 'hpm_mode': 'dynamic', 'batch_size': 250,
              'settings': {'protocol': 'msa', 'msa': {'apgd_iters': 100, 'autoattack_iters': None}}}
    info = rb.model_info(result, 'HPM WRN-28-10', base='Wang2023Better_WRN-28-10')
    # RobustBench ranks by autoattack_acc: it carries the worst case measured (MSA), AutoAttack on the target apart
    assert info['clean_acc'] == '90.00' and info['autoattack_acc'] == '65.00' and info['msa_acc'] == '65.00'
    assert info['autoattack_target_acc'] == '70.00' and info['msa_union_acc'] == '60.00'
    assert info['unreliable'] is False and 'Wang2023Better_WRN-28-10' in info['footnote']


def test_model_info_flags_a_reduced_budget_as_unreliable():
    settings = {'protocol': 'msa', 'msa': {'apgd_iters': 20, 'autoattack_iters': 20, 'square_queries': 300,
                                           'combine_rounds': 0, 'surrogates': ['fc', 'dynamic']}}
    result = {'clean_acc': 0.9, 'autoattack_acc': 0.7, 'msa_acc': 0.65, 'protocol': 'msa', 'hpm_mode': 'dynamic',
              'settings': settings}
    reduced = rb.reduced_budget(result)
    assert reduced == ['AutoAttack APGD/FAB iterations 20 (standard: 100)', 'Square queries 300 (standard: 5000)',
                       'apgd_iters 20 (full: 100)', 'combine_rounds 0 (full: 3)',
                       "surrogate views left out: ['static', 'soft']"]
    info = rb.model_info(result, 'm')
    assert info['unreliable'] is True and info['footnote'].endswith('combine_rounds 0 (full: 3), surrogate views '
                                                                     "left out: ['static', 'soft'].")
    # standard AutoAttack on a batch-independent model: its own figure, reliable
    aa = {'clean_acc': 0.8, 'autoattack_acc': 0.7, 'protocol': 'autoattack', 'hpm_mode': None,
          'settings': {'protocol': 'autoattack', 'msa': {'autoattack_version': 'standard'}}}
    info = rb.model_info(aa, 'base')
    assert (info['autoattack_acc'], info['msa_acc'], info['unreliable']) == ('70.00', None, False)
    assert 'Batch-dependent' not in info['footnote']
    # AutoAttack alone on a batch-dependent head is never a reliable figure for it
    assert rb.model_info(dict(aa, hpm_mode='dynamic'), 'hpm')['unreliable'] is True


def test_committed_model_info_carries_the_worst_case():
    """The shipped HPM model's RobustBench export ranks it by MSA's worst case (68.2%), not AutoAttack on the
    target (71.3%); every committed model_info.json is what recipes/model_info.py makes of its eval.json."""
    import json
    root = Path(__file__).resolve().parents[1] / 'results'
    info = json.loads((root / 'fashion_mnist' / 'eval_hpm_msa4_1000' / 'model_info.json').read_text())
    assert (info['autoattack_acc'], info['autoattack_target_acc'], info['unreliable']) == ('68.20', '71.30', False)
    paths = sorted(p for p in root.rglob('model_info.json') if (p.parent / 'eval.json').is_file())  # evaluate.py's
    assert paths
    for path in paths:
        result = json.loads((path.parent / 'eval.json').read_text())
        assert json.loads(path.read_text()) == rb.model_info(result, result['name']), \
            f'run: python recipes/model_info.py {path.parent / "eval.json"}'
