"""One batch under the poisoning attack (:class:`_Batch`: the victims, the poisoned members, the features computed
once) and the objectives the attack ascends; the attack itself is :mod:`timm_hpm.eval.poison`."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .poison_config import PoisonConfig


def _check_views(gradient_views) -> None:
    if not isinstance(gradient_views, dict) or not gradient_views:
        raise ValueError('gradient_views must name at least one model whose gradient the attack follows '
                         f'(a dict name -> model), got {gradient_views!r}; without one nothing is attacked')


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float('-inf')).amax(1)
    return wrong - true


def _objective(name: str, margins: torch.Tensor, cfg: PoisonConfig) -> torch.Tensor:
    """What a run ascends, from the victims' margins (> 0: flipped)."""
    if name == 'margin_sum':
        return margins.clamp(max=0.0).sum()
    if name == 'soft_count':
        return torch.sigmoid(margins / cfg.temperature).sum()
    # top_m: the still-correct victims closest to flipping (the flipped ones stay out: their margin is capped)
    still = margins.detach() < 0
    if not bool(still.any()):
        return margins.sum() * 0.0
    ranked = margins.detach().masked_fill(~still, float('-inf'))
    chosen = ranked.topk(min(cfg.top_m, int(still.sum()))).indices
    return margins[chosen].clamp(max=0.0).sum()


# ---------------------------------------------------------------------------------------------- the batch's forward
class _Batch:
    """One batch with its poisoned members and victims: the logits of a poisoned batch through a gradient view and
    through the target. With an HPM model whose backbone is per-sample (``fast``), the clean members' pre-logit
    features are computed once and the head runs on the whole batch's features."""

    def __init__(self, target, views, x, y, poisoned, victims, clean_logits):
        self.target, self.views, self.x, self.y = target, views, x, y
        self.poisoned, self.victims = poisoned, victims
        self.y_victims = y[victims]
        self.fast = False
        self.head = None
        self.num_classes = clean_logits.shape[1]
        self._setup_fast(clean_logits)

    # -- the per-sample path of an HPM model
    def _setup_fast(self, clean_logits) -> None:
        from ..models import get_hpm_head, is_hpm_model
        from .views import ModelView
        target = self.target
        if not isinstance(target, ModelView) or target.amp or target.mode is None:
            return
        model = getattr(target.model, 'module', target.model)
        if not is_hpm_model(model) or model.training or model.hpm_head is None:
            return
        modes = {}
        for name, view in self.views.items():
            if not isinstance(view, ModelView) or view.model is not target.model or view.amp or view.mode is None:
                return
            modes[name] = view.mode
        self.model, self.head, self.modes = model, get_hpm_head(model), modes
        with torch.no_grad():
            feats = self.features(self.x)
            alone = self.features(self.x[self.poisoned])
            logits = self.head_logits(feats, target.mode)
        if not (torch.allclose(alone, feats[self.poisoned], rtol=1e-4, atol=1e-4)
                and torch.allclose(logits, clean_logits, rtol=1e-4, atol=1e-4)
                and bool((logits.argmax(1) == clean_logits.argmax(1)).all())):
            self.head = None  # features depend on the batch or the head on more than them: the whole-image path
            return
        self.fast, self.clean_features = True, feats

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True).float()

    def head_logits(self, feats: torch.Tensor, mode: str, tau: Optional[float] = None) -> torch.Tensor:
        with self.head.using_mode(mode), _head_tau(self.head, tau):
            return self.head(feats).float()

    def batch_features(self, xp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fp = self.features(xp)
        return self.clean_features.index_copy(0, self.poisoned, fp), fp

    # -- what a run needs at each step
    def logits(self, xp: torch.Tensor, view: str, tau: Optional[float] = None):
        """(logits through ``view`` (with grad), the target's logits (no grad), the poisoned members' FC logits or
        None). ``view``: a gradient view's name, or ``'anneal'`` (the soft head at temperature ``tau``)."""
        if self.fast:
            feats, fp = self.batch_features(xp)
            mode = 'soft' if view == 'anneal' else self.modes[view]
            out = self.head_logits(feats, mode, tau if view == 'anneal' else None)
            if mode == self.target.mode and view != 'anneal':
                scored = out.detach()
            else:
                with torch.no_grad():
                    scored = self.head_logits(feats.detach(), self.target.mode)
            return out, scored, self.head.fc_forward(fp)
        x_batch = self.x.index_copy(0, self.poisoned, xp)
        out = self.views[view](x_batch).float()
        if self.views[view] is self.target:
            scored = out.detach()
        else:
            with torch.no_grad():
                scored = self.target(x_batch).float()
        return out, scored, None

    def flipped(self, scored: torch.Tensor) -> int:
        return int((self.victims & (scored.argmax(1) != self.y)).sum())

    def realised(self, xp: torch.Tensor) -> int:
        """Victims flipped by the poisoned batch evaluated whole by the target (its own forward on the images)."""
        with torch.no_grad():
            return self.flipped(self.target(self.x.index_copy(0, self.poisoned, xp)).float())


@contextlib.contextmanager
def _head_tau(head, tau: Optional[float]):
    """The head's temperature set to ``tau`` for a forward (its checked setter), restored after."""
    if tau is None:
        yield
        return
    previous = head.tau
    head.tau = float(tau)
    try:
        yield
    finally:
        head.tau = previous
