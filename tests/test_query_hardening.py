"""test.py's query paths hardened (issue 24): folders with pipes and device links, collapsed maps, EXIF
orientation, links to database images, spreadsheet-safe CSV cells, a readable embedding map, and data-dict
messages that suggest what works."""
import csv
import io
import itertools
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _query_fixtures import REPO, copy_database, load_script, make_database, make_image, make_split
from _train_fixtures import run_process
import data_utils
import files
import batches
import imaging
import pictures
import retrieval
import search
from cli import UserError

script = load_script()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A database of 6 test images (3 classes) and its model: (database path, image paths, labels)."""
    folder = tmp_path_factory.mktemp('tiny')
    paths, labels, _ = make_split(str(folder / 'images'), ['a', 'a', 'b', 'b', 'c', 'c'], seed=5)
    db_path, _ = make_database(str(folder), (paths, labels))
    return db_path, paths, labels


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def run_subprocess(argv):
    """`python test.py ARGV` in its own process group (killed whole in the end) -> CompletedProcess."""
    return run_process([sys.executable, REPO / 'test.py', *argv])


# ---- item 3: --query_dir lists only regular files within a size limit --------------------------------------

def plant_non_files(folder):
    """A FIFO named fifo.jpg and a link zero.jpg -> /dev/zero beside one real image -> (image, fifo, zero)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, fifo, zero = folder / 'good.png', folder / 'fifo.jpg', folder / 'zero.jpg'
    make_image(str(image), seed=11)
    os.mkfifo(fifo)
    os.symlink('/dev/zero', zero)
    return str(image), str(fifo), str(zero)


def test_list_images_skips_pipes_devices_and_oversized_files_unread(tmp_path, monkeypatch):
    image, fifo, zero = plant_non_files(tmp_path / 'q')
    big = tmp_path / 'q' / 'big.png'
    big.write_bytes(b'\x89PNG' + bytes(5000))
    monkeypatch.setattr(files, 'IMAGE_FILE_LIMIT', 4096, raising=False)
    listed = retrieval.list_images(str(tmp_path / 'q'), '--query_dir')
    assert listed == sorted([str(big), fifo, image, zero])
    found, skipped = retrieval.regular_images(listed)  # returns at once: nothing is opened
    assert found == [image]
    reasons = dict(skipped)
    assert sorted(reasons) == sorted([fifo, zero, str(big)])
    assert reasons[fifo] == f'image {fifo} is not a regular file (a folder, pipe or device?)'
    assert reasons[zero] == f'image {zero} is not a regular file (a folder, pipe or device?)'
    assert reasons[str(big)] == f'image {big} is 5,004 bytes, more than the 4,096 an image file may have'
    # --query_img_name makes the same check (one owner: files.check_image_file)
    with pytest.raises(UserError, match='is 5,004 bytes, more than the 4,096'):
        script.load_query(str(big))
    with pytest.raises(UserError, match='is not a regular file'):
        script.load_query(zero)


@pytest.mark.slow
def test_query_dir_with_a_fifo_and_a_dev_zero_link_finishes_and_names_both(tiny, tmp_path):
    db_path, _, _ = tiny
    image, fifo, zero = plant_non_files(tmp_path / 'q')
    run = run_subprocess(['--query_dir', str(tmp_path / 'q'), '--data_base', db_path, '--results_dir',
                          str(tmp_path / 'out'), '--retrieval_num', '2', '--device', 'cpu'])  # a hang: the ceiling
    assert run.returncode == 0, run.stderr
    warning = [line for line in run.stderr.splitlines() if line.startswith('warning:')]
    assert len(warning) == 1 and 'warning: 2 of 3 images under' in warning[0]
    assert f'image {fifo} is not a regular file' in warning[0] and f'image {zero} is not a regular file' in warning[0]
    rows = read_rows(tmp_path / 'out' / 'q_top2.csv')
    assert [r['query'] for r in rows] == [image, image]


# ---- item 4: collapsed embeddings ---------------------------------------------------------------------------

