"""The sensitivity analysis against closed forms: a linear FC head and a prototype head with known weights."""
import json
import math

import pytest
import timm
import torch

import timm_hpm
from timm_hpm.analysis import (feature_sensitivity, flip_distance, head_logit_fn, logit_margin, margin_gradient,
                               plot_sensitivity, robust_accuracy_curve, summarize)


def _linear_case(seed=0, n=64, d=7, k=5):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    f = torch.randn(n, d, generator=g) * 2
    y = (f @ w.t() + b).argmax(1)
    y[::4] = torch.randint(0, k, (len(y[::4]),), generator=g)  # some misclassified samples too
    return w, b, f, y


def _linear_closed_form(w, b, f, y):
    """Margin gradient w_y - w_r; distance to the nearest pairwise hyperplane z_y = z_k (0 if misclassified)."""
    z = f @ w.t() + b
    margin, runner = logit_margin(z, y)
    grad = w[y] - w[runner]
    dist = torch.full((len(y),), float('inf'))
    for k in range(w.shape[0]):
        d_k = (z.gather(1, y[:, None]).squeeze(1) - z[:, k]) / (w[y] - w[k]).norm(dim=1)
        dist = torch.where(y == k, dist, torch.minimum(dist, d_k))
    return margin, grad, dist.clamp_min(0)


def test_margin_and_runner_up():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    margin, runner = logit_margin(logits, torch.tensor([0, 0]))
    assert torch.allclose(margin, torch.tensor([0.5, -4.0]))
    assert runner.tolist() == [2, 1]
    with pytest.raises(ValueError, match='expected logits'):
        logit_margin(logits, torch.tensor([0]))


def test_linear_head_closed_form():
    w, b, f, y = _linear_case()
    fn = lambda feats: feats @ w.t() + b  # noqa: E731
    margin, grad, dist = _linear_closed_form(w, b, f, y)
    m, g = margin_gradient(fn, f, y)
    assert torch.allclose(m, margin, atol=1e-5)
    assert torch.allclose(g, grad, atol=1e-5)
    d, flipped = flip_distance(fn, f, y)
    assert flipped.all()
    assert torch.allclose(d, dist, rtol=1e-4, atol=1e-5)
    assert (d[margin < 0] == 0).all() and (d[margin > 0] > 0).all()


def test_prototype_head_closed_form():
    """z_k = -gamma ||f - p_k||^2: gradient 2 gamma (p_y - p_r), distance to the bisecting hyperplane."""
    g = torch.Generator().manual_seed(1)
    k, d, gamma = 6, 5, 0.37
    protos = torch.randn(k, d, generator=g) * 3
    f = torch.randn(80, d, generator=g) * 3
    y = torch.randint(0, k, (80,), generator=g)
    head = timm_hpm.HPMHead(d, k, mode='static', gamma_init=gamma)
    with torch.no_grad():
        head.dataset_prototypes.copy_(protos)
    fn = lambda feats: head.l2_logits(feats, head.dataset_prototypes)  # noqa: E731
    z = -gamma * torch.cdist(f, protos) ** 2
    margin, runner = logit_margin(z, y)
    sq = torch.cdist(f, protos) ** 2
    expected = torch.full((80,), float('inf'))
    for c in range(k):
        d_c = (sq[:, c] - sq.gather(1, y[:, None]).squeeze(1)) / (2 * (protos[y] - protos[c]).norm(dim=1))
        expected = torch.where(y == c, expected, torch.minimum(expected, d_c))
    expected = expected.clamp_min(0)
    m, grad = margin_gradient(fn, f, y)
    assert torch.allclose(m, margin, rtol=1e-4, atol=1e-4)
    assert torch.allclose(grad, 2 * gamma * (protos[y] - protos[runner]), rtol=1e-4, atol=1e-4)
    dist, flipped = flip_distance(fn, f, y)
    assert flipped.all()
    assert torch.allclose(dist, expected, rtol=1e-4, atol=1e-4)


def test_flip_distance_nonlinear_head_flips():
    """For a curved head DeepFool iterates; the move it reports does flip the decision."""
    w, b, f, y = _linear_case(seed=3)
    fn = lambda feats: torch.tanh(feats) @ w.t() + b  # noqa: E731
    y = fn(f).argmax(1)
    d, flipped = flip_distance(fn, f, y, max_iter=100)
    assert flipped.float().mean() > 0.9
    assert (d[flipped] > 0).all() and torch.isinf(d[~flipped]).all()


