"""Import a recipe script (recipes/*.py) as a module, for the tests of its functions."""
import importlib.util
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / 'recipes'


def load_recipe(path) -> object:
    """The module of ``recipes/<name>.py`` (a name) or of a script path."""
    path = Path(path) if str(path).endswith('.py') else RECIPES / f'{path}.py'
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
