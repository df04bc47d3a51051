"""data_utils.py on tiny datasets written in each benchmark's real layout, and the lists read back."""
import errno
import fcntl
import os
import re
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from scipy.io import savemat

import data_utils
from _data_fixtures import make_tiny_dataset, write_class_folders, write_image
from _train_fixtures import run_process, run_script
from cli import UserError
import cli
import datasets
import demo
import files
import imaging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(data_path, name, crop):
    return torch.load(data_utils.data_dict_path(data_path, name, crop), weights_only=True)


def mat_struct(records, fields):
    """numpy struct array of shape (1, N), saved by savemat as a MATLAB struct array."""
    arr = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for k, r in enumerate(records):
        for f in fields:
            arr[0, k][f] = r[f]
    return arr


def p(root, name, crop, file):
    return os.path.join(root, name, crop, file)


def fail_writes(monkeypatch, name):
    """In-process fault: every atomic write of a file whose name contains `name` fails (disk full)."""
    write = files.write_temporary

    def write_temporary(data, path):
        if name in os.path.basename(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(data, path)
    monkeypatch.setattr(files, 'write_temporary', write_temporary)


def temporaries(folder):
    return sorted(f for _, _, files in os.walk(folder) for f in files if f.endswith('.tmp'))


# ---------------------------------------------------------------------------------------------
# CARS196
# ---------------------------------------------------------------------------------------------

CAR_ORIGINAL = [  # (file, class, box, mode): classes on both sides of the 98/99 split
    ('000001.jpg', 1, (2, 3, 30, 25), 'RGB'),
    ('000002.jpg', 98, (0, 0, 40, 30), 'L'),
    ('000003.jpg', 99, (5, 5, 20, 20), 'CMYK'),
    ('000004.jpg', 1, (10, 1, 39, 29), 'RGB'),
    ('000005.jpg', 196, (1, 2, 3, 4), 'RGB'),
]


def make_car_original(root):
    car = os.path.join(root, 'car')
    records = []
    for k, (file, cls, (x1, y1, x2, y2), mode) in enumerate(CAR_ORIGINAL):
        write_image(os.path.join(car, 'car_ims', file), mode=mode, seed=k)
        records.append(dict(relative_im_path=f'car_ims/{file}', bbox_x1=np.uint8(x1), bbox_y1=np.uint8(y1),
                            bbox_x2=np.uint8(x2), bbox_y2=np.uint8(y2), **{'class': np.uint8(cls)},
                            test=np.uint8(k % 2)))
    fields = ['relative_im_path', 'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'test']
    savemat(os.path.join(car, 'cars_annos.mat'),
            {'annotations': mat_struct(records, fields), 'class_names': np.array(['a'], dtype=object)})
    return car


def assert_crops(car_or_cub_items, root, name):
    """Each crop has the box's size and the box's pixels (JPEG at quality 95: within a few levels)."""
    for src, file, box in car_or_cub_items:
        crop = np.asarray(Image.open(p(root, name, 'cropped', file)).convert('RGB'), dtype=np.float64)
        expected = np.asarray(Image.open(src).convert('RGB').crop(box), dtype=np.float64)
        assert crop.shape == expected.shape == (box[3] - box[1], box[2] - box[0], 3)
        if file.endswith('.png'):
            assert np.array_equal(crop, expected)
        else:
            assert np.abs(crop - expected).mean() < 4


def assert_uncropped_identical(pairs):
    for src, dst in pairs:
        with open(src, 'rb') as a, open(dst, 'rb') as b:
            assert a.read() == b.read()


def test_car_original_layout(tmp_path):
    root = str(tmp_path)
    car = make_car_original(root)
    result = data_utils.process_dataset(root, 'car')
    d = load(root, 'car', 'uncropped')
    assert d == result['uncropped']
    assert d == {'train': {'1': [p(root, 'car', 'uncropped', '000001.jpg'), p(root, 'car', 'uncropped', '000004.jpg')],
                           '98': [p(root, 'car', 'uncropped', '000002.jpg')]},
                 'test': {'99': [p(root, 'car', 'uncropped', '000003.jpg')],
                          '196': [p(root, 'car', 'uncropped', '000005.jpg')]}}
    c = load(root, 'car', 'cropped')
    assert c == {s: {k: [x.replace('/uncropped/', '/cropped/') for x in v] for k, v in d[s].items()} for s in d}
    srcs = [os.path.join(car, 'car_ims', f) for f, *_ in CAR_ORIGINAL]
    assert_uncropped_identical([(s, p(root, 'car', 'uncropped', f)) for s, (f, *_) in zip(srcs, CAR_ORIGINAL)])
    # hard links on the same filesystem: no second copy of the bytes
    assert os.path.samefile(srcs[0], p(root, 'car', 'uncropped', '000001.jpg'))
    assert_crops([(s, f, box) for s, (f, _, box, _) in zip(srcs, CAR_ORIGINAL)], root, 'car')


def make_car_devkit(root, kaggle=False):
    car = os.path.join(root, 'car')
    fields = ['bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname']
    # both parts number their files from 00001.jpg: the same names on purpose
    parts = {'cars_train': [('00001.jpg', 3, (1, 1, 20, 20)), ('00002.jpg', 150, (0, 2, 30, 28))],
             'cars_test': [('00001.jpg', 120, (4, 4, 36, 26)), ('00002.jpg', 3, (2, 2, 12, 12))]}
    for part, rows in parts.items():
        folder = os.path.join(car, part, part) if kaggle else os.path.join(car, part)
        records = []
        for k, (file, cls, (x1, y1, x2, y2)) in enumerate(rows):
            write_image(os.path.join(folder, file), seed=10 + k + 5 * len(part))
            records.append(dict(bbox_x1=x1, bbox_y1=y1, bbox_x2=x2, bbox_y2=y2, fname=file, **{'class': cls}))
        # Kaggle's copy: car_devkit/devkit/ and a renamed test label file
        devkit = os.path.join(car, 'car_devkit', 'devkit') if kaggle else os.path.join(car, 'devkit')
        mat = os.path.join(devkit, 'cars_train_annos.mat') if part == 'cars_train' else \
            os.path.join(car, 'cars_test_annos_withlabels (1).mat' if kaggle else 'cars_test_annos_withlabels.mat')
        os.makedirs(os.path.dirname(mat), exist_ok=True)
        savemat(mat, {'annotations': mat_struct(records, fields)})
    savemat(os.path.join(devkit, 'cars_meta.mat'), {'class_names': np.array(['x'] * 196, dtype=object)})
    return car, parts


@pytest.mark.parametrize('kaggle', [False, True])
def test_car_devkit_layout(tmp_path, kaggle):
    root = str(tmp_path)
    car, parts = make_car_devkit(root, kaggle)
    data_utils.process_dataset(root, 'car')
    u = lambda f: p(root, 'car', 'uncropped', f)  # noqa: E731
    assert load(root, 'car', 'uncropped') == {
        'train': {'3': [u('cars_train_00001.jpg'), u('cars_test_00002.jpg')]},
        'test': {'150': [u('cars_train_00002.jpg')], '120': [u('cars_test_00001.jpg')]}}
    items = []
    for part, rows in parts.items():
        folder = os.path.join(car, part, part) if kaggle else os.path.join(car, part)
        for file, _, box in rows:
            items.append((os.path.join(folder, file), f'{part}_{file}', box))
    assert_uncropped_identical([(s, u(f)) for s, f, _ in items])
    assert_crops(items, root, 'car')


# ---------------------------------------------------------------------------------------------
# CUB-200-2011, SOP, In-shop
# ---------------------------------------------------------------------------------------------

CUB_ROWS = [  # (id, path, class, box as written in bounding_boxes.txt)
    (1, '001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg', 1, '2.0 3.0 20.0 15.0'),
    (2, '100.Brown_Pelican/Brown_Pelican_0122_94.png', 100, '10.6 5.9 20.7 14.2'),
    (3, '101.White_Pelican/White_Pelican_0025_97604.jpg', 101, '0.0 0.0 40.0 30.0'),
    (4, '200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg', 200, '5.0 1.0 9.5 9.5'),
    (5, '001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg', 1, '1.0 1.0 30.0 20.0'),
]


def make_cub(root, nested=False, modes=('RGB', 'P', 'L', 'RGB', 'CMYK')):  # P: the .png one
    cub = os.path.join(root, 'cub', 'CUB_200_2011') if nested else os.path.join(root, 'cub')
    os.makedirs(cub, exist_ok=True)
    for (i, rel, _, _), mode in zip(CUB_ROWS, modes):
        write_image(os.path.join(cub, 'images', rel), mode=mode, seed=i)
    with open(os.path.join(cub, 'images.txt'), 'w') as f:
        f.writelines(f'{i} {rel}\n' for i, rel, _, _ in CUB_ROWS)
    with open(os.path.join(cub, 'image_class_labels.txt'), 'w') as f:
        f.writelines(f'{i} {c}\n' for i, _, c, _ in CUB_ROWS)
    with open(os.path.join(cub, 'bounding_boxes.txt'), 'w') as f:
        f.writelines(f'{i} {b}\n' for i, _, _, b in CUB_ROWS)
    return cub


def cub_box(text):
    x, y, w, h = (int(float(v)) for v in text.split())
    return x, y, x + w, y + h


@pytest.mark.parametrize('nested', [False, True])
def test_cub(tmp_path, nested):
    root = str(tmp_path)
    cub = make_cub(root, nested)
    data_utils.process_dataset(root, 'cub')
    u = lambda k: p(root, 'cub', 'uncropped', os.path.basename(CUB_ROWS[k][1]))  # noqa: E731
    assert load(root, 'cub', 'uncropped') == {'train': {'1': [u(0), u(4)], '100': [u(1)]},
                                              'test': {'101': [u(2)], '200': [u(3)]}}
    # box 2 is '10.6 5.9 20.7 14.2' -> x1=10, y1=5, x2=10+20, y2=5+14
    assert cub_box(CUB_ROWS[1][3]) == (10, 5, 30, 19)
    srcs = [os.path.join(cub, 'images', rel) for _, rel, _, _ in CUB_ROWS]
    assert_uncropped_identical([(s, u(k)) for k, s in enumerate(srcs)])
    assert_crops([(s, os.path.basename(s), cub_box(r[3])) for s, r in zip(srcs, CUB_ROWS)], root, 'cub')


def make_sop(root):
    sop = os.path.join(root, 'sop')
    train = [(1, 1, 1, 'bicycle_final/111085122871_0.JPG'), (2, 1, 1, 'bicycle_final/111085122871_1.JPG'),
             (3, 2, 2, 'chair_final/111265328556_0.JPG')]
    test = [(1, 11319, 1, 'bicycle_final/111996212766_0.JPG'), (2, 11320, 3, 'sofa_final/111301102580_4.JPG')]
    for name, rows in (('Ebay_train.txt', train), ('Ebay_test.txt', test)):
        for k, (_, _, _, rel) in enumerate(rows):
            write_image(os.path.join(sop, rel), seed=k, fmt='JPEG')
        with open(os.path.join(sop, name), 'w') as f:
            f.write('image_id class_id super_class_id path\n')
            f.writelines(f'{a} {b} {c} {d}\n' for a, b, c, d in rows)
    return sop


def test_sop(tmp_path):
    root = str(tmp_path)
    sop = make_sop(root)
    data_utils.process_dataset(root, 'sop')
    u = lambda f: p(root, 'sop', 'uncropped', f)  # noqa: E731
    assert load(root, 'sop', 'uncropped') == {
        'train': {'1': [u('111085122871_0.JPG'), u('111085122871_1.JPG')], '2': [u('111265328556_0.JPG')]},
        'test': {'11319': [u('111996212766_0.JPG')], '11320': [u('111301102580_4.JPG')]}}
    assert not os.path.exists(data_utils.data_dict_path(root, 'sop', 'cropped'))
    assert_uncropped_identical([(os.path.join(sop, 'chair_final/111265328556_0.JPG'), u('111265328556_0.JPG'))])


ISC_ROWS = [('img/WOMEN/Dresses/id_00000002/02_1_front.jpg', 'id_00000002', 'train'),
            ('img/WOMEN/Dresses/id_00000002/02_2_side.jpg', 'id_00000002', 'train'),
            ('img/MEN/Denim/id_00000080/01_1_front.jpg', 'id_00000080', 'query'),
            ('img/MEN/Denim/id_00000080/01_2_side.jpg', 'id_00000080', 'gallery'),
            ('img/WOMEN/Skirts/id_00000090/02_1_front.jpg', 'id_00000090', 'gallery')]


def make_isc(root, img_root='Img'):
    isc = os.path.join(root, 'isc')
    for k, (rel, _, _) in enumerate(ISC_ROWS):
        write_image(os.path.join(isc, img_root, rel) if img_root else os.path.join(isc, rel), seed=k)
    os.makedirs(os.path.join(isc, 'Eval'))
    with open(os.path.join(isc, 'Eval', 'list_eval_partition.txt'), 'w') as f:
        f.write(f'{len(ISC_ROWS)}\nimage_name item_id evaluation_status\n')
        f.writelines(f'{a}    {b}    {c}\n' for a, b, c in ISC_ROWS)
    return isc


@pytest.mark.parametrize('img_root', ['Img', ''])
def test_isc(tmp_path, img_root):
    root = str(tmp_path)
    isc = make_isc(root, img_root)
    data_utils.process_dataset(root, 'isc')
    u = lambda f: p(root, 'isc', 'uncropped', f)  # noqa: E731
    d = load(root, 'isc', 'uncropped')
    assert list(d) == ['train', 'query', 'gallery']
    assert d == {'train': {'id_00000002': [u('id_00000002_02_1_front.jpg'), u('id_00000002_02_2_side.jpg')]},
                 'query': {'id_00000080': [u('id_00000080_01_1_front.jpg')]},
                 'gallery': {'id_00000080': [u('id_00000080_01_2_side.jpg')],
                             'id_00000090': [u('id_00000090_02_1_front.jpg')]}}
    assert_uncropped_identical([(os.path.join(isc, img_root, ISC_ROWS[3][0]), u('id_00000080_01_2_side.jpg'))])


# ---------------------------------------------------------------------------------------------
# own class folders
# ---------------------------------------------------------------------------------------------


def test_own_folders_split_names_and_reserved(tmp_path):
    root = str(tmp_path)
    write_class_folders(root, 'shoes', num_classes=5, per_class=2, size=16)
    os.makedirs(os.path.join(root, 'shoes', 'cropped'))  # reserved: never a class
    open(os.path.join(root, 'shoes', 'class_00', 'notes.txt'), 'w').close()  # not an image: ignored
    data_utils.process_dataset(root, 'shoes')
    u = lambda c, j: p(root, 'shoes', 'uncropped', f'class_{c:02d}_img_{j}.jpg')  # noqa: E731
    # 5 sorted classes, split 0.5 -> round(2.5) = 3 train classes
    assert load(root, 'shoes', 'uncropped') == {
        'train': {f'class_{c:02d}': [u(c, 0), u(c, 1)] for c in range(3)},
        'test': {f'class_{c:02d}': [u(c, 0), u(c, 1)] for c in range(3, 5)}}
    # a second run sees uncropped/ and does not take it for a class; --split moves the boundary
    data_utils.process_dataset(root, 'shoes', split=0.2)
    d = load(root, 'shoes', 'uncropped')
    assert list(d['train']) == ['class_00'] and list(d['test']) == [f'class_{c:02d}' for c in range(1, 5)]
    assert datasets.split_classes(['b', 'a', 'c', 'd'], 0.5) == (['a', 'b'], ['c', 'd'])
    assert datasets.split_classes(['a', 'b'], 0.01) == (['a'], ['b'])  # never an empty side
    assert imaging.normalization('shoes') == (imaging.IMAGENET_MEAN, imaging.IMAGENET_STD)
    assert imaging.normalization('car') == imaging.NORMALIZATION['car']


def test_image_modes_accepted(tmp_path):
    # grayscale, CMYK, palette (with transparency), RGBA, 16-bit grey: all valid input, kept byte for byte
    root = str(tmp_path)
    files = {'a/grey.png': 'L', 'a/cmyk.jpg': 'CMYK', 'b/palette.gif': 'P', 'b/alpha.png': 'RGBA'}
    for rel, mode in files.items():
        write_image(os.path.join(root, 'own', rel), mode=mode, fmt='GIF' if rel.endswith('.gif') else None)
    img = Image.open(os.path.join(root, 'own', 'b/palette.gif'))
    img.save(os.path.join(root, 'own', 'b/palette_t.png'), transparency=0)
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(
        os.path.join(root, 'own', 'a/grey16.png'))
    data_utils.process_dataset(root, 'own')
    d = load(root, 'own', 'uncropped')
    assert sorted(d['train']['a']) == [p(root, 'own', 'uncropped', f) for f in
                                       ('a_cmyk.jpg', 'a_grey.png', 'a_grey16.png')]
    assert len(d['test']['b']) == 3
    assert_uncropped_identical([(os.path.join(root, 'own', rel), p(root, 'own', 'uncropped', rel.replace('/', '_')))
                                for rel in files])


def test_tiny_fixture_for_other_tests(tmp_path):
    data_path = make_tiny_dataset(tmp_path)
    d = load(data_path, 'tiny', 'uncropped')
    assert sorted(d['train']) == ['class_00', 'class_01', 'class_02']
    assert sorted(d['test']) == ['class_03', 'class_04', 'class_05']
    assert all(len(v) == 4 and all(os.path.isfile(x) for x in v) for s in d.values() for v in s.values())


def test_own_folder_name_collision_is_an_error(tmp_path):
    root = str(tmp_path)
    write_image(os.path.join(root, 'own', 'a_b', 'c.jpg'), seed=1)
    write_image(os.path.join(root, 'own', 'a', 'b_c.jpg'), seed=2)  # also named a_b_c.jpg
    with pytest.raises(UserError, match='same file name'):
        data_utils.process_dataset(root, 'own')
    assert not os.path.exists(os.path.join(root, 'own', 'uncropped'))


def test_existing_files_identical_accepted_different_refused(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=2, per_class=2, size=8)
    # links impossible (another filesystem): byte copies, accepted on a re-run because equal
    monkeypatch.setattr(os, 'link', lambda *a: (_ for _ in ()).throw(OSError(18, 'cross-device')))
    first = data_utils.process_dataset(root, 'own')
    dst = p(root, 'own', 'uncropped', 'class_00_img_0.jpg')
    src = os.path.join(root, 'own', 'class_00', 'img_0.jpg')
    assert not os.path.samefile(src, dst)
    assert_uncropped_identical([(src, dst)])
    assert data_utils.process_dataset(root, 'own') == first
    # another image under that name: refused, not overwritten
    write_image(src, size=(8, 8), seed=99)
    before = open(dst, 'rb').read()
    with pytest.raises(UserError, match='already exist and differ'):
        data_utils.process_dataset(root, 'own')
    assert open(dst, 'rb').read() == before


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


MISSING_IMAGE = '1 image file(s) listed by the annotations are missing:\n  {}'


@pytest.mark.parametrize('name, make, remove, message', [
    ('car', make_car_original, 'car/cars_annos.mat', 'annotation file not found: {}'),
    ('car', make_car_devkit, 'car/cars_test_annos_withlabels.mat', 'annotation file not found: {}'),
    ('car', make_car_devkit, 'car/devkit/cars_train_annos.mat', 'annotation file not found: {}'),
    ('cub', make_cub, 'cub/bounding_boxes.txt', 'annotation file not found: {}'),
    ('cub', make_cub, 'cub/image_class_labels.txt', 'annotation file not found: {}'),
    ('sop', make_sop, 'sop/Ebay_test.txt', 'annotation file not found: {}'),
    ('isc', make_isc, 'isc/Eval/list_eval_partition.txt', 'annotation file not found: {}'),
    ('car', make_car_original, 'car/car_ims/000003.jpg', MISSING_IMAGE),
    ('cub', make_cub, 'cub/images/101.White_Pelican/White_Pelican_0025_97604.jpg', MISSING_IMAGE),
    ('sop', make_sop, 'sop/chair_final/111265328556_0.JPG', MISSING_IMAGE),
    ('isc', make_isc, 'isc/Img/img/MEN/Denim/id_00000080/01_2_side.jpg', MISSING_IMAGE),
])
def test_missing_file(tmp_path, name, make, remove, message):
    root = str(tmp_path)
    make(root)
    os.remove(os.path.join(root, remove))
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, name)
    assert str(err.value).startswith(f'{name}: ' + message.format(os.path.join(root, remove)))
    assert 'expected layout' in str(err.value)
    assert not os.path.exists(os.path.join(root, name, 'uncropped'))
    assert not os.path.exists(data_utils.data_dict_path(root, name, 'uncropped'))


def test_empty_car_folder(tmp_path):
    os.makedirs(tmp_path / 'car')
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(str(tmp_path), 'car')
    assert str(err.value).startswith(f'car: devkit not found: {tmp_path / "car" / "devkit"}\nexpected layout:\n'
                                     '  car/cars_annos.mat, car/car_ims/*.jpg')


def test_malformed_annotations(tmp_path):
    root = str(tmp_path)
    cub = make_cub(root)
    with open(os.path.join(cub, 'bounding_boxes.txt'), 'a') as f:
        f.write('6 1.0 2.0 3.0\n')  # a column short
    bad_line = r'bounding_boxes.txt line 6: expected 5 columns \(image_id x y w h\), got 4: 6 1.0 2.0 3.0$'
    with pytest.raises(UserError, match=bad_line):  # the line quoted as found
        data_utils.process_dataset(root, 'cub')
    with open(os.path.join(cub, 'bounding_boxes.txt'), 'w') as f:
        f.writelines(f'{k} 0 0 {"inf" if k == 2 else 5} 5\n' for k in range(1, len(CUB_ROWS) + 1))
    with pytest.raises(UserError, match=r'cub: image id 2: expected an integer class id'):
        data_utils.process_dataset(root, 'cub')
    car = make_car_original(root)
    with open(os.path.join(car, 'cars_annos.mat'), 'wb') as f:
        f.write(b'not a MATLAB file')
    with pytest.raises(UserError, match=r'car: cannot read .*cars_annos.mat as a MATLAB file'):
        data_utils.process_dataset(root, 'car')
    savemat(os.path.join(car, 'cars_annos.mat'), {'annotations': mat_struct([{'fname': 'a.jpg'}], ['fname'])})
    missing = r'cars_annos.mat has no struct "annotations" with the field\(s\) relative_im_path, bbox_x1'
    with pytest.raises(UserError, match=missing):
        data_utils.process_dataset(root, 'car')


def test_unreadable_images_all_listed_nothing_written(tmp_path):
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=3, per_class=10, size=32)
    bad = []
    for c in range(3):
        for j in range(8):  # 24 bad files: 20 listed, 4 counted
            path = os.path.join(root, 'own', f'class_{c:02d}', f'img_{j}.jpg')
            data = open(path, 'rb').read()
            with open(path, 'wb') as f:  # truncated, or not an image at all
                f.write(data[:len(data) // 2] if j % 2 else b'not an image')
            bad.append(path)
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, 'own')
    message = str(err.value)
    assert '24 image file(s) are unreadable' in message and '... and 4 more' in message
    assert sum(path in message for path in bad) == 20
    assert 'truncated' in message and 'nothing was written' in message
    assert not os.path.exists(os.path.join(root, 'own', 'uncropped'))
    assert not os.path.exists(data_utils.data_dict_path(root, 'own', 'uncropped'))


def test_decompression_bomb_reason_whole(tmp_path):
    # a PNG whose header claims 20000 x 20000 pixels: PIL refuses it with a 100+ character reason
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=2, per_class=1, size=8)
    data = bytearray(open(write_image(os.path.join(root, 'own', 'class_00', 'bomb.png'), (1, 1)), 'rb').read())
    data[16:24] = struct.pack('>II', 20000, 20000)  # IHDR width, height, then its CRC
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    open(os.path.join(root, 'own', 'class_00', 'bomb.png'), 'wb').write(data)
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, 'own')
    assert 'bomb.png: unreadable (Image size (400000000 pixels) exceeds limit of' in str(err.value)
    assert 'could be decompression bomb DOS attack.)' in str(err.value)  # cut at 'DOS att' before


