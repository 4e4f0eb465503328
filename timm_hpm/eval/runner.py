"""Batch-aware, resumable, shardable evaluation: MSA for HPM models, AutoAttack for any model.

Work is cut into units (one fixed batch of one batching). Each unit's result is appended as one line to
``<run_dir>/units.jsonl`` (whole and fsync-ed: :mod:`timm_hpm.eval.unit_store`), so a killed run resumes without
recomputing finished units and the processes of one run share units round-robin; a line a kill cut short is
recomputed with a warning. The final result is aggregated from the finished units alone, so it does not depend on
how many processes ran or how often the run was interrupted. The main process holds ``<run_dir>/run.lock`` for the
run: a second, independent run into the folder fails at once, naming the holder.

A run on more examples or batchings can start from the finished units of other runs (``extend_from``): a unit is
reused when it covers exactly the same examples in the same batching with the same settings, model and images (both
fingerprinted in the header of ``<run_dir>/units.jsonl``), which makes the result identical to a run from scratch.

A run whose results are already written (``finished``: the recipe's eval.json) is only checked: the same settings,
model and images, every unit there; nothing is computed or written, and a missing unit is an error (finished
results are never recomputed in place).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks import check_images
from ..models._hpm import is_hpm_model
from ..runfiles import run_lock, write_atomic
from .batching import BATCHINGS, make_batchings
from .checks import check_eval_ready, protocol_warnings, unwrap
from .msa import MSAConfig, attack_batch
from .progress import StageProgress
from .views import ModelView, PassCounter, hpm_views
from .results import aggregate
from .run_folder import (StageCheckpoint, check_fingerprint, check_settings, copy_reusable, data_fingerprint,
                         reusable_units)
from .sanity import sanity_checks  # in its own module; timm_hpm.eval exports it from here
from .unit_store import adversarial_path, missing_units, write_unit

__all__ = ['evaluate', 'run_unit', 'sanity_checks']

_logger = logging.getLogger(__name__)


def evaluate(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: MSAConfig,
        run_dir: Path,
        protocol: str = 'msa',
        batch_size: int = 128,
        batchings: Sequence[str] = ('default',),
        amp: bool = False,
        save_adversarial: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
        metadata: Optional[dict] = None,
        extend_from: Sequence[Path] = (),
        surrogate_models: Optional[Dict[str, nn.Module]] = None,
        finished: bool = False,
) -> Optional[dict]:
    """Evaluate ``model`` on ``x, y`` (images in [0, 1]); returns the aggregated result on the main process
    (``None`` elsewhere: call :func:`aggregate` after all processes finished, or use the recipe).

    ``extend_from``: run folders of other runs of the same model, settings and images whose finished units are
    copied instead of recomputed (e.g. a 1,000-image run started from a 250-image one, or a run of more
    batchings from a default-only one). ``surrogate_models``: MSA's extra surrogates (e.g. the base model the HPM
    model was fine-tuned from), attacked after the head's modes; their names are ``cfg.surrogate_models``.
    ``finished``: the run's results are already written (the recipe's eval.json): the folder is checked against this
    call (settings, model, images: an error when they differ, as for any run) and must hold every unit (an error
    otherwise); nothing is computed, copied or written, not even a missing header."""
    num_classes = _check_inputs(model, x, y, cfg, protocol, batch_size, surrogate_models)
    surrogate_models = dict(surrogate_models or {})
    for warning in protocol_warnings(model, protocol):
        _logger.warning(warning)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The main process holds the folder: a second, independent run fails at once instead of redoing its batches.
    # The other processes of this run share it (the caller starts them together; the recipe checks the lock first).
    with run_lock(run_dir, '--out') if process_index == 0 else contextlib.nullcontext():
        settings = check_settings(run_dir, protocol, batch_size, batchings, len(y), amp, cfg, process_index)
        fingerprint = check_fingerprint(run_dir, model, x, y, write=process_index == 0 and not finished,
                                        settings=settings)
        reusable = reusable_units(extend_from, settings, fingerprint['model'], x, y) \
            if extend_from and not finished else {}
        plan = make_batchings(len(y), batch_size, batchings, cfg.seed, labels=y)
        units = [(b, i, idx) for b in batchings for i, idx in enumerate(plan[b])]
        todo = _units_to_compute(run_dir, units, finished, process_index, num_processes, reusable,
                                 save_adversarial, extend_from)
        _compute_units(todo, model, x, y, cfg, run_dir, protocol, amp, save_adversarial, num_classes, progress,
                       surrogate_models)
        if process_index != 0:
            return None
        if missing_units(run_dir, units):
            return None  # other processes still at work; the recipe aggregates after they finish
        result = aggregate(run_dir, metadata)
    for warning in protocol_warnings(model, protocol):
        if warning not in result.setdefault('warnings', []):
            result['warnings'].append(warning)
    return result


def _units_to_compute(run_dir: Path, units: list, finished: bool, process_index: int, num_processes: int,
                      reusable: dict, save_adversarial: bool, extend_from: Sequence[Path]) -> list:
    """This process's units still to compute: its share (round-robin) of those without a finished unit, less those
    copied from ``extend_from``'s runs; none for a ``finished`` run, which must hold every unit (an error
    otherwise: finished results are never recomputed in place)."""
    if finished:
        missing = missing_units(run_dir, units)
        if missing:
            raise ValueError(f'{run_dir} belongs to a finished evaluation (its results are written) but '
                             f'{len(missing)} of its {len(units)} batches have no readable unit file; finished '
                             'results are never recomputed in place. Evaluate into a new --out folder.')
        return []
    mine = units[process_index::num_processes]  # round-robin: the processes of one run share the work
    todo = missing_units(run_dir, mine)
    if len(todo) < len(mine):
        _logger.info('resuming: %d of %d units already done', len(mine) - len(todo), len(mine))
    return copy_reusable(todo, reusable, run_dir, save_adversarial, extend_from)


def _check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig, protocol: str, batch_size: int,
                  surrogate_models: Optional[Dict[str, nn.Module]]) -> Optional[int]:
    """Every check before any work; returns the model's number of classes (None when it does not say)."""
    if protocol not in ('msa', 'autoattack'):
        raise ValueError(f"protocol must be 'msa' or 'autoattack', got {protocol!r}")
    check_eval_ready(model)
    num_classes = getattr(unwrap(model), 'num_classes', None)
    check_images(x, y, num_classes)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if protocol == 'msa' and not is_hpm_model(unwrap(model)):
        raise ValueError("protocol 'msa' needs an HPM model (its surrogates are views of the HPM head); use "
                         "protocol 'autoattack' for a plain model.")
    if sorted(surrogate_models or {}) != sorted(cfg.surrogate_models):
        raise ValueError(f'surrogate_models {sorted(surrogate_models or {})} must be the models '
                         f'cfg.surrogate_models names ({sorted(cfg.surrogate_models)})')
    return num_classes


