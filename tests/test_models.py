"""The zoo: timm API conventions (as timm's tests/test_models.py checks them), RobustBench key compatibility,
convert_to_hpm on timm and plain modules, and bad input."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import timm_hpm
from timm_hpm import HPMHead, convert_to_hpm

from _zoo import ALL_MODELS, HPM_MODELS, PLAIN_MODELS, reduced_kwargs as _kwargs

FIXTURE = json.loads((Path(__file__).parent / 'fixtures' / 'robustbench_state_dict_keys.json').read_text())

RB_ARCHS = {  # our registered name -> RobustBench architecture in the fixture (built with num_classes=10)
    'wrn28_10': ('dm_wrn28_10', {}),
    'wrn70_16': ('dm_wrn70_16', {}),
    'trades_wrn34_10': ('trades_wrn34_10', {}),
    'trades_wrn34_20': ('trades_wrn34_20', {}),
    'preact_resnet18': ('preact_resnet18', {}),
}
HPM_HEAD_KEYS = ('log_gamma', 'dataset_prototypes', 'prototypes_initialized')


def _input(model, batch=2):
    c, h, w = model.pretrained_cfg['input_size']
    return torch.rand(batch, c, h, w)


def test_registry_lists_every_family_with_pretrained_tags():
    assert set(HPM_MODELS) >= {'hpm_wrn28_10', 'hpm_wrn70_16', 'hpm_trades_wrn34_10', 'hpm_trades_wrn34_20',
                               'hpm_preact_resnet18', 'hpm_resnet50', 'hpm_wide_resnet50_2', 'hpm_convnext_base',
                               'hpm_convnext_large', 'hpm_swin_base_patch4_window7_224', 'vit_base_patch16_hpm_224'}
    # every base family has its HPM variant; tbn_small_cnn is a batch-dependent defence of its own (test-batch
    # statistics), benchmarked beside HPM, not a base for it
    assert {f'hpm_{m}' for m in PLAIN_MODELS if m != 'tbn_small_cnn'} <= set(HPM_MODELS)
    # Listed as pretrained only where the weights can be had: those shipped in the package. The planned tags
    # (RobustBench bases, not published yet) are registered without a location.
    tagged = timm_hpm.list_models(pretrained=True)
    assert tagged == ['hpm_small_cnn.fmnist_hpm', 'hpm_small_cnn.fmnist_pgdat', 'small_cnn.fmnist_control',
                      'small_cnn.fmnist_pgdat', 'tbn_small_cnn.fmnist_pgdat']
    for name in tagged:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == f'{timm_hpm.HF_HUB_ORG}/{name}' and Path(cfg.file).is_file()
        assert cfg.license and cfg.paper_ids and cfg.num_classes > 0
    planned = 'hpm_wrn28_10.rb_wang2023better_cifar10'
    assert planned in timm.list_models('hpm_*', include_tags=True) and planned not in tagged
    assert not timm.models.get_pretrained_cfg(planned).has_weights
    with pytest.raises(timm_hpm.PretrainedWeightsUnavailable, match='not published yet'):
        timm.create_model(planned, pretrained=True, width=1)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_api_conventions(name):
    """What timm's test_model_default_cfgs checks: feature/pre-logit sizes, reset_classifier(0),
    num_classes=0, classifier/first_conv keys, num_classes override."""
    kwargs = _kwargs(name)
    model = timm.create_model(name, **kwargs).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    x = _input(model)
    classifier, first_conv = cfg['classifier'], cfg['first_conv']
    assert classifier + '.weight' in state_dict and first_conv + '.weight' in state_dict
    assert model.get_classifier() is model.get_submodule(classifier)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, cfg['num_classes'])
        features = model.forward_features(x)
        if features.ndim == 4 and not name.startswith('hpm_swin'):  # NCHW
            assert features.shape[1] == model.num_features
        pre_logits = model.forward_head(features, pre_logits=True)
        hidden = getattr(model, 'head_hidden_size', None) or model.num_features
        assert pre_logits.shape == (2, hidden)
        torch.testing.assert_close(model.forward_head(features), out)
        model.reset_classifier(0)
        assert model(x).shape == (2, hidden)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        headless = timm.create_model(name, num_classes=0, **kwargs).eval()
        assert headless(x).shape == (2, hidden)
        assert timm.create_model(name, num_classes=3, **kwargs).eval()(x).shape == (2, 3)
    if timm_hpm.is_hpm_variant(name):
        head = model.hpm_head
        assert isinstance(head, HPMHead) and head.num_classes == 7
        assert all(f'{classifier}.{k}' in state_dict for k in HPM_HEAD_KEYS)
        assert headless.hpm_head is None


@pytest.mark.parametrize('name', list(RB_ARCHS))
def test_state_dict_keys_equal_robustbench(name):
    rb_name, kwargs = RB_ARCHS[name]
    expected = [tuple((k, tuple(s))) for k, s in FIXTURE['architectures'][rb_name]]
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10, **kwargs)
        hpm = timm.create_model(f'hpm_{name}', num_classes=10, **kwargs)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    classifier = hpm.pretrained_cfg['classifier']
    hpm_keys = [(k, tuple(v.shape)) for k, v in hpm.state_dict().items()]
    extra = [k for k, _ in hpm_keys if k.rsplit('.', 1)[-1] in HPM_HEAD_KEYS]
    assert sorted(extra) == sorted(f'{classifier}.{k}' for k in HPM_HEAD_KEYS)
    assert [kv for kv in hpm_keys if kv[0] not in extra] == expected


def test_base_checkpoint_loads_strictly_and_fc_mode_matches_base():
    base = timm.create_model('preact_resnet18').eval()
    state = {f'module.{k}': v for k, v in base.state_dict().items()}  # as DataParallel saves it
    hpm = timm.create_model('hpm_preact_resnet18', pretrained=True,
                            pretrained_cfg_overlay=dict(state_dict=state)).eval()
    assert not bool(hpm.hpm_head.prototypes_initialized)
    x = torch.rand(3, 3, 32, 32)
    hpm.hpm_head.mode = 'fc'
    torch.testing.assert_close(hpm(x), base(x))


def test_dm_wrn_normalisation_follows_the_pretrained_tag():
    c10 = timm.create_model('wrn28_10', width=1)
    c100 = timm.create_model('wrn28_10.rb_wang2023better_cifar100', width=1)
    assert c100.num_classes == 100
    torch.testing.assert_close(c10.mean.flatten(), torch.tensor(timm_hpm.models.wide_resnet.CIFAR10_MEAN))
    torch.testing.assert_close(c100.mean.flatten(), torch.tensor(timm_hpm.models.wide_resnet.CIFAR100_MEAN))
    assert 'mean' not in c10.state_dict()  # non-persistent, as in RobustBench


def test_hpm_modes_share_weights_and_give_batch_dependence_only_in_dynamic():
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18').eval()
    x = torch.rand(6, 3, 32, 32)
    outputs = {}
    for mode in timm_hpm.HPM_MODES:
        model.hpm_head.mode = mode
        with torch.no_grad():
            outputs[mode] = (model(x)[:2], model(x[:2]))
    for mode in ('static', 'fc'):
        torch.testing.assert_close(*outputs[mode], rtol=1e-4, atol=1e-4)  # batch-independent
    assert not torch.allclose(*outputs['dynamic'])  # the batch prototypes differ between the two batches


def test_forward_with_targets_updates_prototypes_and_returns_fc():
    model = timm.create_model('hpm_preact_resnet18', num_classes=4).train()
    before = model.hpm_head.dataset_prototypes.clone()
    out = model(torch.rand(8, 3, 32, 32), targets=torch.arange(8) % 4, return_fc=True)
    assert out.logits.shape == out.fc_logits.shape == (8, 4)
    assert not torch.equal(model.hpm_head.dataset_prototypes, before)
    model.eval()
    frozen = model.hpm_head.dataset_prototypes.clone()
    model(torch.rand(8, 3, 32, 32), targets=torch.arange(8) % 4)
    assert torch.equal(model.hpm_head.dataset_prototypes, frozen)


def test_convert_timm_model_keeps_api_and_fc_outputs():
    torch.manual_seed(0)
    base = timm.create_model('resnet18', num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = base(x)
    hpm = convert_to_hpm(base, alpha=0.25)
    assert type(hpm).__name__ == 'HPMResNet' and hpm.hpm_head.alpha == 0.25
    assert set(hpm.state_dict()) >= {'fc.weight', 'fc.bias', 'fc.dataset_prototypes'}
    with torch.no_grad():
        hpm.hpm_head.mode = 'fc'
        torch.testing.assert_close(hpm(x), expected)
        features = hpm.forward_head(hpm.forward_features(x), pre_logits=True)
        assert features.shape == (2, hpm.num_features)
        hpm.hpm_head.mode = 'dynamic'
        torch.testing.assert_close(hpm.forward_head(hpm.forward_features(x)), hpm(x))


class RobustBenchStyleNet(nn.Module):
    """A plain module with a final nn.Linear and no timm API (like RobustBench architectures)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(self.conv(x).relu().mean((2, 3)))


