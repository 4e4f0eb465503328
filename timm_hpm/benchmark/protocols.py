"""The attacks :func:`timm_hpm.benchmark` runs on a batch-dependent model: MSA through its surrogate views on fixed
batches (any model without an HPM head; an HPM model goes through :func:`timm_hpm.eval.evaluate`) and the
batch-poisoning protocol."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from ..layers.batch_stats_norm import NormStatsView, batch_stats_layers, norm_stats
from ..runfiles import run_lock
from .checks import hpm_dynamic, unit_range

__all__ = ['surrogate_views', 'msa_any_model', 'poisoning_protocol']

_logger = logging.getLogger(__name__)


def surrogate_views(target, surrogates, x, y, batch_size, seed, device):
    """The extra surrogate models (name -> [0, 1]-image view) and whether each is batch-dependent (measured)."""
    from ..eval.batch_dependence import batch_dependence
    from ..eval.checks import check_eval_ready
    views: Dict[str, nn.Module] = {}
    if surrogates is not None and not isinstance(surrogates, Mapping):
        raise ValueError(f'surrogates must be a dict name -> nn.Module, got {type(surrogates).__name__}')
    for key, module in (surrogates or {}).items():
        if not isinstance(key, str) or not key or '/' in key or key in ('target', 'autoattack', 'combined'):
            raise ValueError(f"surrogate name {key!r}: a non-empty name without '/', other than 'target', "
                             "'autoattack' and 'combined'")
        if not isinstance(module, nn.Module):
            raise ValueError(f'surrogate {key!r} must be an nn.Module, got {type(module).__name__}')
        views[key] = unit_range(module).to(device)
        check_eval_ready(views[key])
    if batch_stats_layers(target) and norm_stats(target) == 'batch' and 'running_stats' not in views:
        views['running_stats'] = NormStatsView(target, 'running')  # the same weights with running statistics
    m = min(64, len(y))
    flags = {k: batch_dependence(v, x[:m], y[:m], batch_size=min(batch_size, m), seed=seed)['batch_dependent']
             for k, v in views.items()}
    return views, flags


def msa_any_model(model, views, flags, x, y, cfg, run_dir: Path, batch_size, batchings, progress, metadata):
    """MSA on any batch-dependent model (no HPM head): :func:`timm_hpm.eval.attack_batch` on every fixed batch of
    every batching, through ``views`` then the target itself, each unit written as the runner writes it (resumable,
    the folder's settings and fingerprints checked), then :func:`timm_hpm.eval.aggregate`."""
    from ..eval import ModelView, PassCounter, aggregate, make_batchings
    from ..eval.run_folder import check_fingerprint, check_settings
    from ..eval.runner import run_unit
    from ..eval.unit_store import missing_units
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, 'out'):
        settings = check_settings(run_dir, 'msa', batch_size, batchings, len(y), False, cfg, 0)
        check_fingerprint(run_dir, model, x, y, write=True, settings=settings)
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


def poisoning_protocol(target, x, y, batch_size, eps, norm, steps, seed, out: Path, progress) -> dict:
    """The batch-poisoning protocol on the fixed batches (``timm_hpm.eval.run_poisoning``), with the accuracy of the
    untouched members under each bounded k: (untouched members correct on the clean batch - flipped) / untouched."""
    from ..eval import ModelView, poison_counts, run_poisoning
    if batch_size < 2 or len(y) < 2:
        return {'ran': False, 'why': 'batches of one image: nobody to poison'}
    if steps < 1:
        return {'ran': False, 'why': 'budget poison_steps=0'}
    if hpm_dynamic(target):  # as recipes/evaluate.py --protocol poison: the target's gradient and the soft head's
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
