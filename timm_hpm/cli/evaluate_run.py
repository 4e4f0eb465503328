"""The steps of ``timm_hpm.cli.evaluate`` (its documentation) beside the options: the run folder's lock and checks,
a finished evaluation's report, the model's memory layout, and the two runs (MSA or AutoAttack; batch poisoning).
Everything heavy is imported inside the functions, once the arguments are parsed."""
import contextlib
import json
import sys
from pathlib import Path

__all__ = ['to_channels_last', 'check_out_folder', 'lock_out_folder', 'report_finished', 'run_attacks', 'run_poison']


def to_channels_last(model):
    """``model`` in torch.channels_last memory format, its 4-D inputs converted as they enter it (a forward
    pre-hook). The attacks keep their images in the default layout, which their code assumes: AutoAttack's L2 step
    flattens with ``.view`` (an error on a channels_last tensor), and ``randn_like`` fills a tensor in memory order
    (channels_last images would draw other noise)."""
    import torch

    def inputs_follow(module, args):
        return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.ndim == 4 else a
                     for a in args)
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(inputs_follow)
    return model


def check_out_folder(out: Path, protocol: str) -> None:
    """Refuse a folder whose results this run could not have made: results without this protocol's work files (a
    copied results folder, one whose work folder was deleted, or another protocol's run) would be overwritten. A
    folder with work files is checked against them (same settings, model and images, or refused)."""
    from timm_hpm.eval.run_header import read_run_settings
    work = out / ('poison' if protocol == 'poison' else 'attack')
    if (out / 'eval.json').exists() and read_run_settings(work) is None:
        raise ValueError(f"{out} holds results (eval.json) without the run that made them (the {protocol} run's "
                         f"settings, the header of its store in {work}, are missing); they would be overwritten. "
                         "Use a new --out folder.")


def lock_out_folder(out: Path, accelerator, protocol: str) -> contextlib.ExitStack:
    """The main process locks ``out`` for the run (a second run into it fails at once, naming the holder); every
    process of this run learns the outcome before any work, so none of them starts on a folder in use."""
    from accelerate.utils import broadcast_object_list

    from timm_hpm.runfiles import FolderInUse, run_lock
    lock, error = contextlib.ExitStack(), None
    if accelerator.is_main_process:
        try:
            lock.enter_context(run_lock(out, '--out'))
            check_out_folder(out, protocol)
        except (FolderInUse, ValueError) as refused:
            lock.close()
            error = str(refused)
    error = broadcast_object_list([error])[0]
    if error:
        raise SystemExit(error)
    return lock


def report_finished(args, out: Path) -> dict:
    """A rerun into a finished evaluation (same settings, model and images: checked by the runner): its result is
    reported, never rewritten (eval.json keeps the time, processes and command of the run that made it)."""
    result = json.loads((out / 'eval.json').read_text())
    if (out / 'eval.md').is_file():
        print((out / 'eval.md').read_text(), end='')
    if args.sanity and 'sanity' not in result:
        print('note: this finished evaluation has no sanity checks (--sanity); run them into a new --out folder.',
              file=sys.stderr)
    print(f"{out / 'eval.json'}: this evaluation is finished (same settings, model and images); its results are left "
          'as they are. Pass a new --out folder to evaluate again.')
    return result


def run_attacks(args, cfg, others, batchings, model, x, y, out, accelerator, metadata, finished=False):
    """MSA or AutoAttack (the options ``cfg``; ``others``: MSA's surrogate models by name) on fixed batches: the
    resumable, sharded runner, then eval.md and model_info.json. ``finished``: the folder's results are written; the
    runner checks that they are this run's and computes nothing, and nothing is written (the caller reports
    them)."""
    from timm_hpm.eval import aggregate, evaluate, format_table, protocol_warnings, sanity_checks
    from timm_hpm.robustbench import model_info
    from timm_hpm.runfiles import write_text_atomic
    evaluate(model, x, y, cfg, out / 'attack', protocol=args.protocol, batch_size=args.batch_size,
             batchings=batchings, amp=args.amp == 'bf16', save_adversarial=args.save_adv,
             process_index=accelerator.process_index, num_processes=accelerator.num_processes,
             progress=accelerator.is_local_main_process, metadata=metadata, extend_from=args.extend_from,
             surrogate_models=others, finished=finished)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    if finished:
        return {}
    result = aggregate(out / 'attack', metadata)
    result['warnings'] = protocol_warnings(model, args.protocol)
    if args.sanity:
        n = min(args.sanity_examples, len(y))
        result['sanity'] = sanity_checks(model, x[:n], y[:n], cfg, out / 'sanity', protocol=args.protocol,
                                         batch_size=args.batch_size, amp=args.amp == 'bf16')
        result['warnings'] += result['sanity']['warnings']
    if not result['warnings']:
        del result['warnings']
    write_text_atomic(out / 'model_info.json', json.dumps(model_info(result, args.model), indent=2))  # RobustBench
    table = format_table(result)
    write_text_atomic(out / 'eval.md', table + '\n')
    print(table)
    return result


def run_poison(args, eps, options, model, x, y, out, accelerator, metadata, finished=False):
    """The batch-poisoning protocol on the fixed batches of --batch-size (main process; resumable per batch), its
    strength ``options`` (PoisonConfig's fields beyond eps, norm, steps, seed).
    ``finished``: the folder's results are written; run_poisoning checks the settings, model and images against
    them, and nothing is written (the caller reports them)."""
    import torch

    from timm_hpm.eval import ModelView, poisoning_table, run_poisoning
    from timm_hpm.models import get_hpm_head, is_hpm_model
    from timm_hpm.runfiles import write_text_atomic
    if accelerator.num_processes > 1:
        raise SystemExit('--protocol poison runs in one process (python recipes/evaluate.py ...).')
    raw = getattr(model, 'module', model)
    if is_hpm_model(raw):  # the target's own gradient and the soft head's (the straight-through path is coarse)
        mode = get_hpm_head(raw).mode
        target = ModelView(model, mode)
        views = {mode: target, **({'soft': ModelView(model, 'soft')} if mode == 'dynamic' else {})}
    else:
        target = ModelView(model, None)
        views = {'model': target}
    rows = run_poisoning(target, views, x, y, args.batch_size, eps, out / 'poison', norm=args.norm,
                         steps=args.poison_steps, seed=args.seed, progress=True, **options)
    with torch.no_grad():
        clean = float(sum(int((target(xb).argmax(1) == yb).sum())
                          for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)))) / len(y)
    result = dict(metadata, protocol='poison', n_examples=len(y), batch_size=args.batch_size, threat_model=args.norm,
                  eps=eps, clean_acc=clean, poisoning=rows,
                  settings={'steps': args.poison_steps, 'seed': args.seed, 'gradient_views': list(views),
                            **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}})
    if finished:
        return result
    table = poisoning_table(rows, args.norm)
    write_text_atomic(out / 'eval.md', f"Batch poisoning: {metadata['name']}, {len(y)} images, fixed batches of "
                                       f"{args.batch_size}, clean accuracy {100 * clean:.1f}%.\n\n{table}\n")
    print(table)
    return result