def test_convert_plain_module():
    torch.manual_seed(0)
    base = RobustBenchStyleNet().eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        expected = base(x)
        features = base.conv(x).relu().mean((2, 3))
    hpm = convert_to_hpm(base)
    assert hpm.hpm_classifier_name == 'linear' and hpm.num_features == 8
    with torch.no_grad():
        torch.testing.assert_close(hpm.forward_features(x), features)
        hpm.hpm_head.mode = 'fc'
        torch.testing.assert_close(hpm(x), expected)
        hpm.hpm_head.mode = 'static'
        torch.testing.assert_close(hpm(x), hpm.forward_head(hpm.forward_features(x)))
    out = hpm.train()(x, targets=torch.tensor([0, 1, 2, 0]), return_fc=True)
    torch.testing.assert_close(out.fc_logits, expected)
    hpm.reset_classifier(6)
    assert hpm.eval()(x).shape == (4, 6) and hpm.hpm_head.num_classes == 6


def test_convert_errors():
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match='no nn.Linear classifier'):
        convert_to_hpm(no_linear)
    with pytest.raises(TypeError, match='not nn.Linear'):
        convert_to_hpm(timm.create_model('resnet18', num_classes=0))
    model = convert_to_hpm(RobustBenchStyleNet())
    with pytest.raises(ValueError, match='already has an HPM head'):
        convert_to_hpm(model)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        convert_to_hpm(RobustBenchStyleNet(), classifier='nope')


