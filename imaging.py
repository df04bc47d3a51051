"""One image on its way to the model: decode (within PIL's pixel limit; queries turned upright by their EXIF
orientation), resize, normalise, crop and flip, as the training and the queries see it; the per-dataset mean and
std. Datasets, the decode-once cache and batches: batches.py."""
import io
import os
import re
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from cli import UserError


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # own folders and the demo
NORMALIZATION = {  # per-dataset mean/std the published models were trained with
    'car': ((0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568)),
    'cub': ((0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850)),
    'sop': ((0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095)),
    'isc': ((0.8324, 0.8109, 0.8041), (0.2206, 0.2378, 0.2444)),
}


def normalization(name):
    """(mean, std) for a dataset name; ImageNet's for own folders and the demo."""
    return NORMALIZATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a stored image is turned for display
_OPEN_LOCK = threading.Lock()  # the warning filters are global: decoder threads take turns at changing them


def open_image(path, data=None):
    """PIL's open (the header only) of an image file, or of its bytes `data`, within PIL's pixel limit
    (Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); a larger one is a UserError giving its size."""
    limit = Image.MAX_IMAGE_PIXELS
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # PIL's two-line warning: checked below
        try:
            img = Image.open(path if data is None else io.BytesIO(data))
        except Image.DecompressionBombError as err:  # over twice the limit: PIL states only the pixel count
            found = re.search(r'\((\d+) pixels\)', str(err))
            size = f'{int(found[1]):,} pixels' if found else 'too many pixels'
            img = None
    if img is not None:
        if _within_limit(img.size):
            return img
        img.close()
        size = f'{img.width} x {img.height} = {img.width * img.height:,} pixels'
    raise UserError(f'image {path} is too large to decode: {size}, more than the {limit:,} of PIL\'s '
                    f'Image.MAX_IMAGE_PIXELS (a guard against decompression bombs); shrink it first')


def load_image(path, data=None, upright=False):
    """Open and fully decode an image as RGB (PIL); an unreadable or oversized file is a UserError naming it. `data`:
    the file's bytes when already in memory (an upload; `path` then only names it). upright: turned as its EXIF
    orientation tag says (a query: phones store photos sideways with the tag), else the stored pixels (training)."""
    path = os.fspath(path)
    try:
        with open_image(path, data) as img:
            img.load()  # decode now, inside the try, so a damaged file fails here and not later
            return _to_rgb(ImageOps.exif_transpose(img) if upright and _orientation(img) != 1 else img)
    except (UserError, MemoryError):  # MemoryError: no fault of the file (build_cache says what to do)
        raise
    except FileNotFoundError:
        raise UserError(f'image not found: {path}') from None
    except IsADirectoryError:
        raise UserError(f'{path} is a folder, not an image file') from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        if isinstance(err, OSError) and err.errno is not None:  # the OS refused (permissions, I/O)
            raise UserError(f'cannot read image {path}: {err.strerror or err}') from None
        raise UserError(f'cannot decode image {path}: {decode_reason(err)} (damaged, or not an image)') from None


def decode_reason(err):
    """PIL's reason for not decoding an image, in words: its 'cannot identify image file <_io.BytesIO object at
    0x7f...>' names a memory address, not the file."""
    if isinstance(err, Image.UnidentifiedImageError):
        return 'not in a format Pillow reads'
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _orientation(img):
    """The EXIF orientation tag of an opened image: 1 (as stored) to 8; 1 where none or a damaged one is found."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img):
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        # 16-bit / 32-bit greys: rescale to 8 bits instead of clipping everything above 255 to white
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), 'L')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (img.mode == 'P' and 'transparency' in img.info):
        # transparent pixels on white, the background of product photos
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert('RGBA')).convert('RGB')
    # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, P
    return img if img.mode == 'RGB' else img.convert('RGB')


def _jpeg_size(data):
    """(width, height) from a JPEG's frame header (SOFn), or None where none is found: the markers before it only."""
    k = 2  # after the start-of-image marker
    while k + 9 <= len(data) and data[k] == 0xFF:
        marker = data[k + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame; not DHT, JPG, DAC
            height, width = int.from_bytes(data[k + 5:k + 7], 'big'), int.from_bytes(data[k + 7:k + 9], 'big')
            return width, height
        k += 1 if marker == 0xFF else 2 + int.from_bytes(data[k + 2:k + 4], 'big')  # fill byte, or a segment
    return None


def _within_limit(size):
    """Whether a (width, height) is known and within PIL's Image.MAX_IMAGE_PIXELS."""
    limit = Image.MAX_IMAGE_PIXELS
    return size is not None and (limit is None or size[0] * size[1] <= limit)


def load_image_uint8(path, data=None, upright=False):
    """A fully decoded image as uint8 [3, H, W] (a channels-last view of [H, W, 3] pixels); `data` and `upright` as
    load_image's."""
    path = os.fspath(path)
    try:  # plain JPEGs: torchvision's libjpeg-turbo, whole file at once, ~25 % faster than PIL, same pixels
        if data is None:
            with open(path, 'rb') as f:
                data = f.read()
        # JPEG, not an Adobe CMYK one, within PIL's pixel limit (a larger one: load_image says so)
        if data[:3] == b'\xff\xd8\xff' and b'Adobe' not in data[:4096] and _within_limit(_jpeg_size(data)) \
                and not (upright and _turned(data)):
            with warnings.catch_warnings(action='ignore', category=DeprecationWarning):  # 0.29: "torchcodec"
                from torchvision.io import ImageReadMode, decode_jpeg
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, OSError, ValueError):
        pass  # a later torchvision without it, a file it refuses, or one the OS refuses: PIL names the error
    return torch.from_numpy(np.array(load_image(path, data, upright))).permute(2, 0, 1)


