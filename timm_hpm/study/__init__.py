"""The budget-matched study: HPM candidates read against a control, on held-out images, with paired statistics.

The control is the base fine-tuned with plain PGD-AT through its own FC head with exactly an HPM candidate's
budget (steps, learning rate, trainable parameters, attack, seed): any HPM effect is what is left once the extra
adversarial steps are accounted for. A study (``recipes/study.py``; its YAML, for example
``studies/fashion_mnist/configs/study.yaml``) lists candidates; each is expanded over the seeds, and a control is
added for every budget and seed a fine-tuned candidate uses. Every model is scored on the same held-out images
(the end of the training split the fine-tunes never see; never the test set) with the same attack: whole-batch
APGD-CE and APGD-T through the target itself and, for an HPM model, through its head's other modes (the surrogate
part of MSA, without AutoAttack), the realised batch counted. Per-image results are kept (:mod:`.store`), so every
HPM figure is compared with its control image by image.

A fine-tune is reused (finished, or resumed after an interruption) only when its run folder's ``config.yaml`` is the
configuration the study asks of it (:func:`check_run`): a candidate whose definition changed, or another study that
gives the same name to another configuration in a shared runs folder, is refused, naming the settings that differ.

Modules: :mod:`.candidates` (the study YAML expanded into candidates and their controls), :mod:`.runs` (the
fine-tunes, reused only when checked), :mod:`.scoring` (the held-out images and the attack), :mod:`.store` (the
scores, one ``scores.jsonl`` per study, resumable), :mod:`.report` (rows, tables, ranking, figure) and
:mod:`.runner` (the study command's steps).
"""
from .candidates import BUDGET_MATCHED, KINDS, Candidate, expand_study
from .report import plot_study, ranking_text, seed_summary, study_rows, study_table
from .runs import check_run, finetune, run_config
from .scoring import held_out, score_model, scoring_config
from .store import ScoreStore, read_scores

__all__ = ['Candidate', 'expand_study', 'held_out', 'score_model', 'finetune', 'study_rows', 'study_table',
           'seed_summary', 'ranking_text', 'plot_study', 'check_run', 'run_config', 'scoring_config', 'ScoreStore',
           'read_scores', 'BUDGET_MATCHED', 'KINDS']
