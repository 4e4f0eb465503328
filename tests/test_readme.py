"""The README's (and the study README's) generated parts are in sync with what generates them; the README stays
short, with the verdict, install and use first, and its links resolve."""
import json
import re
import shlex
from pathlib import Path

import pytest
from _recipes import load_recipe
from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / 'studies' / 'fashion_mnist'
STUDY = STUDY_DIR / 'README.md'
STUDY_TABLE = STUDY_DIR / 'study_table.py'  # the study's own table script (loaded as a module)


def test_model_table_matches_registry():
    table = load_recipe('model_table').model_table()
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- model-table:start -->\n(.*?)\n<!-- model-table:end -->', readme, re.S).group(1)
    assert section == table, 'run: python recipes/model_table.py --update README.md'


def test_readme_is_short_with_the_verdict_install_and_use_first():
    """A timm user reads the verdict, how to install and how to use it in the first screen; the study, the benchmarks
    and the details live in their own documents."""
    lines = (ROOT / 'README.md').read_text().splitlines()
    assert len(lines) <= 350
    first = lines[:60]
    for heading in ('## The verdict', '## Quick start', '## Install', '## Use'):
        assert heading in first, heading
    text = '\n'.join(lines)
    for word in ('MSA v', 'the issue', 'issue #'):  # no project history in the user's README
        assert word not in text, word


@pytest.mark.parametrize('doc', ['README.md', 'studies/fashion_mnist/README.md', 'docs/evaluation.md',
                                 'docs/finetuning.md', 'docs/hub.md', 'docs/timm.md', 'docs/benchmarks.md',
                                 'docs/method.md', 'CONTRIBUTING.md'])
def test_relative_links_resolve(doc):
    """Every relative link and image of the documents points at a file of the repository."""
    path = ROOT / doc
    targets = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', path.read_text())
    local = [t for t in targets if not re.match(r'[a-z]+:', t)]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f'{doc}: links to missing files {missing}'


def test_quick_start_has_exactly_two_commands():
    readme = (ROOT / 'README.md').read_text()
    block = re.search(r'## Quick start.*?```bash\n(.*?)```', readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith('#')]
    assert [c.split('#')[0].strip() for c in commands] == ['bash recipes/quickstart.sh', 'bash tests/run.sh']
    assert 'pytest' in (ROOT / 'tests' / 'run.sh').read_text()


def test_study_tables_match_the_committed_results():
    """Every number of the Fashion-MNIST study in its README comes from the JSON in results/: the section is what
    the command on its last line generates."""
    readme = STUDY.read_text()
    section = re.search(r'<!-- fmnist-study:start -->\n(.*?)\n<!-- fmnist-study:end -->', readme, re.S).group(1)
    command = re.search(r'Generated from the committed results by `python studies/fashion_mnist/study_table\.py '
                        r'([^`]*)`',
                        section.splitlines()[-1])
    assert command, 'the section must end with the command that generated it'
    argv = shlex.split(command.group(1))
    tables, update = load_recipe(STUDY_TABLE).tables_from_args(argv)
    assert update is None
    assert section == tables, (f'run: python studies/fashion_mnist/study_table.py {command.group(1)} '
                               '--update studies/fashion_mnist/README.md')
    n_test = int(argv[argv.index('--n-test') + 1])
    n_sens = int(argv[argv.index('--n-sensitivity') + 1])
    for name in ('eval_base', 'eval_static', 'eval_control'):
        assert (ROOT / 'results' / 'fashion_mnist' / f'{name}_{n_test}' / 'eval.json').is_file(), name
    assert f'![sensitivity](../../results/fashion_mnist/sensitivity_{n_sens}/sensitivity.png)' in readme


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
    readme = STUDY.read_text()
    section = re.search(r'<!-- heldout-study:start -->\n(.*?)\n<!-- heldout-study:end -->', readme, re.S).group(1)
    study = STUDY_DIR / 'results' / 'study'
    assert section == (study / 'study.md').read_text().strip()
    result = json.loads((study / 'study.json').read_text())
    table = [line for line in section.split('\n\n')[0].splitlines() if line.startswith('|')]
    assert [line.split(' | ')[0].lstrip('| ') for line in table[2:]] == [r['name'] for r in result['rows']]
    from timm_hpm.study.report import cost_table
    assert section.endswith(cost_table(result['cost']))  # what the budgets cost, from the scores' records
    for figure in ('study.png', 'study_budget.png'):
        assert f'](results/study/{figure})' in readme and (study / figure).stat().st_size > 0


