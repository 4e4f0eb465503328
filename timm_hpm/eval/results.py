"""A run's result, aggregated from its finished units alone, and its human-readable table (eval.md)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..report import markdown_table
from .run_header import read_run_settings
from .settings_schema import as_recorded
from .unit_store import read_units
from .stages import AUTOATTACK, candidate_stage, is_per_sample_union, stage_order

__all__ = ['aggregate', 'format_table', 'finished_units', 'realised_replay', 'stage_breaks', 'robust_flags']


def robust_flags(run_folder: Path, batching: str = 'default') -> Optional[Dict[int, bool]]:
    """Per-image robustness of an evaluation run folder (``recipes/evaluate.py --out``): image index -> robust in
    its realised batch of ``batching``, from the finished units under ``attack``; None when there are none. A unit
    that cannot be read, or whose ``indices``/``realised`` are malformed (wrong types, another number of flags than
    indices), is a ValueError naming its file (and line)."""
    units = [u for (b, _), u in sorted(read_units(Path(run_folder) / 'attack', ('indices', 'realised')).items())
             if b == batching]
    if not units:
        return None
    flags = {}
    for unit in units:
        flags.update(zip(unit['indices'], map(bool, unit['realised'])))
    return flags


def _batching_units(run_dir: Path, batching: str, n: int) -> List[dict]:
    """The units of one batching; refused (an error) when one is unreadable or they do not cover the run."""
    units = [u for (b, _), u in sorted(read_units(run_dir).items()) if b == batching]
    covered = sorted(i for u in units for i in u['indices'])
    if covered != list(range(n)):
        raise ValueError(f'{run_dir}: batching {batching!r} is incomplete ({len(covered)} of {n} examples); '
                         'resume the run to finish it.')
    return units


def _aggregate_batching(units: List[dict], settings: dict, sample_robust: torch.Tensor, totals: dict) -> dict:
    """One batching's figures; clears the images it breaks in ``sample_robust`` and adds its passes and attack time
    to ``totals`` (``forward_images``, ``backward_images``, ``seconds``)."""
    n = settings['n_examples']
    clean = realised = union = 0
    surrogate_realised: Dict[str, int] = {}
    candidate_totals: Dict[str, int] = {}
    autoattack_own = 0 if units and all(u.get('autoattack_own') is not None for u in units) else None
    stages = {candidate_stage(name) for u in units for name in u['candidates'] if not is_per_sample_union(name)}
    for u in units:
        clean += sum(u['clean'])
        if autoattack_own is not None:
            autoattack_own += sum(u['autoattack_own'])
        realised += sum(u['realised'])
        union += sum(u['union'])
        for i, ok in zip(u['indices'], u['union']):
            if not ok:
                sample_robust[i] = False
        by_surrogate: Dict[str, List[int]] = {}
        for name, correct in u['candidates'].items():
            candidate_totals[name] = candidate_totals.get(name, 0) + sum(correct)
            if not is_per_sample_union(name):  # a stage's figure is its best concrete batch
                by_surrogate.setdefault(candidate_stage(name), []).append(sum(correct))
        for s in stages:  # a stage with no candidate in this batch (nothing left to attack or to combine): the
            # batch as it ended, as msa() counts it
            surrogate_realised[s] = surrogate_realised.get(s, 0) + min(by_surrogate.get(s, [sum(u['realised'])]))
        totals['forward_images'] += u['passes']['forward_images']
        totals['backward_images'] += u['passes']['backward_images']
        totals['seconds'] += u['seconds']
    out = {
        'batches': len(units),
        'clean_acc': clean / n,
        'realised_acc': realised / n,
        'union_acc': union / n,
        'per_surrogate_acc': {s: surrogate_realised[s] / n for s in stage_order(settings, surrogate_realised)},
    }
    if AUTOATTACK in candidate_totals:
        out['autoattack_acc'] = candidate_totals[AUTOATTACK] / n
    if autoattack_own is not None:  # AutoAttack's own printout (its re-batching): never the figure, shown beside it
        out['autoattack_own_acc'] = autoattack_own / n
    return out


def aggregate(run_dir: Path, metadata: Optional[dict] = None) -> dict:
    """The result of a run, from its unit files (identical whatever the number of processes or restarts)."""
    run_dir = Path(run_dir)
    stored = read_run_settings(run_dir)
    if stored is None:
        raise FileNotFoundError(f'{run_dir} holds no evaluation run (no header in its units file, no settings.json)')
    settings = as_recorded(stored)  # as the run recorded them
    n = settings['n_examples']
    sample_robust_any_batching = torch.ones(n, dtype=torch.bool)
    totals = {'forward_images': 0, 'backward_images': 0, 'seconds': 0.0}
    per_batching = {batching: _aggregate_batching(_batching_units(run_dir, batching, n), settings,
                                                  sample_robust_any_batching, totals)
                    for batching in settings['batchings']}
    first = per_batching[settings['batchings'][0]]
    worst_batching = min(per_batching, key=lambda b: per_batching[b]['realised_acc'])
    result = {
        **(metadata or {}),
        'protocol': settings['protocol'],
        'n_examples': n,
        'clean_acc': first['clean_acc'],
        'autoattack_acc': first.get('autoattack_acc'),
        'autoattack_own_acc': first.get('autoattack_own_acc'),
        'threat_model': settings['msa']['norm'],
        'eps': settings['msa']['eps'],
        'batch_size': settings['batch_size'],
        'batchings': per_batching,
        'worst_batching': worst_batching,
        'passes': {k: totals[k] for k in ('forward_images', 'backward_images')},
        'attack_seconds': round(totals['seconds'], 3),
        'settings': settings,
        'machine': {'platform': platform.platform(), 'torch': torch.__version__, 'threads': torch.get_num_threads()},
    }
    if settings['protocol'] == 'msa':
        result['msa_acc'] = per_batching[worst_batching]['realised_acc']
        result['msa_union_acc'] = float(sample_robust_any_batching.float().mean())
        result['per_surrogate_acc'] = first['per_surrogate_acc']
    return result


#: MSA's full-strength budget (MSAConfig's defaults): a run with any of these lower is a reduced-budget run.
_FULL_MSA = dict(apgd_iters=100, n_target_classes=3, target_n_target_classes=9, combine_rounds=3)
_FULL_MSA_SWITCHES = ('score_iterates', 'surrogate_apgd', 'autoattack')
_HEAD_VIEWS = ('fc', 'static', 'soft', 'dynamic')


def reduced_budget(result: dict) -> list:
    """What ran below full strength in an evaluation (recipes/evaluate.py's eval.json): AutoAttack other than the
    standard cascade at its own iterations and queries, and for MSA any budget below its defaults (fewer APGD
    iterations, targets or combination rounds, a stage switched off, a head view left out). Empty: full strength."""
    settings = result.get('settings') or {}
    msa = settings.get('msa') or {}
    protocol = result.get('protocol') or settings.get('protocol')
    out = []
    if msa.get('autoattack', True) and (msa.get('autoattack_version', 'standard') != 'standard'
                                        or msa.get('autoattack_attacks')):
        out.append(f"AutoAttack version {msa.get('autoattack_version')!r} (attacks {msa.get('autoattack_attacks')})")
    if msa.get('autoattack_iters') is not None:
        out.append(f"AutoAttack APGD/FAB iterations {msa['autoattack_iters']} (standard: 100)")
    if msa.get('square_queries') is not None:
        out.append(f"Square queries {msa['square_queries']} (standard: 5000)")
    if protocol == 'msa':
        for key, full in _FULL_MSA.items():
            if key in msa and msa[key] < full:
                out.append(f'{key} {msa[key]} (full: {full})')
        out += [f'{key} off' for key in _FULL_MSA_SWITCHES if msa.get(key, True) is False]
        missing = [v for v in _HEAD_VIEWS if v not in msa.get('surrogates', _HEAD_VIEWS)]
        if missing and result.get('hpm_mode') not in (None, 'fc', 'static'):
            out.append(f'surrogate views left out: {missing}')
    return out


def format_table(result: dict) -> str:
    """A human-readable table of a result."""
    def pct(v):
        return f'{100 * v:.2f}%'
    # AutoAttack's own printout (its re-batching) is shown for runs that recorded it (MSA v3 on)
    own = any(b.get('autoattack_own_acc') is not None for b in result['batchings'].values())
    reduced = reduced_budget(result)
    lines = [f"{result.get('name', 'model')}  ({result['protocol']}, {result['threat_model']} eps="
             f"{result['eps']:.4f}, {result['n_examples']} examples, batch {result['batch_size']})", '']
    if reduced:
        lines += ['REDUCED ATTACK BUDGET: these are not full-strength figures (' + ', '.join(reduced) + '); '
                  'drop those options for full strength.', '']
    lines += [
             markdown_table(['batching', 'clean'] + (["AutoAttack's own printout"] if own else [])
                            + ['AutoAttack (fixed batches)', 'realised worst case', 'per-sample union bound'],
                            [[name, pct(b['clean_acc'])]
                             + (['-' if b.get('autoattack_own_acc') is None else pct(b['autoattack_own_acc'])]
                                if own else [])
                             + ['-' if b.get('autoattack_acc') is None else pct(b['autoattack_acc']),
                                pct(b['realised_acc']), pct(b['union_acc'])]
                             for name, b in result['batchings'].items()], 'lr' + 'r' * (4 if own else 3))]
    if result['protocol'] == 'msa':
        first = next(iter(result['batchings']))  # per_surrogate_acc is the first batching's
        lines += ['', markdown_table([f'surrogate (cumulative, {first} batching)', 'robust accuracy'],
                                     [[s, pct(v)] for s, v in result['per_surrogate_acc'].items()], 'lr')]
        lines += ['', f"MSA accuracy (worst batching: {result['worst_batching']}): {pct(result['msa_acc'])}  "
                      f"(union bound over all batchings {pct(result['msa_union_acc'])})"]
    for warning in result.get('warnings', []):
        lines.append(f'WARNING: {warning}')
    lines.append(f"passes: {result['passes']['forward_images']} forward / {result['passes']['backward_images']} "
                 f"backward images, {result['attack_seconds']:.1f} s")
    return '\n'.join(lines)


def finished_units(run_dir: Path, batching: str = 'default', n: Optional[int] = None) -> List[dict]:
    """A run's finished units of ``batching`` in index order; with ``n``, only those within the first ``n``
    examples (whole units), to compare runs of different sizes."""
    return [u for (b, _), u in sorted(read_units(run_dir).items())
            if b == batching and (n is None or max(u['indices']) < n)]


def realised_replay(unit: dict) -> Iterator[Tuple[str, List[bool], List[bool], bool]]:
    """A unit's candidates in the order they ran, each as ``(name, correct, realised_before, taken)``: the realised
    batch's correctness when the candidate came and whether it took the candidate (a whole batch, not a per-sample
    union of iterates, that lowered the correct count), replayed from the unit file."""
    realised = list(unit['clean'])
    for name in unit['stages']:
        correct = unit['candidates'][name]
        taken = not is_per_sample_union(name) and sum(correct) < sum(realised)
        yield name, correct, realised, taken
        if taken:
            realised = list(correct)


def stage_breaks(run_dir: Path, batching: str = 'default', n: Optional[int] = None) -> dict:
    """What each MSA stage of a run added, from its unit files (finished units; ``n``: only those within the first
    ``n`` examples, to compare runs of different sizes). Under the cascade a stage attacks only what the stages
    before it left standing, so each stage is credited with ``new``, the images its candidates broke that were
    still correct in the realised batch when it ran (taken or not), and ``gain``, how much its candidates that the
    realised batch took lowered the correct count (the gains add up to clean - realised). Also the per-image
    realised result (``robust``), the clean, realised and union counts, and the cost (forward/backward images,
    attack seconds; ``stage_backward_images``: each stage's backward images, None when a unit did not record them,
    as runs before stage costs were recorded)."""
    units = finished_units(run_dir, batching, n)
    new: Dict[str, int] = {}
    gain: Dict[str, int] = {}
    out = {'n': 0, 'clean': 0, 'realised': 0, 'union': 0, 'forward_images': 0, 'backward_images': 0, 'seconds': 0.0,
           'robust': {}}
    for u in units:
        out['robust'].update({i: bool(r) for i, r in zip(u['indices'], u['realised'])})
        for name, correct, realised, taken in realised_replay(u):
            stage = candidate_stage(name)
            new[stage] = new.get(stage, 0) + sum(1 for r, c in zip(realised, correct) if r and not c)
            gain[stage] = gain.get(stage, 0) + (sum(realised) - sum(correct) if taken else 0)
        out['n'] += len(u['indices'])
        for key in ('clean', 'realised', 'union'):
            out[key] += sum(u[key])
        out['forward_images'] += u['passes']['forward_images']
        out['backward_images'] += u['passes']['backward_images']
        out['seconds'] += u['seconds']
    per_stage: Optional[Dict[str, int]] = {} if units else None
    for u in units:
        if per_stage is None or 'stage_passes' not in u:
            per_stage = None
            break
        for stage, passes in u['stage_passes'].items():
            per_stage[stage] = per_stage.get(stage, 0) + passes['backward_images']
    out['new'], out['gain'], out['stage_backward_images'] = new, gain, per_stage
    return out