def _turned(data):
    """Whether a JPEG's bytes carry an EXIF orientation other than 1 (PIL reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _orientation(img) != 1
    except Exception:  # a damaged header: PIL's full decode names the problem
        return True


def resize_uint8(x, side):
    """uint8 [..., 3, H, W] -> [..., 3, side, side]: bilinear, antialiased (PIL's BILINEAR to +-1 grey level)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    batch = x if x.dim() == 4 else x[None]
    out = torch.nn.functional.interpolate(batch, size=(side, side), mode='bilinear', antialias=True)
    return out if x.dim() == 4 else out[0]


class Normalize:
    """uint8 [..., 3, H, W] -> float32 as (x / 255 - mean) / std in one fused pass, on x's device."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f'mean and std need 3 values each, std > 0; got {mean}, {std}')
        mean64, std64 = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (self.mean, self.std))
        self.scale, self.shift = (1.0 / (255.0 * std64)).float(), (-mean64 / std64).float()  # [3, 1, 1] each

    def __call__(self, x):
        if self.shift.device != x.device:  # moved once, not copied to the GPU every batch
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
        # a channels-last batch (Runtime.inputs on CUDA) stays channels-last for the convolutions; anything
        # else, e.g. the permuted view of one decoded image, becomes contiguous
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=layout)
        return torch.addcmul(self.shift, x, self.scale, out=out)  # shift + x * scale


def crop_flip_draws(resize_side, side, generator=None):
    """One training image's random crop offsets and flip, drawn in torchvision's order (RandomCrop's
    i, j, then RandomHorizontalFlip) -> (i, j, flip)."""
    room = resize_side - side + 1
    i = int(torch.randint(0, room, (1,), generator=generator)) if room > 1 else 0
    j = int(torch.randint(0, room, (1,), generator=generator)) if room > 1 else 0
    return i, j, bool(torch.rand(1, generator=generator) < 0.5)


def crop_flip_batch(images, batch, side):
    """The training crops and flips, each drawn from its image's seed: images uint8 [N, 3, r, r] (the cache, or
    a loaded batch), batch [(index into images, seed)] * B -> uint8 [B, 3, side, side] on the images' device."""
    draws = [crop_flip_draws(images.shape[-1], side, torch.Generator().manual_seed(seed)) for _, seed in batch]
    if images.is_cuda:
        return gather_crops(images, [k for k, _ in batch], draws, side)
    # on a CPU slices and copies are faster: 128 crops of 224 px in 0.01 s, the gather 0.05 s (2 cores)
    crops = [images[k, :, i:i + side, j:j + side] for (k, _), (i, j, _) in zip(batch, draws)]
    return torch.stack([crop.flip(-1) if flip else crop for crop, (_, _, flip) in zip(crops, draws)])


