"""Evaluation: whole-batch APGD, the AutoAttack adapter, the Mixed Surrogate Attack and its runner."""
from .apgd import apgd, apgd_targeted
from .autoattack import autoattack_backend, make_autoattack, run_autoattack
from .msa import MSAConfig, ModelView, PassCounter, attack_batch, hpm_views
from .runner import aggregate, check_eval_ready, evaluate, format_table, make_batchings
