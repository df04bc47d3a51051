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

DEMO_CLASSES, DEMO_PER_CLASS, DEMO_SIZE = 48, 24, 112  # data_utils reads them at each run (tests shrink them)
POLYGONS = ('square', 'triangle', 'diamond', 'hexagon', 'star', 'cross')
SHAPES = POLYGONS + ('circle', 'ring')
TEXTURES = ('solid', 'hstripes', 'vstripes', 'checker', 'dots')
DEMO_MARKER = 'demo_seed.txt'  # written last: the settings of a complete drawing


def _polygon(shape, cx, cy, r, angle):
    """Outline points of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == 'cross':  # plus sign: 12 corners at two radii
        pts = [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
               (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]
    else:  # corners on the unit circle; a star's odd ones further in, a diamond narrowed in x
        n = {'square': 4, 'triangle': 3, 'diamond': 4, 'hexagon': 6, 'star': 10}[shape]
        offset, scale_x = math.pi / 4 if shape == 'square' else -math.pi / 2, 0.65 if shape == 'diamond' else 1.0
        polar = [(0.45 if shape == 'star' and k % 2 else 1.0, offset + 2 * math.pi * k / n) for k in range(n)]
        pts = [(rad * math.cos(a) * scale_x, rad * math.sin(a)) for rad, a in polar]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture(kind, size, colour_a, colour_b, period):
    """An RGB texture of (size, size) pixels: colour_b on the odd bands (or dots) of period pixels."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = {'solid': 0 * xx, 'hstripes': yy // period % 2, 'vstripes': xx // period % 2,  # (size, size): 1 = colour_b
            'checker': (xx // period + yy // period) % 2,  # dots: a disc in every (2 period)^2 square
            'dots': (xx % (2 * period) - period) ** 2 + (yy % (2 * period) - period) ** 2 < (period * 0.6) ** 2}[kind]
    return Image.fromarray(np.where(mask[..., None], np.array(colour_b, np.uint8), np.array(colour_a, np.uint8)), 'RGB')


def _demo_class(rng):
    """A class = 2-3 parts, each (shape, texture, two colours, offset dx dy and radius relative to the first)."""
    return [(SHAPES[rng.integers(len(SHAPES))], TEXTURES[rng.integers(len(TEXTURES))],  # the seed's draws, in order
             [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)],
             *((rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.35, 0.7)) if k else (0.0, 0.0, 1.0)))
            for k in range(rng.integers(2, 4))]


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
    cx, cy = (rng.uniform(radius * 1.6, size - radius * 1.6) for _ in range(2))  # its parts reach 1.6 radii out
    outline = Image.new('L', (size, size), 0)  # all parts' masks: its bounding box is the object's box
    for shape, texture, colours, dx, dy, r in parts:
        dx, dy, r = dx * radius, dy * radius, r * radius
        px, py = cx + dx * math.cos(angle) - dy * math.sin(angle), cy + dx * math.sin(angle) + dy * math.cos(angle)
        jitter = rng.integers(-20, 21, 3)  # lighting: the same colour never renders exactly alike
        colour_a, colour_b = (tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter)) for colour in colours)
        mask = Image.new('L', (size, size), 0)
        if shape in ('circle', 'ring'):  # a ring: a circle less one of half its radius
            for rr, fill in ((r, 255), (r * 0.5, 0))[:2 if shape == 'ring' else 1]:
                ImageDraw.Draw(mask).ellipse((px - rr, py - rr, px + rr, py + rr), fill=fill)
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
    if os.path.isfile(marker) and read_bytes(marker, 'demo marker') == signature.encode():
        return root  # already drawn with these settings
    if not os.path.isfile(marker) and os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UserError(f'demo: {root} exists and was not made by this script; choose another --data_path or remove it')
    # drawn beside root, marker last, then swapped in whole: until the last rename the old drawing is complete
    try:  # a full disk or Ctrl-C: the partial drawing is removed on the way out, not left for the next run
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
    except BaseException:
        shutil.rmtree(drawing, ignore_errors=True)
        raise
    if os.path.isdir(root):
        os.replace(root, old)
    os.replace(drawing, root)
    shutil.rmtree(old, ignore_errors=True)
    return root
