"""Run folders of recipes/finetune.py: one run per folder, held by one process at a time.

A fresh run refuses a folder that already holds a run (unless told to overwrite it), and a run holds
``<run>/run.lock`` for its lifetime (:func:`timm_hpm.runfiles.run_lock`), so that a second process started into
the same folder fails at once, naming the holder, instead of mixing its files with the first run's.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import List

from ..runfiles import LOCK_NAME, FolderInUse, run_lock

__all__ = ['RunFolderError', 'run_lock', 'run_files', 'prepare_fresh_run', 'LOCK_NAME', 'FolderInUse']

_logger = logging.getLogger(__name__)

# What a run writes into its folder; any of them marks the folder as holding a run.
_RUN_FILES = ('config.yaml', 'log.jsonl', 'checkpoints', 'final')
_RUN_GLOBS = ('fingerprint_rank*.txt',)


class RunFolderError(RuntimeError):
    """A run folder that holds another run; the message says what to do."""


def run_files(folder: Path) -> List[Path]:
    """The files and folders of a run in ``folder`` (empty when it holds none)."""
    folder = Path(folder)
    found = [folder / name for name in _RUN_FILES if (folder / name).exists()]
    return found + sorted(p for pattern in _RUN_GLOBS for p in folder.glob(pattern))


def prepare_fresh_run(folder: Path, overwrite: bool) -> None:
    """Refuse a folder holding a run, or with ``overwrite`` delete that run's files (nothing else in the folder)."""
    found = run_files(folder)
    if not found:
        return
    if not overwrite:
        raise RunFolderError(f"{folder} already holds a run ({', '.join(p.name for p in found)}). Continue it with "
                             f'--resume {folder}, replace it with --overwrite, or choose another --output-dir.')
    _logger.warning('--overwrite: deleting the run in %s (%s)', folder, ', '.join(p.name for p in found))
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
