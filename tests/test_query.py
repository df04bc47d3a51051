"""test.py: top-K retrieval files, border colours, query by own photo, query/gallery search, bad input."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _query_fixtures import (IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, REPO, brute_force, load_script,
                             make_database, make_image, make_split, snapshot)
import utils  # after _query_fixtures, which puts the repo on sys.path
from utils import UserError, atomic_save, load_image, run_cli

script = load_script()
LABELS = ['1', '1', '1', '2', '2', '2', '3', '3', '3']
SCORE_FILE = re.compile(r'retrieval_img_(\d+)_(-?\d+\.\d{4})\.jpg$')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 9-image, 3-class database (query = each image against the other 8) and its model."""
    root = tmp_path_factory.mktemp('tiny')
    test = make_split(str(root / 'images'), LABELS, seed=1)
    db_path, model = make_database(str(root / 'db'), test)
    return {'root': root, 'db': db_path, 'model': model, 'paths': test[0], 'labels': test[1],
            'backgrounds': test[2], 'features': torch.load(db_path, weights_only=True)['test_features']}


def run(argv, capsys):
    """test.py's main through run_cli, as `python test.py ...` runs it: (exit status, stdout, stderr)."""
    try:
        run_cli(script.main, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def frame_colour(picture, background):
    """'green' / 'red' / 'none' from the pixels of the 8-px frame (mid-edge, 3 px in)."""
    samples = [picture[3, 112], picture[112, 3], picture[220, 112], picture[112, 220]]
    kinds = set()
    for r, g, b in samples:
        if g > 200 and r < 70 and b < 70:
            kinds.add('green')
        elif r > 200 and g < 70 and b < 70:
            kinds.add('red')
        elif max(abs(r - background[0]), abs(g - background[1]), abs(b - background[2])) < 25:
            kinds.add('none')
        else:
            kinds.add('other')
    assert len(kinds) == 1, kinds
    return kinds.pop()


def result_files(folder):
    """{rank: score} read back from the retrieval_img_* names, checking no other files are there."""
    ranks = {}
    for name in os.listdir(folder):
        m = SCORE_FILE.match(name)
        if m:
            ranks[int(m.group(1))] = float(m.group(2))
        else:
            assert name in ('query_img.jpg', 'retrieval.png'), name
    return ranks


def row_size(tiles, per_line=None):
    """Expected (width, height) of retrieval.png for `tiles` pictures (query included)."""
    per_line = per_line or script.ROW_MAX
    cols, lines = min(tiles, per_line), -(-tiles // per_line)
    return cols * 224 + (cols + 1) * script.PAD, lines * (224 + script.CAPTION + script.PAD) + script.PAD


def printed_ranking(out):
    """(rank, score, label, path) from the lines test.py prints."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            rows.append((int(parts[0]), float(parts[1]), parts[2], parts[3]))
    return rows


def test_query_in_database_matches_brute_force(tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    query = 4  # label '2': two same-class candidates (green) and six others (red) among the 8
    code, out, err = run(['--query_img_name', tiny['paths'][query], '--data_base', tiny['db'],
                          '--retrieval_num', '8', '--results_dir', str(results), '--device', 'cpu'], capsys)
    assert code == 0, err
    order, scores = brute_force(tiny['features'][query], tiny['features'], exclude=query)
    folder = results / os.path.splitext(os.path.basename(tiny['paths'][query]))[0]
    ranks = result_files(folder)
    assert sorted(ranks) == list(range(1, 9))
    assert len(os.listdir(folder)) == 10
    for rank, (i, score) in enumerate(zip(order, scores), start=1):
        assert ranks[rank] == pytest.approx(score, abs=5.1e-5)
        assert (folder / f'retrieval_img_{rank}_{score:.4f}.jpg').exists()
    assert [(r[0], r[3]) for r in printed_ranking(out)] == [(k + 1, tiny['paths'][i]) for k, i in enumerate(order)]

    colours = []
    for rank, i in enumerate(order, start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{ranks[rank]:.4f}.jpg')
        assert picture.shape == (224, 224, 3)
        colour = frame_colour(picture, tiny['backgrounds'][i])
        assert colour == ('green' if tiny['labels'][i] == '2' else 'red')
        colours.append(colour)
        # the tile is the retrieved image: its plain background shows just inside the frame
        assert np.abs(picture[20, 112] - np.array(tiny['backgrounds'][i])).max() < 25
    assert colours.count('green') == 2 and colours.count('red') == 6
    query_picture = pixels(folder / 'query_img.jpg')
    assert query_picture.shape == (224, 224, 3)
    assert frame_colour(query_picture, tiny['backgrounds'][query]) == 'none'

    row = Image.open(folder / 'retrieval.png')
    assert row.size == (9 * 224 + 10 * script.PAD, 224 + script.CAPTION + 2 * script.PAD) == row_size(9)
    row = np.asarray(row.convert('RGB')).astype(int)
    for k in range(9):  # tile k of the row: the query, then the results in rank order
        x = script.PAD + k * (224 + script.PAD)
        background = tiny['backgrounds'][query if k == 0 else order[k - 1]]
        assert np.abs(row[script.PAD + 20, x + 112] - np.array(background)).max() <= 2
    caption = row[script.PAD + 224:, :]
    assert (caption < 128).any()  # the labels and scores are written under the tiles


def test_query_by_own_photo_is_embedded_with_the_model(tiny, tmp_path, capsys):
    photo = str(tmp_path / 'mine' / 'my photo.jpg')
    make_image(photo, seed=77, size=57)
    results = tmp_path / 'results'
    code, out, err = run(['--query_img_name', photo, '--data_base', tiny['db'], '--retrieval_num', '3',
                          '--results_dir', str(results), '--device', 'cpu'], capsys)
    assert code == 0, err
    assert 'not in the database' in out

    # the feature test.py uses is the model's embedding of the photo after the database's test transform
    config = torch.load(tiny['db'], weights_only=True)['config']
    model, _ = script.load_model(config, tiny['db'])
    feature = script.embed_image(model, load_image(photo), config, torch.device('cpu'))
    with torch.no_grad():
        x = utils.test_transform(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)(load_image(photo)).unsqueeze(0)
        expected = tiny['model'].eval()(x)[0][0]
    assert feature.shape == (3 * 8,)
    assert torch.allclose(feature, expected, atol=1e-6)
    assert float(feature.norm()) == pytest.approx(1.0, abs=1e-5)

    order, scores = brute_force(expected, tiny['features'])  # nothing excluded: the photo is not in it
    folder = results / 'my photo'
    ranks = result_files(folder)
    assert sorted(ranks) == [1, 2, 3]
    for rank, (i, score) in enumerate(zip(order[:3], scores[:3]), start=1):
        assert ranks[rank] == pytest.approx(score, abs=5.1e-5)
        picture = pixels(folder / f'retrieval_img_{rank}_{ranks[rank]:.4f}.jpg')
        assert frame_colour(picture, tiny['backgrounds'][i]) == 'none'  # no label known: no frame
    assert [r[3] for r in printed_ranking(out)] == [tiny['paths'][i] for i in order[:3]]
    assert Image.open(folder / 'retrieval.png').size == row_size(4)


def test_query_gallery_database_searches_the_gallery(tmp_path, capsys):
    query = make_split(str(tmp_path / 'images'), ['a', 'b', 'c'], seed=2)
    gallery = make_split(str(tmp_path / 'images'), ['a', 'a', 'b', 'b', 'c', 'd'], seed=3)
    db_path, _ = make_database(str(tmp_path / 'db'), query, gallery, name='isc_uncropped')
    db = torch.load(db_path, weights_only=True)
    results = tmp_path / 'results'

    # a query-split image: its stored feature against the whole gallery (6 results possible, not 5)
    code, out, err = run(['--query_img_name', query[0][1], '--data_base', db_path, '--retrieval_num', '6',
                          '--results_dir', str(results)], capsys)
    assert code == 0, err
    order, scores = brute_force(db['test_features'][1], db['gallery_features'])
    assert [r[3] for r in printed_ranking(out)] == [gallery[0][i] for i in order]
    folder = results / os.path.splitext(os.path.basename(query[0][1]))[0]
    ranks = result_files(folder)
    assert [ranks[r] for r in range(1, 7)] == pytest.approx(scores, abs=5.1e-5)
    for rank, i in enumerate(order, start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{ranks[rank]:.4f}.jpg')
        assert frame_colour(picture, gallery[2][i]) == ('green' if gallery[1][i] == 'b' else 'red')

    # a gallery image as the query: searched among the other gallery images
    code, out, err = run(['--query_img_name', gallery[0][2], '--data_base', db_path, '--retrieval_num', '5',
                          '--results_dir', str(results)], capsys)
    assert code == 0, err
    order, _ = brute_force(db['gallery_features'][2], db['gallery_features'], exclude=2)
    assert [r[3] for r in printed_ranking(out)] == [gallery[0][i] for i in order]

    code, _, err = run(['--query_img_name', query[0][1], '--data_base', db_path, '--retrieval_num', '7',
                        '--results_dir', str(results)], capsys)
    assert code == 1 and '--retrieval_num 7' in err and '6 gallery images' in err


def test_data_base_name_is_looked_up_in_results_dir(tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    results.mkdir()
    for name in os.listdir(os.path.dirname(tiny['db'])):
        shutil.copy(os.path.join(os.path.dirname(tiny['db']), name), results / name)
    code, out, err = run(['--query_img_name', tiny['paths'][0], '--data_base', os.path.basename(tiny['db']),
                          '--retrieval_num', '2', '--results_dir', str(results)], capsys)
    assert code == 0, err
    assert str(results / os.path.basename(tiny['db'])) in out


def test_rerun_replaces_the_whole_previous_set(tiny, tmp_path, capsys, monkeypatch):
    results = tmp_path / 'results'
    argv = ['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--results_dir', str(results)]
    monkeypatch.setattr(script, 'ROW_MAX', 4)  # 7 tiles wrap onto two lines of 4
    assert run(argv + ['--retrieval_num', '6'], capsys)[0] == 0
    folder = results / os.path.splitext(os.path.basename(tiny['paths'][0]))[0]
    assert len(result_files(folder)) == 6
    assert Image.open(folder / 'retrieval.png').size == row_size(7, per_line=4) == (4 * 224 + 40, 2 * 276 + 8)
    assert run(argv + ['--retrieval_num', '2'], capsys)[0] == 0
    assert sorted(result_files(folder)) == [1, 2]  # no stale rank 3..6 files left from the first run
    assert sorted(os.listdir(results)) == [folder.name]  # no temporary folders left behind


def test_failed_write_leaves_previous_results_intact(tiny, tmp_path, capsys, monkeypatch):
    results = tmp_path / 'results'
    argv = ['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--results_dir', str(results)]
    assert run(argv + ['--retrieval_num', '4'], capsys)[0] == 0
    before = snapshot(results)
    calls = []

    def failing_write(data, path):  # the third file of the new set hits a full disk
        calls.append(path)
        if len(calls) == 3:
            raise UserError(f'cannot write {path}: No space left on device')
        return original(data, path)

    original = script.atomic_write_bytes
    monkeypatch.setattr(script, 'atomic_write_bytes', failing_write)
    code, _, err = run(argv + ['--retrieval_num', '2'], capsys)
    assert code == 1 and err.startswith('error: cannot write the results to') and err.count('\n') == 1
    assert snapshot(results) == before  # old set untouched, the half-written new one removed


def _mismatch(t, tiny, **overrides):
    """A copy of the tiny database whose config says `overrides` while its model file was saved without them."""
    folder = t / 'mismatch'
    shutil.copytree(os.path.dirname(tiny['db']), folder)
    db_path = str(folder / os.path.basename(tiny['db']))
    db = torch.load(db_path, weights_only=True)
    db['config'].update(overrides)
    dim = len(db['config']['branches']) * db['config']['feature_dim']
    db['test_features'] = torch.nn.functional.normalize(torch.randn(len(db['test_images']), dim), dim=1)
    atomic_save(db, db_path)  # structurally valid: only the model file disagrees
    return db_path


def _flag(flag, value, *expected):
    """A case that only changes one flag; `value` and `expected` texts may depend on the tmp folder."""
    def case(t, tiny):
        return [flag, value(t) if callable(value) else value], [e(t) if callable(e) else e for e in expected]
    return case


BAD_INPUTS = {  # case -> f(tmp folder, tiny) -> (flags to change, texts the message must hold)
    'missing database name': _flag('--data_base', 'nothing_data_base.pth',
                                   lambda t: str(t / 'results' / 'nothing_data_base.pth')),
    'missing database path': _flag('--data_base', lambda t: str(t / 'no' / 'db.pth'),
                                   lambda t: str(t / 'no' / 'db.pth')),
    'missing model file': lambda t, tiny: _without_model(t, tiny),
    'missing query image': _flag('--query_img_name', lambda t: str(t / 'none.jpg'), 'query image not found',
                                 lambda t: str(t / 'none.jpg')),
    'undecodable query image': lambda t, tiny: _garbage_query(t),
    'retrieval_num zero': _flag('--retrieval_num', '0', '--retrieval_num', 'positive'),
    'retrieval_num negative': _flag('--retrieval_num', '-2', '--retrieval_num', 'positive'),
    'retrieval_num over gallery': _flag('--retrieval_num', '9', '--retrieval_num 9',
                                        '8 test images besides the query'),
    'not a CLF database (keys)': lambda t, tiny: _saved(t, {'state_dict': torch.zeros(2)},
                                                        ['not a CLF feature database', 'test_images']),
    'not a CLF database (tensor)': lambda t, tiny: _saved(t, torch.zeros(3, 4),
                                                          ['not a CLF feature database', 'Tensor']),
    'not a CLF database (text)': lambda t, tiny: _text_database(t),
    'feature_dim differs': lambda t, tiny: _refused(t, tiny, {'feature_dim': 16},
                                                    ['feature_dim', 'database 16', 'model file 8']),
    'num_classes differs': lambda t, tiny: _refused(t, tiny, {'num_classes': 5},
                                                    ['num_classes', 'database 5', 'model file 3']),
    'branches differ': lambda t, tiny: _refused(t, tiny, {'branches': 'SM'}, ['branches', 'SM']),
    'backbone differs': lambda t, tiny: _refused(t, tiny, {'backbone_type': 'resnet50'},
                                                 ['backbone_type', 'database resnet50, model file resnet18']),
    'unknown backbone recorded': lambda t, tiny: _refused(t, tiny, {'backbone_type': 'vgg'},
                                                          ['vgg', 'cannot be built']),
    'zero std recorded': lambda t, tiny: _refused(t, tiny, {'std': [0.0, 0.2, 0.2]},
                                                  ['config std must be positive']),
    'database image missing': lambda t, tiny: _moved_image(t, tiny),
    'unknown device': _flag('--device', 'gpu7', "--device 'gpu7'"),
}


def _moved_image(t, tiny):
    """A database that lists an image which is no longer on disk (a dataset moved after training)."""
    db_path = _mismatch(t, tiny)
    db = torch.load(db_path, weights_only=True)
    db['test_images'][5] = str(t / 'gone.png')
    db['test_features'] = torch.load(tiny['db'], weights_only=True)['test_features']
    atomic_save(db, db_path)
    return ['--data_base', db_path, '--retrieval_num', '8'], ['database image not found', str(t / 'gone.png')]


def _without_model(t, tiny):
    folder = t / 'copy'
    folder.mkdir()
    db = folder / os.path.basename(tiny['db'])
    shutil.copy(tiny['db'], db)
    model = folder / torch.load(tiny['db'], weights_only=True)['config']['model_file']
    return ['--data_base', str(db)], ['model file not found', str(model)]


def _garbage_query(t):
    path = t / 'broken.jpg'
    path.write_bytes(b'\xff\xd8\xff\xe0 this is not really a JPEG')
    return ['--query_img_name', str(path)], [str(path)]


def _saved(t, obj, expected):
    atomic_save(obj, str(t / 'odd_data_base.pth'))
    return ['--data_base', str(t / 'odd_data_base.pth')], expected + [str(t / 'odd_data_base.pth')]


def _text_database(t):
    (t / 'notes_data_base.pth').write_text('just some text\n')
    return ['--data_base', str(t / 'notes_data_base.pth')], [str(t / 'notes_data_base.pth')]


def _refused(t, tiny, overrides, expected):
    db_path = _mismatch(t, tiny, **overrides)
    return ['--data_base', db_path], expected + [db_path]


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_message_exit_1_results_untouched(case, tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    stem = os.path.splitext(os.path.basename(tiny['paths'][0]))[0]
    (results / stem).mkdir(parents=True)
    (results / stem / 'retrieval_img_1_0.5000.jpg').write_bytes(b'earlier result')
    (results / 'other.txt').write_text('keep me')
    before = snapshot(results)
    changes, expected = BAD_INPUTS[case](tmp_path, tiny)
    argv = ['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--retrieval_num', '3',
            '--results_dir', str(results), '--device', 'cpu']
    for flag, value in zip(changes[::2], changes[1::2]):
        argv[argv.index(flag) + 1] = value
    code, out, err = run(argv, capsys)
    assert code == 1
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert 'Traceback' not in err
    for text in expected:
        assert text in err, (text, err)
    assert snapshot(results) == before


def test_command_line_error(tiny, tmp_path):
    """The script itself on a bad query: exit 1, exactly one line, no traceback, nothing written."""
    results = tmp_path / 'results'
    results.mkdir()
    (results / 'earlier.txt').write_text('keep me')
    before = snapshot(results)
    failed = subprocess.run([sys.executable, str(REPO / 'test.py'), '--data_base', tiny['db'], '--results_dir',
                             str(results), '--query_img_name', str(tmp_path / 'missing.jpg')],
                            capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 1
    assert failed.stderr == f'error: query image not found: {tmp_path / "missing.jpg"}\n'
    assert snapshot(results) == before


def test_database_written_by_train_py(tmp_path, capsys):
    """train.py (1 epoch, 32 px, CPU) -> test.py on its database (name looked up in --results_dir);
    then a copy of a test image as an own photo: embedded by test.py, it finds the original at 1.0."""
    from _data_fixtures import make_tiny_dataset
    data = make_tiny_dataset(tmp_path / 'data')
    results = tmp_path / 'R'
    train = subprocess.run([sys.executable, str(REPO / 'train.py'), '--data_path', str(data), '--data_name', 'tiny',
                            '--pretrained', 'none', '--num_epochs', '1', '--image_size', '32', '--batch_size', '8',
                            '--device', 'cpu', '--num_workers', '0', '--results_dir', str(results)],
                           capture_output=True, text=True, cwd=REPO)
    assert train.returncode == 0, train.stderr[-2000:]
    name = 'tiny_uncropped_resnet18_512_data_base.pth'
    db = torch.load(results / name, weights_only=True)
    query = 5
    code, out, err = run(['--query_img_name', db['test_images'][query], '--data_base', name, '--retrieval_num', '4',
                          '--results_dir', str(results)], capsys)
    assert code == 0, err
    order, scores = brute_force(db['test_features'][query], db['test_features'], exclude=query)
    assert [r[3] for r in printed_ranking(out)] == [db['test_images'][i] for i in order[:4]]
    folder = results / os.path.splitext(os.path.basename(db['test_images'][query]))[0]
    ranks = result_files(folder)
    assert [ranks[r] for r in range(1, 5)] == pytest.approx(scores[:4], abs=5.1e-5)
    for rank, i in enumerate(order[:4], start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{ranks[rank]:.4f}.jpg')
        same = db['test_labels'][i] == db['test_labels'][query]
        assert frame_colour(picture, (-100, -100, -100)) == ('green' if same else 'red')
    assert Image.open(folder / 'retrieval.png').size == row_size(5)

    photo = tmp_path / 'photos' / 'copy.jpg'
    photo.parent.mkdir()
    shutil.copy(db['test_images'][query], photo)
    code, out, err = run(['--query_img_name', str(photo), '--data_base', str(results / name), '--retrieval_num', '1',
                          '--results_dir', str(results), '--device', 'cpu'], capsys)
    assert code == 0, err
    (row,) = printed_ranking(out)
    assert row[3] == db['test_images'][query] and row[1] >= 0.9999  # same pixels, same preprocessing


def test_ranking_is_cosine_with_stable_ties():
    """Hand-worked: equal similarities keep database order; the excluded query never appears."""
    features = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-3.0, 0.0], [0.5, 0.0], [1.0, 1.0]])
    order, scores = script.rank_gallery(torch.tensor([4.0, 0.0]), features, exclude=2)
    assert order.tolist() == [0, 4, 5, 1, 3]
    assert scores.tolist() == pytest.approx([1.0, 1.0, 2 ** -0.5, 0.0, -1.0])
