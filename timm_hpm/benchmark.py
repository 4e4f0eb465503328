"""One call that benchmarks any model honestly, batch-dependent or not: :func:`benchmark`.

    clean_acc, robust_acc = timm_hpm.benchmark(model, dataset='fashion_mnist', threat_model='Linf', eps=0.1,
                                               n_examples=1000, batch_size=250)

RobustBench's ``benchmark`` (argument names, return shape), for any ``nn.Module`` taking [0, 1] images (a timm model
gets its normalisation put inside, as ``recipes/evaluate.py`` does), an HPM model or any other batch-dependent model.
It first runs :func:`~timm_hpm.eval.batch_dependence.batch_dependence` on a few hundred clean images, then:

* a **batch-independent** model gets standard AutoAttack on fixed batches through the library's resumable runner
  (:func:`timm_hpm.eval.evaluate`, ``protocol='autoattack'``): the same figure as ``recipes/evaluate.py --protocol
  autoattack`` with the same images, batch size, budget and seed;
* a **batch-dependent** model gets the Mixed Surrogate Attack on fixed batches (every candidate batch scored whole)
  in the natural batch orders (``default``: the dataset's order in batches of ``batch_size``; ``single``: each image
  alone; ``shuffled``: a seeded order; ``class_sorted``: label order, as a class-folder dataset yields), and the
  batch-poisoning protocol (k members of each batch perturbed within eps to flip the untouched ones). An HPM model
  (dynamic head) is attacked through its head's views (``fc``, ``static``, ``soft``, ``dynamic``) by the same runner
  (``protocol='msa'``); any other model through itself, the ``surrogates`` given, and for batch norm with test-batch
  statistics (:class:`~timm_hpm.layers.batch_stats_norm.BatchStatsNorm2d`) the same network with its running
  statistics, with the same MSA code (:func:`timm_hpm.eval.attack_batch`) on the same resumable unit files. Its
  robust accuracy is the worst case measured: the lowest realised MSA batching or the lowest accuracy of the
  untouched members under bounded poisoning.

The result is ``(clean_accuracy, robust_accuracy)`` with the full report as ``.report``; with ``out`` it also
writes ``benchmark.json`` (the report), ``benchmark.md`` (its tables) and ``model_info.json`` (RobustBench's entry:
:func:`timm_hpm.robustbench.model_info`, whose ``autoattack_acc`` holds the worst case, with a footnote that says
which protocol ran and why). The run resumes after a kill (the runner's unit files, the poisoning's batch files) and a
finished benchmark is never overwritten.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .attacks import normalized_view, parse_eps
from .eval.msa_config import MSAConfig
from .eval.poison import PoisonConfig
from .layers.batch_stats_norm import NormStatsView, batch_stats_layers, norm_stats
from .models import get_hpm_head, is_hpm_model
from .report import markdown_table
from .runfiles import run_lock, write_text_atomic

__all__ = ['benchmark', 'BenchmarkResult', 'BATCHINGS', 'THREAT_MODELS', 'FULL_BUDGET', 'DEFAULT_EPS']

_logger = logging.getLogger(__name__)

#: The threat models benchmarked (RobustBench's names; its 'corruptions' is not an adversarial threat model).
THREAT_MODELS = ('Linf', 'L2')
#: A batch-dependent model's batchings: the fixed batches of ``batch_size`` first, then the natural orders.
BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')
#: RobustBench's standard radii where ``eps`` is not given (Fashion-MNIST has none: give ``eps``).
DEFAULT_EPS = {('cifar10', 'Linf'): 8 / 255, ('cifar100', 'Linf'): 8 / 255, ('imagenet', 'Linf'): 4 / 255,
               ('cifar10', 'L2'): 0.5, ('cifar100', 'L2'): 0.5}
#: The attack budget a benchmark takes: these MSAConfig fields, and PoisonConfig's ``steps`` as ``poison_steps``.
MSA_BUDGET_FIELDS = ('autoattack_iters', 'square_queries', 'apgd_iters', 'n_target_classes', 'target_n_target_classes',
                     'combine_rounds')
#: Full strength: their defaults (AutoAttack's own budget where None). A ``budget`` entry below these makes the run a
#: reduced-budget one (``unreliable`` in model_info.json).
FULL_BUDGET = {**{f.name: f.default for f in dataclasses.fields(MSAConfig) if f.name in MSA_BUDGET_FIELDS},
               'poison_steps': PoisonConfig.steps}


class BenchmarkResult(tuple):
    """``(clean_accuracy, robust_accuracy)``, as RobustBench's ``benchmark`` returns; ``.report``: everything
    measured (the batch-dependence test, the protocol and why, each batching's figures, poisoning, model_info)."""

    def __new__(cls, clean_accuracy: float, robust_accuracy: float, report: dict):
        self = super().__new__(cls, (clean_accuracy, robust_accuracy))
        self.report = report
        return self

    @property
    def clean_accuracy(self) -> float:
        return self[0]

    @property
    def robust_accuracy(self) -> float:
        return self[1]


def benchmark(
        model: nn.Module,
        n_examples: int = 1000,
        dataset: Union[str, Tuple[torch.Tensor, torch.Tensor]] = 'cifar10',
        threat_model: str = 'Linf',
        model_name: Optional[str] = None,
        data_dir: Optional[Union[str, Path]] = None,
        device: Optional[Union[str, torch.device]] = None,
        batch_size: int = 128,
        eps: Optional[Union[float, str]] = None,
        *,
        surrogates: Optional[Mapping[str, nn.Module]] = None,
        out: Optional[Union[str, Path]] = None,
        budget: Optional[Mapping[str, Optional[int]]] = None,
        batchings: Sequence[str] = BATCHINGS,
        detection_examples: int = 256,
        seed: int = 0,
        progress: bool = True,
        metadata: Optional[dict] = None,
) -> BenchmarkResult:
    """Benchmark ``model``'s robustness on the first ``n_examples`` test images, with the protocol its batch
    dependence calls for; returns ``(clean_accuracy, robust_accuracy)`` with ``.report``.

    Args:
        model: an ``nn.Module`` in eval mode returning (N, K) logits: a timm model (its normalisation is put inside:
            :func:`timm_hpm.attacks.normalized_view`), an HPM model, or any module taking [0, 1] images.
        n_examples: the first N test images (defaults as ``recipes/evaluate.py``: 1,000 images in batches of 128;
            RobustBench's are 10,000 and 32).
        dataset: ``'fashion_mnist'``, ``'cifar10'``, ``'cifar100'``, ``'imagenet'``, ``'synthetic'``
            (``timm_hpm.data``), or ``(images, labels)`` tensors: images (N, C, H, W) in [0, 1], integer labels.
        threat_model: ``'Linf'`` or ``'L2'``.
        model_name: the name in the report and model_info.json (default: the timm name and tag, or the class).
        data_dir: the dataset's folder (see ``recipes/evaluate.py --data-dir``).
        device: where to run (default: where the model's parameters are).
        batch_size: the fixed batch size scored (B); for a batch-dependent model part of what is measured.
        eps: the radius (a float or ``'8/255'``); default RobustBench's for CIFAR and ImageNet.
        surrogates: for a batch-dependent model, other differentiable models (name -> module taking [0, 1] images)
            MSA also attacks through: e.g. the model it was fine-tuned from. An HPM model's head views and a
            test-batch-statistics model's running-statistics view are added by themselves.
        out: a folder for the run (resumable; ``benchmark.json``, ``benchmark.md``, ``model_info.json``); a folder
            holding a finished benchmark is refused. Default: a temporary folder, removed afterwards.
        budget: reduced attack budgets, for tests and quick runs (keys of :data:`FULL_BUDGET`); below full strength
            the report and model_info.json say so (``unreliable``).
        batchings: a batch-dependent model's batchings (default all of :data:`BATCHINGS`; fewer is a reduced run).
        detection_examples: the clean images the batch-dependence test uses (the first ones).
        seed: the attacks' and the test's seed.
        progress: tqdm progress bars.
        metadata: extra fields recorded in the report (e.g. the command line).
    """
    start = time.time()
    threat_model, eps = _check_threat(threat_model, eps, dataset)
    budget = _check_budget(budget)
    batchings = _check_batchings(batchings)
    for name, value, low in (('n_examples', n_examples, 1), ('batch_size', batch_size, 1),
                             ('detection_examples', detection_examples, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    if not isinstance(model, nn.Module):
        raise ValueError(f'model must be a torch.nn.Module (a timm model or any module taking [0, 1] images), got '
                         f'{type(model).__name__}')
    device = torch.device(device) if device is not None else _device_of(model)
    target = _unit_range(model).to(device)
    from .eval import check_eval_ready
    check_eval_ready(target)
    name = model_name or _model_name(model)
    x, y, dataset_name = _images(dataset, n_examples, data_dir, model, seed)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        from .eval.batch_dependence import check_logits
        num_classes = check_logits(target(x[:2]), min(2, len(y)), f'{name}').shape[1]
    from .eval.batch_dependence import check_clean_images
    check_clean_images(x, y, num_classes)
    with contextlib.ExitStack() as stack:
        if out is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='timm_hpm_benchmark_')))
        else:
            folder = Path(out)
            if (folder / 'benchmark.json').exists():
                raise FileExistsError(f'{folder} holds a finished benchmark (benchmark.json); it is never overwritten: '
                                      'pass a new out folder.')
        stack.enter_context(run_lock(folder, 'out'))
        report = _run(target, model, x, y, name, dataset_name, threat_model, eps, batch_size, surrogates, budget,
                      batchings, detection_examples, seed, progress, folder, device, dict(metadata or {}))
        report['wall_seconds'] = round(time.time() - start, 1)
        if out is not None:
            write_text_atomic(folder / 'model_info.json', json.dumps(report['model_info'], indent=2))
            write_text_atomic(folder / 'benchmark.md', format_report(report) + '\n')
            write_text_atomic(folder / 'benchmark.json', json.dumps(report, indent=2))  # last: marks it finished
    return BenchmarkResult(report['clean_acc'], report['robust_acc'], report)


