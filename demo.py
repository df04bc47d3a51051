"""The built-in demo dataset: classes of synthetic objects (2-3 textured shapes) drawn on cluttered backgrounds,
written in CUB-200-2011's layout so that data_utils.py reads it as it reads CUB (`--data_name demo`)."""
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from cli import UserError
from files import read_bytes



DEMO_CLASSES, DEMO_PER_CLASS, DEMO_SIZE = 48, 24, 112


POLYGONS = ('square', 'triangle', 'diamond', 'hexagon', 'star', 'cross')


SHAPES = POLYGONS + ('circle', 'ring')


TEXTURES = ('solid', 'hstripes', 'vstripes', 'checker', 'dots')


DEMO_MARKER = 'demo_seed.txt'


def _polygon(shape, cx, cy, r, angle):
    """Outline points of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == 'cross':  # plus sign: 12 corners at two radii
        pts = [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
               (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]
    else:  # corners on the unit circle; a star's odd ones further in, a diamond narrowed in x
        n = {'square': 4, 'triangle': 3, 'diamond': 4, 'hexagon': 6, 'star': 10}[shape]
        offset, scale_x = math.pi / 4 if shape == 'square' else -math.pi / 2, 0.65 if shape == 'diamond' else 1.0
        radii = [0.45 if shape == 'star' and k % 2 else 1.0 for k in range(n)]
        angles = [offset + 2 * math.pi * k / n for k in range(n)]
        pts = [(rad * math.cos(a) * scale_x, rad * math.sin(a)) for rad, a in zip(radii, angles)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture(kind, size, colour_a, colour_b, period):
    """An RGB texture of (size, size) pixels: colour_b on the odd bands (or dots) of period pixels."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == 'dots':  # a disc in every (2 period)^2 square
        mask = (xx % (2 * period) - period) ** 2 + (yy % (2 * period) - period) ** 2 < (period * 0.6) ** 2
    else:
        mask = {'solid': 0 * xx, 'hstripes': yy // period, 'vstripes': xx // period,
                'checker': xx // period + yy // period}[kind] % 2 == 1
    return Image.fromarray(np.where(mask[..., None], np.array(colour_b, np.uint8), np.array(colour_a, np.uint8)), 'RGB')


def _demo_class(rng):
    """A class = 2-3 parts, each (shape, texture, two colours, offset dx dy and radius relative to the first)."""
    parts = []
    for k in range(rng.integers(2, 4)):
        shape, texture = SHAPES[rng.integers(len(SHAPES))], TEXTURES[rng.integers(len(TEXTURES))]
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)]
        place = (0.0, 0.0, 1.0) if k == 0 else (rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.35, 0.7))
        parts.append((shape, texture, colours, *place))
    return parts


def _draw_demo_image(parts, rng, size):
    """One picture of an object: random background, clutter, position, scale, rotation -> (image, object box)."""
    # background: a random two-colour gradient plus noise, then a few small clutter shapes
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), 'RGB')
    for _ in range(rng.integers(1, 5)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.08)
        ImageDraw.Draw(img).polygon(_polygon(POLYGONS[rng.integers(len(POLYGONS))], x, y, r, rng.uniform(0, 6.3)),
                                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    # the object: part offsets are in units of the main radius, turned with the whole object
    radius, angle = size * rng.uniform(0.16, 0.27), rng.uniform(-0.5, 0.5)
    extent = radius * 1.6
    cx, cy = rng.uniform(extent, size - extent), rng.uniform(extent, size - extent)
    outline = Image.new('L', (size, size), 0)  # all parts' masks: its bounding box is the object's box
    for shape, texture, colours, dx, dy, r in parts:
        dx, dy, r = dx * radius, dy * radius, r * radius
        px = cx + dx * math.cos(angle) - dy * math.sin(angle)
        py = cy + dx * math.sin(angle) + dy * math.cos(angle)
        jitter = rng.integers(-20, 21, 3)  # lighting: the same colour never renders exactly alike
        colour_a, colour_b = (tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter)) for colour in colours)
        mask = Image.new('L', (size, size), 0)
        if shape in ('circle', 'ring'):
            ImageDraw.Draw(mask).ellipse((px - r, py - r, px + r, py + r), fill=255)
            if shape == 'ring':
                ImageDraw.Draw(mask).ellipse((px - r * 0.5, py - r * 0.5, px + r * 0.5, py + r * 0.5), fill=0)
        else:
            ImageDraw.Draw(mask).polygon(_polygon(shape, px, py, r, angle), fill=255)
        img.paste(_texture(texture, size, colour_a, colour_b, max(2, int(r / 3))), (0, 0), mask)
        outline.paste(255, mask=mask)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img, outline.getbbox() or (size, size, 0, 0)


def make_demo(root, seed=0, num_classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS, size=DEMO_SIZE):
    """Draw the demo dataset into root in CUB-200-2011's layout; the same seed and sizes give the same bytes."""
    signature = f'seed {seed} classes {num_classes} per_class {per_class} size {size}\n'
    if os.path.islink(root) and os.path.isdir(root):  # a demo folder on another disk: redrawn there, the link kept
        root = os.path.realpath(root)
    marker = os.path.join(root, DEMO_MARKER)
    drawing, old = root.rstrip(os.sep) + '.partial', root.rstrip(os.sep) + '.old'
    for leftover in (drawing, old):  # what an interrupted drawing or swap left; a link there: removed, not followed
        if os.path.islink(leftover):
            os.remove(leftover)
        elif os.path.isdir(leftover):
            shutil.rmtree(leftover)
    if os.path.isfile(marker):
        if read_bytes(marker, 'demo marker') == signature.encode():
            return root  # already drawn with these settings
    elif os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UserError(f'demo: {root} exists and was not made by this script; choose another --data_path or remove it')
    # drawn in a side folder, marker last, then whole folders are swapped: until the last rename
    # the old drawing (with its marker and lists) is complete, after it the new one is
    rng = np.random.default_rng(seed)
    classes = [_demo_class(rng) for _ in range(num_classes)]
    images, labels, boxes, class_lines = [], [], [], []
    for c, parts in enumerate(tqdm(classes, desc='demo: drawing', unit='class', leave=False), 1):
        class_folder = f'{c:03d}.object_{c:03d}'
        class_lines.append(f'{c} {class_folder}\n')
        os.makedirs(os.path.join(drawing, 'images', class_folder), exist_ok=True)
        for k in range(per_class):
            image_id = len(images) + 1
            img, (x1, y1, x2, y2) = _draw_demo_image(parts, rng, size)
            rel = f'{class_folder}/object_{c:03d}_{k + 1:04d}.jpg'
            img.save(os.path.join(drawing, 'images', rel), 'JPEG', quality=90)
            images.append(f'{image_id} {rel}\n')
            labels.append(f'{image_id} {c}\n')
            boxes.append(f'{image_id} {float(x1)} {float(y1)} {float(x2 - x1)} {float(y2 - y1)}\n')
    for file, lines in (('images.txt', images), ('image_class_labels.txt', labels),
                        ('bounding_boxes.txt', boxes), ('classes.txt', class_lines), (DEMO_MARKER, [signature])):
        with open(os.path.join(drawing, file), 'w') as f:
            f.writelines(lines)
    if os.path.isdir(root):
        os.replace(root, old)
    os.replace(drawing, root)
    shutil.rmtree(old, ignore_errors=True)
    return root