@pytest.mark.parametrize('name', ['hpm_preact_resnet18', 'preact_resnet18', 'hpm_wrn28_10'])
def test_bad_input_is_reported(name):
    model = timm.create_model(name, **_kwargs(name)).eval()
    with pytest.raises(ValueError, match='3-channel images, got 1 channels'):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match='32x32 images, got 28x28'):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r'shape \(B, C, H, W\)'):
        model(torch.rand(3, 32, 32))


@pytest.mark.parametrize('name', ['hpm_preact_resnet18', 'small_cnn', 'hpm_resnet50'])
def test_integer_images_are_rejected(name):
    model = timm.create_model(name, **_kwargs(name)).eval()
    c, h, w = model.pretrained_cfg['input_size']
    with pytest.raises(TypeError, match=r'dtype torch.uint8.*x.float\(\) / 255'):
        model(torch.randint(0, 255, (2, c, h, w), dtype=torch.uint8))


def test_nan_input_is_not_scanned_by_the_model_but_by_the_entry_points():
    """timm models do not scan every batch (it cost the small models a third of their forward); the
    evaluation and training entry points reject NaN where the data enters."""
    from timm_hpm.attacks import check_images
    model = timm.create_model('hpm_preact_resnet18').eval()
    x = torch.rand(2, 3, 32, 32)
    x[0, 0, 0, 0] = float('nan')
    assert torch.isnan(model(x)).any()
    with pytest.raises(ValueError, match='NaN'):
        check_images(x, torch.tensor([0, 1]))


def test_unknown_hpm_option_is_reported():
    with pytest.raises(TypeError, match='unknown hpm_cfg options'):
        timm.create_model('hpm_preact_resnet18', hpm_cfg=dict(alpah=0.3))
    model = timm.create_model('hpm_preact_resnet18', hpm_cfg=dict(alpha=0.3, mode='static'))
    assert model.hpm_head.alpha == 0.3 and model.hpm_head.mode == 'static'
