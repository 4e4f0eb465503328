"""Batch-aware, resumable, shardable evaluation: MSA for HPM models, AutoAttack for any model.

Work is cut into units (one fixed batch of one batching). Each unit's result is written as its own JSON
file in ``<run_dir>/units/`` (atomically: write, then rename), so a killed run resumes without recomputing finished
units and the processes of one run share units round-robin; an unreadable unit file is recomputed with a warning.
The final result is aggregated from the unit files alone, so it does not depend on how many processes ran or how
often the run was interrupted. The main process holds ``<run_dir>/run.lock`` for the run: a second, independent
run into the folder fails at once, naming the holder.

A run on more examples or batchings can start from the finished units of other runs (``extend_from``): a unit is
reused when it covers exactly the same examples in the same batching with the same settings, model and images (both
fingerprinted in ``<run_dir>/fingerprint.json``), which makes the result identical to a run from scratch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks import check_images
from ..models._hpm import is_hpm_model
from ..runfiles import FolderInUse, run_lock, write_atomic, write_text_atomic
from .msa import BATCH_DEPENDENT_MODES, MSAConfig, ModelView, PassCounter, attack_batch, hpm_views

__all__ = ['BATCHINGS', 'batch_order', 'make_batchings', 'evaluate', 'aggregate', 'format_table', 'check_eval_ready',
           'sanity_checks', 'model_fingerprint', 'data_fingerprint', 'FolderInUse', 'run_lock', 'hpm_mode',
           'protocol_warnings']

_logger = logging.getLogger(__name__)

#: The batchings an evaluation can score. Appended to, never reordered: a unit's attack seed uses the position.
BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')


def batch_order(name: str, n: int, seed: int, labels: Optional[torch.Tensor] = None) -> List[int]:
    """The order in which a batching visits the first ``n`` examples (before it is cut into batches).

    ``class_sorted`` is the order a class-folder dataset yields (timm's and torchvision's folder datasets sort by
    class): label order, stable within a class, so a batch holds only a few classes."""
    if name in ('default', 'single'):
        return list(range(n))
    if name == 'shuffled':
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    if name == 'class_sorted':
        if labels is None or len(labels) != n:
            raise ValueError(f"the 'class_sorted' batching needs the {n} labels")
        return torch.sort(labels.detach().cpu(), stable=True).indices.tolist()
    raise ValueError(f'unknown batching {name!r}; choose from {BATCHINGS}')


def make_batchings(n: int, batch_size: int, names: Sequence[str], seed: int,
                   labels: Optional[torch.Tensor] = None) -> Dict[str, List[List[int]]]:
    """Fixed batchings of the first ``n`` examples, each its order cut into consecutive batches of ``batch_size``
    (``single``: of 1), the last one smaller, nothing dropped (as timm's ``validate.py`` batches a loader):
    ``default`` (the dataset's order), ``single``, ``shuffled`` (a seeded permutation) and ``class_sorted`` (label
    order, stable within a class; needs ``labels``)."""
    out = {}
    for name in names:
        order = batch_order(name, n, seed, labels)
        size = 1 if name == 'single' else batch_size
        out[name] = [order[i:i + size] for i in range(0, n, size)]
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, 'module', model)


def check_eval_ready(model: nn.Module) -> None:
    """Refuse models that would give meaningless figures, before any attack runs."""
    model = _unwrap(model)
    if model.training:
        raise ValueError('the model is in training mode (batch norm statistics would change under attack); '
                         'call model.eval() first.')
    if is_hpm_model(model) and model.hpm_head is not None and not bool(model.hpm_head.prototypes_initialized):
        raise ValueError('the HPM head\'s dataset prototypes were never initialised from data (they still equal '
                         'the FC weights); fine-tune or call model.hpm_head.init_prototypes_(...) first.')


def _unit_path(run_dir: Path, batching: str, index: int) -> Path:
    return run_dir / 'units' / f'{batching}_{index:06d}.json'


def _write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))


#: What every unit file holds (the aggregate reads all of it).
_UNIT_KEYS = ('clean', 'realised', 'union', 'candidates', 'passes', 'seconds', 'indices')


def _load_unit(path: Path, indices: Optional[Sequence[int]] = None) -> Optional[dict]:
    """A finished unit's result; ``None`` when there is none, or (with a warning) when its file cannot be read or
    does not hold the batch ``indices`` it should: such a unit is recomputed, never trusted or fatal."""
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        problem = None if isinstance(unit, dict) and all(k in unit for k in _UNIT_KEYS) else 'fields missing'
        if problem is None and indices is not None and list(unit['indices']) != list(indices):
            problem = 'it holds another batch'
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        problem = f'{type(error).__name__}: {error}'
    if problem is not None:
        _logger.warning('unit file %s is unreadable (%s); recomputing that batch', path, problem)
        return None
    return unit


def _stage_order(settings: dict, stages) -> List[str]:
    """MSA's stages in the order they run: AutoAttack on the target, then the surrogates as configured."""
    ran = ['autoattack'] + list(settings.get('msa', {}).get('surrogates', []))
    return [s for s in ran if s in stages] + sorted(s for s in stages if s not in ran)


def hpm_mode(model: nn.Module) -> Optional[str]:
    """The mode of the model's HPM head (what an evaluation measures), ``None`` for a plain model."""
    model = _unwrap(model)
    head = model.hpm_head if is_hpm_model(model) else None
    return None if head is None else head.mode


def protocol_warnings(model: nn.Module, protocol: str) -> List[str]:
    """Why a protocol's figure would not be a robustness figure for this model."""
    mode = hpm_mode(model)
    if protocol == 'autoattack' and mode in BATCH_DEPENDENT_MODES:
        return [f"AutoAttack on a batch-dependent HPM head (mode {mode!r}) is not a valid robustness figure for that "
                "head: its images are scored on fixed batches, but each attack treats the other images of the batch "
                "as if they did not move, so the figure can overstate the head's robustness. Use protocol 'msa' for "
                "this head, or evaluate a batch-independent mode ('static' or 'fc')."]
    return []


def _hash_tensor(h, t: torch.Tensor) -> None:
    shape = t.shape
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f'{t.dtype}{tuple(shape)}'.encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b'')


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what decides a model's outputs: every parameter and buffer, and the module tree with its
    options (``repr``: e.g. the HPM head's mode, tau and alpha)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # the same fingerprint whatever the number of processes
    h = hashlib.sha256(repr(model).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of the evaluated images and labels."""
    h = hashlib.sha256()
    _hash_tensor(h, x)
    _hash_tensor(h, y.long())
    return h.hexdigest()


def _check_fingerprint(run_dir: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, write: bool) -> dict:
    fingerprint = dict(model=model_fingerprint(model), data=data_fingerprint(x, y))
    path = run_dir / 'fingerprint.json'
    if path.exists():
        previous = json.loads(path.read_text())
        for key, what in (('model', 'another model (other weights or head options)'), ('data', 'other images')):
            if previous.get(key) != fingerprint[key]:
                raise ValueError(f'{run_dir} holds a run of {what}; use a new folder (--out) to evaluate this one.')
    elif write:
        _write_json_atomic(path, fingerprint)
    return fingerprint


def _reusable_units(sources: Sequence[Path], settings: dict, model_fp: str, x: torch.Tensor,
                    y: torch.Tensor) -> Dict[tuple, Path]:
    """``(batching, index, tuple(indices)) -> unit file`` of the finished units of other runs that may be reused:
    same settings but for ``n_examples`` and ``batchings``, the same model, and the same images (a smaller run's
    images must equal the first ones of this run; a larger run's units are checked one by one against the
    image hash each unit carries)."""
    found: Dict[tuple, Path] = {}
    for source in sources:
        source = Path(source)
        if not (source / 'settings.json').exists() and (source / 'attack' / 'settings.json').exists():
            source = source / 'attack'  # the recipe's run folder
        if not (source / 'settings.json').exists():
            raise FileNotFoundError(f'{source} is not an evaluation run folder (no settings.json); pass the --out '
                                    'folder of an earlier run.')
        previous = json.loads((source / 'settings.json').read_text())
        differences = sorted(k for k in set(previous) | set(settings)
                             if k not in ('n_examples', 'batchings') and previous.get(k) != settings.get(k))
        if differences:
            raise ValueError(f'cannot extend {source}: its settings differ in {differences}; only n_examples and '
                             'batchings may differ.')
        if not (source / 'fingerprint.json').exists():
            raise ValueError(f'cannot extend {source}: it has no fingerprint.json (it was made by an older version); '
                             'resume it once with this version to write one, or start from scratch.')
        previous_fp = json.loads((source / 'fingerprint.json').read_text())
        if previous_fp.get('model') != model_fp:
            raise ValueError(f'cannot extend {source}: it evaluated another model (other weights or head options).')
        n = previous['n_examples']
        prefix_checked = n <= len(y)
        if prefix_checked and previous_fp.get('data') != data_fingerprint(x[:n], y[:n]):
            raise ValueError(f'cannot extend {source}: its first {n} images differ from these.')
        for f in sorted((source / 'units').glob('*.json')):
            batching, index = f.stem.rsplit('_', 1)
            unit = _load_unit(f)
            if unit is None:
                continue  # computed here instead
            idx = unit['indices']
            if not prefix_checked and (max(idx) >= len(y) or unit.get('data_sha256') !=
                                       data_fingerprint(x[idx], y[idx])):
                continue  # not among these examples, or not provably the same images
            found.setdefault((batching, int(index), tuple(idx)), f)
    return found


def evaluate(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: MSAConfig,
        run_dir: Path,
        protocol: str = 'msa',
        batch_size: int = 128,
        batchings: Sequence[str] = ('default',),
        amp: bool = False,
        save_adversarial: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
        metadata: Optional[dict] = None,
        extend_from: Sequence[Path] = (),
) -> Optional[dict]:
    """Evaluate ``model`` on ``x, y`` (images in [0, 1]); returns the aggregated result on the main process
    (``None`` elsewhere: call :func:`aggregate` after all processes finished, or use the recipe).

    ``extend_from``: run folders of other runs of the same model, settings and images whose finished units are
    copied instead of recomputed (e.g. a 1,000-image run started from a 250-image one, or a run of more
    batchings from a default-only one)."""
    if protocol not in ('msa', 'autoattack'):
        raise ValueError(f"protocol must be 'msa' or 'autoattack', got {protocol!r}")
    check_eval_ready(model)
    num_classes = getattr(_unwrap(model), 'num_classes', None)
    check_images(x, y, num_classes)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if protocol == 'msa' and not is_hpm_model(_unwrap(model)):
        raise ValueError("protocol 'msa' needs an HPM model (its surrogates are views of the HPM head); use "
                         "protocol 'autoattack' for a plain model.")
    for warning in protocol_warnings(model, protocol):
        _logger.warning(warning)
    run_dir = Path(run_dir)
    (run_dir / 'units').mkdir(parents=True, exist_ok=True)
    # The main process holds the folder: a second, independent run fails at once instead of redoing its batches.
    # The other processes of this run share it (the caller starts them together; the recipe checks the lock first).
    with run_lock(run_dir, '--out') if process_index == 0 else contextlib.nullcontext():
        settings = _check_settings(run_dir, protocol, batch_size, batchings, len(y), amp, cfg, process_index)
        fingerprint = _check_fingerprint(run_dir, model, x, y, write=process_index == 0)
        reusable = _reusable_units(extend_from, settings, fingerprint['model'], x, y) if extend_from else {}
        plan = make_batchings(len(y), batch_size, batchings, cfg.seed, labels=y)
        units = [(b, i, idx) for b in batchings for i, idx in enumerate(plan[b])]
        mine = units[process_index::num_processes]  # round-robin: the processes of one run share the work
        todo = [u for u in mine if _load_unit(_unit_path(run_dir, u[0], u[1]), u[2]) is None]
        if len(todo) < len(mine):
            _logger.info('resuming: %d of %d units already done', len(mine) - len(todo), len(mine))
        todo = _copy_reusable(todo, reusable, run_dir, save_adversarial, extend_from)
        _compute_units(todo, model, x, y, cfg, run_dir, protocol, amp, save_adversarial, num_classes, progress)
        if process_index != 0:
            return None
        if any(not _unit_path(run_dir, b, i).exists() for b, i, _ in units):
            return None  # other processes still at work; the recipe aggregates after they finish
        result = aggregate(run_dir, metadata)
    for warning in protocol_warnings(model, protocol):
        if warning not in result.setdefault('warnings', []):
            result['warnings'].append(warning)
    return result


def _check_settings(run_dir: Path, protocol: str, batch_size: int, batchings: Sequence[str], n: int, amp: bool,
                    cfg: MSAConfig, process_index: int) -> dict:
    """The run's settings; a folder that holds a run with other settings is refused, never overwritten."""
    settings = dict(protocol=protocol, batch_size=batch_size, batchings=list(batchings), n_examples=n, amp=amp,
                    msa=cfg.to_dict())
    settings_path = run_dir / 'settings.json'
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(f'{run_dir} holds a run with other settings ({previous}); use a new --out folder or '
                             'the same settings to resume.')
    elif process_index == 0:
        _write_json_atomic(settings_path, settings)
    return settings


def _copy_reusable(todo: list, reusable: Dict[tuple, Path], run_dir: Path, save_adversarial: bool,
                   extend_from: Sequence[Path]) -> list:
    """Copy the finished units of other runs that cover the same batches; returns the units still to compute."""
    left = []
    for batching, index, idx in todo:
        source, dest = reusable.get((batching, index, tuple(idx))), _unit_path(run_dir, batching, index)
        if source is None or (save_adversarial and not source.with_suffix('.safetensors').exists()):
            left.append((batching, index, idx))  # not there, or this run keeps adversarial images and that one did not
            continue
        if save_adversarial:
            adv = source.with_suffix('.safetensors')
            write_atomic(dest.with_suffix('.safetensors'), lambda tmp: shutil.copyfile(adv, tmp))
        write_atomic(dest, lambda tmp: shutil.copyfile(source, tmp))  # the JSON last: its presence marks the unit done
    if len(left) < len(todo):
        _logger.info('reused %d finished units of %s', len(todo) - len(left), ', '.join(str(s) for s in extend_from))
    return left


def _compute_units(todo: list, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig, run_dir: Path,
                   protocol: str, amp: bool, save_adversarial: bool, num_classes: Optional[int],
                   progress: bool) -> None:
    """Attack each unit's batch and write its result file (atomically, the adversarial images first)."""
    counter = PassCounter()
    if protocol == 'msa':
        target, surrogates = hpm_views(model, cfg.surrogates, counter, amp)
    else:
        target, surrogates = ModelView(model, None, counter, amp, batch_dependent=is_hpm_model(_unwrap(model))), {}
    if num_classes is None:
        with torch.no_grad():
            num_classes = target(x[:1]).shape[1]
    for batching, index, idx in tqdm(todo, desc=f'{protocol} units', disable=not progress):
        before = counter.as_dict()
        xb, yb = x[idx], y[idx]
        seed = cfg.seed * 1_000_003 + index * 101 + BATCHINGS.index(batching)
        result = attack_batch(target, surrogates, xb, yb, cfg, seed=seed, num_classes=num_classes)
        x_adv = result.pop('x_adv')
        delta = (x_adv - xb).flatten(1)
        norm = delta.abs().amax(1) if cfg.norm == 'Linf' else delta.norm(dim=1)
        if float(norm.max()) > cfg.eps * (1 + 1e-4) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f'an adversarial image left the threat model (max {cfg.norm} {float(norm.max())}); '
                               'this is a bug, please report it.')
        after = counter.as_dict()
        result['passes'] = {k: after[k] - before[k] for k in after}
        result['indices'] = idx
        result['data_sha256'] = data_fingerprint(xb, yb)
        path = _unit_path(run_dir, batching, index)
        if save_adversarial:
            from safetensors.torch import save_file
            write_atomic(path.with_suffix('.safetensors'), lambda tmp: save_file(
                {'x_adv': x_adv.contiguous(), 'indices': torch.tensor(idx)}, str(tmp)))
        _write_json_atomic(path, result)


def aggregate(run_dir: Path, metadata: Optional[dict] = None) -> dict:
    """The result of a run, from its unit files (identical whatever the number of processes or restarts)."""
    run_dir = Path(run_dir)
    settings = json.loads((run_dir / 'settings.json').read_text())
    n = settings['n_examples']
    per_batching = {}
    sample_robust_any_batching = torch.ones(n, dtype=torch.bool)
    passes = {'forward_images': 0, 'backward_images': 0}
    seconds = 0.0
    for batching in settings['batchings']:
        files = sorted((run_dir / 'units').glob(f'{batching}_*.json'))
        units = [_load_unit(f) for f in files]
        unreadable = [str(f) for f, u in zip(files, units) if u is None]
        if unreadable:
            raise ValueError(f'{run_dir}: unreadable unit files {unreadable}; resume the run to recompute them.')
        covered = sorted(i for u in units for i in u['indices'])
        if covered != list(range(n)):
            raise ValueError(f'{run_dir}: batching {batching!r} is incomplete ({len(covered)} of {n} examples); '
                             'resume the run to finish it.')
        clean = realised = union = 0
        surrogate_realised: Dict[str, int] = {}
        candidate_totals: Dict[str, int] = {}
        for u in units:
            clean += sum(u['clean'])
            realised += sum(u['realised'])
            union += sum(u['union'])
            for i, ok in zip(u['indices'], u['union']):
                if not ok:
                    sample_robust_any_batching[i] = False
            by_surrogate: Dict[str, List[int]] = {}
            for name, correct in u['candidates'].items():
                candidate_totals[name] = candidate_totals.get(name, 0) + sum(correct)
                by_surrogate.setdefault(name.split('/')[0], []).append(sum(correct))
            for s, counts in by_surrogate.items():
                surrogate_realised[s] = surrogate_realised.get(s, 0) + min(counts)
            passes['forward_images'] += u['passes']['forward_images']
            passes['backward_images'] += u['passes']['backward_images']
            seconds += u['seconds']
        per_batching[batching] = {
            'batches': len(units),
            'clean_acc': clean / n,
            'realised_acc': realised / n,
            'union_acc': union / n,
            'per_surrogate_acc': {s: surrogate_realised[s] / n for s in _stage_order(settings, surrogate_realised)},
        }
        if 'autoattack' in candidate_totals:
            per_batching[batching]['autoattack_acc'] = candidate_totals['autoattack'] / n
    first = per_batching[settings['batchings'][0]]
    worst_batching = min(per_batching, key=lambda b: per_batching[b]['realised_acc'])
    result = {
        **(metadata or {}),
        'protocol': settings['protocol'],
        'n_examples': n,
        'clean_acc': first['clean_acc'],
        'autoattack_acc': first.get('autoattack_acc'),
        'threat_model': settings['msa']['norm'],
        'eps': settings['msa']['eps'],
        'batch_size': settings['batch_size'],
        'batchings': per_batching,
        'worst_batching': worst_batching,
        'passes': passes,
        'attack_seconds': round(seconds, 3),
        'settings': settings,
        'machine': {'platform': platform.platform(), 'torch': torch.__version__, 'threads': torch.get_num_threads()},
    }
    if settings['protocol'] == 'msa':
        result['msa_acc'] = per_batching[worst_batching]['realised_acc']
        result['msa_union_acc'] = float(sample_robust_any_batching.float().mean())
        result['per_surrogate_acc'] = first['per_surrogate_acc']
    return result


def format_table(result: dict) -> str:
    """A human-readable table of a result."""
    lines = [f"{result.get('name', 'model')}  ({result['protocol']}, {result['threat_model']} eps="
             f"{result['eps']:.4f}, {result['n_examples']} examples, batch {result['batch_size']})", '',
             '| batching | clean | AutoAttack (fixed batches) | realised worst case | per-sample union bound |',
             '|---|---:|---:|---:|---:|']
    for name, b in result['batchings'].items():
        aa = b.get('autoattack_acc')
        lines.append(f"| {name} | {100 * b['clean_acc']:.2f}% | {'-' if aa is None else f'{100 * aa:.2f}%'} | "
                     f"{100 * b['realised_acc']:.2f}% | {100 * b['union_acc']:.2f}% |")
    if result['protocol'] == 'msa':
        first = next(iter(result['batchings']))  # per_surrogate_acc is the first batching's
        lines += ['', f'| surrogate (cumulative, {first} batching) | robust accuracy |', '|---|---:|']
        lines += [f'| {s} | {100 * v:.2f}% |' for s, v in result['per_surrogate_acc'].items()]
        lines += ['', f"MSA accuracy (worst batching: {result['worst_batching']}): {100 * result['msa_acc']:.2f}%  "
                      f"(union bound over all batchings {100 * result['msa_union_acc']:.2f}%)"]
    for warning in result.get('warnings', []):
        lines.append(f'WARNING: {warning}')
    lines.append(f"passes: {result['passes']['forward_images']} forward / {result['passes']['backward_images']} "
                 f"backward images, {result['attack_seconds']:.1f} s")
    return '\n'.join(lines)


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MSAConfig, run_dir: Path,
                  protocol: str = 'msa', batch_size: int = 128, amp: bool = False, progress: bool = True) -> dict:
    """The adaptive-attack sanity checks on a small subset, each a warning when it fails:
    robust accuracy non-increasing in eps and at most chance (+5 points) at eps 0.5 (Linf) / 10 (L2); more
    iterations never raise it (beyond one sample); Square alone is not better than the gradient attacks by more
    than 5 points (a sign of gradient masking)."""
    from dataclasses import replace
    run_dir = Path(run_dir)
    n = len(y)
    num_classes = getattr(_unwrap(model), 'num_classes', None) or int(y.max()) + 1
    key = 'msa_acc' if protocol == 'msa' else 'autoattack_acc'

    def run(name, c):
        return evaluate(model, x, y, c, run_dir / name, protocol=protocol, batch_size=batch_size, amp=amp,
                        progress=progress)[key]

    large = 0.5 if cfg.norm == 'Linf' else 10.0
    eps_grid = sorted({cfg.eps / 2, cfg.eps, 2 * cfg.eps, large})
    by_eps = {e: run(f'eps_{e:.6f}', replace(cfg, eps=e)) for e in eps_grid}
    more_iters = run('more_iters', replace(cfg, apgd_iters=2 * cfg.apgd_iters,
                                           autoattack_iters=2 * (cfg.autoattack_iters or 100)))
    gradient_cfg = replace(cfg, autoattack_version='custom', autoattack_attacks=['apgd-ce', 'apgd-t', 'fab-t'])
    gradient_only = evaluate(model, x, y, gradient_cfg if cfg.autoattack else cfg,
                             run_dir / 'gradient_only', protocol=protocol, batch_size=batch_size, amp=amp,
                             progress=progress)
    square_only = evaluate(model, x, y, replace(cfg, autoattack_version='custom', autoattack_attacks=['square'],
                                                surrogates=()), run_dir / 'square_only',
                           protocol='autoattack' if protocol == 'autoattack' else 'msa', batch_size=batch_size,
                           amp=amp, progress=progress)
    grad_acc = gradient_only[key]
    square_acc = square_only['autoattack_acc']
    warnings = []
    values = [by_eps[e] for e in eps_grid]
    if any(b > a + 1e-9 for a, b in zip(values, values[1:])):
        warnings.append(f'robust accuracy rises with eps ({dict(zip(eps_grid, values))}): the attack is failing.')
    if by_eps[large] > 1.0 / num_classes + 0.05:
        warnings.append(f'at eps={large} robust accuracy is {by_eps[large]:.3f}, above chance '
                        f'({1.0 / num_classes:.3f}): gradient masking or a broken attack.')
    if more_iters > by_eps[cfg.eps] + 1.0 / n + 1e-9:
        warnings.append(f'more iterations raised robust accuracy ({by_eps[cfg.eps]:.3f} -> {more_iters:.3f}).')
    if square_acc < grad_acc - 0.05:
        warnings.append(f'Square alone ({square_acc:.3f}) beats the gradient attacks ({grad_acc:.3f}) by more than '
                        '5 points: gradient masking suspected.')
    return {'n_examples': n, 'robust_acc_by_eps': {f'{e:.6f}': v for e, v in by_eps.items()},
            'more_iterations_acc': more_iters, 'gradient_only_acc': grad_acc, 'square_only_acc': square_acc,
            'warnings': warnings}
