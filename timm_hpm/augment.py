"""Training-time augmentation whose randomness depends only on (seed, epoch, index): the same images whatever the
number of workers or processes and after a resume."""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset, Subset

__all__ = ['Augment', 'FolderAugment', 'imagenet_train_transform', 'unaugmented']


class _EpochSeeded(Dataset):
    """A view on ``dataset`` whose sample ``i`` is drawn with randomness seeded by (seed, epoch, i) only."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def sample_key(self, i: int) -> int:
        """The seed of sample ``i``'s randomness in the current epoch."""
        return (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i


class Augment(_EpochSeeded):
    """Standard small-image augmentation on [0, 1] tensors: random crop after zero padding, optional horizontal
    flip. Its randomness depends only on (seed, epoch, index), so it is the same whatever the number of workers
    or processes and after a resume; call ``set_epoch`` every epoch."""

    def __init__(self, dataset: Dataset, padding: int = 4, flip: bool = True, seed: int = 0):
        super().__init__(dataset, seed)
        self.padding, self.flip = padding, flip

    def __getitem__(self, i):
        x, y = self.dataset[i]
        g = torch.Generator().manual_seed(self.sample_key(i))
        if self.padding:
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (self.padding,) * 4)
            top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=g).tolist()
            x = padded[..., top:top + h, left:left + w]
        if self.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x, y


def imagenet_train_transform(input_size=(3, 224, 224), interpolation: str = 'bilinear'):
    """timm's ImageNet training transform (``create_transform(is_training=True)``: random resized crop, horizontal
    flip, colour jitter, with timm's defaults), ending in [0, 1] tensors (normalisation belongs to the model)."""
    from timm.data import create_transform
    return create_transform(tuple(input_size), is_training=True, interpolation=interpolation,
                            mean=(0.0,) * input_size[0], std=(1.0,) * input_size[0])


class FolderAugment(_EpochSeeded):
    """A training transform applied to the decoded images of an image folder (``Subset`` of an ``ImageFolder``
    whose own transform is the evaluation one: ``dataset`` is the unaugmented view). The transform's randomness
    (Python's ``random`` and torch's, which timm's and torchvision's transforms draw from) is seeded by (seed,
    epoch, index) and the global states are restored afterwards, so the images are the same whatever the number of
    workers or processes and after a resume; call ``set_epoch`` every epoch."""

    def __init__(self, dataset: Subset, transform, seed: int = 0):
        super().__init__(dataset, seed)
        self.transform = transform

    def __getitem__(self, i):
        folder = self.dataset.dataset
        path, y = folder.samples[self.dataset.indices[i]]
        image = folder.loader(path)
        key = self.sample_key(i)
        state = random.getstate()
        try:
            random.seed(key)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                x = self.transform(image)
        finally:
            random.setstate(state)
        return x, y


def unaugmented(train_set: Dataset) -> Dataset:
    """The training set without its augmentation (the prototypes are class means of clean training images)."""
    return train_set.dataset if isinstance(train_set, _EpochSeeded) else train_set
