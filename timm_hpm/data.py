"""Datasets that work offline here: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files),
with torchvision as the fallback when online; CIFAR-10/100 (the binary version, read without unpickling, or
torchvision's python version); ImageNet folders; and a synthetic dataset for tests.

Images are float tensors in [0, 1], (C, H, W); labels are int64.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .augment import Augment, FolderAugment, imagenet_train_transform, unaugmented
from .data_folders import CIFAR_BINARY, DatasetUnavailable, load_cifar, load_imagenet, read_cifar_binary

__all__ = ['FASHION_MNIST_DIRS', 'FASHION_MNIST_CLASSES', 'DATASETS', 'DatasetUnavailable', 'read_idx',
           'load_fashion_mnist', 'load_cifar', 'read_cifar_binary', 'CIFAR_BINARY', 'synthetic_dataset',
           'load_eval_tensors', 'build_train_val', 'Augment', 'FolderAugment', 'imagenet_train_transform',
           'unaugmented']  # CIFAR/ImageNet readers: timm_hpm/data_folders.py; augmentation: timm_hpm/augment.py

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet', 'synthetic')

#: Where Fashion-MNIST's IDX files are looked for, in order ($FASHION_MNIST_DIR first).
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'),
               0x0E: np.dtype('>f8')}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its size.

    Kept on purpose instead of torchvision's ``read_sn3_pascalvincent_tensor``: that one opens the file as is (Debian
    ships the files gzipped), checks the header with ``assert`` (gone under ``python -O``) and does not say that a
    file is truncated."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file (bad magic number).')
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f'{path} is truncated or corrupt: header says {shape} ({expected} bytes), '
                         f'file holds {len(data) - offset} bytes of data.')
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _find_fashion_mnist(root: Optional[Union[str, Path]]) -> Optional[Path]:
    candidates = [Path(root)] if root else []
    if os.environ.get('FASHION_MNIST_DIR'):
        candidates.append(Path(os.environ['FASHION_MNIST_DIR']))
    candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for folder in candidates:
        if all((folder / f'{name}.gz').exists() or (folder / name).exists() for pair in _FILES.values()
               for name in pair):
            return folder
    return None


def _idx_path(folder: Path, name: str) -> Path:
    return folder / f'{name}.gz' if (folder / f'{name}.gz').exists() else folder / name


def load_fashion_mnist(split: str = 'train', root: Optional[Union[str, Path]] = None, download: bool = True
                       ) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of (N, 1, 28, 28) float images in [0, 1] and int64 labels.

    Looks in ``root``, ``$FASHION_MNIST_DIR`` and Debian's ``/usr/share/datasets/fashion-mnist``; else
    downloads with torchvision into ``root`` (or ``~/.cache/timm_hpm``) when ``download`` and online.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _find_fashion_mnist(root)
    if folder is not None:
        images = read_idx(_idx_path(folder, _FILES[split][0]))
        labels = read_idx(_idx_path(folder, _FILES[split][1]))
    elif download:
        images, labels = _torchvision_fashion_mnist(split, root)
    else:
        raise DatasetUnavailable(_missing_message(root))
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f'Fashion-MNIST {split} files have unexpected shapes {images.shape}, {labels.shape}.')
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def _missing_message(root) -> str:
    return ('Fashion-MNIST not found (looked in ' + ', '.join(
        map(str, ([root] if root else []) + ['$FASHION_MNIST_DIR'] + list(FASHION_MNIST_DIRS))) +
        '). Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files '
        '(train-images-idx3-ubyte.gz, ...) in a folder and pass it as root / $FASHION_MNIST_DIR, or go online '
        'so torchvision can download them.')


def _torchvision_fashion_mnist(split: str, root) -> Tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import FashionMNIST
    root = Path(root or Path.home() / '.cache' / 'timm_hpm')
    try:
        ds = FashionMNIST(str(root), train=split == 'train', download=True)
    except Exception as error:  # torchvision raises URLError/RuntimeError/OSError offline
        raise DatasetUnavailable(_missing_message(root) + f' (download failed: {error})') from error
    return ds.data.numpy(), ds.targets.numpy()


def synthetic_dataset(n: int = 256, num_classes: int = 10, image_size: Tuple[int, int, int] = (3, 32, 32),
                      seed: int = 0, separation: float = 0.25) -> TensorDataset:
    """Learnable synthetic images in [0, 1]: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, *image_size, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, *image_size, generator=g)
    images = (separation * patterns[labels] + (1 - separation) * noise).clamp(0, 1)
    return TensorDataset(images, labels)


