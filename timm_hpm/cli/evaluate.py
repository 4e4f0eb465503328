"""Robustness evaluation: the Mixed Surrogate Attack for HPM models, AutoAttack for any model.

    accelerate launch -m timm_hpm.cli.evaluate --model hpm_wrn28_10.<tag> --dataset cifar10 --eps 8/255 --protocol msa
    accelerate launch -m timm_hpm.cli.evaluate --model wrn28_10.<tag> --dataset cifar10 --eps 8/255 --protocol autoattack
    timm-hpm-evaluate --model hpm_small_cnn.fmnist_hpm --hpm-mode static --protocol autoattack ...  # the l2 head alone
    timm-hpm-evaluate --model local-dir:runs/x/final --dataset fashion_mnist --eps 0.1 --n-examples 1000 --device cpu

In a checkout, ``recipes/evaluate.py`` runs this module (``accelerate launch recipes/evaluate.py ...``); the command
that eval.json records names the one that ran (``python recipes/evaluate.py ...`` or ``python -m
timm_hpm.cli.evaluate ...``).

Writes ``<out>/eval.json`` (RobustBench model_info fields plus MSA's), ``<out>/eval.md`` (the table) and, with
``--save-adv``, the realised adversarial batches as safetensors. Interrupted runs resume from ``<out>``;
batches are sharded over the processes of ``accelerate launch``; ``--extend-from`` grows a finished run to more
examples or batchings without recomputing its batches. ``<out>`` is locked while a run uses it (a second run into
it fails at once, naming the holder), and a folder holding another run's results (other settings, model or images,
or an eval.json without its attack/ folder) is refused, never overwritten. A rerun into a finished evaluation
(its eval.json written) with the same settings, model and images computes nothing and rewrites nothing: it reports
the existing result (eval.json, eval.md, model_info.json and the logs are left byte for byte as they are).
``--checkpoint FILE`` loads FILE's weights into ``--model`` (a timm name, ``local-dir:`` or ``hf-hub:`` model: its
architecture and config); the recorded ``command`` is shell-quoted (``shlex.split`` gives the arguments back).

``--batchings class_sorted`` scores the images in label order (stable within a class), batched as a class-folder
dataset is batched by timm's ``validate.py``: a batch-dependent model's figure depends on it
(``recipes/batch_order_table.py`` measures clean accuracy by order and batch size).
"""
import argparse
import contextlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