def test_check_spread_refuses_identical_and_near_identical_embeddings():
    base = torch.randn(24, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    for features in (base.repeat(40, 1), base + 1e-9 * noise, base + torch.linspace(0, 1e-9, 40)[:, None] * noise[0]):
        with pytest.raises(UserError, match=r'^the embeddings have collapsed: the 40 test features of db\.pth are '
                                            r'identical or lie on one line .*; no map is drawn$'):
            pictures.check_spread(features, 'db.pth')
    pictures.check_spread(base + 0.01 * noise, 'db.pth')  # spread: no error


@pytest.mark.slow
def test_embedding_map_of_a_collapsed_model_is_one_line_not_a_crash(tiny, tmp_path):
    db_path, _, _ = tiny
    collapsed = copy_database(db_path, str(tmp_path), lambda db: db.update(
        test_features=db['test_features'][:1].repeat(len(db['test_features']), 1)))
    run = run_subprocess(['--data_base', collapsed, '--embedding_map', '--results_dir', str(tmp_path / 'out')])
    assert run.returncode == 1, (run.returncode, run.stderr)  # a segfault is -11
    assert run.stderr == (f'error: the embeddings have collapsed: the 6 test features of {collapsed} are identical '
                          f'or lie on one line (a model that has not learnt, or a diverged one?); no map is drawn\n')
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


# ---- item 9: queries honour the EXIF orientation tag --------------------------------------------------------

def rotated_pair(folder):
    """phone.jpg: pixels stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view), and
    upright.png: the same decoded pixels already turned, losslessly -> (phone, upright)."""
    rng = np.random.default_rng(3)
    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[:, :40] = rng.integers(0, 256, 3)  # left half one colour, right half noise: no symmetry
    pixels[:, 40:] = rng.integers(0, 256, (48, 40, 3))
    phone, upright = str(folder / 'phone.jpg'), str(folder / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF's orientation tag
    Image.fromarray(pixels).save(phone, quality=95, exif=exif)
    with Image.open(phone) as stored:
        stored.load()
        stored.transpose(Image.Transpose.ROTATE_270).save(upright)  # orientation 6 = ROTATE_270 to view
    return phone, upright


def test_a_query_with_an_exif_orientation_embeds_as_the_upright_image(tiny, tmp_path):
    db_path, _, _ = tiny
    phone, upright = rotated_pair(tmp_path)
    database = retrieval.open_database(db_path, str(tmp_path), torch.device('cpu'))
    turned, reference = database.embed_file(phone), database.embed_file(upright)
    assert torch.allclose(turned, reference, atol=1e-5), (turned - reference).abs().max()
    # an upload's bytes (serve.py) and test.py's picture of the query are turned as well
    with open(phone, 'rb') as f:
        data = f.read()
    assert torch.allclose(imaging.eval_input('the upload', 32, (0.5,) * 3, (0.25,) * 3, data),
                          imaging.eval_input(upright, 32, (0.5,) * 3, (0.25,) * 3), atol=1e-5)
    assert script.load_query(phone).size == (48, 80)
    # the database and training path keeps the stored pixels, as the original did
    assert tuple(imaging.load_image_uint8(phone).shape) == (3, 48, 80) and imaging.load_image(phone).size == (80, 48)
    stored_pixels = imaging.resize_uint8(imaging.load_image_uint8(phone), 32)
    assert torch.equal(batches.ImageListDataset({'x': [phone]}, 32)[0][0], stored_pixels)
    stored = imaging.eval_input(phone, 32, (0.5,) * 3, (0.25,) * 3, upright=False)
    assert not torch.allclose(stored, imaging.eval_input(upright, 32, (0.5,) * 3, (0.25,) * 3), atol=0.1)


def test_query_dir_scores_a_turned_photo_as_its_upright_copy(tiny, tmp_path):
    db_path, _, _ = tiny
    folder = tmp_path / 'q'
    folder.mkdir()
    phone, upright = rotated_pair(folder)
    target = script.main(['--query_dir', str(folder), '--data_base', db_path, '--results_dir', str(tmp_path / 'o'),
                          '--retrieval_num', '3', '--device', 'cpu'])
    rows = read_rows(target)
    turned = [(r['path'], float(r['score'])) for r in rows if r['query'] == phone]
    reference = [(r['path'], float(r['score'])) for r in rows if r['query'] == upright]
    assert [p for p, _ in turned] == [p for p, _ in reference]
    assert np.allclose([s for _, s in turned], [s for _, s in reference], atol=1e-5)


# ---- item 10: a link to a database image under another name is that image ----------------------------------

def test_links_to_database_images_under_other_names_are_matched_by_file_identity(tiny, tmp_path, monkeypatch):
    db_path, paths, labels = tiny
    folder = tmp_path / 'q'
    folder.mkdir()
    os.symlink(paths[2], folder / 'renamed_link.png')
    os.link(paths[4], folder / 'renamed_hard.png')
    database = retrieval.open_database(db_path, str(tmp_path), torch.device('cpu'))
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(retrieval.os, 'stat', lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    assert database.locate(str(folder / 'renamed_link.png'))[0] == 2
    assert database.locate(str(folder / 'renamed_hard.png'))[0] == 4
    assert database.locate(str(folder / 'renamed_hard.png'))[2] == labels[4]
    assert len(stats) == len(paths) + 3  # the database's images once (lazily), then one stat per query
    monkeypatch.undo()

    target = script.main(['--query_dir', str(folder), '--data_base', db_path, '--results_dir', str(tmp_path / 'o'),
                          '--retrieval_num', '5', '--device', 'cpu'])
    rows = read_rows(target)
    for name, index in (('renamed_link.png', 2), ('renamed_hard.png', 4)):
        mine = [r for r in rows if r['query'] == str(folder / name)]
        assert len(mine) == 5 and paths[index] not in [r['path'] for r in mine]  # never itself at rank 1
        expected, scores = search.top_k(database.features[index], database.features, 5, index, labels,
                                           labels[index])  # the stored feature, as --query_img_name on the image
        assert [r['path'] for r in mine] == [paths[i] for i in expected]
        assert np.allclose([float(r['score']) for r in mine], scores, atol=1e-6)


# ---- item 11: CSV cells a spreadsheet would read as formulas ------------------------------------------------

def test_csv_cells_starting_like_a_formula_are_written_as_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names, so that a cell starts with the file's own name
    paths, labels, _ = make_split('=images', ['=1+1', '@x', '-2', 'plain'], seed=7)
    db_path, _ = make_database('db', (paths, labels))
    os.makedirs('+queries')
    make_image(os.path.join('+queries', '=cmd.png'), seed=99)
    target = script.main(['--query_dir', '+queries', '--data_base', db_path, '--results_dir', 'out',
                          '--retrieval_num', '3', '--device', 'cpu'])
    with open(target, newline='') as f:
        rows = list(csv.reader(f))[1:]
    assert {r[0] for r in rows} == {"'+queries/=cmd.png"}
    assert all(r[2].startswith("'=images/") for r in rows)
    assert {r[3] for r in rows} <= {"'=1+1", "'@x", "'-2", 'plain'} and len({r[3] for r in rows}) == 3
    assert all(float(r[4]) == float(r[4]) and not r[4].startswith("'") for r in rows)  # numbers stay numbers
    assert script.as_text('\tx') == "'\tx" and script.as_text('a=b') == 'a=b'


# ---- item 20: a readable embedding map ----------------------------------------------------------------------

def solid_block(mask, side):
    """Whether a boolean picture mask [H, W] holds a side x side square that is all True."""
    sums = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side] + sums[:-side, :-side]
    return bool((windows == side * side).any())


def test_embedding_map_fits_the_points_tells_classes_apart_and_labels_them():
    rng = np.random.default_rng(0)
    labels = [f'class{c}' for c in range(24) for _ in range(5)]
    # a wide, flat cloud: 24 clusters along x, little spread in y
    coordinates = np.array([[10.0 * c + rng.normal(), rng.normal()] for c in range(24) for _ in range(5)])
    thumbnails = [Image.new('RGB', (pictures.THUMB - 2 * pictures.FRAME,) * 2, (200, 200, 200))] * len(labels)
    with Image.open(io.BytesIO(pictures.draw_embedding_map(coordinates, thumbnails, labels))) as picture:
        pixels = np.asarray(picture.convert('RGB'))
    assert len(pixels) < pictures.MAP_SIDE / 4  # the canvas fits the points: a wide cloud gives a wide picture
    corners, (width, height) = pictures.map_layout(coordinates)
    assert width == pictures.MAP_SIDE and height <= len(pixels)
    assert pixels.shape[1] == width + 2 * pictures.LEGEND_COLUMN  # 24 classes: two legend columns of 16 rows
    area = pixels[:height, :width]
    drawn = np.argwhere((area != 255).any(-1))  # the points' area: its non-white pixels span it
    assert drawn.min(0).tolist() <= [pictures.MAP_MARGIN] * 2
    assert drawn.max(0).tolist() >= [height - pictures.MAP_MARGIN - 1, width - pictures.MAP_MARGIN - 1]
    colours = pictures.class_colours(labels)
    assert len(set(colours.values())) == 24  # distinct classes, distinct colours, far apart
    assert min(pictures._distance(a, b) for a, b in itertools.combinations(colours.values(), 2)) > 120
    for label, colour in colours.items():  # each class's swatch in the legend, right of the points
        assert solid_block((pixels[:, width:] == colour).all(-1), 16), label
        assert (area == colour).all(-1).sum() >= 5 * 4 * (pictures.THUMB - pictures.FRAME), label  # the frames


# ---- item 21: data-dict messages suggest what works ---------------------------------------------------------

def test_a_mistyped_dataset_name_suggests_the_near_name_not_a_failing_command(tmp_path):
    (tmp_path / 'demo').mkdir()
    (tmp_path / 'holiday_photos').mkdir()
    for typo, meant in (('dmeo', 'demo'), ('holiday_photo', 'holiday_photos'), ('cubb', 'cub')):
        with pytest.raises(UserError) as err:
            data_utils.load_data_dicts(str(tmp_path), typo, 'uncropped')
        assert str(err.value).startswith(f"unknown dataset {typo!r}: {tmp_path / typo} is not a folder; did you "
                                         f"mean --data_name {meant}? (known datasets: car, cub, sop, isc, demo; "
                                         f"folders in {tmp_path}: demo, holiday_photos)"), str(err.value)
        assert f'--data_name {typo}`' not in str(err.value)
    with pytest.raises(UserError, match=r"--crop_type 'croped': expected one of uncropped, cropped \(did you mean "
                                        r"cropped\?\)"):
        data_utils.load_data_dicts(str(tmp_path), 'demo', 'croped')


def test_cropped_on_an_own_folder_suggests_uncropped_not_data_utils(tmp_path):
    own = tmp_path / 'mine'
    own.mkdir()
    path = data_utils.data_dict_path(str(tmp_path), 'mine', 'cropped')
    command = f'`python data_utils.py --data_path {tmp_path} --data_name mine`'
    with pytest.raises(UserError) as err:
        data_utils.load_data_dicts(str(tmp_path), 'mine', 'cropped')
    assert str(err.value) == (f'data dict not found: {path}; mine has no bounding boxes, so data_utils.py makes only '
                              f'uncropped lists for it (cropped ones exist for car, cub, demo): use --crop_type '
                              f'uncropped, after {command}')
    torch.save({'train': {'a': ['x']}, 'test': {'b': ['y']}}, data_utils.data_dict_path(str(tmp_path), 'mine',
                                                                                    'uncropped'))
    with pytest.raises(UserError) as err:
        data_utils.load_data_dicts(str(tmp_path), 'mine', 'cropped')
    assert str(err.value).endswith('use --crop_type uncropped') and 'run `python' not in str(err.value)


def test_embedding_map_with_a_query_is_drawn_as_well(tiny, tmp_path, monkeypatch):
    db_path, paths, _ = tiny
    drawn = []
    monkeypatch.setattr(script, 'write_embedding_map', lambda *args: drawn.append(args) or 'map.png')
    target = script.main(['--data_base', db_path, '--embedding_map', '--query_img_name', paths[0], '--results_dir',
                          str(tmp_path), '--retrieval_num', '2', '--device', 'cpu'])
    assert target == os.path.join(str(tmp_path), os.path.splitext(os.path.basename(paths[0]))[0])
    assert len(drawn) == 1 and drawn[0][1:] == (str(tmp_path), 1500, 0)
