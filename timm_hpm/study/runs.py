"""A study's fine-tunes: run with ``python -m timm_hpm.cli.finetune``, and reused only with the configuration asked
for."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['run_config', 'check_run', 'finetune', 'stop_finetunes']

_running: set = set()  # the fine-tunes running now (subprocesses), for stop_finetunes


def _sets(overrides: Dict[str, Any]) -> List[str]:
    """The ``--set KEY=VALUE`` items that give ``recipes/finetune.py`` these overrides."""
    return [f'{k}={json.dumps(v)}' for k, v in overrides.items()]


def run_config(config: Path, overrides: Dict[str, Any]):
    """The configuration ``recipes/finetune.py --config config --set <overrides>`` resolves (and records in its run
    folder's ``config.yaml``), read the way it reads it."""
    from ..train import load_config, parse_overrides
    return load_config(config, parse_overrides(_sets(overrides)))


def check_run(config: Path, run_dir: Path, overrides: Dict[str, Any], name: str = '') -> None:
    """Refuse to reuse the fine-tune in ``run_dir`` (finished, or to be resumed) unless its recorded configuration
    (``config.yaml``) is the one asked for (``config`` with ``overrides``), output folder aside: a
    :class:`~timm_hpm.train.RunFolderError` names the settings that differ and what to do. A folder without a run
    passes; a finished run without its ``config.yaml`` is refused (it cannot be checked)."""
    from ..train import ConfigError, RunFolderError, load_config
    from ..train.config import config_changes
    from ..train.runs import describe_changes, run_finished
    run_dir = Path(run_dir)
    who = f"{name}'s fine-tune" if name else 'the fine-tune'
    saved = run_dir / 'config.yaml'
    if not saved.is_file():
        if run_finished(run_dir):
            raise RunFolderError(f'{run_dir} holds finished weights but no config.yaml, so it cannot be checked to be '
                                 f'{who}: use another --runs folder, or delete {run_dir} yourself to fine-tune again.')
        return
    try:
        recorded = load_config(saved)
    except ConfigError as error:
        raise RunFolderError(f'{run_dir} holds a run whose configuration cannot be checked to be {who} ({error}): '
                             f'use another --runs folder, or delete {run_dir} yourself to fine-tune again.') from None
    changes = config_changes(recorded, run_config(config, overrides))
    if changes:
        raise RunFolderError(
            f'{run_dir} holds a fine-tune with another configuration than {who} ({saved} -> what the study asks: '
            f'{describe_changes(changes)}). It is not reused: give this study its own --runs folder (or the candidate '
            f'another name), or delete {run_dir} yourself (and the scores made from it) to fine-tune it again.')


def finetune(config: Path, run_dir: Path, overrides: Dict[str, Any], device: str = 'cpu', name: str = '',
             threads: Optional[int] = None) -> Optional[float]:
    """Fine-tune with ``python -m timm_hpm.cli.finetune`` (what ``recipes/finetune.py`` runs) into ``run_dir``
    (resuming an interrupted run); seconds taken, or None when the run had finished before. A run already there is
    reused only with the configuration asked for (:func:`check_run`; ``name``, the candidate, names it in the
    refusal). ``threads``: the fine-tune's CPU threads (``OMP_NUM_THREADS``; None: torch's default, every core)."""
    from ..train.runs import run_finished
    check_run(config, run_dir, overrides, name)
    if run_finished(run_dir):
        return None
    if (run_dir / 'config.yaml').exists():
        cmd = ['--resume', str(run_dir)]
    else:
        sets = _sets(overrides)
        cmd = ['--config', str(config), '--output-dir', str(run_dir)] + (['--set'] + sets if sets else [])
    env = None if threads is None else {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    tic = time.time()
    with subprocess.Popen([sys.executable, '-m', 'timm_hpm.cli.finetune', *cmd, '--device', device], env=env) as proc:
        _running.add(proc)
        try:
            code = proc.wait()
        finally:  # an interrupt in this thread ends the fine-tune (it resumes from its last checkpoint)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            _running.discard(proc)
    if code:
        raise subprocess.CalledProcessError(code, proc.args)
    return round(time.time() - tic, 1)


def stop_finetunes() -> None:
    """Interrupt the fine-tunes this process runs in other threads (a study with ``--jobs``, stopped): each resumes
    from its last checkpoint when the study is run again."""
    for proc in list(_running):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