def test_long_names_refused_before_writing(tmp_path):
    # a 250-byte class folder is legal, but {class}_{file} (plus what a temporary name adds) is not
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=2, per_class=1, size=8)
    long_class = os.path.join(root, 'own', 'c' * 250)
    write_image(os.path.join(long_class, 'img_0.jpg'))
    fits = 255 - files.TEMPORARY_EXTRA - len('_img_0.jpg')  # the longest class name that still fits
    write_image(os.path.join(root, 'own', 'd' * (fits + 1), 'img_0.jpg'))  # one byte too long
    write_image(os.path.join(root, 'own', 'e' * fits, 'img_0.jpg'))
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, 'own')
    message = str(err.value)
    assert message.startswith('own: 2 output file name(s) longer than the file system allows (255 bytes')
    assert 'c' * 250 + '_img_0.jpg' in message and 'shorten those' in message and 'disk space' not in message
    assert 'd' * (fits + 1) + '_img_0.jpg' in message and 'e' * fits not in message
    assert not os.path.exists(os.path.join(root, 'own', 'uncropped'))


@pytest.mark.slow
def test_cli_errors_without_traceback(tmp_path, capsys):
    # one run through the interpreter: exit status 1 and one line, no traceback
    root = str(tmp_path)
    make_cub(root)
    os.remove(os.path.join(root, 'cub', 'images.txt'))
    run = run_process([sys.executable, 'data_utils.py', '--data_path', root, '--data_name', 'cub'])
    assert run.returncode == 1 and 'Traceback' not in run.stderr
    assert run.stderr.startswith(f'error: cub: annotation file not found: {os.path.join(root, "cub", "images.txt")}')
    # the rest in-process, through the same run_cli
    for argv, message in [(['--data_name', 'nope'], "error: unknown dataset 'nope'"),
                          (['--data_name', 'demo', '--seed', '-1'], 'error: --seed must be between 0 and 4294967295'),
                          (['--data_name', 'demo', '--seed', str(2 ** 32)], 'error: --seed must be between 0 and')]:
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(lambda: data_utils.main(['--data_path', root, *argv]))
        assert exit_.value.code == 1 and capsys.readouterr().err.startswith(message)
    assert not os.path.exists(os.path.join(root, 'demo'))


