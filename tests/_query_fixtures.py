"""Tiny feature databases for the test.py tests, built the way train.py builds them (contract format)."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import Model  # the repository is on sys.path: tests/conftest.py
import imaging
import retrieval

REPO = Path(__file__).resolve().parents[1]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 32  # network input; the written pictures are 224 x 224 whatever this is


def load_script():
    """test.py as a module (`import test` would find Python's own `test` package)."""
    spec = importlib.util.spec_from_file_location('clf_test_script', REPO / 'test.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_test_script(script, argv, capsys):
    """test.py's main through run_cli, as `python test.py ...` runs it: (exit status, stdout, stderr)."""
    from cli import run_cli
    try:
        run_cli(lambda: script.main(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def make_image(path, seed, size=40):
    """A picture with a plain, muted background (so frames are easy to read back) and a noisy centre."""
    rng = np.random.default_rng(seed)
    background = rng.integers(90, 170, size=3)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = background
    pixels[size // 4:3 * size // 4, size // 4:3 * size // 4] = rng.integers(0, 256, size=(size // 2, size // 2, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return tuple(int(v) for v in background)


def make_split(folder, labels, seed):
    """One image per label in `folder`: (paths, labels, backgrounds)."""
    paths, backgrounds = [], []
    for i, label in enumerate(labels):
        path = os.path.join(folder, f'{label}_{seed}_{i:03d}.png')
        backgrounds.append(make_image(path, seed * 1000 + i))
        paths.append(path)
    return paths, list(labels), backgrounds


@torch.no_grad()
def embed(model, paths, image_size=IMAGE_SIZE):
    """Features of images as test.py would compute them: model(eval_input(image)) -> [N, D]."""
    batch = torch.stack([imaging.eval_input(p, image_size, IMAGENET_MEAN, IMAGENET_STD) for p in paths])  # [N, 3, s, s]
    return model.eval()(batch)[0]


def make_database(folder, test, gallery=None, backbone_type='resnet18', feature_dim=8, branches='SMG',
                  num_classes=3, name='tiny_uncropped', seed=0):
    """Random-init model + its feature database in `folder`, written by train.py's writer
    (retrieval.save_model_and_database); returns (database path, model)."""
    torch.manual_seed(seed)
    model = Model(backbone_type, feature_dim, num_classes, branches, pretrained=False).eval()
    db = {'test_images': test[0], 'test_labels': test[1], 'test_features': embed(model, test[0])}
    if gallery is not None:
        db.update(gallery_images=gallery[0], gallery_labels=gallery[1], gallery_features=embed(model, gallery[0]))
    db['config'] = {'backbone_type': backbone_type, 'feature_dim': feature_dim, 'branches': branches,
                    'num_classes': num_classes, 'image_size': IMAGE_SIZE, 'mean': list(IMAGENET_MEAN),
                    'std': list(IMAGENET_STD), 'data_name': name.split('_')[0], 'crop_type': 'uncropped'}
    stem = os.path.join(folder, f'{name}_{backbone_type}_{feature_dim}')
    retrieval.save_model_and_database(model.state_dict(), db, f'{stem}_model.pth', f'{stem}_data_base.pth')
    return f'{stem}_data_base.pth', model


def copy_database(db_path, folder, change):
    """A copy of a database and its model file in `folder`, the database first changed in place by
    change(db); written by the same writer, so it is a consistent pair -> the copy's database path."""
    db = torch.load(db_path, weights_only=True)
    state = torch.load(os.path.join(os.path.dirname(db_path), db['config']['model_file']), weights_only=True)
    change(db)
    copy = os.path.join(folder, os.path.basename(db_path))
    retrieval.save_model_and_database(state, db, os.path.join(folder, db['config']['model_file']), copy)
    return copy


def brute_force(query_feature, features, exclude=None, labels=None, query_label=None):
    """Reference ranking: every candidate's cosine similarity, sorted best first; ties go against the query
    (other-class items first, when its label is given), then by index."""
    q = query_feature / query_feature.norm()
    scored = []
    for i in range(len(features)):
        if i != exclude:
            same = query_label is not None and labels[i] == query_label
            scored.append((-float(features[i] @ q / features[i].norm()), same, i))
    scored.sort()
    return [i for _, _, i in scored], [-s for s, _, _ in scored]


def snapshot(folder):
    """Every file under `folder` (hidden ones too) -> its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, 'rb') as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found
