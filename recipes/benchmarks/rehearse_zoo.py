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
under AutoAttack, the HPM model under MSA, the dry-run Hub folder and card. The attacks only work on correctly
classified images, so CIFAR is built in two phases: up to the fine-tuning (``build_zoo.py --until finetune``), then
the test images are labelled, alternately, with the random base's predictions and the fine-tuned HPM model's (on
the evaluation's batches), and the build goes on: both evaluations have images to attack. (Labelling every image
with the base's predictions was not enough: two fine-tuning steps of the CIFAR-100 WRN-70-16 moved every HPM
prediction off them, and MSA attacked nothing.) ImageNet images are labelled by their folder, so the random
checkpoint's class-0 bias is raised until the base predicts class 0 everywhere (the first folder's images are then
correctly classified). Each evaluation's clean accuracy is printed, with a warning at 0 (no attack ran). Prints the
time of each step. A build that runs past ``--timeout`` seconds (default 4 hours; 0: no limit) is stopped with the
step it is running.
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: The fine-tuning and evaluation budget of a rehearsal (build_zoo.py's overrides).
FINETUNE_SETS = ['data.batch_size=2', 'data.num_workers=0', 'data.val_examples=2', 'data.train_examples=4',
                 'attack.steps=1', 'train.eval_pgd_steps=1', 'train.eval_batch_size=4', 'train.init_prototype_batches=2']
EVAL_SETS = ['n_examples=4', 'batch_size=4', 'batchings=default', 'apgd_iters=1', 'autoattack_iters=1',
             'square_queries=4', 'combine_rounds=1', 'n_target_classes=1', 'target_n_target_classes=1']
#: The command line's limit on one entry's build, in seconds. A WRN-70-16 build (267M parameters) ran past the
#: one hour that rehearse() allows by default, at low priority on 2 cores shared with other jobs: AutoAttack on the
#: base alone took 38 minutes there.
DEFAULT_TIMEOUT = 4 * 3600


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
    model = timm.create_model(rb.name_tag(), **rb.model_args).eval()
    if rb.dataset == 'imagenet':
        # The fabricated ImageFolder's labels are its folders' (classes 0-3), which a random 1000-class model
        # never predicts: class 0's bias is raised above every other logit, so the base classifies the images of
        # class 0 correctly and AutoAttack has work (CIFAR instead labels its images with the models' predictions).
        with torch.no_grad():
            logits = model(torch.rand(2, 3, *model.pretrained_cfg['input_size'][1:]))
            model.get_classifier().bias[0] += float(logits.max() - logits[:, 0].min()) + 1.0
    path = checkpoint_path(rb, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f'module.{k}': v for k, v in model.state_dict().items()}, path)
    return path