# ---------------------------------------------------------------------------------------------------------- checks

def _check_threat(threat_model, eps, dataset) -> Tuple[str, float]:
    if threat_model not in THREAT_MODELS:
        raise ValueError(f'threat_model must be one of {THREAT_MODELS}, got {threat_model!r} (RobustBench\'s '
                         "'corruptions' is not an adversarial threat model; it is not benchmarked here)")
    if eps is None:
        key = (dataset, threat_model) if isinstance(dataset, str) else None
        if key not in DEFAULT_EPS:
            raise ValueError(f'give eps: there is no standard {threat_model} radius for '
                             f'{dataset if isinstance(dataset, str) else "these images"} (e.g. eps=0.1 for '
                             "Fashion-MNIST, eps='8/255' for CIFAR)")
        return threat_model, DEFAULT_EPS[key]
    return threat_model, parse_eps(eps, threat_model)


def _check_budget(budget) -> dict:
    budget = dict(budget or {})
    unknown = sorted(set(budget) - set(FULL_BUDGET))
    if unknown:
        raise ValueError(f'unknown budget keys {unknown}; choose from {sorted(FULL_BUDGET)}')
    for key, value in budget.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f'budget[{key!r}] must be an integer (or None: full strength), got {value!r}')
    return {**FULL_BUDGET, **budget}


