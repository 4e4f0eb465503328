"""The quick start's main job runs end to end (tiny budget) on real Fashion-MNIST."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_hpm.data import FASHION_MNIST_DIRS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not any(os.path.isdir(d) for d in FASHION_MNIST_DIRS) and not os.environ.get('FASHION_MNIST_DIR'),
                    reason='Fashion-MNIST (Debian dataset-fashion-mnist) not installed')
def test_demo_runs_and_writes_json(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / 'recipes' / 'demo.py'), '--out', str(tmp_path), '--n-train', '256',
         '--n-test', '64', '--batch-size', '64', '--pgd-steps', '1'],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / 'demo.json').read_text())
    assert set(record['clean']) == {'dynamic', 'static', 'soft', 'fc'}
    assert all(0.0 <= v <= 1.0 for v in list(record['clean'].values()) + list(record['pgd_whitebox'].values()))
    assert '| fc |' in result.stdout
