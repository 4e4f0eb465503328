"""HPM adversarial fine-tuning with accelerate.

    accelerate launch recipes/finetune.py --config recipes/configs/hpm_wrn28_10_cifar10.yaml
    accelerate launch recipes/finetune.py --resume runs/<run>/      # after a crash or kill; the budget may grow
    python recipes/finetune.py --config ... --epochs 1 --device cpu              # without accelerate launch
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py ... --device cpu   # 2 CPU processes (gloo)

The run folder gets: ``config.yaml`` (resolved), ``log.jsonl`` (metrics), ``checkpoints/step_<k>/`` (weights with
prototypes, optimiser, RNG states, trainer state; nothing in it is ever unpickled: see timm_hpm/train/checkpoint.py),
``final/`` (model.safetensors + timm config.json, loadable with
``timm.create_model('local-dir:<run>/final', pretrained=True)``) and ``run.lock`` (held while a process runs in it).
A fresh run refuses a folder that holds a run unless ``--overwrite``; ``--resume`` refuses changed settings except the
step budget.
"""
import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from tqdm import tqdm

import timm_hpm
from timm_hpm.data import build_train_val, unaugmented
from timm_hpm.hub import save_for_hub
from timm_hpm.train import (adversarial_examples, build_model, evaluate_heads, hpm_loss, init_prototypes, load_config,
                            select_trainable, set_frozen_eval, step_generator)
from timm_hpm.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       write_text_atomic)
from timm_hpm.train.config import BUDGET_KEYS, ConfigError, config_changes
from timm_hpm.train.engine import broadcast_buffers, input_normalizer, read_jsonl, trades_loss
from timm_hpm.runfiles import FolderInUse, run_lock
from timm_hpm.train.runs import RunFolderError, prepare_fresh_run

logger = logging.getLogger('finetune')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', type=Path, help='YAML config (recipes/configs/)')
    start = p.add_mutually_exclusive_group()
    start.add_argument('--resume', type=Path, help='a run folder to continue from its last checkpoint, with its '
                                                   'settings (only --max-steps/--epochs may change)')
    start.add_argument('--overwrite', action='store_true',
                       help='replace the run already in the output folder (its config.yaml, log, checkpoints and '
                            'final weights are deleted)')
    p.add_argument('--output-dir', type=Path, help='run folder (default: output_dir of the config)')
    p.add_argument('--epochs', type=int, help='override train.epochs')
    p.add_argument('--max-steps', type=int, help='override train.max_steps (the step budget, >= 1)')
    p.add_argument('--device', choices=['cpu', 'auto'], default='auto',
                   help="'cpu' forces the CPU; 'auto': what accelerate finds")
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='override config entries, e.g. train.lr=0.01 attack.eps=4/255 (values parsed as YAML); '
                        'may be given more than once')
    args = p.parse_args(argv)
    if args.config is None and args.resume is None:
        p.error('give --config <recipes/configs/*.yaml> to start a run, or --resume <run folder> to continue one')
    return args


def parse_overrides(args) -> dict:
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01')
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f'--set {item!r}: the value is not valid YAML ({error})') from None
    if args.epochs is not None:
        overrides['train.epochs'] = args.epochs
    if args.max_steps is not None:
        overrides['train.max_steps'] = args.max_steps
    return overrides


def resolve_config(args):
    """The run's configuration, and on --resume the step-budget settings that change (``{key: (old, new)}``)."""
    overrides = parse_overrides(args)
    if args.resume is None:
        cfg = load_config(args.config, overrides)
        if args.output_dir is not None:
            cfg.output_dir = str(args.output_dir)
        return cfg, {}
    saved_path = args.resume / 'config.yaml'
    if not saved_path.is_file():
        raise ConfigError(f'--resume {args.resume}: no config.yaml there; is it a run folder?')
    saved = load_config(saved_path)
    cfg = load_config(args.config or saved_path, overrides)
    changes = config_changes(saved, cfg)
    refused = {k: v for k, v in changes.items() if k not in BUDGET_KEYS}
    if refused:
        raise ConfigError(
            f'--resume {args.resume}: ' + '; '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in refused.items()) +
            f" differ from the run's {saved_path}. A resumed run keeps its settings; only its step budget "
            f"({', '.join(BUDGET_KEYS)}) may change. Start a new run (another --output-dir) to change the others.")
    cfg.output_dir = str(args.resume)
    return cfg, changes


