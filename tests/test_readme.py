"""The README's generated parts are in sync with what generates them."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_table_matches_registry():
    table = _load(ROOT / 'recipes' / 'model_table.py').model_table()
    readme = (ROOT / 'README.md').read_text()
    section = re.search(r'<!-- model-table:start -->\n(.*?)\n<!-- model-table:end -->', readme, re.S).group(1)
    assert section == table, 'run: python recipes/model_table.py --update README.md'


def test_quick_start_has_exactly_two_commands():
    readme = (ROOT / 'README.md').read_text()
    block = re.search(r'## Quick start.*?```bash\n(.*?)```', readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith('#')]
    assert [c.split('#')[0].strip() for c in commands] == ['bash recipes/quickstart.sh', 'bash tests/run.sh']
    assert 'pytest' in (ROOT / 'tests' / 'run.sh').read_text()
