"""HPM fine-tuning: configuration and the pieces the accelerate recipe (recipes/finetune.py) composes."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, save_run_checkpoint
from .config import ConfigError, FinetuneConfig, load_config
from .engine import (adversarial_examples, build_model, evaluate_heads, init_prototypes, select_trainable,
                     set_frozen_eval, step_generator)
from .losses import hpm_loss, trades_loss, training_loss
from .loop import RunLog, step_budget, step_scheduler
from .runs import (RunFolderError, claim_run_folder, parse_overrides, resolve_config, restore, run_lock,
                   write_fingerprints)
