"""Every committed MSA run folder: its eval.json is what its unit files aggregate to today (the figures the READMEs
quote are reproducible from the units), and no stage's figure is below the realised batch (each stage's figure is
its best whole batch, or the batch as it ended where the stage had nothing to do; the realised batch is the best of
all)."""
import json
from pathlib import Path

import pytest
import torch

from timm_hpm.eval import aggregate
from timm_hpm.eval.results import _aggregate_batching

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted(p.parent for p in ROOT.glob('results/**/eval.json') if (p.parent / 'attack').is_dir()
              and json.loads(p.read_text()).get('protocol') == 'msa')
COMPUTED = ('batchings', 'per_surrogate_acc', 'msa_acc', 'msa_union_acc', 'clean_acc', 'autoattack_acc')


def test_there_are_committed_runs():
    assert len(RUNS) >= 10


@pytest.mark.parametrize('run', RUNS, ids=[r.name for r in RUNS])
def test_a_committed_run_aggregates_to_its_eval_json(run):
    recorded = json.loads((run / 'eval.json').read_text())
    today = aggregate(run / 'attack')
    assert {k: today.get(k) for k in COMPUTED} == {k: recorded.get(k) for k in COMPUTED}
    for name, b in today['batchings'].items():
        if 'per_surrogate_acc' in b:
            assert b['realised_acc'] <= min(b['per_surrogate_acc'].values()) + 1e-12, name
        assert b['union_acc'] <= b['realised_acc'] <= b['clean_acc'], name


def test_a_stage_with_nothing_to_do_in_one_batch_counts_that_batch_as_it_ended(tmp_path):
    """Two batches of two images; only the second has a combination candidate. The first batch's 'combined' figure
    is its realised batch (as msa() counts it), not zero."""
    T, F = True, False
    units = [{'indices': [0, 1], 'clean': [T, T], 'realised': [T, F], 'union': [T, F],
              'candidates': {'autoattack': [T, F]}},
             {'indices': [2, 3], 'clean': [T, T], 'realised': [F, F], 'union': [F, F],
              'candidates': {'autoattack': [T, F], 'combined/round1': [F, F]}}]
    for u in units:
        u.update(passes={'forward_images': 0, 'backward_images': 0}, seconds=0.0)
    settings = {'n_examples': 4, 'msa': {'surrogates': []}}
    totals = {'forward_images': 0, 'backward_images': 0, 'seconds': 0.0}
    out = _aggregate_batching(units, settings, torch.ones(4, dtype=torch.bool), totals)
    assert out['per_surrogate_acc'] == {'autoattack': 0.5, 'combined': 0.25}
    assert out['realised_acc'] == 0.25