@pytest.mark.parametrize('argv, message', [
    (['--data_name', 'own', 'car', '--split', '0.3'], '--split applies to own class-folder datasets, not to car '),
    (['--split', '0.3'], '--split applies to own class-folder datasets, not to car, cub, sop, isc (fixed splits)'),
    (['--data_name', 'own', '--split', '1.5'], '--split must be between 0 and 1'),
    (['--data_name', 'own', '--split', 'nan'], '--split must be between 0 and 1'),
    (['--data_name', 'own', '../cub'], "--data_name '../cub' must be a folder name inside --data_path"),
    (['--data_name', 'own', 'demo', '--seed', '-1'], '--seed must be between 0 and 4294967295, got -1'),
])
def test_flags_checked_before_any_dataset(tmp_path, argv, message):
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=2, per_class=1, size=8)
    with pytest.raises(UserError) as err:
        data_utils.main(['--data_path', root, *argv])
    assert str(err.value).startswith(message)
    assert os.listdir(root) == ['own'] and sorted(os.listdir(os.path.join(root, 'own'))) == ['class_00', 'class_01']


def test_all_present_processed_absent_reported(tmp_path, capsys):
    root = str(tmp_path)
    make_sop(root)
    make_isc(root)
    data_utils.main(['--data_path', root])
    out = capsys.readouterr().out
    assert 'skipping car, cub: no such folder' in out
    assert 'sop uncropped: train 2 classes / 3 images, test 2 classes / 2 images' in out
    assert 'isc uncropped: train 1 classes / 2 images, query 1 classes / 1 images, gallery 2 classes / 2 images' in out


