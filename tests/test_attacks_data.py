"""PGD against a linear model whose robust accuracy has a closed form; eps parsing; input checks; the
Fashion-MNIST IDX reader on real and corrupt files."""
import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import needs_fashion_mnist

from timm_hpm.attacks import NormalizedInput, accuracy, apgd, check_images, normalized_view, parse_eps, pgd
from timm_hpm.data import DatasetUnavailable, load_fashion_mnist, read_idx, synthetic_dataset


class TwoClassLinear(nn.Module):
    """Logits (0, w.x + b): class 1 iff w.x + b > 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _linear_problem(n=300, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    b = torch.tensor(0.1)
    # Interior points (0.3..0.7) so the [0, 1] box never binds for the eps used below.
    x = 0.3 + 0.4 * torch.rand(n, 1, 1, d, generator=g)
    y = (x.flatten(1) @ w + b > 0).long()
    return TwoClassLinear(w, b), x, y


@pytest.mark.parametrize('norm, eps', [('Linf', 0.05), ('L2', 0.3)])
def test_pgd_reaches_the_closed_form_robust_accuracy_of_a_linear_model(norm, eps):
    model, x, y = _linear_problem()
    margin = (x.flatten(1) @ model.w + model.b) * (2 * y - 1)
    dual = model.w.abs().sum() if norm == 'Linf' else model.w.norm()
    truth = (margin > eps * dual).float().mean()
    x_adv = pgd(model, x, y, eps=eps, steps=50, norm=norm, random_start=False)
    robust = accuracy(model, x_adv, y).float().mean()
    assert abs(float(robust) - float(truth)) <= 1 / len(y)
    # From a random start the fixed small steps leave part of the random offset: never below the truth
    # (no attack can be), and close to it.
    x_rand = pgd(model, x, y, eps=eps, steps=50, norm=norm, generator=torch.Generator().manual_seed(0))
    robust_rand = float(accuracy(model, x_rand, y).float().mean())
    assert float(truth) <= robust_rand <= float(truth) + 0.02
    delta = (x_adv - x).flatten(1)
    assert (delta.abs().max() <= eps + 1e-6) if norm == 'Linf' else bool((delta.norm(dim=1) <= eps + 1e-5).all())
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_more_steps_never_helps_the_model():
    model, x, y = _linear_problem()
    accs = [float(accuracy(model, pgd(model, x, y, 0.03, steps=s, random_start=False), y).float().mean())
            for s in (1, 5, 20)]
    assert accs == sorted(accs, reverse=True)


@pytest.mark.parametrize('text, value', [('8/255', 8 / 255), ('0.031', 0.031), (0.1, 0.1), (' 4 / 255 ', 4 / 255)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize('bad', ['8', 'abc', '1/0', -0.1, 0])
def test_parse_eps_rejects(bad):
    with pytest.raises(ValueError, match='eps'):
        parse_eps(bad)


def test_check_images():
    check_images(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        check_images(torch.rand(2, 3, 4, 4) * 2)
    x = torch.rand(2, 3, 4, 4)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        check_images(x)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        check_images(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match='labels must lie'):
        check_images(torch.rand(2, 3, 4, 4), torch.tensor([0, 5]), num_classes=2)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_corruption(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / 'a.gz', array)
    np.testing.assert_array_equal(read_idx(tmp_path / 'a.gz'), array)
    raw = gzip.open(tmp_path / 'a.gz').read()
    with gzip.open(tmp_path / 'short.gz', 'wb') as f:
        f.write(raw[:-3])
    with pytest.raises(ValueError, match='truncated or corrupt'):
        read_idx(tmp_path / 'short.gz')
    (tmp_path / 'junk').write_bytes(b'\x01\x02\x03\x04')
    with pytest.raises(ValueError, match='not an IDX file'):
        read_idx(tmp_path / 'junk')


def test_fashion_mnist_from_a_local_folder_and_missing_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (('train', 5), ('t10k', 3)):
        _write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, (n,)))
    ds = load_fashion_mnist('test', root=tmp_path)
    x, y = ds.tensors
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    monkeypatch.setattr('timm_hpm.data.FASHION_MNIST_DIRS', ())
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    with pytest.raises(DatasetUnavailable, match='apt-get install dataset-fashion-mnist'):
        load_fashion_mnist('test', root=tmp_path / 'nothing', download=False)


@needs_fashion_mnist
def test_real_fashion_mnist_test_split():
    x, y = load_fashion_mnist('test', download=False).tensors
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced


def test_synthetic_dataset_is_seeded():
    a, b = synthetic_dataset(16, seed=3), synthetic_dataset(16, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_normalized_view_only_for_models_that_normalise_outside():
    import timm
    import timm_hpm
    cifar = timm.create_model('hpm_preact_resnet18')
    assert normalized_view(cifar) is cifar  # takes [0, 1] images
    imagenet = timm_hpm.convert_to_hpm(timm.create_model('resnet18', num_classes=3)).eval()
    view = normalized_view(imagenet)
    assert isinstance(view, NormalizedInput) and view.module is imagenet
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(imagenet.pretrained_cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(imagenet.pretrained_cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(view(x), imagenet((x - mean) / std))
    assert timm_hpm.get_hpm_head(view) is imagenet.hpm_head


class _Unbreakable(nn.Module):
    """Always predicts class 0 with a loss that still has a gradient: APGD never fools it, so it returns its start."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s + 1e3, s, s], dim=1)


