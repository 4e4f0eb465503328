"""timm's model contract for every registered model and every shipped tag: what timm's own
tests/test_models.py checks of a model (forward, backward, default cfgs, unpooled features, features_only,
TorchScript, FX, a new num_classes on pretrained weights) plus timm's data config. Written for this project;
the big models are built at the reduced sizes of tests/_zoo.py (same code paths and key patterns)."""
import math
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.layers import get_channel_dim, get_spatial_dim, set_scriptable
from timm.models import get_pretrained_cfg
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from torchvision.transforms.functional import pil_to_tensor

from timm_hpm import is_hpm_variant
from timm_hpm.models.timm_families import HPM_TIMM_FAMILIES

from _zoo import ALL_MODELS, HPM_MODELS, SHIPPED_TAGS, TOKEN_MODELS, reduced_kwargs

SPATIAL_MODELS = [m for m in ALL_MODELS if m not in TOKEN_MODELS]
# every registered model.tag (timm's own tests/test_models.py runs its cfg tests over every tag, not only the defaults)
SPATIAL_TAGS = [name for name in timm.list_models(include_tags=True) if name.split('.')[0] in SPATIAL_MODELS]


def _create(name, **kwargs):
    return timm.create_model(name, **reduced_kwargs(name), **kwargs)


def _input(name, batch):
    torch.manual_seed(0)
    return torch.rand(batch, *get_pretrained_cfg(name.split('.')[0]).input_size)


def _params_without_grad(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_and_backward_reach_every_parameter(name):
    model = _create(name, num_classes=42).train()
    out = model(_input(name, 2))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    assert not _params_without_grad(model)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg_names_real_modules_and_sizes(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    for key in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'first_conv', 'classifier'):
        assert cfg.get(key) is not None, key
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0]
    assert f"{cfg['first_conv']}.weight" in state_dict and f"{cfg['classifier']}.weight" in state_dict
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    x = _input(name, 1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
        if name in TOKEN_MODELS:
            assert features.ndim == 3 and features.shape[-1] == model.num_features
        else:
            fmt = getattr(model, 'output_fmt', 'NCHW')
            assert features.shape[get_channel_dim(fmt)] == model.num_features
            assert tuple(features.shape[i] for i in get_spatial_dim(fmt)) == tuple(cfg['pool_size'])
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize('name_tag', SPATIAL_TAGS)
def test_every_tag_pool_size_is_the_unpooled_feature_map_at_its_input_size(name_tag):
    """timm's test_model_default_cfgs over every tag: a tag's pool_size is what forward_features gives at its
    input_size (hpm_resnet50.rb_wong2020fast_imagenet: 288 -> 9x9, where the base's 224 gives 7x7)."""
    name = name_tag.split('.')[0]
    model = timm.create_model(name_tag, **reduced_kwargs(name)).eval()
    cfg = model.pretrained_cfg
    assert (cfg.get('tag') or '') == name_tag.partition('.')[2]  # the tag's own cfg
    torch.manual_seed(0)
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, *cfg['input_size']))
    fmt = getattr(model, 'output_fmt', 'NCHW')
    assert tuple(features.shape[i] for i in get_spatial_dim(fmt)) == tuple(cfg['pool_size'])
    assert features.shape[get_channel_dim(fmt)] == model.num_features


@pytest.mark.parametrize('name', SPATIAL_MODELS)
def test_global_pool_empty_gives_the_unpooled_feature_map(name):
    model = _create(name).eval()
    x = _input(name, 1)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, '')
        assert model(x).shape == features.shape
        assert _create(name, num_classes=0, global_pool='').eval()(x).shape == features.shape


@pytest.mark.parametrize('base', HPM_TIMM_FAMILIES)
def test_hpm_timm_variant_keeps_the_base_cfg(base):
    ours = get_pretrained_cfg(HPM_TIMM_FAMILIES[base].hpm_name).to_dict()
    base = get_pretrained_cfg(base).to_dict()
    for key in ('input_size', 'fixed_input_size', 'pool_size', 'min_input_size', 'crop_mode', 'first_conv',
                'classifier'):
        assert ours.get(key) == base.get(key), key


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_only(name):
    model = _create(name, features_only=True).train()
    x = _input(name, 2)
    outputs = model(x)
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(outputs) == len(channels) >= 3
    for out, c, r in zip(outputs, channels, reductions):
        assert out.shape[:2] == (2, c) and torch.isfinite(out).all()
        assert all(s <= math.ceil(size / r) + 1 for s, size in zip(out.shape[-2:], x.shape[-2:]))
    sum(out.mean() for out in outputs).backward()
    assert not _params_without_grad(model)  # the stages, norm and head after the last level are pruned
    one = _create(name, features_only=True, out_indices=(1,)).train()
    one.load_state_dict(model.state_dict(), strict=False)
    assert len(one(x)) == 1 and one.feature_info.channels() == [channels[1]]


