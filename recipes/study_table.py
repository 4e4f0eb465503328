"""The README's Fashion-MNIST study tables, generated from the committed JSON results (never typed by hand).

    python recipes/study_table.py --n-test 250 --n-sensitivity 500                    # print
    python recipes/study_table.py --n-test 250 --n-sensitivity 500 --update README.md  # rewrite the README section
"""
import argparse
import json
import sys
from pathlib import Path

from timm_hpm.analysis import format_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / 'recipes'), str(ROOT / 'recipes' / 'benchmarks')]
from readme_sections import update_section  # noqa: E402
from tune_hpm import format_table as tuning_table  # noqa: E402


def _pct(v) -> str:
    return 'unknown' if v is None else f'{100 * v:.1f}%'


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def study_tables(results: Path, n_test: int, n_sensitivity: int = None) -> str:
    base = _load(results / f'eval_base_{n_test}' / 'eval.json')
    static = _load(results / f'eval_static_{n_test}' / 'eval.json')
    hpm = _load(results / f'eval_hpm_{n_test}' / 'eval.json')
    tuning = _load(results / 'tuning' / 'tuning.json')
    sens = _load(results / f'sensitivity_{n_sensitivity or n_test}' / 'sensitivity.json')
    out = []
    rel = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    if base or static or hpm:
        out += [f'Test set: the first {n_test} of the 10,000 Fashion-MNIST test images, Linf eps 0.1, fixed batches of '
                f"{(hpm or base or static)['batch_size']}. Results: `{rel}/eval_*_{n_test}/eval.json`. An MSA stage "
                'row is the best candidate batch that stage produced from the realised batch so far; the worst case '
                'is the realised batch after all stages.', '',
                '| model | head | attack | clean | robust | command |', '|---|---|---|---:|---:|---|']
        if base:
            out.append(f"| base `small_cnn.fmnist_pgdat` | fc | AutoAttack (standard) | {_pct(base['clean_acc'])} | "
                       f"{_pct(base['autoattack_acc'])} | `{base['command']}` |")
        if static:
            out.append(f"| HPM `hpm_small_cnn.fmnist_hpm` | static l2 | AutoAttack (standard) | "
                       f"{_pct(static['clean_acc'])} | {_pct(static['autoattack_acc'])} | `{static['command']}` |")
        if hpm:
            order = ['autoattack'] + list(hpm['settings']['msa']['surrogates'])
            for batching, b in hpm['batchings'].items():
                for name in [s for s in order if s in b['per_surrogate_acc']]:
                    label = 'AutoAttack on the target' if name == 'autoattack' else f'APGD-CE/T via {name}'
                    out.append(f"| HPM `hpm_small_cnn.fmnist_hpm` | dynamic | MSA ({batching} batching) stage: "
                               f"{label} | {_pct(b['clean_acc'])} | {_pct(b['per_surrogate_acc'][name])} | |")
                out.append(f"| HPM `hpm_small_cnn.fmnist_hpm` | dynamic | **MSA ({batching} batching), worst case** | "
                           f"{_pct(b['clean_acc'])} | **{_pct(b['realised_acc'])}** | |")
            out.append(f"| HPM `hpm_small_cnn.fmnist_hpm` | dynamic | **MSA, worst batching ({hpm['worst_batching']})** "
                       f"| {_pct(hpm['clean_acc'])} | **{_pct(hpm['msa_acc'])}** | `{hpm['command']}` |")
    if tuning:
        sc = tuning['scoring']
        out += ['', f"Tuning on held-out training images (the first {sc['n_val']} of the 5,000 the fine-tuning never "
                f"sees; never the test set), one option at a time around `{tuning['config']}` with "
                f"{', '.join(f'{k}={v}' for k, v in tuning['common'].items())}: "
                f"`{tuning['command']}`. MSA-surrogates = the surrogate part of MSA ({sc['apgd_iters']} APGD "
                f"iterations, {sc['n_target_classes']} targets, fixed batches of {sc['batch_size']}) without AutoAttack "
                'on the target: an upper bound on MSA, used for ranking. APGD = APGD-CE then APGD-DLR.', '']
        out.append(tuning_table(tuning))
    if sens:
        out += ['', f"Sensitivity of `{sens['model']}` (FC head vs static l2 head, same weights; first "
                f"{sens['n_examples']} test images; {sens['robust_accuracy']['attack']}): `{sens['command']}`", '',
                format_summary(sens)]
    return '\n'.join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--results', type=Path, default=ROOT / 'results' / 'fashion_mnist')
    parser.add_argument('--n-test', type=int, required=True)
    parser.add_argument('--n-sensitivity', type=int, help='test images of the sensitivity run (default: --n-test)')
    parser.add_argument('--update', type=Path, help='rewrite the section between the markers in this file')
    args = parser.parse_args()
    text = study_tables(args.results.resolve(), args.n_test, args.n_sensitivity)
    if args.update is None:
        print(text)
        return
    update_section(args.update, 'fmnist-study', text)


if __name__ == '__main__':
    main()
