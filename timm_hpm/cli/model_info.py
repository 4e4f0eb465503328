"""RobustBench ``model_info.json`` from finished evaluations.

    python -m timm_hpm.cli.model_info results/fashion_mnist/eval_hpm_msa4_1000/eval.json [more eval.json ...]

(in a checkout, ``python recipes/model_info.py`` runs this module.)

recipes/evaluate.py writes ``model_info.json`` next to ``eval.json`` when a run finishes; this writes it again from
the ``eval.json`` (which it never changes), e.g. after the export's format changed. ``autoattack_acc``, the field
RobustBench ranks by, holds the worst case the evaluation measured (``timm_hpm.robustbench.model_info``).
"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('results', type=Path, nargs='+', help="eval.json files of recipes/evaluate.py's runs")
    p.add_argument('--name', help="the model's name in the entry (default: the eval.json's 'name')")
    args = p.parse_args(argv)
    from timm_hpm.robustbench import model_info
    from timm_hpm.runfiles import write_text_atomic
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f'{path}: not a readable eval.json ({error})')
        if result.get('protocol') not in ('msa', 'autoattack') or 'clean_acc' not in result:
            raise SystemExit(f"{path}: not an MSA or AutoAttack evaluation (protocol {result.get('protocol')!r}); "
                             'model_info.json is for those')
        info = model_info(result, args.name or result['name'])
        write_text_atomic(path.parent / 'model_info.json', json.dumps(info, indent=2))
        print(f"{path.parent / 'model_info.json'}: autoattack_acc {info['autoattack_acc']}"
              f"{' (unreliable: ' + info['footnote'].split('reduced attack budget: ')[-1] if info['unreliable'] else ''}")


if __name__ == '__main__':
    main()
