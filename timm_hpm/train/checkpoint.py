"""Checkpoint folders that are never unpickled, named and rotated as accelerate's ``save_state`` names them.

``<run>/checkpoints/checkpoint_<k>/`` (``k``: the optimizer step it was taken at) holds:

- ``model.safetensors``: the weights and buffers (HPM prototypes, batch-norm statistics), read with safetensors;
- ``optimizer.pt``: the optimiser's state dict, read with ``torch.load(weights_only=True)``;
- ``rng_state_<rank>.pt``: each process's Python, NumPy and torch random states as tensors and numbers, read with
  ``torch.load(weights_only=True)``;
- ``trainer_state.json``: the step, epoch and batches done in it, accelerate's step counter and the gradient
  scaler's state. Written last, by rename: a folder without it is incomplete (the run was killed while saving) and
  is skipped.

The learning-rate scheduler is not saved: timm's schedulers compute the rate from the step (``step_update``).
Folders of earlier versions, ``checkpoints/step_<k>/`` (same files), are still found and rotated.

Naming and rotation come from the accelerator's ``ProjectConfiguration`` (``project_dir``,
``automatic_checkpoint_naming``, ``total_limit``), as in ``Accelerator.save_state``: ``checkpoint_<iteration>`` under
``<project_dir>/checkpoints``, the newest ``total_limit`` kept. Two differences, both for a resume after a kill: the
iteration is set to the optimizer step (a resume knows where it is, and a second save at the same step, at an
epoch end, replaces the first instead of failing), and old folders are deleted after the new one is complete
(``save_state`` deletes them first, so a kill while saving can leave no checkpoint at all).

Why not ``Accelerator.save_state``/``load_state`` themselves (accelerate 1.15, read for this choice):

- ``load_state`` restores objects given to ``register_for_checkpointing`` with ``checkpointing.load_custom_state``,
  which calls ``load(..., weights_only=False)``: unpickling, so a checkpoint folder from someone else runs code on
  resume;
- ``checkpointing.load_accelerator_state`` reads ``random_states_<rank>.pkl`` inside ``try: ... except Exception:
  logger.info("Could not load random states")``: an unreadable or refused RNG file is skipped silently and the run
  goes on, no longer bitwise reproducible;
- ``save_state`` writes its files in place and runs its only hook (``register_save_state_pre_hook``) before them, so a
  completion marker cannot be the last file; ``load_state`` takes the highest-numbered folder, complete or not, and
  does not restore ``ProjectConfiguration.iteration``, so the next ``save_state`` after a resume raises
  "Checkpoint directory ... already exists".

Here every file is read with safetensors, JSON or ``torch.load(weights_only=True)``, and a file that cannot be read
that way is an error naming it.
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..runfiles import write_atomic, write_text_atomic

__all__ = ['CheckpointError', 'save_checkpoint', 'save_run_checkpoint', 'load_checkpoint', 'latest_checkpoint',
           'checkpoint_folders', 'write_atomic', 'write_text_atomic', 'read_json', 'trainer_state']

_logger = logging.getLogger(__name__)

MODEL, OPTIMIZER, TRAINER_STATE = 'model.safetensors', 'optimizer.pt', 'trainer_state.json'
STATE_KEYS = ('global_step', 'epoch', 'batches_done')
# checkpoint_<k> as accelerate's automatic naming; step_<k> as earlier versions of this package named them
_FOLDER_NAME = re.compile(r'(checkpoint|step)_(\d+)')
# What accelerate's save_state writes: its pickles are never read, but their presence explains a missing file.
_ACCELERATE_FILES = ('custom_checkpoint_0.pkl', 'optimizer.bin', 'random_states_0.pkl')


class CheckpointError(RuntimeError):
    """A checkpoint or run file that cannot be read safely; the message names the file and what is wrong."""


def _rng_file(rank: int) -> str:
    return f'rng_state_{rank}.pt'


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unreadable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f'{path} {problem}. Delete the folder {path.parent} to resume from the checkpoint before '
                           'it (or from the start when there is none).')


def _read(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with every failure turned into a :class:`CheckpointError` that names the file."""
    if not path.is_file():
        if any((path.parent / name).exists() for name in _ACCELERATE_FILES):
            raise CheckpointError(f"{path} is missing: {path.parent} was written by accelerate's save_state (an older "
                                  'timm-hpm), whose pickles are never loaded, as unpickling can run code. Start the '
                                  'run again (--overwrite).')
        raise _unreadable(path, f'is missing ({what} expected)')
    if path.stat().st_size == 0:
        raise _unreadable(path, f'is empty (0 bytes; {what} expected): it was cut short')
    try:
        return read(path)
    except pickle.UnpicklingError as error:
        # torch's message suggests loading with weights_only=False: keep only why the safe loader refused the file
        detail = str(error).partition('WeightsUnpickler error:')[2].strip()
        reason = detail.splitlines()[0].split('. ')[0] if detail else _first_line(error)
        raise _unreadable(path, f'is not a weights-only torch file ({reason}); it is refused, as nothing in a '
                                'checkpoint folder is unpickled (that can run code from the file)') from None
    except Exception as error:  # noqa: BLE001  (any failure of a reader is about this file)
        raise _unreadable(path, f'cannot be read as {what}: {_first_line(error)}') from None