# ---------------------------------------------------------------------------------------------
# annotations are data from elsewhere: names and sources stay inside the dataset folder
# ---------------------------------------------------------------------------------------------


def edit_line(path, number, old, new):
    """Replace `old` by `new` in line `number` (from 1) of a text file."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new)
    with open(path, 'w') as f:
        f.writelines(lines)


def car_path_outside(root):
    """CARS196 whose first record names an image beside the dataset folder."""
    car = make_car_original(root)
    mat = scipy.io.loadmat(os.path.join(car, 'cars_annos.mat'))
    mat['annotations'][0, 0]['relative_im_path'] = np.array(['../escape.jpg'])
    scipy.io.savemat(os.path.join(car, 'cars_annos.mat'), {'annotations': mat['annotations']})
    return os.path.join(car, 'cars_annos.mat'), 'record 1', os.path.join(car, '../escape.jpg')


def cub_path_absolute(root):
    make_cub(root)
    outside = os.path.join(root, 'escape.jpg')
    edit_line(os.path.join(root, 'cub', 'images.txt'), 1, CUB_ROWS[0][1], outside)
    return os.path.join(root, 'cub', 'images.txt'), 'line 1', outside


def sop_name_dotdot(root):
    make_sop(root)
    edit_line(os.path.join(root, 'sop', 'Ebay_train.txt'), 2, 'bicycle_final/111085122871_0.JPG', 'bicycle_final/..')
    return os.path.join(root, 'sop', 'Ebay_train.txt'), 'line 2', "output file name '..'"


def isc_item_id_traversal(root):
    make_isc(root)
    edit_line(os.path.join(root, 'isc', 'Eval', 'list_eval_partition.txt'), 3, ' id_00000002 ', ' ../../../escape ')
    return (os.path.join(root, 'isc', 'Eval', 'list_eval_partition.txt'), 'line 3',
            "output file name '../../../escape_02_1_front.jpg'")


def isc_path_dotdot(root):
    make_isc(root)
    edit_line(os.path.join(root, 'isc', 'Eval', 'list_eval_partition.txt'), 4, 'img/WOMEN/Dresses/id_00000002/',
              'img/../../../')  # Img/img/../../../ is the data path itself
    return (os.path.join(root, 'isc', 'Eval', 'list_eval_partition.txt'), 'line 4',
            os.path.join(root, 'isc', 'Img', 'img/../../../02_2_side.jpg'))


@pytest.mark.parametrize('name, make', [('car', car_path_outside), ('cub', cub_path_absolute),
                                        ('sop', sop_name_dotdot), ('isc', isc_item_id_traversal),
                                        ('isc', isc_path_dotdot)])
def test_annotations_cannot_reach_outside(tmp_path, name, make):
    # the data path is tmp_path/data: '../../../escape_...' from data/isc/uncropped/ would land in tmp_path
    root = str(tmp_path / 'data')
    os.makedirs(root)
    for outside in (tmp_path / 'data' / 'escape.jpg', tmp_path / 'data' / '02_2_side.jpg'):
        write_image(str(outside), seed=7)  # readable: only the check stops them
    annotations, where, what = make(root)
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, name)
    message = str(err.value)
    assert message.startswith(f'{name}: {annotations} {where}: ') and what in message, message
    assert message.endswith('; nothing was written')
    if 'output file name' in what:
        assert 'is not a plain file name' in message
    else:
        assert f'is outside the dataset folder {os.path.join(root, name)}' in message
    assert sorted(os.listdir(tmp_path)) == ['data']
    assert not os.path.exists(os.path.join(root, name, 'uncropped'))
    assert not os.path.exists(data_utils.data_dict_path(root, name, 'uncropped'))


def test_pipeline_refuses_names_that_leave_the_folder(tmp_path):
    # own folders cannot hold such names (the file system forbids '/' in a folder name); any other
    # reader's items go through the same check
    root = str(tmp_path)
    src = write_image(os.path.join(root, 'own', 'a', 'x.jpg'))
    for bad in ('../x.jpg', '/x.jpg', '.', '..', 'a/x.jpg', 'x\0.jpg'):
        items = [datasets.Item(src, bad, 'a', 'train', None, 'class folder a'),
                 datasets.Item(src, 'y.jpg', 'b', 'test', None, 'class folder b')]
        with pytest.raises(UserError, match=f'^own: class folder a: output file name {re.escape(repr(bad))} is not'):
            data_utils.process_items(items, root, 'own')
    assert os.listdir(os.path.join(root, 'own')) == ['a']


def test_links_in_output_folders_not_written_through(tmp_path):
    root = str(tmp_path / 'data')
    make_cub(root)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    # a link where a crop folder goes: refused before anything is written through it
    os.symlink(elsewhere, os.path.join(root, 'cub', 'cropped'))
    with pytest.raises(UserError, match=r'^cub: .*/cub/cropped is a symbolic link; the images are written only'):
        data_utils.process_dataset(root, 'cub')
    assert os.listdir(elsewhere) == [] and not os.path.exists(os.path.join(root, 'cub', 'uncropped'))
    os.remove(os.path.join(root, 'cub', 'cropped'))
    # links at output file names: one to a missing file, one to a file with other bytes; neither target
    # is created or changed
    victim, missing = elsewhere / 'victim.jpg', elsewhere / 'created.jpg'
    victim.write_bytes(b'precious')
    os.makedirs(os.path.join(root, 'cub', 'cropped'))
    os.symlink(victim, p(root, 'cub', 'cropped', os.path.basename(CUB_ROWS[0][1])))
    os.symlink(missing, p(root, 'cub', 'cropped', os.path.basename(CUB_ROWS[1][1])))
    with pytest.raises(UserError, match='crop.s. already exist with other content'):
        data_utils.process_dataset(root, 'cub')
    assert victim.read_bytes() == b'precious' and not missing.exists()
    assert not os.path.exists(data_utils.data_dict_path(root, 'cub', 'cropped'))


def test_empty_split_refused(tmp_path):
    root = str(tmp_path)
    cub = make_cub(root)  # classes 1, 100 train; 101, 200 test
    with open(os.path.join(cub, 'image_class_labels.txt'), 'w') as f:
        f.writelines(f'{i} {c if c <= 100 else c - 100}\n' for i, _, c, _ in CUB_ROWS)
    with pytest.raises(UserError) as err:
        data_utils.process_dataset(root, 'cub')
    assert str(err.value) == ("cub: no test classes: 2 classes numbered 1 to 100 were found, all train; "
                              "CUB-200-2011's train split is classes 1-100, its test split classes 101-200; "
                              "nothing was written")
    make_sop(root)
    with open(os.path.join(root, 'sop', 'Ebay_test.txt'), 'w') as f:
        f.write('image_id class_id super_class_id path\n')
    with pytest.raises(UserError, match=r"^sop: no test classes: classes 1-2 were found, all train; SOP's train"):
        data_utils.process_dataset(root, 'sop')
    isc = make_isc(root)
    edit_line(os.path.join(isc, 'Eval', 'list_eval_partition.txt'), 5, 'query', 'gallery')
    with pytest.raises(UserError, match=r"^isc: no query classes: 3 classes \(id_00000002 ... id_00000090\) were "
                                        r"found, all train and gallery; In-shop's split is the evaluation_status"):
        data_utils.process_dataset(root, 'isc')
    assert sorted(os.listdir(root)) == ['.cub.lock', '.isc.lock', '.sop.lock', 'cub', 'isc', 'sop']
    for name in ('cub', 'sop', 'isc'):
        assert not os.path.exists(os.path.join(root, name, 'uncropped'))
    assert data_utils._describe_classes({'7'}) == 'class 7' and data_utils._describe_classes({'a'}) == 'class a'


# ---------------------------------------------------------------------------------------------
# one run per dataset folder
# ---------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """data_utils.py's command line in-process, through run_cli -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(lambda: sys.exit(data_utils.main(list(argv))))
    return exit_.value.code or 0, capsys.readouterr().err


