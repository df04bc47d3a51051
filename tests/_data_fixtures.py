"""Tiny datasets for tests: an own class-folder dataset, processed by data_utils into its .pth lists."""
import os

import numpy as np
from PIL import Image

import data_utils


def write_class_folders(root, name='tiny', num_classes=6, per_class=4, size=64, seed=0):
    """root/name/<class_k>/img_j.jpg: each class a distinct colour with noise, so classes separate."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, name, f'class_{c:02d}')
        os.makedirs(folder, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for j in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, 'RGB').save(os.path.join(folder, f'img_{j}.jpg'), quality=90)
    return os.path.join(root, name)


def make_tiny_dataset(root, name='tiny', num_classes=6, per_class=4, size=64, seed=0):
    """Write and process a tiny own-folder dataset under root; returns data_path (= root).
    Afterwards data_utils.data_dict_path(root, name, 'uncropped') holds
    {'train': {class: [paths]}, 'test': {...}}: the first half of the sorted classes train."""
    root = os.fspath(root)
    write_class_folders(root, name, num_classes, per_class, size, seed)
    data_utils.process_dataset(root, name)
    return root
