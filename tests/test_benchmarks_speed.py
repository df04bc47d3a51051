"""Tiny CPU runs of benchmarks/input_speed.py and benchmarks/train_speed.py: they finish and
print tables of real numbers."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
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


def test_input_speed_tiny():
    # 64 px: 160x120 decodes at full size, 320x240 in JPEG draft mode at half size (160x120 >= 73x73)
    out = run_script('benchmarks/input_speed.py', '--sizes', '160x120,320x240', '--num_images', '3',
                     '--image_size', '64', '--repeats', '1', '--stat_seeds', '1')
    rows = table_rows(out, 'JPEG size')
    assert [r[0] for r in rows] == ['160x120', '320x240']
    for name, kib, speed_o, speed_p, ratio, shape, mean_diff, std_diff, same in rows:
        assert number(kib) > 0 and number(speed_o) > 0 and number(speed_p) > 0
        assert abs(number(ratio) - number(speed_p) / number(speed_o)) < 0.02
        assert shape == '3x64x64'
        assert 0 <= number(mean_diff) <= 1 and 0 <= number(std_diff) <= 1 and same == 'yes'
    assert 'statistics check (same shape, per-channel mean and std within 1 %): passed' in out


def test_train_speed_tiny_cpu():
    out = run_script('benchmarks/train_speed.py', '--device', 'cpu', '--batch_size', '2', '--image_size', '32',
                     '--steps', '3', '--backbones', 'resnet18', '--amp', 'bf16', '--channels_last', 'on')
    assert 'device: CPU (1 threads)' in out and 'project:  AMP bf16, channels-last, cudnn.benchmark' in out
    (row,) = table_rows(out, 'backbone')
    backbone, speed_o, speed_p, ratio, peak_o, peak_p, first, last_o, last_p, diff, noise = row
    assert backbone == 'resnet18'
    assert number(speed_o) > 0 and number(speed_p) > 0
    assert abs(number(ratio) - number(speed_p) / number(speed_o)) < 0.02
    assert peak_o == peak_p == '-'  # no GPU memory on CPU
    # same initial weights and data: the first loss is shared, near ln(100) for 100 random classes
    assert abs(number(first) - math.log(100)) < 1.0
    assert number(last_o) > 0 and number(last_p) > 0 and 0 <= number(diff) < 10 and number(noise) >= 0


def test_train_speed_unknown_backbone_is_a_clear_error(monkeypatch):
    """Checked in this process (no second torch start-up): main() raises UserError listing the valid ones."""
    sys.path.insert(0, ROOT)
    import utils
    spec = importlib.util.spec_from_file_location('train_speed', os.path.join(ROOT, 'benchmarks', 'train_speed.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, 'argv', ['train_speed.py', '--device', 'cpu', '--backbones', 'resnet18,vgg'])
    with pytest.raises(utils.UserError, match="unknown backbone.*vgg.*valid: resnet18, resnet50, seresnet50"):
        module.main()
