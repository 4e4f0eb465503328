"""Sensitivity of an FC head and an l2-prototype head on the same backbone (the paper's central claim).

Two views, both for the batch-independent heads of one HPM model (``fc``: the linear classifier, ``static``:
the l2 head on the dataset prototypes):

* input space: accuracy under APGD (CE, then DLR on the samples still robust) as a function of eps;
* feature space, for every clean-correct sample with features ``f``: the logit margin
  ``m(f) = z_y(f) - max_{k != y} z_k(f)``, the l2 norm of its gradient ``||grad_f m||`` (runner-up held at
  ``f``), and the flip distance: the smallest l2 move of ``f`` that changes the decision (multi-class
  DeepFool in feature space; exact in one step when the pairwise margins are affine in ``f``, which holds
  for the FC head and for the static l2 head, whose pairwise margins
  ``gamma (||f - p_k||^2 - ||f - p_y||^2)`` are affine too). The first-order Linf input-space flip estimate
  ``m(x) / ||grad_x m||_1`` is reported beside them.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks import check_images, normalized_view
from ..attacks import apgd
from ..eval.views import ModelView
from ..models._hpm import get_hpm_head
from ..report import markdown_table

__all__ = ['ANALYSIS_HEADS', 'logit_margin', 'margin_gradient', 'flip_distance', 'head_logit_fn',
           'pre_logit_features', 'feature_sensitivity', 'apgd_accuracy', 'robust_accuracy_curve', 'summarize',
           'format_summary', 'finite_median']

#: The heads compared: both are batch-independent views of one HPM model's weights.
ANALYSIS_HEADS = ('fc', 'static')

LogitFn = Callable[[torch.Tensor], torch.Tensor]


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(z_y - max_{k != y} z_k, argmax_{k != y} z_k)`` per sample; negative margins are misclassified."""
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f'expected logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}')
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float('-inf'))
    z_r, runner_up = others.max(1)
    return z_y - z_r, runner_up