def _check_batchings(batchings) -> List[str]:
    if isinstance(batchings, str) or not batchings:
        raise ValueError(f"batchings must be a non-empty list of names from {BATCHINGS}, got {batchings!r}")
    unknown = [b for b in batchings if b not in BATCHINGS]
    if unknown or batchings[0] != 'default' or len(set(batchings)) != len(batchings):
        raise ValueError(f"batchings must start with 'default' (the fixed batches) and name each of {BATCHINGS} at "
                         f'most once, got {list(batchings)}')
    return list(batchings)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def _unit_range(model: nn.Module) -> nn.Module:
    """``model`` taking [0, 1] images: a timm model (a ``pretrained_cfg``) with its normalisation inside (identity for
    the CIFAR-style and Fashion-MNIST families), any other module as it is."""
    return normalized_view(model) if getattr(model, 'pretrained_cfg', None) else model


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('architecture'):
        return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else cfg['architecture']
    return type(model).__name__


def _images(dataset, n: int, data_dir, model: nn.Module, seed: int):
    """The first ``n`` test images of ``dataset`` (as recipes/evaluate.py loads them), or of the given tensors."""
    from .eval.batch_dependence import check_clean_images
    if isinstance(dataset, (tuple, list)):
        if len(dataset) != 2:
            raise ValueError('dataset as tensors must be a pair (images, labels)')
        x, y = dataset
        check_clean_images(x, y)
        if n > x.shape[0]:
            raise ValueError(f'n_examples={n} is more than the {x.shape[0]} images given')
        return x[:n], y[:n], 'custom'
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a name ('fashion_mnist', 'cifar10', ...) or (images, labels) tensors, got "
                         f'{type(dataset).__name__}')
    from .data import DATASETS, load_eval_tensors
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose from {DATASETS} or pass (images, labels) tensors')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    num_classes = getattr(model, 'num_classes', None) or cfg.get('num_classes') or 10
    x, y = load_eval_tensors(dataset, n, data_dir, cfg or None, num_classes=num_classes,
                             image_size=cfg.get('input_size', (3, 32, 32)), seed=seed)
    return x, y, dataset


