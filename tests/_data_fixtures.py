"""Tiny images and datasets for tests: an own class-folder dataset, processed by data_utils into its .pth lists."""
import os

import numpy as np
from PIL import Image

import data_utils


def write_image(path, size=(40, 30), mode='RGB', seed=0, fmt=None, colour=None):
    """An image of random pixels (noise around `colour` when given) in any PIL mode; returns its path.
    `seed` may be a numpy Generator, which then draws on."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if colour is None else \
        np.clip(colour + rng.normal(0, 25, shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, 'RGB')
    if mode != 'RGB':
        img = img.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == 'P' else img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, fmt or ('PNG' if path.endswith('.png') else 'JPEG'), quality=90)
    return path


def write_class_folders(root, name='tiny', num_classes=6, per_class=4, size=64, seed=0):
    """root/name/<class_k>/img_j.jpg: each class a distinct colour with noise, so classes separate."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        colour = rng.integers(0, 256, 3)
        for j in range(per_class):
            write_image(os.path.join(root, name, f'class_{c:02d}', f'img_{j}.jpg'), (size, size), seed=rng,
                        colour=colour)
    return os.path.join(root, name)


def make_tiny_dataset(root, name='tiny', num_classes=6, per_class=4, size=64, seed=0):
    """Write and process a tiny own-folder dataset under root; returns data_path (= root).
    Afterwards data_utils.data_dict_path(root, name, 'uncropped') holds
    {'train': {class: [paths]}, 'test': {...}}: the first half of the sorted classes train."""
    root = os.fspath(root)
    write_class_folders(root, name, num_classes, per_class, size, seed)
    data_utils.process_dataset(root, name)
    return root
