"""Evaluation: the AutoAttack adapter, the Mixed Surrogate Attack (``msa()`` for any batch-dependent model; its
resumable runner with batchings, run folders, results, checks, stage names) and the batch-poisoning protocol."""
from .autoattack import autoattack_backend, make_autoattack, run_autoattack
from .batching import BATCHINGS, make_batchings
from .checks import check_eval_ready, hpm_mode, protocol_warnings
from .msa import MSAConfig, attack_batch, msa
from .poison import POISON_FRACTIONS, PoisonConfig, poison_batch, poison_counts, poisoning_table, run_poisoning
from .results import aggregate, format_table, robust_flags
from .run_folder import UnitFileError, model_fingerprint
from .runner import evaluate, sanity_checks
from .stages import stage_label, stage_order
from .views import BATCH_DEPENDENT_MODES, ModelView, PassCounter, hpm_views
