"""Scoring a study's model: the held-out images and the attack (the surrogate part of MSA, without AutoAttack)."""
from __future__ import annotations

import torch

from ..data import build_train_val

__all__ = ['held_out', 'scoring_config', 'score_model']


def held_out(cfg, n: int, model) -> tuple:
    """The first ``n`` held-out images (the last ``data.val_examples`` of the training split) as tensors in [0, 1]."""
    _, val = build_train_val(cfg.data.dataset, cfg.data.data_dir, cfg.data.val_examples, cfg.data.train_examples,
                             augment=False, image_size=model.pretrained_cfg['input_size'],
                             num_classes=model.num_classes, seed=cfg.train.seed, pretrained_cfg=model.pretrained_cfg)
    n = min(n, len(val))
    items = [val[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def scoring_config(eps: float, norm: str, scoring: dict):
    """The attack that scores the study's models (an :class:`~timm_hpm.eval.MSAConfig` without AutoAttack), from
    the study's ``scoring`` options (``apgd_iters``, ``n_target_classes``, ``combine_rounds``); everything else is
    MSA's default, so its ``to_dict()`` belongs in a score's definition (a changed attack makes old scores stale)."""
    from ..eval import MSAConfig
    return MSAConfig(eps=eps, norm=norm, autoattack=False, apgd_iters=scoring.get('apgd_iters', 20),
                     n_target_classes=scoring.get('n_target_classes', 3),
                     target_n_target_classes=scoring.get('n_target_classes', 3),
                     combine_rounds=scoring.get('combine_rounds', 3))


def score_model(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, scoring: dict,
                batch_size: int) -> dict:
    """Per-image clean and robust correctness of ``model`` (eval mode; an HPM model's dynamic head) on fixed
    batches: whole-batch APGD-CE and APGD-T (``scoring``: ``apgd_iters``, ``n_target_classes``) through the target
    and, for an HPM model, through its head's modes, every iterate through a batch-dependent view scored; the
    realised batches count (:func:`scoring_config`)."""
    from ..attacks import normalized_view
    from ..eval import msa
    from ..models import is_hpm_model
    view = normalized_view(model).eval()
    cfg = scoring_config(eps, norm, scoring)
    hpm = is_hpm_model(model)
    surrogates = None if hpm else {}
    result = msa(view, x, y, eps, surrogates=surrogates, batch_size=batch_size, config=cfg, batch_dependent=hpm)
    with torch.no_grad():
        clean = torch.cat([view(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    return {'clean': clean.tolist(), 'robust': result['correct'].tolist(), 'clean_acc': result['clean_acc'],
            'robust_acc': result['robust_acc'], 'union_acc': result['union_acc']}
