"""Offline demo on real data (Fashion-MNIST): train a small base briefly, put an HPM head on it, compare heads.

    python recipes/demo.py --out runs/demo

What it does, in order, with progress bars:
1. loads Fashion-MNIST (Debian's dataset-fashion-mnist, else torchvision when online);
2. trains ``preact_resnet18`` (1 channel, 28x28) with plain cross-entropy for ``--epochs`` on ``--n-train``
   images (a demo base, *not* adversarially trained: the study issue replaces it with a PGD-AT base);
3. converts it with ``timm_hpm.convert_to_hpm`` and initialises the prototypes from the training features;
4. reports, on ``--n-test`` fixed test images in fixed batches: clean accuracy of every head mode, and
   white-box PGD accuracy (Linf, ``--eps``) of the ``fc`` and ``static`` heads, and of ``dynamic`` through
   its STE gradients. The last is NOT a robustness estimate (gradient obfuscation): MSA is.
Writes ``demo.json`` and prints a table.
"""
import argparse
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import timm_hpm
from timm_hpm.attacks import accuracy, parse_eps, pgd
from timm_hpm.data import load_fashion_mnist


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=Path('runs/demo'))
    parser.add_argument('--n-train', type=int, default=6000)
    parser.add_argument('--n-test', type=int, default=500)
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--eps', default='0.1')
    parser.add_argument('--pgd-steps', type=int, default=5)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    eps = parse_eps(args.eps)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    train = Subset(load_fashion_mnist('train'), range(args.n_train))
    x_test, y_test = load_fashion_mnist('test').tensors
    x_test, y_test = x_test[:args.n_test], y_test[:args.n_test]

    model = timm.create_model('preact_resnet18', in_chans=1, img_size=28, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc='train base (plain CE)') as bar:
        for _ in range(args.epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f'{loss.item():.3f}')
                bar.update()

    model.eval()
    hpm = timm_hpm.convert_to_hpm(model)
    with torch.no_grad():
        feats = ((hpm.forward_head(hpm.forward_features(x), pre_logits=True), y)
                 for x, y in tqdm(DataLoader(train, batch_size=256), desc='init prototypes'))
        hpm.hpm_head.init_prototypes_(feats)

    batches = list(zip(x_test.split(args.batch_size), y_test.split(args.batch_size)))
    results = {'clean': {}, 'pgd_whitebox': {}}
    for mode in timm_hpm.HPM_MODES:
        hpm.hpm_head.mode = mode
        results['clean'][mode] = torch.cat([accuracy(hpm, x, y) for x, y in batches]).float().mean().item()
    for mode in ('fc', 'static', 'dynamic'):
        hpm.hpm_head.mode = mode
        correct = []
        g = torch.Generator().manual_seed(args.seed)
        for x, y in tqdm(batches, desc=f'PGD-{args.pgd_steps} on {mode}'):
            correct.append(accuracy(hpm, pgd(hpm, x, y, eps, steps=args.pgd_steps, generator=g), y))
        results['pgd_whitebox'][mode] = torch.cat(correct).float().mean().item()

    record = dict(command='python recipes/demo.py ' + ' '.join(f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items()),
                  eps=eps, n_test=args.n_test, seconds=round(time.time() - start, 1), **results)
    (args.out / 'demo.json').write_text(json.dumps(record, indent=2))
    print(f"\nFashion-MNIST demo ({args.n_test} test images, Linf eps={eps:.3f}, base trained without attacks)")
    print('| head | clean | white-box PGD |\n|---|---:|---:|')
    for mode in timm_hpm.HPM_MODES:
        pgd_acc = results['pgd_whitebox'].get(mode)
        print(f"| {mode} | {100 * results['clean'][mode]:.1f}% | "
              f"{'-' if pgd_acc is None else f'{100 * pgd_acc:.1f}%'}{' (STE gradients: not a robustness estimate)' if mode == 'dynamic' else ''} |")
    print(f"wrote {args.out / 'demo.json'} in {record['seconds']} s")


if __name__ == '__main__':
    main()