def _hpm_dynamic(target: nn.Module) -> bool:
    from .eval.checks import unwrap
    raw = unwrap(target)
    return is_hpm_model(raw) and raw.hpm_head is not None and get_hpm_head(raw).mode == 'dynamic'


# -------------------------------------------------------------------------------------------------------- the run

def _run(target, model, x, y, name, dataset_name, threat_model, eps, batch_size, surrogates, budget, batchings,
         detection_examples, seed, progress, folder: Path, device, metadata) -> dict:
    import timm_hpm
    from .eval import autoattack_backend, hpm_mode
    from .eval.batch_dependence import batch_dependence
    m = min(detection_examples, len(y))
    detection = batch_dependence(target, x[:m], y[:m], batch_size=batch_size, seed=seed)
    _record(folder / 'batch_dependence.json', detection)
    if detection['verdict'] == 'nondeterministic':
        raise ValueError(f"{name} gives other logits for the same batch twice (max change "
                         f"{detection['tests']['repeat']['max_logit_change']:.3g}): a randomised model needs an "
                         'attack with expectation over its randomness (EOT), which benchmark() does not run; make it '
                         'deterministic (eval mode, no dropout or noise at inference) or evaluate it elsewhere.')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    meta = dict(name=name, dataset=dataset_name, hpm_mode=hpm_mode(target), architecture=cfg.get('architecture'),
                autoattack_backend=autoattack_backend(), timm_hpm_version=timm_hpm.__version__, **metadata)
    msa_cfg = dict(eps=eps, norm=threat_model, seed=seed, **{k: budget[k] for k in MSA_BUDGET_FIELDS})
    report = dict(meta, model=name, threat_model=threat_model, eps=eps, n_examples=len(y), batch_size=batch_size,
                  batch_dependence=detection, budget=budget)
    if not detection['batch_dependent']:
        from .eval import evaluate
        result = evaluate(target, x, y, MSAConfig(**msa_cfg), folder / 'attack', protocol='autoattack',
                          batch_size=batch_size, batchings=['default'], progress=progress, metadata=meta)
        report.update(protocol='autoattack', why=_why(detection, False), clean_acc=result['clean_acc'],
                      robust_acc=result['autoattack_acc'],
                      worst_case={'acc': result['autoattack_acc'], 'from': 'AutoAttack (standard), fixed batches'},
                      evaluation=result)
        report['reduced_budget'] = _reduced(result, budget, None, None)
        report['model_info'] = _model_info(result, report, model)
        return report
    views, surrogate_flags = _surrogates(target, surrogates, x, y, batch_size, seed, device)
    if _hpm_dynamic(target):
        from .eval import evaluate
        cfg_msa = MSAConfig(**msa_cfg, surrogate_models=tuple(views))
        result = evaluate(target, x, y, cfg_msa, folder / 'attack', protocol='msa', batch_size=batch_size,
                          batchings=batchings, progress=progress, metadata=meta, surrogate_models=views)
        attacked_through = ['fc', 'static', 'soft', 'dynamic (the target)'] + list(views)
    else:
        views = dict(views)
        cfg_msa = MSAConfig(**msa_cfg, surrogates=(), surrogate_models=tuple(views) + ('target',))
        result = _msa_any_model(target, views, surrogate_flags, x, y, cfg_msa, folder / 'attack', batch_size,
                                batchings, progress, meta)
        attacked_through = list(views) + ['the target itself']
    poisoning = _poisoning(target, x, y, batch_size, eps, threat_model, budget['poison_steps'], seed,
                           folder / 'poison', progress)
    per_batching = result['batchings']
    natural = {b: v['realised_acc'] for b, v in per_batching.items() if b != 'default'}
    candidates = [(v['realised_acc'], f'MSA, realised batches ({b} batching)') for b, v in per_batching.items()]
    if poisoning.get('worst_untouched_acc') is not None:
        candidates.append((poisoning['worst_untouched_acc'], f"bounded poisoning ({poisoning['worst_k']} of "
                                                             f'{batch_size} members poisoned; accuracy of the '
                                                             'untouched members)'))
    worst_acc, worst_from = min(candidates, key=lambda c: c[0])
    report.update(
        protocol='msa+poisoning', why=_why(detection, True), clean_acc=result['clean_acc'], robust_acc=worst_acc,
        worst_case={'acc': worst_acc, 'from': worst_from},
        msa_acc=result['msa_acc'], msa_union_acc=result['msa_union_acc'],
        autoattack_acc=result.get('autoattack_acc'), autoattack_own_acc=result.get('autoattack_own_acc'),
        worst_natural_order=({'batching': min(natural, key=natural.get), 'acc': min(natural.values())}
                             if natural else None),
        attacked_through=attacked_through, surrogates={k: {'batch_dependent': v} for k, v in surrogate_flags.items()},
        poisoning=poisoning, evaluation=result)
    report['reduced_budget'] = _reduced(result, budget, batchings, poisoning)
    report['model_info'] = _model_info(result, report, model)
    return report