# torch, timm, accelerate and timm_hpm's modules are imported once the arguments are parsed (the package itself,
# which registers its models with timm, is imported before any module of it runs). The choices below are the
# package's own constants, written out for that reason (tests/test_evaluate_recipe.py checks that they agree).
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet', 'synthetic')  # timm_hpm.data.DATASETS
BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')  # timm_hpm.eval.BATCHINGS
HPM_MODES = ('dynamic', 'static', 'soft', 'fc')  # timm_hpm.HPM_MODES
PROTOCOLS = ('msa', 'autoattack', 'poison')
#: MSA's batchings when --batchings is not given (unchanged when class_sorted was added, so that earlier runs
#: resume with the same settings).
MSA_BATCHINGS = ('default', 'single', 'shuffled')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True, help="timm name (with tag), 'local-dir:<folder>' or 'hf-hub:<repo>'")
    p.add_argument('--checkpoint', help="weights file (safetensors or weights-only .pt) to load into --model (a timm "
                                        "name, 'local-dir:' or 'hf-hub:': its architecture and config)")
    p.add_argument('--no-pretrained', action='store_true', help='random weights (for smoke tests only)')
    p.add_argument('--dataset', required=True, choices=DATASETS, help='the test split of this dataset')
    p.add_argument('--data-dir', help='dataset folder (CIFAR: torchvision layout; ImageNet: ImageFolder root)')
    p.add_argument('--eps', required=True, help="'8/255', 0.031, ...")
    p.add_argument('--norm', default='Linf', choices=['Linf', 'L2'], help='threat model')
    p.add_argument('--protocol', default='msa', choices=PROTOCOLS,
                   help='msa for a batch-dependent (HPM dynamic) head, autoattack for a batch-independent model, '
                        'poison: what k poisoned members of a batch do to the untouched ones')
    p.add_argument('--hpm-mode', choices=HPM_MODES,
                   help="with --protocol autoattack: the HPM head's mode attacked (e.g. 'static': the l2 head alone)")
    p.add_argument('--n-examples', type=int, default=1000, help='the first N test images')
    p.add_argument('--batch-size', type=int, default=128, help='B_eval: the fixed batch size that is scored')
    p.add_argument('--batchings', nargs='+', default=None, choices=BATCHINGS,
                   help=f"default: {' '.join(MSA_BATCHINGS)} for msa, default only for autoattack; class_sorted: "
                        "label order, as a class-folder dataset (timm's validate.py on an ImageFolder) batches")
    p.add_argument('--surrogates', nargs='+', default=['fc', 'static', 'soft', 'dynamic'],
                   help="MSA's surrogate views of the HPM head, attacked with whole-batch APGD-CE/APGD-T")
    p.add_argument('--apgd-iters', type=int, default=100, help="iterations of MSA's whole-batch APGD")
    p.add_argument('--n-target-classes', type=int, default=3, help='APGD-T targets per surrogate')
    p.add_argument('--target-n-target-classes', type=int, default=9,
                   help="APGD-T targets through the target itself (its 'dynamic' view): AutoAttack's 9")
    p.add_argument('--surrogate-model', action='append', default=None, metavar='NAME',
                   help="another model MSA attacks through, after the head's modes: a timm name, 'local-dir:' or "
                        "'hf-hub:' (repeatable)")
    p.add_argument('--base-surrogate', action=argparse.BooleanOptionalAction, default=False,
                   help="also attack through the model the HPM weights were fine-tuned from, when their tag records "
                        "it (timm_hpm.models.hpm_base_model). Off by default: on Fashion-MNIST that transfer broke "
                        "no image the other stages kept, at 7.9%% of MSA's backward passes (README, MSA v4)")
    p.add_argument('--combine-rounds', type=int, default=3,
                   help="whole-batch combinations of every stage's breaks after the last stage (0: none)")
    p.add_argument('--no-score-iterates', action='store_true',
                   help="do not score every whole batch a batch-dependent surrogate's APGD evaluates on the target "
                        "(MSA v2; only the per-sample best images of each run are scored)")
    p.add_argument('--no-surrogate-apgd', action='store_true',
                   help="skip MSA's whole-batch APGD through the surrogates; with --surrogate-autoattack --no-cascade "
                        "--combine-rounds 0 --no-score-iterates: the paper's protocol (AutoAttack "
                        "on each surrogate, transferred, per-sample worst case), for comparison only")
    p.add_argument('--poison-steps', type=int, default=100,
                   help='with --protocol poison: PGD steps of each poisoning run within eps')
    # the poisoning attack's strength (timm_hpm.eval.poison.PoisonConfig; the defaults are full strength)
    p.add_argument('--poison-unbounded-steps', type=int, default=None,
                   help='steps of each unbounded poisoning run (default: 6 x --poison-steps)')
    p.add_argument('--poison-restarts', type=int, default=1, help='runs per objective and gradient view')
    p.add_argument('--poison-objectives', nargs='+', default=['soft_count'],
                   help='soft_count (victims closest to flipping weigh most), top_m, margin_sum')
    p.add_argument('--poison-target-classes', type=int, default=3,
                   help='class-directed runs (victims pushed toward one class), 0: none')
    p.add_argument('--poison-anneal', action=argparse.BooleanOptionalAction, default=True,
                   help="a run through the soft head annealed toward the hard assignment")
    p.add_argument('--poison-top-m', type=int, default=5, help='victims the top_m objective concentrates on')
    p.add_argument('--poison-temperature', type=float, default=0.02, help="soft_count's sigmoid temperature (logits)")
    p.add_argument('--poison-feature-bound', action=argparse.BooleanOptionalAction, default=True,
                   help='also the feature-space bound: k free feature vectors with no image behind them')
    p.add_argument('--autoattack-iters', type=int, default=None, help="default: AutoAttack's own (100)")
    p.add_argument('--square-queries', type=int, default=None, help="default: AutoAttack's own (5000)")
    p.add_argument('--surrogate-autoattack', action='store_true', help="also each surrogate's AutoAttack cascade")
    p.add_argument('--no-cascade', action='store_true', help='attack every clean-correct sample at every stage')
    p.add_argument('--amp', choices=['none', 'bf16'], default='none', help='bf16 autocast (measure its effect first)')
    p.add_argument('--channels-last', action='store_true',
                   help='the model and the surrogate models in torch.channels_last memory format, 4-D inputs '
                        'converted as they enter (faster GPU convolutions; the same results up to float rounding)')
    p.add_argument('--sanity', action='store_true', help='run the adaptive-attack sanity checks on a subset')
    p.add_argument('--sanity-examples', type=int, default=64, help='images the --sanity checks use')
    p.add_argument('--save-adv', action='store_true', help='keep the realised adversarial batches (safetensors)')
    p.add_argument('--seed', type=int, default=0, help='attack seeds (each batch derives its own)')
    p.add_argument('--device', default=None, help="'cpu' forces the CPU (also under accelerate launch)")
    p.add_argument('--out', type=Path, default=None, help='run folder (default runs/eval/<model>_<protocol>)')
    p.add_argument('--extend-from', type=Path, nargs='+', default=[], metavar='RUN',
                   help='--out folders of other runs of the same model, images and settings (the number of '
                        'examples and the batchings may differ) whose finished batches are reused where they cover '
                        'the same examples: e.g. grow a 1,000-image run to 10,000 images')
    return p.parse_args(argv)