def test_second_run_on_a_folder_stops_at_once(tmp_path, capsys):
    # flock holds per open file: a lock taken here excludes the run in this same process too
    root = str(tmp_path)
    make_cub(root)
    before = tree_bytes(root)
    lock = os.path.join(root, '.cub.lock')
    with open(lock, 'w') as held:  # another run holds the folder
        held.write('process 4242\n')
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cli(capsys, '--data_path', root, '--data_name', 'cub') == (
            1, f'error: another data_utils.py is processing {os.path.join(root, "cub")} (process 4242); wait for it\n')
        assert tree_bytes(root) == dict(before, **{'.cub.lock': b'process 4242\n'})
        # other datasets in the same data path are not held
        write_class_folders(root, 'own', num_classes=2, per_class=1, size=8)
        assert run_cli(capsys, '--data_path', root, '--data_name', 'own')[0] == 0
    assert run_cli(capsys, '--data_path', root, '--data_name', 'cub')[0] == 0
    with open(lock) as f:
        assert f.read() == f'process {os.getpid()}\n'  # the holder is named for the next one
    # a link planted where the lock file goes: refused, its target neither created nor written
    os.remove(lock)
    os.symlink(tmp_path / 'target', lock)
    assert run_cli(capsys, '--data_path', root, '--data_name', 'cub') == (
        1, f'error: {lock} is a symbolic link, not the lock file data_utils.py makes; remove it\n')
    assert not os.path.lexists(tmp_path / 'target')
    # a hard link to another file: refused, that file unchanged
    os.remove(lock)
    (tmp_path / 'notes').write_text('mine')
    os.link(tmp_path / 'notes', lock)
    assert run_cli(capsys, '--data_path', root, '--data_name', 'cub') == (
        1, f'error: {lock} is not the lock file data_utils.py makes (not a regular file of its own); remove it\n')
    assert (tmp_path / 'notes').read_text() == 'mine'