def _compute_units(todo: list, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig, run_dir: Path,
                   protocol: str, amp: bool, save_adversarial: bool, num_classes: Optional[int],
                   progress: bool, surrogate_models: Dict[str, nn.Module]) -> None:
    """Attack each unit's batch and write its result file (atomically, the adversarial images first)."""
    counter = PassCounter()
    if protocol == 'msa':
        target, surrogates = hpm_views(model, cfg.surrogates, counter, amp)
        for name in cfg.surrogate_models:  # in the configured order, after the head's modes
            other = surrogate_models[name]
            surrogates[name] = ModelView(other, None, counter, amp, batch_dependent=is_hpm_model(unwrap(other)))
    else:
        target, surrogates = ModelView(model, None, counter, amp, batch_dependent=is_hpm_model(unwrap(model))), {}
    if num_classes is None:
        with torch.no_grad():
            num_classes = target(x[:1]).shape[1]
    stages = StageProgress(enabled=progress and protocol == 'msa')  # a line under the batches' bar
    for unit in tqdm(todo, desc=f'{protocol} batches', disable=not progress, position=0):
        stages.batch = f'{unit[0]} batch {unit[1]}'
        run_unit(target, surrogates, x, y, cfg, run_dir, unit, counter, num_classes, resumable=protocol == 'msa',
                 progress=stages, save_adversarial=save_adversarial)


def run_unit(target: nn.Module, surrogates: Dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig,
             run_dir: Path, unit: tuple, counter: PassCounter, num_classes: int, resumable: bool = True,
             progress: Optional[StageProgress] = None, save_adversarial: bool = False) -> dict:
    """One unit of a run, as every runner computes it (:func:`evaluate`, :func:`timm_hpm.benchmark`): ``unit`` is
    ``(batching, index, idx)``, the fixed batch ``x[idx], y[idx]``, attacked by :func:`attack_batch` through
    ``target`` and ``surrogates`` (views counting their passes in ``counter``) with the unit's own seed, its
    adversarial images checked against the threat model, its result written to ``run_dir`` (with
    ``save_adversarial``, the realised images first). ``resumable``: a stage checkpoint, so that a stopped batch
    resumes at its next stage (MSA). Returns the unit's result as written."""
    batching, index, idx = unit
    before = counter.as_dict()
    xb, yb = x[idx], y[idx]
    seed = cfg.seed * 1_000_003 + index * 101 + BATCHINGS.index(batching)
    path, data_sha256 = adversarial_path(run_dir, batching, index), data_fingerprint(xb, yb)
    checkpoint = StageCheckpoint(path, data_sha256) if resumable else None
    result = attack_batch(target, surrogates, xb, yb, cfg, seed=seed, num_classes=num_classes,
                          checkpoint=checkpoint, progress=progress)
    x_adv = result.pop('x_adv')
    _check_threat_model(x_adv, xb, cfg)
    after, earlier = counter.as_dict(), result.pop('passes_before')  # earlier: the stages a stopped start made
    result['passes'] = {k: after[k] - before[k] + earlier[k] for k in after}
    result['indices'] = idx
    result['data_sha256'] = data_sha256
    if save_adversarial:
        from safetensors.torch import save_file
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, lambda tmp: save_file(
            {'x_adv': x_adv.contiguous(), 'indices': torch.tensor(idx)}, str(tmp)))
    write_unit(run_dir, batching, index, result)
    if checkpoint is not None:
        checkpoint.remove()
    return result


def _check_threat_model(x_adv: torch.Tensor, x: torch.Tensor, cfg: MSAConfig) -> None:
    """A realised image outside the eps-ball or [0, 1] is a bug of the attack: stop before it is written."""
    delta = (x_adv - x).flatten(1)
    norm = delta.abs().amax(1) if cfg.norm == 'Linf' else delta.norm(dim=1)
    if float(norm.max()) > cfg.eps * (1 + 1e-4) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f'an adversarial image left the threat model (max {cfg.norm} {float(norm.max())}); '
                           'this is a bug, please report it.')
