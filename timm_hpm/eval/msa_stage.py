"""The abstraction of MSA's stages (:mod:`timm_hpm.eval.msa_stages` has the default ones): a :class:`Stage` offers
:class:`Candidate` batches for one fixed batch, each scored whole on the target through the :class:`StageContext`
before the stage goes on; :class:`StageCost` measures what each stage cost."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from .msa_config import MSAConfig
from .progress import StageProgress
from .realised import IterateScores, RealisedBatch
from .stages import candidate_name
from .views import ModelView

__all__ = ['Candidate', 'StageContext', 'Stage', 'StageCost', 'StageRecord', 'same_view']


@dataclass
class Candidate:
    """A candidate a stage offers for the realised batch: ``images``, a whole batch within eps, may replace the
    realised batch's images of the samples ``replace`` selects (None: all); or ``iterates``, the whole batches one
    APGD run evaluated (:meth:`RealisedBatch.consider_iterates`); or ``correct``, a verdict known without a pass
    (nothing to attack: no candidate batch, no break)."""
    name: str
    images: Optional[torch.Tensor] = None
    replace: Optional[torch.Tensor] = None
    iterates: Optional[IterateScores] = None
    correct: Optional[torch.Tensor] = None


@dataclass
class StageContext:
    """What a stage of one batch works with: the realised batch, the target, the options, the batch's seed and
    random generator (saved with a stage checkpoint), the number of classes, the progress line, and ``outputs``
    (what the stages record beside the candidates, e.g. AutoAttack's own verdict)."""
    batch: RealisedBatch
    target: nn.Module
    cfg: MSAConfig
    seed: int
    num_classes: int
    generator: torch.Generator
    progress: StageProgress
    outputs: Dict[str, Any] = field(default_factory=dict)

    def active(self) -> torch.Tensor:
        """The samples a stage attacks: those still correct in the realised batch (cascade), else every
        clean-correct one."""
        return self.batch.correct.clone() if self.cfg.cascade else self.batch.clean.clone()

    def take(self, candidate: Candidate) -> None:
        """Score ``candidate`` on the target and keep what it breaks (:class:`RealisedBatch`)."""
        batch = self.batch
        replace = torch.ones_like(batch.clean) if candidate.replace is None else candidate.replace
        if candidate.iterates is not None:
            batch.consider_iterates(candidate.name, candidate.iterates, replace)
        elif candidate.images is not None:
            batch.consider(candidate.name, candidate.images, replace)
        else:
            batch.candidates[candidate.name] = candidate.correct


class Stage:
    """One stage of MSA on one batch. ``name``: the stage in the unit files (``stage_passes``, the stage checkpoint's
    ``done``; its candidates are named ``<name>/<attack>``: :meth:`candidate`); ``through``: what it attacks through
    (``'target'`` or a surrogate's name); ``outputs``: what this kind of stage records in the unit beside the
    candidates (and in the stage checkpoint, to resume), with its value when the stage does not run (names that are
    no key of the unit or the checkpoint already, e.g. ``autoattack_own``). After it ran,
    ``breaks``: the samples its candidates broke that no earlier stage's had (what it added to the per-sample
    union; the unit's candidates say which)."""
    name: str = ''
    through: str = 'target'
    outputs: ClassVar[Dict[str, Any]] = {}
    breaks: Optional[int] = None

    @classmethod
    def for_run(cls, cfg: MSAConfig, target: nn.Module, surrogates: Dict[str, nn.Module]) -> List['Stage']:
        """This kind's stages of one run, in order (default: one)."""
        return [cls()]

    def wanted(self, ctx: StageContext) -> bool:
        """Whether to run it (default: while some sample is still to attack)."""
        return bool(ctx.active().any())

    def run(self, ctx: StageContext) -> Iterator[Candidate]:
        """Yield the candidate batches; each is scored on the target (``ctx.take``) before this goes on."""
        raise NotImplementedError

    def candidate(self, attack: str) -> str:
        """The name of this stage's candidate of ``attack``."""
        return candidate_name(self.name, attack)


def same_view(a: nn.Module, b: nn.Module) -> bool:
    """Whether two views are the same model under the same head mode (the target attacked through itself)."""
    return a is b or (isinstance(a, ModelView) and isinstance(b, ModelView) and a.model is b.model
                      and a.mode == b.mode)


class StageCost:
    """What each stage of one batch's attack cost: images through forward and backward passes (the views'
    PassCounters, each counted once; none when the views count nothing) and seconds, from the previous ``close``
    (the first stage's include the clean batch's forward). ``passes``/``seconds``: those of a resumed unit's
    finished stages."""

    def __init__(self, views, passes: Optional[Dict[str, Dict[str, int]]] = None,
                 seconds: Optional[Dict[str, float]] = None):
        self._counters = list({id(c): c for c in (getattr(v, 'counter', None) for v in views) if c is not None}
                              .values())
        self.passes: Dict[str, Dict[str, int]] = dict(passes or {})
        self.seconds: Dict[str, float] = dict(seconds or {})
        self._last = self._now()

    def _now(self):
        return (time.perf_counter(), sum(c.forward for c in self._counters), sum(c.backward for c in self._counters))

    def totals(self) -> Dict[str, int]:
        _, forward, backward = self._now()
        return {'forward_images': forward, 'backward_images': backward}

    def close(self, stage: str) -> None:
        now = self._now()
        self.seconds[stage] = round(now[0] - self._last[0], 3)
        if self._counters:
            self.passes[stage] = {'forward_images': now[1] - self._last[1], 'backward_images': now[2] - self._last[2]}
        self._last = now


class StageRecord:
    """One batch's way through its stages: the realised batch, the stages done, what they recorded (``outputs``)
    and cost, saved to ``checkpoint`` (``load()`` -> ``(tensors, meta)`` or None, ``save(tensors, meta)``; e.g.
    :class:`~timm_hpm.eval.run_folder.StageCheckpoint`) after each stage with the random generator's state, so a
    batch that was stopped resumes at its next stage with the result of an uninterrupted one. ``before``: the
    seconds and passes of an earlier start's finished stages."""

    def __init__(self, target: nn.Module, x: torch.Tensor, y: torch.Tensor, views: List[nn.Module],
                 generator: torch.Generator, checkpoint=None, outputs: Optional[Dict[str, Any]] = None):
        self.start, self.generator, self.checkpoint = time.perf_counter(), generator, checkpoint
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is None:
            self.before = {'seconds': 0.0, 'forward_images': 0, 'backward_images': 0}
            self.cost = StageCost(views)  # before the clean pass: the stages' passes add up to the batch's
            self.at_start = self.cost.totals()
            self.batch, self.done, self.outputs = RealisedBatch(target, x, y), [], dict(outputs or {})
            return
        tensors, meta = saved
        self.batch = RealisedBatch.restore(target, x, y, tensors, meta['batch'])
        generator.set_state(tensors['generator'])
        self.done, self.before = list(meta['done']), meta['before']
        self.outputs = {key: meta.get(key, default) for key, default in (outputs or {}).items()}
        self.cost = StageCost(views, meta['stage_passes'], meta['stage_seconds'])
        self.at_start = {k: v - self.before[k] for k, v in self.cost.totals().items()}  # the earlier start's passes

    def finish(self, stage: str) -> None:
        """``stage`` is done: its cost closed, the batch's progress saved."""
        self.cost.close(stage)
        self.done.append(stage)
        if self.checkpoint is None:
            return
        tensors, meta = self.batch.state()
        tensors['generator'] = self.generator.get_state()
        passes = {k: v - self.at_start[k] for k, v in self.cost.totals().items()}
        self.checkpoint.save(tensors, {'batch': meta, 'done': self.done, **self.outputs,
                                       'stage_passes': self.cost.passes, 'stage_seconds': self.cost.seconds,
                                       'before': {'seconds': self.seconds(), **passes}})

    def seconds(self) -> float:
        """Seconds spent on the batch, earlier starts included."""
        return self.before['seconds'] + time.perf_counter() - self.start

    def result(self) -> dict:
        """The unit's result (see :func:`~timm_hpm.eval.attack_batch`)."""
        batch = self.batch
        return {
            'clean': batch.clean.tolist(),
            **self.outputs,
            'candidates': {k: v.tolist() for k, v in batch.candidates.items()},
            'realised': batch.correct.tolist(),
            'union': batch.union.tolist(),
            'stages': batch.stages,
            'stage_passes': self.cost.passes,
            'stage_seconds': self.cost.seconds,
            'seconds': self.seconds(),
            'passes_before': {k: self.before[k] for k in ('forward_images', 'backward_images')},
            'x_adv': batch.x_adv,
        }