# ---------------------------------------------------------------------------------------------
# atomic writes, re-runs, permissions
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_write_keeps_previous_lists(tmp_path, monkeypatch):
    root = str(tmp_path)
    make_cub(root)
    data_utils.process_dataset(root, 'cub')
    path = data_utils.data_dict_path(root, 'cub', 'uncropped')
    torch.save({'train': {}, 'test': {}}, path)  # lists that differ: the next run rewrites them
    before = open(path, 'rb').read()
    # killed (SIGKILL) halfway through writing the list: the previous file is untouched
    run = run_script(['--data_path', root, '--data_name', 'cub'], fault='kill-write:uncropped_data_dicts:1',
                     script='data_utils.py')
    assert run.returncode == -9
    assert open(path, 'rb').read() == before
    assert temporaries(root)[0].startswith('.uncropped_data_dicts.pth.')
    # a crop killed the same way; the next run removes both leftovers, whatever else it does
    crop = p(root, 'cub', 'cropped', 'White_Pelican_0025_97604.jpg')
    os.remove(crop)
    files.write_temporary(b'half', crop)  # what a killed write leaves, named as the writer names it
    # a write that fails (disk full): an error, the previous file is untouched, no temporary left
    fail_writes(monkeypatch, 'cropped_data_dicts')
    os.remove(data_utils.data_dict_path(root, 'cub', 'cropped'))
    with pytest.raises(UserError, match='cannot write .*cropped_data_dicts.pth: No space left on device'):
        data_utils.process_dataset(root, 'cub')
    assert not os.path.exists(data_utils.data_dict_path(root, 'cub', 'cropped'))
    assert open(path, 'rb').read() == before
    assert temporaries(root) == [] and os.path.isfile(crop)