def margin_gradient(logit_fn: LogitFn, inputs: torch.Tensor, y: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Margins and their gradients with respect to ``inputs`` (the runner-up class fixed at ``inputs``).

    ``logit_fn`` must treat samples independently (a batch-dependent head has no per-sample gradient).
    """
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        margin, _ = logit_margin(logit_fn(inputs), y)
        grad, = torch.autograd.grad(margin.sum(), inputs)
    return margin.detach(), grad.detach()


def flip_distance(logit_fn: LogitFn, features: torch.Tensor, y: torch.Tensor, max_iter: int = 50,
                  overshoot: float = 0.02) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest l2 move of ``features`` that changes the decision of ``logit_fn`` (multi-class DeepFool).

    Each iteration linearises every pairwise margin ``g_k = z_k - z_y`` and steps to the nearest linearised
    boundary; for affine margins one step lands exactly on the nearest boundary. Returns ``(distance,
    flipped)``: the l2 norm of the accumulated move (0 for samples already misclassified) and whether
    ``features + (1 + overshoot) * move`` is indeed classified otherwise (``distance`` is ``inf`` where not).
    """
    if features.ndim != 2:
        raise ValueError(f'flip_distance works on pooled features (B, D), got shape {tuple(features.shape)}')
    f0 = features.detach()
    move = torch.zeros_like(f0)
    with torch.no_grad():
        logits = logit_fn(f0)
    num_classes = logits.shape[1]
    active = logits.argmax(1) == y
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        idx = active.nonzero().flatten()
        f = (f0[idx] + move[idx]).requires_grad_(True)
        yi = y[idx]
        with torch.enable_grad():
            z = logit_fn(f)
            z_y = z.gather(1, yi[:, None])
            gaps = z - z_y  # g_k = z_k - z_y (< 0 while correct); 0 for k = y
            grads = torch.stack([torch.autograd.grad(gaps[:, k].sum(), f, retain_graph=k < num_classes - 1)[0]
                                 for k in range(num_classes)], dim=1)  # (n, K, D)
        gaps = gaps.detach()
        norms = grads.flatten(2).norm(dim=2).clamp_min(1e-12)
        ratio = gaps.abs() / norms
        ratio.scatter_(1, yi[:, None], float('inf'))
        best = ratio.argmin(1)
        step_len = ratio.gather(1, best[:, None]).squeeze(1)
        direction = grads[torch.arange(len(idx)), best] / norms.gather(1, best[:, None])
        move[idx] += (step_len + 1e-6)[:, None] * direction  # onto (just past) the linearised boundary
        with torch.no_grad():
            still = logit_fn(f0[idx] + (1 + overshoot) * move[idx]).argmax(1) == yi
        active[idx] = still
    with torch.no_grad():
        flipped = logit_fn(f0 + (1 + overshoot) * move).argmax(1) != y
    distance = move.norm(dim=1)
    distance[~flipped] = float('inf')
    return distance, flipped


def head_logit_fn(model: nn.Module, mode: str) -> LogitFn:
    """Logits of one batch-independent head of an HPM model as a function of pre-logit features."""
    head = get_hpm_head(model)
    if mode == 'fc':
        return head.fc_forward
    if mode == 'static':
        return lambda f: head.l2_logits(f.float(), head.dataset_prototypes.float())
    raise ValueError(f'the sensitivity analysis compares the batch-independent heads {ANALYSIS_HEADS}; got {mode!r} '
                     '(the dynamic head has no per-sample decision: evaluate it with MSA)')


def pre_logit_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of images ``x`` in [0, 1] (input normalisation applied as the model expects)."""
    view = normalized_view(model)
    inputs = view.normalize(x) if view is not model else x
    return model.forward_head(model.forward_features(inputs), pre_logits=True)


def _check_model(model: nn.Module) -> None:
    get_hpm_head(model)
    if model.training:
        raise ValueError('put the model in eval mode first (model.eval()): batch norm and prototype updates '
                         'would change it during the analysis')
    if not bool(get_hpm_head(model).prototypes_initialized):
        raise ValueError('the HPM head\'s prototypes were never initialised from data; fine-tune or call '
                         'model.hpm_head.init_prototypes_(...) first')


def feature_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, heads: Sequence[str] = ANALYSIS_HEADS,
                        batch_size: int = 500, progress: bool = True) -> Dict[str, Dict[str, list]]:
    """Per-sample sensitivity of each head of an HPM model (eval mode) on images ``x`` in [0, 1].

    Returns, per head, lists over all samples: ``correct`` (clean), ``margin`` (logit margin),
    ``feature_grad_norm`` (``||grad_f m||_2``), ``flip_distance`` (feature-space l2; 0 if misclassified),
    ``input_grad_l1`` (``||grad_x m||_1``) and ``linf_flip_estimate`` (``max(m, 0) / ||grad_x m||_1``).
    """
    _check_model(model)
    check_images(x, y, getattr(model, 'num_classes', None))
    out = {h: {k: [] for k in ('correct', 'margin', 'feature_grad_norm', 'flip_distance', 'input_grad_l1',
                               'linf_flip_estimate')} for h in heads}
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    for xb, yb in tqdm(batches, desc='feature sensitivity', disable=not progress):
        with torch.no_grad():
            feats = pre_logit_features(model, xb).float()
        for h in heads:
            fn = head_logit_fn(model, h)
            margin, grad = margin_gradient(fn, feats, yb)
            distance, _ = flip_distance(fn, feats, yb)
            view = ModelView(normalized_view(model), h)
            in_margin, in_grad = margin_gradient(view, xb, yb)
            l1 = in_grad.flatten(1).abs().sum(1)
            rec = out[h]
            rec['correct'] += (margin > 0).tolist()
            rec['margin'] += margin.tolist()
            rec['feature_grad_norm'] += grad.norm(dim=1).tolist()
            rec['flip_distance'] += distance.tolist()
            rec['input_grad_l1'] += l1.tolist()
            rec['linf_flip_estimate'] += (in_margin.clamp_min(0) / l1.clamp_min(1e-12)).tolist()
    return out


def apgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = 'Linf',
                  n_iter: int = 50, batch_size: int = 500, generator: Optional[torch.Generator] = None) -> float:
    """Accuracy of a batch-independent model (images in [0, 1]) under APGD-CE, then APGD-DLR on the samples
    still robust: per-sample worst case, fixed batches of ``batch_size``."""
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        if eps > 0:
            for loss in ('ce', 'dlr'):
                if not bool(ok.any()):
                    break
                idx = ok.nonzero().flatten()
                x_adv = apgd(model, xb[idx], yb[idx], eps, norm, n_iter, loss=loss, generator=generator)
                with torch.no_grad():
                    ok[idx] = model(x_adv).argmax(1) == yb[idx]
        correct += int(ok.sum())
    return correct / len(y)


def robust_accuracy_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float],
                          heads: Sequence[str] = ANALYSIS_HEADS, norm: str = 'Linf', n_iter: int = 50,
                          batch_size: int = 500, seed: int = 0, progress: bool = True) -> Dict[str, list]:
    """Accuracy of each head of an HPM model under :func:`apgd_accuracy`, for each eps."""
    _check_model(model)
    check_images(x, y, getattr(model, 'num_classes', None))
    attacked = normalized_view(model)
    curves = {h: [] for h in heads}
    work = [(h, e) for h in heads for e in eps_values]
    for h, eps in tqdm(work, desc='APGD vs eps', disable=not progress):
        curves[h].append(apgd_accuracy(ModelView(attacked, h), x, y, eps, norm, n_iter, batch_size,
                                       torch.Generator().manual_seed(seed)))
    return curves


def finite_median(values) -> Optional[float]:
    """The median of the finite values (an unflipped sample's distance is inf), None when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def summarize(per_sample: Dict[str, Dict[str, list]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Medians over the clean-correct samples of each head (and its clean accuracy)."""
    summary = {}
    for h, rec in per_sample.items():
        keep = [i for i, ok in enumerate(rec['correct']) if ok]
        summary[h] = {'clean_acc': len(keep) / max(len(rec['correct']), 1), 'n_correct': len(keep)}
        for key in ('margin', 'feature_grad_norm', 'flip_distance', 'input_grad_l1', 'linf_flip_estimate'):
            summary[h][f'median_{key}'] = finite_median([rec[key][i] for i in keep])
    return summary


def format_summary(result: dict) -> str:
    """A Markdown table of a sensitivity result: the accuracy curve and the medians per head."""
    def fmt(v):
        return '-' if v is None else f'{v:.3g}'
    eps = result['robust_accuracy']['eps']
    rows = []
    for head, accs in result['robust_accuracy']['accuracy'].items():
        s = result['summary'][head]
        rows.append([head, *(f'{100 * a:.1f}%' for a in accs), fmt(s['median_flip_distance']),
                     fmt(s['median_feature_grad_norm']), fmt(s['median_linf_flip_estimate'])])
    return markdown_table(['head', *(f'eps {e:g}' for e in eps), 'median flip distance (features)',
                           'median margin-gradient norm (features)', 'median first-order Linf flip estimate (input)'],
                          rows, 'l' + 'r' * (len(eps) + 3))
