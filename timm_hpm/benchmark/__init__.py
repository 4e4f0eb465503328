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
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..runfiles import run_lock, write_text_atomic
from .checks import (BATCHINGS, DEFAULT_EPS, FULL_BUDGET, MSA_BUDGET_FIELDS, THREAT_MODELS, check_batchings,
                     check_budget, check_threat, device_of, load_images, default_model_name, unit_range)
from .measure import measure
from .report import format_report

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
    threat_model, eps, budget, batchings = _check_arguments(model, dataset, threat_model, eps, budget, batchings,
                                                            n_examples, batch_size, detection_examples)
    target, name, device, x, y, dataset_name = _load(model, model_name, device, dataset, n_examples, data_dir, seed)
    with _run_folder(out) as folder:
        report = measure(target, model, x, y, name, dataset_name, threat_model, eps, batch_size, surrogates, budget,
                         batchings, detection_examples, seed, progress, folder, device, dict(metadata or {}))
        report['wall_seconds'] = round(time.time() - start, 1)
        if out is not None:
            _write_results(folder, report)
    return BenchmarkResult(report['clean_acc'], report['robust_acc'], report)


def _check_arguments(model: nn.Module, dataset, threat_model: str, eps, budget, batchings: Sequence[str],
                     n_examples: int, batch_size: int, detection_examples: int):
    """Every argument checked before a model runs or an image is loaded (a ValueError that says what is wrong);
    returns ``threat_model, eps, budget, batchings`` as checked (the radius parsed, the budget completed)."""
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
    return threat_model, eps, budget, batchings


def _load(model: nn.Module, model_name: Optional[str], device: Optional[Union[str, torch.device]],
          dataset: Union[str, Tuple[torch.Tensor, torch.Tensor]], n_examples: int,
          data_dir: Optional[Union[str, Path]], seed: int):
    """The model as a [0, 1]-image module on ``device`` (default: where its parameters are), checked ready for
    evaluation, and the images on that device, checked against its logits (a ValueError that says what is wrong);
    returns ``target, name, device, x, y, dataset_name``."""
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
    return target, name, device, x, y, dataset_name


@contextlib.contextmanager
def _run_folder(out: Optional[Union[str, Path]]) -> Iterator[Path]:
    """The run's folder, locked while the benchmark runs in it: ``out`` (refused when it holds a finished benchmark:
    one is never overwritten), or a temporary folder removed afterwards."""
    with contextlib.ExitStack() as stack:
        if out is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='timm_hpm_benchmark_')))
        else:
            folder = Path(out)
            if (folder / 'benchmark.json').exists():
                raise FileExistsError(f'{folder} holds a finished benchmark (benchmark.json); it is never overwritten: '
                                      'pass a new out folder.')
        stack.enter_context(run_lock(folder, 'out'))
        yield folder


def _write_results(folder: Path, report: dict) -> None:
    """The files of a run into ``out``: model_info.json, benchmark.md, then benchmark.json (the report), which marks
    the benchmark finished and is therefore written last."""
    write_text_atomic(folder / 'model_info.json', json.dumps(report['model_info'], indent=2))
    write_text_atomic(folder / 'benchmark.md', format_report(report) + '\n')
    write_text_atomic(folder / 'benchmark.json', json.dumps(report, indent=2))  # last: marks it finished
