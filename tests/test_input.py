"""Image loading, the dataset, training crops and normalisation, the decode-once cache (imaging.py)."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import utils
import cli
import batches
import imaging
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import original as original_pipeline  # noqa: E402  (the original's torchvision pipelines)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONE_LEVEL = 1 / 255 / min(STD)  # one uint8 step after normalisation


def textured(width, height, seed):
    """[H, W, 3] uint8 with smooth structure plus fine texture (like a photo, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * x - 9 * y), np.sin(11 * x * y + 1)], -1)
    pixels = 128 + 70 * base + rng.normal(0, 20, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('jpegs')
    paths = []
    for k, (w, h) in enumerate([(300, 200), (200, 300), (160, 120), (90, 70)]):
        path = folder / f'img_{k}.jpg'
        Image.fromarray(textured(w, h, k)).save(path, quality=90)
        paths.append(str(path))
    return paths


def train_input(path, size, seed):
    """train.py's training input of one image: the dataset's uint8 resize, the crop and flip of `seed`, normalised."""
    image, _ = batches.ImageListDataset({'a': [path]}, round(size * 8 / 7))[0]
    return imaging.Normalize(MEAN, STD)(imaging.crop_flip_batch(image[None], [(0, seed)], size))[0]


def save_png(folder, name, image):
    path = str(folder / name)
    image.save(path)  # lossless: PIL reads back the same pixels the original's pipeline gets
    return path


def test_inputs_shape_dtype_and_values(tmp_path):
    path = save_png(tmp_path, 'img.png', Image.fromarray(textured(100, 80, 0)))
    for size in (32, 64, 120):  # 120 > image: the resize enlarges
        image, target = batches.ImageListDataset({'a': [path]}, size)[0]
        assert image.shape == (3, size, size) and image.dtype == torch.uint8 and target == 0
        x, y = train_input(path, size, seed=0), imaging.eval_input(path, size, MEAN, STD)
        assert x.shape == y.shape == (3, size, size)
        assert x.dtype == y.dtype == torch.float32
        assert x.is_contiguous() and y.is_contiguous()
    exact = save_png(tmp_path, 'exact.png', Image.fromarray(textured(32, 32, 1)))
    image, _ = batches.ImageListDataset({'a': [exact]}, 32)[0]
    assert torch.equal(image, imaging.load_image_uint8(exact))  # no resize needed: the decoded pixels
    assert imaging.eval_input(exact, 32, MEAN, STD).is_contiguous()  # still a contiguous float tensor
    # a flat grey image normalises to exactly (v/255 - mean)/std per channel
    grey = save_png(tmp_path, 'grey.png', Image.new('RGB', (50, 40), (100, 150, 200)))
    want = (torch.tensor([100, 150, 200]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    for x in (imaging.eval_input(grey, 16, MEAN, STD), train_input(grey, 16, seed=3)):
        assert torch.allclose(x.mean((1, 2)), want, atol=1e-5) and x.std((1, 2)).max() < 1e-6
    # a channels-last batch (as Runtime.inputs gives CUDA) keeps its layout and its values
    batch = torch.stack([imaging.load_image_uint8(exact), imaging.resize_uint8(imaging.load_image_uint8(grey), 32)])
    plain = imaging.Normalize(MEAN, STD)(batch)
    last = imaging.Normalize(MEAN, STD)(batch.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last) and torch.allclose(plain[1].mean((1, 2)), want, atol=1e-5)


def test_same_crops_and_pixels_as_original_for_a_seed(tmp_path):
    img = Image.fromarray(textured(150, 110, 1))
    path = save_png(tmp_path, 'img.png', img)
    original = original_pipeline.train_transform(64, MEAN, STD)
    for seed in range(8):
        torch.manual_seed(seed)  # the original draws from torch's default generator
        a = original(img)
        b = train_input(path, 64, seed)  # crop_flip_batch: from torch.Generator().manual_seed(seed)
        # same crop and flip; resampling agrees with PIL to one level
        assert (a - b).abs().max().item() <= ONE_LEVEL + 1e-5
        # both consumed the same draws: i, j, then the flip
        generator = torch.Generator().manual_seed(seed)
        imaging.crop_flip_draws(73, 64, generator)  # 73 = round(64 * 8 / 7)
        assert torch.rand(1, generator=generator).item() == _rng_after(seed, original, img)
    assert (imaging.eval_input(path, 64, MEAN, STD)
            - original_pipeline.test_transform(64, MEAN, STD)(img)).abs().max().item() <= ONE_LEVEL + 1e-5


def _rng_after(seed, transform, img):
    torch.manual_seed(seed)
    transform(img)
    return torch.rand(1).item()


def test_statistics_match_original(jpegs):
    """Per-channel mean and std of the outputs within 1 % of the original's on full JPEG decodes."""
    dataset = batches.ImageListDataset({'a': jpegs}, 73)
    images = torch.stack([dataset[k][0] for k in range(len(jpegs))])  # uint8 [4, 3, 73, 73], as loaded
    original = original_pipeline.train_transform(64, MEAN, STD)
    outs_o, outs_p = [], []
    for seed in range(3):
        for k, path in enumerate(jpegs):
            torch.manual_seed(seed)
            outs_o.append(original(Image.open(path).convert('RGB')))
        outs_p.append(imaging.Normalize(MEAN, STD)(imaging.crop_flip_batch(images, [(k, seed) for k in range(4)], 64)))
    std, mean = torch.tensor(STD)[:, None], torch.tensor(MEAN)[:, None]
    o = torch.stack(outs_o).transpose(0, 1).flatten(1) * std + mean  # [3, N] pixels in [0, 1]
    p = torch.cat(outs_p).transpose(0, 1).flatten(1) * std + mean
    assert p.shape == o.shape
    assert ((p.mean(1) - o.mean(1)).abs() / o.mean(1)).max() < 0.01
    assert ((p.std(1) - o.std(1)).abs() / o.std(1)).max() < 0.01


def test_uint8_loading_paths_agree_with_pil(jpegs, tmp_path):
    for path in jpegs:  # full decode (torchvision's libjpeg-turbo) gives PIL's pixels
        x = imaging.load_image_uint8(path)
        want = torch.from_numpy(np.array(imaging.load_image(path))).permute(2, 0, 1)
        assert x.dtype == torch.uint8 and x.shape == want.shape
        assert (x.int() - want.int()).abs().max() <= 1 and (x != want).float().mean() < 0.01
    # CMYK JPEG and PNG take the PIL path and agree with load_image
    rgb = textured(40, 30, 3)
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    for name in ('cmyk.jpg', 'rgb.png'):
        want = torch.from_numpy(np.array(imaging.load_image(tmp_path / name))).permute(2, 0, 1)
        assert torch.equal(imaging.load_image_uint8(tmp_path / name), want)


def test_seed_gives_identical_batches_with_workers(jpegs):
    """train.py's loader path: batches of index lists loaded by workers, cropped from the images' seeds."""
    dataset = batches.ImageListDataset({'a': jpegs[:2], 'b': jpegs[2:]}, 37)

    def cropped(seed, workers):
        order = utils.epoch_order(len(dataset), seed, epoch=1)
        index_lists = [order[:2], order[2:]]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[k for k, _ in b] for b in index_lists],
                                             num_workers=workers)
        return [(imaging.crop_flip_batch(x, [(k, s) for k, (_, s) in enumerate(b)], 32), y)
                for (x, y), b in zip(loader, index_lists)]

    first, again, other = cropped(0, workers=2), cropped(0, workers=0), cropped(1, workers=2)
    assert first[0][0].shape == (2, 3, 32, 32) and first[0][0].dtype == torch.uint8
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other))


