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
import json
import logging
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from timm_hpm.cli.evaluate_run import lock_out_folder, report_finished, run_attacks, run_poison, to_channels_last

# torch, timm, accelerate and timm_hpm's modules are imported once the arguments are parsed (the package itself,
# which registers its models with timm, is imported before any module of it runs; the attack options are generated
# from MSAConfig's and PoisonConfig's fields, so their modules are imported for --help). The choices below are the
# package's own constants, written out for that reason (tests/test_evaluate_recipe.py checks that they agree).
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet', 'synthetic')  # timm_hpm.data.DATASETS
BATCHINGS = ('default', 'single', 'shuffled', 'class_sorted')  # timm_hpm.eval.BATCHINGS
HPM_MODES = ('dynamic', 'static', 'soft', 'fc')  # timm_hpm.HPM_MODES
PROTOCOLS = ('msa', 'autoattack', 'poison')
#: MSA's batchings without --batchings (as before class_sorted was added: earlier runs resume with the same settings).
MSA_BATCHINGS = ('default', 'single', 'shuffled')


def parse_args(argv=None):
    """The command's options: its own, then MSAConfig's and PoisonConfig's fields (each field's flag, type, default
    and help from its metadata: :func:`timm_hpm.cli.config_args.add_config_arguments`)."""
    from timm_hpm.cli.config_args import add_config_arguments
    from timm_hpm.eval.msa_config import MSAConfig
    from timm_hpm.eval.poison import PoisonConfig
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True, help="timm name (with tag), 'local-dir:<folder>' or 'hf-hub:<repo>'")
    p.add_argument('--checkpoint', help="weights file (safetensors or weights-only .pt) to load into --model (a timm "
                                        "name, 'local-dir:' or 'hf-hub:': its architecture and config)")
    p.add_argument('--no-pretrained', action='store_true', help='random weights (for smoke tests only)')
    p.add_argument('--dataset', required=True, choices=DATASETS, help='the test split of this dataset')
    p.add_argument('--data-dir', help='dataset folder (CIFAR: torchvision layout; ImageNet: ImageFolder root)')
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
    p.add_argument('--amp', choices=['none', 'bf16'], default='none', help='bf16 autocast (measure its effect first)')
    p.add_argument('--channels-last', action='store_true',
                   help='the model and the surrogate models in torch.channels_last memory format, 4-D inputs '
                        'converted as they enter (faster GPU convolutions; the same results up to float rounding)')
    p.add_argument('--sanity', action='store_true', help='run the adaptive-attack sanity checks on a subset')
    p.add_argument('--sanity-examples', type=int, default=64, help='images the --sanity checks use')
    p.add_argument('--save-adv', action='store_true', help='keep the realised adversarial batches (safetensors)')
    p.add_argument('--device', default=None, help="'cpu' forces the CPU (also under accelerate launch)")
    p.add_argument('--out', type=Path, default=None, help='run folder (default runs/eval/<model>_<protocol>)')
    p.add_argument('--extend-from', type=Path, nargs='+', default=[], metavar='RUN',
                   help='--out folders of other runs of the same model, images and settings (the number of '
                        'examples and the batchings may differ) whose finished batches are reused where they cover '
                        'the same examples: e.g. grow a 1,000-image run to 10,000 images')
    attack = add_config_arguments(p, MSAConfig, 'the attack: MSA and AutoAttack (timm_hpm.eval.MSAConfig)')
    attack.add_argument('--base-surrogate', action=argparse.BooleanOptionalAction, default=False,
                        help="also attack through the model the HPM weights were fine-tuned from, when their tag "
                             "records it (timm_hpm.models.hpm_base_model). Off by default: on Fashion-MNIST that "
                             "transfer broke no image the other stages kept, at 7.9%% of MSA's backward passes "
                             "(README, MSA v4)")
    add_config_arguments(p, PoisonConfig, 'with --protocol poison: the poisoning attack (timm_hpm.eval.PoisonConfig; '
                                          'the defaults are full strength)')
    return p.parse_args(argv)


def load_model(name: str, checkpoint=None, pretrained: bool = True):
    from timm_hpm.attacks import normalized_view
    return normalized_view(create_model(name, checkpoint, pretrained)).eval()  # attacks work on [0, 1] images


