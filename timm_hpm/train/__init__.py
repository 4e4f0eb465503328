"""HPM fine-tuning: configuration and the pieces the accelerate recipe (recipes/finetune.py) composes."""
from .config import ConfigError, FinetuneConfig, load_config
from .engine import (adversarial_examples, build_model, evaluate_heads, hpm_loss, init_prototypes, select_trainable,
                     set_frozen_eval, step_generator)
