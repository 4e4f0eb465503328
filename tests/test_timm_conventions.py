"""timm's training conventions on the project's own families (SmallCNN, the WideResNets, the PreActResNets, plain
and HPM): ``group_matcher`` (timm's parameter groups, layer-wise LR decay) and ``set_grad_checkpointing`` (timm's
``checkpoint_seq``, what ``train.py --grad-checkpointing`` calls). Tiny instances of each: the same code paths."""
import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

from timm_hpm.models.timm_families import HPM_TIMM_FAMILIES

from _zoo import ALL_MODELS

ROOT = Path(__file__).resolve().parents[1]
OWN_MODELS = [m for m in ALL_MODELS if m not in {f.hpm_name for f in HPM_TIMM_FAMILIES.values()}]


def _tiny_kwargs(name: str) -> dict:
    """Two blocks in a stage where the family has stages of blocks; the narrowest widths."""
    base = name[len('hpm_'):] if name.startswith('hpm_') else name
    if base.startswith('trades_wrn'):
        return dict(depth=16, widen_factor=1)
    if base.startswith('wrn'):
        return dict(depth=16, width=1)
    if 'preact_resnet' in base:
        return dict(num_blocks=(2, 1, 1, 1), img_size=16)
    assert base in ('small_cnn', 'tbn_small_cnn'), f'{name}: a new family needs its tiny size here'
    return {}


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **_tiny_kwargs(name), **kwargs)


def _batch(model: nn.Module, n: int = 2):
    torch.manual_seed(1)
    return torch.rand(n, *model.pretrained_cfg['input_size']), torch.arange(n) % 2


def _regexes(matcher: dict):
    for spec in matcher.values():
        for regex in ([spec] if isinstance(spec, str) else [s[0] for s in spec or ()]):
            yield re.compile(regex)


def test_every_own_family_is_covered():
    assert {'small_cnn', 'hpm_small_cnn', 'preact_resnet18', 'dm_preact_resnet18', 'wrn28_10', 'hpm_wrn70_16',
            'trades_wrn34_10', 'hpm_trades_wrn34_20'} <= set(OWN_MODELS)
    assert not {'hpm_resnet50', 'vit_base_patch16_hpm_224'} & set(OWN_MODELS)


@pytest.mark.parametrize('coarse', [False, True], ids=['fine', 'coarse'])
@pytest.mark.parametrize('name', OWN_MODELS)
def test_group_matcher_groups_every_parameter_in_forward_order(name, coarse):
    model = _create(name)
    matcher = model.group_matcher(coarse=coarse)
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, matcher)
    assert sorted(n for group in groups.values() for n in group) == sorted(names)  # each exactly once
    # every parameter but the classifier's is matched by a regex of its own: timm's fallback (unmatched names go
    # to the last group, the head's) takes the classifier and nothing else
    classifier = model.pretrained_cfg['classifier'] + '.'
    head = [n for n in names if n.startswith(classifier)]
    assert head and sorted(groups[max(groups)]) == sorted(head)
    assert all(any(r.match(n) for r in _regexes(matcher)) for n in names if n not in head)
    assert not any(r.match(n) for r in _regexes(matcher) for n in head)
    # the groups follow the forward pass (stem first, the head last), as layer-wise LR decay needs; >= 2 before it
    layer_of = group_parameters(model, matcher, reverse=True)
    layers = [layer_of[n] for n in names]
    assert layers == sorted(layers) and len(groups) - 1 >= 2
    if not coarse:
        assert len(groups) >= len(group_parameters(model, model.group_matcher(coarse=True)))


@pytest.mark.parametrize('name', OWN_MODELS)
def test_grad_checkpointing_keeps_outputs_and_gradients(name, monkeypatch):
    plain = _create(name).train()
    checkpointed = copy.deepcopy(plain)
    assert plain.grad_checkpointing is False
    checkpointed.set_grad_checkpointing()
    assert checkpointed.grad_checkpointing is True
    segments = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint',
                        lambda *args, **kwargs: segments.append(1) or checkpoint(*args, **kwargs))
    x, _ = _batch(plain)
    outputs = []
    for model in (plain, checkpointed):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the HPM head's "training forward without labels", as train.py's
            torch.manual_seed(2)  # the same dropout masks
            out = model(x)
            out.square().mean().backward()
        outputs.append(out)
        if model is plain:
            assert not segments
    assert len(segments) >= len(plain.feature_stages())  # one segment per block (SmallCNN: per stage)
    torch.testing.assert_close(outputs[1], outputs[0])
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None and q.grad is not None, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
    checkpointed.set_grad_checkpointing(False)
    segments.clear()
    with torch.no_grad():
        checkpointed.eval()(x)
    assert not segments


@pytest.mark.parametrize('name', OWN_MODELS)
def test_layer_decay_optimizer(name):
    model = _create(name)
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.7)
    scale_of = {id(p): group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    assert len(scale_of) == len(params)
    num_layers = len(group_parameters(model, model.group_matcher(coarse=False)))
    first, *_, last = params  # the stem's first parameter, the classifier's last
    assert scale_of[id(params[last])] == 1.0
    assert scale_of[id(params[first])] == pytest.approx(0.7 ** (num_layers - 1))


@pytest.mark.parametrize('name', ['hpm_wrn70_16', 'hpm_trades_wrn34_10', 'hpm_dm_preact_resnet18', 'hpm_small_cnn'])
def test_timm_train_py_steps_with_grad_checkpointing(name):
    """What timm's train.py --grad-checkpointing --layer-decay does with a model (create_model, then
    set_grad_checkpointing(enable=True), create_optimizer_v2, model(x) in train mode and the loss outside): two
    steps give the parameters that two steps without checkpointing give."""
    trained = []
    for grad_checkpointing in (False, True):
        model = _create(name, num_classes=2)
        if grad_checkpointing:
            model.set_grad_checkpointing(enable=True)
        model.train()
        start = copy.deepcopy(model.state_dict())
        optimizer = create_optimizer_v2(model, opt='sgd', lr=0.01, momentum=0.9, weight_decay=2e-5, layer_decay=0.7)
        loss_fn = nn.CrossEntropyLoss()
        x, y = _batch(model, 4)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the HPM head's "training forward without labels"
            for _ in range(2):
                torch.manual_seed(3)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        assert torch.isfinite(loss)
        params = {n: p.detach() for n, p in model.named_parameters()}
        assert all(not torch.equal(p, start[n]) for n, p in params.items() if p.ndim > 1)  # every weight moved
        trained.append(params)
    for n, p in trained[0].items():
        torch.testing.assert_close(trained[1][n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TIMM_REPO'), reason='needs a pytorch-image-models checkout: TIMM_REPO=<path> '
                    '(timm\'s train.py is not in its wheel); recipes/checks/timm_grad_checkpointing.sh runs it')
def test_timm_train_py_grad_checkpointing_on_an_hpm_wrn(tmp_path):
    """timm's own train.py --grad-checkpointing --layer-decay 0.7 on hpm_wrn28_10 (depth 10, width 1), 2 steps."""
    result = subprocess.run(['bash', str(ROOT / 'recipes' / 'checks' / 'timm_grad_checkpointing.sh'),
                             os.environ['TIMM_REPO']], capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'TMPDIR': str(tmp_path), 'PYTHON': sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'OK: timm\'s train.py --grad-checkpointing' in result.stdout
    assert re.search(r'Train: 0 \[\s*1/2', result.stdout)  # two steps
