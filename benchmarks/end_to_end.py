"""End to end on a CUB-size generated dataset: the original's training recipe (re-implemented here
as a reference loop: PIL + torchvision transforms, fp32, deterministic cuDNN, full-matrix recall)
against `train.py` with its default flags, both as subprocesses timed line by line.

    python benchmarks/end_to_end.py                     # 200 classes x 59 JPEGs of 500x375, resnet50, 20 epochs
    python benchmarks/end_to_end.py --classes 4 --per_class 6 --image_width 64 --image_height 48 --epochs 2 \\
        --backbone resnet18 --batch_size 4 --image_size 32 --feature_dim 8 --workers 0 --device cpu   # tiny

Steps: (a) draw photo-like JPEGs in CUB-200-2011's layout under DATA_PATH/e2e/cub (class ids 1..N/2
train and 101..100+N/2 test, since the CUB reader splits at class 100); (b) run data_utils.py on
it; (c) run the reference loop; (d) run train.py. Timings come from the lines each prints:
startup = launch -> 'Train set:', first epoch = 'Train set:' -> 'Epoch 1', mean train / eval per
epoch from the epoch lines (epochs after the first), exit = last line -> process end.
"""
import argparse
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
import cli  # noqa: E402
import distributed  # noqa: E402
import imaging  # noqa: E402

WORK = 'e2e'                  # the benchmark's own folder inside --data_path
MARKER = '.clf_end_to_end'    # marks WORK as ours, so a re-run may replace it
QUALITY = 90                  # JPEG quality of the generated photos
RECALLS = (1, 2, 4, 8)        # train.py's default --recalls


# ----------------------------------------------------------------------------------------------
# (a) a photo-like dataset in CUB's layout
# ----------------------------------------------------------------------------------------------


def smooth_field(width, height, rng, cutoff, power=1.4):
    """[H, W] float32 random field with a 1/f**power spectrum below `cutoff` cycles/pixel, std 1."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = np.where(f < cutoff, f ** -power, 0)
    amplitude[0, 0] = 0  # zero mean
    spectrum = rng.standard_normal((2,) + f.shape, dtype=np.float32) * amplitude  # real and imaginary parts
    x = np.fft.irfft2(spectrum[0] + 1j * spectrum[1], s=(height, width)).astype(np.float32)
    return x / max(float(x.std()), 1e-12)


def low_frequency(width, height, rng, channels=3):
    """[H, W, channels] float32 smooth colour fields: drawn at 1/8 size, bilinearly upsampled (cheap)."""
    w, h = max(width // 8, 4), max(height // 8, 4)
    small = [smooth_field(w, h, rng, 0.3) for _ in range(channels)]
    return np.stack([np.asarray(Image.fromarray(c, 'F').resize((width, height), Image.BILINEAR)) for c in small], -1)


def class_pattern(width, height, class_rng):
    """The class's look: a smooth colour layout [H, W, 3] (std 1) and a base colour [3] in -1..1."""
    return low_frequency(width, height, class_rng), class_rng.uniform(-1, 1, 3).astype(np.float32)


