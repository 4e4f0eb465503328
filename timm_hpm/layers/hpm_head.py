"""Hybrid Prototype Mixing (HPM) head.

An l2-distance "reclassifier" on top of a trained linear (FC) classifier, after
"Sensitivity as a Double-Edged Sword" (Kai Wang, 2026, arXiv:2606.01746). Only the paper's abstract is
public; the head follows the reconstruction in docs/method.md section 2, and every choice the abstract does not
fix is an argument here.

The prototype maths (steps 1-6 of docs/method.md section 2) is in :mod:`timm_hpm.layers.hpm_prototypes`.

Modes (``head.mode``) select views on the same weights:
    ``dynamic``  the paper's HPM (default; predictions depend on the batch)
    ``static``   ``p = mu``: a batch-independent l2 classifier
    ``soft``     ``A = P`` in the forward: a smooth relaxation, used as an attack surrogate
    ``fc``       the base FC logits
"""
import contextlib
import math
from typing import Any, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ._fx import is_fx_tracing
from .hpm_prototypes import (HPM_MODES, HPM_OPTION_DOMAINS, HPMOptionError, NonFiniteWatch, PrototypeUpdatesMixin,
                             check_head_size, check_hpm_option, check_hpm_options, finite_rows, l2_logits,
                             mixed_prototypes)

__all__ = ['HPMHead', 'HPMOutput', 'HPM_MODES', 'HPM_OPTIONS', 'HPM_OPTION_DOMAINS', 'HPMOptionError',
           'check_hpm_option', 'check_hpm_options']

#: The head's options (``hpm_cfg`` of the registered models, ``convert_to_hpm`` keywords, configs' ``model.hpm``);
#: their valid values are ``HPM_OPTION_DOMAINS``, checked by ``check_hpm_options`` wherever options enter.
HPM_OPTIONS = tuple(HPM_OPTION_DOMAINS)


class HPMOutput(NamedTuple):
    """HPM logits and FC logits of one forward (what the fine-tuning loss needs)."""
    logits: torch.Tensor
    fc_logits: torch.Tensor


@register_notrace_module  # a leaf for timm's FX feature extraction (its forward branches on the mode)
class HPMHead(PrototypeUpdatesMixin, nn.Module):
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

    Every option is checked (type and range, ``HPM_OPTION_DOMAINS``) here, by its setter (``head.alpha = 0.3``)
    and by :meth:`set_options`; a bad value raises :class:`HPMOptionError` naming the option, the value and the
    valid values.
    """
    # TorchScript compiles the forward, which reads ``_mode``, ``_tau``, ...; the checked setters stay in Python.
    __jit_unused_properties__ = ['mode', 'tau', 'alpha', 'momentum', 'gamma_init', 'pseudo_labels']

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
        check_head_size(in_features, num_classes)
        options = check_hpm_options(dict(mode=mode, tau=tau, alpha=alpha, momentum=momentum, gamma_init=gamma_init,
                                         pseudo_labels=pseudo_labels))
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.num_classes = num_classes
        self.out_features = num_classes  # nn.Linear's name, for code that inspects classifiers
        self._mode: str = options['mode']
        self._tau: float = options['tau']
        self._alpha: float = options['alpha']
        self._momentum: float = options['momentum']
        self._gamma_init: float = options['gamma_init']
        self._pseudo_labels: bool = options['pseudo_labels']
        self._warned: bool = False  # one warning per head about a training forward without labels
        self._checked_init: bool = False  # prototypes_initialized read by the pseudo-label update (once per head)
        self._checked_eval: bool = False  # ... and by an eval forward, to warn when they were never initialised
        self._warned_nonfinite: bool = False  # one warning per head about rows left out of the batch prototypes
        self._nonfinite_watch = NonFiniteWatch()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.log_gamma = nn.Parameter(torch.tensor(math.log(self._gamma_init), **factory))
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
        self._mode = check_hpm_option('mode', value)

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = check_hpm_option('tau', value)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_hpm_option('alpha', value)

    @property
    def momentum(self) -> float:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self._momentum = check_hpm_option('momentum', value)

    @property
    def gamma_init(self) -> float:
        """The l2 scale the head was created with (recorded; the scale in use is the parameter ``log_gamma``)."""
        return self._gamma_init

    @gamma_init.setter
    def gamma_init(self, value: float) -> None:
        self._gamma_init = check_hpm_option('gamma_init', value)

    @property
    def pseudo_labels(self) -> bool:
        return self._pseudo_labels

    @pseudo_labels.setter
    def pseudo_labels(self, value: bool) -> None:
        self._pseudo_labels = check_hpm_option('pseudo_labels', value)

    def set_options(self, **options: Any) -> 'HPMHead':
        """Change options of an existing head (e.g. one loaded from a checkpoint): all are checked before any is
        set, so a bad one (:class:`HPMOptionError`) changes nothing. ``gamma_init`` is only recorded: the scale in
        use is the trained ``log_gamma``. Returns the head."""
        for name, value in check_hpm_options(options).items():
            setattr(self, name, value)
        return self

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
        return mixed_prototypes(features, fc_logits, dataset_prototypes, mode, self._alpha, self._tau, self.num_classes)

    def l2_logits(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``-gamma ||f_i - p_k||^2`` as one matmul (the cost of the FC head), B x K."""
        return l2_logits(features, prototypes, self.gamma)

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
        update = (targets is not None or self._pseudo_labels) and self.training and self._momentum < 1.0
        finite: Optional[torch.Tensor] = None
        if self._mode == 'fc':
            logits = fc_logits
        elif torch.jit.is_scripting():
            logits, finite = self._l2_forward(features, fc_logits, update)
        elif is_fx_tracing():
            logits, finite = self._l2_forward(features, fc_logits, update)
        else:
            # The l2 head runs in fp32: ||f||^2 - 2 f.p + ||p||^2 cancels badly in bf16/fp16.
            with torch.autocast(features.device.type, enabled=False):
                logits, finite = self._l2_forward(features, fc_logits, update)
        if not torch.jit.is_scripting():
            if not is_fx_tracing():
                if finite is not None:
                    self._note_dropped_rows(finite)
                self._after_forward(features, fc_logits, targets)
            if return_fc:
                return HPMOutput(logits, fc_logits)
        return logits

    def _l2_forward(self, features: torch.Tensor, fc_logits: torch.Tensor, update: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The l2 logits, and (for the batch-dependent modes) the mask of the rows that entered the batch
        prototypes: a row with a non-finite feature or FC logit is left out (its logits are NaN), so it cannot
        change the other rows' predictions."""
        feats = features.float()
        mu = self.dataset_prototypes.float()
        if update:
            mu = mu.clone()  # the in-place EMA update after this forward must not touch tensors saved for backward
        if self._mode == 'static' or self._alpha == 1.0:
            return self.l2_logits(feats, mu), None
        z = fc_logits.float()
        finite = finite_rows(feats, z)
        dropped = ~finite[:, None]
        feats = feats.masked_fill(dropped, 0.0)  # finite everywhere: gradients stay finite for the other rows
        prototypes = mixed_prototypes(feats, z, mu, self._mode, self._alpha, self._tau, self.num_classes, finite)
        return self.l2_logits(feats, prototypes).masked_fill(dropped, float('nan')), finite
