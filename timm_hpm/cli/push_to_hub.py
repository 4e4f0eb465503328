"""Export + model card + push to the Hugging Face Hub.

    timm-hpm-push --run runs/<run>/final --results runs/<run>/eval.json --repo-id <org>/<name> [--dry-run]
    timm-hpm-push --model hpm_small_cnn.fmnist_hpm --results ... --repo-id ... --dry-run  # the shipped weights
    timm-hpm-push ... --cards-dir hub_cards     # also update the repository's copy of the card

(``python -m timm_hpm.cli.push_to_hub``; in a checkout, ``python recipes/push_to_hub.py`` runs this module.)

Builds the upload folder ``--out`` (default runs/hub/<name>: model.safetensors, config.json, README.md card
generated from the results JSON, the results, the training config) and uploads it with huggingface_hub unless
``--dry-run``. ``--out`` must be new or empty, or an upload folder this script assembled before (it records the
files it wrote in ``.timm_hpm_upload.json``): there only those files are replaced, anything else is left alone and
not uploaded; any other folder is refused, and nothing is ever deleted that this script did not write. The card is
copied to ``<cards-dir>/<name>.md`` only when ``--cards-dir`` is given (the repository's ``hub_cards/`` is written
only on request: a dry run writes nothing there); a different card already there is replaced only with
``--overwrite-card``. Refuses results measured on other weights (the fingerprint that recipes/evaluate.py records
next to eval.json must be that of the weights pushed) unless ``--allow-mismatched-results``, which the card then
states; refuses an invalid repo id, in dry runs too; refuses to replace a card already on the Hub without
``--overwrite-card``. The token comes from HF_TOKEN or ``hf auth login`` and is never printed.
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

#: Every file this script writes into an upload folder (the card copy in --cards-dir aside).
UPLOAD_FILES = ('model.safetensors', 'config.json', 'README.md', 'eval_hpm.json', 'eval_base.json', 'eval_control.json',
                'eval_hpm_class_sorted.json', 'batch_order.json', 'eval_poisoning.json', 'training_config.yaml')


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='The Hub token comes from huggingface_hub: $HF_TOKEN, or the token saved by `hf auth login` '
               '(~/.cache/huggingface/token). It is never printed. --dry-run needs none.')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--run', type=Path, help='Hub-ready folder (model.safetensors + config.json)')
    source.add_argument('--model', help="a registered model with its tag (e.g. hpm_small_cnn.fmnist_hpm): its "
                                        "pretrained weights are exported with timm_hpm.hub.save_for_hub")
    p.add_argument('--results', type=Path, required=True, help='eval.json of the HPM model (--protocol msa), in '
                                                               'its evaluation run folder')
    p.add_argument('--allow-mismatched-results', action='store_true',
                   help='publish results that cannot be matched to these weights; the card says so')
    p.add_argument('--base-results', type=Path, help='eval.json of the base model (--protocol autoattack)')
    p.add_argument('--control-results', type=Path, help='eval.json of the budget-matched control (the base fine-tuned '
                   "with plain PGD-AT under this model's budget; --protocol autoattack)")
    p.add_argument('--batch-order', type=Path, help="table.json of recipes/batch_order_table.py with this model's "
                   'clean accuracy by batch order and size (the card then says what validate.py gives)')
    p.add_argument('--natural-results', type=Path, help='eval.json of MSA on the worst natural batching '
                   '(recipes/evaluate.py --batchings class_sorted), in its run folder')
    p.add_argument('--poisoning-results', type=Path, help='eval.json of recipes/evaluate.py --protocol poison on '
                                                           'this model (the card reports it)')
    p.add_argument('--training-config', type=Path, help='default: config.yaml next to the run folder')
    p.add_argument('--base-model', help="the base model's Hub id or RobustBench name (card metadata)")
    p.add_argument('--repo-id', required=True)
    p.add_argument('--license', default='other', help="an HF license id; 'other' with --license-name")
    p.add_argument('--license-name', default='unknown')
    p.add_argument('--out', type=Path, help='where to assemble the upload folder (default runs/hub/<name>): a new or '
                                            'empty folder, or one this script assembled before (only its files are '
                                            'replaced); any other folder is refused')
    p.add_argument('--cards-dir', type=Path, default=None,
                   help="also write the card to <cards-dir>/<name>.md (e.g. hub_cards, the repository's cards); "
                        'default: no copy, the card is the upload folder\'s README.md')
    p.add_argument('--dry-run', action='store_true', help='assemble and list, touch no network')
    p.add_argument('--overwrite-card', action='store_true',
                   help='replace a card already on the Hub, or a different card in --cards-dir')
    p.add_argument('--private', action='store_true')
    return p.parse_args(argv)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SystemExit(f'--repo-id: {error}') from None
    if '/' not in repo_id:
        raise SystemExit(f"--repo-id {repo_id!r}: give it as '<user or organisation>/<name>' (the card's loading "
                         'command names the repo).')


def load_weights(args):
    """The model being published: --model's registered weights or the --run folder's."""
    import timm
    if args.model:
        return timm.create_model(args.model, pretrained=True).eval()
    for filename in ('model.safetensors', 'config.json'):
        if not (args.run / filename).is_file():
            raise SystemExit(f'{args.run} has no {filename}: point --run at a folder written by recipes/finetune.py '
                             '(runs/<run>/final) or timm_hpm.hub.save_for_hub.')
    return timm.create_model(f'local-dir:{args.run}', pretrained=True).eval()


def check_results(args, model):
    """Refuse results measured on other weights unless --allow-mismatched-results; returns what the card must say
    (None: the results are these weights')."""
    from timm_hpm.hub import unverified_results
    reasons = [unverified_results(path, model) for path in (args.results, args.natural_results, args.poisoning_results)
               if path]
    reason = ' '.join(r for r in reasons if r) or None
    if reason and not args.allow_mismatched_results:
        raise SystemExit(f"refusing to make the card: {reason} It would show another model's figures. Evaluate the "
                         'weights being pushed with recipes/evaluate.py and pass that eval.json, or pass '
                         '--allow-mismatched-results to publish anyway (the card then says so).')
    if reason:
        print(f'warning: {reason} The card says so (--allow-mismatched-results).', file=sys.stderr)
    return reason


def batch_order_row(path: Path, model) -> dict:
    """This model's row of a batch-order table, found by its fingerprint (never another model's figures)."""
    from timm_hpm.attacks import normalized_view
    from timm_hpm.cards import load_json
    from timm_hpm.eval import model_fingerprint
    table = load_json(path)
    fingerprint = model_fingerprint(normalized_view(model).eval())
    rows = [row for row in table['models'].values() if row.get('model_sha256') == fingerprint]
    if not rows:
        raise SystemExit(f'{path} has no row measured on these weights (no model_sha256 equals {fingerprint[:16]}...); '
                         'run recipes/batch_order_table.py on the model being pushed.')
    return dict(rows[0], n_test=table['n_test'], batch_sizes=table['batch_sizes'], command=table['command'])


def comparisons(args, base_result, control_result) -> list:
    """The model against the base and the control on the same images, from the per-image results in each eval.json's
    run folder (none where a run folder has no unit files, e.g. an eval.json copied out of its folder)."""
    from timm_hpm.cards import paired_comparison
    from timm_hpm.eval import robust_flags
    model_flags = robust_flags(args.results.parent)
    out = []
    for path, result, what, role in ((args.base_results, base_result, 'the base', 'base'),
                                     (args.control_results, control_result, 'the budget-matched control', 'control')):
        flags = robust_flags(path.parent) if path is not None and model_flags is not None else None
        if flags is None:
            if path is not None:
                print(f'warning: no per-image results next to {args.results} and {path}: the card gives no paired '
                      f'comparison with {what}', file=sys.stderr)
            continue
        try:
            attack = {'autoattack': 'AutoAttack', 'msa': 'MSA'}.get(result.get('protocol'), result.get('protocol'))
            out.append(paired_comparison(model_flags, flags, f"{what} (`{result.get('name')}`) under {attack}",
                                          role=role))
        except ValueError as error:
            raise SystemExit(f'{args.results} and {path}: {error}; evaluate both on the same images.')
    return out


def check_out_folder(out: Path, inputs) -> list:
    """The files of an earlier assembly in ``out`` that this one replaces ([] for a new or empty folder). Refused
    (nothing changed): a folder holding an input of this command, and a folder with anything in it that this
    script did not assemble (no manifest): nothing is ever deleted that this script did not write."""
    from timm_hpm.hub import UPLOAD_MANIFEST, upload_files
    resolved = out.resolve()
    for path in inputs:
        if path is not None and (Path(path).resolve() == resolved or resolved in Path(path).resolve().parents):
            raise SystemExit(f'--out {out} holds {path}, an input of this command; nothing was changed. Assemble the '
                             'upload folder in a new folder (--out; default runs/hub/<name>).')
    if out.exists() and not out.is_dir():
        raise SystemExit(f'--out {out} is a file, not a folder; nothing was changed. Pass a new folder as --out.')
    if not out.is_dir() or not any(out.iterdir()):
        return []
    previous = upload_files(out)
    if previous is None:
        names = sorted(p.name for p in out.iterdir())
        raise SystemExit(f'--out {out} exists and holds files this script did not write ('
                         f'{", ".join(names[:5])}{", ..." if len(names) > 5 else ""}; no {UPLOAD_MANIFEST}); nothing '
                         'was changed or deleted. Pass a new or empty folder as --out (default runs/hub/<name>).')
    return [f for f in previous if f in UPLOAD_FILES]


def recorded_command(argv=None) -> str:
    """This command line, shell-quoted (shlex.split gives the arguments back); it begins ``python
    recipes/push_to_hub.py`` when the checkout's recipe ran, else ``python -m timm_hpm.cli.push_to_hub``."""
    from timm_hpm.cli import recorded_program
    return shlex.join([*recorded_program('recipes/push_to_hub.py', 'timm_hpm.cli.push_to_hub'),
                       *map(str, sys.argv[1:] if argv is None else argv)])


def assemble(args, argv=None) -> Path:
    """The upload folder: everything is checked and built in a temporary folder next to ``--out`` first, then moved
    into it (replacing only the files of an earlier assembly there); the card copy goes to ``--cards-dir`` when given.
    A refusal leaves ``--out`` and ``--cards-dir`` as they were."""
    from timm_hpm.cards import load_json, render_card
    from timm_hpm.hub import UPLOAD_MANIFEST, save_for_hub
    from timm_hpm.runfiles import write_text_atomic
    check_repo_id(args.repo_id)
    name = args.repo_id.split('/')[-1]
    out = args.out or Path('runs') / 'hub' / name
    inputs = (args.run, args.results, args.base_results, args.control_results, args.natural_results,
              args.poisoning_results, args.batch_order, args.training_config)
    check_out_folder(out, inputs)
    model = load_weights(args)
    unverified = check_results(args, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f'.{out.name}.assembling-') as tmp:
        stage = Path(tmp)
        if args.model:
            run = save_for_hub(model, stage / 'export')
        else:
            run = args.run
        for filename in ('model.safetensors', 'config.json'):
            shutil.copy2(run / filename, stage / filename)
        result = load_json(args.results)
        base_result = load_json(args.base_results) if args.base_results else None
        control_result = load_json(args.control_results) if args.control_results else None
        training_config_path = args.training_config or (args.run.parent / 'config.yaml' if args.run else None)
        training_config = training_config_path.read_text() if training_config_path and \
            training_config_path.is_file() else None
        card = render_card(result, args.repo_id, load_json(stage / 'config.json'), base_result=base_result,
                           training_config=training_config, base_model=args.base_model, license=args.license,
                           license_name=args.license_name, unverified_results=unverified,
                           batch_order=batch_order_row(args.batch_order, model) if args.batch_order else None,
                           natural_result=load_json(args.natural_results) if args.natural_results else None,
                           poisoning_result=load_json(args.poisoning_results) if args.poisoning_results else None,
                           control_result=control_result, comparisons=comparisons(args, base_result, control_result))
        (stage / 'README.md').write_text(card)
        for path, filename in ((args.results, 'eval_hpm.json'), (args.base_results, 'eval_base.json'),
                               (args.control_results, 'eval_control.json'),
                               (args.natural_results, 'eval_hpm_class_sorted.json'),
                               (args.batch_order, 'batch_order.json'),
                               (args.poisoning_results, 'eval_poisoning.json')):
            if path:
                shutil.copy2(path, stage / filename)
        if training_config:
            (stage / 'training_config.yaml').write_text(training_config)
        card_copy = args.cards_dir / f'{name}.md' if args.cards_dir else None
        if card_copy is not None and card_copy.is_file() and card_copy.read_text() != card and \
                not args.overwrite_card:
            raise SystemExit(f'{card_copy} holds another card (other figures or text); nothing was written. Pass '
                             '--overwrite-card to replace it, another --cards-dir, or none (the card is the upload '
                             "folder's README.md).")
        files = [f for f in UPLOAD_FILES if (stage / f).is_file()]
        previous = check_out_folder(out, inputs)  # again: the folder may have changed while the card was made
        out.mkdir(exist_ok=True)
        for filename in previous:
            if filename not in files:
                (out / filename).unlink(missing_ok=True)
        for filename in files:
            os.replace(stage / filename, out / filename)
        write_text_atomic(out / UPLOAD_MANIFEST, json.dumps({
            'written_by': 'recipes/push_to_hub.py', 'repo_id': args.repo_id, 'files': files,
            'command': recorded_command(argv)}, indent=2))
    if card_copy is not None:
        card_copy.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(card_copy, card)
    return out


def main(argv=None):
    from timm_hpm.hub import upload_files
    args = parse_args(argv)
    folder = assemble(args, argv)
    files = sorted(upload_files(folder))
    print(f'upload folder: {folder}')
    for f in files:
        print(f'  {f} ({(folder / f).stat().st_size} bytes)')
    if args.dry_run:
        print(f'dry run: would upload {len(files)} files to https://huggingface.co/{args.repo_id} (nothing sent)')
        return folder
    from timm_hpm.hub import CardExistsError, push_folder
    try:
        info = push_folder(folder, args.repo_id, private=args.private, overwrite_card=args.overwrite_card)
    except (CardExistsError, ConnectionError) as error:
        print(f'not uploaded: {error}', file=sys.stderr)
        sys.exit(1)
    print(f'uploaded: {getattr(info, "commit_url", info)}')
    return folder


def cli(argv=None) -> int:
    """:func:`main` as a command (``timm-hpm-push``, ``python -m timm_hpm.cli.push_to_hub``,
    recipes/push_to_hub.py): its exit status."""
    main(argv)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
