"""Hybrid Prototype Mixing (HPM) head.

An l2-distance "reclassifier" on top of a trained linear (FC) classifier, after
"Sensitivity as a Double-Edged Sword" (Kai Wang, 2026, arXiv:2606.01746). Only the paper's abstract is
public; the head follows the reconstruction in docs/method.md section 2, and every choice the abstract does not
fix is an argument here.

Given pre-logit features ``f`` (B x D) and the FC layer (``weight`` K x D, ``bias`` K):

1. FC logits ``z = f W^T + b``; soft assignment ``P = softmax(z / tau)``; hard ``H = one_hot(argmax z)``.
2. Straight-through assignment ``A = H + P - P.detach()`` (one-hot forward, softmax gradient backward).
3. Batch prototypes ``c_k = sum_i A_ik f_i / max(n_k, 1)`` with detached counts ``n_k = sum_i H_ik``.
4. Dataset prototypes ``mu`` (buffer), updated by EMA from labelled batches in training mode.
5. Mixed prototypes ``p_k = alpha mu_k + (1 - alpha) c_k`` where ``n_k > 0``, else ``mu_k``.
6. Logits ``s_k = -gamma ||f - p_k||^2`` with a learnable ``gamma > 0``.

Modes (``head.mode``) select views on the same weights:
    ``dynamic``  the paper's HPM (default; predictions depend on the batch)
    ``static``   ``p = mu``: a batch-independent l2 classifier
    ``soft``     ``A = P`` in the forward: a smooth relaxation, used as an attack surrogate
    ``fc``       the base FC logits
"""
import contextlib
import math
import warnings
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ._fx import is_fx_tracing

__all__ = ['HPMHead', 'HPMOutput', 'HPM_MODES', 'HPM_OPTIONS']

HPM_MODES = ('dynamic', 'static', 'soft', 'fc')
#: The head's options (``hpm_cfg`` of the registered models, ``convert_to_hpm`` keywords, configs' ``model.hpm``).
HPM_OPTIONS = ('mode', 'tau', 'alpha', 'momentum', 'gamma_init', 'pseudo_labels')


class HPMOutput(NamedTuple):
    """HPM logits and FC logits of one forward (what the fine-tuning loss needs)."""
    logits: torch.Tensor
    fc_logits: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.all_reduce(t)


