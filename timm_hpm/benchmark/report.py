"""What :func:`timm_hpm.benchmark` reports: why a protocol ran, what was reduced, RobustBench's ``model_info`` entry
(its ``autoattack_acc`` the worst case) and the markdown report."""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from ..models import is_hpm_model
from ..report import markdown_table
from .checks import BATCHINGS, FULL_BUDGET

__all__ = ['why', 'reduced', 'model_info_entry', 'format_report']


def _changes(detection: dict) -> str:
    tests = detection['tests']
    return '; '.join(f"{name}: {100 * t['fraction_changed']:.1f}% of predictions changed, max logit change "
                     f"{t['max_logit_change']:.3g}" for name, t in tests.items() if name in detection['reasons'])


def why(detection: dict, dependent: bool) -> str:
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


def reduced(result: dict, budget: dict, batchings, poisoning) -> List[str]:
    from ..robustbench import reduced_budget
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


def model_info_entry(result: dict, report: dict, model: nn.Module) -> dict:
    """RobustBench's entry (:func:`timm_hpm.robustbench.model_info`, whose ``autoattack_acc`` already holds the
    worst case of the evaluation), its footnote saying which protocol ran and why; for a batch-dependent model the
    worst case includes poisoning, and a model that is not this package's HPM model is not credited to its paper."""
    from ..robustbench import model_info
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
        from ..eval import poisoning_table
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
