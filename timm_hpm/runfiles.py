"""Run folders (fine-tuning and evaluation): one process per folder, and files written whole or not at all.

Runs hold ``<folder>/run.lock`` for their lifetime, so a second process started into the same folder fails at
once, naming the holder, instead of mixing its files with the first run's (or computing the same batches again).
Every file a resume reads is written to a temporary file and renamed over its name.
"""
import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None

__all__ = ['FolderInUse', 'run_lock', 'LOCK_NAME', 'write_atomic', 'write_text_atomic']

_logger = logging.getLogger(__name__)

LOCK_NAME = 'run.lock'


class FolderInUse(RuntimeError):
    """Another process holds the run folder; the message names it."""


@contextlib.contextmanager
def run_lock(folder: Path, option: str = 'folder') -> Iterator[None]:
    """Hold ``<folder>/run.lock`` while the block runs; a second process fails at once with the holder's pid,
    host, start time and command (``option`` names the command-line option that picks another folder).

    An OS lock (``flock``), not the file's existence: the OS drops it when the holder exits, even on ``kill -9``.
    The file keeps the holder's line while held and is emptied on release, so a line found by the next holder is
    the trace of a process that died holding the lock (a stale lock): it is logged and taken over. Written here
    because the ``filelock`` package truncates the file before trying the lock, which would erase the holder's name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        _logger.warning('no file locks on this platform: a second run into %s would not be detected', folder)
        yield
        return
    path = folder / LOCK_NAME
    with open(path, 'a+') as handle:  # 'a+': never truncated before the lock is held
        handle.seek(0)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or 'a process that has not written its name yet'
            raise FolderInUse(f'{folder} is in use by another run ({holder}); wait for it to end, or use another '
                              f'{option}. (The lock is {path}, held by that process.)') from None
        stale = handle.read().strip()
        if stale:
            _logger.warning('%s: taking over the stale lock of %s (that process ended without releasing it)',
                            path, stale)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released cleanly: no trace left; closing the file drops the lock


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file next to ``path`` (``<name>.tmp<pid>``: never taken for a result file),
    then rename it over ``path``: a reader, or a resume after ``kill -9``, sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
