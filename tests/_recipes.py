"""Import a recipe script (recipes/*.py) as a module, for the tests of its functions."""
import importlib
import importlib.util
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / 'recipes'
CLI = Path(__file__).resolve().parents[1] / 'timm_hpm' / 'cli'


def load_recipe(path) -> object:
    """The module of ``recipes/<name>.py`` (a name) or of a script path. A recipe whose code lives in the package
    (``recipes/<name>.py`` is a thin wrapper of ``timm_hpm.cli.<name>``) gives the package's module: its functions
    are the ones that run, and monkeypatching them reaches ``main``."""
    if not str(path).endswith('.py') and (CLI / f'{path}.py').is_file():
        return importlib.import_module(f'timm_hpm.cli.{path}')
    path = Path(path) if str(path).endswith('.py') else RECIPES / f'{path}.py'
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
