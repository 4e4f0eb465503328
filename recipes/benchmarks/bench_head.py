"""HPM model vs its base model, same run: forward and forward+backward (input gradient, as attacks do).

    python recipes/benchmarks/bench_head.py

Models share the backbone, so the ratio measures the head's overhead. Timings alternate base/HPM
(ABAB...) so drift of the machine hits both alike; the median of ``--repeats`` runs is reported.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import timm_hpm
from timm_hpm.report import markdown_table, update_section


def _time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    return [_timed(fn) for _ in range(repeats)]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def forward_backward_fn(model, x, y):
    def run():
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg), y)
        torch.autograd.grad(loss, xg)
    return run


def compare(name_base, name_hpm, batch, repeats, model_kwargs):
    torch.manual_seed(0)
    base = timm.create_model(name_base, **model_kwargs).eval()
    hpm = timm.create_model(name_hpm, **model_kwargs).eval()
    hpm.load_state_dict(timm_hpm.models.hpm_checkpoint_filter(base.state_dict(), hpm))
    c, h, w = base.pretrained_cfg['input_size']
    x = torch.rand(batch, c, h, w)
    y = torch.randint(0, base.num_classes, (batch,))
    rows = {}
    for what, make in (('forward', lambda m: forward_fn(m, x)), ('forward_backward', lambda m: forward_backward_fn(m, x, y))):
        times = {'base': [], 'hpm': []}
        for fn in (make(base), make(hpm)):
            fn()  # warm-up
        for _ in range(repeats):
            times['base'].append(_timed(make(base)))
            times['hpm'].append(_timed(make(hpm)))
        b, m = statistics.median(times['base']), statistics.median(times['hpm'])
        rows[what] = dict(base_s=b, hpm_s=m, ratio=m / b, base_img_s=batch / b, hpm_img_s=batch / m)
        print(f'{name_hpm:>22} {what:>16}: base {b:.3f}s  hpm {m:.3f}s  ratio {m / b:.3f}', flush=True)
    return rows


def head_only(batch, dim, classes, repeats):
    torch.manual_seed(0)
    fc = torch.nn.Linear(dim, classes)
    head = timm_hpm.HPMHead.from_linear(fc).eval()
    f = torch.randn(batch, dim)
    rows = {}
    for mode in ('dynamic', 'static', 'soft'):
        head.mode = mode
        fwd = {'fc': [], 'hpm': []}
        bwd = {'fc': [], 'hpm': []}
        for _ in range(repeats):
            fwd['fc'].append(_timed(forward_fn(fc, f)))
            fwd['hpm'].append(_timed(forward_fn(head, f)))
            bwd['fc'].append(_timed(lambda: torch.autograd.grad(fc(f.requires_grad_(True)).logsumexp(1).sum(), f)))
            bwd['hpm'].append(_timed(lambda: torch.autograd.grad(head(f.requires_grad_(True)).logsumexp(1).sum(), f)))
        rows[mode] = {
            'forward': dict(fc_s=statistics.median(fwd['fc']), hpm_s=statistics.median(fwd['hpm'])),
            'forward_backward': dict(fc_s=statistics.median(bwd['fc']), hpm_s=statistics.median(bwd['hpm'])),
        }
        for k in rows[mode].values():
            k['ratio'] = k['hpm_s'] / k['fc_s']
        print(f"head K={classes} D={dim} B={batch} {mode:>8}: forward x{rows[mode]['forward']['ratio']:.2f}, "
              f"forward+backward x{rows[mode]['forward_backward']['ratio']:.2f}", flush=True)
    return rows


def markdown(result) -> str:
    lines = [f"Measured with `{result['command']}` on {result['machine']['processor'] or result['machine']['platform']}, "
             f"{result['machine']['threads']} threads, torch {result['machine']['torch']}.", '',
             markdown_table(['model', 'pass', 'batch', 'base (img/s)', 'HPM (img/s)', 'HPM / base time'],
                            [[spec.partition(':')[0], what.replace('_', '+'), rows.get('batch', result['batch']),
                              f"{rows[what]['base_img_s']:.1f}", f"{rows[what]['hpm_img_s']:.1f}",
                              f"{rows[what]['ratio']:.3f}"]
                             for spec, rows in result['models'].items() for what in ('forward', 'forward_backward')],
                            'llrrrr')]
    lines += ['', 'Head alone, K=1000, D=2048, B=256 (HPM head vs the FC layer it replaces):', '',
              markdown_table(['mode', 'forward: HPM / FC time', 'forward+backward: HPM / FC time'],
                             [[mode, f"{r['forward']['ratio']:.2f}", f"{r['forward_backward']['ratio']:.2f}"]
                              for mode, r in result['head_imagenet_scale'].items()], 'lrr')]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--models', nargs='+', default=['small_cnn', 'preact_resnet18', 'wrn28_10:32'],
                        help='base models (the HPM variant is timed against each), NAME or NAME:BATCH to time a big '
                             'model at a smaller batch than --batch')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--out', type=Path, default=Path('recipes/benchmarks/results/bench_head_cpu.json'))
    parser.add_argument('--readme', type=Path, help='rewrite the bench-head section of this README from --out '
                        '(no timing is run)')
    args = parser.parse_args()
    if args.readme:
        update_section(args.readme, 'bench-head', markdown(json.loads(args.out.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = dict(
        command='python recipes/benchmarks/bench_head.py ' + ' '.join(
            f'--{k} {" ".join(map(str, v)) if isinstance(v, list) else v}' for k, v in vars(args).items()
            if v is not None and k != 'readme'),
        machine=dict(platform=platform.platform(), processor=platform.processor(), threads=torch.get_num_threads(),
                     torch=torch.__version__, timm=timm.__version__),
        batch=args.batch, repeats=args.repeats, models={},
    )
    for spec in args.models:
        name, _, batch = spec.partition(':')
        batch = int(batch or args.batch)
        result['models'][spec] = dict(batch=batch, **compare(name, timm_hpm.hpm_variant(name), batch, args.repeats, {}))
    result['head_imagenet_scale'] = head_only(256, 2048, 1000, max(args.repeats, 20))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
