"""The prototype maths of the HPM head (:class:`~timm_hpm.layers.hpm_head.HPMHead` is the module around it).

Given pre-logit features ``f`` (B x D) and the FC layer (``weight`` K x D, ``bias`` K):

1. FC logits ``z = f W^T + b``; soft assignment ``P = softmax(z / tau)``; hard ``H = one_hot(argmax z)``.
2. Straight-through assignment ``A = H + P - P.detach()`` (one-hot forward, softmax gradient backward).
3. Batch prototypes ``c_k = sum_i A_ik f_i / max(n_k, 1)`` with detached counts ``n_k = sum_i H_ik``.
4. Dataset prototypes ``mu`` (buffer), updated by EMA from labelled batches in training mode.
5. Mixed prototypes ``p_k = alpha mu_k + (1 - alpha) c_k`` where ``n_k > 0``, else ``mu_k``.
6. Logits ``s_k = -gamma ||f - p_k||^2`` with a learnable ``gamma > 0``.

A row whose features or FC logits are not finite (a NaN pixel, an overflow) is left out of the batch prototypes and
counts of steps 3 and 5: its own logits are NaN, the other rows' are those of the batch without it (one image
cannot erase a whole batch's predictions).

Plain functions of tensors (TorchScript compiles them with the head's forward); the per-class sums and counts
are all-reduced under torch.distributed by the callers that update the prototypes.
"""
import math
import numbers
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._fx import is_compiling, is_transformed

__all__ = ['HPM_MODES', 'HPM_OPTION_DOMAINS', 'HPMOptionError', 'check_hpm_option', 'check_hpm_options',
           'check_head_size', 'finite_rows', 'mixed_prototypes', 'l2_logits', 'class_sums', 'ema_update_',
           'all_reduce_', 'stream_class_sums', 'logit_spreads', 'NonFiniteWatch', 'PrototypeUpdatesMixin']

HPM_MODES = ('dynamic', 'static', 'soft', 'fc')

#: Every HPM head option and its valid values (the one definition every entry point checks against: the head's
#: constructor and setters, ``convert_to_hpm``, ``hpm_cfg`` and the fine-tuning config's ``model.hpm``).
HPM_OPTION_DOMAINS: Dict[str, str] = {
    'mode': f'one of {HPM_MODES}',
    'tau': 'a finite number > 0',
    'alpha': 'a number in [0, 1]',
    'momentum': 'a number in [0, 1] (1: the dataset prototypes never move)',
    'gamma_init': 'a finite number > 0',
    'pseudo_labels': 'true or false',
}
_IN_RANGE = {
    'tau': lambda v: v > 0,
    'alpha': lambda v: 0.0 <= v <= 1.0,
    'momentum': lambda v: 0.0 <= v <= 1.0,
    'gamma_init': lambda v: v > 0,
}


class HPMOptionError(ValueError, TypeError):
    """An unknown HPM option, or a value of the wrong type or outside its range; the message names the option,
    the value and the valid values. A ValueError (and a TypeError: a wrong type is one too)."""


def check_hpm_option(name: str, value: Any) -> Any:
    """``value`` as the head stores option ``name`` (a float, a bool or a mode name); :class:`HPMOptionError`
    when the option is unknown or the value is not one of ``HPM_OPTION_DOMAINS[name]``."""
    if name not in HPM_OPTION_DOMAINS:
        raise HPMOptionError(f'unknown HPM option {name!r}; valid: {", ".join(HPM_OPTION_DOMAINS)}')
    if name == 'mode':
        if isinstance(value, str) and value in HPM_MODES:
            return value
        raise HPMOptionError(f'Unknown HPM mode {value!r}; choose one of {HPM_MODES}.')
    if name == 'pseudo_labels':
        if isinstance(value, bool):
            return value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and _IN_RANGE[name](number):
            return number
    raise HPMOptionError(f'HPM option {name}={value!r} is invalid: {name} must be {HPM_OPTION_DOMAINS[name]}')


