"""The training losses of fine-tuning (docs/method.md section 2, step 7) and which one a run uses."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FinetuneConfig

__all__ = ['trades_loss', 'hpm_loss', 'training_loss']


def trades_loss(adv_logits: torch.Tensor, clean_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES: CE(clean) + beta KL(p(adv) || p(clean))."""
    return F.cross_entropy(clean_logits, y) + beta * F.kl_div(F.log_softmax(adv_logits, 1),
                                                              F.softmax(clean_logits, 1), reduction='batchmean')


def hpm_loss(logits: torch.Tensor, fc_logits: torch.Tensor, y: torch.Tensor, lambda_fc: float,
             clean: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, beta: Optional[float] = None) -> torch.Tensor:
    """PGD-AT: CE(s(x_adv)) + lambda_fc CE(z(x_adv)). TRADES (``clean`` logits and ``beta`` given): the TRADES
    loss of each head, FC weighted by lambda_fc."""
    if clean is None:
        return F.cross_entropy(logits, y) + lambda_fc * F.cross_entropy(fc_logits, y)
    return trades_loss(logits, clean[0], y, beta) + lambda_fc * trades_loss(fc_logits, clean[1], y, beta)


def training_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  cfg: FinetuneConfig) -> torch.Tensor:
    """The loss of one batch, with the forward passes it needs (``model``: the prepared, possibly DDP-wrapped
    model; ``x``, ``x_adv``: the model's inputs, normalised where it normalises outside).

    - ``train.objective: base`` (the plain model's FC head): PGD-AT's CE(adv), or TRADES' CE(clean) + beta KL.
    - ``train.objective: hpm``: :func:`hpm_loss` of the HPM and FC logits of the adversarial forward, which hands
      the labels to the head (its EMA prototype update); under TRADES with the clean logits of both heads too.
    """
    trades = cfg.attack.type == 'trades'
    if cfg.train.objective != 'hpm':
        logits = model(x_adv)
        return trades_loss(logits, model(x), y, cfg.attack.beta) if trades else F.cross_entropy(logits, y)
    if trades:
        clean = model(x, return_fc=True)
        out = model(x_adv, targets=y, return_fc=True)
        return hpm_loss(out.logits, out.fc_logits, y, cfg.train.lambda_fc, clean=tuple(clean), beta=cfg.attack.beta)
    out = model(x_adv, targets=y, return_fc=True)
    return hpm_loss(out.logits, out.fc_logits, y, cfg.train.lambda_fc)
