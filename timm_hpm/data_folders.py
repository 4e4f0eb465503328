"""CIFAR-10/100 and ImageNet from their on-disk layouts: CIFAR's binary version read with numpy (nothing unpickled) or
torchvision's python version, ImageNet as an ImageFolder with timm's evaluation transform."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ['DatasetUnavailable', 'CIFAR_BINARY', 'read_cifar_binary', 'load_cifar', 'load_imagenet']


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are not on this machine and cannot be downloaded."""


CIFAR_BINARY = {
    'cifar10': ('cifar-10-batches-bin', {'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
                                         'test': ('test_batch.bin',)}, 1, 0),
    'cifar100': ('cifar-100-binary', {'train': ('train.bin',), 'test': ('test.bin',)}, 2, 1),  # coarse, fine
}
_CIFAR_CLASSES = {'cifar10': 10, 'cifar100': 100}


def read_cifar_binary(name: str, split: str, root: Union[str, Path]) -> TensorDataset:
    """CIFAR-10/100 from its binary version under ``root`` (``cifar-10-batches-bin/`` or ``cifar-100-binary/``) as
    a ``TensorDataset`` of (N, 3, 32, 32) float images in [0, 1] and int64 labels (CIFAR-100: the fine labels).
    Checks every file's size against the record length and the labels against the number of classes."""
    folder, files, label_bytes, label_at = CIFAR_BINARY[name]
    record = label_bytes + 3 * 32 * 32
    images, labels = [], []
    for filename in files[split]:
        path = Path(root) / folder / filename
        data = np.fromfile(path, dtype=np.uint8)
        if data.size == 0 or data.size % record:
            raise ValueError(f'{path} is not a CIFAR binary file: {data.size} bytes is not a whole number of '
                             f'{record}-byte records (truncated or another format).')
        data = data.reshape(-1, record)
        labels.append(data[:, label_at].astype(np.int64))
        images.append(data[:, label_bytes:].reshape(-1, 3, 32, 32))
    y = np.concatenate(labels)
    if y.max() >= _CIFAR_CLASSES[name]:
        raise ValueError(f'{Path(root) / folder}: label {int(y.max())} out of range for {name}; is it the other '
                         'CIFAR?')
    return TensorDataset(torch.from_numpy(np.concatenate(images)).float().div_(255.0), torch.from_numpy(y))


def _cifar_binary_present(name: str, root: Path) -> bool:
    folder, files, _, _ = CIFAR_BINARY[name]
    return all((root / folder / f).is_file() for split in files.values() for f in split)


def load_cifar(name: str, split: str = 'test', root: Optional[Union[str, Path]] = None, download: bool = True
               ) -> Dataset:
    """CIFAR-10/100 as [0, 1] images from ``root`` (default ``~/.cache/timm_hpm``): its binary version when
    extracted there (read with numpy, nothing unpickled; see ``CIFAR_BINARY``), else torchvision's python version
    (``cifar-10-batches-py/``, ``cifar-100-python/``; torchvision checks every file's MD5 against the official
    archive before unpickling it), downloaded by torchvision when missing and online."""
    from torchvision import datasets, transforms
    if name not in CIFAR_BINARY:
        raise ValueError(f"unknown CIFAR {name!r}; choose 'cifar10' or 'cifar100'")
    root = Path(root or Path.home() / '.cache' / 'timm_hpm')
    if _cifar_binary_present(name, root):
        return read_cifar_binary(name, split, root)
    cls = {'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100}[name]
    try:
        return cls(str(root), train=split == 'train', download=download, transform=transforms.ToTensor())
    except Exception as error:
        folder = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
        raise DatasetUnavailable(
            f'{name} not found under {root} and could not be downloaded ({type(error).__name__}: {error}). Put the '
            f'extracted python version ({folder}/) or binary version ({CIFAR_BINARY[name][0]}/) in that folder, or '
            'pass another root / --data-dir.') from error


def load_imagenet(split: str, root: Union[str, Path], input_size=(3, 224, 224), crop_pct: float = 0.875,
                  interpolation: str = 'bilinear') -> Dataset:
    """An ImageNet split from an ImageFolder layout (``root/<split>/<wnid>/*.JPEG``), resized and centre-cropped
    as the model's pretrained cfg says (timm's evaluation transform), as [0, 1] tensors (normalisation belongs to
    the model)."""
    from timm.data import create_transform
    from torchvision import datasets
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetUnavailable(f'ImageNet {split} folder not found: {folder} (expected an ImageFolder layout, '
                                 f'root/{split}/<class>/<image>); pass --data-dir.')
    # mean 0, std 1: [0, 1] tensors (timm's normalize=False would leave them uint8)
    transform = create_transform(tuple(input_size), is_training=False, interpolation=interpolation,
                                 crop_pct=crop_pct, mean=(0.0,) * input_size[0], std=(1.0,) * input_size[0])
    return datasets.ImageFolder(str(folder), transform=transform)