def fabricate(entry, work: Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> Path:
    """The entry's dataset folder under ``work``; CIFAR images are labelled with the random base's predictions
    (``label_test_images`` relabels the test images once the HPM model is fine-tuned)."""
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


def _run_build(cmd: List[str], timeout: Optional[float]) -> Tuple[str, Optional[int]]:
    """``(output, exit status)`` of ``cmd``; the status is None when it ran past ``timeout`` seconds. build_zoo.py
    runs each step in a child process (finetune.py, evaluate.py), so it starts a process group of its own, stopped
    as a whole on a timeout or an interrupt: killing build_zoo.py alone would leave its running step behind, still
    computing and holding its run folder's lock."""
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return output, process.returncode
    except BaseException as error:  # the timeout, or Ctrl-C (which the build's own process group does not receive)
        with contextlib.suppress(ProcessLookupError):  # the group ended as the limit came
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        return output, None


def label_test_images(entry, data: Path, model_folder: Path, batch_size: int) -> np.ndarray:
    """Relabel the fabricated CIFAR test images: odd positions get the HPM model's (``model_folder``, a local-dir
    folder) predictions, computed on consecutive batches of ``batch_size`` as the evaluation batches them (the
    dynamic head's prediction depends on the batch), even positions keep the base's. Returns the new labels."""
    import timm
    import torch

    from timm_hpm.attacks import normalized_view
    from timm_hpm.data import read_cifar_binary
    name = entry.eval.dataset
    train, test = (read_cifar_binary(name, split, data).tensors for split in ('train', 'test'))
    model = normalized_view(timm.create_model(f'local-dir:{model_folder}', pretrained=True)).eval()
    with torch.no_grad():
        hpm = torch.cat([model(batch).argmax(1) for batch in test[0].split(batch_size)])
    labels = test[1].clone()
    labels[1::2] = hpm[1::2]
    def as_uint8(images):  # exact: the images were written as uint8
        return images.mul(255).round().to(torch.uint8).numpy()
    write_cifar_binary(name, data, as_uint8(train[0]), train[1].numpy().astype(np.uint8), as_uint8(test[0]),
                       labels.numpy().astype(np.uint8))
    return labels.numpy()


def _last_setting(args, key: str, default: str) -> str:
    """The value of the last ``key=value`` among build_zoo.py options (later --eval-set values win)."""
    values = [a.split('=', 1)[1] for a in args if a.startswith(f'{key}=')]
    return values[-1] if values else default


def rehearse(tag: str, work: Path, extra=(), timeout: Optional[float] = 3600) -> dict:
    """Fabricate the data and the checkpoint, then build the entry with the tiny budget; returns the timings.
    ``timeout``: seconds for the build (None: no limit)."""
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
    phases = [cmd]
    if entry.eval.dataset != 'imagenet':  # fine-tune, label the test images for both models, go on
        phases = [cmd + ['--until', 'finetune'], cmd]
    tic, timings['steps'] = time.perf_counter(), {}
    for i, phase in enumerate(phases):
        if i:
            t0 = time.perf_counter()
            batch_size = int(_last_setting([*EVAL_SETS, *extra], 'batch_size', str(entry.eval.batch_size)))
            label_test_images(entry, data, work / 'build' / 'finetune' / 'final', batch_size)
            timings['label'] = round(time.perf_counter() - t0, 1)
        left = None if timeout is None else max(1.0, timeout - (time.perf_counter() - tic))
        output, returncode = _run_build(phase, left)
        if returncode is None:
            from timm_hpm.zoo import format_command
            raise RuntimeError(f'{tag}: build_zoo.py did not finish in {timeout:.0f} s (--timeout); it and its steps '
                               f'were stopped. Its last output:\n{output[-6000:]}\nThe build resumes (finished steps '
                               f'are skipped) with: {format_command(phase)}')
        if returncode:
            raise RuntimeError(f'{tag}: build_zoo.py failed (exit {returncode}):\n{output[-6000:]}')
        last = [line for line in output.splitlines() if line.startswith('[build_zoo]') and
                ('built in' in line or 'stopped after' in line)][-1]
        steps = json.loads(last[last.index('{'):last.rindex('}') + 1])
        timings['steps'].update({k: v for k, v in steps.items() if v != 'skipped' or k not in timings['steps']})
    timings['build'] = round(time.perf_counter() - tic, 1)
    # The attacks only work on correctly classified images. The labels are the random base's predictions, whose
    # logit margins are tiny: two fine-tuning steps can move every prediction of the HPM model off them (the
    # WRN-70-16 CIFAR-100 rehearsal: clean accuracy 0, MSA attacked nothing). Said, not passed over in silence.
    timings['clean_acc'] = {step: json.loads((work / 'build' / step / 'eval.json').read_text())['clean_acc']
                            for step in ('eval_base', 'eval_hpm')}
    for step, acc in timings['clean_acc'].items():
        if not acc:
            print(f'warning: {tag}: {step} had no correctly classified image, so no attack ran in it', file=sys.stderr,
                  flush=True)
    return timings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('tags', nargs='*', help='default: every RobustBench entry of recipes/zoo.yaml')
    p.add_argument('--work', type=Path, default=ROOT / 'runs' / 'zoo_rehearsal')
    p.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT,
                   help="seconds for each entry's build (0: no limit); the default leaves room for a WRN-70-16 entry "
                        'on 2 shared cores')
    args = p.parse_args(argv)
    from timm_hpm.zoo import load_manifest
    tags = args.tags or [t for t, e in load_manifest().items() if e.is_robustbench]
    results = {}
    for tag in tags:
        work = args.work / tag
        if work.exists():
            raise SystemExit(f'{work} exists (a rehearsal builds from scratch): remove it or pass another --work')
        print(f'rehearsal: {tag} in {work}', flush=True)
        results[tag] = rehearse(tag, work, timeout=args.timeout or None)
        print(f'  {json.dumps(results[tag])}', flush=True)
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
