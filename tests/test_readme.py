"""The README's generated parts are in sync with what generates them."""
import json
import re
from pathlib import Path

import pytest
from _recipes import load_recipe
from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def test_model_table_matches_registry():
    table = load_recipe('model_table').model_table()
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- model-table:start -->\n(.*?)\n<!-- model-table:end -->', readme, re.S).group(1)
    assert section == table, 'run: python recipes/model_table.py --update README.md'


def test_quick_start_has_exactly_two_commands():
    readme = (ROOT / 'README.md').read_text()
    block = re.search(r'## Quick start.*?```bash\n(.*?)```', readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith('#')]
    assert [c.split('#')[0].strip() for c in commands] == ['bash recipes/quickstart.sh', 'bash tests/run.sh']
    assert 'pytest' in (ROOT / 'tests' / 'run.sh').read_text()


def test_study_tables_match_the_committed_results():
    """Every number of the Fashion-MNIST study in the README comes from the JSON in results/."""
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- fmnist-study:start -->\n(.*?)\n<!-- fmnist-study:end -->', readme, re.S).group(1)
    n_test = int(re.search(r'the first (\d+) of the 10,000', section).group(1))
    n_sens = int(re.search(r'static l2 head, same weights; first (\d+) test images', section).group(1))
    n_batchings = re.search(r'MSA per batching .*?: the first (\d+) test images', section)
    n_batchings = n_batchings and int(n_batchings.group(1))
    hpm_run = re.search(r'\(HPM: `results/fashion_mnist/([^/`]+)/eval.json`\)', section)
    hpm_run = hpm_run.group(1) if hpm_run else f'eval_hpm_{n_test}'
    candidates = dict(re.findall(r'held-out study candidate `([^`]+)`: `results/fashion_mnist/([^/`]+)/eval.json`',
                                 section))
    tables = load_recipe('study_table').study_tables(ROOT / 'results' / 'fashion_mnist', n_test, n_sens,
                                                     n_batchings, hpm_run, candidates)
    assert section == tables, (f'run: python recipes/study_table.py --n-test {n_test} --n-sensitivity {n_sens} '
                               f'--n-batchings {n_batchings} --hpm-run {hpm_run} '
                               + ''.join(f'--candidate-run {k}={v} ' for k, v in candidates.items())
                               + '--update README.md')
    for name in ('eval_base', 'eval_static'):
        assert (ROOT / 'results' / 'fashion_mnist' / f'{name}_{n_test}' / 'eval.json').is_file(), name
    assert (ROOT / 'results' / 'fashion_mnist' / hpm_run / 'eval.json').is_file(), hpm_run
    assert f'![sensitivity](results/fashion_mnist/sensitivity_{n_sens}/sensitivity.png)' in readme


def test_paired_comparison_against_the_exact_sign_test():
    from timm_hpm.report import paired
    c = paired({0: True, 1: True, 2: False, 3: True}, {0: False, 1: True, 2: True, 3: True})
    assert (c['only_a'], c['only_b'], c['difference'], c['p']) == (1, 1, 0.0, 1.0)
    a = {i: True for i in range(10)}
    c = paired(a, {i: i >= 5 for i in range(10)})  # 5 discordant pairs, all one way: p = 2 / 2^5
    assert (c['only_a'], c['only_b'], c['difference']) == (5, 0, -0.5) and c['p'] == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match='different images'):
        paired(a, {i: True for i in range(9)})



def test_markdown_table():
    from timm_hpm.report import markdown_table
    assert markdown_table(['a', 'b', 'c'], [['x', 1, ''], ['y', None, '2%']], 'lrr') == (
        '| a | b | c |\n|---|---:|---:|\n| x | 1 |  |\n| y | | 2% |')
    assert markdown_table(['a'], []) == '| a |\n|---|'
    with pytest.raises(ValueError, match='align'):
        markdown_table(['a', 'b'], [], 'l')
    with pytest.raises(ValueError, match='a row of 1 cells'):
        markdown_table(['a', 'b'], [['x']])

def test_the_use_snippet_runs_as_written():
    readme = (ROOT / 'README.md').read_text()
    snippet = re.search(r'## Use\n\n```python\n(.*?)```', readme, re.S).group(1)
    namespace = {}
    exec(compile(snippet, 'README.md (## Use)', 'exec'), namespace)
    assert namespace['logits'].shape == (8, 10) and namespace['out'].fc_logits.shape == (16, 10)
    assert bool(namespace['h'].hpm_head.prototypes_initialized)