@register_notrace_module  # a leaf for timm's FX feature extraction (its forward branches on the mode)
class HPMHead(nn.Module):
    """Drop-in replacement of an ``nn.Linear`` classifier by the HPM l2-reclassifier.

    The FC parameters keep the names ``weight`` and ``bias``, so a model's classifier keys (e.g.
    ``fc.weight``) are unchanged by the conversion; the head adds ``log_gamma``, the buffer
    ``dataset_prototypes`` and the flag ``prototypes_initialized``.

    Args:
        in_features: feature dimension D.
        num_classes: number of classes K.
        mode: one of ``HPM_MODES``.
        tau: temperature of the soft assignment ``softmax(z / tau)`` (the STE's backward path).
        alpha: weight of the dataset prototypes in the mix (``alpha=1`` is ``static``).
        momentum: EMA momentum m of ``mu <- m mu + (1 - m) batch class mean``; 1 disables updates.
        gamma_init: initial l2 logit scale. 0.5 makes ``-gamma ||f - w_k||^2`` equal the FC logits up to
            per-sample constants and biases when the prototypes are the FC rows (their initial value);
            ``init_prototypes_`` recalibrates it to the FC logit spread.
        pseudo_labels: the EMA update uses the FC head's own predictions (argmax of ``z``) instead of labels, so
            the prototypes move under training loops that give the model no labels (timm's ``train.py`` calls
            ``model(x)``); an uninitialised head then starts from the first batch's class means. Not the paper's
            update (it uses the true labels): a prototype follows what the FC head predicts, errors included.
            Off by default: a training forward without labels then warns once that the prototypes do not move.
        bias: whether the FC layer has a bias.
    """
    # TorchScript compiles the forward, which reads ``_mode``; the checked setter stays in Python.
    __jit_unused_properties__ = ['mode']

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            *,
            mode: str = 'dynamic',
            tau: float = 1.0,
            alpha: float = 0.5,
            momentum: float = 0.99,
            gamma_init: float = 0.5,
            pseudo_labels: bool = False,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if in_features <= 0 or num_classes <= 0:
            raise ValueError(f'HPMHead needs in_features > 0 and num_classes > 0, got {in_features}, {num_classes}')
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'alpha must be in [0, 1], got {alpha}')
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f'momentum must be in [0, 1], got {momentum}')
        if not gamma_init > 0:
            raise ValueError(f'gamma_init must be > 0, got {gamma_init}')
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.num_classes = num_classes
        self.out_features = num_classes  # nn.Linear's name, for code that inspects classifiers
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.gamma_init = float(gamma_init)
        self.pseudo_labels = bool(pseudo_labels)
        self._warned: bool = False  # one warning per head about a training forward without labels
        self._checked_init: bool = False  # prototypes_initialized read by the pseudo-label update (once per head)
        self._checked_eval: bool = False  # ... and by an eval forward, to warn when they were never initialised
        self.mode = mode
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma_init), **factory))
        self.register_buffer('dataset_prototypes', torch.zeros(num_classes, in_features, **factory))
        self.register_buffer('prototypes_initialized', torch.tensor(False, device=device))
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> 'HPMHead':
        """An HPM head that reuses (copies) a trained ``nn.Linear``'s weight and bias."""
        head = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype, **options)
        with torch.no_grad():
            head.weight.copy_(linear.weight)
            if linear.bias is not None:
                head.bias.copy_(linear.bias)
            head.dataset_prototypes.copy_(linear.weight)
        return head

    def reset_parameters(self) -> None:
        # Same initialisation as nn.Linear; prototypes start at the FC rows until initialised from data.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.dataset_prototypes.copy_(self.weight)
            self.prototypes_initialized.fill_(False)

    # ------------------------------------------------------------------ options
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in HPM_MODES:
            raise ValueError(f'Unknown HPM mode {value!r}; choose one of {HPM_MODES}.')
        self._mode = value

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def hpm_config(self) -> dict:
        """The head's options, as accepted by ``HPMHead``/``convert_to_hpm`` (serialisable)."""
        return {name: getattr(self, name) for name in HPM_OPTIONS}

    @contextlib.contextmanager
    def using_mode(self, mode: str) -> Iterator['HPMHead']:
        """Temporarily switch the mode (attack surrogates are views on the same weights)."""
        previous = self.mode
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = previous

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, num_classes={self.num_classes}, mode={self.mode!r}, '
                f'tau={self.tau}, alpha={self.alpha}, momentum={self.momentum}, bias={self.bias is not None}')

    # ------------------------------------------------------------------ forward
    def fc_forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def mixed_prototypes(self, features: torch.Tensor, fc_logits: torch.Tensor, dataset_prototypes: torch.Tensor,
                         mode: Optional[str] = None) -> torch.Tensor:
        """Prototypes p (K x D) used by the l2 logits, for ``mode`` (default: the head's mode)."""
        if mode is None:
            mode = self._mode
        if mode == 'static' or self.alpha == 1.0:
            return dataset_prototypes
        probs = torch.softmax(fc_logits / self.tau, dim=1)
        if mode == 'dynamic':
            hard = F.one_hot(fc_logits.argmax(dim=1), self.num_classes).to(probs.dtype)
            assignment = hard + probs - probs.detach()
            counts = hard.sum(dim=0)
            batch_prototypes = assignment.t() @ features / counts.clamp_min(1.0)[:, None]
            mixed = self.alpha * dataset_prototypes + (1.0 - self.alpha) * batch_prototypes
            return torch.where((counts > 0)[:, None], mixed, dataset_prototypes)
        if mode == 'soft':
            # Smooth relaxation: soft counts, and a mixing weight that grows with the soft count up to 1, so
            # a class nobody is assigned to falls back to mu continuously.
            counts = probs.sum(dim=0)
            batch_prototypes = probs.t() @ features / counts.clamp_min(1e-12)[:, None]
            weight = (1.0 - self.alpha) * counts.clamp(max=1.0)[:, None]
            return dataset_prototypes + weight * (batch_prototypes - dataset_prototypes)
        raise ValueError(f"mode '{mode}' has no prototypes")

    def l2_logits(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``-gamma ||f_i - p_k||^2`` as one matmul (the cost of the FC head), B x K."""
        sq_dist = (features * features).sum(1, keepdim=True) - 2.0 * features @ prototypes.t() \
            + (prototypes * prototypes).sum(1)[None, :]
        return -self.gamma.float() * sq_dist

    def forward(self, features: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_fc: bool = False) -> torch.Tensor:
        """HPM logits (B x K) of pre-logit features; ``HPMOutput(logits, fc_logits)`` with ``return_fc``.

        With ``targets`` in training mode, the dataset prototypes are updated by EMA after the logits are
        computed (this forward sees the prototypes from before the update). Under TorchScript the head is an
        inference module: ``return_fc`` and the prototype update are eager-mode features.
        """
        if not torch.jit.is_scripting():
            if not is_fx_tracing() and (features.ndim != 2 or features.shape[1] != self.in_features):
                raise ValueError(f'HPMHead expects pooled features of shape (batch, {self.in_features}), got '
                                 f'{tuple(features.shape)}.')
        fc_logits = self.fc_forward(features)
        update = (targets is not None or self.pseudo_labels) and self.training and self.momentum < 1.0
        if self._mode == 'fc':
            logits = fc_logits
        elif torch.jit.is_scripting():
            logits = self._l2_forward(features, fc_logits, update)
        elif is_fx_tracing():
            logits = self._l2_forward(features, fc_logits, update)
        else:
            # The l2 head runs in fp32: ||f||^2 - 2 f.p + ||p||^2 cancels badly in bf16/fp16.
            with torch.autocast(features.device.type, enabled=False):
                logits = self._l2_forward(features, fc_logits, update)
        if not torch.jit.is_scripting():
            if not is_fx_tracing():
                self._after_forward(features, fc_logits, targets)
            if return_fc:
                return HPMOutput(logits, fc_logits)
        return logits

    @torch.jit.unused
    def _after_forward(self, features: torch.Tensor, fc_logits: torch.Tensor, targets: Optional[torch.Tensor]):
        """The EMA update (labels, or the FC predictions with ``pseudo_labels``), and the one-time warnings
        for a head that would otherwise be used wrongly without a word."""
        if self.training and self.momentum < 1.0:
            if self.pseudo_labels:
                if not self._checked_init:  # read once: reading the flag synchronises with the device
                    self._checked_init = True
                    if not bool(self.prototypes_initialized):
                        self.init_prototypes_([(features.detach(), fc_logits.argmax(dim=1))], calibrate_gamma=False)
                        return
                targets = fc_logits.argmax(dim=1)
            if targets is not None:
                self.update_prototypes_(features.detach(), targets)
            elif not self._warned:
                self._warned = True
                warnings.warn(
                    'HPMHead: a training forward without labels leaves the dataset prototypes where they are (timm\'s '
                    'train.py calls model(x)). Pass the labels, model(x, targets=y), as recipes/finetune.py does, or '
                    'create the model with hpm_cfg=dict(pseudo_labels=True) to update them from the FC head\'s '
                    'predictions.', stacklevel=4)
        elif not self.training and self._mode != 'fc' and not self._checked_eval:
            self._checked_eval = True  # read once: reading the flag synchronises with the device
            if not bool(self.prototypes_initialized):
                warnings.warn(
                    f'HPMHead: the dataset prototypes were never initialised from data, so the {self._mode!r} head '
                    'classifies with the FC rows as prototypes. Initialise them first: timm_hpm.train.init_prototypes '
                    '(or model.hpm_head.init_prototypes_), or fine-tune with recipes/finetune.py.', stacklevel=4)

    def _l2_forward(self, features: torch.Tensor, fc_logits: torch.Tensor, update: bool) -> torch.Tensor:
        feats = features.float()
        mu = self.dataset_prototypes.float()
        if update:
            mu = mu.clone()  # the in-place EMA update after this forward must not touch tensors saved for backward
        return self.l2_logits(feats, self.mixed_prototypes(feats, fc_logits.float(), mu))

    # ------------------------------------------------------------------ prototypes
    def _class_sums(self, features: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f'features must have shape (batch, {self.in_features}), got {tuple(features.shape)}.')
        if targets.ndim != 1 or targets.shape[0] != features.shape[0]:
            raise ValueError(f'targets must have shape ({features.shape[0]},), got {tuple(targets.shape)}.')
        if targets.dtype.is_floating_point:
            raise ValueError('targets must be integer class indices (soft or mixed-up labels cannot update the '
                             'dataset prototypes).')
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(f'targets must lie in [0, {self.num_classes - 1}], got [{int(targets.min())}, '
                             f'{int(targets.max())}].')
        if not torch.isfinite(features).all():
            raise ValueError('non-finite (NaN or inf) features: refusing to update the dataset prototypes. '
                             'Check the inputs and the learning rate.')
        sums = torch.zeros(self.num_classes, self.in_features, device=features.device, dtype=torch.float32)
        sums.index_add_(0, targets, features.float())
        counts = torch.bincount(targets, minlength=self.num_classes).to(torch.float32)
        return sums, counts

    @torch.jit.unused
    @torch.no_grad()
    def update_prototypes_(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """One EMA step ``mu_k <- m mu_k + (1 - m) mean(f_i : y_i = k)`` for the classes in the batch.

        Under torch.distributed the per-class sums and counts are all-reduced first, so every replica holds
        the same prototypes (a DDP buffer broadcast alone would keep rank 0's update only).
        """
        sums, counts = self._class_sums(features, targets)
        _all_reduce_(sums, counts)
        present = counts > 0
        means = sums / counts.clamp_min(1.0)[:, None]
        mu = self.dataset_prototypes
        updated = self.momentum * mu.float() + (1.0 - self.momentum) * means
        mu.copy_(torch.where(present[:, None], updated, mu.float()).to(mu.dtype))

    @torch.no_grad()
    def init_prototypes_(
            self,
            batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
            calibrate_gamma: bool = True,
            calibration_samples: int = 4096,
    ) -> torch.Tensor:
        """Set the dataset prototypes to the class means of a stream of ``(features, labels)`` batches.

        With ``calibrate_gamma`` the l2 scale is set so that the l2 logits of the static head have the same
        spread (mean over samples of the standard deviation across classes) as the FC logits, measured on the
        first ``calibration_samples`` features. Sums, counts and spreads are all-reduced under
        torch.distributed. Returns the per-class counts.
        """
        sums = torch.zeros(self.num_classes, self.in_features, device=self.weight.device)
        counts = torch.zeros(self.num_classes, device=self.weight.device)
        kept, n_kept = [], 0
        for features, targets in batches:
            features = features.to(self.weight.device)
            targets = targets.to(self.weight.device)
            batch_sums, batch_counts = self._class_sums(features, targets)
            sums += batch_sums
            counts += batch_counts
            if calibrate_gamma and n_kept < calibration_samples:
                kept.append(features[:calibration_samples - n_kept].float())
                n_kept += kept[-1].shape[0]
        _all_reduce_(sums, counts)
        if counts.sum() == 0:
            raise ValueError('init_prototypes_ got no samples: the batch stream was empty.')
        present = counts > 0
        mu = self.dataset_prototypes
        mu.copy_(torch.where(present[:, None], sums / counts.clamp_min(1.0)[:, None], mu.float()).to(mu.dtype))
        self.prototypes_initialized.fill_(True)
        if calibrate_gamma:
            spreads = torch.zeros(3, device=self.weight.device)  # sum of fc spreads, of l2 spreads, count
            if kept:
                feats = torch.cat(kept)
                fc_spread = self.fc_forward(feats.to(self.weight.dtype)).float().std(dim=1)
                l2_spread = self.l2_logits(feats, mu.float()).div(self.gamma.float()).std(dim=1)
                spreads += torch.stack([fc_spread.sum(), l2_spread.sum(), torch.tensor(float(len(feats)))
                                        .to(spreads)])
            _all_reduce_(spreads)
            if spreads[1] > 0:
                self.log_gamma.copy_(torch.log(spreads[0] / spreads[1]).to(self.log_gamma))
        return counts
