"""CIFAR's binary version (read without unpickling) and the ImageNet folder's training transform (timm's)."""
import pickle

import numpy as np
import pytest
import torch

from timm_hpm.data import (CIFAR_BINARY, FolderAugment, build_train_val, imagenet_train_transform, load_cifar,
                           read_cifar_binary, unaugmented)

from _recipes import RECIPES, load_recipe

REHEARSE = load_recipe(RECIPES / 'benchmarks' / 'rehearse_zoo.py')
write_cifar_binary, write_imagenet_folder = REHEARSE.write_cifar_binary, REHEARSE.write_imagenet_folder


def _cifar_arrays(n, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.uint8)


@pytest.mark.parametrize('name,num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_binary_equals_torchvision_python_version(tmp_path, monkeypatch, name, num_classes):
    """The same images in both on-disk layouts: the binary reader gives what torchvision's loader gives (its MD5
    check, which fabricated files cannot pass, is bypassed here only)."""
    from torchvision import datasets
    train, train_y = _cifar_arrays(10, num_classes, 0)
    test, test_y = _cifar_arrays(6, num_classes, 1)
    write_cifar_binary(name, tmp_path / 'bin', train, train_y, test, test_y)
    cls = {'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100}[name]
    folder = tmp_path / 'py' / cls.base_folder
    folder.mkdir(parents=True)
    label_key = 'labels' if name == 'cifar10' else 'fine_labels'
    splits = {f: (train, train_y) for f, _ in cls.train_list}
    splits.update({f: (test, test_y) for f, _ in cls.test_list})
    train_parts = np.array_split(np.arange(len(train)), len(cls.train_list))  # as the binary files split them
    for filename, (x, y) in splits.items():
        idx = train_parts[[f for f, _ in cls.train_list].index(filename)] if x is train else np.arange(len(x))
        with open(folder / filename, 'wb') as f:  # torchvision's python layout, written by the test itself
            pickle.dump({'data': x[idx].reshape(len(idx), -1), label_key: y[idx].tolist()}, f)
    with open(folder / cls.meta['filename'], 'wb') as f:
        pickle.dump({cls.meta['key']: [str(c) for c in range(num_classes)]}, f)
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda *args, **kwargs: True)
    for split in ('train', 'test'):
        ours = load_cifar(name, split, tmp_path / 'bin', download=False)
        theirs = load_cifar(name, split, tmp_path / 'py', download=False)
        assert isinstance(ours, torch.utils.data.TensorDataset)
        assert len(ours) == len(theirs) == (10 if split == 'train' else 6)
        for i in range(len(ours)):
            torch.testing.assert_close(ours[i][0], theirs[i][0], rtol=0, atol=0)
            assert int(ours[i][1]) == int(theirs[i][1])


def test_cifar_binary_refuses_truncated_and_wrong_files(tmp_path):
    x, y = _cifar_arrays(5, 10)
    write_cifar_binary('cifar10', tmp_path, x, y, x, y)
    path = tmp_path / CIFAR_BINARY['cifar10'][0] / 'test_batch.bin'
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match='not a CIFAR binary file'):
        read_cifar_binary('cifar10', 'test', tmp_path)
    y[0] = 12  # a CIFAR-100 label in a CIFAR-10 file
    write_cifar_binary('cifar10', tmp_path, x, y, x, y)
    with pytest.raises(ValueError, match='out of range'):
        read_cifar_binary('cifar10', 'test', tmp_path)


def test_imagenet_training_transform_is_timms(tmp_path):
    """ImageNet training images go through timm's create_transform(is_training=True) (random resized crop, flip,
    colour jitter) on the decoded image, seeded by (seed, epoch, index); held-out and prototype images through the
    model's evaluation resize and crop."""
    from timm.data import create_transform
    write_imagenet_folder(tmp_path, n_classes=2, train_per_class=3, val_per_class=1)
    cfg = {'input_size': (3, 64, 64), 'interpolation': 'bilinear', 'crop_pct': 0.875}
    train, val = build_train_val('imagenet', tmp_path, val_examples=2, image_size=(3, 64, 64), num_classes=2,
                                 pretrained_cfg=cfg)
    assert isinstance(train, FolderAugment) and len(train) == 4 and len(val) == 2
    expected = create_transform((3, 64, 64), is_training=True, interpolation='bilinear', mean=(0.0,) * 3,
                                std=(1.0,) * 3)
    assert repr(train.transform) == repr(expected) == repr(imagenet_train_transform((3, 64, 64)))
    assert 'RandomResizedCrop' in repr(expected) and 'RandomHorizontalFlip' in repr(expected)
    x, y = train[1]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    state = torch.get_rng_state()
    torch.testing.assert_close(train[1][0], x)  # same (epoch, index): same image
    assert torch.equal(torch.get_rng_state(), state)  # global random state untouched
    train.set_epoch(1)
    assert not torch.equal(train[1][0], x)  # another epoch: another crop
    clean = unaugmented(train)
    assert not isinstance(clean, FolderAugment)
    eval_view = create_transform((3, 64, 64), is_training=False, interpolation='bilinear', crop_pct=0.875,
                                 mean=(0.0,) * 3, std=(1.0,) * 3)
    path, label = clean.dataset.samples[clean.indices[1]]
    torch.testing.assert_close(clean[1][0], eval_view(clean.dataset.loader(path)))
    no_aug, _ = build_train_val('imagenet', tmp_path, val_examples=2, augment=False, pretrained_cfg=cfg)
    assert not isinstance(no_aug, FolderAugment)
