"""Run folders of recipes/finetune.py: one run per folder, held by one process at a time.

A fresh run refuses a folder that already holds a run (unless told to overwrite it), and a run holds
``<run>/run.lock`` for its lifetime (:func:`timm_hpm.runfiles.run_lock`), so that a second process started into
the same folder fails at once, naming the holder, instead of mixing its files with the first run's. A resumed run
keeps the settings saved in its folder (only the step budget may change) and goes on from its newest complete
checkpoint; a finished run (``final/`` written) is never rewritten: resumed with its own settings it is left as it is,
with another budget it is refused, and no run is shortened below the steps its checkpoint has trained. Every process
of a run learns of a refusal or an unreadable file, instead of waiting for the failed one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml

from ..models._hpm import get_hpm_head, is_hpm_model
from ..runfiles import LOCK_NAME, FolderInUse, run_lock, write_text_atomic
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, trainer_state
from .config import BUDGET_KEYS, ConfigError, FinetuneConfig, config_changes, load_config
from .engine import broadcast_buffers, read_jsonl

__all__ = ['RunFolderError', 'run_lock', 'run_files', 'prepare_fresh_run', 'LOCK_NAME', 'FolderInUse',
           'parse_overrides', 'resolve_config', 'claim_run_folder', 'raise_on_every_process', 'restore',
           'state_fingerprint', 'write_fingerprints', 'run_finished', 'finished_resume', 'describe_changes']

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


def run_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` has finished: its final weights and their timm config (``final/model.safetensors``
    and ``final/config.json``, written last) are there. A final/ cut short (killed while saving) is written again by
    a resume."""
    final = Path(folder) / 'final'
    return (final / 'model.safetensors').is_file() and (final / 'config.json').is_file()


_UNSET = '(unset)'


def _leaf_changes(key: str, old: Any, new: Any) -> List[Tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):  # e.g. model.hpm: name the option, not the whole mapping
        return [leaf for sub in sorted(set(old) | set(new), key=str) if old.get(sub, _UNSET) != new.get(sub, _UNSET)
                for leaf in _leaf_changes(f'{key}.{sub}', old.get(sub, _UNSET), new.get(sub, _UNSET))]
    return [(key, old, new)]


def describe_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    """``'train.lr 0.01 -> 0.05; model.hpm.alpha 0.5 -> 0.25'`` for
    :func:`~timm_hpm.train.config.config_changes`' ``{key: (old, new)}`` (a mapping setting by its entries)."""
    leaves = [leaf for k, (old, new) in changes.items() for leaf in _leaf_changes(k, old, new)]
    return '; '.join(f'{k} {old if old is _UNSET else repr(old)} -> {new if new is _UNSET else repr(new)}'
                     for k, old, new in leaves)


def finished_resume(run_dir: Path, changes: Dict[str, Tuple[Any, Any]]) -> bool:
    """Whether ``--resume run_dir`` finds a finished run (nothing to do); a finished run whose budget would change
    (``changes``, ``{key: (old, new)}``) is refused: its results are never rewritten (a shorter budget would leave the
    longer run's weights under a config that says otherwise; a longer one would replace weights already used)."""
    if not run_finished(run_dir):
        return False
    if changes:
        raise ConfigError(
            f'--resume {run_dir}: the run has finished ({Path(run_dir) / "final"} holds its weights), so its '
            f'settings cannot change: {describe_changes(changes)}. A finished run is never rewritten. Start a new '
            f'run in another --output-dir (--config {Path(run_dir) / "config.yaml"} with the new budget), or, to go '
            f'on from this run\'s checkpoints deliberately, delete {Path(run_dir) / "final"} yourself and resume '
            'again.')
    return True


