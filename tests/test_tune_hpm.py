"""recipes/tune_hpm.py on synthetic data: every candidate fine-tuned and scored on held-out images, the best is
the argmax of the MSA-surrogates figure, and a second run skips finished candidates."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_scores_candidates_and_resumes(tmp_path):
    sweep = {'config': str(ROOT / 'recipes' / 'configs' / 'test_synthetic.yaml'),
             'common': {'train.max_steps': 2, 'train.eval_pgd_steps': 0},
             'scoring': {'n_val': 16, 'apgd_iters': 2, 'n_target_classes': 1, 'batch_size': 8},
             'candidates': {'default': {}, 'alpha_1': {'model.hpm.alpha': 1.0}, 'short': {'train.max_steps': 1}}}
    path = tmp_path / 'sweep.yaml'
    path.write_text(yaml.safe_dump(sweep))
    cmd = [sys.executable, str(ROOT / 'recipes' / 'tune_hpm.py'), '--sweep', str(path), '--out', str(tmp_path / 'out'),
           '--runs', str(tmp_path / 'runs')]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / 'out' / 'tuning.json').read_text())
    cands = record['candidates']
    assert set(cands) == {'default', 'alpha_1', 'short'}
    assert cands['alpha_1']['overrides'] == {'model.hpm.alpha': 1.0}
    assert cands['short']['overrides'] == {'train.max_steps': 1} and cands['default']['overrides'] == {}
    assert record['best'] == max(cands, key=lambda k: cands[k]['msa_val'])
    for r in cands.values():
        for key in ('msa_val', 'static_val', 'fc_val', 'dynamic_clean', 'static_clean', 'fc_clean'):
            assert 0.0 <= r[key] <= 1.0
        assert r['msa_val'] <= r['dynamic_clean'] and r['static_val'] <= r['static_clean']
    # alpha = 1: the dynamic head is the static head, so their clean figures agree
    assert cands['alpha_1']['dynamic_clean'] == cands['alpha_1']['static_clean']
    assert yaml.safe_load((tmp_path / 'out' / 'configs' / 'short.yaml').read_text())['train']['max_steps'] == 1
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count(': done') == 3
    assert json.loads((tmp_path / 'out' / 'tuning.json').read_text())['candidates'] == cands
