"""timm_hpm.eval.msa: the Mixed Surrogate Attack as a public API for any batch-dependent model, and the realised
batch built from every stage's breaks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_hpm
from timm_hpm.eval import MSAConfig, make_autoattack
from timm_hpm.eval.msa import msa
from timm_hpm.eval.realised import RealisedBatch

K = 4
FAST = dict(apgd_iters=20, autoattack_iters=20, autoattack_version='custom', autoattack_attacks=['apgd-ce', 'apgd-t'])


def _patterns(n: int, seed: int):
    """Four classes of 8x8 grey images: a fixed random pattern per class plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    patterns = torch.rand(K, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return (0.5 * patterns[y] + 0.5 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1), y


class TransductiveBN(nn.Module):
    """The classic transductive defence: batch norm that uses the test batch's own statistics (no running
    statistics), here on the logits. Its predictions depend on the whole batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 4 * 4, K)
        self.bn = nn.BatchNorm1d(K, affine=False, track_running_stats=False)
        self.num_classes = K

    def forward(self, x):
        return self.bn(self.fc(F.avg_pool2d(F.relu(self.conv(x)), 2).flatten(1)))


@pytest.fixture()
def one_thread():
    """Training and attack on one thread: the float reductions, and so the trained model and the attack's path,
    are then the same whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def transductive(one_thread):
    torch.manual_seed(0)
    model = TransductiveBN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g_seed = 1
    for step in range(300):
        x, y = _patterns(64, g_seed * 10_000 + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _patterns(64, 2)
    return model.eval(), x, y


def test_autoattacks_own_bookkeeping_is_no_fixed_batch_figure_and_msas_is(transductive):
    """On a transductive model AutoAttack's own verdict (it re-batches the still-robust points) is not the accuracy
    of any batch: re-scoring its own images on the fixed batch gives another figure (which way depends on the
    float path: on some CPUs it claims more, on others less). MSA's figure is one concrete batch, at most
    AutoAttack's re-scored images."""
    model, x, y = transductive
    eps = 0.12
    with torch.no_grad():
        assert bool((model(x).argmax(1) == y).all())
    adversary = make_autoattack(model, eps, version='custom', attacks=['apgd-ce', 'apgd-t'], num_classes=K,
                                n_iter=20, seed=0)
    x_aa, y_adv = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    own = float((y_adv == y).float().mean())  # AutoAttack's figure: sub-batches of still-robust points
    with torch.no_grad():
        own_rescored = float((model(x_aa).argmax(1) == y).float().mean())
    assert abs(own - own_rescored) >= 1 / len(y)  # its printout is not what its images do to the fixed batch
    result = msa(model, x, y, eps, config=MSAConfig(eps=eps, **FAST))
    with torch.no_grad():  # MSA's figure is one concrete batch: re-scoring it whole gives the same number
        rescored = float((model(result['x_adv']).argmax(1) == y).float().mean())
    delta = (result['x_adv'] - x).abs().amax()
    assert rescored == result['robust_acc'] and float(delta) <= eps + 1e-6
    assert result['robust_acc'] <= own_rescored
    assert result['union_acc'] <= result['robust_acc'] <= result['candidate_acc']['autoattack']
    assert 'target/apgd-ce' in result['candidate_acc']  # the target was attacked through itself


def test_msa_defaults_to_an_hpm_models_head_modes_and_restores_its_mode():
    torch.manual_seed(0)
    model = timm_hpm.convert_to_hpm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, K)))
    x, y = _patterns(32, 3)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.hpm_head.init_prototypes_([(feats, model.hpm_head.fc_forward(feats).argmax(1))])
    model.train()
    cfg = MSAConfig(eps=0.05, autoattack=False, apgd_iters=5, n_target_classes=1, target_n_target_classes=1)
    result = msa(model, x, y, 0.05, config=cfg, batch_size=16)
    stages = {name.split('/')[0] for name in result['candidate_acc']}
    assert {'fc', 'static', 'soft', 'dynamic'} <= stages and 'target' not in stages  # dynamic is the target's view
    assert model.training and model.hpm_head.mode == 'dynamic'
    assert result['correct'].shape == (32,) and result['x_adv'].shape == x.shape