def load_model(name: str, checkpoint=None, pretrained: bool = True):
    import timm

    from timm_hpm.attacks import normalized_view
    from timm_hpm.models import check_local_dir
    kwargs = {}
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise SystemExit(f'--checkpoint {checkpoint}: no such file; give a safetensors or weights-only .pt file '
                             'of --model\'s architecture.')
        # source 'file': timm loads a local-dir: or hf-hub: model's weights from its folder or repository whatever
        # its cfg's 'file' says (a local-dir: one failed, "not a directory"; an hf-hub: one took the Hub's weights)
        kwargs['pretrained_cfg_overlay'] = dict(file=str(checkpoint), source='file')
    check_local_dir(name)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return normalized_view(model).eval()  # attacks work on [0, 1] images


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


def surrogate_model_names(args) -> list:
    """--surrogate-model's names, then with --base-surrogate the recorded base of the HPM weights (none for other
    models, for --checkpoint and --no-pretrained)."""
    from timm_hpm.models import hpm_base_model
    if args.protocol != 'msa':
        return []
    names = list(args.surrogate_model or [])
    base = hpm_base_model(args.model) if args.base_surrogate and not (args.checkpoint or args.no_pretrained) else None
    return names + [base] if base and base not in names else names


def check_out_folder(out: Path, protocol: str) -> None:
    """Refuse a folder whose results this run could not have made: results without this protocol's work files (a
    copied results folder, one whose work folder was deleted, or another protocol's run) would be overwritten. A
    folder with work files is checked against them (same settings, model and images, or refused)."""
    work = out / ('poison' if protocol == 'poison' else 'attack')
    if (out / 'eval.json').exists() and not (work / 'settings.json').exists():
        raise ValueError(f"{out} holds results (eval.json) without the run that made them (the {protocol} run's "
                         f"{work}/settings.json is missing); they would be overwritten. Use a new --out folder.")


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


