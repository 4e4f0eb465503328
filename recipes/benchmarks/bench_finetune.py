"""Training step time of HPM fine-tuning vs plain PGD-AT fine-tuning of the same base model (same run, CPU),
and bf16 autocast vs fp32: images/s and the accuracy difference after the same number of steps.

    python recipes/benchmarks/bench_finetune.py

Both arms do the same work per step except the head: PGD (10 steps, Linf) against the model being trained, one
forward/backward on the adversarial batch, an SGD step on all parameters. Plain: CE of the FC head. HPM: the
dynamic head's CE + lambda_fc CE of the FC head, with the EMA prototype update. Steps alternate between arms.
"""
import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import timm_hpm
from timm_hpm.attacks import pgd
from timm_hpm.data import FASHION_MNIST_DIRS, load_fashion_mnist
from timm_hpm.report import markdown_table, update_section

ARCHS = {'preact_resnet18': dict(), 'small_cnn': dict()}


def make_step(model, hpm: bool, eps: float, steps: int, amp: bool, generator):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step(x, y):
        model.eval()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            x_adv = pgd(model, x, y, eps, None, steps, generator=generator)
        model.train()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            if hpm:
                out = model(x_adv, targets=y, return_fc=True)
                loss = F.cross_entropy(out.logits, y) + F.cross_entropy(out.fc_logits, y)
            else:
                loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def hpm_copy(base):
    model = timm_hpm.convert_to_hpm(copy.deepcopy(base))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(torch.rand(256, *base.pretrained_cfg['input_size'])),
                                   pre_logits=True)
        model.hpm_head.init_prototypes_([(feats, torch.arange(256) % model.num_classes)])
    return model


def step_time(arch, batch, repeats, eps, steps):
    torch.manual_seed(0)
    base = timm.create_model(arch)
    x = torch.rand(batch, *base.pretrained_cfg['input_size'])
    y = torch.randint(0, base.num_classes, (batch,))
    arms = {'plain': make_step(copy.deepcopy(base), False, eps, steps, False, torch.Generator().manual_seed(0)),
            'hpm': make_step(hpm_copy(base), True, eps, steps, False, torch.Generator().manual_seed(0))}
    for fn in arms.values():
        fn(x, y)  # warm-up
    times = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - start)
    plain, hpm = statistics.median(times['plain']), statistics.median(times['hpm'])
    print(f'{arch}: plain PGD-AT step {plain:.3f}s, HPM step {hpm:.3f}s, ratio {hpm / plain:.3f}', flush=True)
    return dict(plain_s=plain, hpm_s=hpm, ratio=hpm / plain, batch=batch, pgd_steps=steps)


def bf16_vs_fp32(train_steps, batch, eps, steps, eval_n):
    """HPM fine-tuning of small_cnn on Fashion-MNIST for the same steps in fp32 and in bf16 autocast."""
    if not any(Path(d).is_dir() for d in FASHION_MNIST_DIRS):
        return {'skipped': 'Fashion-MNIST not installed'}
    x_train, y_train = load_fashion_mnist('train').tensors
    x_test, y_test = load_fashion_mnist('test').tensors
    x_test, y_test = x_test[:eval_n], y_test[:eval_n]
    out = {}
    for name, amp in (('fp32', False), ('bf16', True)):
        torch.manual_seed(0)
        model = hpm_copy(timm.create_model('small_cnn'))
        step = make_step(model, True, eps, steps, amp, torch.Generator().manual_seed(0))
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for i in range(train_steps):
            idx = order[i * batch:(i + 1) * batch]
            step(x_train[idx], y_train[idx])
        seconds = time.perf_counter() - start
        model.eval()
        acc = {}
        with torch.no_grad():
            for mode in ('dynamic', 'fc'):
                with model.hpm_head.using_mode(mode):
                    acc[mode] = float(model(x_test).argmax(1).eq(y_test).float().mean())
        out[name] = dict(images_per_s=train_steps * batch / seconds, seconds=seconds, clean_acc=acc)
        print(f'{name}: {out[name]}', flush=True)
    out['speedup_bf16'] = out['bf16']['images_per_s'] / out['fp32']['images_per_s']
    out['acc_difference_bf16_minus_fp32'] = {k: out['bf16']['clean_acc'][k] - out['fp32']['clean_acc'][k]
                                             for k in out['fp32']['clean_acc']}
    out.update(train_steps=train_steps, batch=batch, eval_examples=eval_n)
    return out


def markdown(result) -> str:
    lines = [f"Measured with `{result['command']}` ({result['machine']['threads']} threads, torch "
             f"{result['machine']['torch']}).", '',
             markdown_table(['base model', 'batch', 'PGD steps', 'plain PGD-AT step (s)', 'HPM step (s)',
                             'HPM / plain'],
                            [[name, r['batch'], r['pgd_steps'], f"{r['plain_s']:.3f}", f"{r['hpm_s']:.3f}",
                              f"{r['ratio']:.3f}"] for name, r in result['step_time'].items()], 'lrrrrr')]
    amp = result['bf16_vs_fp32']
    if 'skipped' not in amp:
        lines += ['', f"bf16 autocast vs fp32, HPM fine-tuning of `small_cnn` on Fashion-MNIST from the same random "
                      f"init for {amp['train_steps']} steps (batch {amp['batch']}), clean accuracy on "
                      f"{amp['eval_examples']} test images:", '',
                  markdown_table(['precision', 'images/s', 'dynamic HPM clean acc', 'FC clean acc'],
                                 [[name, f"{amp[name]['images_per_s']:.0f}",
                                   f"{100 * amp[name]['clean_acc']['dynamic']:.1f}%",
                                   f"{100 * amp[name]['clean_acc']['fc']:.1f}%"] for name in ('fp32', 'bf16')], 'lrrr')]
        lines.append(f"\nbf16 speed-up x{amp['speedup_bf16']:.2f}; accuracy difference (bf16 - fp32): " + ', '.join(
            f'{k} {100 * v:+.1f} points' for k, v in amp['acc_difference_bf16_minus_fp32'].items()) + '.')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--pgd-steps', type=int, default=10)
    parser.add_argument('--amp-train-steps', type=int, default=200)
    parser.add_argument('--out', type=Path, default=Path('recipes/benchmarks/results/bench_finetune_cpu.json'))
    parser.add_argument('--readme', type=Path, help='rewrite the bench-finetune section of this README from --out')
    args = parser.parse_args()
    if args.readme:
        update_section(args.readme, 'bench-finetune', markdown(json.loads(args.out.read_text())))
        return
    result = dict(command='python recipes/benchmarks/bench_finetune.py ' + ' '.join(
        f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items() if k not in ('out', 'readme')),
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__))
    result['step_time'] = {
        'preact_resnet18': step_time('preact_resnet18', 64, args.repeats, 8 / 255, args.pgd_steps),
        'small_cnn': step_time('small_cnn', 128, args.repeats, 0.1, args.pgd_steps),
    }
    result['bf16_vs_fp32'] = bf16_vs_fp32(args.amp_train_steps, 128, 0.1, args.pgd_steps, 2000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
