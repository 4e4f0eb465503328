"""The Mixed Surrogate Attack (MSA) on one fixed batch (docs/method.md section 3).

Every figure is the target's accuracy on a *realised* batch: a whole batch of images, each within eps of
its clean image, scored by one forward of the target. Candidates come from:

* ``autoattack``: AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square) run on the target
  itself, its images re-scored on the fixed batch (never AutoAttack's own accuracy);
* for each surrogate (views on the target's weights: ``fc``, ``static``, ``soft``, ``dynamic``): white-box
  APGD-CE and APGD-T on the whole batch, the loss summed over it, no re-batching;
* optionally the surrogates' own AutoAttack cascades (``surrogate_autoattack``).

Cascade: a sample broken in the running realised batch is not attacked again (batch-independent surrogates
attack only the still-robust samples; batch-dependent ones attack the whole batch, and only the robust
samples' images are replaced), but every candidate batch is scored whole. The realised batch takes a
candidate when it lowers the batch's accuracy. The per-sample union over all candidates is a lower bound
that need not be realisable in one batch; it is reported beside the realised figure.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..layers.hpm_head import HPM_MODES
from ..models._hpm import get_hpm_head
from .apgd import apgd, apgd_targeted
from .autoattack import make_autoattack, run_autoattack

__all__ = ['MSAConfig', 'PassCounter', 'ModelView', 'hpm_views', 'attack_batch', 'BATCH_DEPENDENT_MODES']

BATCH_DEPENDENT_MODES = ('dynamic', 'soft')


@dataclass
class MSAConfig:
    """Options of the protocol (all reported in the results)."""
    eps: float
    norm: str = 'Linf'
    surrogates: Sequence[str] = ('fc', 'static', 'soft', 'dynamic')
    apgd_iters: int = 100
    n_target_classes: int = 3  # per surrogate; AutoAttack's own cascade keeps its 9 (cost: see the MSA benchmark)
    autoattack: bool = True  # the standard AutoAttack cascade on the target, re-scored on fixed batches
    autoattack_version: str = 'standard'
    autoattack_attacks: Optional[Sequence[str]] = None  # with autoattack_version='custom'
    autoattack_iters: Optional[int] = None  # None: AutoAttack's own (100)
    square_queries: Optional[int] = None  # None: AutoAttack's own (5000)
    surrogate_autoattack: bool = False  # also each surrogate's AutoAttack cascade (APGD-CE, APGD-T, FAB-T)
    cascade: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d['surrogates'] = list(self.surrogates)
        d['autoattack_attacks'] = list(self.autoattack_attacks) if self.autoattack_attacks else None
        return d


class PassCounter:
    """Images through forward and backward passes."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def as_dict(self) -> Dict[str, int]:
        return {'forward_images': self.forward, 'backward_images': self.backward}


class ModelView(nn.Module):
    """A view on a model: optional HPM mode, optional bf16 autocast, pass counting. Shares the weights."""

    def __init__(self, model: nn.Module, mode: Optional[str] = None, counter: Optional[PassCounter] = None,
                 amp: bool = False, batch_dependent: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.mode = mode
        self.counter = counter
        self.amp = amp
        self.batch_dependent = mode in BATCH_DEPENDENT_MODES if batch_dependent is None else batch_dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counter is not None:
            self.counter.forward += x.shape[0]
            if torch.is_grad_enabled() and x.requires_grad:
                self.counter.backward += x.shape[0]
        mode_ctx = get_hpm_head(self.model).using_mode(self.mode) if self.mode else contextlib.nullcontext()
        amp_ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with mode_ctx, amp_ctx:
            return self.model(x).float()


def hpm_views(model: nn.Module, surrogates: Sequence[str], counter: PassCounter, amp: bool = False):
    """The target (``dynamic``) and the surrogate views of an HPM model."""
    unknown = [s for s in surrogates if s not in HPM_MODES]
    if unknown:
        raise ValueError(f'unknown surrogates {unknown}; choose from {HPM_MODES}')
    get_hpm_head(model)
    target = ModelView(model, 'dynamic', counter, amp)
    return target, {s: ModelView(model, s, counter, amp) for s in surrogates}


@torch.no_grad()
def _correct(target: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return target(x).argmax(1) == y


def attack_batch(
        target: nn.Module,
        surrogates: Dict[str, nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: MSAConfig,
        seed: int,
        num_classes: int,
) -> dict:
    """MSA on one fixed batch. Returns per-sample correctness (lists of bools) of the target on the clean
    batch, on each candidate batch, and on the final realised batch, and the realised images."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    clean = _correct(target, x, y)
    realised_x, realised = x.clone(), clean.clone()
    union = clean.clone()
    candidates: Dict[str, torch.Tensor] = {}
    stages: List[str] = []

    def consider(name: str, x_adv: torch.Tensor, replace: torch.Tensor) -> None:
        nonlocal realised_x, realised, union
        x_cand = realised_x.clone()
        x_cand[replace] = x_adv[replace]
        correct = _correct(target, x_cand, y) & clean
        candidates[name] = correct
        union &= correct
        if int(correct.sum()) < int(realised.sum()):
            realised_x, realised = x_cand, correct
        stages.append(name)

    def active() -> torch.Tensor:
        return realised.clone() if cfg.cascade else clean.clone()

    if cfg.autoattack:
        if bool(clean.any()):
            # Plain AutoAttack's figure: all its images, re-scored on this fixed batch.
            adversary = make_autoattack(target, cfg.eps, cfg.norm, version=cfg.autoattack_version,
                                        attacks=cfg.autoattack_attacks, seed=seed, device=x.device,
                                        num_classes=num_classes, n_iter=cfg.autoattack_iters,
                                        square_queries=cfg.square_queries)
            consider('autoattack', run_autoattack(adversary, x, y, batch_size=x.shape[0]), torch.ones_like(clean))
        else:
            candidates['autoattack'] = clean.clone()

    for name, surrogate in surrogates.items():
        todo = active()
        if not bool(todo.any()):
            break
        batch_dependent = getattr(surrogate, 'batch_dependent', True)
        # Batch-independent surrogates may attack the sub-batch of robust samples; batch-dependent ones
        # see the whole batch (its composition is part of the model).
        idx = torch.arange(x.shape[0], device=x.device) if batch_dependent else todo.nonzero().flatten()
        xs, ys = x[idx], y[idx]

        def scatter(x_sub: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[idx] = x_sub
            return out

        consider(f'{name}/apgd-ce', scatter(apgd(surrogate, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters,
                                                 loss='ce', generator=generator)), todo)
        for rank, x_t in enumerate(apgd_targeted(surrogate, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters,
                                                 n_target_classes=cfg.n_target_classes, generator=generator)):
            todo = active()
            if not bool(todo.any()):
                break
            consider(f'{name}/apgd-t{rank + 1}', scatter(x_t), todo)
        if cfg.surrogate_autoattack and bool(active().any()):
            todo = active()
            adversary = make_autoattack(surrogate, cfg.eps, cfg.norm, version='custom',
                                        attacks=['apgd-ce', 'apgd-t', 'fab-t'], seed=seed, device=x.device,
                                        num_classes=num_classes, n_iter=cfg.autoattack_iters)
            consider(f'{name}/autoattack', run_autoattack(adversary, x, y, batch_size=x.shape[0]), todo)

    return {
        'clean': clean.tolist(),
        'candidates': {k: v.tolist() for k, v in candidates.items()},
        'realised': realised.tolist(),
        'union': union.tolist(),
        'stages': stages,
        'seconds': time.perf_counter() - start,
        'x_adv': realised_x,
    }