def create_model(name: str, checkpoint=None, pretrained: bool = True):
    """The timm model ``name`` (timm name, ``local-dir:``, ``hf-hub:``), ``checkpoint``'s weights loaded into it."""
    import timm

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
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def surrogate_model_names(args) -> list:
    """--surrogate-model's names, then with --base-surrogate the recorded base of the HPM weights (none for other
    models, for --checkpoint and --no-pretrained)."""
    from timm_hpm.models import hpm_base_model
    if args.protocol != 'msa':
        return []
    names = list(args.surrogate_model or [])
    base = hpm_base_model(args.model) if args.base_surrogate and not (args.checkpoint or args.no_pretrained) else None
    return names + [base] if base and base not in names else names


def load_surrogate_models(args, device) -> dict:
    """MSA's surrogate models (:func:`surrogate_model_names`), by their names in the results ('/' becomes '_')."""
    names = surrogate_model_names(args)
    others = {name.replace('/', '_'): load_model(name).to(device) for name in names}
    if args.channels_last:
        others = {name: to_channels_last(other) for name, other in others.items()}
    if others:
        logging.getLogger('evaluate').info('MSA also attacks through %s', ', '.join(names))
    return others


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
    from timm_hpm.cli.config_args import config_from_args
    from timm_hpm.eval import MSAConfig
    return config_from_args(MSAConfig, args, eps=eps, surrogate_models=tuple(surrogate_models))


def poison_options(args, eps: float) -> dict:
    """The poisoning attack's strength options of these arguments (PoisonConfig's fields beyond eps, norm, steps,
    seed), checked (``PoisonConfig``: a ValueError naming the option)."""
    from timm_hpm.cli.config_args import config_from_args
    from timm_hpm.eval.poison import PoisonConfig
    cfg = config_from_args(PoisonConfig, args, eps=eps)
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ('eps', 'norm', 'steps', 'seed')}


def check_options(args, eps: float) -> None:
    """The options' own checks (the library's: MSAConfig, PoisonConfig), up front: a ValueError naming the option."""
    for flag, value in (('--n-examples', args.n_examples), ('--batch-size', args.batch_size)):
        if value < 1:
            raise ValueError(f'{flag} {value}: must be >= 1')
    if args.sanity and args.sanity_examples < 1:
        raise ValueError(f'--sanity-examples {args.sanity_examples}: must be >= 1')
    if args.protocol == 'poison':
        poison_options(args, eps)
    else:
        msa_config(args, eps, [name.replace('/', '_') for name in surrogate_model_names(args)])


def recorded_command(argv=None) -> str:
    """This command line as eval.json records it, shell-quoted (``shlex.split`` gives the arguments back); it begins
    ``python recipes/evaluate.py`` when the checkout's recipe ran, else ``python -m timm_hpm.cli.evaluate``."""
    from timm_hpm.cli import recorded_program
    return shlex.join([*recorded_program('recipes/evaluate.py', 'timm_hpm.cli.evaluate'),
                       *map(str, sys.argv[1:] if argv is None else argv)])


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
                             num_classes=base.num_classes, image_size=base.pretrained_cfg['input_size'], seed=args.seed)
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    # hpm_mode: the head's mode evaluated (given or the model's own), null for a model without an HPM head
    metadata = dict(name=args.model, dataset=args.dataset, hpm_mode=hpm_mode(model),
                    architecture=base.pretrained_cfg.get('architecture'), command=recorded_command(argv),
                    autoattack_backend=timm_hpm.eval.autoattack_backend(), timm_hpm_version=timm_hpm.__version__)
    start = time.time()
    if args.protocol == 'poison':
        result = run_poison(args, eps, poison_options(args, eps), model, x, y, out, accelerator, metadata, finished)
    else:
        others = load_surrogate_models(args, accelerator.device)
        result = run_attacks(args, msa_config(args, eps, others), others, batchings, model, x, y, out, accelerator,
                             metadata, finished)
    if result is None:
        return None
    if finished:
        return report_finished(args, out)
    result['wall_seconds'] = round(time.time() - start, 1)
    result['num_processes'] = accelerator.num_processes
    write_text_atomic(out / 'eval.json', json.dumps(result, indent=2))
    print(f"wrote {out / 'eval.json'}")
    return result


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-evaluate``, ``python -m timm_hpm.cli.evaluate``, recipes/evaluate.py):
    its exit status."""
    main(argv)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
