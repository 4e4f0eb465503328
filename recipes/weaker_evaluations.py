"""How a weaker evaluation would read (issue #14): the figure each common evaluation of a batch-dependent model
reports, beside MSA's, from two finished runs on the same images and batches (``timm_hpm/eval/ladder.py``).

    python recipes/weaker_evaluations.py --msa results/fashion_mnist/eval_hpm_msa4_250 \\
        --paper results/fashion_mnist/eval_hpm_paper_250                      # print
    python recipes/weaker_evaluations.py ... --update studies/fashion_mnist/README.md  # the study's generated section

The paper-protocol run is ``recipes/evaluate.py`` with ``--surrogate-autoattack --no-surrogate-apgd --no-cascade
--combine-rounds 0 --no-score-iterates`` (AutoAttack on the target and on each surrogate view,
every candidate scored on the fixed batches, the per-sample worst case).
"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--msa', type=Path, required=True, help='run folder of an MSA run (MSA v3 or later)')
    parser.add_argument('--paper', type=Path, required=True, help="run folder of the paper-protocol run")
    parser.add_argument('--update', type=Path, help='rewrite the section between the markers in this file')
    args = parser.parse_args(argv)
    from timm_hpm.eval.ladder import evaluation_ladder, ladder_table
    from timm_hpm.report import print_or_update
    msa, paper = (json.loads((folder / 'eval.json').read_text()) for folder in (args.msa, args.paper))
    rows = evaluation_ladder(msa, paper)
    text = '\n'.join([
        f"`{msa['name']}`, the first {msa['n_examples']} test images, fixed batches of {msa['batch_size']}, "
        f"{msa['threat_model']} eps {msa['eps']:g}, clean {100 * msa['clean_acc']:.1f}%. Runs: `{args.msa}` "
        f"(`{msa['command']}`) and `{args.paper}` (`{paper['command']}`); table: "
        f"`python recipes/weaker_evaluations.py --msa {args.msa} --paper {args.paper}`.", '', ladder_table(rows)])
    print_or_update(text, args.update, 'weaker-evaluations')
    return rows


if __name__ == '__main__':
    main()