def _record(path: Path, detection: dict) -> None:
    """The batch-dependence test's result, written once; a folder holding another verdict is another model's run."""
    if path.exists():
        before = json.loads(path.read_text())
        if before.get('verdict') != detection['verdict'] or before.get('n_images') != detection['n_images']:
            raise ValueError(f'{path.parent} holds the benchmark of another model (its batch-dependence test says '
                             f"{before.get('verdict')!r}, this model's {detection['verdict']!r}); use a new out "
                             'folder.')
        return
    write_text_atomic(path, json.dumps(detection, indent=2))


def _surrogates(target, surrogates, x, y, batch_size, seed, device):
    """The extra surrogate models (name -> [0, 1]-image view) and whether each is batch-dependent (measured)."""
    from .eval.batch_dependence import batch_dependence
    from .eval.checks import check_eval_ready
    views: Dict[str, nn.Module] = {}
    if surrogates is not None and not isinstance(surrogates, Mapping):
        raise ValueError(f'surrogates must be a dict name -> nn.Module, got {type(surrogates).__name__}')
    for key, module in (surrogates or {}).items():
        if not isinstance(key, str) or not key or '/' in key or key in ('target', 'autoattack', 'combined'):
            raise ValueError(f"surrogate name {key!r}: a non-empty name without '/', other than 'target', "
                             "'autoattack' and 'combined'")
        if not isinstance(module, nn.Module):
            raise ValueError(f'surrogate {key!r} must be an nn.Module, got {type(module).__name__}')
        views[key] = _unit_range(module).to(device)
        check_eval_ready(views[key])
    if batch_stats_layers(target) and norm_stats(target) == 'batch' and 'running_stats' not in views:
        views['running_stats'] = NormStatsView(target, 'running')  # the same weights with running statistics
    m = min(64, len(y))
    flags = {k: batch_dependence(v, x[:m], y[:m], batch_size=min(batch_size, m), seed=seed)['batch_dependent']
             for k, v in views.items()}
    return views, flags


