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
surrogate transferred with a per-sample worst case); finally whole-batch combinations of every stage's breaks.
Cascade: a sample broken in the realised batch is not attacked again (batch-independent surrogates attack the
still-robust samples only), but every candidate batch is scored whole. The per-sample union over all
candidates is a bound that need not be realisable in one batch, reported beside the realised figure.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..attacks import accuracy, apgd, apgd_targeted, check_count, check_eps, check_flag, check_images, option_label
from ..attacks._ball import NORMS
from ..layers.hpm_head import HPM_MODES
from ..models._hpm import is_hpm_model
from .autoattack import AUTOATTACK_VERSIONS, make_autoattack, run_autoattack
from .checks import unwrap
from .progress import StageProgress
from .realised import IterateScores, RealisedBatch
from .stages import AUTOATTACK, COMBINED, candidate_name
from .views import ModelView, hpm_views

__all__ = ['MSAConfig', 'attack_batch', 'msa']

#: The ``recipes/evaluate.py`` flag of each option that has one: an option's error names both.
CLI_FLAGS = {'eps': '--eps', 'norm': '--norm', 'surrogates': '--surrogates', 'surrogate_models': '--surrogate-model',
             'apgd_iters': '--apgd-iters', 'n_target_classes': '--n-target-classes',
             'target_n_target_classes': '--target-n-target-classes', 'combine_rounds': '--combine-rounds',
             'autoattack_iters': '--autoattack-iters', 'square_queries': '--square-queries', 'seed': '--seed',
             'batch_size': '--batch-size'}


def _names(value, name: str, optional: bool = False, choices: Optional[Sequence[str]] = None) -> Optional[List[str]]:
    """A list of names (a sequence of distinct strings, from ``choices`` when given; not one string, whose letters
    would be taken for names), or a ValueError naming the option."""
    if value is None and optional:
        return None
    label = option_label(name, value, CLI_FLAGS.get(name))
    if isinstance(value, str):
        raise ValueError(f'{label}: must be a list of names, not one string (e.g. [{value!r}])')
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f'{label}: must be a list of names (non-empty strings)')
    unknown = [v for v in value if choices is not None and v not in choices]
    if unknown:
        raise ValueError(f'{label}: unknown {unknown}; choose from {list(choices)}')
    if len(set(value)) != len(value):
        raise ValueError(f'{label}: names one twice')
    return list(value)


@dataclass
class MSAConfig:
    """Options of the protocol (all reported in the results). Checked when made (and by :meth:`validate`, which
    :func:`msa`, :func:`attack_batch` and the runner call again): an option out of its range is a ValueError naming
    it, its value, its ``recipes/evaluate.py`` flag and the valid range, before any work."""
    eps: float
    norm: str = 'Linf'
    surrogates: Sequence[str] = ('fc', 'static', 'soft', 'dynamic')
    surrogate_models: Sequence[str] = ()  # names of other models attacked after the head's modes (e.g. the base)
    apgd_iters: int = 100
    n_target_classes: int = 3  # APGD-T targets per surrogate (cost: see the MSA benchmark)
    target_n_target_classes: int = 9  # through the target itself (its own view among the surrogates): AutoAttack's 9
    combine_rounds: int = 3  # whole-batch combinations of every stage's breaks after the last stage (0: none)
    score_iterates: bool = True  # every whole batch a batch-dependent surrogate's APGD evaluates, scored on the target
    surrogate_apgd: bool = True  # whole-batch APGD-CE/APGD-T through each surrogate (off: the paper's protocol)
    autoattack: bool = True  # the standard AutoAttack cascade on the target, re-scored on fixed batches
    autoattack_version: str = 'standard'
    autoattack_attacks: Optional[Sequence[str]] = None  # with autoattack_version='custom'
    autoattack_iters: Optional[int] = None  # None: AutoAttack's own (100)
    square_queries: Optional[int] = None  # None: AutoAttack's own (5000)
    surrogate_autoattack: bool = False  # also each surrogate's AutoAttack cascade (APGD-CE, APGD-T, FAB-T)
    cascade: bool = True
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> 'MSAConfig':
        """Every option's type and range (budgets of at least one iteration, query and target class; eps finite,
        > 0 and, for Linf, at most 1), or a ValueError naming the option; returns the config."""
        def flag(name):
            return CLI_FLAGS.get(name)
        if self.norm not in NORMS:
            raise ValueError(f"{option_label('norm', self.norm, flag('norm'))}: must be one of {list(NORMS)}")
        check_eps(self.eps, self.norm, 'eps', flag('eps'))
        _names(self.surrogates, 'surrogates', choices=HPM_MODES)
        _names(self.surrogate_models, 'surrogate_models')
        check_count(self.apgd_iters, 'apgd_iters', 1, flag('apgd_iters'), what="iterations of MSA's whole-batch APGD")
        check_count(self.n_target_classes, 'n_target_classes', 1, flag('n_target_classes'),
                    what='APGD-T target classes per surrogate')
        check_count(self.target_n_target_classes, 'target_n_target_classes', 1, flag('target_n_target_classes'),
                    what='APGD-T target classes through the target')
        check_count(self.combine_rounds, 'combine_rounds', 0, flag('combine_rounds'),
                    what='whole-batch combination rounds; 0: none')
        check_count(self.autoattack_iters, 'autoattack_iters', 1, flag('autoattack_iters'), optional=True,
                    what="AutoAttack's iterations; None: its own")
        check_count(self.square_queries, 'square_queries', 1, flag('square_queries'), optional=True,
                    what="Square's queries; None: AutoAttack's own")
        for name in ('score_iterates', 'surrogate_apgd', 'autoattack', 'surrogate_autoattack', 'cascade'):
            check_flag(getattr(self, name), name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{option_label('seed', self.seed, flag('seed'))}: must be an integer")
        if self.autoattack_version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"{option_label('autoattack_version', self.autoattack_version)}: must be one of "
                             f'{list(AUTOATTACK_VERSIONS)}')
        attacks = _names(self.autoattack_attacks, 'autoattack_attacks', optional=True)
        if self.autoattack_version == 'custom' and self.autoattack and not attacks:
            raise ValueError("autoattack_version='custom' needs autoattack_attacks, e.g. ['apgd-ce', 'apgd-t']")
        if self.autoattack_version != 'custom' and attacks:
            raise ValueError(f"autoattack_attacks={attacks} needs autoattack_version='custom'")
        if not (self.autoattack or self.surrogate_apgd or self.surrogate_autoattack):
            raise ValueError('no attack is on (autoattack, surrogate_apgd and surrogate_autoattack are all False): '
                             'the robust accuracy would be the clean accuracy; turn one on')
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d['surrogates'] = list(self.surrogates)
        d['surrogate_models'] = list(self.surrogate_models)
        d['autoattack_attacks'] = list(self.autoattack_attacks) if self.autoattack_attacks else None
        return d


