"""What :func:`timm_hpm.benchmark` measures in its run folder: the batch-dependence test (recorded once), then the
protocol its verdict calls for (standard AutoAttack for a batch-independent model, MSA in every batching and the
poisoning protocol for a batch-dependent one) and the report with the worst case as the robust accuracy."""
from __future__ import annotations

import json
from pathlib import Path

from ..eval.msa_config import MSAConfig
from ..runfiles import write_text_atomic
from .checks import MSA_BUDGET_FIELDS, hpm_dynamic
from .protocols import msa_any_model, poisoning_protocol, surrogate_views
from .report import model_info_entry, reduced, why

__all__ = ['measure', 'msa_and_poisoning', 'record_detection']


def measure(target, model, x, y, name, dataset_name, threat_model, eps, batch_size, surrogates, budget, batchings,
            detection_examples, seed, progress, folder: Path, device, metadata) -> dict:
    """The batch-dependence test on the first ``detection_examples`` images (recorded in ``folder``; a
    nondeterministic model is refused), then the protocol its verdict calls for, in ``folder``: the report (all but
    its wall time)."""
    import timm_hpm
    from ..eval import autoattack_backend, hpm_mode
    from ..eval.batch_dependence import batch_dependence
    m = min(detection_examples, len(y))
    detection = batch_dependence(target, x[:m], y[:m], batch_size=batch_size, seed=seed)
    record_detection(folder / 'batch_dependence.json', detection)
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
    report.update(msa_and_poisoning(target, x, y, eps, threat_model, batch_size, surrogates, budget, batchings, seed,
                                    progress, folder, device, meta, msa_cfg))
    report['reduced_budget'] = reduced(report['evaluation'], budget, batchings, report['poisoning'])
    report['model_info'] = model_info_entry(report['evaluation'], report, model)
    return report


def msa_and_poisoning(target, x, y, eps, threat_model, batch_size, surrogates, budget, batchings, seed, progress,
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


def record_detection(path: Path, detection: dict) -> None:
    """The batch-dependence test's result, written once; a folder holding another verdict is another model's run."""
    if path.exists():
        before = json.loads(path.read_text())
        if before.get('verdict') != detection['verdict'] or before.get('n_images') != detection['n_images']:
            raise ValueError(f'{path.parent} holds the benchmark of another model (its batch-dependence test says '
                             f"{before.get('verdict')!r}, this model's {detection['verdict']!r}); use a new out "
                             'folder.')
        return
    write_text_atomic(path, json.dumps(detection, indent=2))