def test_the_benchmark_table_is_the_committed_benchmarks():
    """The README's benchmark table is what its own command (written above it) makes of the committed runs."""
    from timm_hpm.cli.benchmark_table import table
    readme = (ROOT / 'README.md').read_text()
    command = re.search(r'`(python recipes/benchmark_table.py [^`]*) --update README.md`', readme, re.S).group(1)
    folders = shlex.split(command)[2:]
    assert len(folders) >= 3 and all((ROOT / f / 'benchmark.json').is_file() for f in folders)
    section = re.search(r'<!-- benchmark-table:start -->\n(.*?)\n<!-- benchmark-table:end -->', readme, re.S).group(1)
    assert section == table([ROOT / f for f in folders]), f'run: {command} --update README.md'


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
    table = load_recipe(STUDY_TABLE)
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


def test_a_candidate_is_read_against_its_own_control(tmp_path):
    """A candidate with another budget than the main control (``--candidate-control``): its row, and its paired
    lines against its own control and the base (and that control against the base), hand-counted; the main control
    is then not its reference, and a control for a name that is not a candidate is refused."""
    def run(folder, flags, **result):
        units = tmp_path / folder / 'attack' / 'units'
        units.mkdir(parents=True)
        (units / 'default_000000.json').write_text(json.dumps({'indices': list(range(len(flags))),
                                                               'realised': flags}))
        (tmp_path / folder / 'eval.json').write_text(json.dumps(dict(result, command=f'evaluate {folder}')))
    aa = dict(batch_size=4, clean_acc=1.0)
    run('eval_base_4', [1, 1, 0, 0], autoattack_acc=0.5, name='base', **aa)
    run('eval_control_4', [1, 1, 1, 1], autoattack_acc=1.0, name='control', **aa)
    run('cand', [1, 1, 1, 0], msa_acc=0.75, name='hpm_m.long', worst_batching='default', **aa)
    run('cand_control', [0, 1, 1, 0], autoattack_acc=0.5, name='m.long_control', **aa)
    table = load_recipe(STUDY_TABLE)
    text = table.study_tables(tmp_path, 4, candidate_runs={'long': 'cand'}, candidate_controls={'long': 'cand_control'})
    assert ("held-out study candidate `long`: `" + str(tmp_path) + "/cand/eval.json` (its budget-matched control: `"
            + str(tmp_path) + "/cand_control/eval.json`)") in text
    assert ("| budget-matched control of `long`: `m.long_control` (the base + PGD-AT with `long`'s budget) | fc | "
            "AutoAttack (standard) | 100.0% | 50.0% | `evaluate cand_control` |") in text
    # candidate [1,1,1,0] vs its control [0,1,1,0]: 1 image only the candidate keeps, none only the control
    assert ("`long` under MSA vs `long`'s control under AutoAttack: 0 images only `long`'s control keeps, 1 only "
            "`long` keeps, difference +25.0 points") in text
    assert "`long` under MSA vs the base under AutoAttack: 0 images only the base keeps, 1 only `long` keeps" in text
    assert ("the base under AutoAttack vs `long`'s control under AutoAttack: 1 images only `long`'s control keeps, "
            "1 only the base keeps, difference +0.0 points") in text
    assert '`long` under MSA vs the control under AutoAttack' not in text  # not the main (other-budget) control
    with pytest.raises(ValueError, match='not candidates'):
        table.study_tables(tmp_path, 4, candidate_runs={'long': 'cand'}, candidate_controls={'short': 'cand_control'})