@needs_fashion_mnist
def test_the_msa_snippet_runs_as_written():
    """The msa() snippet continues the first one (its model m)."""
    readme = (ROOT / 'README.md').read_text()
    namespace = {}
    exec(compile(re.search(r'## Use\n\n```python\n(.*?)```', readme, re.S).group(1), 'README.md (## Use)', 'exec'),
         namespace)
    snippet = re.search(r'MSA on any batch-dependent model, in memory.*?```python\n(.*?)```', readme, re.S).group(1)
    exec(compile(snippet, 'README.md (msa snippet)', 'exec'), namespace)
    result = namespace['result']
    assert 0 <= result['union_acc'] <= result['robust_acc'] <= result['clean_acc'] <= 1
    assert 'base/apgd-ce' in result['candidate_acc']


def test_the_heldout_study_table_is_the_committed_study():
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- heldout-study:start -->\n(.*?)\n<!-- heldout-study:end -->', readme, re.S).group(1)
    study = ROOT / 'results' / 'fashion_mnist' / 'study'
    assert section == (study / 'study.md').read_text().strip()
    rows = json.loads((study / 'study.json').read_text())['rows']
    table = [line for line in section.splitlines() if line.startswith('|')]
    assert [line.split(' | ')[0].lstrip('| ') for line in table[2:]] == [r['name'] for r in rows]
    assert '![held-out study](results/fashion_mnist/study/study.png)' in readme
    assert (study / 'study.png').stat().st_size > 0


def test_zoo_table_matches_the_manifest():
    from timm_hpm.zoo import load_manifest, zoo_table
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- zoo-table:start -->\n(.*?)\n<!-- zoo-table:end -->', readme, re.S).group(1)
    assert section == zoo_table(load_manifest())


def test_a_candidates_batchings_are_read_image_by_image(tmp_path):
    """study_table's per-batching line for a held-out study candidate: each run's realised flags on the first n
    images, the worst batching and the images robust in every batching, against hand-counted values."""
    def run(folder, flags_by_batching, batch_size):
        units = tmp_path / folder / 'attack' / 'units'
        units.mkdir(parents=True)
        for batching, flags in flags_by_batching.items():
            for k in range(0, len(flags), batch_size):  # one unit file per fixed batch
                (units / f'{batching}_{k // batch_size:06d}.json').write_text(json.dumps(
                    {'indices': list(range(k, min(k + batch_size, len(flags)))),
                     'realised': flags[k:k + batch_size]}))
        return {'name': 'hpm_m.tag', 'batch_size': batch_size}
    hpm = run('main', {'default': [1, 1, 1, 0, 1, 0]}, 2)
    cand = run('big', {'default': [1, 0, 1, 1, 1, 1]}, 6)
    run('eval_hpm_batchings_4', {'default': [1, 1, 1, 1], 'single': [0, 1, 1, 1]}, 1)
    (tmp_path / 'big' / 'eval.json').write_text(json.dumps(cand))
    table = load_recipe('study_table')
    runs = table.load_candidate_runs(tmp_path, {'b6': 'big'})
    lines = table._candidate_batchings(tmp_path, runs, hpm, 'main', 4)
    assert len(lines) == 2 and lines[0] == ''
    # first 4 images: candidate 3/4, main 3/4, default 4/4, single 3/4; robust in all: images 2 only -> 25%
    assert ('fixed batches of 6 (this candidate) 75.0%; fixed batches of 2 (`main`) 75.0%; default '
            '(`eval_hpm_batchings_4`) 100.0%; single (`eval_hpm_batchings_4`) 75.0%.') in lines[1]
    assert lines[1].endswith('Worst batching: fixed batches of 6 (this candidate), 75.0%; per-image union over '
                             'these batchings 25.0%.')
    other = {'b6': runs['b6']._replace(result=dict(cand, name='another_model.tag'))}
    assert table._candidate_batchings(tmp_path, other, hpm, 'main', 4) == []  # another model gets no such line
    with pytest.raises(FileNotFoundError, match='finish that run first'):  # an unfinished run: no eval.json
        table.load_candidate_runs(tmp_path, {'b6': 'eval_hpm_batchings_4'})
