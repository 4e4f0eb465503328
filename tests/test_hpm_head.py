"""HPMHead against hand-computed truth (docs/method.md section 2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_hpm import HPM_MODES, HPMHead

# A 3-sample, 2-class, 2-d example small enough to compute by hand.
W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
F3 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])  # FC predictions: 0, 1, 0
MU = torch.tensor([[0.0, 0.0], [0.0, 2.0]])


def make_head(alpha=0.5, momentum=0.9, mode='dynamic', tau=1.0, gamma=1.0):
    head = HPMHead(2, 2, alpha=alpha, momentum=momentum, mode=mode, tau=tau, gamma_init=gamma)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.zero_()
        head.dataset_prototypes.copy_(MU)
    return head.eval()


def test_dynamic_forward_equals_hand_computation():
    # c0 = mean(f1, f3) = (2.5, 0.5), c1 = f2 = (0, 1); p0 = (1.25, 0.25), p1 = (0, 1.5); s = -||f - p||^2
    expected = torch.tensor([[-0.625, -6.25], [-2.125, -0.25], [-3.625, -9.25]])
    torch.testing.assert_close(make_head()(F3), expected)


def test_gamma_scales_l2_logits():
    expected = 3.0 * torch.tensor([[-0.625, -6.25], [-2.125, -0.25], [-3.625, -9.25]])
    torch.testing.assert_close(make_head(gamma=3.0)(F3), expected)


def test_static_mode_and_alpha_one_use_dataset_prototypes_only():
    expected = torch.tensor([[-4.0, -8.0], [-1.0, -1.0], [-10.0, -10.0]])
    torch.testing.assert_close(make_head(mode='static')(F3), expected)
    torch.testing.assert_close(make_head(alpha=1.0)(F3), expected)
    features = torch.randn(7, 2)
    torch.testing.assert_close(make_head(alpha=1.0)(features), make_head(mode='static')(features))


def test_fc_mode_is_the_linear_layer():
    head = make_head(mode='fc')
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(head(F3), F3 @ W.t() + torch.tensor([0.5, -0.5]))


def test_absent_class_uses_dataset_prototype():
    features = torch.tensor([[2.0, 0.0], [1.0, 0.5], [3.0, 1.0]])  # all predicted 0: class 1 absent
    c0 = features.mean(0)
    p = torch.stack([0.5 * MU[0] + 0.5 * c0, MU[1]])
    expected = -torch.cdist(features, p) ** 2
    torch.testing.assert_close(make_head()(features), expected)


def test_batch_of_one_pulls_towards_the_fc_prediction():
    # c for the predicted class equals f itself: p0 = 0.5 mu0 + 0.5 f = (1, 0); p1 = mu1.
    out = make_head()(torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -8.0]]))


def test_soft_mode_formula():
    head = make_head(mode='soft')
    probs = torch.softmax(F3 @ W.t(), dim=1)
    counts = probs.sum(0)
    c = probs.t() @ F3 / counts[:, None]
    weight = 0.5 * counts.clamp(max=1)[:, None]
    p = MU + weight * (c - MU)
    torch.testing.assert_close(head(F3), -torch.cdist(F3, p) ** 2)


def test_ste_backward_equals_softmax_path_gradient():
    """d s(f, A(f)) / d theta = ds/dtheta at A = H (A held fixed) + ds/dA at A = H, pulled back through P."""
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    head = HPMHead(5, 3, tau=0.7, alpha=0.3, gamma_init=0.8).eval()
    with torch.no_grad():
        head.weight.normal_()
        head.dataset_prototypes.normal_()
    upstream = torch.randn(6, 3)

    f = features.clone().requires_grad_(True)
    (head(f) * upstream).sum().backward()
    grad_f, grad_w = f.grad.clone(), head.weight.grad.clone()
    head.zero_grad()

    # Explicit construction: the prototypes as a function of an assignment matrix A given from outside.
    def logits_given(f, assignment, counts):
        c = assignment.t() @ f / counts.clamp_min(1)[:, None]
        mixed = 0.3 * head.dataset_prototypes + 0.7 * c
        p = torch.where((counts > 0)[:, None], mixed, head.dataset_prototypes)
        return -head.gamma * torch.cdist(f, p) ** 2

    f1 = features.clone().requires_grad_(True)
    z = F.linear(f1, head.weight, head.bias)
    hard = F.one_hot(z.argmax(1), 3).float()
    a_leaf = hard.clone().requires_grad_(True)
    out = (logits_given(f1, a_leaf, hard.sum(0)) * upstream).sum()
    g_f_direct, g_a = torch.autograd.grad(out, (f1, a_leaf), retain_graph=True)
    probs = torch.softmax(z / 0.7, dim=1)
    g_f_soft, g_w_soft = torch.autograd.grad(probs, (f1, head.weight), grad_outputs=g_a)
    torch.testing.assert_close(grad_f, g_f_direct + g_f_soft, rtol=1e-4, atol=1e-5)
    # The FC weights receive gradient only through the softmax path (the forward uses the hard assignment).
    torch.testing.assert_close(grad_w, g_w_soft, rtol=1e-4, atol=1e-5)
    assert grad_w.abs().sum() > 0


def test_ema_update_formula():
    head = make_head(momentum=0.9).train()
    logits_before = make_head()(F3)
    out = head(F3, targets=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(out, logits_before)  # the forward sees the prototypes before the update
    torch.testing.assert_close(head.dataset_prototypes, torch.tensor([[0.25, 0.05], [0.0, 1.9]]))


def test_ema_update_leaves_absent_classes():
    head = make_head(momentum=0.5).train()
    head(F3[:1], targets=torch.tensor([0]))
    torch.testing.assert_close(head.dataset_prototypes, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


@pytest.mark.parametrize('train, targets', [(False, torch.tensor([0, 1, 0])), (True, None)])
def test_no_update_in_eval_mode_or_without_labels(train, targets):
    head = make_head().train(train)
    head(F3, targets=targets)
    torch.testing.assert_close(head.dataset_prototypes, MU)


def test_update_does_not_break_backward_in_static_mode():
    head = make_head(mode='static').train()
    f = F3.clone().requires_grad_(True)
    head(f, targets=torch.tensor([0, 1, 0])).sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_return_fc_gives_both_logits():
    out = make_head()(F3, return_fc=True)
    torch.testing.assert_close(out.fc_logits, F3 @ W.t())
    torch.testing.assert_close(out.logits, make_head()(F3))


def test_init_prototypes_class_means_and_gamma_calibration():
    torch.manual_seed(0)
    head = HPMHead(4, 3)
    feats = torch.randn(30, 4)
    labels = torch.arange(30) % 3
    batches = [(feats[i:i + 8], labels[i:i + 8]) for i in range(0, 30, 8)]
    counts = head.init_prototypes_(batches)
    torch.testing.assert_close(counts, torch.tensor([10.0, 10.0, 10.0]))
    means = torch.stack([feats[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(head.dataset_prototypes, means)
    assert bool(head.prototypes_initialized)
    head.mode = 'static'
    fc_spread = head.fc_forward(feats).std(1).mean()
    with torch.no_grad():
        l2_spread = head.eval()(feats).std(1).mean()
    torch.testing.assert_close(l2_spread, fc_spread, rtol=1e-4, atol=1e-5)


def test_init_prototypes_keeps_classes_without_samples():
    head = HPMHead(2, 3)
    before = head.dataset_prototypes.clone()
    head.init_prototypes_([(torch.ones(2, 2), torch.tensor([0, 0]))], calibrate_gamma=False)
    torch.testing.assert_close(head.dataset_prototypes[0], torch.ones(2))
    torch.testing.assert_close(head.dataset_prototypes[1:], before[1:])


def test_from_linear_copies_weights_and_starts_prototypes_at_fc_rows():
    linear = torch.nn.Linear(5, 3)
    head = HPMHead.from_linear(linear, alpha=0.2)
    torch.testing.assert_close(head.weight, linear.weight)
    torch.testing.assert_close(head.bias, linear.bias)
    torch.testing.assert_close(head.dataset_prototypes, linear.weight.detach())
    assert not bool(head.prototypes_initialized)
    # gamma 0.5 with prototypes at the FC rows: the static head ranks classes as the bias-free FC head does
    # up to -||w||^2 / 2; with equal-norm rows it is exactly the FC ranking.
    with torch.no_grad():
        linear.weight.copy_(F.normalize(linear.weight, dim=1))
        linear.bias.zero_()
    head = HPMHead.from_linear(linear, mode='static')
    x = torch.randn(10, 5)
    diff = head(x) - linear(x)
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff))


def test_mode_switching_and_validation():
    head = make_head()
    for mode in HPM_MODES:
        head.mode = mode
        assert head(F3).shape == (3, 2)
    with pytest.raises(ValueError, match='Unknown HPM mode'):
        head.mode = 'bogus'


def test_using_mode_restores():
    head = make_head()
    with head.using_mode('static'):
        assert head.mode == 'static'
    assert head.mode == 'dynamic'


@pytest.mark.parametrize('kwargs, message', [
    (dict(alpha=1.5), 'alpha'), (dict(tau=0.0), 'tau'), (dict(momentum=-0.1), 'momentum'),
    (dict(gamma_init=0.0), 'gamma_init'), (dict(mode='nope'), 'Unknown HPM mode'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HPMHead(2, 2, **kwargs)


def test_bad_inputs():
    head = make_head().train()
    with pytest.raises(ValueError, match=r'shape \(batch, 2\)'):
        head(torch.randn(3, 5))
    with pytest.raises(ValueError, match='integer class indices'):
        head(F3, targets=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r'lie in \[0, 1\]'):
        head(F3, targets=torch.tensor([0, 2, 0]))
    bad = F3.clone()
    bad[1, 0] = float('nan')
    with pytest.raises(ValueError, match='non-finite'):
        head(bad, targets=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(head.dataset_prototypes, MU)  # nothing was written


def test_bf16_autocast_keeps_l2_head_in_fp32():
    head = make_head()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(F3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, make_head()(F3))


def test_log_gamma_is_learnable_and_positive():
    head = make_head()
    head(F3).sum().backward()
    assert head.log_gamma.grad is not None
    assert math.isclose(float(head.gamma.detach()), 1.0)


def test_pseudo_labels_update_follows_the_fc_predictions_not_the_labels():
    # FC predictions of F3 are 0, 1, 0 (the labels below say 1, 0, 1): the EMA uses the predictions
    head = make_head(momentum=0.9)
    head.pseudo_labels = True
    head.prototypes_initialized.fill_(True)
    head.train()(F3, targets=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(head.dataset_prototypes, torch.tensor([[0.25, 0.05], [0.0, 1.9]]))


def test_pseudo_labels_on_an_uninitialised_head_start_from_the_batch_means():
    head = make_head(momentum=0.9)
    head.pseudo_labels = True
    head.train()(F3)
    torch.testing.assert_close(head.dataset_prototypes, torch.tensor([[2.5, 0.5], [0.0, 1.0]]))
    assert bool(head.prototypes_initialized)
