"""MSA's stages as objects: each stage of one batch's attack is a :class:`Stage` (its name in the unit files, what
it attacks through, the candidate batches it offers, its cost and breaks, what it records for a resume), and
:data:`DEFAULT_STAGES` lists the kinds of stage in the order they run. :func:`~timm_hpm.eval.attack_batch` runs
them in turn, then the combinations of every stage's breaks.

A new stage is one subclass and one line in the list (or ``attack_batch(..., stages=[*DEFAULT_STAGES, MyStage])``):
``name``, ``run(ctx)`` yielding :class:`Candidate` batches (each scored whole on the target before ``run`` goes
on, so a cascading stage sees the realised batch as it stands), and, where it is not one stage per run,
``for_run``. Its cost (images through forward and backward passes, seconds) and its breaks are measured around it
(:class:`StageCost`, :attr:`Stage.breaks`), and a stopped batch resumes after its last finished stage.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
import torch.nn as nn

from ..attacks import accuracy, apgd, apgd_targeted
from .autoattack import make_autoattack, run_autoattack
from .msa_stage import Candidate, Stage, StageContext, StageCost, same_view
from .realised import IterateScores
from .stages import AUTOATTACK, COMPLETION

__all__ = ['Candidate', 'StageContext', 'Stage', 'AutoAttackStage', 'SurrogateStage', 'CompletionStage',
           'DEFAULT_STAGES', 'StageCost', 'same_view']


class AutoAttackStage(Stage):
    """AutoAttack's cascade on the target: all its images, re-scored on the fixed batch (its own verdict is kept
    beside, never used: it shows what AutoAttack's printout would claim). Runs whatever is broken already."""
    name = AUTOATTACK
    outputs = {'autoattack_own': None}

    @classmethod
    def for_run(cls, cfg, target, surrogates):
        return [cls()] if cfg.autoattack else []

    def wanted(self, ctx: StageContext) -> bool:
        return True

    def run(self, ctx: StageContext) -> Iterator[Candidate]:
        ctx.progress.stage('AutoAttack on the target')  # its iterations run inside AutoAttack, unseen
        batch, cfg = ctx.batch, ctx.cfg
        if not bool(batch.clean.any()):
            ctx.outputs['autoattack_own'] = batch.clean.tolist()
            yield Candidate(self.name, correct=batch.clean.clone())
            return
        adversary = make_autoattack(ctx.target, cfg.eps, cfg.norm, version=cfg.autoattack_version,
                                    attacks=cfg.autoattack_attacks, seed=ctx.seed, device=batch.x.device,
                                    num_classes=ctx.num_classes, n_iter=cfg.autoattack_iters,
                                    square_queries=cfg.square_queries)
        x_aa, own = run_autoattack(adversary, batch.x, batch.y, batch_size=batch.x.shape[0], return_own=True)
        yield Candidate(self.name, x_aa, torch.ones_like(batch.clean))
        ctx.outputs['autoattack_own'] = (own & batch.clean).tolist()