def base_loss(model, x, x_adv, y, cfg):
    """Plain adversarial training of the FC head: PGD-AT's CE, or TRADES' CE(clean) + beta KL(adv || clean)."""
    logits = model(x_adv)
    if cfg.attack.type != 'trades':
        return F.cross_entropy(logits, y)
    return trades_loss(logits, model(x), y, cfg.attack.beta)


def state_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def raise_on_every_process(accelerator, error: Optional[Exception]) -> None:
    """Raise ``error`` here, and on every other process when one of them failed (instead of waiting forever for
    the failed one at the next collective operation)."""
    failed = [message for message in gather_object([None if error is None else str(error)]) if message]
    if error is not None:
        raise error
    if failed:
        raise RunFolderError(f'another process of this run failed: {failed[0]}')


@contextlib.contextmanager
def claim_run_folder(accelerator, run_dir: Path, fresh: bool, overwrite: bool):
    """The main process holds the folder's lock for the run's lifetime and refuses (or, with ``overwrite``,
    clears) a folder that holds another run; every process learns the outcome before any work."""
    with contextlib.ExitStack() as held:
        error = None
        if accelerator.is_main_process:
            try:
                held.enter_context(run_lock(run_dir, '--output-dir'))
                if fresh:
                    prepare_fresh_run(run_dir, overwrite)
            except (RunFolderError, FolderInUse) as refused:
                error = refused
        raise_on_every_process(accelerator, error)
        yield


def restore(accelerator, run_dir: Path, model, optimizer) -> Optional[dict]:
    """The trainer state of the run's latest complete checkpoint, restored into model, optimiser and random
    generators (None when there is none); log lines written after it are dropped."""
    state, error = None, None
    try:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            state = load_checkpoint(accelerator, checkpoint, model, optimizer)
            logger.info('resumed from %s (step %d)', checkpoint, state['global_step'])
        if accelerator.is_main_process:
            step = state['global_step'] if state else 0
            log_path = run_dir / 'log.jsonl'
            kept = [r for r in read_jsonl(log_path) if r.get('step', 0) <= step]
            write_text_atomic(log_path, ''.join(json.dumps(r) + '\n' for r in kept))
    except CheckpointError as unreadable:
        error = unreadable
    raise_on_every_process(accelerator, error)
    if state is None:
        logger.warning('no checkpoint in %s: starting from scratch', run_dir)
    return state


def main(argv=None):
    args = parse_args(argv)
    cfg, budget_changes = resolve_config(args)
    t = cfg.train
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=args.device == 'cpu', mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.trackers or None, project_dir=str(run_dir))
    with claim_run_folder(accelerator, run_dir, fresh=args.resume is None, overwrite=args.overwrite):
        return train(accelerator, cfg, run_dir, resume=args.resume is not None, budget_changes=budget_changes)


