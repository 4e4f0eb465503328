"""HPM adversarial fine-tuning with accelerate.

    accelerate launch -m timm_hpm.cli.finetune --config hpm_wrn28_10_cifar10     # a packaged config, by name
    accelerate launch -m timm_hpm.cli.finetune --resume runs/<run>/   # after a crash or kill; the budget may change
    timm-hpm-finetune --config my_config.yaml --epochs 1 --device cpu           # without accelerate launch
    accelerate launch --multi_gpu --num_processes 2 -m timm_hpm.cli.finetune ... --device cpu  # 2 CPU processes (gloo)

In a checkout, ``recipes/finetune.py`` runs this module (``accelerate launch recipes/finetune.py --config
recipes/configs/hpm_wrn28_10_cifar10.yaml``). ``--config`` takes a YAML file or the name of a config shipped with the
package (``timm_hpm/configs/<name>.yaml``; ``recipes/configs`` in a checkout).

The run folder gets: ``config.yaml`` (resolved), ``log.jsonl`` (metrics), ``checkpoints/checkpoint_<step>/`` (weights
with prototypes, optimiser, RNG states, trainer state; nothing in it is ever unpickled: see
timm_hpm/train/checkpoint.py), ``final/`` (model.safetensors + timm config.json, loadable with
``timm.create_model('local-dir:<run>/final', pretrained=True)``) and ``run.lock`` (held while a process runs in it).
A fresh run refuses a folder that holds a run unless ``--overwrite``; ``--resume`` refuses changed settings except the
step budget, a budget below the steps already trained, and any change to a finished run (``final/`` written: its
results are never rewritten; resumed with its own settings it is left untouched). The steps below follow accelerate's
examples/cv_example.py; what they call lives in timm_hpm/train/.
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

# torch, timm, accelerate and timm_hpm's modules are imported once the arguments are parsed (the package itself,
# which registers its models with timm, is imported before any module of it runs).

logger = logging.getLogger('finetune')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', type=Path, help='YAML config: a file, or the name of a packaged one '
                                              '(timm_hpm/configs/<name>.yaml, e.g. fashion_mnist_hpm)')
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
        p.error('give --config <a YAML file or a packaged config name> to start a run, or --resume <run folder> to '
                'continue one')
    if args.config is not None:
        from timm_hpm.cli import config_file
        args.config = config_file(args.config)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration

    from timm_hpm.cli import CONFIG_DIR, packaged_configs
    from timm_hpm.train import ConfigError, claim_run_folder, parse_overrides, resolve_config
    from timm_hpm.train.runs import finished_resume

    if args.config is not None and not args.config.is_file():
        raise ConfigError(f'--config {args.config}: no such file, nor a config shipped with timm-hpm ({CONFIG_DIR}: '
                          f"{', '.join(packaged_configs())})")
    overrides = parse_overrides(args.set, epochs=args.epochs, max_steps=args.max_steps)
    cfg, budget_changes = resolve_config(args.config, args.resume, overrides, args.output_dir)
    t = cfg.train
    accelerator = Accelerator(
        cpu=args.device == 'cpu', mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.trackers or None,
        # accelerate's checkpoint layout: <run>/checkpoints/checkpoint_<i>, the newest keep_checkpoints kept. The
        # folders are written by timm_hpm.train.save_run_checkpoint, not Accelerator.save_state: its load_state
        # unpickles (timm_hpm/train/checkpoint.py says where).
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, automatic_checkpoint_naming=True,
                                            total_limit=t.keep_checkpoints))
    run_dir = Path(cfg.output_dir)
    with claim_run_folder(accelerator, run_dir, fresh=args.resume is None, overwrite=args.overwrite):
        # checked again under the lock (the run may have finished since): a finished run is never rewritten
        if args.resume is not None and finished_resume(run_dir, budget_changes):
            if accelerator.is_main_process:
                print(f'{run_dir} has finished ({run_dir / "final"}); nothing to do.', file=sys.stderr)
            return run_dir
        return train(accelerator, cfg, resume=args.resume is not None, budget_changes=budget_changes)


def train(accelerator, cfg, resume: bool, budget_changes: dict) -> Path:
    """The run in accelerate's examples/cv_example.py order: data and model, ``prepare``, resume (or initialise
    the prototypes), the loop, save. One function on purpose, read top to bottom: what it calls lives in
    timm_hpm/train/ (tested there)."""
    import torch
    import yaml
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from timm_hpm.data import build_train_val, unaugmented
    from timm_hpm.hub import save_for_hub
    from timm_hpm.runfiles import write_text_atomic
    from timm_hpm.train import (RunLog, build_model, evaluate_heads, init_prototypes, restore, save_run_checkpoint,
                                select_trainable, step_budget, step_scheduler, write_fingerprints)
    t, run_dir = cfg.train, Path(cfg.output_dir)
    set_seed(t.seed)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format='%(asctime)s %(levelname)s %(message)s')
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # per-file checkpoint chatter

    # Model and data: every error (unknown model, missing data, bad checkpoint) surfaces before training starts.
    model = build_model(cfg)
    train_set, val_set = build_train_val(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.val_examples, cfg.data.train_examples, cfg.data.augment,
        image_size=model.pretrained_cfg.get('input_size', (3, 32, 32)), num_classes=model.num_classes,
        synthetic_examples=cfg.data.synthetic_examples, seed=t.seed, pretrained_cfg=model.pretrained_cfg)
    trainable, frozen = select_trainable(model, t.trainable)
    logger.info('training %d parameter tensors (%s)', len(trainable), t.trainable)
    if t.channels_last:  # as timm's train.py: before the optimizer, which then holds NHWC momenta
        model.to(memory_format=torch.channels_last)
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.data.num_workers)
    init_loader = DataLoader(unaugmented(train_set), batch_size=t.eval_batch_size, shuffle=False)
    updates_per_epoch, total_steps = step_budget(cfg, len(train_set), len(train_loader), accelerator.num_processes)
    optimizer = create_optimizer_v2([p for p in model.parameters() if p.requires_grad], opt=t.opt, lr=t.lr,
                                    weight_decay=t.weight_decay, momentum=t.momentum)
    scheduler = step_scheduler(optimizer, cfg, updates_per_epoch, total_steps)

    model, optimizer, train_loader, init_loader = accelerator.prepare(model, optimizer, train_loader, init_loader)
    raw = accelerator.unwrap_model(model)

    # Resume (refused before anything is written when its checkpoint is past the budget), or initialise the dataset
    # prototypes from the base model's features.
    state = restore(accelerator, run_dir, raw, optimizer, total_steps) if resume else None
    if t.trackers:
        accelerator.init_trackers(run_dir.name, config={k: str(v) for k, v in cfg.to_dict().items()})
    if state is not None:
        scheduler.step_update(state['global_step'])  # the rate is a function of the step (and of the budget)
    else:
        state = {'global_step': 0, 'epoch': 0, 'batches_done': 0}
        if t.objective == 'hpm':
            bar = tqdm(total=len(init_loader), desc='init prototypes', disable=not accelerator.is_local_main_process)
            info = init_prototypes(raw, init_loader, t.init_prototype_batches, progress=bar)
            bar.close()
            logger.info('prototypes initialised (gamma %.4g)', info['gamma'])
    if accelerator.is_main_process:
        write_text_atomic(run_dir / 'config.yaml', yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = RunLog(accelerator, run_dir, bool(t.trackers))
    if budget_changes:
        log.budget_change(state['global_step'], budget_changes)

    # The loop: an epoch (or what the budget leaves of it), then held-out metrics and a checkpoint; as many epochs
    # as the step budget takes (train.max_steps may span several).
    for epoch in range(state['epoch'], math.ceil(total_steps / updates_per_epoch)):
        if state['global_step'] >= total_steps:
            break
        train_loader.set_epoch(epoch)
        if hasattr(train_set, 'set_epoch'):
            train_set.set_epoch(epoch)
        batches_done, images, tic = train_epoch(accelerator, model, optimizer, scheduler, train_loader, frozen, cfg,
                                                state, epoch, total_steps, log)
        finished_epoch = state['global_step'] < total_steps or batches_done >= len(train_loader)
        metrics = {}
        if accelerator.is_main_process and len(val_set):
            metrics = evaluate_heads(raw, val_set, cfg, t.eval_batch_size)
        log({'step': state['global_step'], 'epoch': epoch, 'epoch_end': finished_epoch,
             'images_per_s': images / max(time.perf_counter() - tic, 1e-9), **metrics})
        if metrics:
            logger.info('epoch %d: %s', epoch, ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
        state['epoch'], state['batches_done'] = (epoch + 1, 0) if finished_epoch else (epoch, batches_done)
        save_run_checkpoint(accelerator, raw, optimizer, state)

    # Save: the fingerprints every rank must agree on, then the final weights.
    accelerator.wait_for_everyone()
    write_fingerprints(accelerator, run_dir, raw, prototypes=t.objective == 'hpm')
    if accelerator.is_main_process:
        raw.eval()
        if t.channels_last:  # safetensors stores contiguous tensors only; the exported weights are plain ones
            raw.to(memory_format=torch.contiguous_format)
        save_for_hub(raw, run_dir / 'final')
        logger.info('wrote %s (load with timm.create_model("local-dir:%s", pretrained=True))', run_dir / 'final',
                    run_dir / 'final')
    accelerator.end_training()
    return run_dir


def train_epoch(accelerator, model, optimizer, scheduler, train_loader, frozen, cfg, state: dict, epoch: int,
                total_steps: int, log):
    """The optimizer steps of one epoch, from batch ``state['batches_done']`` when the run resumes inside it, until
    the epoch or the step budget ends (``state['global_step']`` counts them; a checkpoint every
    ``train.checkpoint_every``). Returns the batches done in the epoch, the images trained on (all processes) and
    the ``time.perf_counter()`` at its start."""
    import torch
    from tqdm import tqdm

    from timm_hpm.train import adversarial_examples, save_run_checkpoint, set_frozen_eval, step_generator, training_loss
    from timm_hpm.train.engine import input_normalizer
    t, raw = cfg.train, accelerator.unwrap_model(model)
    normalize = input_normalizer(raw)  # timm-style models normalise outside; data and attacks stay in [0, 1]
    skip = state['batches_done'] if epoch == state['epoch'] else 0
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    model.train()
    set_frozen_eval(frozen)
    remaining = (total_steps - state['global_step']) * t.grad_accum  # batches left in the budget
    bar = tqdm(loader, desc=f'epoch {epoch}', initial=skip, total=min(len(train_loader), skip + remaining),
               disable=not accelerator.is_local_main_process)
    tic, images, batches_done = time.perf_counter(), 0, skip
    for x, y in bar:
        if t.channels_last and x.ndim == 4:  # the batch as the model's weights (PGD's noise is drawn as before)
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            g = step_generator(t.seed, epoch * 10_000_000 + batches_done, accelerator.process_index)
            x_adv = adversarial_examples(raw, x, y, cfg, g, cfg.eps_scale(epoch + batches_done / len(train_loader)))
            set_frozen_eval(frozen)
            if normalize is not None:
                x, x_adv = normalize(x), normalize(x_adv)
            loss = training_loss(model, x, x_adv, y, cfg)
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
        step = state['global_step']
        scheduler.step_update(step)
        loss_value = accelerator.reduce(loss.detach(), reduction='mean').item()
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if step % t.log_every == 0 or step == 1:
            log({'step': step, 'epoch': epoch, 'loss': loss_value, 'lr': optimizer.param_groups[0]['lr'],
                 'images_per_s': images / max(time.perf_counter() - tic, 1e-9)})
        if step % t.checkpoint_every == 0:
            save_run_checkpoint(accelerator, raw, optimizer, {'global_step': step, 'epoch': epoch,
                                                              'batches_done': batches_done})
        if step >= total_steps:
            break
    return batches_done, images, tic


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-finetune``, ``python -m timm_hpm.cli.finetune``, recipes/finetune.py):
    the errors that say what to do end the run with their message and exit status 2, without a traceback."""
    try:
        main(argv)
    except Exception as error:  # noqa: BLE001  (the errors that say what to do end the run without a traceback)
        import timm_hpm
        from timm_hpm.train import CheckpointError, ConfigError, RunFolderError
        from timm_hpm.runfiles import FolderInUse
        if isinstance(error, ConfigError):
            print(f'configuration error: {error}', file=sys.stderr)
        elif isinstance(error, (RunFolderError, FolderInUse, CheckpointError, timm_hpm.PretrainedWeightsUnavailable)):
            print(f'error: {error}', file=sys.stderr)
        else:
            raise
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
