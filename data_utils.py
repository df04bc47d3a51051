"""Turn a downloaded retrieval dataset (CARS196, CUB-200-2011, SOP, In-shop), a folder of class
sub-folders, or a generated demo set into image lists: {data_path}/{name}/{crop_type}_data_dicts.pth."""
import argparse
import io
import math
import os
import shutil
import sys
import tempfile
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from utils import UserError, atomic_save, atomic_write_bytes, load_image, run_cli

# ImageNet statistics: used for a user's own folders and the demo (no dataset statistics known).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-dataset mean/std the published models were trained with.
NORMALIZATION = {
    'car': ((0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568)),
    'cub': ((0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850)),
    'sop': ((0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095)),
    'isc': ((0.8324, 0.8109, 0.8041), (0.2206, 0.2378, 0.2444)),
}
CROP_TYPES = ('uncropped', 'cropped')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
MAX_LISTED = 20  # bad files listed by name in one error; the rest are counted


def normalization(name):
    """(mean, std) for a dataset name; ImageNet's for own folders and the demo."""
    return NORMALIZATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))


def data_dict_path(data_path, data_name, crop_type):
    """Where the image lists of one dataset and crop type are stored."""
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


# One image of a dataset: source file, file name in {crop_type}/, label string, split, and the
# bounding box (x1, y1, x2, y2) in pixels or None.
Item = namedtuple('Item', 'src name label split box')


def _listing(paths, what):
    """'N <what>: a, b, ... (and K more)' with at most MAX_LISTED names."""
    shown = '\n  '.join(str(p) for p in paths[:MAX_LISTED])
    more = f'\n  ... and {len(paths) - MAX_LISTED} more' if len(paths) > MAX_LISTED else ''
    return f'{len(paths)} {what}:\n  {shown}{more}'


def _first_existing(*paths):
    return next((p for p in paths if os.path.exists(p)), None)


def _require(path, dataset, layout, what='annotation file'):
    if not os.path.exists(path):
        raise UserError(f'{dataset}: {what} not found: {path}\nexpected layout:\n{layout}')
    return path


def _read_rows(path, dataset, fields, skip=0):
    """Whitespace-separated rows of a text annotation file, each with len(fields) columns."""
    rows = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f'{dataset}: cannot read {path} as a text file ({err})') from None
    for number, line in enumerate(lines, 1):
        if number <= skip or not line.strip():
            continue
        parts = line.split()
        if len(parts) != len(fields):
            raise UserError(f'{dataset}: {path} line {number}: expected {len(fields)} columns '
                            f'({" ".join(fields)}), got: {line.strip()[:120]!r}')
        rows.append(parts)
    return rows


def _read_mat_annotations(path, dataset, fields):
    """Records of the struct array 'annotations' in a CARS196 .mat file, as dicts of plain values."""
    from scipy.io import loadmat  # scipy only needed for CARS196
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for damaged files
        raise UserError(f'{dataset}: cannot read {path} as a MATLAB file ({err})') from None
    annotations = mat.get('annotations')
    missing = [f for f in fields if annotations is None or annotations.dtype.names is None
               or f not in annotations.dtype.names]
    if missing:
        raise UserError(f'{dataset}: {path} has no struct "annotations" with fields {", ".join(fields)} '
                        f'(missing: {", ".join(missing)})')
    annotations = np.atleast_1d(annotations)  # squeeze_me turns a single record into a 0-d array
    return [{f: record[f] for f in fields} for record in annotations]


# ----------------------------------------------------------------------------------------------
# readers: one per benchmark, each returns (items, layout text for error messages)
# ----------------------------------------------------------------------------------------------

CAR_LAYOUT = '''  car/cars_annos.mat, car/car_ims/*.jpg                      (original release)
  or
  car/cars_train/*.jpg, car/cars_test/*.jpg,
  car/devkit/cars_train_annos.mat, car/cars_test_annos_withlabels.mat  (devkit / Kaggle release;
  car/cars_train/cars_train/, car/car_devkit/devkit/ and "cars_test_annos_withlabels (1).mat" also accepted)'''
CAR_FIELDS = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class')


def _car_record(r, path):
    """(label, box) of one CARS196 annotation record."""
    try:
        return str(int(r['class'])), tuple(int(r[f]) for f in CAR_FIELDS[:4])
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an inf
        raise UserError(f'car: {path}: expected numbers in the fields {", ".join(CAR_FIELDS)}, got '
                        f'{ {f: r[f] for f in CAR_FIELDS} }') from None