def photo(width, height, pattern, rng):
    """One photo-like image [H, W, 3] uint8 and its box (x, y, w, h): a soft-edged "object" in the
    class's colours inside the box, at a random place, on a textured background (1/f texture at
    every scale gives photo-like JPEG sizes and decode cost), plus sensor noise."""
    layout, base = pattern
    w, h = int(width * rng.uniform(0.45, 0.85)), int(height * rng.uniform(0.45, 0.85))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    # the class layout follows the object: rolled so its centre lands on the box centre
    shifted = np.roll(layout, (y + h // 2 - height // 2, x + w // 2 - width // 2), axis=(0, 1))
    dx = ((np.arange(width, dtype=np.float32) - x - w / 2) / (w / 2)) ** 2    # [W]
    dy = ((np.arange(height, dtype=np.float32) - y - h / 2) / (h / 2)) ** 2   # [H]
    mask = np.clip((1.2 - dy[:, None] - dx[None, :]) / 0.4, 0, 1)[..., None]  # [H, W, 1]: 1 inside the ellipse
    texture = smooth_field(width, height, rng, 1.0)[..., None]               # [H, W, 1] luminance detail
    background = 115 + rng.uniform(-30, 30, 3).astype(np.float32) + 25 * low_frequency(width, height, rng)
    obj = 128 + 55 * base + 45 * shifted
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    pixels = mask * (obj - background) + background + 22 * texture + 3 * noise
    return np.clip(pixels, 0, 255).astype(np.uint8), (x, y, w, h)


def class_id(index, num_classes):
    """CUB class id of class `index` (0-based): the first half 1..N/2, the rest from 101."""
    half = num_classes // 2
    return index + 1 if index < half else 101 + index - half


def class_folder(cid):
    return f'{cid:03d}.Class_{cid:03d}'


def draw_class(job):
    """Write the JPEGs of one class (a worker task) -> [(relative path, (x, y, w, h))]."""
    root, index, num_classes, per_class, width, height, seed = job
    cid = class_id(index, num_classes)
    rng = np.random.default_rng([seed, cid])  # per class: the same bytes whatever the worker count
    pattern = class_pattern(width, height, rng)
    folder = os.path.join(root, 'images', class_folder(cid))
    os.makedirs(folder, exist_ok=True)
    rows = []
    for k in range(per_class):
        pixels, box = photo(width, height, pattern, rng)
        rel = f'{class_folder(cid)}/Class_{cid:03d}_{k + 1:04d}.jpg'
        Image.fromarray(pixels).save(os.path.join(root, 'images', rel), 'JPEG', quality=QUALITY)
        rows.append((rel, box))
    return cid, rows


PARALLEL_FROM = 1000  # images; fewer are drawn in this process, faster than starting workers


def drawing_processes(num_classes, per_class):
    """Processes that draw the dataset: one per class up to the cores, one for a small dataset."""
    return min(os.cpu_count() or 1, num_classes) if num_classes * per_class >= PARALLEL_FROM else 1


def generate(root, num_classes, per_class, width, height, seed, processes=None):
    """Draw the dataset into `root` (CUB layout), in parallel when large -> (image count, mean file bytes)."""
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    jobs = [(root, i, num_classes, per_class, width, height, seed) for i in range(num_classes)]
    processes = processes or drawing_processes(num_classes, per_class)
    if processes > 1:
        # forkserver, not fork: this process has imported torch, and a child forked from it can hang for good
        with multiprocessing.get_context('forkserver').Pool(processes) as pool:
            classes = pool.map(draw_class, jobs, chunksize=1)
    else:
        classes = [draw_class(job) for job in jobs]
    images, labels, boxes, names, sizes = [], [], [], [], []
    for cid, rows in sorted(classes):
        names.append(f'{cid} {class_folder(cid)}')
        for rel, (x, y, w, h) in rows:
            image_id = len(images) + 1
            images.append(f'{image_id} {rel}')
            labels.append(f'{image_id} {cid}')
            boxes.append(f'{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}')
            sizes.append(os.path.getsize(os.path.join(root, 'images', rel)))
    for name, lines in (('images.txt', images), ('image_class_labels.txt', labels),
                        ('bounding_boxes.txt', boxes), ('classes.txt', names)):
        with open(os.path.join(root, name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return len(images), float(np.mean(sizes))


# ----------------------------------------------------------------------------------------------
# (c) the reference: the original's recipe, run as a child process of this script
# ----------------------------------------------------------------------------------------------


class OriginalDataset(torch.utils.data.Dataset):
    """The original's dataset: Image.open(path).convert('RGB') then a torchvision transform."""

    def __init__(self, split, transform):
        self.classes = sorted(split)
        self.images = [p for label in self.classes for p in split[label]]
        self.labels = [label for label in self.classes for _ in split[label]]
        self.targets = [self.classes.index(label) for label in self.labels]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.open(self.images[index]).convert('RGB')), self.targets[index]


def full_matrix_recall(features, targets, ks):
    """The original's recall: the whole [N, N] similarity matrix, self excluded, top-k per row.
    features [N, D] L2-normalised, targets [N] -> {k: fraction}."""
    sims = features @ features.T                     # [N, N]
    sims.fill_diagonal_(-float('inf'))               # exclude the query itself exactly
    top = sims.topk(min(max(ks), len(targets) - 1), dim=1).indices  # [N, K]
    hits = targets[top] == targets[:, None]          # [N, K]
    return {k: hits[:, :k].any(1).float().mean().item() for k in ks}


def reference(args):
    """Train and evaluate like the original, printing train.py's line formats (without MAP@R)."""
    import pandas as pd

    import data_utils
    import model as model_lib
    from benchmarks import original
    device = distributed.resolve_device(args.device)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(args.seed)
    data_path = os.path.join(args.data_path, WORK)
    dicts = torch.load(data_utils.data_dict_path(data_path, 'cub', 'uncropped'), weights_only=True)
    mean, std = imaging.normalization('cub')
    train_set = OriginalDataset(dicts['train'], original.train_transform(args.image_size, mean, std))
    test_set = OriginalDataset(dicts['test'], original.test_transform(args.image_size, mean, std))
    loader = dict(num_workers=args.workers, pin_memory=device.type == 'cuda')
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, **loader)
    test_loader = torch.utils.data.DataLoader(test_set, args.batch_size, shuffle=False, **loader)
    num_classes = len(train_set.classes)
    net = model_lib.Model(args.backbone, args.feature_dim, num_classes, pretrained=False).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    milestones = sorted({m for m in (int(0.6 * args.epochs), int(0.8 * args.epochs)) if m > 0})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    weights = utils.class_balanced_weights(train_set.targets, num_classes)
    criterion = utils.LabelSmoothingCrossEntropy(smoothing=0.1, temperature=1.0, weight=weights).to(device)
    test_targets = torch.tensor(test_set.targets, device=device)
    results_dir = os.path.join(data_path, 'results_original')
    os.makedirs(results_dir, exist_ok=True)
    prefix = os.path.join(results_dir, f'cub_uncropped_{args.backbone}_{args.feature_dim}')
    n = len(train_set) - (len(train_set) % args.batch_size == 1)  # a last batch of 1 is skipped (BatchNorm)
    print(f'Train set: {n} images, {math.ceil(n / args.batch_size)} steps of {args.batch_size} per epoch',
          flush=True)

    statistics, best = [], -1.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        net.train()
        total_loss, correct, seen = 0.0, 0, 0
        for images, targets in train_loader:
            if len(targets) < 2:
                continue
            images, targets = images.to(device), targets.to(device)  # [B, 3, s, s], [B]
            _, logits = net(images)                                   # [B, C]
            loss = criterion(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
        scheduler.step()
        trained = time.perf_counter()

        net.eval()
        with torch.no_grad():
            features = torch.cat([net(images.to(device))[0] for images, _ in test_loader])  # [N, 3 * dim]
            recalls = full_matrix_recall(features, test_targets, RECALLS)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        evaluated = time.perf_counter()

        # the original's writes: statistics every epoch, model and feature database when R@1 improves
        statistics.append({'train_loss': total_loss / seen, 'train_accuracy': 100 * correct / seen,
                           **{f'test_recall@{k}': 100 * v for k, v in recalls.items()}})
        pd.DataFrame(statistics, index=range(1, epoch + 1)).to_csv(f'{prefix}_statistics.csv', index_label='epoch')
        if recalls[1] > best:
            best = recalls[1]
            torch.save(net.state_dict(), f'{prefix}_model.pth')
            torch.save({'test_images': test_set.images, 'test_labels': test_set.labels,
                        'test_features': features}, f'{prefix}_data_base.pth')
        done = time.perf_counter()
        recall_text = ' '.join(f'R@{k} {100 * v:.2f}%' for k, v in recalls.items())
        print(f'Epoch {epoch}/{args.epochs} | train loss {total_loss / seen:.4f} acc {100 * correct / seen:.2f}% | '
              f'{recall_text} | {done - start:.2f}s (train {trained - start:.2f}s, eval {evaluated - trained:.2f}s, '
              f'writes {done - evaluated:.2f}s)', flush=True)
    print(f'Best R@1 {100 * best:.2f}%', flush=True)


# ----------------------------------------------------------------------------------------------
# timing a run from its output lines
# ----------------------------------------------------------------------------------------------

TRAIN_SET_RE = re.compile(r'^Train set: (\d+) images, (\d+) steps? of (\d+)(?: images)? per epoch')
EPOCH_RE = re.compile(r'^Epoch (\d+)/(\d+) \| train loss (\S+) acc (\S+)% \| (?P<recalls>[^|]*)\| '
                      r'(?:MAP@R (?P<map>\S+)%(?: RP \S+%)? \| )?(?P<total>[\d.]+)s \(train (?P<train>[\d.]+)s, '
                      r'eval (?P<eval>[\d.]+)s, writes (?P<writes>[\d.]+)s\)')
COMPILE_RE = re.compile(r'^Compile: ([\d.]+)s')


def run_timed(command, label, log):
    """Run `command`, stamping each stdout line as it arrives -> (launch, [(time, line)], end).
    stderr (progress bars) goes to the file `log`; a failed run is a UserError with its tail."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    lines = []
    with open(log, 'w') as err:
        launch = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        for line in process.stdout:
            now = time.perf_counter()
            lines.append((now, line.rstrip('\n')))
            print(f'  [{label} {now - launch:7.1f}s] {line.rstrip()}', flush=True)
        code = process.wait()
        end = time.perf_counter()
    if code != 0:
        with open(log) as f:
            tail = f.read()[-1500:]
        raise cli.UserError(f'{label} failed (exit {code}): {" ".join(command)}\n{tail}')
    return launch, lines, end


def mean(values):
    return sum(values) / len(values)


def timings(launch, lines, end):
    """Figures of one run from its stamped lines [(time, text)] in train.py's formats -> dict
    (seconds, img/s, R@1 in %); a missing line is a UserError naming it."""
    start = next(((t, m) for t, line in lines if (m := TRAIN_SET_RE.match(line))), None)
    epochs = [(t, m) for t, line in lines if (m := EPOCH_RE.match(line))]
    if start is None or not epochs:
        missing = "'Train set:'" if start is None else "'Epoch e/E | ... (train ..s, eval ..s, writes ..s)'"
        raise cli.UserError(f'no {missing} line in the output: cannot time this run')
    recalls = dict(re.findall(r'R@(\d+) ([\d.]+)%', epochs[-1][1]['recalls']))
    if '1' not in recalls:
        raise cli.UserError(f'no R@1 in the last epoch line: {epochs[-1][1].group(0)}')
    t0, images = start[0], int(start[1].group(1))
    times = [{key: float(m[key]) for key in ('train', 'eval', 'writes')} for _, m in epochs]
    later = times[1:] or times  # epoch 1 carries the warm-up (workers, cuDNN, compile): reported apart
    walls = [b[0] - a[0] for a, b in zip(epochs, epochs[1:])]  # epoch line to epoch line, epochs >= 2
    compiled = next((float(m.group(1)) for _, line in lines if (m := COMPILE_RE.match(line))), None)
    return {
        'startup': t0 - launch,
        'first_epoch': epochs[0][0] - t0,
        'train': mean([e['train'] for e in later]),
        'eval': mean([e['eval'] for e in later]),
        'writes': mean([e['writes'] for e in times]),
        'exit': end - lines[-1][0],
        'total': end - launch,
        'img_s': images * len(times) / max(sum(e['train'] for e in times), 1e-9),
        'r1': float(recalls['1']),
        'epochs': len(times),
        'images': images,
        'epoch_wall': mean(walls) if walls else None,
        'wall_ratio': mean([w / (e['train'] + e['eval']) for w, e in zip(walls, times[1:])]) if walls else None,
        'compile': compiled,
    }


ROWS = [('startup (s)', 'startup', '.2f'), ('first epoch (s)', 'first_epoch', '.2f'),
        ('mean train per epoch (s)', 'train', '.2f'), ('mean eval per epoch (s)', 'eval', '.2f'),
        ('writes per epoch (s)', 'writes', '.2f'), ('exit (s)', 'exit', '.2f'),
        ('total wall (s)', 'total', '.2f'), ('img/s', 'img_s', '.1f'), ('R@1 final (%)', 'r1', '.2f')]


def table(original, project):
    """The markdown comparison; `original` may be None (--skip_original) -> list of lines."""
    out = ['| | original | train.py | original / train.py |', '| --- | ---: | ---: | ---: |']
    for name, key, fmt in ROWS:
        o = '-' if original is None else format(original[key], fmt)
        p = format(project[key], fmt)
        ratio = '-' if original is None or project[key] == 0 else f'{original[key] / project[key]:.2f}'
        out.append(f'| {name} | {o} | {p} | {ratio} |')
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--data_path', default=None, help=f'folder for the benchmark\'s own {WORK}/ folder (default: a temp dir)')
    add('--keep', action='store_true', help=f'keep {WORK}/ (generated data and results) afterwards')
    add('--classes', type=int, default=200, help='classes (even, at most 200): half train, half test')
    add('--per_class', type=int, default=59, help='images per class (CUB: 11,788 / 200 = 59)')
    add('--image_width', type=int, default=500)
    add('--image_height', type=int, default=375)
    add('--seed', type=int, default=0)
    add('--epochs', type=int, default=20)
    add('--backbone', default='resnet50')
    add('--feature_dim', type=int, default=512)
    add('--batch_size', type=int, default=128)
    add('--image_size', type=int, default=224)
    add('--workers', type=int, default=None,
        help="reference's loader workers (default 8); when given, also train.py's --num_workers")
    add('--device', default=None, help="cpu, cuda or cuda:N; passed to train.py when given")
    add('--compile', action='store_true', help='pass --compile to train.py')
    add('--skip_original', action='store_true', help='run train.py only')
    add('--reference_child', action='store_true', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args):
    import model as model_lib
    if args.backbone not in model_lib.BACKBONES:
        raise cli.UserError(f'unknown --backbone {args.backbone!r}; valid: {", ".join(sorted(model_lib.BACKBONES))}')
    if not (2 <= args.classes <= 200 and args.classes % 2 == 0):
        raise cli.UserError(f'--classes must be even, from 2 to 200 (CUB\'s split at class 100), got {args.classes}')
    checks = {'--per_class': (args.per_class, 2), '--image_width': (args.image_width, 16),
              '--image_height': (args.image_height, 16), '--epochs': (args.epochs, 1),
              '--feature_dim': (args.feature_dim, 1), '--batch_size': (args.batch_size, 2),
              '--image_size': (args.image_size, 8), '--workers': (8 if args.workers is None else args.workers, 0)}
    for flag, (value, low) in checks.items():
        if value < low:
            raise cli.UserError(f'{flag} must be at least {low}, got {value}')


def main(argv=None):
    args = parse_args(argv)
    if args.reference_child:
        args.workers = 8 if args.workers is None else args.workers
        return reference(args)
    check_args(args)
    device = distributed.resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'device: {name} ({os.cpu_count()} CPU cores); torch {torch.__version__}', flush=True)

    temp = None if args.data_path else tempfile.mkdtemp(prefix='clf_e2e_')
    data_path = args.data_path or temp
    work = os.path.join(data_path, WORK)
    if os.path.exists(work):
        if not os.path.exists(os.path.join(work, MARKER)):
            raise cli.UserError(f'{work} exists and was not made by this benchmark: move it or pick another '
                                  f'--data_path')
        shutil.rmtree(work)
    os.makedirs(work)
    open(os.path.join(work, MARKER), 'w').close()
    try:
        start = time.perf_counter()
        count, mean_bytes = generate(os.path.join(work, 'cub'), args.classes, args.per_class, args.image_width,
                                     args.image_height, args.seed)
        print(f'dataset: {count} JPEGs of {args.image_width}x{args.image_height} (quality {QUALITY}), '
              f'{args.classes} classes, mean {mean_bytes / 1024:.1f} KiB, drawn in {time.perf_counter() - start:.1f}s '
              f'on {drawing_processes(args.classes, args.per_class)} processes', flush=True)
        start = time.perf_counter()
        run_timed([sys.executable, 'data_utils.py', '--data_path', work, '--data_name', 'cub'], 'data_utils',
                  os.path.join(work, 'data_utils.log'))
        print(f'data_utils.py: {time.perf_counter() - start:.1f}s', flush=True)

        original = None
        if not args.skip_original:
            command = [sys.executable, os.path.abspath(__file__), '--reference_child', '--data_path', data_path,
                       '--epochs', str(args.epochs), '--backbone', args.backbone, '--feature_dim',
                       str(args.feature_dim), '--batch_size', str(args.batch_size), '--image_size',
                       str(args.image_size), '--device', str(device)] + \
                (['--workers', str(args.workers)] if args.workers is not None else [])
            original = timings(*run_timed(command, 'original', os.path.join(work, 'original.log')))
        command = [sys.executable, 'train.py', '--data_path', work, '--data_name', 'cub', '--pretrained', 'none',
                   '--num_epochs', str(args.epochs), '--backbone_type', args.backbone, '--feature_dim',
                   str(args.feature_dim), '--batch_size', str(args.batch_size), '--image_size', str(args.image_size),
                   '--results_dir', os.path.join(work, 'results_train')] + \
            (['--device', args.device] if args.device else []) + (['--compile'] if args.compile else []) + \
            (['--num_workers', str(args.workers)] if args.workers is not None else [])
        project = timings(*run_timed(command, 'train.py', os.path.join(work, 'train.log')))
    finally:
        if not args.keep:
            shutil.rmtree(temp or work, ignore_errors=True)

    print()
    print(f'device: {name}; torch {torch.__version__}; {count} images, {args.epochs} epochs, {args.backbone}, '
          f'batch {args.batch_size}, {args.image_size} px')
    print('\n'.join(table(original, project)))
    print()
    if project['compile'] is not None:
        print(f'train.py compile: {project["compile"]:.1f}s (inside its first epoch)')
    for label, figures in (('original', original), ('train.py', project)):
        if figures is not None and figures['wall_ratio'] is not None:
            print(f'{label}: epoch wall / (train + eval), epochs 2..{figures["epochs"]}: {figures["wall_ratio"]:.3f} '
                  f'(mean epoch wall {figures["epoch_wall"]:.2f}s)')
    if args.keep:
        print(f'kept: {work}')


if __name__ == '__main__':
    cli.run_cli(main)