def _msa_any_model(model, views, flags, x, y, cfg, run_dir: Path, batch_size, batchings, progress, metadata):
    """MSA on any batch-dependent model (no HPM head): :func:`timm_hpm.eval.attack_batch` on every fixed batch of
    every batching, through ``views`` then the target itself, each unit written as the runner writes it (resumable,
    the folder's settings and fingerprints checked), then :func:`timm_hpm.eval.aggregate`."""
    from .eval import ModelView, PassCounter, aggregate, make_batchings
    from .eval.run_folder import check_fingerprint, check_settings
    from .eval.runner import run_unit
    from .eval.unit_store import missing_units
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, 'out'):
        check_settings(run_dir, 'msa', batch_size, batchings, len(y), False, cfg, 0)
        check_fingerprint(run_dir, model, x, y, write=True)
        plan = make_batchings(len(y), batch_size, batchings, cfg.seed, labels=y)
        units = [(b, i, idx) for b in batchings for i, idx in enumerate(plan[b])]
        todo = missing_units(run_dir, units)
        if len(todo) < len(units):
            _logger.info('resuming: %d of %d batches already done', len(units) - len(todo), len(units))
        counter = PassCounter()
        target = ModelView(model, None, counter, batch_dependent=True)
        surrogates = {k: ModelView(v, None, counter, batch_dependent=flags[k]) for k, v in views.items()}
        surrogates['target'] = target  # attacked through itself last, with AutoAttack's 9 target classes
        with torch.no_grad():
            num_classes = int(target(x[:1]).shape[1])
        for unit in tqdm(todo, desc='msa units', disable=not progress):
            run_unit(target, surrogates, x, y, cfg, run_dir, unit, counter, num_classes)  # as the runner does
        return aggregate(run_dir, metadata)


def _poisoning(target, x, y, batch_size, eps, norm, steps, seed, out: Path, progress) -> dict:
    """The batch-poisoning protocol on the fixed batches (``timm_hpm.eval.run_poisoning``), with the accuracy of the
    untouched members under each bounded k: (untouched members correct on the clean batch - flipped) / untouched."""
    from .eval import ModelView, poison_counts, run_poisoning
    if batch_size < 2 or len(y) < 2:
        return {'ran': False, 'why': 'batches of one image: nobody to poison'}
    if steps < 1:
        return {'ran': False, 'why': 'budget poison_steps=0'}
    if _hpm_dynamic(target):  # as recipes/evaluate.py --protocol poison: the target's gradient and the soft head's
        view = ModelView(target, 'dynamic')
        views = {'dynamic': view, 'soft': ModelView(target, 'soft')}
    else:
        view = ModelView(target, None)
        views = {'model': view}
    rows = run_poisoning(view, views, x, y, batch_size, eps, out, norm=norm, steps=steps, seed=seed,
                         progress=progress)
    sizes = [len(c) for c in torch.arange(len(y)).split(batch_size) if len(c) >= 2]
    untouched_acc = {}
    for r in rows:
        if not r['bounded']:
            continue
        untouched = sum(s - r['k'] for s in sizes if r['k'] in poison_counts(s))
        if untouched:
            untouched_acc[str(r['k'])] = (r['victims'] - r['flipped']) / untouched
    worst_k = min(untouched_acc, key=untouched_acc.get) if untouched_acc else None
    return {'ran': True, 'steps': steps, 'gradient_views': list(views), 'rows': rows,
            'untouched_acc': untouched_acc, 'worst_k': None if worst_k is None else int(worst_k),
            'worst_untouched_acc': untouched_acc.get(worst_k) if worst_k else None,
            'max_flipped_fraction': max((r['flipped_fraction'] for r in rows if r['bounded']), default=0.0)}


