"""The pieces of HPM fine-tuning that the recipe composes (docs/method.md section 2, steps 4 and 7).

Randomness that must survive a resume is drawn from generators seeded by (seed, step, rank), never from the
global RNG, so a run killed after step k and resumed from its checkpoint ends bitwise identical to an
uninterrupted one (deterministic CPU kernels, ``num_workers=0``).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..attacks import each_image_alone, normalized_view, pgd
from ..models import check_local_dir, is_hpm_variant
from ..models._hpm import convert_to_hpm, get_hpm_head, is_hpm_model
from .checkpoint import CheckpointError
from .config import ConfigError, FinetuneConfig
from .losses import hpm_loss, trades_loss  # noqa: F401  (re-exported: they lived here before losses.py)

__all__ = ['build_model', 'select_trainable', 'set_frozen_eval', 'init_prototypes', 'adversarial_examples',
           'hpm_loss', 'trades_loss', 'evaluate_heads', 'step_generator', 'read_jsonl', 'broadcast_buffers',
           'input_normalizer']

_logger = logging.getLogger(__name__)


def build_model(cfg: FinetuneConfig) -> nn.Module:
    """The HPM model to fine-tune, with its base weights (see ``ModelSection.base``)."""
    m = cfg.model
    hpm_options = dict(m.hpm)
    base = m.base
    if base and base.startswith(('hf-hub:', 'local-dir:')):
        check_local_dir(base)
        model = timm.create_model(base, pretrained=True, **m.model_args)
    else:
        kwargs = dict(m.model_args)
        if base == 'pretrained':
            kwargs['pretrained'] = True
        elif base and base.startswith('rb:'):
            from ..robustbench import checkpoint_path, download_checkpoint, get_entry, read_checkpoint
            try:
                entry = get_entry(base[3:], cfg.data.dataset, cfg.attack.norm)
            except KeyError as error:
                raise ConfigError(f'model.base: {error.args[0]}') from None
            path = checkpoint_path(entry, m.robustbench_dir)
            if not path.is_file():
                download_checkpoint(entry, path)
            for key, value in entry.model_args.items():
                kwargs.setdefault(key, value)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(
                state_dict=read_checkpoint(path, entry.checkpoint_key)))
        elif base:
            if not Path(base).is_file():
                raise ConfigError(f'model.base: checkpoint file not found: {base}')
            if Path(base).stat().st_size == 0:
                raise ConfigError(f'model.base: {base} is empty (0 bytes): the file was cut short; copy it again.')
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(base)))
        name = m.name
        if is_hpm_variant(name):
            kwargs['hpm_cfg'] = hpm_options
            hpm_options = {}
        model = timm.create_model(name, **kwargs)
    if cfg.train.objective == 'base':
        return model
    if not is_hpm_model(model):
        model = convert_to_hpm(model, **hpm_options)
    else:
        # an hf-hub:/local-dir: HPM model: model.hpm changes the loaded head's options, each checked (validate()
        # already refused bad ones; this is the same check for callers that build a config by hand)
        get_hpm_head(model).set_options(**hpm_options)
    return model


def _last_stage_name(model: nn.Module) -> str:
    info = getattr(model, 'feature_info', None)
    if info and isinstance(info[-1], dict) and info[-1].get('module'):
        return info[-1]['module']
    raise ConfigError(f"{type(model).__name__} does not name its stages (no feature_info); use train.trainable "
                      "'head' or 'all'.")


def select_trainable(model: nn.Module, how: str) -> Tuple[List[str], List[nn.Module]]:
    """Set ``requires_grad`` for 'head', 'head+last_stage' (the last stage and every module registered after
    it) or 'all'. Returns the trainable parameter names and the frozen modules (to keep in eval mode)."""
    classifier = model.hpm_classifier_name if is_hpm_model(model) else model.pretrained_cfg['classifier']
    names = [n for n, _ in model.named_parameters()]
    head_prefix = classifier + '.'
    if how == 'all':
        keep = set(names)
    elif how == 'head':
        keep = {n for n in names if n.startswith(head_prefix)}
    else:
        # The last stage and every module registered after it (pre-order: its children, final norms, head).
        modules = [n for n, _ in model.named_modules()]
        after = set(modules[modules.index(_last_stage_name(model)):])
        keep = {n for n in names if n.rpartition('.')[0] in after} | {n for n in names if n.startswith(head_prefix)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    frozen = [m for name, m in model.named_modules()
              if list(m.parameters(recurse=False)) and not any(p.requires_grad for p in m.parameters(recurse=False))]
    return sorted(n for n, p in model.named_parameters() if p.requires_grad), frozen


def set_frozen_eval(frozen: Iterable[nn.Module]) -> None:
    """Frozen batch norms keep their running statistics (the frozen backbone's features stay as trained)."""
    for module in frozen:
        module.eval()


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one training step's randomness (PGD start), from its position alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 257 + rank)


@torch.no_grad()
def init_prototypes(model: nn.Module, loader: Iterable, max_batches: Optional[int] = None, progress=None) -> Dict:
    """Class means of the model's pre-logit features over ``loader`` (each process its shard; sums are
    all-reduced), and the l2 scale calibrated to the FC logit spread."""
    head = get_hpm_head(model)
    was_training = model.training
    model.eval()
    normalize = input_normalizer(model)

    def features():
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            feats = model.forward_head(model.forward_features(normalize(x) if normalize else x), pre_logits=True)
            if progress is not None:
                progress.update()
            yield feats, y

    counts = head.init_prototypes_(features())
    model.train(was_training)
    return {'prototype_counts': counts.tolist(), 'gamma': float(head.gamma)}


def input_normalizer(model: nn.Module):
    """``x -> (x - mean) / std`` for models that normalise outside (timm's ImageNet convention), else None.
    Data and attacks stay in [0, 1]; the model sees normalised inputs."""
    view = normalized_view(model)
    return view.normalize if view is not model else None


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
                         generator: torch.Generator, eps_scale: float = 1.0) -> torch.Tensor:
    """Training inputs: PGD-AT (maximise CE) or TRADES (maximise KL to the clean prediction), against the HPM
    mode ``attack.target_mode`` (default: the mode being trained), with the model in eval mode (no prototype
    update, frozen batch-norm statistics), on the whole batch at once or, with ``attack.per_image``, on every image
    as its own batch. ``eps_scale`` scales eps and the step size (eps warm-up)."""
    a = cfg.attack
    if a.type == 'none' or eps_scale <= 0:
        return x
    eps, step_size = cfg.eps * eps_scale, cfg.step_size * eps_scale
    head = get_hpm_head(model) if is_hpm_model(model) else None
    was_training = model.training
    model.eval()
    attacked = normalized_view(model)
    if a.per_image:
        attacked = each_image_alone(attacked)
    try:
        with head.using_mode(a.target_mode or head.mode) if head is not None else contextlib.nullcontext():
            if a.type == 'pgd':
                return pgd(attacked, x, y, eps, step_size, a.steps, a.norm, a.random_start, generator=generator)
            with torch.no_grad():
                clean_probs = torch.softmax(attacked(x), dim=1)

            def kl(logits, _):
                return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction='none').sum(1)

            # TRADES starts next to the clean image and maximises the KL to its prediction.
            start = x + 0.001 * torch.randn(x.shape, generator=generator).to(x)
            return pgd(attacked, x, y, eps, step_size, a.steps, a.norm, random_start=False, loss_fn=kl, init=start)
    finally:
        model.train(was_training)


