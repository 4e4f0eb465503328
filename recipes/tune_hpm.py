"""Tune HPM fine-tuning on the held-out split (never the test set): one fine-tune per candidate, scored there.

    python recipes/tune_hpm.py --sweep studies/fashion_mnist/configs/hpm_sweep.yaml \
        --out studies/fashion_mnist/results/tuning

Each candidate is the sweep's base config with its overrides (``model.hpm.alpha: 0.25``, ``train.max_steps: 400``,
...), fine-tuned by ``recipes/finetune.py`` into ``<runs>/<name>``. It is then scored on the first ``n_val``
held-out images (the last ``data.val_examples`` of the training split, which fine-tuning never sees):

* ``msa_val``: the dynamic head's accuracy on realised fixed batches under the surrogate part of MSA (whole-batch
  APGD-CE and APGD-T through ``fc``, ``static``, ``soft`` and ``dynamic``; AutoAttack on the target is left out to
  keep the sweep affordable, so this is an upper bound on full MSA, used for ranking only);
* ``static_val`` and ``fc_val``: APGD-CE + APGD-DLR accuracy of the static l2 head and of the FC head;
* clean accuracy of each.

The candidate with the highest ``msa_val`` is reported as ``best``. Finished candidates are kept in
``tuning.json`` and skipped when the sweep is run again (an interrupted fine-tune resumes from its checkpoint).
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import timm
import torch
import yaml

import timm_hpm
from timm_hpm.analysis import apgd_accuracy
from timm_hpm.attacks import normalized_view
from timm_hpm.eval import MSAConfig, evaluate
from timm_hpm.eval import ModelView
from timm_hpm.report import tuning_table
from timm_hpm.study import finetune, held_out
from timm_hpm.train import RunFolderError, load_config

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sweep', type=Path, required=True, help='YAML: config, candidates {name: overrides}, scoring')
    p.add_argument('--out', type=Path, required=True, help='folder for tuning.json (and the scoring runs)')
    p.add_argument('--runs', type=Path, default=Path('runs/tune'), help='where the candidates are fine-tuned')
    p.add_argument('--only', nargs='*', help='run these candidates only')
    p.add_argument('--device', default='cpu', choices=['cpu', 'auto'])
    return p.parse_args(argv)


def score(model, x, y, eps, norm, scoring, work_dir: Path) -> dict:
    """Held-out figures of an HPM model (eval mode)."""
    iters = scoring.get('apgd_iters', 20)
    attacked = normalized_view(model)
    out = {}
    for mode in ('fc', 'static'):
        view = ModelView(attacked, mode)
        with torch.no_grad():
            out[f'{mode}_clean'] = (view(x).argmax(1) == y).float().mean().item()
        out[f'{mode}_val'] = apgd_accuracy(view, x, y, eps, norm, iters, generator=torch.Generator().manual_seed(0))
    cfg = MSAConfig(eps=eps, norm=norm, apgd_iters=iters, n_target_classes=scoring.get('n_target_classes', 3),
                    autoattack=False)
    result = evaluate(attacked, x, y, cfg, work_dir, protocol='msa', batch_size=scoring.get('batch_size', 128),
                      batchings=('default',), progress=False)
    b = result['batchings']['default']
    out.update(dynamic_clean=b['clean_acc'], msa_val=b['realised_acc'],
               msa_val_per_surrogate=b['per_surrogate_acc'])
    return out


def main(argv=None):
    args = parse_args(argv)
    sweep = yaml.safe_load(args.sweep.read_text())
    unknown = set(sweep) - {'config', 'common', 'candidates', 'scoring', 'base_model'}
    if unknown:
        raise SystemExit(f'{args.sweep}: unknown keys {sorted(unknown)}')
    config = REPO / sweep['config'] if not Path(sweep['config']).is_absolute() else Path(sweep['config'])
    scoring = sweep.get('scoring', {})
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / 'tuning.json'
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault('candidates', {})
    results.update(sweep=str(args.sweep), config=str(sweep['config']), common=sweep.get('common', {}), scoring=scoring,
                   command=shlex.join(['python', 'recipes/tune_hpm.py', *(argv if argv is not None else sys.argv[1:])]))
    base_cfg = load_config(config)
    eps, norm = base_cfg.eps, base_cfg.attack.norm

    if 'base_model' in sweep and 'base' not in results:  # the base's FC head on the same held-out images
        base = timm.create_model(sweep['base_model'], pretrained=True).eval()
        x, y = held_out(base_cfg, scoring.get('n_val', 500), base)
        view = normalized_view(base)
        with torch.no_grad():
            clean = (view(x).argmax(1) == y).float().mean().item()
        results['base'] = {'model': sweep['base_model'], 'fc_clean': clean,
                           'fc_val': apgd_accuracy(view, x, y, eps, norm, scoring.get('apgd_iters', 20),
                                                   generator=torch.Generator().manual_seed(0))}
        results_path.write_text(json.dumps(results, indent=2))
        print(f"base {sweep['base_model']}: {results['base']}", flush=True)

    for name, overrides in sweep['candidates'].items():
        if args.only and name not in args.only:
            continue
        if name in results['candidates']:
            print(f'{name}: done ({results["candidates"][name]["msa_val"]:.4f})', flush=True)
            continue
        run_dir = args.runs / name
        overrides = {**sweep.get('common', {}), **(overrides or {})}
        try:  # a run folder already there is reused (or resumed) only with this candidate's configuration
            train_seconds = finetune(config, run_dir, overrides, args.device, name)
        except RunFolderError as error:
            raise SystemExit(str(error)) from None
        (args.out / 'configs').mkdir(exist_ok=True)  # the resolved config of every candidate, kept with the results
        (args.out / 'configs' / f'{name}.yaml').write_text((run_dir / 'config.yaml').read_text())
        model = timm.create_model(f'local-dir:{run_dir / "final"}', pretrained=True).eval()
        cfg = load_config(config, overrides)
        x, y = held_out(cfg, scoring.get('n_val', 500), model)
        tic = time.time()
        common = sweep.get('common', {})
        record = dict(overrides={k: v for k, v in overrides.items() if k not in common or common[k] != v},
                      run_dir=str(run_dir), train_seconds=train_seconds,
                      **score(model, x, y, eps, norm, scoring, args.out / 'scoring' / name))
        record['score_seconds'] = round(time.time() - tic, 1)
        record['gamma'] = float(timm_hpm.get_hpm_head(model).gamma.detach())
        # Re-read before writing: several sweep processes (--only) may share one tuning.json.
        latest = json.loads(results_path.read_text()) if results_path.exists() else {}
        results['candidates'] = {**latest.get('candidates', {}), **results['candidates'], name: record}
        results['best'] = max(results['candidates'], key=lambda k: results['candidates'][k]['msa_val'])
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{name}: msa_val {record['msa_val']:.4f} static_val {record['static_val']:.4f} "
              f"fc_val {record['fc_val']:.4f} clean {record['dynamic_clean']:.4f}", flush=True)
    latest = json.loads(results_path.read_text()) if results_path.exists() else {}
    results['candidates'] = {**latest.get('candidates', {}), **results['candidates']}
    if results['candidates']:
        results['best'] = max(results['candidates'], key=lambda k: results['candidates'][k]['msa_val'])
    results_path.write_text(json.dumps(results, indent=2))
    print(tuning_table(results))
    return results


if __name__ == '__main__':
    main()
