"""benchmarks/end_to_end.py: the line parser on literal lines, the generated dataset, and (CPU, tiny)
the whole comparison of the reference loop against train.py."""
import math
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'end_to_end.py')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import end_to_end  # noqa: E402
import cli  # noqa: E402
from _train_fixtures import run_process  # noqa: E402

TINY = ['--classes', '4', '--per_class', '6', '--image_width', '64', '--image_height', '48', '--epochs', '2',
        '--backbone', 'resnet18', '--batch_size', '4', '--image_size', '32', '--feature_dim', '8',
        '--workers', '0', '--device', 'cpu']

# train.py's committed formats, stamped at known times (launch at 100.0 s, process end at 110.5 s)
TRAIN_PY_LINES = [
    (101.0, 'Config:'),
    (103.0, 'Cache: 12 images decoded once (0.1 MiB)'),
    (104.0, 'Train set: 12 images, 3 steps of 4 per epoch'),
    (104.2, 'Compile: 1.5s'),
    (106.5, 'Epoch 1/3 | train loss 0.8923 acc 50.00% | R@1 100.00% R@2 100.00% R@4 100.00% R@8 100.00% | '
            'MAP@R 100.00% RP 100.00% | 2.40s (train 2.00s, eval 0.30s, writes 0.10s)'),
    (108.0, 'Epoch 2/3 | train loss 0.5075 acc 66.67% | R@1 83.33% R@2 100.00% | MAP@R 58.31% RP 50.00% | '
            '1.40s (train 1.00s, eval 0.25s, writes 0.15s)'),
    (109.8, 'Epoch 3/3 | train loss 0.4000 acc 75.00% | R@1 75.00% R@2 91.67% R@4 100.00% R@8 100.00% | '
            'MAP@R 50.00% RP 41.67% | 1.60s (train 1.20s, eval 0.35s, writes 0.05s)'),
    (110.0, 'Best R@1 100.00% at epoch 1; model results/x_model.pth'),
]


def test_timings_from_train_py_lines():
    t = end_to_end.timings(100.0, TRAIN_PY_LINES, 110.5)
    expected = {'startup': 4.0, 'first_epoch': 2.5, 'train': 1.1, 'eval': 0.3, 'writes': 0.1, 'exit': 0.5,
                'total': 10.5, 'img_s': 12 * 3 / 4.2, 'r1': 75.0, 'epochs': 3, 'images': 12,
                'epoch_wall': 1.65, 'wall_ratio': (1.5 / 1.25 + 1.8 / 1.55) / 2, 'compile': 1.5}
    assert t.keys() == expected.keys()
    for key, value in expected.items():
        assert t[key] == pytest.approx(value, abs=1e-9), key


def test_timings_reference_lines_without_map_and_one_epoch():
    lines = [(1.0, 'Train set: 10 images, 5 steps of 2 per epoch'),
             (3.0, 'Epoch 1/1 | train loss 0.6580 acc 66.67% | R@1 83.33% R@2 100.00% | '
                   '0.45s (train 0.34s, eval 0.04s, writes 0.08s)'),
             (3.5, 'Best R@1 83.33%')]
    t = end_to_end.timings(0.0, lines, 3.75)
    # one epoch: its train and eval times are the means; no epoch-to-epoch wall
    assert (t['startup'], t['first_epoch'], t['exit'], t['total']) == (1.0, 2.0, 0.25, 3.75)
    assert t['train'] == 0.34 and t['eval'] == 0.04 and t['r1'] == 83.33
    assert t['img_s'] == pytest.approx(10 / 0.34) and t['epoch_wall'] is None and t['compile'] is None


@pytest.mark.parametrize('drop', ['Train set', 'Epoch'])
def test_timings_name_the_missing_line(drop):
    lines = [(t, line) for t, line in TRAIN_PY_LINES if not line.startswith(drop)]
    with pytest.raises(cli.UserError, match=f"no '{drop}"):
        end_to_end.timings(100.0, lines, 110.5)


def test_table_rows_and_skip_original():
    project = end_to_end.timings(100.0, TRAIN_PY_LINES, 110.5)
    original = dict(project, startup=8.0, writes=0.0, r1=50.0)
    rows = [line.split('|')[1:-1] for line in end_to_end.table(original, project)[2:]]
    cells = {name.strip(): [c.strip() for c in rest] for name, *rest in rows}
    assert list(cells) == [name for name, _, _ in end_to_end.ROWS]
    assert cells['startup (s)'] == ['8.00', '4.00', '2.00']
    assert cells['R@1 final (%)'] == ['50.00', '75.00', '0.67']
    assert cells['img/s'] == ['8.6', '8.6', '1.00']
    no_original = end_to_end.table(None, dict(project, writes=0.0))
    assert '| writes per epoch (s) | - | 0.00 | - |' in no_original


def pixel_nearest_neighbour_r1(images, labels, size=16):
    """R@1 of raw pixels (downsampled, centred, L2-normalised): a floor for what a network can learn."""
    x = np.stack([np.asarray(Image.fromarray(p).resize((size, size)), dtype=np.float32).ravel() for p in images])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float((labels[sims.argmax(1)] == labels).mean())