def _car_split(label):
    return 'train' if int(label) <= 98 else 'test'  # classes 1-98 train, 99-196 test


def read_car(root):
    """CARS196 in the original layout (cars_annos.mat + car_ims/) or the devkit/Kaggle one."""
    original = [os.path.join(root, 'cars_annos.mat'), os.path.join(root, 'car_ims')]
    if any(os.path.exists(p) for p in original):
        _require(original[1], 'car', CAR_LAYOUT, 'image folder')
        records = _read_mat_annotations(_require(original[0], 'car', CAR_LAYOUT), 'car',
                                        ('relative_im_path',) + CAR_FIELDS)
        items = []
        for r in records:
            label, box = _car_record(r, original[0])
            rel = str(r['relative_im_path'])
            items.append(Item(os.path.join(root, rel), os.path.basename(rel), label, _car_split(label), box))
        return items, CAR_LAYOUT
    markers = [os.path.join(root, p) for p in ('cars_train', 'cars_test', 'devkit', 'car_devkit',
                                               'cars_test_annos_withlabels.mat')]
    if not any(os.path.exists(p) for p in markers):
        raise UserError(f'car: no CARS196 files found in {root}\nexpected layout:\n{CAR_LAYOUT}')
    # Kaggle's copies keep car_devkit.tgz's own folder (car_devkit/devkit/) and may rename the
    # test labels "cars_test_annos_withlabels (1).mat"
    devkit = _first_existing(os.path.join(root, 'devkit'), os.path.join(root, 'car_devkit', 'devkit')) \
        or os.path.join(root, 'devkit')
    test_annos = [os.path.join(folder, name) for folder in (root, devkit)
                  for name in ('cars_test_annos_withlabels.mat', 'cars_test_annos_withlabels (1).mat')]
    items = []
    for part, annos in (('cars_train', [os.path.join(devkit, 'cars_train_annos.mat')]),
                        ('cars_test', test_annos)):
        folder = _require(os.path.join(root, part), 'car', CAR_LAYOUT, 'image folder')
        # Kaggle's copies nest the images one level deeper: cars_train/cars_train/*.jpg
        if os.path.isdir(os.path.join(folder, part)):
            folder = os.path.join(folder, part)
        annos = _require(_first_existing(*annos) or annos[0], 'car', CAR_LAYOUT)
        for r in _read_mat_annotations(annos, 'car', ('fname',) + CAR_FIELDS):
            label, box = _car_record(r, annos)
            fname = str(r['fname'])
            # both folders number their files 00001.jpg, ...: the folder name keeps them apart
            items.append(Item(os.path.join(folder, fname), f'{part}_{fname}', label, _car_split(label), box))
    return items, CAR_LAYOUT


CUB_LAYOUT = '''  cub/images.txt, cub/image_class_labels.txt, cub/bounding_boxes.txt, cub/images/<class>/*.jpg
  (the archive's CUB_200_2011/ folder may also sit inside cub/)'''


def read_cub(root, num_train_classes=100, name='cub', layout=CUB_LAYOUT):
    """CUB-200-2011: classes 1..num_train_classes train, the rest test; boxes x y w h (floats)."""
    nested = os.path.join(root, 'CUB_200_2011')
    if not os.path.exists(os.path.join(root, 'images.txt')) and os.path.isdir(nested):
        root = nested
    files = {f: _require(os.path.join(root, f), name, layout)
             for f in ('images.txt', 'image_class_labels.txt', 'bounding_boxes.txt')}
    paths = _read_rows(files['images.txt'], name, ('image_id', 'path'))
    labels = dict(_read_rows(files['image_class_labels.txt'], name, ('image_id', 'class_id')))
    boxes = {r[0]: r[1:] for r in _read_rows(files['bounding_boxes.txt'], name, ('image_id', 'x', 'y', 'w', 'h'))}
    items = []
    for image_id, rel in paths:
        for table, file in ((labels, 'image_class_labels.txt'), (boxes, 'bounding_boxes.txt')):
            if image_id not in table:
                raise UserError(f'{name}: image id {image_id} ({rel}) has no line in {files[file]}')
        try:
            x, y, w, h = (int(float(v)) for v in boxes[image_id])
            label = str(int(labels[image_id]))
        except (ValueError, OverflowError):  # OverflowError: int() of an inf
            raise UserError(f'{name}: image id {image_id}: expected an integer class id in '
                            f'{files["image_class_labels.txt"]} and numbers x y w h in '
                            f'{files["bounding_boxes.txt"]}') from None
        split = 'train' if int(label) <= num_train_classes else 'test'
        items.append(Item(os.path.join(root, 'images', rel), os.path.basename(rel), label, split,
                          (x, y, x + w, y + h)))
    return items, layout


