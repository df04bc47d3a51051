"""Decoded + transformed training images per second on one worker (one process, one thread):
the original's pipeline (PIL decode, torchvision Resize -> RandomCrop -> flip -> ToTensor ->
Normalize) against the project's (batches.ImageListDataset: full decode and uint8 resize;
imaging.crop_flip_batch; imaging.Normalize: one fused normalisation), on generated JPEGs of the datasets'
typical sizes. Both decode every pixel (no JPEG draft mode). Also checks that both give the same
output shape and per-channel mean/std within 1 %.

    python benchmarks/input_speed.py                                      # 500x375 and 800x600, 224 px
    python benchmarks/input_speed.py --num_images 8 --image_size 64 --repeats 1   # quick run
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import batches
import imaging  # noqa: E402
from benchmarks.original import train_transform as original_train_transform  # noqa: E402

# ImageNet statistics: the value only matters for un-normalising before comparing statistics
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_like(width, height, rng):
    """A [H, W, 3] uint8 picture with a natural image's 1/f amplitude spectrum (texture at every
    scale, so JPEG files get photo-like sizes, ~2-3 bits per pixel at quality 90), colour in the
    low frequencies, and a random overall tint."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = f ** -1.4

    def field(mask=1.0):
        spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) * amplitude * mask
        x = np.fft.irfft2(spectrum, s=(height, width))
        return x / x.std()

    luminance = field()
    colour = np.stack([field(f < 0.05) for _ in range(3)], -1)  # [H, W, 3] smooth chroma
    pixels = 110 + rng.uniform(-25, 25, 3) + 45 * (0.8 * luminance[..., None] + 0.5 * colour)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_jpegs(folder, width, height, count, seed, quality=90):
    """Write `count` JPEGs of width x height; returns their paths and mean file size in bytes."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        path = os.path.join(folder, f'{width}x{height}_{k:04d}.jpg')
        Image.fromarray(photo_like(width, height, rng)).save(path, 'JPEG', quality=quality)
        paths.append(path)
    return paths, float(np.mean([os.path.getsize(p) for p in paths]))


class OriginalPipeline:
    """The original's __getitem__ -> float [3, s, s]: Image.open(path).convert('RGB') then the torchvision
    transform, its crop and flip drawn from torch's default generator seeded with `seed`."""

    def __init__(self, paths, image_size):
        self.paths, self.transform = paths, original_train_transform(image_size, MEAN, STD)

    def __call__(self, k, seed):
        torch.manual_seed(seed)
        return self.transform(Image.open(self.paths[k]).convert('RGB'))


class ProjectPipeline:
    """train.py's path without a cache -> float [3, s, s]: the dataset item (full decode, uint8 resize to
    round(8s/7)), the crop and flip of `seed` (the same draws as the original's), the normalisation."""

    def __init__(self, paths, image_size):
        self.dataset = batches.ImageListDataset({'images': paths}, round(image_size * 8 / 7))
        self.size, self.normalize = image_size, imaging.Normalize(MEAN, STD)

    def __call__(self, k, seed):
        image, _ = self.dataset[k]  # uint8 [3, r, r]
        return self.normalize(imaging.crop_flip_batch(image[None], [(0, seed)], self.size)[0])


def images_per_second(pipeline, count, repeats):
    """Images per CPU-second of this process (per core: other work on the machine does not count
    against it), best of `repeats` passes over the `count` images."""
    best = float('inf')
    for _ in range(repeats):
        start = time.process_time()
        for k in range(count):
            pipeline(k, seed=k)
        best = min(best, time.process_time() - start)
    return count / max(best, 1e-9)