# ------------------------------------------------------------------------------------------------------- reporting

def _changes(detection: dict) -> str:
    tests = detection['tests']
    return '; '.join(f"{name}: {100 * t['fraction_changed']:.1f}% of predictions changed, max logit change "
                     f"{t['max_logit_change']:.3g}" for name, t in tests.items() if name in detection['reasons'])


def _why(detection: dict, dependent: bool) -> str:
    n, b = detection['n_images'], detection['batch_size']
    if not dependent:
        return (f"the batch-dependence test on {n} clean images (batches of {b}; re-batched at "
                f"{', '.join(k.split('_')[-1] for k in detection['tests'] if k.startswith('batch_size_'))}, "
                f'permuted, class-sorted, other members changed) found no logit change beyond float tolerance '
                f"({detection['tolerance']:.2g}): the model is batch-independent, so standard AutoAttack is valid")
    return (f'the batch-dependence test on {n} clean images (batches of {b}) measured changes: {_changes(detection)}. '
            'A batch-dependent model is attacked on fixed batches scored whole (MSA), in the natural batch orders, '
            'and by poisoning other members of its batch; standard AutoAttack, which re-batches images as if the '
            'others did not move, is not a valid figure for it')


def _reduced(result: dict, budget: dict, batchings, poisoning) -> List[str]:
    from .robustbench import reduced_budget
    out = list(reduced_budget(result))
    if batchings is not None:
        missing = [b for b in BATCHINGS if b not in batchings]
        if missing:
            out.append(f'batchings left out: {missing}')
    if poisoning is not None and poisoning.get('ran') and budget['poison_steps'] < FULL_BUDGET['poison_steps']:
        out.append(f"poisoning steps {budget['poison_steps']} (full: {FULL_BUDGET['poison_steps']})")
    return out


def _pct(v) -> Optional[str]:
    return None if v is None else f'{100 * v:.2f}'


def _model_info(result: dict, report: dict, model: nn.Module) -> dict:
    """RobustBench's entry (:func:`timm_hpm.robustbench.model_info`, whose ``autoattack_acc`` already holds the
    worst case of the evaluation), its footnote saying which protocol ran and why; for a batch-dependent model the
    worst case includes poisoning, and a model that is not this package's HPM model is not credited to its paper."""
    from .robustbench import model_info
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    hpm = is_hpm_model(getattr(model, 'module', model))
    if hpm:
        credit = dict(paper=cfg.get('paper_ids') or 'arXiv:2606.01746')
    else:
        credit = dict(paper=cfg.get('paper_ids') or cfg.get('origin_url') or 'unknown',
                      authors='unknown (evaluated with timm-hpm)', venue='unknown')
    info = model_info(result, report['model'], **credit)
    n, b = report['n_examples'], report['batch_size']
    if report['protocol'] == 'autoattack':
        footnote = (f"Protocol: standard AutoAttack on fixed batches of {b}, the first {n} test examples "
                    f"(timm_hpm.benchmark), because {report['why']}")
    else:
        worst = report['worst_case']
        info['autoattack_acc'] = _pct(worst['acc'])  # the worst case: MSA's worst batching or poisoning, if lower
        poison = report['poisoning']
        if poison.get('ran') and poison.get('worst_untouched_acc') is not None:
            poison_text = (f"bounded poisoning (k of {b} members perturbed within eps, {poison['steps']} steps): "
                           f"at most {100 * poison['max_flipped_fraction']:.1f}% of the untouched correct members "
                           f"flipped, their accuracy at worst {_pct(poison['worst_untouched_acc'])}%")
        else:
            poison_text = f"poisoning not run ({poison.get('why')})"
        natural = report.get('worst_natural_order')
        natural_text = (f"; natural orders {[k for k in result['batchings'] if k != 'default']}: worst "
                        f"{_pct(natural['acc'])}% ({natural['batching']})" if natural else '')
        tests = report['batch_dependence']['tests']
        changes = ', '.join(f"{k} {tests[k]['max_logit_change']:.2g}" for k in report['batch_dependence']['reasons'])
        footnote = (f"Protocol: batch-dependent model (timm_hpm.benchmark's test on "
                    f"{report['batch_dependence']['n_images']} clean images: largest logit changes {changes}), so not "
                    f"standard AutoAttack. autoattack_acc is "
                    f"the worst case measured ({worst['from']}): the Mixed Surrogate Attack (AutoAttack on the target "
                    f"and whole-batch APGD through {', '.join(report['attacked_through'])}, every candidate batch "
                    f"scored whole) on fixed batches of {b}: {_pct(result['batchings']['default']['realised_acc'])}%"
                    f"{natural_text}; {poison_text}. AutoAttack's own printout: "
                    f"{_pct(report.get('autoattack_own_acc'))}%, its images re-scored on the fixed batches: {_pct(report.get('autoattack_acc'))}%; per-sample "
                    f"union of every MSA candidate (a bound, not one batch): {_pct(report.get('msa_union_acc'))}%. "
                    f"The first {n} test examples")
        info['msa_acc'] = _pct(result.get('msa_acc'))
        info['msa_union_acc'] = _pct(result.get('msa_union_acc'))
        info['autoattack_target_acc'] = _pct(result.get('autoattack_acc'))
    if report['reduced_budget']:
        footnote += '; reduced attack budget: ' + ', '.join(report['reduced_budget'])
    info['footnote'] = footnote + '.'
    info['unreliable'] = bool(report['reduced_budget'])
    info['protocol'] = report['protocol']
    return info


