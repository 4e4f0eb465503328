"""The backward images of one surrogate stage of an MSA run made before units recorded each stage's cost, derived
from its unit files (runs since record it: ``recipes/msa_parts.py`` prints it).

    python recipes/benchmarks/stage_cost_from_units.py --run results/fashion_mnist/eval_hpm_msa3_1000 \\
        --stage small_cnn.fmnist_pgdat --n 500 1000

For a batch-independent surrogate the stage attacks, with APGD-CE and APGD-T (``n_target_classes`` targets from the
run's settings), the images still correct in the realised batch when it starts (from each unit's candidates, in the
order they ran); one APGD run's backward images per image are counted with a PassCounter on a small model (they do
not depend on the model). Prints the stage's share of the run's backward images and the run's total without it.
"""
import argparse
from pathlib import Path


def backward_images_per_apgd_run(n_iter: int) -> float:
    """Backward images one APGD-CE run of ``n_iter`` iterations makes per image (counted, not assumed)."""
    import torch
    import torch.nn as nn

    from timm_hpm.attacks import apgd
    from timm_hpm.eval import ModelView, PassCounter
    torch.manual_seed(0)
    counter = PassCounter()
    model = ModelView(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), None, counter, batch_dependent=False)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    apgd(model, x, y, 0.1, 'Linf', n_iter, loss='ce', generator=torch.Generator().manual_seed(0))
    return counter.backward / 3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', type=Path, required=True, help='an evaluate.py --out folder (MSA, cascade on)')
    p.add_argument('--stage', required=True, help='the surrogate stage, e.g. small_cnn.fmnist_pgdat')
    p.add_argument('--n', type=int, nargs='+', required=True, help='the first N examples (whole units)')
    args = p.parse_args(argv)
    from timm_hpm.eval.run_header import read_run_settings
    from timm_hpm.eval.unit_store import read_units
    settings = read_run_settings(args.run / 'attack')['msa']  # the header of its units file (or a settings.json)
    if not settings.get('cascade', True):
        raise SystemExit('the run did not use the cascade: every stage attacked every clean-correct image')
    per_run = backward_images_per_apgd_run(settings['apgd_iters'])
    runs = 1 + settings['n_target_classes']
    print(f"one {settings['apgd_iters']}-iteration APGD run: {per_run:g} backward images per image; the stage makes "
          f'{runs} runs (APGD-CE and {runs - 1} APGD-T targets)')
    for n in args.n:
        active = total = 0
        for (batching, _), unit in sorted(read_units(args.run / 'attack').items()):
            if batching != 'default' or max(unit['indices']) >= n:
                continue
            total += unit['passes']['backward_images']
            realised = list(unit['clean'])
            for name in unit['stages']:
                if name.split('/')[0] == args.stage:
                    break
                correct = unit['candidates'][name]
                if not name.endswith(':iterates') and sum(correct) < sum(realised):  # the realised batch took it
                    realised = list(correct)
            active += sum(realised)
        stage = per_run * runs * active
        print(f'first {n}: {active} images still correct when the stage starts; the stage ~{stage:.0f} of {total} '
              f'backward images ({100 * stage / total:.1f}%); without it {total - stage:.0f}')


if __name__ == '__main__':
    main()
