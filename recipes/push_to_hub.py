"""Export + model card + push to the Hugging Face Hub.

    python recipes/push_to_hub.py --run runs/<run>/final --results runs/<run>/eval.json --repo-id <org>/<name> [--dry-run]
    python recipes/push_to_hub.py --model hpm_small_cnn.fmnist_hpm --results ... --repo-id ... --dry-run  # shipped weights

Builds the upload folder (model.safetensors, config.json, README.md card generated from the results JSON,
the results, the training config), writes the card to ``hub_cards/<name>.md`` too, and uploads with
huggingface_hub unless ``--dry-run``. Refuses results measured on other weights (the fingerprint that
recipes/evaluate.py records next to eval.json must be that of the weights pushed) unless
``--allow-mismatched-results``, which the card then states; refuses an invalid repo id, in dry runs too; refuses
to replace a card already on the Hub without ``--overwrite-card``. The token comes from HF_TOKEN or
``hf auth login`` and is never printed.
"""
import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument('--out', type=Path, help='where to assemble the upload folder (default runs/hub/<name>)')
    p.add_argument('--cards-dir', type=Path, default=ROOT / 'hub_cards')
    p.add_argument('--dry-run', action='store_true', help='assemble and list, touch no network')
    p.add_argument('--overwrite-card', action='store_true')
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
    for path, result, what in ((args.base_results, base_result, 'the base'),
                               (args.control_results, control_result, 'the budget-matched control')):
        flags = robust_flags(path.parent) if path is not None and model_flags is not None else None
        if flags is None:
            if path is not None:
                print(f'warning: no per-image results next to {args.results} and {path}: the card gives no paired '
                      f'comparison with {what}', file=sys.stderr)
            continue
        try:
            attack = {'autoattack': 'AutoAttack', 'msa': 'MSA'}.get(result.get('protocol'), result.get('protocol'))
            out.append(paired_comparison(model_flags, flags, f"{what} (`{result.get('name')}`) under {attack}"))
        except ValueError as error:
            raise SystemExit(f'{args.results} and {path}: {error}; evaluate both on the same images.')
    return out


def assemble(args) -> Path:
    from timm_hpm.cards import load_json, render_card
    from timm_hpm.hub import save_for_hub
    check_repo_id(args.repo_id)
    model = load_weights(args)
    unverified = check_results(args, model)
    name = args.repo_id.split('/')[-1]
    out = args.out or ROOT / 'runs' / 'hub' / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run = save_for_hub(model, out / '.export') if args.model else args.run
    for filename in ('model.safetensors', 'config.json'):
        shutil.copy2(run / filename, out / filename)
    result = load_json(args.results)
    base_result = load_json(args.base_results) if args.base_results else None
    control_result = load_json(args.control_results) if args.control_results else None
    if args.model:
        shutil.rmtree(out / '.export')
    training_config_path = args.training_config or (args.run.parent / 'config.yaml' if args.run else None)
    training_config = training_config_path.read_text() if training_config_path and training_config_path.is_file() \
        else None
    card = render_card(result, args.repo_id, load_json(out / 'config.json'), base_result=base_result,
                       training_config=training_config, base_model=args.base_model, license=args.license,
                       license_name=args.license_name, unverified_results=unverified,
                       batch_order=batch_order_row(args.batch_order, model) if args.batch_order else None,
                       natural_result=load_json(args.natural_results) if args.natural_results else None,
                       poisoning_result=load_json(args.poisoning_results) if args.poisoning_results else None,
                       control_result=control_result, comparisons=comparisons(args, base_result, control_result))
    (out / 'README.md').write_text(card)
    shutil.copy2(args.results, out / 'eval_hpm.json')
    if args.base_results:
        shutil.copy2(args.base_results, out / 'eval_base.json')
    if args.control_results:
        shutil.copy2(args.control_results, out / 'eval_control.json')
    if args.natural_results:
        shutil.copy2(args.natural_results, out / 'eval_hpm_class_sorted.json')
    if args.batch_order:
        shutil.copy2(args.batch_order, out / 'batch_order.json')
    if args.poisoning_results:
        shutil.copy2(args.poisoning_results, out / 'eval_poisoning.json')
    if training_config:
        (out / 'training_config.yaml').write_text(training_config)
    args.cards_dir.mkdir(parents=True, exist_ok=True)
    (args.cards_dir / f'{name}.md').write_text(card)
    return out


def main(argv=None):
    args = parse_args(argv)
    folder = assemble(args)
    files = sorted(p.name for p in folder.iterdir())
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


if __name__ == '__main__':
    main()