def test_flip_distance_rejects_images():
    with pytest.raises(ValueError, match='pooled features'):
        flip_distance(lambda t: t, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


@pytest.fixture(scope='module')
def tiny_hpm():
    torch.manual_seed(0)
    model = timm.create_model('hpm_small_cnn', num_classes=4).eval()
    x = torch.rand(24, 1, 28, 28)
    y = torch.arange(24) % 4
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        # an FC head that fits the labels exactly (least squares on centred features): a fragile classifier; the
        # wrong classes' logits are 1 apart, so the runner-up is never decided by rounding (with equal wrong-class
        # logits it changed with the batch size on some CPUs)
        centred = feats - feats.mean(0)
        target = 10 * torch.nn.functional.one_hot(y, 4).float() + torch.arange(4.0)
        model.hpm_head.weight.copy_(torch.linalg.lstsq(centred, target - target.mean(0)).solution.t())
        model.hpm_head.bias.copy_(target.mean(0) - model.hpm_head.weight @ feats.mean(0))
        model.hpm_head.init_prototypes_([(feats, y)])
    return model, x, y


def test_feature_sensitivity_matches_head_closed_forms(tiny_hpm):
    model, x, y = tiny_hpm
    res = feature_sensitivity(model, x, y, batch_size=10, progress=False)
    head = model.hpm_head
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    margin, grad, dist = _linear_closed_form(head.weight, head.bias, feats, y)
    assert torch.allclose(torch.tensor(res['fc']['margin']), margin, atol=1e-4)
    assert torch.allclose(torch.tensor(res['fc']['feature_grad_norm']), grad.norm(dim=1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(torch.tensor(res['fc']['flip_distance']), dist, rtol=1e-3, atol=1e-5)
    assert res['fc']['correct'] == (margin > 0).tolist()
    # static head: the margin gradient is 2 gamma (p_y - p_r), whatever the features
    m_s, runner = logit_margin(head_logit_fn(model, 'static')(feats), y)
    expected = 2 * head.gamma * (head.dataset_prototypes[y] - head.dataset_prototypes[runner]).norm(dim=1)
    assert torch.allclose(torch.tensor(res['static']['feature_grad_norm']), expected.detach(), rtol=1e-4)
    # input-space first-order estimate is margin / l1 norm of the input gradient
    est = torch.tensor(res['static']['linf_flip_estimate'])
    l1 = torch.tensor(res['static']['input_grad_l1'])
    # compared in margin units with atol 0.05: the static head's logits (-gamma ||f - mu||^2, hundreds here) cancel
    # large terms, and float32 rounding of the batches of 10 and of the whole batch differs by a few hundredths on
    # some CPUs; a wrong formula (another norm, no clamp) is off by far more
    assert torch.allclose(est * l1, m_s.detach().clamp_min(0), rtol=1e-3, atol=0.05)
    summary = summarize(res)
    assert summary['fc']['n_correct'] == int((margin > 0).sum())
    assert summary['fc']['clean_acc'] == pytest.approx(float((margin > 0).float().mean()))


def test_analysis_refuses_bad_models_and_heads(tiny_hpm):
    model, x, y = tiny_hpm
    with pytest.raises(ValueError, match='batch-independent'):
        head_logit_fn(model, 'dynamic')
    fresh = timm.create_model('hpm_small_cnn', num_classes=4).eval()
    with pytest.raises(ValueError, match='never initialised'):
        feature_sensitivity(fresh, x, y, progress=False)
    model.train()
    try:
        with pytest.raises(ValueError, match='eval mode'):
            robust_accuracy_curve(model, x, y, [0.1], progress=False)
    finally:
        model.eval()
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        feature_sensitivity(model, x * 3, y, progress=False)


def test_robust_accuracy_curve_is_monotone_and_starts_clean(tiny_hpm, tmp_path):
    model, x, y = tiny_hpm
    eps = [0.0, 0.02, 0.3]
    curves = robust_accuracy_curve(model, x, y, eps, n_iter=10, batch_size=12, progress=False)
    with torch.no_grad():
        for mode in ('fc', 'static'):
            with model.hpm_head.using_mode(mode):
                assert curves[mode][0] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))
    for accs in curves.values():
        assert all(a >= b for a, b in zip(accs, accs[1:]))
        assert accs[-1] < accs[0]  # eps 0.3 breaks an untrained model
    result = {'robust_accuracy': {'eps': eps, 'norm': 'Linf', 'accuracy': curves},
              'per_sample': feature_sensitivity(model, x, y, progress=False)}
    path = tmp_path / 'fig.png'
    plot_sensitivity(result, path, title='tiny')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    json.dumps(result)  # serialisable (inf distances become Infinity, which json writes)
    assert not math.isnan(summarize(result['per_sample'])['static']['clean_acc'])


def test_figure_titles_never_show_an_absolute_path(tmp_path, monkeypatch):
    from _recipes import load_recipe
    display_name = load_recipe('sensitivity').display_name
    monkeypatch.chdir(tmp_path)
    assert display_name('hpm_small_cnn.fmnist_hpm') == 'hpm_small_cnn.fmnist_hpm'
    assert display_name(f'local-dir:{tmp_path}/runs/x/final') == 'local-dir:runs/x/final'
    assert display_name('local-dir:/elsewhere/runs/y/final') == 'local-dir:.../y/final'