def gather_crops(images, indices, draws, side):
    """crop_flip_batch's crops in one gather kernel (a GPU then launches one kernel, not B copies)."""
    device = images.device
    i, j, flip = torch.tensor(draws, device=device).unbind(1)                        # [B] each
    steps = torch.arange(side, device=device)
    rows, cols = i[:, None] + steps, j[:, None] + steps                               # [B, s]
    cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)                      # reversed where flipped
    index = torch.tensor(indices, device=device)
    return images[index[:, None, None, None], torch.arange(3, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def eval_input(path, side, mean, std, data=None, upright=True):
    """A query image file (or its bytes `data`) as train.py evaluates its images: the full decode resized to
    side x side, normalised -> float [3, s, s]. A query is first turned upright as its EXIF orientation tag says
    (upright=False: the stored pixels, as the datasets of training and evaluation read every image)."""
    return Normalize(mean, std)(resize_uint8(load_image_uint8(path, data, upright), side))


# An upload (serve.py) is a stranger's file: what decoding it may cost is bounded before it starts. A small file can
# describe a huge picture (a 157 KB 16-bit PNG of 9000 x 9000 took 2.1 GB), so the bound is on the pixels the header
# declares, times what decoding one pixel to RGB and resizing it take here at their peak (measured on 9-16
# megapixel files: 10-11 bytes for 8-bit pictures, 15 through torchvision's JPEG decoder, 16 with alpha, 26-29
# for 16/32-bit greys, 20-25 for WebP and JPEG 2000). A JPEG over the bounds is decoded by libjpeg at 1/2, 1/4 or
# 1/8 of its size (PIL's draft), a JPEG 2000 one at 1/2 to 1/8 (its reduce), whichever is the largest within them;
# another over them is refused. Files of a dataset keep PIL's Image.MAX_IMAGE_PIXELS and are decoded whole.
UPLOAD_MAX_PIXELS = 4096 * 4096  # 16.8 megapixels, against the 89.5 million a dataset's image may have
UPLOAD_MAX_DECODE = 256 * 2 ** 20  # bytes one upload's decode may take
_DEEP_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')  # rescaled through float64 (_to_rgb)
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')  # composited on white


def decode_bytes_per_pixel(img):
    """What decoding one pixel of an opened (not yet loaded) image to RGB and resizing it take here at their peak,
    in bytes, rounded up from measurements (see UPLOAD_MAX_DECODE)."""
    if img.mode in _DEEP_MODES:
        per_pixel = 32
    elif img.mode in _ALPHA_MODES or (img.mode == 'P' and 'transparency' in img.info):
        per_pixel = 18
    else:
        per_pixel = 12
    if img.format == 'JPEG':
        per_pixel = max(per_pixel, 16)  # torchvision's decoder and the resize of its output
    elif img.format in ('WEBP', 'JPEG2000'):
        per_pixel += 10  # the decoder's own buffers
    return per_pixel


def _upload_cost(img, size, max_pixels, max_bytes):
    """(pixels, bytes) of decoding `img` at `size`, and whether both are within the bounds."""
    pixels = size[0] * size[1]
    cost = pixels * decode_bytes_per_pixel(img)
    return pixels, cost, pixels <= max_pixels and cost <= max_bytes


def _bounds(max_pixels, max_bytes):
    return (UPLOAD_MAX_PIXELS if max_pixels is None else max_pixels,
            UPLOAD_MAX_DECODE if max_bytes is None else max_bytes)


def upload_scale(img, name, max_pixels=None, max_bytes=None):
    """How an opened upload is decoded within UPLOAD_MAX_PIXELS and UPLOAD_MAX_DECODE (or the bounds given): 1, whole,
    or 2, 4 or 8, the factor its JPEG (draft) or JPEG 2000 (reduce) decoder divides each side by. An image that no
    factor brings within them is a UserError giving its size and the bounds."""
    max_pixels, max_bytes = _bounds(max_pixels, max_bytes)
    pixels, cost, within = _upload_cost(img, img.size, max_pixels, max_bytes)
    if within:
        return 1
    if img.format in ('JPEG', 'JPEG2000'):
        for scale in (2, 4, 8):  # each side (w + scale - 1) // scale, as both decoders round
            size = tuple(-(-side // scale) for side in img.size)
            if _upload_cost(img, size, max_pixels, max_bytes)[2]:
                return scale
    reducible = img.format in ('JPEG', 'JPEG2000')
    raise UserError(f'{name} is too large to decode: {img.width} x {img.height} = {pixels:,} pixels of '
                    f'{img.format or "image"} mode {img.mode}, {cost / 2 ** 20:,.0f} MiB to decode'
                    f'{" (too much even at 1/8 of its size)" if reducible else ""}; an upload may have at most '
                    f'{max_pixels:,} pixels and take {max_bytes / 2 ** 20:,.0f} MiB; shrink it first')


def load_upload_uint8(name, data, max_pixels=None, max_bytes=None):
    """An upload's bytes decoded as load_image_uint8 decodes a file, its cost bounded before decoding (upload_scale):
    within the bounds the very same pixels; a JPEG or JPEG 2000 over them decoded at a reduced size by its own decoder
    -> uint8 [3, H, W]. Unreadable bytes are a UserError, as load_image says it."""
    try:
        with open_image(name, data) as img:
            scale = upload_scale(img, name, max_pixels, max_bytes)
            if scale > 1:
                if img.format == 'JPEG':
                    full = img.size
                    img.draft(None, (max(1, img.width // scale), max(1, img.height // scale)))
                    if not _upload_cost(img, img.size, *_bounds(max_pixels, max_bytes))[2]:  # not reduced enough
                        raise UserError(f'{name} is too large to decode: {full[0]} x {full[1]} pixels, and its '
                                        f'decoder cannot reduce it within the bounds of an upload; shrink it first')
                else:
                    img.reduce = scale.bit_length() - 1  # resolution levels discarded: 1/2, 1/4, 1/8
                img.load()
                turned = ImageOps.exif_transpose(img) if _orientation(img) != 1 else img
                return torch.from_numpy(np.array(_to_rgb(turned))).permute(2, 0, 1)
    except (UserError, MemoryError):
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... (load_image's message)
        raise UserError(f'cannot decode image {name}: {decode_reason(err)} (damaged, or not an image)') from None
    return load_image_uint8(name, data, upright=True)


def upload_input(name, side, mean, std, data):
    """An upload's bytes as eval_input prepares an image file, decoded within the upload bounds (load_upload_uint8)
    -> float [3, s, s]."""
    return Normalize(mean, std)(resize_uint8(load_upload_uint8(name, data), side))
