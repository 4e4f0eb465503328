"""The architectures added for more RobustBench bases (DM PreActResNet-18, DM WideResNet-82-8/94-16/106-16, TRADES
WideResNet-28-10): state-dict keys and shapes equal RobustBench's (recorded from the robustbench 1.1.1 wheel), and
RobustBench-layout checkpoints load through timm_hpm.robustbench with the logits of RobustBench's own architecture
code (recorded with deterministic weights: tests/_rb_reference.py, tests/fixtures/robustbench_reference_logits.json)."""
import json
from pathlib import Path

import pytest
import timm
import torch

from timm_hpm import robustbench as rb

from _rb_reference import reference_input, reference_weights

FIXTURES = Path(__file__).parent / 'fixtures'
KEYS = json.loads((FIXTURES / 'robustbench_state_dict_keys.json').read_text())['architectures']
LOGITS = json.loads((FIXTURES / 'robustbench_reference_logits.json').read_text())['cases']

NEW_ARCHS = {  # our registered name -> RobustBench architecture in the keys fixture (num_classes=10)
    'dm_preact_resnet18': 'dm_preact_resnet18',
    'wrn82_8': 'dm_wrn82_8',
    'wrn94_16': 'dm_wrn94_16',
    'wrn106_16': 'dm_wrn106_16',
    'trades_wrn28_10': 'trades_wrn28_10',
}
HPM_HEAD_KEYS = ('log_gamma', 'dataset_prototypes', 'prototypes_initialized')


@pytest.mark.parametrize('name', list(NEW_ARCHS))
def test_state_dict_keys_equal_robustbench(name):
    expected = [(k, tuple(s)) for k, s in KEYS[NEW_ARCHS[name]]]
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10)
        hpm = timm.create_model(f'hpm_{name}', num_classes=10)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    classifier = hpm.pretrained_cfg['classifier']
    hpm_keys = [(k, tuple(v.shape)) for k, v in hpm.state_dict().items()]
    assert sorted(k for k, _ in hpm_keys if k.rsplit('.', 1)[-1] in HPM_HEAD_KEYS) == sorted(
        f'{classifier}.{k}' for k in HPM_HEAD_KEYS)
    assert [kv for kv in hpm_keys if kv[0].rsplit('.', 1)[-1] not in HPM_HEAD_KEYS] == expected


def test_every_registered_architecture_of_the_table_has_a_recorded_key_list():
    recorded = {'wrn28_10', 'wrn70_16', 'trades_wrn34_10', 'trades_wrn34_20', 'preact_resnet18', *NEW_ARCHS}
    cifar = {e.architecture for e in rb.ROBUSTBENCH_MODELS if e.dataset != 'imagenet'}
    assert cifar <= recorded


def _robustbench_keys(model, layout_case):
    """The keys RobustBench's model had: ours, plus the TRADES code base's unused ``sub_block1`` where it builds one."""
    keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if 'sub_block1' in layout_case:
        keys += [(k.replace('block1.', 'sub_block1.', 1), s) for k, s in keys if k.startswith('block1.')]
    return keys


@pytest.mark.parametrize('case', list(LOGITS))
def test_robustbench_layout_checkpoint_gives_robustbench_logits(case, tmp_path):
    spec = LOGITS[case]
    entry = rb.get_entry(*spec['entry'])
    kwargs = spec['model_kwargs']
    source = timm.create_model(entry.architecture, **{**entry.model_args, **kwargs})
    weights = reference_weights(_robustbench_keys(source, case), seed=0)
    path = rb.checkpoint_path(entry, tmp_path)
    path.parent.mkdir(parents=True)
    prefixed = {f'module.{k}': v for k, v in weights.items()}  # as RobustBench's DataParallel checkpoints
    torch.save({'state_dict': prefixed} if spec['layout'] == 'state_dict' else prefixed, path)
    expected = torch.tensor(spec['logits'], dtype=torch.float32)
    x = reference_input(seed=1)
    model = rb.load_robustbench_model(entry.name, entry.dataset, entry.threat_model, model_dir=tmp_path,
                                      download=False, **kwargs).eval()
    hpm = rb.load_robustbench_model(entry.name, entry.dataset, entry.threat_model, model_dir=tmp_path,
                                    download=False, hpm=True, **kwargs).eval()
    hpm.hpm_head.mode = 'fc'
    with torch.no_grad():
        logits, hpm_logits = model(x), hpm(x)
    # float32 rounding: the same operations in another order (SiLU vs RobustBench's Swish, fused vs not)
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(hpm_logits, expected, rtol=1e-5, atol=2e-6 * scale)