def test_msa_refuses_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    x, y = _patterns(8, 0)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        msa(model, x * 2, y, 0.1)
    with pytest.raises(ValueError, match='NaN'):
        msa(model, x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True),
                                 float('nan')), y, 0.1)
    with pytest.raises(ValueError, match='shape'):
        msa(model, x[0], y, 0.1)
    with pytest.raises(ValueError, match='config.eps'):
        msa(model, x, y, 0.1, config=MSAConfig(eps=0.2))


class _Threshold(nn.Module):
    """1x1 images; class 1 iff the pixel exceeds 0.5 (batch-independent, so every break is realisable)."""

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        return torch.cat([0.5 - v, v - 0.5], dim=1)


def test_the_realised_batch_combines_breaks_from_different_stages():
    """Without the cascade a later candidate replaces every image, so the stage-by-stage realised batch keeps only
    one stage's breaks; the combination puts both stages' breaks into one batch, scored whole."""
    x, y = torch.full((6, 1, 1, 1), 0.4), torch.zeros(6, dtype=torch.long)
    batch = RealisedBatch(_Threshold(), x, y)
    everything = torch.ones(6, dtype=torch.bool)
    a, b = x.clone(), x.clone()
    a[[0, 1]] = 0.6
    b[[2, 3, 4]] = 0.6
    batch.consider('a/apgd-ce', a, everything)
    batch.consider('b/apgd-ce', b, everything)
    assert batch.correct.tolist() == [True, True, False, False, False, True]  # b's batch: 3 broken beats a's 2
    batch.combine(rounds=3)
    assert batch.correct.tolist() == [False] * 5 + [True]
    assert batch.stages[-1] == 'combined/round1' and len(batch.stages) == 3  # nothing left for round 2
    assert torch.equal(_Threshold()(batch.x_adv).argmax(1) == y, batch.correct)


def test_msa_sees_an_hpm_model_behind_a_normalising_view():
    """timm's ImageNet-style models are attacked through timm_hpm.attacks.normalized_view: msa() still finds the
    HPM head's views."""
    import timm

    from timm_hpm.attacks import NormalizedInput
    torch.manual_seed(0)
    model = timm.create_model('hpm_preact_resnet18', in_chans=1, img_size=8, num_classes=K).eval()
    model.hpm_head.prototypes_initialized.fill_(True)
    view = NormalizedInput(model, mean=(0.5,), std=(0.25,))
    x, _ = _patterns(8, 4)
    with torch.no_grad():
        y = view(x).argmax(1)  # the dynamic head's own predictions: every image starts correct
    cfg = MSAConfig(eps=0.03, autoattack=False, apgd_iters=2, n_target_classes=1, target_n_target_classes=1,
                    combine_rounds=0)
    result = msa(view, x, y, 0.03, config=cfg)
    assert result['clean_acc'] == 1.0
    assert {name.split('/')[0] for name in result['candidate_acc']} == {'fc', 'static', 'soft', 'dynamic'}


class _ZScore(nn.Module):
    """1x1 images of one class (0); an image is classified 1 when its pixel lies more than 1.2 standard deviations
    above the batch's mean (population statistics of the batch): a batch-dependent model with a closed form."""

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        z = (v - v.mean()) / (v.std(unbiased=False) + 1e-6)
        return torch.stack([1.2 - z, z - 1.2], dim=1)


