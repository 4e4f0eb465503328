"""The command-line tools of timm-hpm, runnable from an install (a checkout's ``recipes/<name>.py`` are thin wrappers
of them):

    timm-hpm-finetune  / python -m timm_hpm.cli.finetune     (accelerate launch -m timm_hpm.cli.finetune ...)
    timm-hpm-evaluate  / python -m timm_hpm.cli.evaluate     (accelerate launch -m timm_hpm.cli.evaluate ...)
    timm-hpm-push      / python -m timm_hpm.cli.push_to_hub
    timm-hpm-zoo       / python -m timm_hpm.cli.build_zoo
    timm-hpm-benchmark / python -m timm_hpm.cli.benchmark
    python -m timm_hpm.cli.model_info, python -m timm_hpm.cli.model_table, python -m timm_hpm.cli.benchmark_table

Each module has ``main(argv=None)``. The fine-tuning configs ship with the package (``timm_hpm/configs/*.yaml``,
:func:`packaged_configs`); ``--config`` takes a file or one of their names (:func:`config_file`). Nothing here
imports torch: ``--help`` answers at once.
"""
import sys
from pathlib import Path
from typing import List, Union

__all__ = ['CONFIG_DIR', 'packaged_configs', 'config_file', 'recorded_program']

#: The fine-tuning configs shipped with the package (``recipes/configs`` in a checkout is a link to it).
CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'


def packaged_configs() -> List[str]:
    """The names of the packaged configs (``--config <name>``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))


def config_file(config: Union[str, Path]) -> Path:
    """The YAML file of ``--config``: a file that exists as given, else a packaged config named by it
    (``fashion_mnist_hpm`` or ``fashion_mnist_hpm.yaml``: ``timm_hpm/configs/<name>.yaml``); anything else is
    returned as given (reading it then fails, naming it)."""
    path = Path(config)
    if path.is_file() or len(path.parts) != 1:
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix in ('.yaml', '.yml') else f'{path.name}.yaml')
    return packaged if packaged.is_file() else path


def recorded_program(recipe: str, module: str) -> List[str]:
    """How a command line that a run records begins: ``python recipes/<name>.py`` when this process was started as
    the checkout's recipe (directly or under ``accelerate launch``), else ``python -m <module>`` (the module, its
    console script, or a call of its ``main`` from Python)."""
    argv0 = Path(sys.argv[0]).absolute() if sys.argv and sys.argv[0] else Path()
    if argv0.name == Path(recipe).name and argv0.parent.name == 'recipes':
        return ['python', recipe]
    return ['python', '-m', module]
