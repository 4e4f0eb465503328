"""MSA's local search over every stage's breaks (RealisedBatch.search) on batch-dependent toy targets whose best
realisable batch is known by enumerating every assignment of the images that broke each sample."""
import itertools

import pytest
import torch

from timm_hpm.eval.realised import RealisedBatch


class AtMostTwo:
    """Labels 0; a sample is misclassified when its image is 1 and at most two images of the batch are 1 (so any
    one or two breaks are realisable together, three never are). Counts its forward passes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        on = x.flatten(1)[:, 0] >= 1
        wrong = on & (int(on.sum()) <= 2)
        return torch.stack([(~wrong).float(), wrong.float()], 1)


class Context:
    """A random batch-dependent target: sample i is misclassified when its image is 1 and the batch's count of
    images at 1 is in its own set of counts (seeded)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.allowed = [set((torch.randperm(n + 1, generator=g)[:max(1, n // 2)]).tolist()) for _ in range(n)]

    def __call__(self, x):
        on = x.flatten(1)[:, 0] >= 1
        count = int(on.sum())
        wrong = torch.tensor([bool(on[i]) and count in self.allowed[i] for i in range(len(on))])
        return torch.stack([(~wrong).float(), wrong.float()], 1)


def _batch(target, n):
    x, y = torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long)
    batch = RealisedBatch(target, x, y)
    for i in range(n):  # candidate i: sample i's image at 1 alone (it breaks i, if i breaks alone)
        alone = x.clone()
        alone[i] = 1
        batch.consider(f'alone{i}', alone, torch.ones(n, dtype=torch.bool))
    return batch


def _best(target, n):
    """The fewest correct samples of any batch made of the clean images and the candidates' images."""
    y = torch.zeros(n, dtype=torch.long)
    return min(int((target(torch.tensor(bits, dtype=torch.float).view(n, 1, 1, 1)).argmax(1) == y).sum())
               for bits in itertools.product((0, 1), repeat=n))


def test_search_keeps_a_break_the_combination_loses():
    target = AtMostTwo()
    batch = _batch(target, 3)
    assert int(batch.correct.sum()) == 2 and int(batch.union.sum()) == 0  # one break taken; each breaks alone
    batch.combine(3)  # round 1 puts both other images in at once: three at 1, nothing broken; not taken
    assert int(batch.correct.sum()) == 2 and 'combined/search' not in batch.candidates
    target.calls = 0
    batch.search(5)
    calls = target.calls
    assert int(batch.correct.sum()) == 1 == _best(target, 3)  # two of three: the most any one batch breaks
    assert batch.candidates['combined/search'].tolist() == batch.correct.tolist()
    assert int(batch.union.sum()) == 0  # the union stays a bound no batch reaches here
    # sweep 1: sample 1's image kept, sample 2's tried and refused; sweep 2: sample 2 tried again, nothing kept;
    # then the final batch scored whole as a candidate
    assert calls == 4


def test_search_zero_sweeps_and_nothing_to_gain_change_nothing():
    target = AtMostTwo()
    batch = _batch(target, 3)
    before = (batch.x_adv.clone(), dict(batch.candidates), list(batch.stages))
    batch.search(0)
    assert torch.equal(batch.x_adv, before[0]) and batch.candidates == before[1] and batch.stages == before[2]
    batch.search(3)
    batch.search(3)  # a second search from its own result keeps nothing: no second candidate
    assert batch.stages.count('combined/search') == 1


@pytest.mark.parametrize('seed', range(6))
def test_search_ends_at_a_local_optimum_never_worse(seed):
    n = 6
    target = Context(n, seed)
    batch = _batch(target, n)
    batch.combine(3)
    combined = int(batch.correct.sum())
    batch.search(10)
    found = int(batch.correct.sum())
    assert _best(target, n) <= found <= combined
    y = torch.zeros(n, dtype=torch.long)
    for i in range(n):  # no single image swapped in lowers the count further (the sweeps ended on their own)
        if batch.correct[i] and batch.union[i] == 0:
            swapped = batch.x_adv.clone()
            swapped[i] = 1
            assert int((target(swapped).argmax(1) == y).sum()) >= found
    assert torch.all((batch.x_adv == 0) | (batch.x_adv == 1))  # only the candidates' images, nothing new


def test_msa_runs_the_search_after_the_combinations_with_the_configured_sweeps(monkeypatch):
    """attack_batch calls the search with ``search_sweeps`` after the combinations; 0 (MSA v4's default) keeps
    every figure as before."""
    from test_msa_stages import FAST, K, linear_hpm_problem

    from timm_hpm.eval import MSAConfig, ModelView, attack_batch
    model, x, y = linear_hpm_problem()
    model.eval()
    target, views = ModelView(model, 'dynamic'), {'soft': ModelView(model, 'soft')}
    base = MSAConfig(eps=0.05, **FAST)
    figures = ('clean', 'realised', 'union', 'candidates')
    plain = attack_batch(target, views, x, y, base, seed=0, num_classes=K)
    calls = []
    search = RealisedBatch.search

    def spy(self, sweeps):
        calls.append(sweeps)
        return search(self, sweeps)

    monkeypatch.setattr(RealisedBatch, 'search', spy)
    again = attack_batch(target, views, x, y, base, seed=0, num_classes=K)
    assert calls == [0] and all(again[k] == plain[k] for k in figures)
    searched = attack_batch(target, views, x, y, MSAConfig(eps=0.05, search_sweeps=2, **FAST), seed=0,
                            num_classes=K)
    assert calls == [0, 2] and sum(searched['realised']) <= sum(plain['realised'])
    assert all(s <= p for s, p in zip(searched['union'], plain['union']))  # the search loses no break
    assert set(searched['candidates']) - set(plain['candidates']) <= {'combined/search'}


def test_search_sweeps_is_checked_and_a_flag():
    from timm_hpm.eval import MSAConfig
    with pytest.raises(ValueError, match='search_sweeps.*--search-sweeps'):
        MSAConfig(eps=0.1, search_sweeps=-1)
