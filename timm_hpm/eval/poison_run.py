"""The poisoning protocol over a dataset's fixed batches (:func:`run_poisoning`: resumable, one line per finished
batch in ``<out>/poison/batches.jsonl`` under its header) and its table (:func:`poisoning_table`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence

import torch
from tqdm import tqdm

from ..attacks import check_count, check_images
from ..report import markdown_table
from .poison_config import CLI_FLAGS, PoisonConfig, _unbounded_eps, poison_counts
from .poison_state import _check_views
from .run_folder import data_fingerprint, model_fingerprint
from .run_header import make_header, read_run_settings
from .settings_schema import comparable
from .unit_store import POISON_FILE, read_poison_batches, write_header, write_poison_batch

__all__ = ['run_poisoning', 'poisoning_table']


def run_poisoning(target: Callable, gradient_views: Dict[str, Callable], x: torch.Tensor, y: torch.Tensor,
                  batch_size: int, eps: float, out: Path, norm: str = 'Linf', steps: int = 100, seed: int = 0,
                  progress: bool = True, **options) -> List[dict]:
    """The protocol on the fixed batches of ``batch_size`` (in order) of ``x``, for every k of
    :func:`poison_counts` and for ``eps`` and unbounded perturbations. One line per finished batch in
    ``out/batches.jsonl`` (:mod:`timm_hpm.eval.unit_store`: whole, fsync-ed): a killed run resumes, skipping
    finished batches; settings that differ from the folder's (every attack setting, model weights or images) are
    refused. Returns the aggregated records ``{k, eps,
    bounded, flipped_fraction, flipped, victims, batches}``, with ``feature_bound`` (the sum over the batches) where
    every batch computed it.

    Every setting is checked before the folder is touched (:class:`PoisonConfig`: eps, norm, steps >= 1, seed and
    the strength ``options``; ``batch_size`` >= 2; at least one gradient view; a non-empty batch of images in [0, 1]
    with its labels): a ValueError naming the setting, never a table of 0% flipped from an attack that did not
    run."""
    from .poison import poison_batch  # imported here: timm_hpm.eval.poison re-exports this module's functions
    cfg = PoisonConfig(eps=eps, norm=norm, steps=steps, seed=seed, **options)
    check_count(batch_size, 'batch_size', 2, CLI_FLAGS['batch_size'],
                what='poisoning needs batches of at least 2 images: one to poison, one to flip')
    _check_views(gradient_views)
    check_images(x, y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {'batch_size': batch_size, 'eps': eps, 'norm': norm, 'steps': steps, 'seed': seed,
                'n_examples': x.shape[0], 'views': list(gradient_views), 'attack_version': 2,
                'attack': cfg.strength(),
                'model_sha256': model_fingerprint(getattr(target, 'model', target)),
                'data_sha256': data_fingerprint(x, y)}
    _check_settings(out, settings)
    strength = {k: v for k, v in cfg.to_dict().items() if k not in ('eps', 'norm', 'steps', 'seed')}
    radii = [(eps, True), (_unbounded_eps(x, norm), False)]
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    units, done = [], read_poison_batches(out)
    for index, (xb, yb) in enumerate(tqdm(batches, desc='poisoning batches', disable=not progress)):
        if index in done:
            units.append(done[index])
            continue
        if xb.shape[0] < 2:
            continue  # a last batch of one image has nobody to poison
        records = [dict(poison_batch(target, gradient_views, xb, yb, k, radius, norm, steps,
                                     seed=seed * 1_000_003 + index * 101 + k, **strength), eps=radius,
                        bounded=bounded)
                   for radius, bounded in radii for k in poison_counts(xb.shape[0])]
        unit = {'index': index, 'size': xb.shape[0], 'records': records}
        write_poison_batch(out, unit)
        units.append(unit)
    return _aggregate(units, batch_size)


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a folder of a poisoning run with other settings (any schema version this code reads); a new run
    writes its settings in the header of its batches file (:mod:`timm_hpm.eval.run_header`; they hold the model's
    and the images' fingerprints)."""
    stored = read_run_settings(out)
    if stored is not None:
        found = comparable(stored)
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            if 'attack' in changed and isinstance(found.get('attack'), dict):
                changed += sorted(f'attack.{k}' for k in set(found['attack']) | set(settings['attack'])
                                  if found['attack'].get(k) != settings['attack'].get(k))
            raise ValueError(f'{out} holds a poisoning run with other settings ({", ".join(changed)}); use '
                             'another --out folder (its results are never overwritten).')
    else:
        write_header(out / POISON_FILE, make_header(settings))


def _aggregate(units: Iterable[dict], batch_size: int) -> List[dict]:
    totals: Dict[tuple, dict] = {}
    for unit in units:
        for r in unit['records']:
            key = (r['k'], r['eps'], r['bounded'])
            t = totals.setdefault(key, {'k': r['k'], 'batch_size': batch_size, 'eps': r['eps'], 'bounded': r['bounded'],
                                        'flipped': 0, 'victims': 0, 'batches': 0, 'feature_bound': 0})
            t['flipped'] += r['flipped']
            t['victims'] += r['victims']
            t['batches'] += 1
            t.setdefault('_bounds', 0)
            if 'feature_bound' in r:
                t['_bounds'] += 1
            if t['feature_bound'] is not None:
                t['feature_bound'] = None if r['victims'] and 'feature_bound' not in r else \
                    t['feature_bound'] + r.get('feature_bound', 0)
    rows = sorted(totals.values(), key=lambda t: (not t['bounded'], t['k']))
    for t in rows:
        t['flipped_fraction'] = t['flipped'] / t['victims'] if t['victims'] else 0.0
        if t.pop('_bounds') == 0 or t['feature_bound'] is None:
            t.pop('feature_bound')
    return rows


def poisoning_table(rows: Sequence[dict], norm: str = 'Linf') -> str:
    """The Markdown table of :func:`run_poisoning`'s records; with the feature-space bound where it was computed
    (k free feature vectors with no image behind them: what the poisoned members could do at most)."""
    bound = any('feature_bound' in r for r in rows)
    body = [[f"{r['k']} of {r['batch_size']}", f"{r['eps']:.4g}" if r['bounded'] else 'unbounded ([0, 1])',
             f"{100 * r['flipped_fraction']:.1f}%", f"{r['flipped']} / {r['victims']}"]
            + ([f"{r['feature_bound']} / {r['victims']}" if 'feature_bound' in r else '-'] if bound else [])
            for r in rows]
    return markdown_table(['poisoned members (k of B)', f'{norm} eps of the poisoned', 'untouched flipped',
                           'flipped / untouched correct']
                          + (['feature-space bound (no image behind the k)'] if bound else []), body)
