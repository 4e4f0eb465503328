"""How a weaker evaluation would read: the figure each common evaluation of a batch-dependent model reports, on the
same images and fixed batches, beside MSA's.

From two run folders' results (:func:`timm_hpm.eval.aggregate`) of the same model, images and batch size:

* an MSA run (recorded with AutoAttack's own verdict: MSA v3 on): AutoAttack's own printout on the target (each of
  its attacks re-batches the still-robust points, which changes a batch-dependent model's predictions), AutoAttack's
  images re-scored on the fixed batches, and MSA's realised batch and per-sample union;
* a run of the paper's protocol (``recipes/evaluate.py --surrogate-autoattack --no-surrogate-apgd --no-cascade
  --combine-rounds 0 --no-score-iterates --no-base-surrogate``): AutoAttack on each surrogate view, its images
  transferred to the target and scored on the fixed batches, and the per-sample worst case over them and AutoAttack
  on the target.
"""
from __future__ import annotations

from typing import List

from ..report import markdown_table
from .stages import AUTOATTACK, stage_order

__all__ = ['evaluation_ladder', 'ladder_table']


def _check_same_run(msa: dict, paper: dict) -> None:
    for key in ('name', 'n_examples', 'batch_size', 'eps', 'threat_model', 'clean_acc'):
        if msa.get(key) != paper.get(key):
            raise ValueError(f'the two runs differ in {key}: {msa.get(key)!r} vs {paper.get(key)!r}; compare runs of '
                             'one model on the same images and batches')
    if msa.get('autoattack_own_acc') is None:
        raise ValueError("the MSA run did not record AutoAttack's own verdict (a run from before MSA v3): rerun it")
    settings = paper['settings']['msa']
    if settings.get('surrogate_apgd', True) or not settings.get('surrogate_autoattack'):
        raise ValueError('the second run is not the paper protocol: run it with --surrogate-autoattack '
                         '--no-surrogate-apgd (see timm_hpm.eval.ladder)')


def evaluation_ladder(msa: dict, paper: dict) -> List[dict]:
    """Rows ``{evaluation, robust_acc, above_msa}`` (``above_msa``: points above MSA's realised figure), weakest
    evaluation first as the runs order them, MSA last."""
    _check_same_run(msa, paper)
    realised = msa['msa_acc']
    paper_default = paper['batchings']['default']
    per_stage = paper_default['per_surrogate_acc']
    rows = [("AutoAttack on the target, its own printout (its re-batching)", msa['autoattack_own_acc']),
            ('AutoAttack on the target, its images re-scored on the fixed batches', msa['autoattack_acc'])]
    rows += [(f'AutoAttack on the `{s}` surrogate, transferred (fixed batches)', per_stage[s])
             for s in stage_order(paper['settings'], per_stage) if s != AUTOATTACK]
    rows += [("per-sample worst case of the rows above (the paper's protocol)", paper_default['union_acc']),
             ('**MSA: realised batch (the figure)**', realised),
             ('MSA: per-sample union (a bound, not one batch)', msa['batchings']['default']['union_acc'])]
    return [{'evaluation': name, 'robust_acc': acc, 'above_msa': 100 * (acc - realised)} for name, acc in rows]


def ladder_table(rows: List[dict]) -> str:
    return markdown_table(['evaluation', 'robust accuracy', 'points above MSA'],
                          [[r['evaluation'], f"{100 * r['robust_acc']:.1f}%", f"{r['above_msa']:+.1f}"] for r in rows],
                          'lrr')