def test_disk_full_while_copying(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_class_folders(root, 'own', num_classes=2, per_class=2, size=8)
    monkeypatch.setattr(os, 'link', lambda *a: (_ for _ in ()).throw(OSError(18, 'cross-device')))
    fail_writes(monkeypatch, 'class_00_img_0.jpg')
    with pytest.raises(UserError, match=r'cannot write .*class_00_img_0.jpg: No space left on device'):
        data_utils.process_dataset(root, 'own')
    assert not os.path.exists(data_utils.data_dict_path(root, 'own', 'uncropped'))
    assert os.listdir(os.path.join(root, 'own', 'uncropped')) == []  # no temporary left behind


def test_rerun_gives_same_result(tmp_path):
    root = str(tmp_path)
    make_car_original(root)
    first = data_utils.process_dataset(root, 'car')
    crop = p(root, 'car', 'cropped', '000001.jpg')
    crop_bytes, crop_mtime = open(crop, 'rb').read(), os.stat(crop).st_mtime_ns
    assert data_utils.process_dataset(root, 'car') == first
    assert load(root, 'car', 'cropped') == first['cropped']
    assert open(crop, 'rb').read() == crop_bytes and os.stat(crop).st_mtime_ns == crop_mtime  # written once


@pytest.mark.slow
def test_written_files_follow_umask(tmp_path):
    # umask 027 in a fresh process; copies (links refused), crops from the thread pool, lists and
    # the demo's own files all get 0o666 & ~umask = 0o640 (its lock file 0o644 & ~umask), and the umask itself
    # is never changed
    script = (f'import os, sys; sys.path.insert(0, {REPO!r}); os.umask(0o027)\n'
              f'os.link = lambda *a: (_ for _ in ()).throw(OSError(18, "cross-device"))\n'
              f'import data_utils, demo; demo.DEMO_CLASSES, demo.DEMO_PER_CLASS = 4, 3\n'
              f'data_utils.main(["--data_path", {str(tmp_path)!r}, "--data_name", "demo"])\n'
              f'print(oct(os.umask(0)))')
    run = run_process([sys.executable, '-c', script])
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == '0o27', run.stderr
    modes = {os.path.relpath(os.path.join(folder, f), tmp_path): os.stat(os.path.join(folder, f)).st_mode & 0o777
             for folder, _, files in os.walk(tmp_path) for f in files}
    assert len([f for f in modes if f.startswith('demo/cropped/')]) == 12 and len(modes) == 12 * 3 + 7 + 1
    assert '.demo.lock' in modes
    assert set(modes.values()) == {0o640}


# ---------------------------------------------------------------------------------------------
# reading the lists back (what train.py calls)
# ---------------------------------------------------------------------------------------------


def read_only_run(folder, command):
    """Run command unable to write anything under folder -> CompletedProcess, or None when this machine cannot
    make it so. Root ignores permission bits: it runs in a private mount namespace where folder is a read-only
    bind mount (unshare --mount); any other user gets the write bits removed."""
    if os.geteuid() != 0:
        modes = {path: os.stat(path).st_mode for path in [folder] + [os.path.join(d, n) for d, ds, fs in os.walk(folder)
                                                                    for n in ds + fs]}
        for path, mode in modes.items():
            os.chmod(path, mode & ~0o222)
        try:
            return run_process(command)
        finally:
            for path, mode in modes.items():
                os.chmod(path, mode)
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    probe = run_process(['unshare', '--mount', 'sh', '-c', mount, folder, 'touch', os.path.join(folder, 'x')])
    if probe.returncode == 0 or 'Read-only file system' not in probe.stderr:
        return None
    return run_process(['unshare', '--mount', 'sh', '-c', mount, folder, *command])


@pytest.mark.slow
def test_rerun_on_read_only_dataset_writes_nothing(tmp_path):
    root = str(tmp_path / 'data')
    make_cub(root)
    data_utils.process_dataset(root, 'cub')
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    before = {path: (os.stat(path).st_mtime_ns, open(path, 'rb').read()) for path in files}
    run = read_only_run(root, [sys.executable, 'data_utils.py', '--data_path', root, '--data_name', 'cub'])
    if run is None:
        pytest.skip('running as root, where only a read-only bind mount (unshare --mount) stops writes, and this '
                    'machine does not permit one')
    assert run.returncode == 0, run.stderr
    assert f'cub cropped: train 2 classes / 3 images, test 2 classes / 2 images' in run.stdout
    after = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert sorted(after) == sorted(files)
    assert {path: (os.stat(path).st_mtime_ns, open(path, 'rb').read()) for path in after} == before


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('tiny'))
    make_tiny_dataset(root, num_classes=4, per_class=2, size=16)
    write_class_folders(root, 'raw', num_classes=2, per_class=1, size=8)  # never processed
    return root


def test_load_data_dicts(tmp_path, tiny):
    dicts, path = data_utils.load_data_dicts(tiny, 'tiny', 'uncropped')
    assert path == data_utils.data_dict_path(tiny, 'tiny', 'uncropped') and dicts == load(tiny, 'tiny', 'uncropped')
    make_isc(str(tmp_path / 'a'))
    expected = data_utils.process_dataset(str(tmp_path / 'a'), 'isc')['uncropped']
    assert data_utils.load_data_dicts(str(tmp_path / 'a'), 'isc', 'uncropped')[0] == expected
    # the whole data path moved since data_utils.py ran
    os.rename(tmp_path / 'a', tmp_path / 'b')
    with pytest.raises(UserError) as err:
        data_utils.load_data_dicts(str(tmp_path / 'b'), 'isc', 'uncropped')
    assert str(err.value) == (f"data dict {data_utils.data_dict_path(str(tmp_path / 'b'), 'isc', 'uncropped')}: "
                              f"images of split 'train' not found (first: {expected['train']['id_00000002'][0]}); "
                              f"the dataset moved since data_utils.py ran? re-run it with the current --data_path")


BAD = 'data dict {root}/bad/uncropped_data_dicts.pth: '
SPLITS = "expected splits 'train' and 'test' (or 'query' and 'gallery'), found "


@pytest.mark.parametrize('name, crop, content, message', [
    ('../tiny', 'uncropped', None, "--data_name '../tiny' must be a folder name inside --data_path (no path "
                                   "separators)"),
    ('tiny', 'resized', None, "--crop_type 'resized': expected one of uncropped, cropped"),
    ('demo', 'uncropped', None, 'demo: folder not found: {root}/demo; the demo is generated: '
                                'run `python data_utils.py --data_path {root} --data_name demo`'),
    ('car', 'uncropped', None, 'car: folder not found: {root}/car\nexpected layout:\n  car/cars_annos.mat'),
    ('nope', 'uncropped', None, "unknown dataset 'nope': {root}/nope is not a folder. Use one of car, cub, sop, "
                                "isc, demo, or an own dataset laid out as\n  nope/<class>/<image>"),
    ('raw', 'uncropped', None, 'data dict not found: {root}/raw/uncropped_data_dicts.pth; '
                               'run `python data_utils.py --data_path {root} --data_name raw` first'),
    # an own folder has no boxes: data_utils.py cannot make cropped lists for it (issue 24 item 21)
    ('tiny', 'cropped', None, 'data dict not found: {root}/tiny/cropped_data_dicts.pth; tiny has no bounding boxes, '
                              'so data_utils.py makes only uncropped lists for it (cropped ones exist for car, cub, '
                              'demo): use --crop_type uncropped'),
    ('bad', 'uncropped', [1, 2], BAD + SPLITS + 'list'),
    ('bad', 'uncropped', {'train': {}, 'query': {}}, BAD + SPLITS + "['query', 'train']"),
    ('bad', 'uncropped', {'train': {'a': []}, 'test': {'b': ['x.jpg']}},
     BAD + "split 'train': empty or not {label: [paths]}; re-run data_utils.py"),
    ('bad', 'uncropped', {'train': {'a': ['x.jpg']}, 'test': {'b': 'x.jpg'}}, BAD + "split 'test': empty or not"),
])
def test_load_data_dicts_errors(tiny, name, crop, content, message):
    if content is not None:
        os.makedirs(os.path.join(tiny, name), exist_ok=True)
        torch.save(content, data_utils.data_dict_path(tiny, name, crop))
    with pytest.raises(UserError) as err:
        data_utils.load_data_dicts(tiny, name, crop)
    assert str(err.value).startswith(message.replace("{root}", tiny))
    assert 'download' not in str(err.value)
    if name == 'car':
        assert str(err.value).endswith(f'then run `python data_utils.py --data_path {tiny} --data_name car`')


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def tree_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(folder, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(folder, f), root)] = fh.read()
    return out


