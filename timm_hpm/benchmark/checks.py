"""What :func:`timm_hpm.benchmark` takes: the threat model and radius, the attack budget, the batchings, the model
(as a [0, 1]-image module) and the images; the constants they are checked against."""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
import torch.nn as nn

from ..attacks import normalized_view, parse_eps
from ..eval.msa_config import MSAConfig
from ..eval.poison import PoisonConfig
from ..models import get_hpm_head, is_hpm_model

__all__ = ['THREAT_MODELS', 'BATCHINGS', 'DEFAULT_EPS', 'MSA_BUDGET_FIELDS', 'FULL_BUDGET', 'check_threat',
           'check_budget', 'check_batchings', 'device_of', 'unit_range', 'default_model_name', 'load_images', 'hpm_dynamic']

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


def check_threat(threat_model, eps, dataset) -> Tuple[str, float]:
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


def check_budget(budget) -> dict:
    budget = dict(budget or {})
    unknown = sorted(set(budget) - set(FULL_BUDGET))
    if unknown:
        raise ValueError(f'unknown budget keys {unknown}; choose from {sorted(FULL_BUDGET)}')
    for key, value in budget.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f'budget[{key!r}] must be an integer (or None: full strength), got {value!r}')
    return {**FULL_BUDGET, **budget}


def check_batchings(batchings) -> List[str]:
    if isinstance(batchings, str) or not batchings:
        raise ValueError(f"batchings must be a non-empty list of names from {BATCHINGS}, got {batchings!r}")
    unknown = [b for b in batchings if b not in BATCHINGS]
    if unknown or batchings[0] != 'default' or len(set(batchings)) != len(batchings):
        raise ValueError(f"batchings must start with 'default' (the fixed batches) and name each of {BATCHINGS} at "
                         f'most once, got {list(batchings)}')
    return list(batchings)


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def unit_range(model: nn.Module) -> nn.Module:
    """``model`` taking [0, 1] images: a timm model (a ``pretrained_cfg``) with its normalisation inside (identity for
    the CIFAR-style and Fashion-MNIST families), any other module as it is."""
    return normalized_view(model) if getattr(model, 'pretrained_cfg', None) else model


def default_model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('architecture'):
        return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else cfg['architecture']
    return type(model).__name__


def load_images(dataset, n: int, data_dir, model: nn.Module, seed: int):
    """The first ``n`` test images of ``dataset`` (as recipes/evaluate.py loads them), or of the given tensors."""
    from ..eval.batch_dependence import check_clean_images
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
    from ..data import DATASETS, load_eval_tensors
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose from {DATASETS} or pass (images, labels) tensors')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    num_classes = getattr(model, 'num_classes', None) or cfg.get('num_classes') or 10
    x, y = load_eval_tensors(dataset, n, data_dir, cfg or None, num_classes=num_classes,
                             image_size=cfg.get('input_size', (3, 32, 32)), seed=seed)
    return x, y, dataset


def hpm_dynamic(target: nn.Module) -> bool:
    from ..eval.checks import unwrap
    raw = unwrap(target)
    return is_hpm_model(raw) and raw.hpm_head is not None and get_hpm_head(raw).mode == 'dynamic'