def test_a_candidates_own_batchings_are_read_image_by_image(tmp_path):
    """``--candidate-batchings``: MSA runs of a candidate's own model (not the main table's) on other batchings join
    its per-batching line, hand-counted; a run of another model, or with other MSA settings, is refused."""
    settings = {'protocol': 'msa', 'msa': {'eps': 0.1, 'apgd_iters': 100}}

    def run(folder, flags_by_batching, batch_size, model='weights-a', **settings_change):
        units = tmp_path / folder / 'attack' / 'units'
        units.mkdir(parents=True)
        for batching, flags in flags_by_batching.items():
            (units / f'{batching}_000000.json').write_text(json.dumps({'indices': list(range(len(flags))),
                                                                     'realised': flags}))
        (tmp_path / folder / 'attack' / 'fingerprint.json').write_text(json.dumps({'model': model}))
        run_settings = dict(settings, msa=dict(settings['msa'], **settings_change))
        (tmp_path / folder / 'eval.json').write_text(json.dumps(
            {'name': 'hpm_m.long', 'batch_size': batch_size, 'batchings': list(flags_by_batching),
             'settings': run_settings}))
    run('cand', {'default': [1, 1, 1, 0, 1, 1]}, 6)
    run('single', {'single': [1, 0, 1, 1]}, 4)
    run('sorted', {'class_sorted': [1, 1, 0, 0]}, 2)
    run('other_model', {'single': [1, 1, 1, 1]}, 4, model='weights-b')
    run('weaker', {'single': [1, 1, 1, 1]}, 4, apgd_iters=10)
    table = load_recipe(STUDY_TABLE)
    runs = table.load_candidate_runs(tmp_path, {'long': 'cand'})
    lines = table._candidate_batchings(tmp_path, runs, None, 'main', 4, {'long': ['single', 'sorted']})
    # first 4 images: candidate 3/4, single 3/4, class-sorted 2/4; robust in all three: image 0 only
    assert lines == ['', 'Candidate `long` per batching on the first 4 test images (the same model; realised batches '
                     'of each run): fixed batches of 6 (this candidate) 75.0%; single, batches of 1 (`single`) 75.0%; '
                     'class-sorted, batches of 2 (`sorted`) 50.0%. Worst batching: class-sorted, batches of 2 '
                     '(`sorted`), 50.0%; per-image union over these batchings 25.0%.']
    assert table._candidate_batchings(tmp_path, runs, None, 'main', 4) == []  # no batchings of its model: no line
    with pytest.raises(ValueError, match='another model'):
        table._candidate_batchings(tmp_path, runs, None, 'main', 4, {'long': ['other_model']})
    with pytest.raises(ValueError, match='other settings'):
        table._candidate_batchings(tmp_path, runs, None, 'main', 4, {'long': ['weaker']})
    (tmp_path / 'single' / 'attack' / 'fingerprint.json').unlink()  # which model it evaluated cannot be told
    with pytest.raises(ValueError, match='no model fingerprint'):
        table._candidate_batchings(tmp_path, runs, None, 'main', 4, {'long': ['single']})
    with pytest.raises(ValueError, match='not candidates'):
        table.study_tables(tmp_path, 4, candidate_runs={'long': 'cand'}, candidate_batchings={'short': ['single']})


def test_the_study_table_command_line_round_trips():
    """The command a section names parses back (tables_from_args) to the arguments that made it."""
    table = load_recipe(STUDY_TABLE)
    cmd = table.command_line(1000, 500, 250, 'eval_hpm_msa4_1000', {'a': 'run a'}, {'a': 'ctl'},
                             {'a': ['s1', 's2']})
    assert cmd == ("python studies/fashion_mnist/study_table.py --n-test 1000 --n-sensitivity 500 "
                   "--n-batchings 250 --hpm-run eval_hpm_msa4_1000 --candidate-run 'a=run a' --candidate-control "
                   "a=ctl --candidate-batchings a=s1 --candidate-batchings a=s2")
    args = table.build_parser().parse_args(shlex.split(cmd)[2:])
    assert (args.candidate_run, args.candidate_batchings) == (['a=run a'], ['a=s1', 'a=s2'])
