"""The datasets' own files, read into one list of images: each benchmark's annotation files (CARS196,
CUB-200-2011, SOP, In-shop, in their published layouts) or a folder of class sub-folders -> [Item], each image with
its label, split and box. The DATASETS registry names the benchmarks; data_utils.py turns the items into lists."""
import os
from collections import namedtuple

import numpy as np

from cli import UserError
from files import read_bytes


CROP_TYPES = ('uncropped', 'cropped')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
# One image: source file, file name in {crop_type}/, label string, split, box (x1, y1, x2, y2) in pixels or None,
# and where it was listed ('FILE line N', a .mat record or a class folder) for errors.
Item = namedtuple('Item', 'src name label split box origin')


def layout(name):
    """The folder layout a dataset needs, as error messages show it (the demo's is CUB's)."""
    if name in DATASETS or name == 'demo':
        return DATASETS.get(name, DATASETS['cub']).layout.replace('cub/', f'{name}/')
    return f'  {name}/<class>/<image>  (one sub-folder per class; images {", ".join(IMAGE_EXTENSIONS)})'


def _require(dataset, *paths, what='annotation file'):
    """The first of paths that exists, else a UserError naming the first one."""
    found = next((p for p in paths if os.path.exists(p)), None)
    if found is None:
        raise UserError(f'{dataset}: {what} not found: {paths[0]}\nexpected layout:\n{layout(dataset)}')
    return found


def _read_rows(path, dataset, fields, skip=0):
    """Whitespace-separated rows of a text annotation file, each with len(fields) columns -> [('FILE line N', row)]."""
    try:
        lines = read_bytes(path, f'{dataset} annotation file').decode('utf-8').splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f'{dataset}: cannot read {path} as UTF-8 text ({err})') from None
    rows = [(number, line.split()) for number, line in enumerate(lines, 1) if number > skip and line.strip()]
    for number, row in rows:
        if len(row) != len(fields):
            raise UserError(f'{dataset}: {path} line {number}: expected {len(fields)} columns ({" ".join(fields)}), '
                            f'got {len(row)}: {" ".join(row)[:100]}')
    return [(f'{path} line {number}', row) for number, row in rows]


def _read_car_annotations(path, file_field, folder, prefix=''):
    """The items of a CARS196 .mat file's struct array 'annotations', images in folder; classes 1-98 train."""
    from scipy.io import loadmat  # scipy only needed for CARS196
    try:
        annotations = loadmat(path, squeeze_me=True).get('annotations')
    except Exception as err:  # scipy raises several types for damaged files
        raise UserError(f'car: cannot read {path} as a MATLAB file ({err})') from None
    numbers = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class')
    found = annotations.dtype.names if annotations is not None and annotations.dtype.names else ()
    missing = [f for f in (file_field,) + numbers if f not in found]
    if missing:
        raise UserError(f'car: {path} has no struct "annotations" with the field(s) {", ".join(missing)}')
    items = []
    for number, r in enumerate(np.atleast_1d(annotations), 1):  # squeeze_me: a single record is a 0-d array
        try:
            label, box = int(r['class']), tuple(int(r[f]) for f in numbers[:4])
        except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an inf
            raise UserError(f'car: {path}: expected numbers, got { {f: r[f] for f in numbers} }') from None
        file = str(r[file_field])
        items.append(Item(os.path.join(folder, file), prefix + os.path.basename(file), str(label),
                          'train' if label <= 98 else 'test', box, f'{path} record {number}'))
    return items


def read_car(root):
    """CARS196 in the original layout (cars_annos.mat + car_ims/) or the devkit/Kaggle one."""
    annos, images = os.path.join(root, 'cars_annos.mat'), os.path.join(root, 'car_ims')
    if os.path.exists(annos) or os.path.exists(images):
        _require('car', images, what='image folder')
        return _read_car_annotations(_require('car', annos), 'relative_im_path', root)
    # the devkit release; Kaggle's copies keep car_devkit.tgz's own folder (car_devkit/devkit/), may rename
    # the test labels "cars_test_annos_withlabels (1).mat" and nest the images: cars_train/cars_train/*.jpg
    devkit = _require('car', os.path.join(root, 'devkit'), os.path.join(root, 'car_devkit', 'devkit'), what='devkit')
    test_annos = [os.path.join(folder, name) for folder in (root, devkit)
                  for name in ('cars_test_annos_withlabels.mat', 'cars_test_annos_withlabels (1).mat')]
    items = []
    for part, annos in (('cars_train', [os.path.join(devkit, 'cars_train_annos.mat')]), ('cars_test', test_annos)):
        folder = _require('car', os.path.join(root, part), what='image folder')
        folder = os.path.join(folder, part) if os.path.isdir(os.path.join(folder, part)) else folder
        # both folders number their files 00001.jpg, ...: the part's name keeps them apart
        items += _read_car_annotations(_require('car', *annos), 'fname', folder, f'{part}_')
    return items


