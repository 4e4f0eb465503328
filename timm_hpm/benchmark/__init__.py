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
  statistics, with the same MSA code (:func:`timm_hpm.eval.attack_batch`) in the same resumable run folder. Its
  robust accuracy is the worst case measured: the lowest realised MSA batching or the lowest accuracy of the
  untouched members under bounded poisoning.

The result is ``(clean_accuracy, robust_accuracy)`` with the full report as ``.report``; with ``out`` it also
writes ``benchmark.json`` (the report), ``benchmark.md`` (its tables) and ``model_info.json`` (RobustBench's entry:
:func:`timm_hpm.robustbench.model_info`, whose ``autoattack_acc`` holds the worst case, with a footnote that says
which protocol ran and why). The run resumes after a kill (the runner's and the poisoning's stores of finished
batches) and a finished benchmark is never overwritten.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..eval.msa_config import MSAConfig
from ..runfiles import run_lock, write_text_atomic
from .checks import (BATCHINGS, DEFAULT_EPS, FULL_BUDGET, MSA_BUDGET_FIELDS, THREAT_MODELS, check_batchings,
                     check_budget, check_threat, device_of, hpm_dynamic, load_images, default_model_name, unit_range)
from .protocols import msa_any_model, poisoning_protocol, surrogate_views
from .report import format_report, model_info_entry, reduced, why

__all__ = ['benchmark', 'BenchmarkResult', 'format_report', 'BATCHINGS', 'THREAT_MODELS', 'FULL_BUDGET', 'DEFAULT_EPS',
           'MSA_BUDGET_FIELDS']


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
    threat_model, eps = check_threat(threat_model, eps, dataset)
    budget = check_budget(budget)
    batchings = check_batchings(batchings)
    for name, value, low in (('n_examples', n_examples, 1), ('batch_size', batch_size, 1),
                             ('detection_examples', detection_examples, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    if not isinstance(model, nn.Module):
        raise ValueError(f'model must be a torch.nn.Module (a timm model or any module taking [0, 1] images), got '
                         f'{type(model).__name__}')
    device = torch.device(device) if device is not None else device_of(model)
    target = unit_range(model).to(device)
    from ..eval import check_eval_ready
    check_eval_ready(target)
    name = model_name or default_model_name(model)
    x, y, dataset_name = load_images(dataset, n_examples, data_dir, model, seed)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        from ..eval.batch_dependence import check_logits
        num_classes = check_logits(target(x[:2]), min(2, len(y)), f'{name}').shape[1]
    from ..eval.batch_dependence import check_clean_images
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


def _run(target, model, x, y, name, dataset_name, threat_model, eps, batch_size, surrogates, budget, batchings,
         detection_examples, seed, progress, folder: Path, device, metadata) -> dict:
    import timm_hpm
    from ..eval import autoattack_backend, hpm_mode
    from ..eval.batch_dependence import batch_dependence
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
        from ..eval import evaluate
        result = evaluate(target, x, y, MSAConfig(**msa_cfg), folder / 'attack', protocol='autoattack',
                          batch_size=batch_size, batchings=['default'], progress=progress, metadata=meta)
        report.update(protocol='autoattack', why=why(detection, False), clean_acc=result['clean_acc'],
                      robust_acc=result['autoattack_acc'],
                      worst_case={'acc': result['autoattack_acc'], 'from': 'AutoAttack (standard), fixed batches'},
                      evaluation=result)
        report['reduced_budget'] = reduced(result, budget, None, None)
        report['model_info'] = model_info_entry(result, report, model)
        return report
    report.update(protocol='msa+poisoning', why=why(detection, True))
    report.update(_batch_dependent(target, x, y, eps, threat_model, batch_size, surrogates, budget, batchings, seed,
                                   progress, folder, device, meta, msa_cfg))
    report['reduced_budget'] = reduced(report['evaluation'], budget, batchings, report['poisoning'])
    report['model_info'] = model_info_entry(report['evaluation'], report, model)
    return report


def _batch_dependent(target, x, y, eps, threat_model, batch_size, surrogates, budget, batchings, seed, progress,
                     folder: Path, device, meta: dict, msa_cfg: dict) -> dict:
    """MSA in every batching and the poisoning protocol; the worst case of them is the robust accuracy."""
    views, surrogate_flags = surrogate_views(target, surrogates, x, y, batch_size, seed, device)
    if hpm_dynamic(target):
        from ..eval import evaluate
        cfg_msa = MSAConfig(**msa_cfg, surrogate_models=tuple(views))
        result = evaluate(target, x, y, cfg_msa, folder / 'attack', protocol='msa', batch_size=batch_size,
                          batchings=batchings, progress=progress, metadata=meta, surrogate_models=views)
        attacked_through = ['fc', 'static', 'soft', 'dynamic (the target)'] + list(views)
    else:
        views = dict(views)
        cfg_msa = MSAConfig(**msa_cfg, surrogates=(), surrogate_models=tuple(views) + ('target',))
        result = msa_any_model(target, views, surrogate_flags, x, y, cfg_msa, folder / 'attack', batch_size,
                               batchings, progress, meta)
        attacked_through = list(views) + ['the target itself']
    poisoning = poisoning_protocol(target, x, y, batch_size, eps, threat_model, budget['poison_steps'], seed,
                                   folder / 'poison', progress)
    per_batching = result['batchings']
    natural = {b: v['realised_acc'] for b, v in per_batching.items() if b != 'default'}
    candidates = [(v['realised_acc'], f'MSA, realised batches ({b} batching)') for b, v in per_batching.items()]
    if poisoning.get('worst_untouched_acc') is not None:
        candidates.append((poisoning['worst_untouched_acc'], f"bounded poisoning ({poisoning['worst_k']} of "
                                                             f'{batch_size} members poisoned; accuracy of the '
                                                             'untouched members)'))
    worst_acc, worst_from = min(candidates, key=lambda c: c[0])
    return dict(
        clean_acc=result['clean_acc'], robust_acc=worst_acc,
        worst_case={'acc': worst_acc, 'from': worst_from},
        msa_acc=result['msa_acc'], msa_union_acc=result['msa_union_acc'],
        autoattack_acc=result.get('autoattack_acc'), autoattack_own_acc=result.get('autoattack_own_acc'),
        worst_natural_order=({'batching': min(natural, key=natural.get), 'acc': min(natural.values())}
                             if natural else None),
        attacked_through=attacked_through, surrogates={k: {'batch_dependent': v} for k, v in surrogate_flags.items()},
        poisoning=poisoning, evaluation=result)


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