@pytest.mark.parametrize('norm, eps', [('Linf', 0.1), ('L2', 0.5)])
def test_apgd_random_start_is_autoattacks_on_the_ball_surface(norm, eps):
    """AutoAttack's APGD starts at full eps (Linf: the largest coordinate of the offset is eps; L2: its length is
    eps); a start at half the radius explores less of the ball."""
    x = torch.full((6, 1, 8, 8), 0.5)  # interior: the [0, 1] box does not cut the start
    y = torch.zeros(6, dtype=torch.long)
    start = apgd(_Unbreakable(), x, y, eps, norm, n_iter=0, generator=torch.Generator().manual_seed(0))
    delta = (start - x).flatten(1)
    size = delta.abs().amax(1) if norm == 'Linf' else delta.norm(dim=1)
    assert torch.allclose(size, torch.full_like(size, eps), atol=1e-6)
    if norm == 'Linf':  # the other coordinates spread uniformly over the cube, as AutoAttack's do
        assert 0.4 * eps < float(delta.abs().mean()) < 0.6 * eps



@pytest.mark.parametrize('norm, eps', [('Linf', 0.1), ('L2', 0.5)])
def test_apgd_starts_from_x_init_projected_onto_the_ball(norm, eps):
    """A given start replaces the random one: inside the ball it is kept, outside it is projected (Linf: clipped per
    coordinate; L2: scaled to the radius); a start of another shape is refused."""
    x = torch.full((2, 1, 8, 8), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    inside = x + eps / 16 * torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    outside = x + 4 * eps * torch.ones_like(x) / (8 if norm == 'L2' else 1)
    start = apgd(_Unbreakable(), x, y, eps, norm, n_iter=0, x_init=torch.cat([inside[:1], outside[1:]]))
    assert torch.allclose(start[0], inside[0], atol=1e-7)
    delta = (start[1] - x[1]).flatten()
    if norm == 'Linf':
        assert torch.allclose(delta, torch.full_like(delta, eps), atol=1e-6)
    else:
        assert abs(float(delta.norm()) - eps) < 1e-5 and float(delta.min()) > 0  # the same direction, at the radius
    with pytest.raises(ValueError, match='one start per image'):
        apgd(_Unbreakable(), x, y, eps, norm, n_iter=0, x_init=x[:1])


class _Centre(nn.Module):
    def forward(self, x):
        return x - 0.5


def test_apgd_is_not_weaker_than_autoattacks_own_apgd():
    """Our whole-batch APGD-CE against AutoAttack's (pyautoattack) on the same small CNN, same iterations, one
    restart: it breaks at least as many images, up to one image of seed noise."""
    from timm_hpm.eval import make_autoattack, run_autoattack
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    model = nn.Sequential(_Centre(), cnn).eval()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correct
    eps = 0.03
    ours = accuracy(model, apgd(model, x, y, eps, n_iter=50, generator=torch.Generator().manual_seed(0)), y)
    adversary = make_autoattack(model, eps, version='custom', attacks=['apgd-ce'], seed=0, n_iter=50,
                                device=torch.device('cpu'))
    theirs = accuracy(model, run_autoattack(adversary, x, y, batch_size=64), y)
    assert 0 < int(theirs.sum()) < len(y)  # a non-trivial problem
    assert int(ours.sum()) <= int(theirs.sum()) + 1
