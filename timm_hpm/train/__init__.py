"""HPM fine-tuning: configuration and the pieces the accelerate recipe (recipes/finetune.py) composes."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, FinetuneConfig, load_config
from .engine import (adversarial_examples, build_model, evaluate_heads, hpm_loss, init_prototypes, select_trainable,
                     set_frozen_eval, step_generator)
from .runs import RunFolderError, run_lock