def test_iterates_are_whole_batches_scored_whole_and_their_mixture_is_not_assumed():
    """Batch a breaks images 0 and 1 (two outliers among six), batch b images 2 and 3; the per-sample mixture of
    both (four raised images) breaks none. The iterates' union counts all four, each broken in a concrete batch;
    the realised batch takes one whole batch (two broken) and the combination, scored whole, is refused."""
    from timm_hpm.eval.realised import IterateScores
    model = _ZScore()
    x, y = torch.full((6, 1, 1, 1), 0.5), torch.zeros(6, dtype=torch.long)
    a, b = x.clone(), x.clone()
    a[[0, 1]], b[[2, 3]] = 0.7, 0.7
    mixture = torch.where(torch.tensor([True] * 4 + [False] * 2).view(-1, 1, 1, 1), 0.7, x)
    batch = RealisedBatch(model, x, y)
    iterates = IterateScores(batch, lambda xa, logits: logits.argmax(1) == y)
    for xa in (x, a, b, mixture):
        iterates(xa, model(xa))
    assert iterates.broken.tolist() == [True] * 4 + [False] * 2
    assert torch.equal(iterates.images[:2], a[:2]) and torch.equal(iterates.images[2:4], b[2:4])
    assert torch.equal(iterates.best_x, a)  # the first batch with the fewest correct
    batch.consider('s/apgd-ce', mixture, torch.ones(6, dtype=torch.bool))  # the per-sample best images
    assert batch.candidates['s/apgd-ce'].all()  # scored whole, the mixture breaks nothing
    batch.consider_iterates('s/apgd-ce', iterates, batch.correct.clone())
    assert batch.candidates['s/apgd-ce:best-iterate'].tolist() == [False, False] + [True] * 4
    assert batch.candidates['s/apgd-ce:iterates'].tolist() == [False] * 4 + [True] * 2
    assert batch.union.tolist() == [False] * 4 + [True] * 2
    batch.combine(rounds=3)  # a's batch with b's images for 2 and 3 is the mixture again: not taken
    assert batch.correct.tolist() == [False, False] + [True] * 4
    assert torch.equal(model(batch.x_adv).argmax(1) == y, batch.correct)


def test_apgd_shows_its_observer_every_batch_it_evaluates_and_returns_only_observed_images():
    from timm_hpm.attacks import apgd
    model, x, y = _ZScoreImages()
    seen = []
    out = apgd(model, x, y, 0.1, n_iter=12, generator=torch.Generator().manual_seed(0),
               observe=lambda xa, logits: seen.append((xa.clone(), logits.clone())))
    assert len(seen) >= 13  # the start and every iterate (and each restart from the best points)
    for xa, logits in seen:
        assert float((xa - x).abs().amax()) <= 0.1 + 1e-6
        assert torch.allclose(logits, model(xa))
    observed = torch.stack([xa for xa, _ in seen])  # (batches, n, ...)
    for i in range(len(x)):  # each returned image is one some evaluated batch held
        assert any(torch.equal(out[i], observed[t, i]) for t in range(len(seen)))


def _ZScoreImages():
    """A small batch-dependent conv model on 8x8 images (transductive normalisation of its logits)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, K),
                        nn.BatchNorm1d(K, affine=False, track_running_stats=False)).eval()
    x, y = _patterns(16, 7)
    return net, x, y


def test_scoring_iterates_strengthens_msa_on_the_transductive_model(transductive):
    """The same attacks (same seeds) with and without scoring their iterates. Every batch the target was evaluated
    on counts in the union, which falls far below MSA v2's here (0.11 vs 0.25 on one thread); the realised batch
    stays one concrete batch (its greedy path, and so its figure, may differ by an image either way)."""
    from dataclasses import replace
    model, x, y = transductive
    eps = 0.12
    cfg = MSAConfig(eps=eps, **FAST)
    v3 = msa(model, x, y, eps, config=cfg)
    v2 = msa(model, x, y, eps, config=replace(cfg, score_iterates=False))
    assert any(name.endswith(':best-iterate') for name in v3['candidate_acc'])
    assert not any(':' in name for name in v2['candidate_acc'])
    assert v3['union_acc'] <= v2['union_acc'] - 4 / len(y)
    assert v3['union_acc'] <= min(v3['candidate_acc'].values())
    with torch.no_grad():
        assert float((model(v3['x_adv']).argmax(1) == y).float().mean()) == v3['robust_acc']