def _same_view(a: nn.Module, b: nn.Module) -> bool:
    """Whether two views are the same model under the same head mode (the target attacked through itself)."""
    return a is b or (isinstance(a, ModelView) and isinstance(b, ModelView) and a.model is b.model
                      and a.mode == b.mode)


def _surrogate_stage(batch: RealisedBatch, name: str, surrogate: nn.Module, n_targets: int, cfg: 'MSAConfig',
                     generator: torch.Generator, active: Callable[[], torch.Tensor],
                     progress: Optional[StageProgress] = None) -> None:
    """White-box APGD-CE and APGD-T (``n_targets`` target classes) through one surrogate, each scored on the target;
    for a batch-dependent surrogate also every whole batch each run evaluated (``cfg.score_iterates``)."""
    x, y = batch.x, batch.y
    todo = active()
    # Batch-independent surrogates may attack the sub-batch of robust samples; batch-dependent ones see the whole
    # batch (its composition is part of the model), so each batch they evaluate is a concrete candidate.
    batch_dependent = getattr(surrogate, 'batch_dependent', True)
    idx = torch.arange(x.shape[0], device=x.device) if batch_dependent else todo.nonzero().flatten()
    xs, ys = x[idx], y[idx]
    iterates: List[Optional[IterateScores]] = [None]

    def new_iterates() -> None:
        if batch_dependent and cfg.score_iterates:
            same = _same_view(surrogate, batch.target)  # its logits are the target's: no extra pass
            iterates[0] = IterateScores(batch, lambda xa, logits: (logits.argmax(1) == y) if same
                                        else accuracy(batch.target, xa, y))

    def observe(x_adv: torch.Tensor, logits: torch.Tensor) -> None:
        if progress is not None:
            progress.tick()
        if iterates[0] is not None:
            iterates[0](x_adv, logits)

    def scatter(x_sub: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[idx] = x_sub
        return out

    def take(attack: str, x_sub: torch.Tensor, replace: torch.Tensor) -> None:
        batch.consider(candidate_name(name, attack), scatter(x_sub), replace)
        if iterates[0] is not None:
            batch.consider_iterates(candidate_name(name, attack), iterates[0], active())
        new_iterates()

    new_iterates()
    take('apgd-ce', apgd(surrogate, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters, loss='ce', generator=generator,
                         observe=observe), todo)
    for rank, x_t in enumerate(apgd_targeted(surrogate, xs, ys, cfg.eps, cfg.norm, cfg.apgd_iters,
                                             n_target_classes=n_targets, generator=generator, observe=observe)):
        todo = active()
        if not bool(todo.any()):
            break
        take(f'apgd-t{rank + 1}', x_t, todo)


class _StageCost:
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
) -> dict:
    """MSA on one fixed batch. Returns per-sample correctness (lists of bools) of the target on the clean
    batch, on each candidate batch, and on the final realised batch, AutoAttack's own verdict (``autoattack_own``,
    None without the AutoAttack stage), and the realised images.

    ``checkpoint`` (e.g. :class:`~timm_hpm.eval.run_folder.StageCheckpoint`; ``load()`` -> ``(tensors, meta)`` or
    None, ``save(tensors, meta)``): the batch's progress is saved after each stage before the combinations, and a
    batch that was stopped resumes at its next stage with the same result as an uninterrupted one (the random
    generator's state is saved with it). ``passes_before`` in the result: the passes the finished stages of an
    earlier start made (zero without one); ``seconds`` includes their time. ``progress``: a
    :class:`~timm_hpm.eval.progress.StageProgress` showing each stage and its attack iterations."""
    if not isinstance(cfg, MSAConfig):
        raise ValueError(f'cfg must be an MSAConfig, got {type(cfg).__name__}')
    cfg.validate()  # again: a config changed after it was made is checked before any work
    start = time.perf_counter()
    progress = progress or StageProgress(enabled=False)
    generator = torch.Generator().manual_seed(seed)
    views = [target, *surrogates.values()]
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        before = {'seconds': 0.0, 'forward_images': 0, 'backward_images': 0}
        cost = _StageCost(views)  # before the clean pass: the stages' passes add up to the batch's
        at_start = cost.totals()
        batch, done, autoattack_own = RealisedBatch(target, x, y), [], None
    else:
        tensors, meta = saved
        batch = RealisedBatch.restore(target, x, y, tensors, meta['batch'])
        generator.set_state(tensors['generator'])
        done, autoattack_own, before = list(meta['done']), meta['autoattack_own'], meta['before']
        cost = _StageCost(views, meta['stage_passes'], meta['stage_seconds'])
        at_start = {k: v - before[k] for k, v in cost.totals().items()}  # counts the earlier start's passes

    def active() -> torch.Tensor:
        return batch.correct.clone() if cfg.cascade else batch.clean.clone()

    def finish(stage: str) -> None:
        cost.close(stage)
        done.append(stage)
        if checkpoint is not None:
            tensors, meta = batch.state()
            tensors['generator'] = generator.get_state()
            passes = {k: v - at_start[k] for k, v in cost.totals().items()}
            checkpoint.save(tensors, {'batch': meta, 'done': done, 'autoattack_own': autoattack_own,
                                      'stage_passes': cost.passes, 'stage_seconds': cost.seconds,
                                      'before': {'seconds': before['seconds'] + time.perf_counter() - start,
                                                 **passes}})

    if cfg.autoattack and AUTOATTACK not in done:
        progress.stage('AutoAttack on the target')  # its iterations run inside AutoAttack, unseen
        if bool(batch.clean.any()):
            # Plain AutoAttack's figure: all its images, re-scored on this fixed batch (its own verdict is kept
            # beside, never used: it shows what AutoAttack's printout would claim).
            adversary = make_autoattack(target, cfg.eps, cfg.norm, version=cfg.autoattack_version,
                                        attacks=cfg.autoattack_attacks, seed=seed, device=x.device,
                                        num_classes=num_classes, n_iter=cfg.autoattack_iters,
                                        square_queries=cfg.square_queries)
            x_aa, autoattack_own = run_autoattack(adversary, x, y, batch_size=x.shape[0], return_own=True)
            batch.consider(AUTOATTACK, x_aa, torch.ones_like(batch.clean))
            autoattack_own = (autoattack_own & batch.clean).tolist()
        else:
            batch.candidates[AUTOATTACK] = batch.clean.clone()
            autoattack_own = batch.clean.tolist()
        finish(AUTOATTACK)

    for name, surrogate in surrogates.items():
        if name in done:
            continue
        if not bool(active().any()):
            break
        n_targets = cfg.target_n_target_classes if _same_view(surrogate, target) else cfg.n_target_classes
        if cfg.surrogate_apgd:  # APGD-CE, then APGD-T per target: each its start and iterations
            progress.stage(f'APGD-CE/T via {name}', (1 + n_targets) * (cfg.apgd_iters + 1))
            _surrogate_stage(batch, name, surrogate, n_targets, cfg, generator, active, progress)
        if cfg.surrogate_autoattack and bool(active().any()):
            progress.stage(f'AutoAttack via {name}')
            adversary = make_autoattack(surrogate, cfg.eps, cfg.norm, version='custom',
                                        attacks=['apgd-ce', 'apgd-t', 'fab-t'], seed=seed, device=x.device,
                                        num_classes=num_classes, n_iter=cfg.autoattack_iters)
            batch.consider(candidate_name(name, 'autoattack'), run_autoattack(adversary, x, y, batch_size=x.shape[0]),
                           active())
        finish(name)
    progress.stage('combinations of every stage\'s breaks')
    batch.combine(cfg.combine_rounds)
    progress.close()
    cost.close(COMBINED)
    return {
        'clean': batch.clean.tolist(),
        'autoattack_own': autoattack_own,
        'candidates': {k: v.tolist() for k, v in batch.candidates.items()},
        'realised': batch.correct.tolist(),
        'union': batch.union.tolist(),
        'stages': batch.stages,
        'stage_passes': cost.passes,
        'stage_seconds': cost.seconds,
        'seconds': before['seconds'] + time.perf_counter() - start,
        'passes_before': {k: before[k] for k in ('forward_images', 'backward_images')},
        'x_adv': batch.x_adv,
    }


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
    if not any(_same_view(v, target) for v in views.values()):
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