class SurrogateStage(Stage):
    """One surrogate (a view on the target's weights, or another model): white-box APGD-CE and APGD-T through it
    (``cfg.surrogate_apgd``; AutoAttack's 9 target classes through the target itself), then optionally its
    AutoAttack cascade (``cfg.surrogate_autoattack``), every candidate scored on the target."""

    def __init__(self, name: str, view: nn.Module):
        self.name, self.through, self.view = name, name, view

    @classmethod
    def for_run(cls, cfg, target, surrogates):
        return [cls(name, view) for name, view in surrogates.items()]

    def run(self, ctx: StageContext) -> Iterator[Candidate]:
        cfg, batch = ctx.cfg, ctx.batch
        if cfg.surrogate_apgd:  # APGD-CE, then APGD-T per target: each its start and iterations
            same = same_view(self.view, ctx.target)
            n_targets = cfg.target_n_target_classes if same else cfg.n_target_classes
            ctx.progress.stage(f'APGD-CE/T via {self.name}', (1 + n_targets) * (cfg.apgd_iters + 1))
            yield from self._apgd(ctx, n_targets, same)
        if cfg.surrogate_autoattack and bool(ctx.active().any()):
            ctx.progress.stage(f'AutoAttack via {self.name}')
            adversary = make_autoattack(self.view, cfg.eps, cfg.norm, version='custom',
                                        attacks=['apgd-ce', 'apgd-t', 'fab-t'], seed=ctx.seed, device=batch.x.device,
                                        num_classes=ctx.num_classes, n_iter=cfg.autoattack_iters)
            x_aa = run_autoattack(adversary, batch.x, batch.y, batch_size=batch.x.shape[0])
            yield Candidate(self.candidate('autoattack'), x_aa, ctx.active())

    def _apgd(self, ctx: StageContext, n_targets: int, same: bool) -> Iterator[Candidate]:
        """White-box APGD-CE and APGD-T (``n_targets`` target classes) through the surrogate, each scored on the
        target; for a batch-dependent surrogate also every whole batch each run evaluated (``cfg.score_iterates``;
        through the target itself, ``same``, its logits are the target's: no extra pass)."""
        cfg, x, y = ctx.cfg, ctx.batch.x, ctx.batch.y
        todo = ctx.active()
        # Batch-independent surrogates may attack the sub-batch of robust samples; batch-dependent ones see the
        # whole batch (its composition is part of the model), so each batch they evaluate is a concrete candidate.
        batch_dependent = getattr(self.view, 'batch_dependent', True)
        idx = torch.arange(x.shape[0], device=x.device) if batch_dependent else todo.nonzero().flatten()
        xs, ys = x[idx], y[idx]
        iterates: List[Optional[IterateScores]] = [None]

        def new_iterates() -> None:
            if batch_dependent and cfg.score_iterates:
                iterates[0] = IterateScores(ctx.batch, lambda xa, logits: (logits.argmax(1) == y) if same
                                            else accuracy(ctx.target, xa, y))

        def observe(x_adv: torch.Tensor, logits: torch.Tensor) -> None:
            ctx.progress.tick()
            if iterates[0] is not None:
                iterates[0](x_adv, logits)

        def take(attack: str, x_sub: torch.Tensor, replace: torch.Tensor) -> Iterator[Candidate]:
            images = x.clone()
            images[idx] = x_sub
            yield Candidate(self.candidate(attack), images, replace)
            if iterates[0] is not None:
                yield Candidate(self.candidate(attack), replace=ctx.active(), iterates=iterates[0])
            new_iterates()

        new_iterates()
        yield from take('apgd-ce', apgd(self.view, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters, loss='ce',
                                        generator=ctx.generator, observe=observe), todo)
        for rank, x_t in enumerate(apgd_targeted(self.view, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters,
                                                 n_target_classes=n_targets, generator=ctx.generator,
                                                 observe=observe)):
            todo = ctx.active()
            if not bool(todo.any()):
                break
            yield from take(f'apgd-t{rank + 1}', x_t, todo)


class CompletionStage(Stage):
    """The realised batch completed through the target itself (``cfg.completion_rounds`` rounds, after the last
    surrogate; none in MSA v4). The per-sample union is below the realised batch when a sample was broken in another
    stage's batch and not in the realised one (a batch-dependent target need not keep it). Each round attacks, on
    the realised batch as it stands, every sample it still classifies correctly with whole-batch APGD (DLR loss,
    ``cfg.apgd_iters``) through the target: the samples it misclassifies stay frozen at their images (their loss
    kept in the objective, so the moving images also keep them broken), and a moving sample some earlier candidate
    broke starts from the first image that broke it (the others from their images in the realised batch). Every
    whole batch the run evaluates is scored through the target's own logits (no extra pass)."""
    name = COMPLETION

    @classmethod
    def for_run(cls, cfg, target, surrogates):
        return [cls()] if cfg.completion_rounds else []

    def run(self, ctx: StageContext) -> Iterator[Candidate]:
        batch, cfg = ctx.batch, ctx.cfg
        ctx.progress.stage('the realised batch completed through the target',
                           cfg.completion_rounds * (cfg.apgd_iters + 1))
        loss = 'dlr' if ctx.num_classes >= 3 else 'ce'
        for r in range(cfg.completion_rounds):
            moving = batch.correct.clone()
            if not bool(moving.any()):
                return
            frozen = batch.x_adv.clone()
            start = frozen.clone()
            for i, images in batch.break_images().items():
                if moving[i]:
                    start[i] = images[0]
            mask = moving.view((-1,) + (1,) * (frozen.ndim - 1))
            iterates = IterateScores(batch, lambda x_adv, logits: logits.argmax(1) == batch.y)

            def whole(z: torch.Tensor) -> torch.Tensor:
                return torch.where(mask, z, frozen)

            def observe(z: torch.Tensor, logits: torch.Tensor) -> None:
                ctx.progress.tick()
                iterates(whole(z), logits)
            x_r = apgd(lambda z: ctx.target(whole(z)), batch.x, batch.y, cfg.eps, cfg.norm, cfg.apgd_iters, loss=loss,
                       x_init=start, generator=ctx.generator, observe=observe)
            yield Candidate(self.candidate(f'apgd-round{r + 1}'), whole(x_r), moving)
            yield Candidate(self.candidate(f'apgd-round{r + 1}'), replace=ctx.active(), iterates=iterates)


#: The kinds of stage in the order they run: AutoAttack on the target, each surrogate as configured, then (with
#: ``completion_rounds``) the completion through the target.
DEFAULT_STAGES: List[type] = [AutoAttackStage, SurrogateStage, CompletionStage]
