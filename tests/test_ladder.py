"""The comparison of evaluations (timm_hpm.eval.ladder, recipes/weaker_evaluations.py): AutoAttack's own printout,
its images re-scored, the paper's per-surrogate AutoAttack with a per-sample worst case, and MSA, from two runs."""
import json

import pytest

from timm_hpm.eval import MSAConfig, evaluate
from timm_hpm.eval.ladder import evaluation_ladder, ladder_table

from test_msa import FAST, small_hpm

PAPER = dict(surrogate_autoattack=True, surrogate_apgd=False, cascade=False, combine_rounds=0, score_iterates=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    model, x, y = small_hpm(n=24)
    folder = tmp_path_factory.mktemp('ladder')
    meta = {'name': 'small', 'command': 'test'}
    msa = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST), folder / 'msa', batch_size=8, progress=False,
                   metadata=meta)
    paper = evaluate(model, x, y, MSAConfig(eps=0.05, **FAST, **PAPER), folder / 'paper', batch_size=8,
                     progress=False, metadata=meta)
    return msa, paper


def test_the_ladder_reads_each_evaluation_from_the_runs(runs):
    msa, paper = runs
    rows = evaluation_ladder(msa, paper)
    acc = [r['robust_acc'] for r in rows]
    assert acc[0] == msa['autoattack_own_acc'] and acc[1] == msa['autoattack_acc']
    transferred = acc[2:6]
    assert [r['evaluation'].split('`')[1] for r in rows[2:6]] == ['fc', 'static', 'soft', 'dynamic']
    assert transferred == [paper['per_surrogate_acc'][s] for s in ('fc', 'static', 'soft', 'dynamic')]
    worst = acc[6]  # the per-sample worst case is below AutoAttack on the target and every transferred attack
    assert worst == paper['msa_union_acc'] and worst <= min(transferred + [paper['autoattack_acc']])
    assert acc[7] == msa['msa_acc'] and acc[8] == msa['msa_union_acc'] <= acc[7]
    for r in rows:
        assert r['above_msa'] == pytest.approx(100 * (r['robust_acc'] - msa['msa_acc']))
    table = ladder_table(rows)
    assert table.count('\n') == len(rows) + 1 and "the paper's protocol" in table


def test_the_ladder_refuses_runs_that_do_not_compare(runs):
    msa, paper = runs
    with pytest.raises(ValueError, match='n_examples'):
        evaluation_ladder(msa, dict(paper, n_examples=paper['n_examples'] + 1))
    with pytest.raises(ValueError, match='not the paper protocol'):
        evaluation_ladder(msa, msa)
    with pytest.raises(ValueError, match='before MSA v3'):
        evaluation_ladder(dict(msa, autoattack_own_acc=None), paper)


def test_the_recipe_writes_the_readme_section(runs, tmp_path):
    from _recipes import load_recipe
    msa, paper = runs
    for name, result in (('msa', msa), ('paper', paper)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'eval.json').write_text(json.dumps(result))
    readme = tmp_path / 'README.md'
    readme.write_text('x\n<!-- weaker-evaluations:start -->\nold\n<!-- weaker-evaluations:end -->\ny\n')
    load_recipe('weaker_evaluations').main(['--msa', str(tmp_path / 'msa'), '--paper', str(tmp_path / 'paper'),
                                            '--update', str(readme)])
    text = readme.read_text()
    assert 'old' not in text and "AutoAttack on the target, its own printout" in text and text.endswith('y\n')