SOP_LAYOUT = '''  sop/Ebay_train.txt, sop/Ebay_test.txt, sop/<category>_final/*.JPG
  (the archive's Stanford_Online_Products/ folder may also sit inside sop/)'''


def read_sop(root):
    """Stanford Online Products: the split files give train and test (disjoint products)."""
    nested = os.path.join(root, 'Stanford_Online_Products')
    if not os.path.exists(os.path.join(root, 'Ebay_train.txt')) and os.path.isdir(nested):
        root = nested
    items = []
    for split in ('train', 'test'):
        file = _require(os.path.join(root, f'Ebay_{split}.txt'), 'sop', SOP_LAYOUT)
        for _, class_id, _, rel in _read_rows(file, 'sop', ('image_id', 'class_id', 'super_class_id', 'path'),
                                              skip=1):
            items.append(Item(os.path.join(root, rel), os.path.basename(rel), class_id, split, None))
    return items, SOP_LAYOUT


ISC_LAYOUT = '''  isc/Eval/list_eval_partition.txt, isc/Img/img/<GENDER>/<category>/<item_id>/*.jpg
  (img/ directly inside isc/ is accepted too)'''


def read_isc(root):
    """In-shop Clothes: train / query / gallery from list_eval_partition.txt; labels are item ids."""
    file = _require(os.path.join(root, 'Eval', 'list_eval_partition.txt'), 'isc', ISC_LAYOUT)
    # the list's paths start with img/; they live under Img/ in the official download
    image_root = os.path.join(root, 'Img') if os.path.isdir(os.path.join(root, 'Img')) else root
    items = []
    for rel, item_id, status in _read_rows(file, 'isc', ('image_name', 'item_id', 'evaluation_status'), skip=2):
        if status not in ('train', 'query', 'gallery'):
            raise UserError(f'isc: {file}: evaluation_status of {rel} is {status!r}, '
                            f'expected train, query or gallery')
        items.append(Item(os.path.join(image_root, rel), f'{item_id}_{os.path.basename(rel)}', item_id,
                          status, None))
    return items, ISC_LAYOUT


DATASETS = {'car': read_car, 'cub': read_cub, 'sop': read_sop, 'isc': read_isc}
SPLITS = {'car': ('train', 'test'), 'cub': ('train', 'test'), 'sop': ('train', 'test'),
          'isc': ('train', 'query', 'gallery')}
RESERVED = set(CROP_TYPES)  # sub-folders written by this script, never read as classes


def own_layout(name):
    return f'  {name}/<class>/<image>  (one sub-folder per class; images {", ".join(IMAGE_EXTENSIONS)})'


def split_classes(classes, split=0.5):
    """Deterministic class split: sorted names, the first round(split * n) (at least 1, at most n-1) train."""
    classes = sorted(classes)
    n_train = min(max(int(math.floor(split * len(classes) + 0.5)), 1), len(classes) - 1)
    return classes[:n_train], classes[n_train:]


def read_own(root, name, split=0.5):
    """A user's folder DIR/NAME/<class>/<image>; files become {class}_{basename}."""
    layout = own_layout(name)
    classes = {}
    for entry in sorted(os.listdir(root)):
        folder = os.path.join(root, entry)
        if entry in RESERVED or entry.startswith('.') or not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if not f.startswith('.')
                       and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
        if files:
            classes[entry] = files
    if len(classes) < 2:
        raise UserError(f'{name}: found {len(classes)} class folder(s) with images in {root}; at least 2 '
                        f'are needed (one train, one test class)\nexpected layout:\n{layout}')
    train, _ = split_classes(classes, split)
    train = set(train)
    items = [Item(os.path.join(root, c, f), f'{c}_{f}', c, 'train' if c in train else 'test', None)
             for c in sorted(classes) for f in classes[c]]
    return items, layout


# ----------------------------------------------------------------------------------------------
# the shared pipeline: check every source, place files, write the lists
# ----------------------------------------------------------------------------------------------


