"""The adaptive-attack sanity checks (:func:`sanity_checks`): the evaluation repeated on a small subset at other
radii, with more iterations, with the gradient attacks alone and with Square alone, each check a warning when it fails
(a sign of a failing attack or of gradient masking)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .checks import unwrap
from .msa import MSAConfig

__all__ = ['sanity_checks']


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig, run_dir: Path,
                  protocol: str = 'msa', batch_size: int = 128, amp: bool = False, progress: bool = True) -> dict:
    """The adaptive-attack sanity checks on a small subset, each a warning when it fails:
    robust accuracy non-increasing in eps and at most chance (+5 points) at eps 0.5 (Linf) / 10 (L2); more
    iterations never raise it (beyond one sample); Square alone is not better than the gradient attacks by more
    than 5 points (a sign of gradient masking)."""
    from dataclasses import replace

    from .runner import evaluate  # here, not above: the runner imports this module (it exports sanity_checks)
    cfg = replace(cfg, surrogate_models=())  # the checks concern the attacks on the model itself
    run_dir = Path(run_dir)
    n = len(y)
    num_classes = getattr(unwrap(model), 'num_classes', None) or int(y.max()) + 1
    key = 'msa_acc' if protocol == 'msa' else 'autoattack_acc'

    def run(name, c):
        return evaluate(model, x, y, c, run_dir / name, protocol=protocol, batch_size=batch_size, amp=amp,
                        progress=progress)[key]

    large = 0.5 if cfg.norm == 'Linf' else 10.0
    eps_grid = sorted({cfg.eps / 2, cfg.eps, min(2 * cfg.eps, 1.0) if cfg.norm == 'Linf' else 2 * cfg.eps, large})
    by_eps = {e: run(f'eps_{e:.6f}', replace(cfg, eps=e)) for e in eps_grid}
    more_iters = run('more_iters', replace(cfg, apgd_iters=2 * cfg.apgd_iters,
                                           autoattack_iters=2 * (cfg.autoattack_iters or 100)))
    gradient_cfg = replace(cfg, autoattack_version='custom', autoattack_attacks=['apgd-ce', 'apgd-t', 'fab-t'])
    gradient_only = evaluate(model, x, y, gradient_cfg if cfg.autoattack else cfg,
                             run_dir / 'gradient_only', protocol=protocol, batch_size=batch_size, amp=amp,
                             progress=progress)
    square_only = evaluate(model, x, y, replace(cfg, autoattack_version='custom', autoattack_attacks=['square'],
                                                surrogates=()), run_dir / 'square_only',
                           protocol='autoattack' if protocol == 'autoattack' else 'msa', batch_size=batch_size,
                           amp=amp, progress=progress)
    grad_acc = gradient_only[key]
    square_acc = square_only['autoattack_acc']
    warnings = []
    values = [by_eps[e] for e in eps_grid]
    if any(b > a + 1e-9 for a, b in zip(values, values[1:])):
        warnings.append(f'robust accuracy rises with eps ({dict(zip(eps_grid, values))}): the attack is failing.')
    if by_eps[large] > 1.0 / num_classes + 0.05:
        warnings.append(f'at eps={large} robust accuracy is {by_eps[large]:.3f}, above chance '
                        f'({1.0 / num_classes:.3f}): gradient masking or a broken attack.')
    if more_iters > by_eps[cfg.eps] + 1.0 / n + 1e-9:
        warnings.append(f'more iterations raised robust accuracy ({by_eps[cfg.eps]:.3f} -> {more_iters:.3f}).')
    if square_acc < grad_acc - 0.05:
        warnings.append(f'Square alone ({square_acc:.3f}) beats the gradient attacks ({grad_acc:.3f}) by more than '
                        '5 points: gradient masking suspected.')
    return {'n_examples': n, 'robust_acc_by_eps': {f'{e:.6f}': v for e, v in by_eps.items()},
            'more_iterations_acc': more_iters, 'gradient_only_acc': grad_acc, 'square_only_acc': square_acc,
            'warnings': warnings}
