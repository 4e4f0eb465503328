"""The fine-tuning configuration: typed sections read from YAML, checked before anything runs.

Unknown keys, unknown models, impossible attack settings and missing data are errors that say what to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from ..attacks import parse_eps
from ..layers.hpm_head import HPM_MODES, HPM_OPTIONS, HPMOptionError, check_hpm_option
from ..models import is_hpm_variant

__all__ = ['FinetuneConfig', 'ModelSection', 'DataSection', 'AttackSection', 'TrainSection', 'load_config',
           'ConfigError', 'config_changes', 'BUDGET_KEYS']

#: The settings a resumed run may change: its step budget.
BUDGET_KEYS = ('train.epochs', 'train.max_steps')


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class ModelSection:
    name: str = 'hpm_preact_resnet18'  # a registered model; a plain name is converted with convert_to_hpm
    # The base weights: null (random init), 'pretrained' (the tag's registry weights), a file (safetensors or a
    # weights-only .pt), 'rb:<RobustBench name>' (RobustBench's layout under robustbench_dir, downloaded when
    # online), 'hf-hub:<repo>' or 'local-dir:<folder>'.
    base: Optional[str] = None
    robustbench_dir: str = './models'
    model_args: Dict[str, Any] = field(default_factory=dict)
    # HPMHead options (mode, tau, alpha, momentum, gamma_init, pseudo_labels), checked by validate() against
    # timm_hpm.layers.HPM_OPTION_DOMAINS, the head's own check.
    hpm: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    dataset: str = 'synthetic'
    data_dir: Optional[str] = None
    batch_size: int = 128  # per process
    num_workers: int = 0  # exact resume needs 0 (augmentation RNG lives in the main process)
    augment: bool = True
    train_examples: Optional[int] = None  # a prefix of the training split (None: all but the held-out part)
    val_examples: int = 512  # held out from the end of the training split, for per-epoch metrics
    synthetic_examples: int = 512  # size of the synthetic training set


@dataclass
class AttackSection:
    type: str = 'pgd'  # 'pgd' (Madry PGD-AT), 'trades' or 'none'
    norm: str = 'Linf'
    eps: Union[str, float] = '8/255'
    step_size: Optional[Union[str, float]] = None  # default 2.5 eps / steps
    steps: int = 10
    random_start: bool = True
    beta: float = 6.0  # TRADES
    target_mode: Optional[str] = None  # the HPM mode attacked when making training examples (None: as trained)
    # Attack each training image alone (its own batch of one: the dynamic head's batch prototypes from that image
    # only) instead of the whole training batch at once (the default, and the adversary MSA uses).
    per_image: bool = False
    eps_warmup_epochs: float = 0.0  # ramp eps (and the step size) linearly from 0 over this many epochs


@dataclass
class TrainSection:
    # 'hpm': fine-tune an HPM model (CE of the HPM head + lambda_fc CE of the FC head, EMA prototypes);
    # 'base': adversarially train the plain model (FC head only), e.g. the base an HPM head is put on later.
    objective: str = 'hpm'
    epochs: int = 1
    # The step budget when set: this many optimizer steps, over as many epochs as they take (epochs is then unused,
    # as max_steps in transformers' Trainer); the LR schedule spans them.
    max_steps: Optional[int] = None
    trainable: str = 'head'  # 'head', 'head+last_stage' or 'all'
    lambda_fc: float = 1.0
    opt: str = 'sgd'
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sched: str = 'cosine'
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    grad_accum: int = 1
    clip_grad: Optional[float] = None
    seed: int = 0
    mixed_precision: str = 'no'  # 'no', 'bf16' (CPU and GPU) or 'fp16' (GPU)
    # Model and input batches in torch.channels_last (NHWC): faster convolutions on GPUs (tensor cores), the same
    # results up to float rounding; the saved weights stay in the default layout.
    channels_last: bool = False
    init_prototype_batches: Optional[int] = None  # None: the whole training set
    checkpoint_every: int = 200  # optimizer steps; also at every epoch end
    keep_checkpoints: int = 2
    eval_pgd_steps: int = 10
    eval_batch_size: int = 256
    log_every: int = 10
    trackers: List[str] = field(default_factory=list)  # accelerate trackers, e.g. ['tensorboard']


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    attack: AttackSection = field(default_factory=AttackSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = 'runs/finetune'

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def eps(self) -> float:
        return parse_eps(self.attack.eps, self.attack.norm)

    def eps_scale(self, progress_epochs: float) -> float:
        """The fraction of eps used after ``progress_epochs`` epochs (1 once the warm-up is over)."""
        warmup = self.attack.eps_warmup_epochs
        return 1.0 if warmup <= 0 else min(1.0, max(progress_epochs, 0.0) / warmup)

    @property
    def step_size(self) -> float:
        if self.attack.step_size is None:
            return 2.5 * self.eps / max(self.attack.steps, 1)
        return parse_eps(self.attack.step_size, self.attack.norm)

    def validate(self) -> 'FinetuneConfig':
        """Every check that needs no model or data."""
        import timm
        import timm_hpm  # noqa: F401  (registers the models)
        from ..data import DATASETS
        name = self.model.name
        if not (name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name.split('.')[0])):
            close = timm.list_models(f"*{name.split('.')[0].split('_')[-1]}*")[:5]
            raise ConfigError(f'model.name: unknown model {name!r}' + (f'; did you mean one of {close}?' if close else
                                                                       '; see timm.list_models()'))
        if not isinstance(self.model.hpm, dict):
            raise ConfigError(f'model.hpm must be a mapping of HPM options, got {self.model.hpm!r}')
        unknown = set(self.model.hpm) - set(HPM_OPTIONS)
        if unknown:
            raise ConfigError(f'model.hpm: unknown options {sorted(unknown)}; valid: {", ".join(HPM_OPTIONS)}')
        for key, value in self.model.hpm.items():
            try:
                check_hpm_option(key, value)
            except HPMOptionError as error:
                raise ConfigError(f'model.hpm.{key}: {error}') from None
        if self.data.dataset not in DATASETS:
            raise ConfigError(f'data.dataset: unknown dataset {self.data.dataset!r}; choose from {DATASETS}')
        if self.attack.type not in ('pgd', 'trades', 'none'):
            raise ConfigError(f"attack.type must be 'pgd', 'trades' or 'none', got {self.attack.type!r}")
        if self.attack.norm not in ('Linf', 'L2'):
            raise ConfigError(f"attack.norm must be 'Linf' or 'L2', got {self.attack.norm!r}")
        try:
            eps, step = self.eps, self.step_size
        except ValueError as error:
            raise ConfigError(f'attack: {error}') from None
        if self.attack.norm == 'Linf' and eps > 0.5:
            raise ConfigError(f'attack.eps={eps} is not a sane Linf radius for images in [0, 1] (at 0.5 any image '
                              'can be made grey); write it as 8/255 or 0.031.')
        if step > 2 * eps:
            raise ConfigError(f'attack.step_size={step} is larger than 2 eps ({2 * eps}).')
        if self.attack.target_mode is not None and self.attack.target_mode not in HPM_MODES:
            raise ConfigError(f'attack.target_mode must be one of {HPM_MODES} or null')
        if self.train.objective not in ('hpm', 'base'):
            raise ConfigError("train.objective must be 'hpm' or 'base'")
        if self.train.objective == 'base' and (is_hpm_variant(name) or self.model.hpm):
            raise ConfigError("train.objective 'base' trains a plain model: use model.name without the hpm_ prefix "
                              "and no model.hpm options")
        if self.train.trainable not in ('head', 'head+last_stage', 'all'):
            raise ConfigError("train.trainable must be 'head', 'head+last_stage' or 'all'")
        if self.train.mixed_precision is False:  # YAML reads a bare `no` as false
            self.train.mixed_precision = 'no'
        if self.train.mixed_precision not in ('no', 'bf16', 'fp16'):
            raise ConfigError("train.mixed_precision must be 'no', 'bf16' or 'fp16'")
        if not isinstance(self.train.channels_last, bool):
            raise ConfigError(f'train.channels_last must be true or false, got {self.train.channels_last!r}')
        for key in ('epochs', 'grad_accum', 'checkpoint_every', 'keep_checkpoints', 'log_every'):
            if getattr(self.train, key) < 1:
                raise ConfigError(f'train.{key} must be >= 1')
        steps = self.train.max_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ConfigError(f'train.max_steps (--max-steps) must be an integer >= 1, got {steps!r}; leave it out '
                              '(null) to train for train.epochs.')
        if self.data.batch_size < 1 or self.data.val_examples < 0:
            raise ConfigError('data.batch_size must be >= 1 and data.val_examples >= 0')
        if not self.train.lr > 0:
            raise ConfigError('train.lr must be > 0')
        lambda_fc = self.train.lambda_fc
        if isinstance(lambda_fc, bool) or not isinstance(lambda_fc, (int, float)) or not 0 <= lambda_fc < float('inf'):
            raise ConfigError(f'train.lambda_fc={lambda_fc!r} is invalid: the weight of the FC loss must be a finite '
                              'number >= 0')
        return self


_SECTIONS = {'model': ModelSection, 'data': DataSection, 'attack': AttackSection, 'train': TrainSection}


def _build(cls, values: Dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f'{where or "config"}: expected a mapping, got {type(values).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
    return cls(**{k: _build(_SECTIONS[k], v, k) if cls is FinetuneConfig and k in _SECTIONS else v
                  for k, v in values.items()})


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split('.')
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        tree = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f'{path} is not valid YAML: {error}') from None
    if tree is None:
        raise ConfigError(f'{path} is empty; a config file holds at least one section (model, data, attack, train).')
    if not isinstance(tree, dict):
        raise ConfigError(f'{path}: expected a mapping of sections, got {type(tree).__name__}')
    return tree


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in _SECTIONS and not prefix:
            flat.update(_flatten(value, f'{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(old: FinetuneConfig, new: FinetuneConfig) -> Dict[str, Tuple[Any, Any]]:
    """``{'train.lr': (old, new), ...}`` for every setting that differs (output_dir aside: where a run lives)."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k != 'output_dir' and a.get(k) != b.get(k)}


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[Dict[str, Any]] = None
                ) -> FinetuneConfig:
    """Read a YAML config (or the defaults), apply ``{'train.epochs': 1, ...}`` overrides, validate."""
    tree: Dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return _build(FinetuneConfig, tree, '').validate()