def pixel_statistics(pipeline, num_images, seeds):
    """Per-channel mean and std of the output pixels in [0, 1] units (normalisation undone),
    over every image and every seed -> (mean [3], std [3]) float64."""
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    shape = None
    for seed in seeds:
        for k in range(num_images):
            x = pipeline(k, seed).double()  # [3, s, s]; a seed gives both pipelines the same crop and flip
            shape = tuple(x.shape)
            x = x * std[:, None, None] + mean[:, None, None]
            total += x.sum((1, 2))
            total_sq += (x * x).sum((1, 2))
            count += x[0].numel()
    m = total / count
    return m, (total_sq / count - m * m).clamp_min(0).sqrt(), shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='500x375,800x600', help='comma list of WxH JPEG sizes')
    parser.add_argument('--num_images', type=int, default=64, help='generated JPEGs per size')
    parser.add_argument('--image_size', type=int, default=224, help='training crop size s')
    parser.add_argument('--repeats', type=int, default=5, help='timed passes per pipeline (best is kept)')
    parser.add_argument('--stat_seeds', type=int, default=4, help='random crops per image for the statistics')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    try:
        sizes = [tuple(int(v) for v in s.lower().split('x')) for s in args.sizes.split(',')]
        assert all(len(s) == 2 and min(s) > 0 for s in sizes)
    except (ValueError, AssertionError):
        raise cli.UserError(f'--sizes must be a comma list of WIDTHxHEIGHT, got {args.sizes!r}') from None
    if args.num_images < 1 or args.image_size < 8 or args.repeats < 1 or args.stat_seeds < 1:
        raise cli.UserError('--num_images, --repeats and --stat_seeds must be >= 1 and --image_size >= 8')

    torch.set_num_threads(1)  # one worker = one core
    print(f'one process, torch threads: {torch.get_num_threads()}, speed in images per CPU-second, '
          f'crop {args.image_size}, resize {round(args.image_size * 8 / 7)}, {args.num_images} JPEGs per size, '
          f'best of {args.repeats}')
    rows, all_ok = [], True
    with tempfile.TemporaryDirectory(prefix='clf_input_speed_') as folder:
        for width, height in sizes:
            paths, file_bytes = make_jpegs(folder, width, height, args.num_images, args.seed)
            original, project = OriginalPipeline(paths, args.image_size), ProjectPipeline(paths, args.image_size)
            for k in range(min(4, len(paths))):  # warm up caches and lazy imports
                original(k, seed=k), project(k, seed=k)
            # alternate the two pipelines so a burst of load on the machine hits both alike
            speed_o, speed_p = 0.0, 0.0
            for _ in range(args.repeats):
                speed_o = max(speed_o, images_per_second(original, len(paths), 1))
                speed_p = max(speed_p, images_per_second(project, len(paths), 1))
            seeds = range(args.seed, args.seed + args.stat_seeds)
            mean_o, std_o, shape_o = pixel_statistics(original, len(paths), seeds)
            mean_p, std_p, shape_p = pixel_statistics(project, len(paths), seeds)
            mean_diff = ((mean_p - mean_o).abs() / mean_o.abs()).max().item()
            std_diff = ((std_p - std_o).abs() / std_o).max().item()
            ok = shape_o == shape_p and mean_diff <= 0.01 and std_diff <= 0.01
            all_ok &= ok
            rows.append((f'{width}x{height}', file_bytes / 1024, speed_o, speed_p, speed_p / speed_o,
                         shape_p, mean_diff * 100, std_diff * 100, ok))

    print()
    print('| JPEG size | file KiB | original img/s | project img/s | speed-up | output | '
          'max mean diff % | max std diff % | same stats |')
    print('| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |')
    for name, kib, so, sp, ratio, shape, dm, ds, ok in rows:
        print(f'| {name} | {kib:.1f} | {so:.1f} | {sp:.1f} | {ratio:.2f}x | {"x".join(map(str, shape))} | '
              f'{dm:.3f} | {ds:.3f} | {"yes" if ok else "NO"} |')
    print()
    print('statistics check (same shape, per-channel mean and std within 1 %):', 'passed' if all_ok else 'FAILED')
    if not all_ok:
        sys.exit(1)


if __name__ == '__main__':
    cli.run_cli(main)