def main(argv=None):
    args = parse_args(argv)
    from accelerate import Accelerator

    from timm_hpm.attacks import parse_eps
    try:  # every option checked before a folder, a model or an image is touched
        eps = parse_eps(args.eps, args.norm)
        check_options(args, eps)
    except ValueError as error:
        raise SystemExit(f'evaluate.py: {error}') from None
    batchings = args.batchings or (list(MSA_BATCHINGS) if args.protocol == 'msa' else ['default'])
    accelerator = Accelerator(cpu=args.device == 'cpu')
    out = args.out or Path('runs/eval') / f"{args.model.replace('/', '_').replace(':', '_')}_{args.protocol}"
    out.mkdir(parents=True, exist_ok=True)
    with lock_out_folder(out, accelerator, args.protocol):
        return run(args, eps, batchings, accelerator, out, argv)


def msa_config(args, eps: float, surrogate_models=()):
    """The attack configuration of these options (``MSAConfig`` checks every budget and option when made)."""
    from timm_hpm.eval import MSAConfig
    return MSAConfig(eps=eps, norm=args.norm, surrogates=tuple(args.surrogates),
                     surrogate_models=tuple(surrogate_models),
                     apgd_iters=args.apgd_iters, n_target_classes=args.n_target_classes,
                     target_n_target_classes=args.target_n_target_classes, combine_rounds=args.combine_rounds,
                     score_iterates=not args.no_score_iterates, surrogate_apgd=not args.no_surrogate_apgd,
                     autoattack_iters=args.autoattack_iters, square_queries=args.square_queries,
                     surrogate_autoattack=args.surrogate_autoattack, cascade=not args.no_cascade, seed=args.seed)


def poison_options(args) -> dict:
    """The poisoning attack's strength options of these arguments (PoisonConfig's fields beyond eps, norm, steps,
    seed)."""
    return dict(unbounded_steps=args.poison_unbounded_steps, restarts=args.poison_restarts,
                objectives=tuple(args.poison_objectives), target_classes=args.poison_target_classes,
                anneal=args.poison_anneal, top_m=args.poison_top_m, temperature=args.poison_temperature,
                feature_bound=args.poison_feature_bound)


def check_options(args, eps: float) -> None:
    """The options' own checks (the library's: MSAConfig, PoisonConfig), up front: a ValueError naming the option."""
    from timm_hpm.eval.poison import PoisonConfig
    for flag, value in (('--n-examples', args.n_examples), ('--batch-size', args.batch_size)):
        if value < 1:
            raise ValueError(f'{flag} {value}: must be >= 1')
    if args.sanity and args.sanity_examples < 1:
        raise ValueError(f'--sanity-examples {args.sanity_examples}: must be >= 1')
    if args.protocol == 'poison':
        PoisonConfig(eps=eps, norm=args.norm, steps=args.poison_steps, seed=args.seed, **poison_options(args))
    else:
        msa_config(args, eps, [name.replace('/', '_') for name in surrogate_model_names(args)])


def recorded_command(argv=None) -> str:
    """This command line as eval.json records it, shell-quoted (``shlex.split`` gives the arguments back); it begins
    ``python recipes/evaluate.py`` when the checkout's recipe ran, else ``python -m timm_hpm.cli.evaluate``."""
    from timm_hpm.cli import recorded_program
    return shlex.join([*recorded_program('recipes/evaluate.py', 'timm_hpm.cli.evaluate'),
                       *map(str, sys.argv[1:] if argv is None else argv)])


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