#: CIFAR's binary version (www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, cifar-100-binary.tar.gz), extracted
#: under the data folder: (folder, files per split, label bytes per record, which of them is the label). Each record
#: is its label byte(s) then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, rows in order): the same images in
#: the same order as torchvision's python version, read without unpickling anything.
def load_split(dataset: str, split: str, root=None, pretrained_cfg: Optional[dict] = None, synthetic_n: int = 512,
               num_classes: int = 10, image_size=(3, 32, 32), seed: int = 0) -> Dataset:
    """The ``'train'`` or ``'test'`` split of a dataset as [0, 1] tensors (ImageNet's test split is ``val``,
    resized as the model's pretrained cfg says; the synthetic set has ``synthetic_n`` images)."""
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose from {DATASETS}')
    if dataset == 'fashion_mnist':
        return load_fashion_mnist(split, root)
    if dataset in ('cifar10', 'cifar100'):
        return load_cifar(dataset, split, root)
    if dataset == 'imagenet':
        cfg = pretrained_cfg or {}
        return load_imagenet('val' if split == 'test' else split, root or '.', cfg.get('input_size', (3, 224, 224)),
                             cfg.get('crop_pct', 0.875), cfg.get('interpolation', 'bilinear'))
    return synthetic_dataset(synthetic_n, num_classes, tuple(image_size), seed=seed)


def load_eval_tensors(dataset: str, n_examples: int, root: Optional[Union[str, Path]] = None,
                      pretrained_cfg: Optional[dict] = None, num_classes: int = 10, image_size=(3, 32, 32),
                      seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_examples`` test images (a fixed, reported subset) as tensors in [0, 1]."""
    if n_examples < 1:
        raise ValueError(f'n_examples must be >= 1, got {n_examples}')
    ds = load_split(dataset, 'test', root, pretrained_cfg, n_examples, num_classes, image_size, seed)
    if n_examples > len(ds):
        raise ValueError(f'n_examples={n_examples} is larger than the {dataset} test set ({len(ds)} images).')
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return x[:n_examples].clone(), y[:n_examples].clone()
    items = [ds[i] for i in range(n_examples)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


_AUGMENT = {'fashion_mnist': dict(padding=2, flip=False), 'cifar10': dict(padding=4, flip=True),
            'cifar100': dict(padding=4, flip=True), 'synthetic': dict(padding=0, flip=False)}


def build_train_val(dataset: str, root=None, val_examples: int = 512, train_examples: Optional[int] = None,
                    augment: bool = True, image_size=(3, 32, 32), num_classes: int = 10,
                    synthetic_examples: int = 512, seed: int = 0, pretrained_cfg: Optional[dict] = None):
    """(train, held-out) datasets from the training split: the last ``val_examples`` images are held out
    (never trained on), the training set is the first ``train_examples`` of the rest. Training images are
    augmented as is standard for the dataset (ImageNet: timm's training transform on the decoded images, see
    ``imagenet_train_transform``); held-out images are not (ImageNet: the model's evaluation resize and crop)."""
    full = load_split(dataset, 'train', root, pretrained_cfg, synthetic_examples + val_examples, num_classes,
                      image_size, seed)
    n = len(full)
    if val_examples >= n:
        raise ValueError(f'val_examples={val_examples} leaves no training data ({n} images).')
    stop = n - val_examples
    if train_examples is not None:
        if train_examples > stop:
            raise ValueError(f'train_examples={train_examples} is more than the {stop} training images available.')
        stop = train_examples
    train = Subset(full, range(stop))
    if augment and dataset in _AUGMENT:
        train = Augment(train, **_AUGMENT[dataset], seed=seed)
    elif augment and dataset == 'imagenet':
        cfg = pretrained_cfg or {}
        train = FolderAugment(train, imagenet_train_transform(cfg.get('input_size', (3, 224, 224)),
                                                              cfg.get('interpolation', 'bilinear')), seed=seed)
    return train, Subset(full, range(n - val_examples, n))
