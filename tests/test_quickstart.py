"""The quick start's main job end to end on real Fashion-MNIST and the shipped base, on a tiny budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fashion_mnist
@pytest.mark.slow
def test_quickstart_tiny_budget(tmp_path):
    out = tmp_path / 'qs'
    cmd = [sys.executable, str(ROOT / 'recipes' / 'quickstart.py'), '--out', str(out), '--steps', '2',
           '--train-examples', '512', '--n-test', '40', '--batch-size', '20', '--apgd-iters', '3',
           '--autoattack-iters', '3', '--square-queries', '20', '--sensitivity-iters', '3']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / 'quickstart.json').read_text())
    assert record['n_test'] == 40 and record['eps'] == pytest.approx(0.1)
    attacks = [r['attack'] for r in record['rows']]
    assert attacks[0] == 'AutoAttack (standard cascade)' and attacks[-1].startswith('**MSA')
    assert any('through dynamic' in a for a in attacks) and any('AutoAttack on the target' in a for a in attacks)
    for r in record['rows']:
        assert 0.0 <= r['robust'] <= r['clean'] <= 1.0
    hpm_rows = [r for r in record['rows'] if r['head'] == 'dynamic']
    assert hpm_rows[-1]['robust'] == min(r['robust'] for r in hpm_rows)  # the worst case is the minimum
    # MSA with its default stages (no earlier version's settings pinned); only the iterations reduced
    from timm_hpm.eval import MSAConfig
    msa = json.loads((out / 'eval_hpm' / 'eval.json').read_text())['settings']['msa']
    defaults = MSAConfig(eps=0.1)
    for key in ('target_n_target_classes', 'n_target_classes', 'combine_rounds', 'score_iterates', 'surrogates'):
        assert msa[key] == (list(getattr(defaults, key)) if key == 'surrogates' else getattr(defaults, key)), key
    assert msa['apgd_iters'] == 3
    assert sorted(p.name for p in (out / 'logs').iterdir()) == [
        'eval_base.log', 'eval_hpm.log', 'finetune.log', 'sensitivity.log']  # each step's own output
    table = (out / 'quickstart.md').read_text()
    assert table.count('\n| ') >= len(record['rows']) + 4 and '| fc |' in table and '| static |' in table
    assert table.strip() in result.stdout
    png = out / 'sensitivity' / 'sensitivity.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    sens = json.loads((out / 'sensitivity' / 'sensitivity.json').read_text())
    assert sens['n_examples'] == 40 and sens['robust_accuracy']['eps'][0] == 0.0
    # clean accuracy of the curve's first point is the head's clean accuracy
    for head in ('fc', 'static'):
        assert sens['robust_accuracy']['accuracy'][head][0] == pytest.approx(sens['summary'][head]['clean_acc'])
    # a second run finds every step done and only reprints the table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and '===' not in again.stdout
    again_record = json.loads((out / 'quickstart.json').read_text())
    assert again_record['rows'] == record['rows']
    assert again_record['timings_s'] == record['timings_s'] and set(record['timings_s']) == {
        'finetune', 'eval_base', 'eval_hpm', 'sensitivity'}  # a step already done keeps its measured time
