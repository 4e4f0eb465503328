"""The budget-matched study: candidates and their controls, the paired statistics against closed forms, the
single-file score store (round trip, resume after a truncated line, the earlier per-model layout brought in), and
recipes/study.py end to end on a tiny budget."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_hpm
from timm_hpm.attacks import normalized_view
from timm_hpm.report import mean_difference, paired, paired_difference
from timm_hpm.study import (ScoreStore, expand_study, held_out, ranking_text, read_scores, seed_summary, study_rows,
                            study_table)
from timm_hpm.study.report import budget_trend, cost_rows, cost_table, plot_budget
from timm_hpm.train import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_paired_difference_against_closed_forms():
    # d = b - a per image: [0, -1, 1, 1]; mean 1/4; sample variance 11/12; SE = sqrt(11/12 / 4)
    r = paired_difference([1, 1, 0, 0], [1, 0, 1, 1])
    assert r['difference'] == 0.25 and r['n'] == 4
    assert r['se'] == pytest.approx(math.sqrt(11 / 48))
    assert r['ci95'] == pytest.approx((0.25 - 1.959964 * math.sqrt(11 / 48), 0.25 + 1.959964 * math.sqrt(11 / 48)))
    same = paired_difference([True, False] * 5, [True, False] * 5)
    assert same['difference'] == 0 and same['se'] == 0
    # 95% of a large sample of independent +-1 differences: SE = sqrt(p (1 - p) ... ) for 10 discordant in 1000
    big = paired_difference([1] * 10 + [1] * 990, [0] * 10 + [1] * 990)
    assert big['difference'] == -0.01 and big['se'] == pytest.approx(math.sqrt((10 * 0.99 ** 2 + 990 * 0.01 ** 2)
                                                                                / 999 / 1000))
    with pytest.raises(ValueError, match='equally long'):
        paired_difference([1], [1, 0])
    assert mean_difference([0.5, -0.5])['se'] == pytest.approx(0.5)  # sample sd sqrt(1/2) over sqrt(2)
    with pytest.raises(ValueError, match='at least one'):
        mean_difference([])
    # the exact sign test: 10 discordant pairs all one way -> p = 2 / 2^10
    assert paired(dict(enumerate([1] * 10)), dict(enumerate([0] * 10)))['p'] == pytest.approx(2 / 1024)


STUDY = {
    'config': 'hpm.yaml', 'control_config': 'control.yaml', 'seeds': [0, 1],
    'common': {'train.max_steps': 2},
    'candidates': {
        'hpm': {},
        'long': {'train.max_steps': 4, 'seeds': [0]},
        'head': {'train.trainable': 'head', 'seeds': [0]},
        'shipped': {'inference': {'alpha': 0.0}, 'model': 'hpm_x.tag'},
        'hpm_b4': {'model_of': 'hpm', 'eval_batch_size': 4, 'seeds': [0]},
        'hpm_static': {'model_of': 'hpm', 'inference': {'alpha': 1.0}},
    },
}


def test_every_candidate_gets_the_control_with_its_budget_and_seed():
    cands = {c.name: c for c in expand_study(STUDY)}
    assert cands['hpm/seed0'].control == 'control_2/seed0' and cands['hpm/seed1'].control == 'control_2/seed1'
    assert cands['long/seed0'].control == 'control_4/seed0' and 'long/seed1' not in cands
    assert cands['head/seed0'].control == 'control_2_trainable-head/seed0'
    assert cands['control_2_trainable-head/seed0'].overrides == {'train.max_steps': 2, 'train.trainable': 'head',
                                                                 'train.seed': 0}
    assert cands['control_4/seed0'].overrides == {'train.max_steps': 4, 'train.seed': 0}
    assert cands['shipped/seed0'].kind == 'inference' and cands['shipped/seed0'].control is None  # vs the base
    with_budget = {c.name: c for c in expand_study({**STUDY, 'candidates': {
        'shipped': {'inference': {'alpha': 0.0}, 'model': 'hpm_x.tag', 'train.max_steps': 3}}})}
    assert with_budget['shipped/seed0'].control == 'control_3/seed0' and 'control_3/seed0' in with_budget
    assert cands['hpm_b4/seed0'].run == 'hpm/seed0' and cands['hpm_b4/seed0'].eval_batch_size == 4
    for seed in (0, 1):  # inference-time options on another candidate's model: each seed on its run, vs its control
        c = cands[f'hpm_static/seed{seed}']
        assert (c.kind, c.run, c.control, c.hpm) == ('inference', f'hpm/seed{seed}', f'control_2/seed{seed}',
                                                     {'alpha': 1.0})
        assert c.overrides == cands[f'hpm/seed{seed}'].overrides  # what fine-tunes that run if it is missing
    kinds = [c.kind for c in expand_study(STUDY)]
    assert kinds[:4] == ['control'] * 4 and 'control' not in kinds[4:]  # the four controls first
    with pytest.raises(ValueError, match='unknown study keys'):
        expand_study({**STUDY, 'candidate': {}})
    with pytest.raises(ValueError, match='model_of'):
        expand_study({**STUDY, 'candidates': {'a': {'model_of': 'nope'}}})


def test_rows_read_each_candidate_against_its_control_image_by_image():
    cands = expand_study({**STUDY, 'seeds': [0]})
    control = {'clean_acc': 0.9, 'robust_acc': 0.5, 'robust': [1, 1, 0, 0], 'clean': [1] * 4}
    hpm = {'clean_acc': 0.8, 'robust_acc': 0.75, 'robust': [1, 0, 1, 1], 'clean': [1] * 4}
    rows = study_rows(cands, {'control_2/seed0': control, 'hpm/seed0': hpm})
    assert [r['name'] for r in rows] == ['control_2/seed0', 'hpm/seed0']  # unscored candidates are left out
    assert rows[1]['difference'] == paired_difference(control['robust'], hpm['robust'])
    table = study_table(rows)
    assert '+25.0 ± 47.9 (p = 1) vs control_2/seed0' in table and table.count('\n') == 3


def test_seed_summary_averages_each_image_over_the_seeds_against_closed_forms():
    cands = expand_study({**STUDY, 'candidates': {'hpm': {}, 'head': {'train.trainable': 'head', 'seeds': [0]},
                                                  'shipped': {'inference': {'alpha': 1.0}, 'model': 'hpm_x.tag'}}})

    def score(robust, clean=0.9):
        return {'robust': robust, 'robust_acc': sum(robust) / len(robust), 'clean_acc': clean}
    scores = {'control_2/seed0': score([1, 1, 0, 0]), 'control_2/seed1': score([1, 1, 1, 0]),
              'hpm/seed0': score([1, 0, 1, 1], 0.8), 'hpm/seed1': score([1, 1, 0, 0], 0.7),
              'head/seed0': score([0, 0, 0, 1]),  # its control (control_2_trainable-head) is not scored
              'shipped/seed0': score([0, 0, 0, 0])}
    summary = seed_summary(cands, scores)
    assert [r['name'] for r in summary] == ['hpm', 'head', 'shipped']  # best first; controls are not ranked
    hpm = summary[0]
    assert hpm['seeds'] == [0, 1] and hpm['robust_acc'] == 0.625 and hpm['clean_acc'] == pytest.approx(0.75)
    # per image, the two seeds' differences [0, -1, 1, 1] and [0, 0, -1, 0] average to [0, -1/2, 0, 1/2]:
    # mean 0, sample variance (1/4 + 1/4) / 3, SE sqrt(1/6 / 4)
    assert hpm['difference']['difference'] == 0 and hpm['difference']['se'] == pytest.approx(math.sqrt(1 / 24))
    assert hpm['vs'] == ['control_2'] and 'difference' not in summary[1]
    text = ranking_text(summary)
    assert text.startswith('Top 3 by held-out robust accuracy')
    assert '1. `hpm` 62.5% at 75.0% clean (2 seeds; +0.0 ± 20.4 points vs control_2); ' in text
    assert '2. `head` 25.0% at 90.0% clean (1 seed; a second seed is due); ' in text
    assert text.endswith('3. `shipped` 0.0% at 90.0% clean (1 seed; the registered `hpm_x.tag`, one training run).')
    assert ranking_text(summary, top=1).startswith('Top 1 ') and '2. ' not in ranking_text(summary, top=1)
    assert ranking_text([]) == ''
    with pytest.raises(ValueError, match='different numbers of images'):
        seed_summary(cands, {**scores, 'hpm/seed1': score([1, 1, 0])})



def test_the_budget_trend_and_the_cost_read_only_budget_candidates_against_closed_forms(tmp_path):
    cands = expand_study({**STUDY, 'candidates': {'hpm': {}, 'steps_8': {'train.max_steps': 8, 'seeds': [0]},
                                                  'head': {'train.trainable': 'head', 'seeds': [0]},
                                                  'hpm_b8': {'model_of': 'hpm', 'eval_batch_size': 8}}})

    def score(robust, train=None, scoring=None, jobs=None):
        s = {'robust': robust, 'robust_acc': sum(robust) / len(robust), 'clean_acc': 0.9, 'train_seconds': train}
        return {**s, **({'score_seconds': scoring} if scoring else {}), **({'jobs': jobs} if jobs else {})}
    scores = {'control_2/seed0': score([1, 1, 0, 0], 60, 120, 2), 'control_2/seed1': score([1, 1, 1, 0], 180),
              'hpm/seed0': score([1, 0, 1, 1], 120, 60, 2), 'hpm/seed1': score([1, 1, 0, 0]),
              'control_8/seed0': score([1, 1, 1, 1], 600, 30, 1), 'steps_8/seed0': score([1, 1, 1, 0], 300, 90, 1),
              'head/seed0': score([0, 0, 0, 1], 999, 999, 1), 'control_2_trainable-head/seed0': score([0] * 4, 999),
              'hpm_b8/seed0': score([1, 1, 1, 1], None, 999, 1)}
    summary = seed_summary(cands, scores)
    trend = budget_trend(cands, summary)
    # only HPM's configuration with its budget changed: not another option (head), not another model's run (hpm_b8)
    assert [(r['name'], r['budget']) for r in trend] == [('hpm', 2), ('steps_8', 8)]
    assert trend[1]['difference']['difference'] == -0.25  # [0, 0, 0, -1] against control_8
    assert trend[0]['difference'] == next(r for r in summary if r['name'] == 'hpm')['difference']
    cost = cost_rows(cands, scores)
    assert [(r['budget'], r['kind'], r['models']) for r in cost] == [(2, 'hpm', 2), (2, 'control', 2), (8, 'hpm', 1),
                                                                      (8, 'control', 1)]
    assert cost[1]['train_seconds'] == [60, 180] and cost[1]['score_seconds'] == [120] and cost[1]['jobs'] == [2]
    table = cost_table(cost)
    assert '| 2 | HPM | 2 | 2.0 (1) | 1.0 (1) | 2 |' in table  # minutes: the mean over the timed models
    assert '| 2 | control | 2 | 2.0 (2) | 2.0 (1) | 2 |' in table
    assert '| 8 | control | 1 | 10.0 (1) | 0.5 (1) | 1 |' in table
    assert cost_table(cost_rows(cands, {'hpm/seed1': score([1])})).endswith('| 2 | HPM | 1 | unknown | unknown | unknown |')
    rows = study_rows(cands, scores)
    plot_budget(trend, rows, tmp_path / 'budget.png')
    assert (tmp_path / 'budget.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _score(i):
    return {'clean': [True, False, True], 'robust': [bool(i % 2), False, True], 'clean_acc': 2 / 3,
            'robust_acc': (1 + i % 2) / 3, 'candidate': f'c{i}/seed0', 'definition': {'kind': 'hpm', 'i': i}}


def test_the_score_store_round_trips_one_line_per_model(tmp_path):
    store = ScoreStore(tmp_path / 'out')
    assert store.scores == {} and not store.path.exists()
    for i in range(3):
        store.add(f'c{i}/seed0', _score(i))
    store.add('base', {'clean_acc': 0.5, 'robust_acc': 0.25, 'robust': [1, 0]})
    lines = store.path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {'name': 'c0/seed0', 'score': _score(0)}
    again = ScoreStore(tmp_path / 'out')
    assert list(again.scores) == ['c0/seed0', 'c1/seed0', 'c2/seed0', 'base'] and again.get('c2/seed0') == _score(2)
    assert 'base' in again and 'c3/seed0' not in again
    with pytest.raises(ValueError, match='already scored'):
        again.add('c1/seed0', _score(1))


def test_a_killed_write_is_ignored_with_a_warning_and_rescored(tmp_path, caplog):
    """A partial last line (the study was killed writing it, or before its newline): read without it, with a
    warning; the next score appended cuts it off first, so the file stays whole."""
    store = ScoreStore(tmp_path)
    for i in range(2):
        store.add(f'c{i}/seed0', _score(i))
    whole = store.path.read_bytes()
    line = (json.dumps({'name': 'c2/seed0', 'score': _score(2)}) + '\n').encode()
    for partial in (line[:len(line) // 2], line[:-1]):  # cut mid-line; cut before its newline (never committed)
        store.path.write_bytes(whole + partial)
        caplog.clear()
        with caplog.at_level('WARNING'):
            resumed = ScoreStore(tmp_path)
        assert any(f'{store.path}:3: a partial last line' in r.getMessage() for r in caplog.records)
        assert list(resumed.scores) == ['c0/seed0', 'c1/seed0']  # c2 is scored again
        resumed.add('c2/seed0', _score(2))
        assert store.path.read_bytes() == whole + line
        caplog.clear()
        assert ScoreStore(tmp_path).scores == {f'c{i}/seed0': _score(i) for i in range(3)}
        assert not caplog.records


def test_a_damaged_or_doubled_score_file_is_an_error(tmp_path):
    store = ScoreStore(tmp_path)
    for i in range(2):
        store.add(f'c{i}/seed0', _score(i))
    whole = store.path.read_text()
    store.path.write_text(whole.replace('}}\n', '}\n', 1))  # the first line cut, not the last
    with pytest.raises(ValueError, match='scores.jsonl:1 is not a JSON object: the file is damaged in the middle'):
        ScoreStore(tmp_path)
    store.path.write_text('{"name": "c0/seed0"}\n' + whole)  # a JSON object, but no score entry
    with pytest.raises(ValueError, match='scores.jsonl:1 is not a score entry'):
        ScoreStore(tmp_path)
    first = whole.splitlines()[0]
    store.path.write_text(whole + first + '\n')  # c0 on lines 1 and 3
    with pytest.raises(ValueError, match=r'c0/seed0 is scored twice \(.*scores.jsonl:1 and .*scores.jsonl:3\)'):
        read_scores(store.path)


def test_the_earlier_per_model_layout_is_brought_into_the_file(tmp_path):
    """scores/<candidate>__seed<k>.json and scores/base.json (earlier versions, or a study still running one):
    brought into scores.jsonl, the files removed; a model already in the file must have the same score there."""
    old = tmp_path / 'scores'
    old.mkdir()
    for i in range(3):
        (old / f'c{i}__seed0.json').write_text(json.dumps(_score(i)))
    (old / 'base.json').write_text(json.dumps({'clean_acc': 0.5, 'robust_acc': 0.25, 'robust': [1, 0]}))
    store = ScoreStore(tmp_path)
    store.add('c0/seed0', _score(0))  # already brought over (the same score): not added twice
    assert ScoreStore(tmp_path).convert_old_layout() == 3
    assert not old.exists()
    scores = read_scores(tmp_path / 'scores.jsonl')
    assert scores == {**{f'c{i}/seed0': _score(i) for i in range(3)},
                      'base': {'clean_acc': 0.5, 'robust_acc': 0.25, 'robust': [1, 0]}}
    assert ScoreStore(tmp_path).convert_old_layout() == 0  # nothing left to bring
    old.mkdir()
    (old / 'c1__seed0.json').write_text(json.dumps(dict(_score(1), robust_acc=0.0)))  # another score of c1
    (old / 'c9__seed0.json').write_text(json.dumps(_score(9)))
    with pytest.raises(ValueError, match='hold different scores of c1/seed0'):
        ScoreStore(tmp_path).convert_old_layout()
    assert sorted(p.name for p in old.iterdir()) == ['c1__seed0.json', 'c9__seed0.json']  # nothing removed
    assert read_scores(tmp_path / 'scores.jsonl') == scores  # nor added
    (old / 'c1__seed0.json').write_text(json.dumps(_score(7)))  # a file whose name is not its candidate's
    with pytest.raises(ValueError, match='holds the score of c7/seed0, not of c1/seed0'):
        ScoreStore(tmp_path).convert_old_layout()


@pytest.fixture()
def tiny_study(tmp_path):
    base = yaml.safe_load((ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml').read_text())
    base['data'].update(val_examples=16, synthetic_examples=48)
    base['train'].update(epochs=1, eval_pgd_steps=0)
    (tmp_path / 'hpm.yaml').write_text(yaml.safe_dump(base))
    control = json.loads(json.dumps(base))
    control['model']['name'] = 'preact_resnet18'
    control['model'].pop('hpm')
    control['train']['objective'] = 'base'
    (tmp_path / 'control.yaml').write_text(yaml.safe_dump(control))
    study = {'config': str(tmp_path / 'hpm.yaml'), 'control_config': str(tmp_path / 'control.yaml'),
             'common': {'train.max_steps': 1}, 'scoring': {'n_val': 8, 'apgd_iters': 2, 'n_target_classes': 1,
                                                           'batch_size': 4},
             'candidates': {'hpm': {}, 'hpm_b8': {'model_of': 'hpm', 'eval_batch_size': 8},
                            'hpm_static': {'model_of': 'hpm', 'inference': {'alpha': 1.0}}}}
    (tmp_path / 'study.yaml').write_text(yaml.safe_dump(study))
    return tmp_path


def test_the_study_recipe_end_to_end_and_resumes(tiny_study):
    cmd = [sys.executable, str(ROOT / 'recipes' / 'study.py'), '--study', str(tiny_study / 'study.yaml'),
           '--out', str(tiny_study / 'out'), '--runs', str(tiny_study / 'runs')]
    only = subprocess.run(cmd + ['--only', 'hpm'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert only.returncode == 0, only.stderr[-3000:]
    result = json.loads((tiny_study / 'out' / 'study.json').read_text())
    assert [r['name'] for r in result['rows']] == ['control_1/seed0', 'hpm/seed0']  # hpm and its control only
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tiny_study / 'out' / 'study.json').read_text())
    names = [r['name'] for r in result['rows']]
    assert names == ['control_1/seed0', 'hpm/seed0', 'hpm_b8/seed0', 'hpm_static/seed0']
    assert all(r['vs'] == 'control_1/seed0' for r in result['rows'][1:])
    assert result['rows'][-1]['kind'] == 'inference' and result['rows'][-1]['inference'] == {'alpha': 1.0}
    assert (tiny_study / 'out' / 'study.png').stat().st_size > 0
    assert (tiny_study / 'out' / 'study_budget.png').stat().st_size > 0  # hpm against control_1, by budget
    assert [r['name'] for r in result['budget_trend']] == ['hpm'] and result['cost'][0]['kind'] == 'hpm'
    assert [r['name'] for r in result['ranking']] == sorted(['hpm', 'hpm_b8', 'hpm_static'], key=lambda n: -next(
        r['robust_acc'] for r in result['rows'] if r['name'] == f'{n}/seed0'))  # stable order among ties
    assert '\n\nTop 3 by held-out robust accuracy, mean over seeds' in (tiny_study / 'out' / 'study.md').read_text()
    for name in ('hpm_b8', 'hpm_static'):  # scored on hpm's model, not fine-tuned again
        assert not (tiny_study / 'runs' / name).exists()
    store = tiny_study / 'out' / 'scores.jsonl'  # one file, one line per scored model
    assert list(read_scores(store)) == ['control_1/seed0', 'hpm/seed0', 'hpm_b8/seed0', 'hpm_static/seed0']
    assert not (tiny_study / 'out' / 'scores').exists() and len(store.read_text().splitlines()) == 4
    # alpha 1 is the static head: no batch prototype, so the clean predictions are the static mode's
    model = timm.create_model(f"local-dir:{tiny_study / 'runs' / 'hpm' / 'seed0' / 'final'}", pretrained=True).eval()
    cfg = load_config(tiny_study / 'hpm.yaml')
    x, y = held_out(cfg, 8, model)
    with torch.no_grad(), timm_hpm.get_hpm_head(model).using_mode('static'):
        static = (normalized_view(model)(x).argmax(1) == y).tolist()
    assert read_scores(store)['hpm_static/seed0']['clean'] == static
    before = store.read_text()
    report = {name: (tiny_study / 'out' / name).read_bytes() for name in ('study.json', 'study.md')}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store.read_text() == before
    # an earlier version's per-model files (scores/<candidate>__seed<k>.json): brought into scores.jsonl by the
    # study command, then removed; the report is the same, byte for byte
    old = tiny_study / 'out' / 'scores'
    old.mkdir()
    for name, score in read_scores(store).items():
        (old / f"{name.replace('/', '__')}.json").write_text(json.dumps(score))
    store.unlink()
    converted = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert '4 scores of the earlier per-model layout brought into' in converted.stderr
    assert not old.exists() and read_scores(store) == json.loads(json.dumps(read_scores(store)))
    assert {name: (tiny_study / 'out' / name).read_bytes() for name in report} == report
    assert sorted(store.read_text().splitlines()) == sorted(before.splitlines())
    before = store.read_text()
    readme = tiny_study / 'README.md'
    readme.write_text('# x\n\n<!-- heldout-study:start -->\nold\n<!-- heldout-study:end -->\ntail\n')
    again = subprocess.run(cmd + ['--only', 'hpm', '--update', str(readme)], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]  # runs nothing; the table keeps every finished score
    assert [r['name'] for r in json.loads((tiny_study / 'out' / 'study.json').read_text())['rows']] == names
    table = (tiny_study / 'out' / 'study.md').read_text().strip()
    assert readme.read_text() == f'# x\n\n<!-- heldout-study:start -->\n{table}\n<!-- heldout-study:end -->\ntail\n'
    (tiny_study / 'plain.md').write_text('# no section\n')
    no_section = subprocess.run(cmd + ['--update', str(tiny_study / 'plain.md')], capture_output=True, text=True,
                                timeout=600, cwd=ROOT)
    assert no_section.returncode != 0 and 'no <!-- heldout-study:start -->' in no_section.stderr
    unknown = subprocess.run(cmd + ['--only', 'hmp'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert unknown.returncode != 0 and "--only ['hmp']: not candidates" in unknown.stderr
    lines = [json.loads(line) for line in before.splitlines()]
    stale = next(e for e in lines if e['name'] == 'hpm/seed0')  # scored by an earlier attack (MSA v2: no iterate)
    stale['score']['definition']['attack']['score_iterates'] = False
    store.write_text(''.join(json.dumps(e) + '\n' for e in lines))
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode != 0 and 'remove its line ("name": "hpm/seed0")' in refused.stderr
    older = [json.loads(line) for line in before.splitlines()]
    for e in older:  # scored before MSA had its completion stage and local search (neither ran): still its attack
        for key in ('completion_rounds', 'search_sweeps'):
            del e['score']['definition']['attack'][key]
    store.write_text(''.join(json.dumps(e) + '\n' for e in older))
    kept = subprocess.run(cmd + ['--report-only'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert [r['name'] for r in json.loads((tiny_study / 'out' / 'study.json').read_text())['rows']] == names
    store.write_text(before)
    changed = yaml.safe_load((tiny_study / 'study.yaml').read_text())
    changed['candidates']['hpm'] = {'model.hpm.alpha': 0.25}  # same name, another model: its score is refused
    (tiny_study / 'study.yaml').write_text(yaml.safe_dump(changed))
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode != 0 and 'rename the candidate' in refused.stderr


def test_jobs_run_the_fine_tunes_side_by_side_and_score_seed_by_seed(tiny_study):
    study = yaml.safe_load((tiny_study / 'study.yaml').read_text())
    study.update(seeds=[0, 1], candidates={'hpm': {}})
    (tiny_study / 'study.yaml').write_text(yaml.safe_dump(study))
    cmd = [sys.executable, str(ROOT / 'recipes' / 'study.py'), '--study', str(tiny_study / 'study.yaml'),
           '--out', str(tiny_study / 'out'), '--runs', str(tiny_study / 'runs'), '--no-figure']
    bad = subprocess.run(cmd + ['--jobs', '0'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode != 0 and '--jobs 0: give 1 or more' in bad.stderr
    nothing = subprocess.run(cmd + ['--report-only'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert nothing.returncode == 0, nothing.stderr[-3000:]  # no score yet: an empty table, nothing run
    assert json.loads((tiny_study / 'out' / 'study.json').read_text())['rows'] == []
    assert not (tiny_study / 'runs').exists() and not (tiny_study / 'out' / 'scores.jsonl').exists()
    done = subprocess.run(cmd + ['--jobs', '2'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = read_scores(tiny_study / 'out' / 'scores.jsonl')
    # made seed by seed, each candidate after its control: a kill keeps whole pairs
    assert list(scores) == ['control_1/seed0', 'hpm/seed0', 'control_1/seed1', 'hpm/seed1']
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(s['train_seconds'] > 0 and s['score_seconds'] > 0 and s['jobs'] == 2 and s['train_threads'] == threads
               for s in scores.values())  # the cost as this machine ran it
    runs = {name: tiny_study / 'runs' / name for name in scores}
    # side by side: hpm/seed0's fine-tune began (its config.yaml) before its control's had finished (its weights)
    started = (runs['hpm/seed0'] / 'config.yaml').stat().st_mtime
    assert started < (runs['control_1/seed0'] / 'final' / 'model.safetensors').stat().st_mtime
    again = subprocess.run(cmd + ['--jobs', '2'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and read_scores(tiny_study / 'out' / 'scores.jsonl') == scores  # nothing redone


def test_a_fine_tune_gets_its_share_of_the_threads_and_is_stopped_with_the_study(tmp_path, monkeypatch):
    import threading
    import types

    from timm_hpm.study import runs
    fake = tmp_path / 'fake_python'  # stands in for the interpreter: records its environment, then runs 60 s
    fake.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS $MKL_NUM_THREADS $*" >> {tmp_path}/calls\nexec sleep 60\n')
    fake.chmod(0o755)
    monkeypatch.setattr(runs, 'sys', types.SimpleNamespace(executable=str(fake)))
    config = ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'
    outcome = {}

    def run(name, threads):
        try:
            runs.finetune(config, tmp_path / name, {'train.max_steps': 1}, threads=threads)
        except subprocess.CalledProcessError as error:
            outcome[name] = error.returncode
    workers = [threading.Thread(target=run, args=('a', 3)), threading.Thread(target=run, args=('b', None))]
    for w in workers:
        w.start()
    while len(runs._running) < 2 or not (tmp_path / 'calls').exists() \
            or len((tmp_path / 'calls').read_text().splitlines()) < 2:
        time.sleep(0.05)
    runs.stop_finetunes()  # what a stopped study does to the fine-tunes running beside it
    for w in workers:
        w.join(timeout=10)
        assert not w.is_alive()
    assert outcome == {'a': -signal.SIGINT, 'b': -signal.SIGINT} and not runs._running
    calls = {line.split('--output-dir ')[1].split()[0]: line
             for line in (tmp_path / 'calls').read_text().splitlines()}
    assert calls[str(tmp_path / 'a')] == (f"3 3 -m timm_hpm.cli.finetune --config {config} --output-dir "
                                          f"{tmp_path / 'a'} --set train.max_steps=1 --device cpu")
    omp, mkl = os.environ.get('OMP_NUM_THREADS', ''), os.environ.get('MKL_NUM_THREADS', '')
    assert calls[str(tmp_path / 'b')].startswith(f'{omp} {mkl} -m ')  # None: the environment as it is