def test_load_image_converts_every_mode(tmp_path):
    rgb = textured(40, 30, 2)
    grey = Image.fromarray(rgb[..., 0])
    grey.save(tmp_path / 'grey.jpg', quality=95)
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
    Image.fromarray(rgb).convert('P').save(tmp_path / 'palette.png')
    rgba = np.dstack([rgb, np.full((30, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0        # left half fully transparent
    rgba[:, 20:30, 3] = 128    # then half transparent
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    Image.fromarray(rgba, 'RGBA').convert('LA').save(tmp_path / 'la.png')
    Image.fromarray(rgba, 'RGBA').convert('P').save(tmp_path / 'palette_t.png', transparency=0)
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / 'grey16.png')

    for name in ('grey.jpg', 'cmyk.jpg', 'palette.png', 'rgba.png', 'la.png', 'palette_t.png', 'grey16.png'):
        img = imaging.load_image(tmp_path / name)
        assert img.mode == 'RGB' and img.size == (40, 30), name
    g = np.asarray(imaging.load_image(tmp_path / 'grey.jpg')).astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert np.abs(g[..., 0] - rgb[..., 0]).mean() < 5  # JPEG error only
    c = np.asarray(imaging.load_image(tmp_path / 'cmyk.jpg')).astype(int)
    assert np.abs(c - rgb).mean() < 6  # CMYK JPEG comes back as the original colours
    g16 = np.asarray(imaging.load_image(tmp_path / 'grey16.png'))
    assert np.array_equal(g16[..., 0], rgb[..., 0])  # 16-bit scaled to 8 bits, not clipped to white
    a = np.asarray(imaging.load_image(tmp_path / 'rgba.png')).astype(int)
    assert (a[:, :20] == 255).all()                               # transparent -> white background
    assert np.array_equal(a[:, 30:], rgb[:, 30:])                  # opaque -> unchanged
    assert np.abs(a[:, 20:30] - (rgb[:, 20:30].astype(int) * 128 + 255 * 127) / 255).max() <= 1  # blended
    la = np.asarray(imaging.load_image(tmp_path / 'la.png')).astype(int)
    assert (la[:, :20] == 255).all()
    # the same picture loads the same way as a dataset item and through load_image
    dataset = batches.ImageListDataset({'x': [str(tmp_path / 'rgba.png')]}, 16)
    pixels = torch.from_numpy(np.array(imaging.load_image(tmp_path / 'rgba.png'))).permute(2, 0, 1)
    assert torch.equal(dataset[0][0], imaging.resize_uint8(pixels, 16))


def test_damaged_and_missing_files_raise_user_error_naming_them(tmp_path, jpegs):
    data = open(jpegs[0], 'rb').read()
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(data[:len(data) // 2])
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    for path in (truncated, text):
        with pytest.raises(cli.UserError, match='cannot decode image') as err:
            imaging.load_image(str(path))
        assert str(path) in str(err.value) and '(damaged, or not an image)' in str(err.value)
    with pytest.raises(cli.UserError, match='notes.jpg: not in a format Pillow reads') as err:  # no memory address
        imaging.load_image('notes.jpg', data=b'not an image')
    with pytest.raises(cli.UserError, match='not found') as err:
        imaging.load_image(str(tmp_path / 'gone.jpg'))
    assert str(tmp_path / 'gone.jpg') in str(err.value)
    with pytest.raises(cli.UserError, match=f'{tmp_path} is a folder, not an image file'):
        imaging.load_image(str(tmp_path))  # an OS error is reported as such, not as a damaged file

    # inside a DataLoader worker: the error reaches the main process still naming the file
    dataset = batches.ImageListDataset({'a': [jpegs[0], str(truncated)]}, 37)
    loaded = iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    try:
        next(loaded)
        raise AssertionError('the damaged file was not reported')
    except cli.UserError as caught:
        text = str(caught)
    finally:
        # the re-raised exception keeps the iterator in a reference cycle; left to the garbage
        # collector, its worker shutdown waits out a 5 s timeout: stop the worker now
        getattr(loaded, '_shutdown_workers', lambda: None)()
    message = batches.worker_error_message(text)
    assert message.startswith(f'cannot decode image {truncated}:') and '\n' not in message


def test_dataset_order_and_targets():
    split = {'b': ['b1.jpg', 'b2.jpg'], '10': ['t1.jpg'], 'a': ['a1.jpg'], '9': ['n1.jpg', 'n2.jpg']}
    dataset = batches.ImageListDataset(split, side=32)
    assert dataset.classes == ['10', '9', 'a', 'b']  # sorted label strings
    assert dataset.images == ['b1.jpg', 'b2.jpg', 't1.jpg', 'a1.jpg', 'n1.jpg', 'n2.jpg']
    assert dataset.labels == ['b', 'b', '10', 'a', '9', '9']
    assert dataset.targets == [3, 3, 0, 2, 1, 1]
    assert len(dataset) == 6


def test_default_num_workers(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert batches.default_num_workers() == 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert batches.default_num_workers() == 4
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '16')
    assert batches.default_num_workers() == 0


def test_cache_place_and_crops(jpegs, monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setattr(batches, 'available_ram', lambda: 1000)
    assert batches.cache_place('auto', 400, cpu) == 'ram' and batches.cache_place('auto', 401, cpu) is None
    assert batches.cache_place('off', 10, cpu) is None and batches.cache_place('ram', 10, cpu) == 'ram'
    with pytest.raises(cli.UserError, match='--cache gpu: the decoded images take'):
        batches.cache_place('gpu', 10, cpu)  # no GPU memory on the CPU
    # decoded once at the resize: the cache holds the loader's images, so its crops are the loader path's
    dataset = batches.ImageListDataset({'a': jpegs}, 37)
    cache = batches.build_cache(dataset, 'ram', cpu, 'test', show_bar=False)  # decoded by a thread per core
    assert cache.shape == (4, 3, 37, 37) and cache.dtype == torch.uint8
    assert torch.equal(cache, torch.stack([dataset[k][0] for k in range(4)]))  # each image in its own row
    crops = imaging.crop_flip_batch(cache, [(k, 100 + k) for k in range(4)], 32)
    assert crops.shape == (4, 3, 32, 32) and crops.dtype == torch.uint8 and crops.is_contiguous()
    loaded = torch.stack([dataset[3][0], dataset[1][0]])  # a loaded batch: its seeds re-indexed to positions
    assert torch.equal(imaging.crop_flip_batch(loaded, [(0, 103), (1, 101)], 32), crops[[3, 1]])
    draws = [imaging.crop_flip_draws(37, 32, torch.Generator().manual_seed(100 + k)) for k in range(4)]
    assert any(flip for _, _, flip in draws) and not all(flip for _, _, flip in draws)
    assert torch.equal(imaging.gather_crops(cache, range(4), draws, 32), crops)  # the GPU's way, run on the CPU
    for k, (i, j, flip) in enumerate(draws):  # the crop and flip, cut by hand from the decoded image
        crop = imaging.resize_uint8(imaging.load_image_uint8(jpegs[k]), 37)[:, i:i + 32, j:j + 32]
        assert torch.equal(crops[k], crop.flip(-1) if flip else crop)