def read_json(path: Path, what: str = 'a JSON file') -> Any:
    def parse(p: Path) -> Any:
        return json.loads(p.read_bytes())
    return _read(path, what, parse)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location='cpu', weights_only=True)


def _rng_state() -> Dict[str, Any]:
    """The process's random states as tensors and plain numbers (what ``weights_only`` loading accepts)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': [version, torch.tensor(internal, dtype=torch.int64), gauss],
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(accelerator, folder: Path, model: torch.nn.Module, optimizer, state: Dict[str, int]) -> None:
    """Write the checkpoint folder (every process calls this). ``state``: global_step, epoch, batches_done."""
    folder = Path(folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRAINER_STATE).unlink(missing_ok=True)  # incomplete until written again, last
        # force_contiguous (not the default of older safetensors): a channels_last model's 4-D weights are not
        # contiguous, which safetensors refuses; load_model copies them back into the model's own layout.
        write_atomic(folder / MODEL, lambda tmp: save_model(accelerator.unwrap_model(model), str(tmp),
                                                            force_contiguous=True))
        write_atomic(folder / OPTIMIZER, lambda tmp: torch.save(optimizer.state_dict(), tmp))
    accelerator.wait_for_everyone()
    write_atomic(folder / _rng_file(accelerator.process_index), lambda tmp: torch.save(_rng_state(), tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state = {**{k: state[k] for k in STATE_KEYS}, 'accelerator_step': accelerator.step}
        if accelerator.scaler is not None:
            trainer_state['grad_scaler'] = accelerator.scaler.state_dict()
        write_text_atomic(folder / TRAINER_STATE, json.dumps(trainer_state))
    accelerator.wait_for_everyone()


def trainer_state(folder: Path) -> Dict[str, Any]:
    """The trainer state of a complete checkpoint folder (global_step, epoch, batches_done, ...), read and checked
    without restoring anything (e.g. to compare its step with a resumed run's budget)."""
    return _trainer_state(Path(folder) / TRAINER_STATE)


def _trainer_state(path: Path) -> Dict[str, Any]:
    state = read_json(path, 'the trainer state (JSON)')
    missing = [k for k in (*STATE_KEYS, 'accelerator_step')
               if not isinstance(state, dict) or not isinstance(state.get(k), int)]
    if missing:
        raise _unreadable(path, f'has no integer {", ".join(missing)}: it is damaged')
    return state


def load_checkpoint(accelerator, folder: Path, model: torch.nn.Module, optimizer) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer``, the random generators and
    ``accelerator``; returns the trainer state (global_step, epoch, batches_done)."""
    folder = Path(folder)
    state = _trainer_state(folder / TRAINER_STATE)
    _read(folder / MODEL, 'the model weights (safetensors)',  # read on the CPU, copied into the model's tensors
          lambda p: load_model(accelerator.unwrap_model(model), str(p)))
    _read(folder / OPTIMIZER, "the optimiser's state (a weights-only torch file)",
          lambda p: optimizer.load_state_dict(_torch_load(p)))
    _read(folder / _rng_file(accelerator.process_index), 'random states (a weights-only torch file)',
          lambda p: _set_rng_state(_torch_load(p)))
    accelerator.step = state['accelerator_step']
    if accelerator.scaler is not None and state.get('grad_scaler'):
        accelerator.scaler.load_state_dict(state['grad_scaler'])
    return state


def save_run_checkpoint(accelerator, model: torch.nn.Module, optimizer, state: Dict[str, int]) -> Path:
    """:func:`save_checkpoint` into ``<project_dir>/checkpoints/checkpoint_<global_step>``, then delete all but the
    newest ``total_limit`` checkpoint folders (every process calls this). The accelerator needs a
    ``ProjectConfiguration(project_dir=<run>, automatic_checkpoint_naming=True, total_limit=N)``."""
    config = accelerator.project_configuration
    if not (config.automatic_checkpoint_naming and config.project_dir):
        raise ValueError('save_run_checkpoint names checkpoints as accelerate does: give the Accelerator '
                         'project_config=ProjectConfiguration(project_dir=<run folder>, '
                         'automatic_checkpoint_naming=True, total_limit=<how many to keep>)')
    config.iteration = state['global_step']  # the step, not a count of saves: see the module's docstring
    folder = Path(config.project_dir) / 'checkpoints' / f'checkpoint_{accelerator.save_iteration}'
    save_checkpoint(accelerator, folder, model, optimizer, state)
    if accelerator.is_main_process and config.total_limit:
        for old in checkpoint_folders(config.project_dir)[:-config.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def checkpoint_folders(run_dir: Path) -> List[Path]:
    """The run's checkpoint folders, complete or not, oldest first (by step; at the same step an earlier
    version's ``step_<k>`` before ``checkpoint_<k>``)."""
    found = []
    for path in (Path(run_dir) / 'checkpoints').glob('*_*'):
        match = _FOLDER_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(2)), match.group(1) == 'checkpoint', path))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of a run (incomplete ones, killed while saving, are skipped with a
    warning)."""
    for folder in reversed(checkpoint_folders(run_dir)):
        if (folder / TRAINER_STATE).exists():
            return folder
        _logger.warning('%s is incomplete (no %s: the run was stopped while saving it); skipping it', folder,
                        TRAINER_STATE)
    return None