def run(args, eps, batchings, accelerator, out, argv):
    import timm_hpm
    from timm_hpm.data import load_eval_tensors
    from timm_hpm.eval import hpm_mode
    from timm_hpm.runfiles import write_text_atomic
    # eval.json is written last, once every process is done: a folder holding it (and its run's work files:
    # check_out_folder) holds a finished evaluation, verified and reported below, never rewritten (its logs included)
    finished = (out / 'eval.json').is_file()
    log_files = [] if finished else [logging.FileHandler(out / f'log_rank{accelerator.process_index}.txt')]
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                        handlers=log_files + [logging.StreamHandler(sys.stderr)] if accelerator.is_main_process else
                        log_files or [logging.NullHandler()])
    model = load_model(args.model, args.checkpoint, not args.no_pretrained).to(accelerator.device)
    if args.channels_last:
        model = to_channels_last(model)
    base = getattr(model, 'module', model)
    if args.hpm_mode:
        if args.protocol != 'autoattack':
            raise SystemExit('--hpm-mode goes with --protocol autoattack (MSA always attacks the dynamic head).')
        timm_hpm.get_hpm_head(base).mode = args.hpm_mode
    x, y = load_eval_tensors(args.dataset, args.n_examples, args.data_dir, base.pretrained_cfg,
                             num_classes=base.num_classes, image_size=base.pretrained_cfg['input_size'],
                             seed=args.seed)
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    # hpm_mode: the head's mode evaluated (given or the model's own), null for a model without an HPM head
    metadata = dict(name=args.model, dataset=args.dataset, hpm_mode=hpm_mode(model),
                    architecture=base.pretrained_cfg.get('architecture'),
                    command=recorded_command(argv),
                    autoattack_backend=timm_hpm.eval.autoattack_backend(), timm_hpm_version=timm_hpm.__version__)
    start = time.time()
    if args.protocol == 'poison':
        result = run_poison(args, eps, model, x, y, out, accelerator, metadata, finished)
    else:
        result = run_attacks(args, eps, batchings, model, x, y, out, accelerator, metadata, finished)
    if result is None:
        return None
    if finished:
        return report_finished(args, out)
    result['wall_seconds'] = round(time.time() - start, 1)
    result['num_processes'] = accelerator.num_processes
    write_text_atomic(out / 'eval.json', json.dumps(result, indent=2))
    print(f"wrote {out / 'eval.json'}")
    return result


def run_attacks(args, eps, batchings, model, x, y, out, accelerator, metadata, finished=False):
    """MSA or AutoAttack on fixed batches: the resumable, sharded runner, then eval.md and model_info.json.
    ``finished``: the folder's results are written; the runner checks that they are this run's and computes
    nothing, and nothing is written (the caller reports them)."""
    from timm_hpm.eval import aggregate, evaluate, format_table, protocol_warnings, sanity_checks
    from timm_hpm.robustbench import model_info
    from timm_hpm.runfiles import write_text_atomic
    names = surrogate_model_names(args)
    others = {name.replace('/', '_'): load_model(name).to(accelerator.device) for name in names}
    if args.channels_last:
        others = {name: to_channels_last(other) for name, other in others.items()}
    if others:
        logging.getLogger('evaluate').info('MSA also attacks through %s', ', '.join(names))
    cfg = msa_config(args, eps, others)
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


def run_poison(args, eps, model, x, y, out, accelerator, metadata, finished=False):
    """The batch-poisoning protocol on the fixed batches of --batch-size (main process; resumable per batch).
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
                         steps=args.poison_steps, seed=args.seed, progress=True, **poison_options(args))
    with torch.no_grad():
        clean = float(sum(int((target(xb).argmax(1) == yb).sum())
                          for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)))) / len(y)
    result = dict(metadata, protocol='poison', n_examples=len(y), batch_size=args.batch_size, threat_model=args.norm,
                  eps=eps, clean_acc=clean, poisoning=rows,
                  settings={'steps': args.poison_steps, 'seed': args.seed, 'gradient_views': list(views),
                            **{k: list(v) if isinstance(v, tuple) else v for k, v in poison_options(args).items()}})
    if finished:
        return result
    table = poisoning_table(rows, args.norm)
    write_text_atomic(out / 'eval.md', f"Batch poisoning: {metadata['name']}, {len(y)} images, fixed batches of "
                                       f"{args.batch_size}, clean accuracy {100 * clean:.1f}%.\n\n{table}\n")
    print(table)
    return result


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-evaluate``, ``python -m timm_hpm.cli.evaluate``, recipes/evaluate.py):
    its exit status."""
    main(argv)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
