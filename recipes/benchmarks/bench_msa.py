"""MSA cost vs standard AutoAttack cost on the same HPM model and samples, in one run; and bf16 vs fp32.

    python recipes/benchmarks/bench_msa.py --model local-dir:runs/fashion_mnist_hpm/final --dataset fashion_mnist \\
        --eps 0.1 --n-examples 100

Arms (all on the default batching, same fixed batches): standard AutoAttack on the dynamic HPM target, its images
re-scored on the fixed batches; MSA (AutoAttack + whole-batch APGD through the four surrogates, cascaded); MSA
again under bf16 autocast. Reported: forward/backward images, wall time, robust accuracy of each.
"""
import argparse
import json
import shlex
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import timm_hpm
from timm_hpm.attacks import parse_eps
from timm_hpm.data import load_eval_tensors
from timm_hpm.eval import MSAConfig, evaluate
from timm_hpm.report import markdown_table, update_section


def run(model, x, y, cfg, protocol, amp, batch_size):
    folder = Path(tempfile.mkdtemp(prefix='bench_msa_'))
    try:
        start = time.perf_counter()
        result = evaluate(model, x, y, cfg, folder, protocol=protocol, batch_size=batch_size, amp=amp)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    key = 'msa_acc' if protocol == 'msa' else 'autoattack_acc'
    out = dict(robust_acc=result[key], clean_acc=result['clean_acc'], autoattack_acc=result['autoattack_acc'],
               seconds=seconds, **result['passes'])
    print(f"{protocol}{' bf16' if amp else ''}: {json.dumps(out)}", flush=True)
    return out


def markdown(result) -> str:
    r = result['arms']
    aa, msa = r['autoattack'], r['msa']
    lines = [f"Measured with `{result['command']}` ({result['machine']['threads']} threads): "
             f"{result['n_examples']} {result['dataset']} test images, batch {result['batch_size']}, "
             f"Linf eps {result['eps']:.3f}.", '',
             markdown_table(['arm', 'robust acc', 'forward images', 'backward images', 'wall time (s)'],
                            [[name, f"{100 * a['robust_acc']:.1f}%", a['forward_images'], a['backward_images'],
                              f"{a['seconds']:.0f}"] for name, a in r.items()], 'lrrrr')]
    lines += ['', f"MSA / AutoAttack: x{msa['backward_images'] / max(aa['backward_images'], 1):.2f} backward images, "
                  f"x{msa['seconds'] / aa['seconds']:.2f} wall time; bf16 MSA: x{msa['seconds'] / r['msa_bf16']['seconds']:.2f} "
                  f"faster, robust accuracy {100 * (r['msa_bf16']['robust_acc'] - msa['robust_acc']):+.1f} points."]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='local-dir:runs/fashion_mnist_hpm/final')
    parser.add_argument('--dataset', default='fashion_mnist')
    parser.add_argument('--eps', default='0.1')
    parser.add_argument('--n-examples', type=int, default=100)
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--out', type=Path, default=Path('recipes/benchmarks/results/bench_msa_cpu.json'))
    parser.add_argument('--readme', type=Path, help='rewrite the bench-msa section of this README from --out')
    args = parser.parse_args()
    if args.readme:
        update_section(args.readme, 'bench-msa', markdown(json.loads(args.out.read_text())))
        return
    eps = parse_eps(args.eps)
    model = timm.create_model(args.model, pretrained=True).eval()
    x, y = load_eval_tensors(args.dataset, args.n_examples, pretrained_cfg=model.pretrained_cfg,
                             num_classes=model.num_classes, image_size=model.pretrained_cfg['input_size'])
    cfg = MSAConfig(eps=eps)
    arms = {
        'autoattack': run(model, x, y, cfg, 'autoattack', False, args.batch_size),
        'msa': run(model, x, y, cfg, 'msa', False, args.batch_size),
        'msa_bf16': run(model, x, y, cfg, 'msa', True, args.batch_size),
    }
    result = dict(command=shlex.join(['python', 'recipes/benchmarks/bench_msa.py', *sys.argv[1:]]),
                  dataset=args.dataset,
                  model=args.model, eps=eps, n_examples=args.n_examples, batch_size=args.batch_size, arms=arms,
                  machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == '__main__':
    main()
