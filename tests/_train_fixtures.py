"""Tiny training runs for the train.py tests: a hard little dataset, the flags, and runners."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import data_utils  # noqa: E402

NAME = 'tiny'
RUN_NAME = 'tiny_uncropped_resnet18_8'  # {data_name}_{crop_type}_{backbone_type}_{feature_dim}
EPOCHS = 2
# the validation-split runs: 10 classes, of whose 5 training classes --val_split 0.4 holds out 2 and trains on 3
VAL_CLASSES, VAL_FLAGS = 10, ('--val_split', '0.4')


def write_noisy_classes(root, name=NAME, num_classes=6, per_class=4, size=40, seed=0):
    """root/name/class_k/img_j.png: mostly noise with a faint class tint, so retrieval is neither
    perfect nor hopeless and R@1 moves from epoch to epoch."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, name, f'class_{c}')
        os.makedirs(folder, exist_ok=True)
        tint = rng.integers(0, 256, 3)
        for j in range(per_class):
            noise = rng.integers(0, 256, (size, size, 3))
            jitter = rng.integers(0, 256, 3)  # per-image colour cast, as strong as the class tint
            pixels = (0.25 * tint + 0.25 * jitter + 0.5 * noise).astype(np.uint8)
            Image.fromarray(pixels, 'RGB').save(os.path.join(folder, f'img_{j}.png'))


def make_dataset(root, num_classes=6):
    """Write and process the dataset with data_utils: num_classes / 2 training classes x 4, as many test classes."""
    root = os.fspath(root)
    write_noisy_classes(root, num_classes=num_classes)
    data_utils.process_dataset(root, NAME)
    return root


def flags(data_path, results_dir, *extra, epochs=EPOCHS, workers=0):
    """train.py arguments for a few-second CPU run: 32 px, batch 4 (3 steps per epoch), 8-d branches."""
    return ['--data_path', os.fspath(data_path), '--data_name', NAME, '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '4', '--num_epochs', str(epochs), '--recalls', '1,2',
            '--feature_dim', '8', '--num_workers', str(workers), '--device', 'cpu',
            '--results_dir', os.fspath(results_dir), *extra]


def out(results_dir, kind):
    """Path of one output: kind in statistics.csv, model.pth, data_base.pth, checkpoint.pth, curves.png."""
    return os.path.join(os.fspath(results_dir), f'{RUN_NAME}_{kind}')


def run_script(args, fault=None, timeout=300, launcher=(sys.executable,), script='train.py'):
    """Run `launcher script args` in a fresh interpreter (SIGKILL and exit codes need one), with
    `fault` injected by tests/fault_launcher.py when given -> CompletedProcess."""
    # one BLAS/OpenMP thread: on a busy 2-core machine spinning OpenMP threads slow tiny steps 20x
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    command = [str(REPO / 'tests' / 'fault_launcher.py'), fault] if fault else []
    return subprocess.run([*launcher, *command, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tensors(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