def test_demo_deterministic_and_processed(tmp_path):
    small = dict(num_classes=6, per_class=3, size=48)
    a = demo.make_demo(str(tmp_path / 'a' / 'demo'), seed=3, **small)
    b = demo.make_demo(str(tmp_path / 'b' / 'demo'), seed=3, **small)
    c = demo.make_demo(str(tmp_path / 'c' / 'demo'), seed=4, **small)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert len(ta) == 6 * 3 + 5 and ta == tb and ta != tc
    # CUB's layout: the real CUB reader and pipeline process it
    items = datasets.read_cub(a, num_train_classes=3, name='demo')
    result = data_utils.process_items(items, str(tmp_path / 'a'), 'demo')
    d = load(str(tmp_path / 'a'), 'demo', 'uncropped')
    assert d == result['uncropped']
    assert list(d['train']) == ['1', '2', '3'] and list(d['test']) == ['4', '5', '6']
    assert all(len(v) == 3 and all(os.path.isfile(x) for x in v) for s in d.values() for v in s.values())
    cropped = load(str(tmp_path / 'a'), 'demo', 'cropped')
    assert sum(len(v) for v in cropped['test'].values()) == 9
    with open(os.path.join(a, 'bounding_boxes.txt')) as f:
        for line in f:
            x, y, w, h = map(float, line.split()[1:])
            assert 0 <= x and 0 <= y and w > 4 and h > 4 and x + w <= 48 and y + h <= 48


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, 'DEMO_CLASSES', 4)
    monkeypatch.setattr(demo, 'DEMO_PER_CLASS', 2)


def test_demo_command(tmp_path, small_demo):
    # the demo through the command line, into a --data_path it creates
    data_path = str(tmp_path / 'new' / 'data')
    data_utils.main(['--data_path', data_path, '--data_name', 'demo', '--seed', '1'])
    d = load(data_path, 'demo', 'uncropped')
    assert list(d['train']) == ['1', '2'] and list(d['test']) == ['3', '4']
    assert imaging.normalization('demo') == (imaging.IMAGENET_MEAN, imaging.IMAGENET_STD)
    with pytest.raises(UserError, match='--split applies to own'):
        data_utils.main(['--data_path', data_path, '--data_name', 'demo', '--split', '0.3'])
    # a file where the data folder should be: an error naming it, no traceback
    file = tmp_path / 'file'
    file.write_text('')
    with pytest.raises(UserError, match=re.escape(f'demo: cannot write the demo images to {file / "demo"}')):
        data_utils.main(['--data_path', str(file), '--data_name', 'demo'])
    with pytest.raises(UserError, match=re.escape(f'--data_path {file} is not a folder')):
        data_utils.main(['--data_path', str(file), '--data_name', 'car'])


def test_demo_redraw_interrupted_heals(tmp_path, monkeypatch, small_demo):
    root = str(tmp_path)
    seed0 = data_utils.process_dataset(root, 'demo', seed=0)
    drawn0 = tree_bytes(os.path.join(root, 'demo'))
    # Ctrl-C while drawing seed 1: the seed-0 demo and its lists stay whole and in use
    draw = demo._draw_demo_image
    calls = iter(range(5))
    monkeypatch.setattr(demo, '_draw_demo_image', lambda *a: draw(*a) if next(calls) < 4 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        data_utils.process_dataset(root, 'demo', seed=1)
    assert tree_bytes(os.path.join(root, 'demo')) == drawn0
    assert data_utils.load_data_dicts(root, 'demo', 'uncropped')[0] == seed0['uncropped']
    # killed while deleting the drawing it replaced (the old code: the seed-0 marker outlived its images)
    monkeypatch.setattr(demo, '_draw_demo_image', draw)
    rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        rmtree(os.path.join(path, 'images'))
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.shutil, 'rmtree', killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        data_utils.process_dataset(root, 'demo', seed=1)
    monkeypatch.setattr(demo.shutil, 'rmtree', rmtree)
    assert data_utils.process_dataset(root, 'demo', seed=0) == seed0
    assert tree_bytes(os.path.join(root, 'demo')) == drawn0 and sorted(os.listdir(root)) == ['.demo.lock', 'demo']


def test_demo_bad_targets(tmp_path, monkeypatch):
    (tmp_path / 'demo').write_text('a file, not a folder')
    with pytest.raises(UserError, match='demo: .*demo exists and was not made by this script'):
        data_utils.process_dataset(str(tmp_path), 'demo')
    assert not os.path.exists(tmp_path / 'demo.partial')  # refused before drawing anything

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(demo.Image.Image, 'save', disk_full)
    with pytest.raises(UserError, match=r'demo: cannot write the demo images to .*No space left on device'):
        data_utils.process_dataset(str(tmp_path / 'other'), 'demo')
    assert not os.path.exists(tmp_path / 'other' / 'demo')  # never looks complete


def test_demo_folder_linked_to_another_disk(tmp_path, small_demo):
    data, disk = tmp_path / 'data', tmp_path / 'disk'
    os.makedirs(disk / 'demo')
    data.mkdir()
    os.symlink(disk / 'demo', data / 'demo')
    root = str(data)
    data_utils.process_dataset(root, 'demo', seed=0)
    seed1 = data_utils.process_dataset(root, 'demo', seed=1)  # a redraw: into the link's target, the link kept
    assert os.readlink(data / 'demo') == str(disk / 'demo')
    assert sorted(os.listdir(data)) == ['.demo.lock', 'demo'] and os.listdir(disk) == ['demo']
    assert (disk / 'demo' / demo.DEMO_MARKER).read_text().startswith('seed 1 ')
    assert data_utils.process_dataset(root, 'demo', seed=1) == seed1  # later runs work
    assert data_utils.load_data_dicts(root, 'demo', 'uncropped')[0] == seed1['uncropped']
    assert seed1['uncropped']['train']['1'][0].startswith(os.path.join(root, 'demo', 'uncropped', ''))
    # links where the drawing and the replaced folder go (as an older version left them): removed, not followed
    keep = disk / 'keep'
    keep.mkdir()
    (keep / 'file').write_text('mine')
    other = tmp_path / 'other'
    other.mkdir()
    for leftover in ('demo.partial', 'demo.old'):
        os.symlink(keep, other / leftover)
    data_utils.process_dataset(str(other), 'demo', seed=2)
    assert sorted(os.listdir(other)) == ['.demo.lock', 'demo'] and os.listdir(keep) == ['file']
