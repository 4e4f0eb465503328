"""Fashion-MNIST images as an image-folder dataset (``<out>/<class>/<index>.png``), the layout every folder
dataset has (ImageNet's validation set included), for timm's own ``validate.py`` and ``train.py``.

    python recipes/fashion_mnist_folder.py --split test --n 1000 --out data/fmnist_test_1000

The PNGs hold the original 8-bit pixels (grey, mode 'L'): timm's transforms read them back exactly. A folder
that already holds images is refused (pick another --out).
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from timm_hpm.data import load_fashion_mnist

# torchvision's class names; zero-padded indices keep a class folder's files in the original test order
CLASSES = ('0_t-shirt', '1_trouser', '2_pullover', '3_dress', '4_coat', '5_sandal', '6_shirt', '7_sneaker',
           '8_bag', '9_ankle-boot')


def write_folder(split: str, n: int, out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f'{out} is not empty; choose another --out')
    dataset = load_fashion_mnist(split)
    images, labels = dataset.tensors
    n = min(n, len(labels))
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = (images[i, 0] * 255).round().numpy().astype(np.uint8)
        Image.fromarray(pixels, mode='L').save(out / CLASSES[int(labels[i])] / f'{i:05d}.png')
    (out / 'source.json').write_text(json.dumps(dict(dataset='fashion_mnist', split=split, first_n=n), indent=2))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--split', choices=('train', 'test'), default='test', help='Fashion-MNIST split (default: test)')
    parser.add_argument('--n', type=int, default=1000, help='the first N images of the split (default: 1000)')
    parser.add_argument('--out', type=Path, required=True, help='folder to write (must be empty or absent)')
    args = parser.parse_args()
    print(f'wrote {write_folder(args.split, args.n, args.out)}')


if __name__ == '__main__':
    main()