def train(accelerator, cfg, run_dir: Path, resume: bool, budget_changes: dict) -> Path:
    t = cfg.train
    set_seed(t.seed)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format='%(asctime)s %(levelname)s %(message)s')
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # per-file checkpoint chatter

    # Model and data: every error (unknown model, missing data, bad checkpoint) surfaces before training starts.
    model = build_model(cfg)
    cfg_in = model.pretrained_cfg
    train_set, val_set = build_train_val(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.val_examples, cfg.data.train_examples, cfg.data.augment,
        image_size=cfg_in.get('input_size', (3, 32, 32)), num_classes=model.num_classes,
        synthetic_examples=cfg.data.synthetic_examples, seed=t.seed, pretrained_cfg=cfg_in)
    trainable, frozen = select_trainable(model, t.trainable)
    logger.info('training %d parameter tensors (%s)', len(trainable), t.trainable)
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.data.num_workers)
    init_loader = DataLoader(unaugmented(train_set), batch_size=t.eval_batch_size, shuffle=False)

    updates_per_epoch = len(train_loader) // (t.grad_accum * accelerator.num_processes)
    if updates_per_epoch < 1:
        raise ConfigError(f'one epoch has no optimizer step ({len(train_set)} images, batch {cfg.data.batch_size}, '
                          f'{accelerator.num_processes} processes, grad_accum {t.grad_accum}): lower the batch size.')
    optimizer = create_optimizer_v2([p for p in model.parameters() if p.requires_grad], opt=t.opt, lr=t.lr,
                                    weight_decay=t.weight_decay, momentum=t.momentum)
    # The schedule spans the budget: all epochs, or max_steps when that ends the run earlier (warm-up keeps its
    # length in optimizer steps).
    budget = min(t.max_steps or t.epochs * updates_per_epoch, t.epochs * updates_per_epoch)
    scheduler, _ = create_scheduler_v2(optimizer, sched=t.sched, num_epochs=1,
                                       warmup_epochs=t.warmup_epochs * updates_per_epoch / budget,
                                       min_lr=t.min_lr, step_on_epochs=False, updates_per_epoch=budget)

    model, optimizer, train_loader, init_loader = accelerator.prepare(model, optimizer, train_loader, init_loader)
    raw = accelerator.unwrap_model(model)
    hpm = t.objective == 'hpm'
    head = timm_hpm.get_hpm_head(raw) if hpm else None
    normalize = input_normalizer(raw)  # timm-style models normalise outside; data and attacks stay in [0, 1]
    if t.trackers:
        accelerator.init_trackers(run_dir.name, config={k: str(v) for k, v in cfg.to_dict().items()})

    # Resume, or initialise the dataset prototypes from the base model's features.
    state = restore(accelerator, run_dir, raw, optimizer) if resume else None
    if state is not None:
        scheduler.step_update(state['global_step'])  # the rate is a function of the step (and of the budget)
    else:
        state = {'global_step': 0, 'epoch': 0, 'batches_done': 0}
        if hpm:
            bar = tqdm(total=len(init_loader), desc='init prototypes', disable=not accelerator.is_local_main_process)
            info = init_prototypes(raw, init_loader, t.init_prototype_batches, progress=bar)
            bar.close()
            logger.info('prototypes initialised (gamma %.4g)', info['gamma'])
    if accelerator.is_main_process:
        write_text_atomic(run_dir / 'config.yaml', yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    log_path = run_dir / 'log.jsonl'

    def log(record):
        if accelerator.is_main_process:
            with log_path.open('a') as f:
                f.write(json.dumps(record) + '\n')
        if t.trackers:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record['step'])

    if budget_changes:
        log({'step': state['global_step'], 'budget_change': {k: list(v) for k, v in budget_changes.items()}})
        logger.info('step budget changed at step %d: %s', state['global_step'],
                    ', '.join(f'{k} {old} -> {new}' for k, (old, new) in budget_changes.items()))

    def checkpoint(epoch, batches_done):
        folder = run_dir / 'checkpoints' / f"step_{state['global_step']:07d}"
        save_checkpoint(accelerator, folder, raw, optimizer,
                        {'global_step': state['global_step'], 'epoch': epoch, 'batches_done': batches_done})
        if accelerator.is_main_process:
            for old in sorted((run_dir / 'checkpoints').glob('step_*'))[:-t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    total_steps = t.max_steps or t.epochs * updates_per_epoch
    done = state['global_step'] >= total_steps
    for epoch in range(state['epoch'], t.epochs):
        if done:
            break
        train_loader.set_epoch(epoch)
        if hasattr(train_set, 'set_epoch'):
            train_set.set_epoch(epoch)
        skip = state['batches_done'] if epoch == state['epoch'] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        model.train()
        set_frozen_eval(frozen)
        remaining = (total_steps - state['global_step']) * t.grad_accum  # batches left in the budget
        bar = tqdm(loader, desc=f'epoch {epoch}', initial=skip, total=min(len(train_loader), skip + remaining),
                   disable=not accelerator.is_local_main_process)
        tic, images, batches_done = time.perf_counter(), 0, skip
        for x, y in bar:
            with accelerator.accumulate(model):
                g = step_generator(t.seed, epoch * 10_000_000 + batches_done, accelerator.process_index)
                x_adv = adversarial_examples(raw, x, y, cfg, g, cfg.eps_scale(epoch + batches_done / len(train_loader)))
                set_frozen_eval(frozen)
                if normalize is not None:
                    x, x_adv = normalize(x), normalize(x_adv)
                if not hpm:
                    loss = base_loss(model, x, x_adv, y, cfg)
                elif cfg.attack.type == 'trades':
                    clean = model(x, return_fc=True)
                    out = model(x_adv, targets=y, return_fc=True)
                    loss = hpm_loss(out.logits, out.fc_logits, y, t.lambda_fc, clean=tuple(clean),
                                    beta=cfg.attack.beta)
                else:
                    out = model(x_adv, targets=y, return_fc=True)
                    loss = hpm_loss(out.logits, out.fc_logits, y, t.lambda_fc)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.clip_grad:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            images += len(y) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state['global_step'] += 1
            scheduler.step_update(state['global_step'])
            loss_value = accelerator.reduce(loss.detach(), reduction='mean').item()
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if state['global_step'] % t.log_every == 0 or state['global_step'] == 1:
                log({'step': state['global_step'], 'epoch': epoch, 'loss': loss_value,
                     'lr': optimizer.param_groups[0]['lr'],
                     'images_per_s': images / max(time.perf_counter() - tic, 1e-9)})
            if state['global_step'] % t.checkpoint_every == 0:
                checkpoint(epoch, batches_done)
            if state['global_step'] >= total_steps:
                done = True
                break
        finished_epoch = not done or batches_done >= len(train_loader)
        metrics = {}
        if accelerator.is_main_process:
            metrics = evaluate_heads(raw, val_set, cfg, t.eval_batch_size) if len(val_set) else {}
        log({'step': state['global_step'], 'epoch': epoch, 'epoch_end': finished_epoch,
             'images_per_s': images / max(time.perf_counter() - tic, 1e-9), **metrics})
        if metrics:
            logger.info('epoch %d: %s', epoch, ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
        state['epoch'], state['batches_done'] = (epoch + 1, 0) if finished_epoch else (epoch, batches_done)
        checkpoint(state['epoch'], state['batches_done'])

    accelerator.wait_for_everyone()
    # Every rank records fingerprints of its prototypes (before any buffer broadcast: their all-reduced EMA
    # updates alone must keep them identical) and of its whole state after the batch-norm buffers are synced.
    prototypes = state_fingerprint(head) if hpm else None
    broadcast_buffers(raw)
    (run_dir / f'fingerprint_rank{accelerator.process_index}.txt').write_text(
        json.dumps({'prototypes': prototypes, 'state': state_fingerprint(raw)}))
    if accelerator.is_main_process:
        raw.eval()
        save_for_hub(raw, run_dir / 'final')
        logger.info('wrote %s (load with timm.create_model("local-dir:%s", pretrained=True))', run_dir / 'final',
                    run_dir / 'final')
    accelerator.end_training()
    return run_dir


if __name__ == '__main__':
    try:
        main()
    except ConfigError as error:
        print(f'configuration error: {error}', file=sys.stderr)
        sys.exit(2)
    except (RunFolderError, FolderInUse, CheckpointError, timm_hpm.PretrainedWeightsUnavailable) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