def check_hpm_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Every option of ``options`` checked by :func:`check_hpm_option` (a new dict of the stored values)."""
    if not isinstance(options, Mapping):
        raise HPMOptionError(f'HPM options must be a mapping of option names to values, got {type(options).__name__}')
    return {name: check_hpm_option(name, value) for name, value in options.items()}


def check_head_size(in_features: int, num_classes: int) -> None:
    """A clear error for a head without features or classes."""
    if in_features <= 0 or num_classes <= 0:
        raise ValueError(f'HPMHead needs in_features > 0 and num_classes > 0, got {in_features}, {num_classes}')


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum ``tensors`` in place over the processes of torch.distributed (nothing outside it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def finite_rows(features: torch.Tensor, fc_logits: torch.Tensor) -> torch.Tensor:
    """The rows (B, bool) whose features and FC logits are all finite (a device-side mask: no host sync)."""
    return torch.isfinite(features).all(dim=1) & torch.isfinite(fc_logits).all(dim=1)


def mixed_prototypes(features: torch.Tensor, fc_logits: torch.Tensor, dataset_prototypes: torch.Tensor, mode: str,
                     alpha: float, tau: float, num_classes: int, finite: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """Prototypes p (K x D) that the l2 logits of ``mode`` use (steps 1-5).

    Rows that are not ``finite`` (default: :func:`finite_rows`) are left out of the batch prototypes and counts,
    so the prototypes are those of the batch without them (and their gradients stay finite).
    """
    if mode == 'static' or alpha == 1.0:
        return dataset_prototypes
    if finite is None:
        finite = finite_rows(features, fc_logits)
    dropped = ~finite[:, None]
    features = features.masked_fill(dropped, 0.0)
    fc_logits = fc_logits.masked_fill(dropped, 0.0)
    probs = torch.softmax(fc_logits / tau, dim=1).masked_fill(dropped, 0.0)
    if mode == 'dynamic':
        hard = F.one_hot(fc_logits.argmax(dim=1), num_classes).to(probs.dtype).masked_fill(dropped, 0.0)
        assignment = hard + probs - probs.detach()
        counts = hard.sum(dim=0)
        batch_prototypes = assignment.t() @ features / counts.clamp_min(1.0)[:, None]
        mixed = alpha * dataset_prototypes + (1.0 - alpha) * batch_prototypes
        return torch.where((counts > 0)[:, None], mixed, dataset_prototypes)
    if mode == 'soft':
        # Smooth relaxation: soft counts, and a mixing weight that grows with the soft count up to 1, so
        # a class nobody is assigned to falls back to mu continuously.
        counts = probs.sum(dim=0)
        batch_prototypes = probs.t() @ features / counts.clamp_min(1e-12)[:, None]
        weight = (1.0 - alpha) * counts.clamp(max=1.0)[:, None]
        return dataset_prototypes + weight * (batch_prototypes - dataset_prototypes)
    raise ValueError(f"mode '{mode}' has no prototypes")


def l2_logits(features: torch.Tensor, prototypes: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``-gamma ||f_i - p_k||^2`` as one matmul (the cost of the FC head), B x K (step 6)."""
    sq_dist = (features * features).sum(1, keepdim=True) - 2.0 * features @ prototypes.t() \
        + (prototypes * prototypes).sum(1)[None, :]
    return -gamma.float() * sq_dist