def test_photos_are_photo_sized_and_classes_separable():
    import io
    images, labels, sizes = [], [], []
    for c in range(6):
        rng = np.random.default_rng([0, c])
        pattern = end_to_end.class_pattern(500, 375, rng)
        for _ in range(4):
            pixels, (x, y, w, h) = end_to_end.photo(500, 375, pattern, rng)
            assert pixels.shape == (375, 500, 3) and pixels.dtype == np.uint8
            assert 0 <= x and 0 <= y and x + w <= 500 and y + h <= 375 and w >= 225 and h >= 168
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, 'JPEG', quality=end_to_end.QUALITY)
            sizes.append(len(buffer.getvalue()))
            images.append(pixels)
            labels.append(c)
    # texture at every scale: tens of KiB like CUB's photos (a flat-colour 500x375 JPEG is ~3 KiB)
    assert 30 * 1024 < np.mean(sizes) < 80 * 1024
    # 3 of the 23 other images share the class: chance R@1 is 0.13; raw pixels already do far better
    assert pixel_nearest_neighbour_r1(images, np.array(labels)) >= 0.5


@pytest.mark.slow  # draws with a pool of two processes
def test_generated_dataset_has_cub_layout(tmp_path):
    count, mean_bytes = end_to_end.generate(str(tmp_path), 4, 3, 64, 48, seed=0, processes=2)
    assert count == 12 and mean_bytes > 0
    rows = {name: (tmp_path / name).read_text().split('\n')[:-1] for name in
            ('images.txt', 'image_class_labels.txt', 'bounding_boxes.txt', 'classes.txt')}
    assert [r.split()[0] for r in rows['images.txt']] == [str(k) for k in range(1, 13)]
    # CUB's reader trains on classes <= 100: the second half is numbered from 101
    assert [r.split()[0] for r in rows['classes.txt']] == ['1', '2', '101', '102']
    assert [r.split()[1] for r in rows['image_class_labels.txt']] == ['1'] * 3 + ['2'] * 3 + ['101'] * 3 + ['102'] * 3
    for line, label_line in zip(rows['images.txt'], rows['image_class_labels.txt']):
        rel, label = line.split()[1], int(label_line.split()[1])
        assert rel.split('/')[0] == f'{label:03d}.Class_{label:03d}'  # each class in its own folder
        with Image.open(tmp_path / 'images' / rel) as img:
            assert (img.format, img.size, img.mode) == ('JPEG', (64, 48), 'RGB')
    for line in rows['bounding_boxes.txt']:
        x, y, w, h = map(float, line.split()[1:])
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 48
    # the same seed gives the same bytes with one process as with two
    again = tmp_path / 'again'
    end_to_end.generate(str(again), 4, 3, 64, 48, seed=0, processes=1)
    rel = rows['images.txt'][-1].split()[1]
    assert (again / 'images' / rel).read_bytes() == (tmp_path / 'images' / rel).read_bytes()


def number(cell):
    value = float(cell)
    assert math.isfinite(value)
    return value


@pytest.mark.slow
def test_end_to_end_tiny_cpu(tmp_path):
    done = run_process([sys.executable, SCRIPT, '--data_path', tmp_path, '--keep'] + TINY, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert re.search(r'^device: CPU; torch \S+; 24 images, 2 epochs, resnet18, batch 4, 32 px$', out, re.M)
    lines = out.splitlines()
    start = lines.index('| | original | train.py | original / train.py |')
    rows = {}
    for line in lines[start + 2:start + 2 + len(end_to_end.ROWS)]:
        name, original, project, ratio = [c.strip() for c in line.split('|')[1:-1]]
        rows[name] = (number(original), number(project))
    assert list(rows) == [name for name, _, _ in end_to_end.ROWS]
    for side in (0, 1):
        assert 0 <= rows['R@1 final (%)'][side] <= 100 and rows['img/s'][side] > 0
        assert rows['startup (s)'][side] > 0 and rows['exit (s)'][side] >= 0
        assert rows['mean train per epoch (s)'][side] > 0 and rows['mean eval per epoch (s)'][side] > 0
        assert rows['total wall (s)'][side] > rows['startup (s)'][side] + rows['first epoch (s)'][side]
    # the reference ran exactly 2 epochs; each side's epoch wall is at least its train + eval
    assert len(re.findall(r'\[original +[\d.]+s\] Epoch \d/2 ', out)) == 2
    for label in ('original', 'train.py'):
        ratio = float(re.search(rf'^{re.escape(label)}: epoch wall / \(train \+ eval\), epochs 2..2: ([\d.]+)',
                                out, re.M).group(1))
        assert ratio >= 0.99
    # the kept dataset: 4 classes x 6 JPEGs of 64x48, the size the dataset line reports
    work = tmp_path / end_to_end.WORK
    jpegs = sorted((work / 'cub' / 'images').rglob('*.jpg'))
    assert len(jpegs) == 24 and len((work / 'cub' / 'images.txt').read_text().splitlines()) == 24
    kib = float(re.search(r'^dataset: 24 JPEGs of 64x48 \(quality 90\), 4 classes, mean ([\d.]+) KiB', out,
                          re.M).group(1))
    assert kib == pytest.approx(np.mean([p.stat().st_size for p in jpegs]) / 1024, abs=0.06)
    # the reference made the original's writes: a statistics row per epoch and the best model
    results = work / 'results_original'
    csv = (results / 'cub_uncropped_resnet18_8_statistics.csv').read_text().splitlines()
    assert csv[0].startswith('epoch,train_loss,train_accuracy,test_recall@1') and len(csv) == 3
    assert (results / 'cub_uncropped_resnet18_8_model.pth').is_file()
    assert (work / 'results_train' / 'cub_uncropped_resnet18_8_statistics.csv').is_file()