def parse_overrides(items: Sequence[str], epochs: Optional[int] = None, max_steps: Optional[int] = None
                    ) -> Dict[str, Any]:
    """``{'train.lr': 0.01, ...}`` from ``--set KEY=VALUE`` items (values read as YAML), ``--epochs`` and
    ``--max-steps``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01')
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f'--set {item!r}: the value is not valid YAML ({error})') from None
    if epochs is not None:
        overrides['train.epochs'] = epochs
    if max_steps is not None:
        overrides['train.max_steps'] = max_steps
    return overrides


def resolve_config(config: Optional[Path], resume: Optional[Path], overrides: Dict[str, Any],
                   output_dir: Optional[Path] = None) -> Tuple[FinetuneConfig, Dict[str, Tuple[Any, Any]]]:
    """The run's configuration: ``config`` with ``overrides`` (into ``output_dir`` when given) for a fresh run;
    for a ``resume`` folder its saved config.yaml, refusing any change but the step budget, and any change at all
    when the run has finished (:func:`finished_resume`). Returns it with the budget settings that change
    (``{key: (old, new)}``; empty for a fresh run)."""
    if resume is None:
        cfg = load_config(config, overrides)
        if output_dir is not None:
            cfg.output_dir = str(output_dir)
        return cfg, {}
    saved_path = Path(resume) / 'config.yaml'
    if not saved_path.is_file():
        raise ConfigError(f'--resume {resume}: no config.yaml there; is it a run folder?')
    saved = load_config(saved_path)
    cfg = load_config(config or saved_path, overrides)
    changes = config_changes(saved, cfg)
    refused = {k: v for k, v in changes.items() if k not in BUDGET_KEYS}
    if refused:
        raise ConfigError(
            f'--resume {resume}: ' + describe_changes(refused) +
            f" differ from the run's {saved_path}. A resumed run keeps its settings; only its step budget "
            f"({', '.join(BUDGET_KEYS)}) may change. Start a new run (another --output-dir) to change the others.")
    finished_resume(Path(resume), changes)
    cfg.output_dir = str(resume)
    return cfg, changes


def raise_on_every_process(accelerator, error: Optional[Exception]) -> None:
    """Raise ``error`` here, and on every other process when one of them failed (instead of waiting forever for
    the failed one at the next collective operation)."""
    from accelerate.utils import gather_object
    failed = [message for message in gather_object([None if error is None else str(error)]) if message]
    if error is not None:
        raise error
    if failed:
        raise RunFolderError(f'another process of this run failed: {failed[0]}')


@contextlib.contextmanager
def claim_run_folder(accelerator, run_dir: Path, fresh: bool, overwrite: bool) -> Iterator[None]:
    """The main process holds the folder's lock for the run's lifetime and refuses (or, with ``overwrite``,
    clears) a folder that holds another run; every process learns the outcome before any work."""
    with contextlib.ExitStack() as held:
        error = None
        if accelerator.is_main_process:
            try:
                held.enter_context(run_lock(run_dir, '--output-dir'))
                if fresh:
                    prepare_fresh_run(run_dir, overwrite)
            except (RunFolderError, FolderInUse) as refused:
                error = refused
        raise_on_every_process(accelerator, error)
        yield


def restore(accelerator, run_dir: Path, model: torch.nn.Module, optimizer, total_steps: Optional[int] = None
            ) -> Optional[Dict[str, Any]]:
    """The trainer state of the run's newest complete checkpoint, restored into model, optimiser and random
    generators (None when there is none); log lines written after it are dropped. A checkpoint past ``total_steps``
    (the step budget of the resumed run) is refused before anything is read into the run or written: a run is not
    shortened below what it has trained."""
    state, error = None, None
    try:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None and total_steps is not None:
            done = trainer_state(checkpoint)['global_step']
            if done > total_steps:
                raise RunFolderError(
                    f'--resume {run_dir}: its newest checkpoint {checkpoint} has trained {done} steps, more than the '
                    f'budget of {total_steps} steps asked for now. A run is not shortened below what it has trained: '
                    f'resume with a budget of at least {done} steps, or start a new run in another --output-dir.')
        if checkpoint is not None:
            state = load_checkpoint(accelerator, checkpoint, model, optimizer)
            _logger.info('resumed from %s (step %d)', checkpoint, state['global_step'])
        if accelerator.is_main_process:
            step = state['global_step'] if state else 0
            log_path = Path(run_dir) / 'log.jsonl'
            kept = [r for r in read_jsonl(log_path) if r.get('step', 0) <= step]
            write_text_atomic(log_path, ''.join(json.dumps(r) + '\n' for r in kept))
    except (CheckpointError, RunFolderError) as refused:
        error = refused
    raise_on_every_process(accelerator, error)
    if state is None:
        _logger.warning('no checkpoint in %s: starting from scratch', run_dir)
    return state


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_fingerprints(accelerator, run_dir: Path, model: torch.nn.Module, prototypes: bool = True) -> None:
    """``<run>/fingerprint_rank<i>.txt``: this process's fingerprints of the HPM prototypes (when ``prototypes`` and
    the model has an HPM head), taken before any buffer broadcast (their all-reduced EMA updates alone must keep
    them identical on every rank), and of the whole state once rank 0's batch-norm buffers are broadcast. Every
    process calls this; the ranks of a run must agree (tests/test_finetune.py)."""
    head = get_hpm_head(model) if prototypes and is_hpm_model(model) else None
    fingerprints = {'prototypes': state_fingerprint(head) if head is not None else None}
    broadcast_buffers(model)
    fingerprints['state'] = state_fingerprint(model)
    (Path(run_dir) / f'fingerprint_rank{accelerator.process_index}.txt').write_text(json.dumps(fingerprints))