def evaluate_heads(model: nn.Module, dataset: Dataset, cfg: FinetuneConfig, batch_size: int) -> Dict[str, float]:
    """Clean and white-box PGD accuracy of the FC head and of the HPM head (its trained mode) on the held-out
    subset, in fixed batches. A training-time signal: the PGD figure of the dynamic head goes through its STE
    gradients and is not a robustness estimate (use recipes/evaluate.py)."""
    head = get_hpm_head(model) if is_hpm_model(model) else None
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    heads = (('fc', 'fc'), ('hpm', head.mode)) if head is not None else (('fc', None),)
    totals: Dict[str, float] = {}
    n = 0
    g = torch.Generator().manual_seed(cfg.train.seed)
    device = next(model.parameters()).device
    attacked = normalized_view(model)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        n += len(y)
        for name, mode in heads:
            with head.using_mode(mode) if head is not None else contextlib.nullcontext():
                with torch.no_grad():
                    totals[f'{name}_clean_acc'] = totals.get(f'{name}_clean_acc', 0) + \
                        (attacked(x).argmax(1) == y).sum().item()
                if cfg.attack.type != 'none' and cfg.train.eval_pgd_steps > 0:
                    x_adv = pgd(attacked, x, y, cfg.eps, None, cfg.train.eval_pgd_steps, cfg.attack.norm,
                                generator=g)
                    with torch.no_grad():
                        totals[f'{name}_pgd_acc'] = totals.get(f'{name}_pgd_acc', 0) + \
                            (attacked(x_adv).argmax(1) == y).sum().item()
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers to every rank. DDP broadcasts them at the start of each forward, so after the last
    forward the batch-norm statistics differ by rank until this is called (the HPM prototypes never differ:
    their updates are all-reduced)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def read_jsonl(path: Path) -> List[dict]:
    """The records of a JSON-lines file ([] when there is none); a broken line is an error naming file and line."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise CheckpointError(f'{path}, line {number}: not valid JSON ({error}); fix or delete that line.') \
                    from None
    return records
