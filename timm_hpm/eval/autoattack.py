"""One small adapter over AutoAttack: the PyPI fork ``pyautoattack`` (a dependency) or upstream ``autoattack``
(git-only) when that is installed. The fork's attack code is upstream's (commit a392200) but for its imports; the two
differ in their interface only.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['autoattack_backend', 'make_autoattack', 'run_autoattack', 'STANDARD_ATTACKS']

STANDARD_ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
AUTOATTACK_VERSIONS = ('standard', 'plus', 'rand', 'custom')
_VERSIONS = AUTOATTACK_VERSIONS


def autoattack_backend(prefer: Optional[str] = None) -> str:
    """``'autoattack'`` (upstream) or ``'pyautoattack'`` (PyPI), whichever imports; ``prefer`` picks one."""
    order = [prefer] if prefer else ['pyautoattack', 'autoattack']
    for name in order:
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise ImportError('AutoAttack is not installed: `pip install pyautoattack` (or upstream autoattack from git).')


def make_autoattack(
        model: nn.Module,
        eps: float,
        norm: str = 'Linf',
        version: str = 'standard',
        attacks: Optional[Sequence[str]] = None,
        seed: int = 0,
        device: Optional[torch.device] = None,
        num_classes: Optional[int] = None,
        n_iter: Optional[int] = None,
        square_queries: Optional[int] = None,
        backend: Optional[str] = None,
):
    """An AutoAttack adversary with the reference settings.

    ``version='custom'`` with an ``attacks`` list gets the *standard* version's parameters (one restart,
    9 target classes, 5000 Square queries), not the constructor's defaults (5 restarts). ``num_classes``
    caps the target classes at K - 1; ``n_iter`` / ``square_queries`` shorten runs (tests, sanity checks).
    """
    if version not in _VERSIONS:
        raise ValueError(f'AutoAttack version must be one of {_VERSIONS}, got {version!r}')
    if norm not in ('Linf', 'L2', 'L1'):
        raise ValueError(f"norm must be 'Linf', 'L2' or 'L1', got {norm!r}")
    if version == 'custom' and not attacks:
        raise ValueError("version='custom' needs a list of attacks, e.g. ['apgd-ce', 'apgd-t']")
    if version != 'custom' and attacks:
        raise ValueError(f"attacks={list(attacks)} needs version='custom'")
    device = device or next(model.parameters()).device
    backend = autoattack_backend(backend)
    logging.getLogger('auto-attack').setLevel(logging.WARNING)  # its INFO/DEBUG progress is per-batch chatter
    if backend == 'pyautoattack':
        from pyautoattack import AutoAttack
        adversary = AutoAttack(model, eps=eps, norm=norm, version=version,
                               attacks=list(attacks) if attacks else None, device=device, seed=seed)
    else:
        from autoattack import AutoAttack
        adversary = AutoAttack(model, norm=norm, eps=eps, version=version, attacks_to_run=list(attacks or []),
                               device=device, seed=seed, verbose=False)
    adversary.backend = backend
    if version == 'custom':
        adversary.apgd.n_restarts = 1
        adversary.apgd_targeted.n_restarts = 1
        adversary.apgd_targeted.n_target_classes = 9
        adversary.fab.n_restarts = 1
        adversary.fab.n_target_classes = 9
        adversary.square.n_queries = 5000
    if num_classes is not None:
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
    if n_iter is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = n_iter
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    return adversary


def run_autoattack(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int, return_own: bool = False):
    """Adversarial images from AutoAttack's cascade. Its own verdict is not the figure: it re-batches still-robust
    points, which changes a batch-dependent model's predictions; score the images yourself on fixed batches. With
    ``return_own``, also AutoAttack's own per-sample verdict (its printout's accuracy, for the comparison of
    evaluations): ``(x_adv, own_correct)``."""
    logger = logging.getLogger('auto-attack')
    previous = logger.level
    logger.setLevel(logging.ERROR)  # its warnings that the model is dynamic are expected here: that is why we re-score
    try:
        if adversary.backend == 'pyautoattack':
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        else:
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
    finally:
        logger.setLevel(previous)
    return (x_adv.detach(), (y_adv == y).detach()) if return_own else x_adv.detach()
