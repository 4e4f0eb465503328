"""Run folders (fine-tuning and evaluation): one process per folder, and files written whole or not at all.

Runs hold ``<folder>/run.lock`` for their lifetime, so a second process started into the same folder fails at
once, naming the holder, instead of mixing its files with the first run's (or computing the same batches again).
Every file a resume reads is written to a temporary file and renamed over its name, or is an append-only JSON Lines
file (:func:`append_jsonl`, :func:`read_jsonl`: one entry per line, a kill loses at most the entry in flight).
"""
import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None

__all__ = ['FolderInUse', 'run_lock', 'LOCK_NAME', 'write_atomic', 'write_text_atomic', 'read_jsonl', 'append_jsonl']

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


# Append-only JSON Lines: the finished units of an evaluation, the batches of a poisoning run, the scores of a study.
# Written here (not with a library) because resuming needs exactly these rules: one whole line per entry, fsync-ed,
# a partial last line from a kill ignored and cut off, any other damage an error.

def _parse(raw: bytes) -> Optional[dict]:
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, ValueError):  # json.JSONDecodeError is a ValueError
        return None
    return entry if isinstance(entry, dict) else None


def read_jsonl(path: Path, error: type = ValueError) -> List[Tuple[str, dict]]:
    """Every entry (a JSON object per line) of an append-only JSON Lines file written by :func:`append_jsonl`, with
    where it is (``<file>:<line>``). A last line without its newline, or unparsable, is what a kill leaves: it is
    dropped with a warning (its entry is computed again, and the next append cuts it off). Any other unparsable line
    means the file was damaged or edited: ``error`` (a ValueError class) naming the file and line."""
    path = Path(path)
    with open(path, 'rb') as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_SH)  # no append is half-way through what we read
        lines = handle.read().split(b'\n')
    cut_short = lines[-1] != b''  # a last line without its newline was never finished
    if not cut_short:
        lines.pop()
    entries = []
    for number, raw in enumerate(lines, 1):
        entry = _parse(raw)
        if entry is not None and not (cut_short and number == len(lines)):
            entries.append((f'{path}:{number}', entry))
        elif number == len(lines):
            _logger.warning('%s:%d: a partial last line (a run killed while writing it) is ignored; its entry is '
                            'computed again', path, number)
        else:
            raise error(f'{path}:{number} is not a JSON object: the file is damaged in the middle (not by a killed '
                        'run, which can only cut its last line). Its figures cannot be trusted: restore the file, or '
                        'delete that line to compute its entry again.')
    return entries


def _read_at(fd: int, start: int, end: int) -> bytes:
    os.lseek(fd, start, os.SEEK_SET)  # reads only: O_APPEND sends every write to the end
    chunks, left = [], end - start
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b''.join(chunks)


def _cut_partial_tail(fd: int, path: Path) -> None:
    """Cut off a last line that a killed writer left unfinished (we hold the lock: no live writer is mid-line).
    Only the end of the file is read, however many entries it holds."""
    size = os.fstat(fd).st_size
    start = hi = max(size - 1, 0)  # the last line starts after the last newline before its own
    while hi > 0:
        lo = max(0, hi - (1 << 16))
        found = _read_at(fd, lo, hi).rfind(b'\n')
        start = lo + found + 1 if found >= 0 else lo
        if found >= 0:
            break
        hi = lo
    last = _read_at(fd, start, size)
    if not last or (last.endswith(b'\n') and _parse(last[:-1]) is not None):
        return
    _logger.warning('%s: cutting off a partial last line (%d bytes) left by a killed run', path, size - start)
    os.ftruncate(fd, start)


def append_jsonl(path: Path, entry: dict) -> None:
    """Append ``entry`` as one line, durably (``fsync``) and whole (one ``write`` under an exclusive lock, so the
    processes of a sharded run can share the file); a partial last line left by a killed writer is cut off first."""
    path = Path(path)
    created = not path.exists()
    data = memoryview((json.dumps(entry) + '\n').encode())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        _cut_partial_tail(fd, path)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)  # drops the lock
    if created and hasattr(os, 'O_DIRECTORY'):  # the new file's name is durable too
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