def read_cub(root, num_train_classes=100, name='cub'):
    """CUB-200-2011: classes 1..num_train_classes train, the rest test; boxes x y w h (floats)."""
    nested = os.path.join(root, 'CUB_200_2011')  # the archive's own folder, used when the files are in there
    root = nested if os.path.isdir(nested) and not os.path.exists(os.path.join(root, 'images.txt')) else root
    images, labels_file, boxes_file = (_require(name, os.path.join(root, f))
                                       for f in ('images.txt', 'image_class_labels.txt', 'bounding_boxes.txt'))
    labels = dict(row for _, row in _read_rows(labels_file, name, ('image_id', 'class_id')))
    boxes = {r[0]: r[1:] for _, r in _read_rows(boxes_file, name, ('image_id', 'x', 'y', 'w', 'h'))}
    items = []
    for origin, (image_id, rel) in _read_rows(images, name, ('image_id', 'path')):
        for table, file in ((labels, labels_file), (boxes, boxes_file)):
            if image_id not in table:
                raise UserError(f'{name}: image id {image_id} ({rel}) has no line in {file}')
        try:
            label, (x, y, w, h) = int(labels[image_id]), (int(float(v)) for v in boxes[image_id])
        except (ValueError, OverflowError):  # OverflowError: int() of an inf
            raise UserError(f'{name}: image id {image_id}: expected an integer class id and numbers x y w h') from None
        items.append(Item(os.path.join(root, 'images', rel), os.path.basename(rel), str(label),
                          'train' if label <= num_train_classes else 'test', (x, y, x + w, y + h), origin))
    return items


def read_sop(root):
    """Stanford Online Products: the split files give train and test (disjoint products)."""
    nested = os.path.join(root, 'Stanford_Online_Products')  # as for CUB: the archive's own folder
    root = nested if os.path.isdir(nested) and not os.path.exists(os.path.join(root, 'Ebay_train.txt')) else root
    fields = ('image_id', 'class_id', 'super_class_id', 'path')
    files = {split: _require('sop', os.path.join(root, f'Ebay_{split}.txt')) for split in ('train', 'test')}
    return [Item(os.path.join(root, rel), os.path.basename(rel), class_id, split, None, origin)
            for split, file in files.items()
            for origin, (_, class_id, _, rel) in _read_rows(file, 'sop', fields, skip=1)]


def read_isc(root):
    """In-shop Clothes: train / query / gallery from list_eval_partition.txt; labels are item ids."""
    file = _require('isc', os.path.join(root, 'Eval', 'list_eval_partition.txt'))
    # the list's paths start with img/; they live under Img/ in the official download
    image_root = os.path.join(root, 'Img') if os.path.isdir(os.path.join(root, 'Img')) else root
    rows = _read_rows(file, 'isc', ('image_name', 'item_id', 'evaluation_status'), skip=2)
    for origin, (rel, _, status) in rows:
        if status not in ('train', 'query', 'gallery'):
            raise UserError(f'isc: {origin}: evaluation_status of {rel} is {status!r}, '
                            f'expected train, query or gallery')
    return [Item(os.path.join(image_root, rel), f'{item_id}_{os.path.basename(rel)}', item_id, status, None, origin)
            for origin, (rel, item_id, status) in rows]


def split_classes(classes, split=0.5):
    """Deterministic class split: sorted names, the first round(split * n) (at least 1, at most n-1) train."""
    classes = sorted(classes)
    n_train = min(max(int(split * len(classes) + 0.5), 1), len(classes) - 1)  # int() floors: x >= 0
    return classes[:n_train], classes[n_train:]


def read_own(root, name, split=0.5):
    """A user's folder DIR/NAME/<class>/<image>; files become {class}_{basename}."""
    classes = {}  # {class: sorted image names}
    for entry in sorted(os.listdir(root)):
        folder = os.path.join(root, entry)
        if entry not in CROP_TYPES and not entry.startswith('.') and os.path.isdir(folder):  # crop folders: ours
            classes[entry] = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                                    and not f.startswith('.') and os.path.isfile(os.path.join(folder, f)))
    classes = {c: files for c, files in classes.items() if files}
    if len(classes) < 2:
        raise UserError(f'{name}: found {len(classes)} class folder(s) with images in {root}; at least 2 '
                        f'are needed (one train, one test class)\nexpected layout:\n{layout(name)}')
    train = set(split_classes(classes, split)[0])
    return [Item(os.path.join(root, c, f), f'{c}_{f}', c, 'train' if c in train else 'test', None,
                 f'class folder {os.path.join(root, c)}') for c in sorted(classes) for f in classes[c]]


# The benchmarks by folder name: reader, splits in list order, the layout and the split rule error messages show.
Benchmark = namedtuple('Benchmark', 'read splits layout split_rule')
DATASETS = {
    'car': Benchmark(read_car, ('train', 'test'), '''\
  car/cars_annos.mat, car/car_ims/*.jpg  (original release), or the devkit / Kaggle release:
  car/cars_train/*.jpg, car/cars_test/*.jpg, car/devkit/cars_train_annos.mat, car/cars_test_annos_withlabels.mat
  (car/cars_train/cars_train/, car/car_devkit/devkit/ and "cars_test_annos_withlabels (1).mat" also accepted)''',
                     "CARS196's train split is classes 1-98, its test split classes 99-196"),
    'cub': Benchmark(read_cub, ('train', 'test'), '''\
  cub/images.txt, cub/image_class_labels.txt, cub/bounding_boxes.txt, cub/images/<class>/*.jpg
  (the archive's CUB_200_2011/ folder may also sit inside cub/)''',
                     "CUB-200-2011's train split is classes 1-100, its test split classes 101-200"),
    'sop': Benchmark(read_sop, ('train', 'test'), '''\
  sop/Ebay_train.txt, sop/Ebay_test.txt, sop/<category>_final/*.JPG  (or in sop/Stanford_Online_Products/)''',
                     "SOP's train split is the lines of Ebay_train.txt, its test split those of Ebay_test.txt"),
    'isc': Benchmark(read_isc, ('train', 'query', 'gallery'), '''\
  isc/Eval/list_eval_partition.txt, isc/Img/img/<GENDER>/<category>/<item_id>/*.jpg  (or isc/img/...)''',
                     "In-shop's split is the evaluation_status column (train, query, gallery) of "
                     "Eval/list_eval_partition.txt"),
}
