"""Tiny CPU runs of benchmarks/input_speed.py and benchmarks/train_speed.py: their tables hold
the values that are exact or bounded on CPU."""
import importlib.util
import math
import os
import sys

import pytest
import cli
from _train_fixtures import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
    result = run_process([sys.executable, *args], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def table_rows(text, first_header_cell):
    """Markdown table rows under the header starting with `first_header_cell` -> list of cell lists."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f'| {first_header_cell} |'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


def number(cell):
    value = float(cell.rstrip('x'))
    assert math.isfinite(value)
    return value


def load_benchmark(name):
    """A benchmark script as a module, in this process (no second torch start-up)."""
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'benchmarks', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_input_speed_tiny():
    out = run_script('benchmarks/input_speed.py', '--sizes', '160x120,320x240', '--num_images', '3',
                     '--image_size', '64', '--repeats', '1', '--stat_seeds', '1')
    rows = table_rows(out, 'JPEG size')
    assert [r[0] for r in rows] == ['160x120', '320x240']
    for name, kib, speed_o, speed_p, ratio, shape, mean_diff, std_diff, same in rows:
        assert number(speed_o) > 0 and number(speed_p) > 0
        assert shape == '3x64x64' and same == 'yes'
        # both decode every pixel and resize bilinearly (the project within 1 grey level of PIL):
        # the statistics agree far more closely than the 1 % the check allows
        assert number(mean_diff) < 0.1 and number(std_diff) < 0.1
    # photo-like texture: 4x the pixels make a larger file (a flat picture would not grow much)
    small, large = number(rows[0][1]), number(rows[1][1])
    assert 2 < small and 2 * small < large < 5 * small
    assert 'statistics check (same shape, per-channel mean and std within 1 %): passed' in out


@pytest.mark.slow
def test_train_speed_tiny_cpu():
    """On CPU both settings run fp32 contiguous (cuDNN flags do nothing there): same weights, same data,
    one thread, so the two loss curves are the same bit for bit."""
    out = run_script('benchmarks/train_speed.py', '--device', 'cpu', '--batch_size', '2', '--image_size', '32',
                     '--steps', '3', '--backbones', 'resnet18')
    assert 'device: CPU (1 threads)' in out
    assert 'original: fp32, contiguous, no cudnn.benchmark' in out and 'project:  fp32, contiguous,' in out
    (row,) = table_rows(out, 'backbone')
    backbone, speed_o, speed_p, ratio, peak_o, peak_p, first, last_o, last_p, diff, noise = row
    assert backbone == 'resnet18' and number(speed_o) > 0 and number(speed_p) > 0
    assert peak_o == peak_p == '-'  # no GPU memory on CPU
    assert last_o == last_p and diff == '0.00'
    # the project's class-balanced loss: near-uniform logits give about ln(100) per sample, times the
    # class weight (8 labels over 100 classes: weights of about 100 / 8 on the classes present)
    module = load_benchmark('train_speed')
    import utils
    _, labels = module.synthetic_task(4, 2, 32, 100, seed=0)  # --data_batches 4, batch 2, 32 px, 100 classes
    weights = utils.class_balanced_weights(labels.flatten(), 100)
    expected = weights[labels[0]].mean().item() * math.log(100)
    assert abs(number(first) - expected) < 0.05 * expected


def test_train_speed_project_setting_description():
    module = load_benchmark('train_speed')
    import torch
    original, project = module.settings_for(torch.device('cpu'), 'bf16', 'on', False)
    assert module.describe(original) == 'fp32, contiguous, no cudnn.benchmark, deterministic cuDNN'
    assert module.describe(project) == 'AMP bf16, channels-last, cudnn.benchmark, non-deterministic cuDNN'
    original, project = module.settings_for(torch.device('cpu'), 'auto', 'auto', True)
    assert module.describe(project) == 'fp32, contiguous, cudnn.benchmark, non-deterministic cuDNN, torch.compile'


def test_train_speed_unknown_backbone_is_a_clear_error(monkeypatch):
    """main() raises UserError listing the valid ones (run_cli turns it into one 'error:' line)."""
    module = load_benchmark('train_speed')
    monkeypatch.setattr(sys, 'argv', ['train_speed.py', '--device', 'cpu', '--backbones', 'resnet18,vgg'])
    with pytest.raises(cli.UserError, match="unknown backbone.*vgg.*valid: resnet18, resnet50, seresnet50"):
        module.main()


def test_train_speed_bad_device_is_a_clear_error(monkeypatch):
    module = load_benchmark('train_speed')
    monkeypatch.setattr(sys, 'argv', ['train_speed.py', '--device', 'gpu', '--backbones', 'resnet18'])
    with pytest.raises(cli.UserError, match="gpu"):
        module.main()
