"""Dress rehearsal of the model zoo's CIFAR and ImageNet entries on the CPU: real configs, real model sizes, real
data code paths, a tiny budget.

    python recipes/benchmarks/rehearse_zoo.py                       # every RobustBench entry of recipes/zoo.yaml
    python recipes/benchmarks/rehearse_zoo.py hpm_wrn28_10.rb_wang2023better_cifar10 --work /tmp/rehearsal

For each entry, in ``--work`` (default runs/zoo_rehearsal): a fabricated dataset (CIFAR-10/100: the binary version's
on-disk layout, ``cifar-10-batches-bin/`` or ``cifar-100-binary/``, read by timm_hpm.data without unpickling;
ImageNet: an ImageFolder tree ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` of a few random JPEGs), a checkpoint in
RobustBench's layout (``models/<dataset>/<threat>/<Name>.pt``: ``torch.save`` of a plain dict of tensors with
``module.`` prefixes, the real architecture at full size with random weights), then ``recipes/build_zoo.py`` with
a couple of fine-tuning steps, a few images and one or two attack iterations: base export, fine-tuning, the base
under AutoAttack, the HPM model under MSA, the dry-run Hub folder and card. CIFAR labels are the random base's own
predictions, so the attacks have correctly classified images to work on. Prints the time of each step.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: The fine-tuning and evaluation budget of a rehearsal (build_zoo.py's overrides).
FINETUNE_SETS = ['data.batch_size=2', 'data.num_workers=0', 'data.val_examples=2', 'data.train_examples=4',
                 'attack.steps=1', 'train.eval_pgd_steps=1', 'train.eval_batch_size=4', 'train.init_prototype_batches=2']
EVAL_SETS = ['n_examples=4', 'batch_size=4', 'batchings=default', 'apgd_iters=1', 'autoattack_iters=1',
             'square_queries=4', 'combine_rounds=1', 'n_target_classes=1', 'target_n_target_classes=1']


def write_cifar_binary(name: str, root: Path, train_images: np.ndarray, train_labels: np.ndarray,
                       test_images: np.ndarray, test_labels: np.ndarray) -> Path:
    """A CIFAR folder in the binary version's layout (uint8 images (N, 3, 32, 32); CIFAR-100: coarse label 0)."""
    from timm_hpm.data import CIFAR_BINARY
    folder, files, label_bytes, label_at = CIFAR_BINARY[name]
    (root / folder).mkdir(parents=True, exist_ok=True)

    def records(images, labels):
        out = np.zeros((len(images), label_bytes + 3072), dtype=np.uint8)
        out[:, label_at] = labels
        out[:, label_bytes:] = images.reshape(len(images), -1)
        return out
    for split, images, labels in (('train', train_images, train_labels), ('test', test_images, test_labels)):
        parts = np.array_split(np.arange(len(images)), len(files[split]))
        for filename, idx in zip(files[split], parts):
            records(images[idx], labels[idx]).tofile(root / folder / filename)
    return root


def write_imagenet_folder(root: Path, n_classes: int = 4, train_per_class: int = 3, val_per_class: int = 2,
                          seed: int = 0) -> Path:
    """A tiny ImageNet in ImageFolder layout: random JPEGs of varied sizes in ``n_classes`` wnid folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for c in range(n_classes):
            folder = root / split / f'n{c:08d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(48, 96, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'{split}_{c}_{i}.JPEG', quality=90)
    return root


def write_robustbench_checkpoint(entry, model_dir: Path, seed: int = 0) -> Path:
    """The base's architecture at full size with random weights, saved where and as RobustBench keeps it:
    ``<model_dir>/<dataset>/<threat>/<Name>.pt``, a plain dict of tensors with ``module.`` prefixes."""
    import timm
    import torch

    from timm_hpm.robustbench import checkpoint_path
    rb = entry.robustbench
    torch.manual_seed(seed)
    model = timm.create_model(rb.name_tag(), **rb.model_args)
    path = checkpoint_path(rb, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f'module.{k}': v for k, v in model.state_dict().items()}, path)
    return path


def fabricate(entry, work: Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> Path:
    """The entry's dataset folder under ``work``; CIFAR images are labelled with the random base's predictions."""
    data = work / 'data'
    if entry.eval.dataset == 'imagenet':
        return write_imagenet_folder(data, seed=seed)
    import torch

    from timm_hpm.robustbench import load_robustbench_model
    rb = entry.robustbench
    model = load_robustbench_model(rb.name, rb.dataset, rb.threat_model, model_dir=work / 'models',
                                   download=False).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_train + n_test, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        labels = model(torch.from_numpy(images).float().div(255)).argmax(1).numpy().astype(np.uint8)
    return write_cifar_binary(entry.eval.dataset, data, images[:n_train], labels[:n_train], images[n_train:],
                              labels[n_train:])


def rehearse(tag: str, work: Path, extra=(), timeout: float = 3600) -> dict:
    """Fabricate the data and the checkpoint, then build the entry with the tiny budget; returns the timings."""
    from timm_hpm.zoo import load_manifest
    entry = load_manifest()[tag]
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    write_robustbench_checkpoint(entry, work / 'models')
    data = fabricate(entry, work)
    timings = {'fabricate': round(time.perf_counter() - tic, 1)}
    cmd = [sys.executable, str(ROOT / 'recipes' / 'build_zoo.py'), tag, '--device', 'cpu', '--out', str(work / 'build'),
           '--data-dir', str(data), '--model-dir', str(work / 'models'), '--max-steps', '2', '--set', *FINETUNE_SETS,
           '--eval-set', *EVAL_SETS, *extra]
    tic = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    timings['build'] = round(time.perf_counter() - tic, 1)
    if result.returncode:
        raise RuntimeError(f'{tag}: build_zoo.py failed (exit {result.returncode}):\n{result.stdout[-6000:]}')
    last = [line for line in result.stdout.splitlines() if line.startswith('[build_zoo]') and 'built in' in line][-1]
    timings['steps'] = json.loads(last[last.index('{'):last.rindex('}') + 1])
    return timings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('tags', nargs='*', help='default: every RobustBench entry of recipes/zoo.yaml')
    p.add_argument('--work', type=Path, default=ROOT / 'runs' / 'zoo_rehearsal')
    args = p.parse_args(argv)
    from timm_hpm.zoo import load_manifest
    tags = args.tags or [t for t, e in load_manifest().items() if e.is_robustbench]
    results = {}
    for tag in tags:
        work = args.work / tag
        if work.exists():
            raise SystemExit(f'{work} exists (a rehearsal builds from scratch): remove it or pass another --work')
        print(f'rehearsal: {tag} in {work}', flush=True)
        results[tag] = rehearse(tag, work)
        print(f'  {json.dumps(results[tag])}', flush=True)
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