def class_sums(features: torch.Tensor, targets: torch.Tensor, num_classes: int, in_features: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (K x D, fp32) and counts (K) of a labelled batch, after checking the batch."""
    if features.ndim != 2 or features.shape[1] != in_features:
        raise ValueError(f'features must have shape (batch, {in_features}), got {tuple(features.shape)}.')
    if targets.ndim != 1 or targets.shape[0] != features.shape[0]:
        raise ValueError(f'targets must have shape ({features.shape[0]},), got {tuple(targets.shape)}.')
    if targets.dtype.is_floating_point:
        raise ValueError('targets must be integer class indices (soft or mixed-up labels cannot update the '
                         'dataset prototypes).')
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f'targets must lie in [0, {num_classes - 1}], got [{int(targets.min())}, '
                         f'{int(targets.max())}].')
    if not torch.isfinite(features).all():
        raise ValueError('non-finite (NaN or inf) features: refusing to update the dataset prototypes. '
                         'Check the inputs and the learning rate.')
    sums = torch.zeros(num_classes, in_features, device=features.device, dtype=torch.float32)
    sums.index_add_(0, targets, features.float())
    counts = torch.bincount(targets, minlength=num_classes).to(torch.float32)
    return sums, counts


def ema_update_(prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float) -> None:
    """``mu_k <- m mu_k + (1 - m) sums_k / counts_k`` in place, for the classes with a count (step 4)."""
    means = sums / counts.clamp_min(1.0)[:, None]
    updated = momentum * prototypes.float() + (1.0 - momentum) * means
    prototypes.copy_(torch.where((counts > 0)[:, None], updated, prototypes.float()).to(prototypes.dtype))


def stream_class_sums(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int, in_features: int,
                      device: torch.device, keep: int) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Per-class sums and counts over a stream of ``(features, labels)`` batches, and its first ``keep``
    features (fp32, for calibrating the l2 scale)."""
    sums = torch.zeros(num_classes, in_features, device=device)
    counts = torch.zeros(num_classes, device=device)
    kept, n_kept = [], 0
    for features, targets in batches:
        features, targets = features.to(device), targets.to(device)
        batch_sums, batch_counts = class_sums(features, targets, num_classes, in_features)
        sums += batch_sums
        counts += batch_counts
        if n_kept < keep:
            kept.append(features[:keep - n_kept].float())
            n_kept += kept[-1].shape[0]
    return sums, counts, kept


def logit_spreads(fc_logits: torch.Tensor, sq_dist: torch.Tensor) -> torch.Tensor:
    """``[sum of FC logit spreads, sum of squared-distance spreads, n]`` (a spread: the standard deviation across
    classes of one sample's logits); the l2 scale that equalises them is ``sum_fc / sum_l2``."""
    return torch.stack([fc_logits.float().std(dim=1).sum(), sq_dist.std(dim=1).sum(),
                        torch.tensor(float(len(fc_logits)), device=fc_logits.device)])


class NonFiniteWatch:
    """Whether a head has left non-finite rows out of its batch prototypes, read without a host sync per forward.

    On the CPU the mask is read at once. On CUDA a device-side flag is or-ed with every forward's mask and copied to
    pinned host memory without waiting; a later forward reads that copy once its event has completed (so on CUDA the
    warning comes from a later forward of the same head). Other devices read the mask at once. A copied or pickled
    head starts a fresh watch (events and pending copies are not state).
    """
    __slots__ = ('flag', 'host', 'event')

    def __init__(self):
        self.flag: Optional[torch.Tensor] = None
        self.host: Optional[torch.Tensor] = None
        self.event = None

    def __reduce__(self):
        return NonFiniteWatch, ()

    def seen(self, finite: torch.Tensor) -> bool:
        """Whether this mask, or one given before, had a row that is not finite (as far as is known now)."""
        if finite.device.type != 'cuda':
            return not bool(finite.all())
        if torch.cuda.is_current_stream_capturing():
            return False  # a CUDA graph being captured: no events, no copies
        # Normal tensors even under torch.inference_mode, so a later forward outside it can still use them.
        with torch.inference_mode(False), torch.no_grad():
            bad = ~finite.all()
            if self.flag is None or self.flag.device != bad.device:
                self.flag, self.host, self.event = bad, None, None
            else:
                self.flag = self.flag | bad
            if self.event is not None:
                if not self.event.query():
                    return False  # the last copy has not landed yet: ask again next forward
                if bool(self.host):  # pinned host memory: no sync
                    return True
            if self.host is None:
                self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(self.flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return False


class PrototypeUpdatesMixin:
    """The dataset prototypes' life cycle for :class:`~timm_hpm.layers.hpm_head.HPMHead`: the EMA update after a
    training forward, initialisation from data (with the l2 scale's calibration), and the one-time warnings."""

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

    @torch.jit.unused
    def _note_dropped_rows(self, finite: torch.Tensor) -> None:
        """Warn once per head when rows with non-finite features or FC logits were left out of the batch
        prototypes (no host sync per forward on CUDA: see :class:`NonFiniteWatch`)."""
        if self._warned_nonfinite or is_compiling() or is_transformed():
            return  # a traced or vmapped forward cannot read the mask (the rows are left out all the same)
        if self._nonfinite_watch.seen(finite):
            self._warned_nonfinite = True
            warnings.warn(
                f'HPMHead: images whose features or FC logits are not finite (NaN or inf: check the inputs and the '
                f'weights) were left out of the {self._mode!r} head\'s batch prototypes; their logits are NaN and the '
                'other images are classified as in the batch without them.', stacklevel=4)

    def _class_sums(self, features: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return class_sums(features, targets, self.num_classes, self.in_features)

    @torch.jit.unused
    @torch.no_grad()
    def update_prototypes_(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """One EMA step ``mu_k <- m mu_k + (1 - m) mean(f_i : y_i = k)`` for the classes in the batch.

        Under torch.distributed the per-class sums and counts are all-reduced first, so every replica holds
        the same prototypes (a DDP buffer broadcast alone would keep rank 0's update only).
        """
        sums, counts = self._class_sums(features, targets)
        all_reduce_(sums, counts)
        ema_update_(self.dataset_prototypes, sums, counts, self.momentum)

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
        sums, counts, kept = stream_class_sums(batches, self.num_classes, self.in_features, self.weight.device,
                                               calibration_samples if calibrate_gamma else 0)
        all_reduce_(sums, counts)
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
                spreads += logit_spreads(self.fc_forward(feats.to(self.weight.dtype)),
                                         self.l2_logits(feats, mu.float()).div(self.gamma.float())).to(spreads)
            all_reduce_(spreads)
            if spreads[1] > 0:
                self.log_gamma.copy_(torch.log(spreads[0] / spreads[1]).to(self.log_gamma))
        return counts