def _check_image(item):
    """None if the image decodes completely, else a reason. Draft mode keeps JPEG checks fast
    (the whole compressed stream is still read, so truncation is caught)."""
    if not os.path.isfile(item.src):
        return 'missing'
    try:
        with Image.open(item.src) as img:
            img.draft('RGB', (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f'unreadable ({str(err).splitlines()[0][:100] if str(err) else type(err).__name__})'
    if item.box is not None:
        x1, y1, x2, y2 = item.box
        if x2 <= x1 or y2 <= y1:
            return f'empty bounding box {item.box}'
    return None


def _same_file(a, b):
    """True when b is a as a hard link or a byte-identical copy."""
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
            while True:
                ca, cb = fa.read(1 << 20), fb.read(1 << 20)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def _place_original(src, dst):
    """Hard link src at dst (copy through a temporary file where links are not allowed)."""
    if os.path.exists(dst):
        return  # already checked to be the same file
    try:
        os.link(src, dst)
        return
    except OSError:
        pass  # another filesystem, or links not supported: copy
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(dst) + '.', suffix='.tmp',
                                   dir=os.path.dirname(dst))
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        raise UserError(f'cannot copy {src} to {dst}: {err.strerror or err} (check free disk space and '
                        f'that the folder is writable)') from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _crop_bytes(item):
    """The bounding-box crop of an image, encoded once as high-quality JPEG (PNG for .png names)."""
    crop = load_image(item.src).crop(item.box)  # any mode -> RGB as training sees it
    buffer = io.BytesIO()
    if item.name.lower().endswith('.png'):
        crop.save(buffer, 'PNG')
    else:
        crop.save(buffer, 'JPEG', quality=95, subsampling=0)
    return buffer.getvalue()


def _pmap(fn, items, desc):
    """fn over items in a thread pool (PIL releases the GIL while decoding), with a progress bar."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit='img', leave=False))


def build_lists(items, data_path, name, crop_type, splits):
    """{split: {label: [paths]}} with splits in order, labels and paths in annotation order."""
    dicts = {split: {} for split in splits}
    for item in items:
        dicts[item.split].setdefault(item.label, []).append(os.path.join(data_path, name, crop_type, item.name))
    return dicts


def process_items(items, data_path, name, layout, splits=('train', 'test')):
    """Check all source images, place them under {name}/uncropped (and crops under {name}/cropped
    when items have boxes), then write the .pth lists atomically. Returns {crop_type: dicts}."""
    # 1. names must be unique: two sources on one name would overwrite each other
    by_name = {}
    for item in items:
        by_name.setdefault(item.name, set()).add(item.src)
    clashes = [f'{n}: ' + ', '.join(sorted(s)) for n, s in by_name.items() if len(s) > 1]
    if clashes:
        raise UserError(f'{name}: different images would get the same file name; ' + _listing(clashes, 'names'))
    items = list({(i.src, i.name, i.split): i for i in items}.values())  # a line listed twice counts once
    # 2. every source image exists and decodes, all found in one pass before anything is written
    sources = list({i.src: i for i in items}.values())
    reasons = _pmap(_check_image, sources, f'{name}: checking images')
    missing = [i.src for i, r in zip(sources, reasons) if r == 'missing']
    bad = [f'{i.src}: {r}' for i, r in zip(sources, reasons) if r not in (None, 'missing')]
    if missing or bad:
        parts = []
        if missing:
            parts.append(_listing(missing, 'image file(s) listed by the annotations are missing'))
        if bad:
            parts.append(_listing(bad, 'image file(s) are unreadable, truncated or have an empty box'))
        raise UserError(f'{name}: ' + '\n'.join(parts) + f'\nnothing was written; expected layout:\n{layout}')
    crop_types = ('uncropped', 'cropped') if all(i.box is not None for i in items) else ('uncropped',)
    # 3. an existing file of another image under the same name is a conflict, not an overwrite
    out = {c: os.path.join(data_path, name, c) for c in crop_types}
    conflicts = [os.path.join(out['uncropped'], i.name) for i in sources
                 if os.path.lexists(os.path.join(out['uncropped'], i.name))
                 and not _same_file(i.src, os.path.join(out['uncropped'], i.name))]
    if conflicts:
        raise UserError(f'{name}: ' + _listing(conflicts, 'file(s) already exist and differ from the image '
                                               'that would be placed there') +
                        f'\nremove {out["uncropped"]} (it holds only links or copies of the originals) and run again')
    # 4. originals byte for byte (hard links where possible), crops encoded once
    for folder in out.values():
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise UserError(f'{name}: cannot create {folder}: {err.strerror or err}') from None
    for item in tqdm(sources, desc=f'{name}: linking originals', unit='img', leave=False):
        _place_original(item.src, os.path.join(out['uncropped'], item.name))
    if 'cropped' in out:
        def write_crop(item):
            dst = os.path.join(out['cropped'], item.name)
            data = _crop_bytes(item)
            if os.path.exists(dst):
                with open(dst, 'rb') as f:
                    return None if f.read() == data else dst
            atomic_write_bytes(data, dst)
            return None
        conflicts = [d for d in _pmap(write_crop, sources, f'{name}: writing crops') if d]
        if conflicts:
            raise UserError(f'{name}: ' + _listing(conflicts, 'crop(s) already exist with other content') +
                            f'\nremove {out["cropped"]} and run again')
    # 5. lists last, atomically: an interrupted run leaves the previous .pth (or none)
    result = {}
    for crop in crop_types:
        dicts = build_lists(items, data_path, name, crop, splits)
        path = data_dict_path(data_path, name, crop)
        atomic_save(dicts, path)
        summary = ', '.join(f'{s} {len(d)} classes / {sum(map(len, d.values()))} images' for s, d in dicts.items())
        print(f'{name} {crop}: {summary} -> {path}', flush=True)
        result[crop] = dicts
    return result


def process_dataset(data_path, name, split=None, seed=0):
    """Process one dataset by name: a benchmark, 'demo', or an own class-folder dataset."""
    if not name or name != os.path.basename(name) or name.startswith('.'):
        raise UserError(f'--data_name {name!r} must be a folder name inside --data_path (no path separators)')
    root = os.path.join(data_path, name)
    if split is not None and (name in DATASETS or name == 'demo'):
        raise UserError(f'--split applies to own class-folder datasets; {name} has a fixed split')
    if name == 'demo':
        try:
            make_demo(root, seed=seed)
        except OSError as err:  # disk full, no permission: the next run starts the drawing afresh
            raise UserError(f'demo: cannot write the demo images to {root}: {err.strerror or err} '
                            f'(check free disk space and that {data_path} is writable)') from None
        items, layout = read_cub(root, num_train_classes=_demo_classes(root) // 2, name='demo',
                                 layout=CUB_LAYOUT.replace('cub/', 'demo/'))
        return process_items(items, data_path, name, layout)
    if name in DATASETS:
        if not os.path.isdir(root):
            raise UserError(f'{name}: folder not found: {root}\nexpected layout:\n'
                            + {'car': CAR_LAYOUT, 'cub': CUB_LAYOUT, 'sop': SOP_LAYOUT, 'isc': ISC_LAYOUT}[name])
        items, layout = DATASETS[name](root)
        return process_items(items, data_path, name, layout, SPLITS[name])
    if not os.path.isdir(root):
        raise UserError(f'unknown dataset {name!r}: {root} is not a folder. Use one of '
                        f'{", ".join(DATASETS)}, demo, or an own dataset laid out as\n{own_layout(name)}')
    split = 0.5 if split is None else split
    if not 0 < split < 1:
        raise UserError(f'--split must be between 0 and 1 (share of classes used for training), got {split}')
    items, layout = read_own(root, name, split)
    return process_items(items, data_path, name, layout)


# ----------------------------------------------------------------------------------------------
# demo: a generated shapes dataset in CUB's layout
# ----------------------------------------------------------------------------------------------

DEMO_CLASSES, DEMO_PER_CLASS, DEMO_SIZE = 48, 24, 112
POLYGONS = ('square', 'triangle', 'diamond', 'hexagon', 'star', 'cross')
SHAPES = POLYGONS + ('circle', 'ring')
TEXTURES = ('solid', 'hstripes', 'vstripes', 'checker', 'dots')
DEMO_MARKER = 'demo_seed.txt'


def _demo_classes(root):
    with open(os.path.join(root, 'classes.txt')) as f:
        return sum(1 for line in f if line.strip())


def _polygon(shape, cx, cy, r, angle):
    """Outline points of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    corners = {'square': 4, 'triangle': 3, 'diamond': 4, 'hexagon': 6, 'star': 10, 'cross': 12}[shape]
    if shape == 'cross':  # plus sign: 12 corners at two radii
        pts = [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
               (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]
    else:
        offset = math.pi / 4 if shape == 'square' else -math.pi / 2
        pts = []
        for k in range(corners):
            rad = 0.45 if shape == 'star' and k % 2 else 1.0
            a = offset + 2 * math.pi * k / corners
            scale_x = 0.65 if shape == 'diamond' else 1.0
            pts.append((rad * math.cos(a) * scale_x, rad * math.sin(a)))
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture(kind, size, colour_a, colour_b, period):
    """An RGB texture of (size, size) pixels; period in pixels."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == 'solid':
        mask = np.zeros((size, size), bool)
    elif kind == 'hstripes':
        mask = (yy // period) % 2 == 1
    elif kind == 'vstripes':
        mask = (xx // period) % 2 == 1
    elif kind == 'checker':
        mask = ((xx // period) + (yy // period)) % 2 == 1
    else:  # dots
        mask = ((xx % (2 * period) - period) ** 2 + (yy % (2 * period) - period) ** 2) < (period * 0.6) ** 2
    img = np.where(mask[..., None], np.array(colour_b, np.uint8), np.array(colour_a, np.uint8))
    return Image.fromarray(img.astype(np.uint8), 'RGB')


def _demo_class(rng):
    """A class = 2-3 parts, each a shape with its own colours, texture, offset and relative size."""
    parts = []
    for k in range(rng.integers(2, 4)):
        parts.append(dict(shape=SHAPES[rng.integers(len(SHAPES))], texture=TEXTURES[rng.integers(len(TEXTURES))],
                          colour_a=tuple(int(v) for v in rng.integers(0, 256, 3)),
                          colour_b=tuple(int(v) for v in rng.integers(0, 256, 3)),
                          dx=0.0 if k == 0 else float(rng.uniform(-0.6, 0.6)),
                          dy=0.0 if k == 0 else float(rng.uniform(-0.6, 0.6)),
                          r=1.0 if k == 0 else float(rng.uniform(0.35, 0.7))))
    return parts


def _draw_demo_image(parts, rng, size):
    """One picture of an object: random background, clutter, position, scale, rotation.
    Returns the image and the object's box (x1, y1, x2, y2)."""
    # background: a random two-colour gradient plus noise, then a few small clutter shapes
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), 'RGB')
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 5)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.08)
        draw.polygon(_polygon(POLYGONS[rng.integers(len(POLYGONS))], x, y, r, rng.uniform(0, 6.3)),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    # the object: part offsets are in units of the main radius, turned with the whole object
    radius = size * rng.uniform(0.16, 0.27)
    angle = rng.uniform(-0.5, 0.5)
    extent = radius * 1.6
    cx, cy = rng.uniform(extent, size - extent), rng.uniform(extent, size - extent)
    x1, y1, x2, y2 = size, size, 0, 0
    for part in parts:
        dx, dy = part['dx'] * radius, part['dy'] * radius
        px = cx + dx * math.cos(angle) - dy * math.sin(angle)
        py = cy + dx * math.sin(angle) + dy * math.cos(angle)
        r = part['r'] * radius
        jitter = rng.integers(-20, 21, 3)  # lighting: the same colour never renders exactly alike
        colour_a = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(part['colour_a'], jitter))
        colour_b = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(part['colour_b'], jitter))
        texture = _texture(part['texture'], size, colour_a, colour_b, max(2, int(r / 3)))
        mask = Image.new('L', (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        if part['shape'] in ('circle', 'ring'):
            mdraw.ellipse((px - r, py - r, px + r, py + r), fill=255)
            if part['shape'] == 'ring':
                mdraw.ellipse((px - r * 0.5, py - r * 0.5, px + r * 0.5, py + r * 0.5), fill=0)
        else:
            mdraw.polygon(_polygon(part['shape'], px, py, r, angle), fill=255)
        img.paste(texture, (0, 0), mask)
        bx = mask.getbbox()
        if bx:
            x1, y1, x2, y2 = min(x1, bx[0]), min(y1, bx[1]), max(x2, bx[2]), max(y2, bx[3])
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img, (x1, y1, x2, y2)


def make_demo(root, seed=0, num_classes=None, per_class=None, size=None):
    """Draw the demo dataset into root in CUB-200-2011's layout (images.txt, image_class_labels.txt,
    bounding_boxes.txt, classes.txt, images/<class>/*.jpg). Same seed and sizes -> same bytes."""
    num_classes = DEMO_CLASSES if num_classes is None else num_classes
    per_class = DEMO_PER_CLASS if per_class is None else per_class
    size = DEMO_SIZE if size is None else size
    marker = os.path.join(root, DEMO_MARKER)
    signature = f'seed {seed} classes {num_classes} per_class {per_class} size {size}\n'
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == signature:
                return root  # already drawn with these settings
        # drawn earlier with other settings: the folder is entirely generated, start again
        shutil.rmtree(root)
    elif os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UserError(f'demo: {root} exists and was not made by this script; '
                        f'choose another --data_path or remove that folder')
    # drawn in a side folder and renamed at the end: an interrupted drawing never looks complete
    partial = root.rstrip(os.sep) + '.partial'
    if os.path.isdir(partial):
        shutil.rmtree(partial)
    rng = np.random.default_rng(seed)
    classes = [_demo_class(rng) for _ in range(num_classes)]
    images, labels, boxes, class_lines = [], [], [], []
    image_id = 0
    for c, parts in enumerate(tqdm(classes, desc='demo: drawing', unit='class', leave=False), 1):
        folder = f'{c:03d}.object_{c:03d}'
        class_lines.append(f'{c} {folder}\n')
        os.makedirs(os.path.join(partial, 'images', folder), exist_ok=True)
        for k in range(per_class):
            image_id += 1
            img, (x1, y1, x2, y2) = _draw_demo_image(parts, rng, size)
            rel = f'{folder}/object_{c:03d}_{k + 1:04d}.jpg'
            img.save(os.path.join(partial, 'images', rel), 'JPEG', quality=90)
            images.append(f'{image_id} {rel}\n')
            labels.append(f'{image_id} {c}\n')
            boxes.append(f'{image_id} {float(x1)} {float(y1)} {float(x2 - x1)} {float(y2 - y1)}\n')
    for file, lines in (('images.txt', images), ('image_class_labels.txt', labels),
                        ('bounding_boxes.txt', boxes), ('classes.txt', class_lines), (DEMO_MARKER, [signature])):
        with open(os.path.join(partial, file), 'w') as f:
            f.writelines(lines)
    if os.path.isdir(root):
        os.rmdir(root)  # empty (checked above)
    os.replace(partial, root)
    return root


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Preprocess retrieval datasets into image lists '
                                                 '({data_path}/{name}/{crop_type}_data_dicts.pth)')
    parser.add_argument('--data_path', default='/home/data', type=str, help='folder holding the datasets')
    parser.add_argument('--data_name', nargs='+', default=None,
                        help='car, cub, sop, isc, demo or an own folder DATA_PATH/NAME/<class>/<image>; '
                             'default: every benchmark folder present')
    parser.add_argument('--split', type=float, default=None,
                        help='own folders: share of the sorted class names used for training (default 0.5)')
    parser.add_argument('--seed', type=int, default=0, help='demo: random seed of the drawing')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.data_name == ['demo']:  # the demo is drawn here, so its folder may not exist yet
        try:
            os.makedirs(args.data_path, exist_ok=True)
        except OSError as err:
            raise UserError(f'--data_path {args.data_path}: cannot create the folder ({err.strerror})') from None
    if not os.path.isdir(args.data_path):
        raise UserError(f'--data_path {args.data_path} is not a folder')
    names = args.data_name
    if names is None:
        names = [n for n in DATASETS if os.path.isdir(os.path.join(args.data_path, n))]
        absent = [n for n in DATASETS if n not in names]
        if absent:
            print(f'skipping {", ".join(absent)}: no such folder in {args.data_path}', flush=True)
        if not names:
            raise UserError(f'no dataset folder ({", ".join(DATASETS)}) in {args.data_path}; '
                            f'use --data_name demo for a generated one')
    failed = []
    for name in names:
        try:
            process_dataset(args.data_path, name, split=args.split, seed=args.seed)
        except UserError as err:
            if len(names) == 1:
                raise
            print(f'error: {err}', file=sys.stderr, flush=True)  # the other datasets go on
            failed.append(name)
    if failed:
        raise UserError(f'{len(failed)} of {len(names)} datasets not processed: {", ".join(failed)}')


if __name__ == '__main__':
    run_cli(main)
