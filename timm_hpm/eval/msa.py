"""The Mixed Surrogate Attack (MSA) on fixed batches (docs/method.md section 3): :func:`attack_batch` on one batch,
:func:`msa` for any batch-dependent model in memory (the resumable runner is :func:`timm_hpm.eval.evaluate`).

Every figure is the target's accuracy on a *realised* batch (:class:`~timm_hpm.eval.realised.RealisedBatch`): a
whole batch of images within eps of the clean ones, scored by one forward of the target. Candidates, in order:
AutoAttack's standard cascade on the target, its images re-scored on the fixed batch (never AutoAttack's own
accuracy); for each surrogate (views on the target's weights: ``fc``, ``static``, ``soft``, ``dynamic``; then
other models, e.g. the base the HPM weights were fine-tuned from) white-box APGD-CE and APGD-T on the whole batch,
the loss summed over it, and for a batch-dependent surrogate every whole batch each APGD run evaluated (its
per-sample best images come from different iterates, which the target never saw together; each iterate is a
concrete batch: the one that broke the most is a candidate, and every break counts in the union); optionally each
surrogate's AutoAttack cascade (alone, without the whole-batch APGD: the paper's protocol, AutoAttack on each
surrogate transferred with a per-sample worst case); finally whole-batch combinations of every stage's breaks
(and, with ``search_sweeps``, a local search over them).
Cascade: a sample broken in the realised batch is not attacked again (batch-independent surrogates attack the
still-robust samples only), but every candidate batch is scored whole. The per-sample union over all
candidates is a bound that need not be realisable in one batch, reported beside the realised figure.

Each stage is an object (:mod:`timm_hpm.eval.msa_stages`: its name, what it attacks through, its candidates, cost,
breaks and resume state); :data:`~timm_hpm.eval.msa_stages.DEFAULT_STAGES` lists them in order, and the options
are :class:`MSAConfig` (:mod:`timm_hpm.eval.msa_config`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..attacks import check_count, check_eps, check_images
from ..models._hpm import is_hpm_model
from .checks import unwrap
from .msa_config import MSAConfig
from .msa_stage import Stage, StageContext, StageRecord, same_view
from .msa_stages import DEFAULT_STAGES
from .progress import StageProgress
from .stages import COMBINED
from .views import ModelView, hpm_views

__all__ = ['MSAConfig', 'attack_batch', 'msa']


def attack_batch(
        target: nn.Module,
        surrogates: Dict[str, nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: MSAConfig,
        seed: int,
        num_classes: int,
        checkpoint=None,
        progress: Optional[StageProgress] = None,
        stages: Optional[Sequence[type]] = None,
) -> dict:
    """MSA on one fixed batch. Returns per-sample correctness (lists of bools) of the target on the clean
    batch, on each candidate batch, and on the final realised batch, AutoAttack's own verdict (``autoattack_own``,
    None without the AutoAttack stage), and the realised images.

    ``stages``: the kinds of stage (:class:`~timm_hpm.eval.msa_stages.Stage` subclasses) in the order they run;
    default :data:`~timm_hpm.eval.msa_stages.DEFAULT_STAGES`. Each runs unless it is done already or has nothing
    left to attack, then the combinations of every stage's breaks and (``cfg.search_sweeps``) the local search over
    them (:meth:`~timm_hpm.eval.realised.RealisedBatch.search`).

    ``checkpoint`` (e.g. :class:`~timm_hpm.eval.run_folder.StageCheckpoint`; ``load()`` -> ``(tensors, meta)`` or
    None, ``save(tensors, meta)``): the batch's progress is saved after each stage before the combinations, and a
    batch that was stopped resumes at its next stage with the same result as an uninterrupted one (the random
    generator's state is saved with it). ``passes_before`` in the result: the passes the finished stages of an
    earlier start made (zero without one); ``seconds`` includes their time. ``progress``: a
    :class:`~timm_hpm.eval.progress.StageProgress` showing each stage and its attack iterations."""
    if not isinstance(cfg, MSAConfig):
        raise ValueError(f'cfg must be an MSAConfig, got {type(cfg).__name__}')
    cfg.validate()  # again: a config changed after it was made is checked before any work
    progress = progress or StageProgress(enabled=False)
    kinds = list(DEFAULT_STAGES if stages is None else stages)
    plan: List[Stage] = [stage for kind in kinds for stage in kind.for_run(cfg, target, surrogates)]
    generator = torch.Generator().manual_seed(seed)
    outputs = {key: value for kind in kinds for key, value in kind.outputs.items()}
    record = StageRecord(target, x, y, [target, *surrogates.values()], generator, checkpoint, outputs)
    ctx = StageContext(record.batch, target, cfg, seed, num_classes, generator, progress, record.outputs)
    for stage in plan:
        if stage.name in record.done or not stage.wanted(ctx):
            continue
        unbroken = ctx.batch.union.clone()  # correct in every candidate so far
        for candidate in stage.run(ctx):
            ctx.take(candidate)
        stage.breaks = int((unbroken & ~ctx.batch.union).sum())
        record.finish(stage.name)
    progress.stage('combinations of every stage\'s breaks')
    ctx.batch.combine(cfg.combine_rounds)
    ctx.batch.search(cfg.search_sweeps)
    progress.close()
    record.cost.close(COMBINED)
    return record.result()


def msa(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        surrogates: Optional[Dict[str, nn.Module]] = None,
        batch_size: Optional[int] = None,
        config: Optional[MSAConfig] = None,
        batch_dependent: bool = True,
) -> dict:
    """The Mixed Surrogate Attack on any (batch-dependent) model, in memory: no run folder, no resume (for those,
    :func:`timm_hpm.eval.evaluate`).

    Args:
        model: the target, called in eval mode on whole fixed batches of ``batch_size`` images in order (default:
            all of ``x`` in one batch); images in [0, 1].
        surrogates: name -> differentiable stand-in (the same weights under another mode, the base model the
            target was fine-tuned from, ...). Wrap one in :class:`ModelView` with ``batch_dependent=False`` to let
            MSA attack only its still-robust samples. The target is always attacked through itself too (as
            ``'target'``, with AutoAttack's 9 target classes) unless one of ``surrogates`` is a view of it. Default
            for an HPM model: its head's modes (``fc``, ``static``, ``soft``, ``dynamic``).
        eps: the radius: finite and > 0, at most 1 for Linf (images in [0, 1]); ``config.eps`` when given.
        batch_size: an integer >= 1, or None (all of ``x`` in one batch).
        config: the protocol's options (``eps``, ``norm`` and the rest); default ``MSAConfig(eps)``.
        batch_dependent: whether the target's predictions depend on the batch (then AutoAttack's own figure is not
            used: its images are re-scored on the fixed batches).
    Returns ``clean_acc``, ``robust_acc`` (the realised worst case: every batch of ``x_adv`` scored whole),
    ``union_acc`` (per-sample union of all candidates, a bound that need not be realisable), ``candidate_acc``
    (each candidate batch's accuracy), ``correct`` (per-sample bools of the realised batches) and ``x_adv``.
    """
    if config is not None and not isinstance(config, MSAConfig):
        raise ValueError(f'config must be an MSAConfig, got {type(config).__name__}')
    eps = check_eps(eps, config.norm if config is not None else 'Linf', 'eps')
    if config is not None:
        config.validate()
        if config.eps != eps:
            raise ValueError(f'eps={eps} but config.eps={config.eps}: give one')
    cfg = config or MSAConfig(eps=eps)
    if batch_size is not None:
        check_count(batch_size, 'batch_size', 1, what='images per fixed batch; None: all of x in one batch')
    if surrogates is not None and not isinstance(surrogates, dict):
        raise ValueError(f'surrogates must be a dict name -> model (or None), got {type(surrogates).__name__}')
    num_classes = getattr(model, 'num_classes', None)
    check_images(x, y, num_classes)  # a non-empty (B, C, H, W) batch in [0, 1], finite, with B integer labels
    batch_size = batch_size or x.shape[0]
    hpm = is_hpm_model(unwrap(model))  # also behind a normalising view (timm_hpm.attacks.normalized_view)
    if surrogates is None:
        surrogates = dict(hpm_views(model, cfg.surrogates, None)[1]) if hpm else {}
    target = ModelView(model, 'dynamic' if hpm else None, batch_dependent=batch_dependent)
    views = {name: s if isinstance(s, ModelView) else ModelView(s, batch_dependent=True)
             for name, s in surrogates.items()}
    if not any(same_view(v, target) for v in views.values()):
        views['target'] = target
    with _eval_mode(model, *(v.model for v in views.values())):
        units = [attack_batch(target, views, xb, yb, cfg, seed=cfg.seed * 1_000_003 + i * 101,
                              num_classes=num_classes or int(model(xb[:1]).shape[1]))
                 for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size)))]
    return _summary(units, x.shape[0])


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """The modules in eval mode for the attack, each back in its own mode afterwards."""
    was_training = {m: m.training for m in modules}
    try:
        for m in was_training:
            m.eval()
        yield
    finally:
        for m, mode in was_training.items():
            m.train(mode)


def _summary(units: List[dict], n: int) -> dict:
    """The figures of :func:`msa` from its batches' :func:`attack_batch` results (a candidate a batch did not run,
    everything being broken already, counts as that batch's realised result)."""
    names = list(dict.fromkeys(k for u in units for k in u['candidates']))
    return {
        'clean_acc': sum(sum(u['clean']) for u in units) / n,
        'robust_acc': sum(sum(u['realised']) for u in units) / n,
        'union_acc': sum(sum(u['union']) for u in units) / n,
        'candidate_acc': {k: sum(sum(u['candidates'].get(k, u['realised'])) for u in units) / n for k in names},
        'correct': torch.tensor([c for u in units for c in u['realised']]),
        'x_adv': torch.cat([u['x_adv'] for u in units]),
    }
