"""HPM adversarial fine-tuning with accelerate.

    accelerate launch recipes/finetune.py --config recipes/configs/hpm_wrn28_10_cifar10.yaml
    accelerate launch recipes/finetune.py --config ... --resume runs/<run>/      # after a crash or kill
    python recipes/finetune.py --config ... --epochs 1 --device cpu              # without accelerate launch
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py ... --device cpu   # 2 CPU processes (gloo)

The run folder gets: ``config.yaml`` (resolved), ``log.jsonl`` (metrics), ``checkpoints/step_<k>/`` (accelerate
state: weights with prototypes, optimiser, scheduler, RNG), and ``final/`` (model.safetensors + timm
config.json, loadable with ``timm.create_model('local-dir:<run>/final', pretrained=True)``).
"""
import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from tqdm import tqdm

import timm_hpm
from timm_hpm.data import build_train_val, unaugmented
from timm_hpm.hub import save_for_hub
from timm_hpm.train import (adversarial_examples, build_model, evaluate_heads, hpm_loss, init_prototypes, load_config,
                            select_trainable, set_frozen_eval, step_generator)
from timm_hpm.train.config import ConfigError
from timm_hpm.train.engine import broadcast_buffers, input_normalizer, read_jsonl, trades_loss

logger = logging.getLogger('finetune')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', type=Path, help='YAML config (recipes/configs/)')
    p.add_argument('--resume', type=Path, help='a run folder to continue from its last checkpoint')
    p.add_argument('--output-dir', type=Path, help='run folder (default: output_dir of the config)')
    p.add_argument('--epochs', type=int)
    p.add_argument('--max-steps', type=int)
    p.add_argument('--device', choices=['cpu', 'auto'], default='auto')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='override config entries, e.g. train.lr=0.01 attack.eps=4/255 (values parsed as YAML)')
    return p.parse_args(argv)


def resolve_config(args):
    overrides = {k: yaml.safe_load(v) for k, v in (item.split('=', 1) for item in args.set)}
    if args.epochs is not None:
        overrides['train.epochs'] = args.epochs
    if args.max_steps is not None:
        overrides['train.max_steps'] = args.max_steps
    if args.resume is not None:
        saved = args.resume / 'config.yaml'
        if not saved.is_file():
            raise ConfigError(f'--resume {args.resume}: no config.yaml there; is it a run folder?')
        cfg = load_config(saved, overrides)
        cfg.output_dir = str(args.resume)
        return cfg
    cfg = load_config(args.config, overrides)
    if args.output_dir is not None:
        cfg.output_dir = str(args.output_dir)
    return cfg


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


def latest_checkpoint(run_dir: Path):
    steps = sorted((run_dir / 'checkpoints').glob('step_*'), key=lambda p: int(p.name.split('_')[1]))
    complete = [p for p in steps if (p / 'trainer_state.json').exists()]
    return complete[-1] if complete else None


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    t = cfg.train
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=args.device == 'cpu', mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.trackers or None, project_dir=str(run_dir))
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

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model, optimizer, train_loader, init_loader = accelerator.prepare(model, optimizer, train_loader, init_loader)
    accelerator.register_for_checkpointing(scheduler)
    raw = accelerator.unwrap_model(model)
    hpm = t.objective == 'hpm'
    head = timm_hpm.get_hpm_head(raw) if hpm else None
    normalize = input_normalizer(raw)  # timm-style models normalise outside; data and attacks stay in [0, 1]
    if t.trackers:
        accelerator.init_trackers(run_dir.name, config={k: str(v) for k, v in cfg.to_dict().items()})

    # Resume, or initialise the dataset prototypes from the base model's features.
    state = {'global_step': 0, 'epoch': 0, 'batches_done': 0}
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and checkpoint is None:
        logger.warning('no checkpoint in %s: starting from scratch', run_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        logger.info('resumed from %s (step %d)', checkpoint, state['global_step'])
    elif hpm:
        bar = tqdm(total=len(init_loader), desc='init prototypes', disable=not accelerator.is_local_main_process)
        info = init_prototypes(raw, init_loader, t.init_prototype_batches, progress=bar)
        bar.close()
        logger.info('prototypes initialised (gamma %.4g)', info['gamma'])

    log_path = run_dir / 'log.jsonl'
    if accelerator.is_main_process:  # drop log lines written after the checkpoint we resumed from
        kept = [r for r in read_jsonl(log_path) if r.get('step', 0) <= state['global_step']]
        log_path.write_text(''.join(json.dumps(r) + '\n' for r in kept))

    def log(record):
        if accelerator.is_main_process:
            with log_path.open('a') as f:
                f.write(json.dumps(record) + '\n')
        if t.trackers:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record['step'])

    def save_checkpoint(epoch, batches_done):
        accelerator.wait_for_everyone()
        folder = run_dir / 'checkpoints' / f"step_{state['global_step']:07d}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            (folder / 'trainer_state.json').write_text(json.dumps(
                {'global_step': state['global_step'], 'epoch': epoch, 'batches_done': batches_done}))
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
                save_checkpoint(epoch, batches_done)
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
        save_checkpoint(state['epoch'], state['batches_done'])

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