@pytest.mark.parametrize('name', ALL_MODELS)
def test_torchscript_matches_eager(name):
    with set_scriptable(True):
        model = _create(name).eval()
    x = _input(name, 2)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_fx_feature_extractor_matches_eager_and_scripts(name):
    model = _create(name).eval()
    x = _input(name, 1)
    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(next(iter(fx_model(x).values())), expected)
        torch.testing.assert_close(next(iter(torch.jit.script(fx_model)(x).values())), expected)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_fx_backward_reaches_every_parameter(name):
    model = _create(name, num_classes=42).train()
    train_nodes, _ = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[train_nodes[-1]])
    out = next(iter(fx_model(_input(name, 2)).values()))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert not _params_without_grad(fx_model)


@pytest.mark.parametrize('tag', SHIPPED_TAGS)
def test_shipped_weights_with_another_head(tag, caplog):
    """timm's rule for a changed head: the classifier is dropped, the rest loads; an HPM head's prototypes
    and scale go with the classifier (and the model says they must be initialised from data)."""
    full = timm.create_model(tag, pretrained=True)
    classifier = full.pretrained_cfg['classifier']
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith(f'{classifier}.')}
    with caplog.at_level('WARNING'):
        model = timm.create_model(tag, pretrained=True, num_classes=5, in_chans=1).eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    assert model(_input(tag, 2)).shape == (2, 5)
    if is_hpm_variant(tag):
        assert model.hpm_head.num_classes == 5 and not bool(model.hpm_head.prototypes_initialized)
        assert 'must be initialised from data' in caplog.text
    headless = timm.create_model(tag, pretrained=True, num_classes=0).eval()
    assert headless(_input(tag, 2)).shape == (2, headless.head_hidden_size)
    features = timm.create_model(tag, pretrained=True, features_only=True)
    assert all(torch.equal(v, state[k]) for k, v in features.model.state_dict().items())


@pytest.mark.parametrize('name', ALL_MODELS)
def test_data_config_and_transform(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == tuple(cfg['input_size'])
    assert data_cfg['mean'] == tuple(cfg['mean']) and data_cfg['std'] == tuple(cfg['std'])
    assert data_cfg['interpolation'] == cfg['interpolation'] and data_cfg['crop_pct'] == cfg['crop_pct']
    c, h, w = data_cfg['input_size']
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode='L' if c == 1 else 'RGB')
    tensor = create_transform(**data_cfg)(image)
    assert tensor.shape == (c, h, w)
    if cfg['crop_pct'] == 1.0 and cfg['mean'] == (0.0,) * c:
        # the CIFAR-style and Fashion-MNIST models: timm's eval pipeline gives the images unchanged, in [0, 1]
        assert torch.equal(tensor, pil_to_tensor(image).float() / 255)


@pytest.mark.parametrize('name', HPM_MODELS)
def test_timm_style_training_step_never_uses_stale_prototypes_silently(name):
    """timm's train.py: model(x) in train mode, the loss outside the model, no labels reach the head."""
    x, y = _input(name, 4), torch.tensor([0, 1, 2, 3])
    model = _create(name, num_classes=4).train()
    head = model.hpm_head
    head.init_prototypes_([(torch.randn(8, head.in_features), torch.arange(8) % 4)], calibrate_gamma=False)
    before = head.dataset_prototypes.clone()
    with pytest.warns(UserWarning, match='without labels leaves the dataset prototypes'):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per model
        model(x)
    assert torch.equal(head.dataset_prototypes, before)

    pseudo = _create(name, num_classes=4, hpm_cfg=dict(pseudo_labels=True)).train()
    head = pseudo.hpm_head
    assert not bool(head.prototypes_initialized)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.nn.functional.cross_entropy(pseudo(x), y).backward()
    assert bool(head.prototypes_initialized)  # an uninitialised head starts from the first batch's class means
    first = head.dataset_prototypes.clone()
    seen = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    pseudo(x)
    handle.remove()
    features = seen[0]
    predicted = head.fc_forward(features).argmax(1)
    expected = first.clone()
    for k in predicted.unique():
        expected[k] = head.momentum * first[k] + (1 - head.momentum) * features[predicted == k].mean(0)
    torch.testing.assert_close(head.dataset_prototypes, expected)


def test_eval_with_uninitialised_prototypes_warns_once():
    model = timm.create_model('hpm_small_cnn').eval()
    with pytest.warns(UserWarning, match='never initialised from data'):
        model(_input('hpm_small_cnn', 2))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model(_input('hpm_small_cnn', 2))
        timm.create_model('hpm_small_cnn.fmnist_hpm', pretrained=True).eval()(_input('hpm_small_cnn', 2))