def format_report(report: dict) -> str:
    """The report's tables (benchmark.md)."""
    def pct(v):
        return '-' if v is None else f'{100 * v:.1f}%'
    d = report['batch_dependence']
    lines = [f"# Benchmark: {report['model']}", '',
             f"{report['dataset']}, first {report['n_examples']} test images, {report['threat_model']} eps "
             f"{report['eps']:.4g}, fixed batches of {report['batch_size']}.", '',
             f"Batch-dependence test ({d['n_images']} clean images, reference: batches of {d['batch_size']} in "
             f"order; float tolerance {d['tolerance']:.2g}): **{d['verdict']}**.", '',
             markdown_table(['test', 'predictions changed', 'max logit change', 'beyond tolerance'],
                            [[f"{k}: {t['description']}", f"{100 * t['fraction_changed']:.1f}% ({t['changed']} / "
                              f"{t['compared']})", f"{t['max_logit_change']:.3g}", 'yes' if t['dependent'] else 'no']
                             for k, t in d['tests'].items()], 'lrrl'), '',
             f"Protocol: **{report['protocol']}**, because {report['why']}.", '']
    result = report['evaluation']
    rows = [[b, pct(v['clean_acc']), pct(v.get('autoattack_own_acc')), pct(v.get('autoattack_acc')),
             pct(v['realised_acc']), pct(v['union_acc'])] for b, v in result['batchings'].items()]
    lines += [markdown_table(['batching', 'clean', "AutoAttack's own printout", 'AutoAttack (fixed batches)',
                              'realised worst case' if report['protocol'] != 'autoattack' else 'robust',
                              'per-sample union'], rows, 'lrrrrr'), '']
    poison = report.get('poisoning')
    if poison and poison.get('ran'):
        from .eval import poisoning_table
        lines += [poisoning_table(poison['rows'], report['threat_model']), '',
                  'Accuracy of the untouched members under bounded poisoning: '
                  + ', '.join(f"k={k}: {pct(v)}" for k, v in poison['untouched_acc'].items()), '']
    elif poison:
        lines += [f"Poisoning not run: {poison.get('why')}.", '']
    lines.append(f"**Clean {pct(report['clean_acc'])}, robust {pct(report['robust_acc'])}** (worst case: "
                 f"{report['worst_case']['from']}).")
    if report.get('reduced_budget'):
        lines.append(f"Reduced attack budget: {', '.join(report['reduced_budget'])} (unreliable: below full strength).")
    return '\n'.join(lines)
