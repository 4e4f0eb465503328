"""The bookkeeping around the training loop of recipes/finetune.py: the step budget, its learning-rate schedule and
the run's log."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

from .config import ConfigError, FinetuneConfig

__all__ = ['step_budget', 'step_scheduler', 'RunLog']

_logger = logging.getLogger(__name__)


def step_budget(cfg: FinetuneConfig, n_images: int, n_batches: int, num_processes: int) -> Tuple[int, int]:
    """``(updates_per_epoch, total_steps)``: the optimizer steps in one epoch of ``n_batches`` batches (before
    sharding over ``num_processes``), and the run's step budget: ``train.max_steps`` when set (as many epochs as it
    takes, ``train.epochs`` then unused, as max_steps in transformers' Trainer), else all ``train.epochs``."""
    t = cfg.train
    updates_per_epoch = n_batches // (t.grad_accum * num_processes)
    if updates_per_epoch < 1:
        raise ConfigError(f'one epoch has no optimizer step ({n_images} images, batch {cfg.data.batch_size}, '
                          f'{num_processes} processes, grad_accum {t.grad_accum}): lower the batch size.')
    return updates_per_epoch, t.max_steps or t.epochs * updates_per_epoch


def step_scheduler(optimizer, cfg: FinetuneConfig, updates_per_epoch: int, total_steps: int):
    """timm's scheduler ``train.sched``, updated per optimizer step (``step_update(k)`` sets the rate of step k,
    so a resume needs no saved scheduler). It spans ``total_steps``, the step budget of :func:`step_budget`; the
    warm-up keeps its length in optimizer steps."""
    from timm.scheduler import create_scheduler_v2
    t = cfg.train
    scheduler, _ = create_scheduler_v2(optimizer, sched=t.sched, num_epochs=1,
                                       warmup_epochs=t.warmup_epochs * updates_per_epoch / total_steps,
                                       min_lr=t.min_lr, step_on_epochs=False, updates_per_epoch=total_steps)
    return scheduler


class RunLog:
    """``log(record)``: one JSON line in ``<run>/log.jsonl`` (main process) and, with trackers, the record's numbers
    to ``accelerator.log`` at ``record['step']``."""

    def __init__(self, accelerator, run_dir: Path, trackers: bool):
        self.accelerator, self.path, self.trackers = accelerator, Path(run_dir) / 'log.jsonl', trackers

    def __call__(self, record: Dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open('a') as f:
                f.write(json.dumps(record) + '\n')
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record['step'])

    def budget_change(self, step: int, changes: Dict[str, Tuple[Any, Any]]) -> None:
        """Record that a resumed run's step budget changed at ``step`` (``{key: (old, new)}``)."""
        self({'step': step, 'budget_change': {k: list(v) for k, v in changes.items()}})
        _logger.info('step budget changed at step %d: %s', step,
                     ', '.join(f'{k} {old} -> {new}' for k, (old, new) in changes.items()))
