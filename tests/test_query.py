"""test.py: top-K retrieval files, frames around the pictures, query by own photo, query/gallery search,
results folders it may and may not replace, bad input."""
import errno
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _query_fixtures import (IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, REPO, brute_force, copy_database, load_script,
                             make_database, make_image, make_split, run_test_script, snapshot)
from _train_fixtures import run_process
import retrieval
import search
import pictures
import files
import imaging

script = load_script()
LABELS = ['1', '1', '1', '2', '2', '2', '3', '3', '3']
SCORE_FILE = re.compile(r'retrieval_img_(\d+)_(-?\d+\.\d{4})\.jpg$')
GREEN, RED, WHITE = (0, 255, 0), (255, 0, 0), (255, 255, 255)
B = pictures.BORDER


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 9-image, 3-class database (query = each image against the other 8) and its model."""
    root = tmp_path_factory.mktemp('tiny')
    test = make_split(str(root / 'images'), LABELS, seed=1)
    db_path, model = make_database(str(root / 'db'), test)
    return {'root': root, 'db': db_path, 'model': model, 'paths': test[0], 'labels': test[1],
            'backgrounds': test[2], 'features': torch.load(db_path, weights_only=True)['test_features']}


def run(argv, capsys):
    return run_test_script(script, argv, capsys)


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def frame_colour(picture):
    """'green' / 'red' / 'white' from the middle of each side of a JPEG tile's frame (3 px in)."""
    names = {GREEN: 'green', RED: 'red', WHITE: 'white'}
    found = {name for p in (picture[3, 112], picture[112, 3], picture[220, 112], picture[112, 220])
             for colour, name in names.items() if np.abs(p - colour).max() < 40}
    assert len(found) == 1, found
    return found.pop()


def check_tile(row, index, colour, background):
    """Tile `index` of retrieval.png (lossless PNG): an exact frame of `colour`, BORDER px wide, with the
    picture's own edge (its plain background) just inside it, not painted over."""
    x, y = pictures.PAD + index * (224 + pictures.PAD), pictures.PAD
    t = row[y:y + 224, x:x + 224]
    for strip in (t[:B], t[-B:], t[:, :B], t[:, -B:]):
        assert (strip == colour).all()
    for edge in (t[B, B:-B], t[-B - 1, B:-B], t[B:-B, B], t[B:-B, -B - 1]):  # noise only in the middle
        assert (edge == background).all()


def result_files(folder):
    """{rank: score} read back from the retrieval_img_* names, checking no other files are there."""
    ranks = {}
    for name in os.listdir(folder):
        m = SCORE_FILE.match(name)
        if m:
            ranks[int(m.group(1))] = float(m.group(2))
        else:
            assert name in ('query_img.jpg', 'retrieval.png', files.MARKER), name
    return ranks


def row_size(tiles, per_line=None):
    """Expected (width, height) of retrieval.png for `tiles` pictures (query included)."""
    per_line = per_line or pictures.ROW_MAX
    cols, lines = min(tiles, per_line), -(-tiles // per_line)
    return cols * 224 + (cols + 1) * pictures.PAD, lines * (224 + pictures.CAPTION + pictures.PAD) + pictures.PAD


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
    order, scores = brute_force(tiny['features'][query], tiny['features'], query, tiny['labels'], '2')
    folder = results / stem(tiny['paths'][query])
    assert sorted(os.listdir(folder)) == sorted([files.MARKER, 'query_img.jpg', 'retrieval.png'] + [
        f'retrieval_img_{rank}_{score:.4f}.jpg' for rank, score in enumerate(scores, start=1)])
    assert result_files(folder) == pytest.approx(dict(enumerate(scores, start=1)), abs=5.1e-5)
    assert [(r[0], r[3]) for r in printed_ranking(out)] == [(k + 1, tiny['paths'][i]) for k, i in enumerate(order)]
    assert out.splitlines()[-1] == f'saved to {folder}/'

    expected = ['green' if tiny['labels'][i] == '2' else 'red' for i in order]
    assert expected.count('green') == 2
    for rank, (i, score) in enumerate(zip(order, scores), start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{score:.4f}.jpg')
        assert picture.shape == (224, 224, 3)
        assert frame_colour(picture) == expected[rank - 1]
        assert np.abs(picture[B + 2, 112] - tiny['backgrounds'][i]).max() < 25  # the picture starts inside
    query_picture = pixels(folder / 'query_img.jpg')
    assert query_picture.shape == (224, 224, 3) and frame_colour(query_picture) == 'white'

    row = Image.open(folder / 'retrieval.png')
    assert row.size == (9 * 224 + 10 * pictures.PAD, 224 + pictures.CAPTION + 2 * pictures.PAD) == row_size(9)
    row = np.asarray(row.convert('RGB')).astype(int)
    check_tile(row, 0, WHITE, tiny['backgrounds'][query])  # tile 0: the query, unframed (white)
    for k, i in enumerate(order, start=1):  # then the results in rank order
        check_tile(row, k, GREEN if expected[k - 1] == 'green' else RED, tiny['backgrounds'][i])
    caption = row[pictures.PAD + 224:, :]
    assert (caption < 128).any()  # the labels and scores are written under the tiles


def test_query_by_own_photo_is_embedded_with_the_model(tiny, tmp_path, capsys):
    photo = str(tmp_path / 'mine' / 'my photo.png')  # lossless: exact pixels to read back
    background = make_image(photo, seed=77, size=57)
    results = tmp_path / 'results'
    code, out, err = run(['--query_img_name', photo, '--data_base', tiny['db'], '--retrieval_num', '3',
                          '--results_dir', str(results), '--device', 'cpu'], capsys)
    assert code == 0, err
    model_path = os.path.join(os.path.dirname(tiny['db']), 'tiny_uncropped_resnet18_8_model.pth')
    assert out.splitlines()[0] == f'query {photo} (not in the database: embedded with {model_path}); ' \
                                  f'top 3 of 9 test images:'

    # the feature test.py uses is the model's embedding of the photo after the database's test transform
    db, _ = retrieval.load_database(tiny['db'])
    model, _ = retrieval.load_model(db, tiny['db'])
    feature = retrieval.embed_image(model, photo, db['config'], torch.device('cpu'))
    with torch.no_grad():
        x = imaging.eval_input(photo, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)[None]
        expected = tiny['model'].eval()(x)[0][0]
    assert feature.shape == (3 * 8,)
    assert torch.allclose(feature, expected, atol=1e-6)

    order, scores = brute_force(expected, tiny['features'])  # nothing excluded: the photo is not in it
    folder = results / 'my photo'
    assert result_files(folder) == pytest.approx(dict(enumerate(scores[:3], start=1)), abs=5.1e-5)
    assert [r[3] for r in printed_ranking(out)] == [tiny['paths'][i] for i in order[:3]]
    row = np.asarray(Image.open(folder / 'retrieval.png').convert('RGB')).astype(int)
    assert row.shape == row_size(4)[::-1] + (3,)
    for k, i in enumerate([None] + order[:3]):  # no label known: every tile framed in white
        check_tile(row, k, WHITE, background if i is None else tiny['backgrounds'][i])


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
    order, scores = brute_force(db['test_features'][1], db['gallery_features'], None, gallery[1], 'b')
    assert [r[3] for r in printed_ranking(out)] == [gallery[0][i] for i in order]
    folder = results / stem(query[0][1])
    ranks = result_files(folder)
    assert [ranks[r] for r in range(1, 7)] == pytest.approx(scores, abs=5.1e-5)
    for rank, i in enumerate(order, start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{ranks[rank]:.4f}.jpg')
        assert frame_colour(picture) == ('green' if gallery[1][i] == 'b' else 'red')

    # a gallery image as the query: searched among the other gallery images
    code, out, err = run(['--query_img_name', gallery[0][2], '--data_base', db_path, '--retrieval_num', '5',
                          '--results_dir', str(results)], capsys)
    assert code == 0, err
    order, _ = brute_force(db['gallery_features'][2], db['gallery_features'], 2, gallery[1], gallery[1][2])
    assert [r[3] for r in printed_ranking(out)] == [gallery[0][i] for i in order]

    code, _, err = run(['--query_img_name', query[0][1], '--data_base', db_path, '--retrieval_num', '7',
                        '--results_dir', str(results)], capsys)
    assert code == 1 and err == f'error: --retrieval_num 7 asks for more images than {db_path} can return ' \
                                f'(6 gallery images)\n'


def test_data_base_name_is_looked_up_in_results_dir(tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    shutil.copytree(os.path.dirname(tiny['db']), results)
    code, out, err = run(['--query_img_name', tiny['paths'][0], '--data_base', os.path.basename(tiny['db']),
                          '--retrieval_num', '2', '--results_dir', str(results)], capsys)
    assert code == 0, err
    assert f'feature from {results / os.path.basename(tiny["db"])})' in out


def test_rerun_replaces_the_whole_previous_set(tiny, tmp_path, capsys, monkeypatch):
    results = tmp_path / 'results'
    argv = ['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--results_dir', str(results)]
    monkeypatch.setattr(pictures, 'ROW_MAX', 4)  # 7 tiles wrap onto two lines of 4
    assert run(argv + ['--retrieval_num', '6'], capsys)[0] == 0
    folder = results / stem(tiny['paths'][0])
    assert sorted(result_files(folder)) == [1, 2, 3, 4, 5, 6]
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
            raise OSError(errno.ENOSPC, 'No space left on device')
        return original(data, path)

    original = files.write_temporary
    monkeypatch.setattr(files, 'write_temporary', failing_write)
    code, _, err = run(argv + ['--retrieval_num', '2'], capsys)
    assert code == 1 and err.startswith(f'error: cannot write {results}{os.sep}.') and err.count('\n') == 1
    assert 'No space left on device' in err
    assert snapshot(results) == before  # old set untouched, the half-written new one removed


@pytest.mark.parametrize('case', ['model file', 'folder of the user'])
def test_never_replaces_what_it_did_not_write(case, tiny, tmp_path, capsys):
    """A query named after the model file, and a same-named folder of the user's: both refused."""
    results = tmp_path / 'scratch'
    shutil.copytree(os.path.dirname(tiny['db']), results)
    if case == 'model file':
        victim = results / 'tiny_uncropped_resnet18_8_model.pth'
    else:
        victim = results / 'dataset_keep'
        victim.mkdir()
        (victim / 'retrieval.png').write_bytes(b'my own notes')  # looks like results, but no marker
    query = tmp_path / f'{victim.name}.png'
    shutil.copy(tiny['paths'][0], query)
    before = snapshot(results)
    code, out, err = run(['--query_img_name', str(query), '--data_base', tiny['db'], '--retrieval_num', '2',
                          '--results_dir', str(results)], capsys)
    assert (code, out) == (1, '')
    assert err == (f'error: {victim} exists and was not written by test.py (it holds no {files.MARKER}); nothing '
                   f'was removed: move it away, rename the query image or pass another --results_dir\n')
    assert snapshot(results) == before


def test_swapped_model_file_is_refused(tiny, tmp_path, capsys):
    """The database records its model's SHA-256, so another run's model file cannot slip in."""
    copy = copy_database(tiny['db'], str(tmp_path / 'run_a'), lambda db: None)
    other, _ = make_database(str(tmp_path / 'run_b'), (tiny['paths'], LABELS), seed=1)
    model_a = tmp_path / 'run_a' / 'tiny_uncropped_resnet18_8_model.pth'
    shutil.copy(tmp_path / 'run_b' / model_a.name, model_a)
    code, out, err = run(['--query_img_name', tiny['paths'][0], '--data_base', copy, '--results_dir',
                          str(tmp_path / 'results')], capsys)
    assert (code, out) == (1, '')
    assert err == (f'error: the model file {model_a} is not the one the database {copy} was written with (its '
                   f'SHA-256 differs); use the database and model file of the same training run\n')
    assert not (tmp_path / 'results').exists()


def test_missing_database_and_odd_queries_say_what_is_wrong(tiny, tmp_path, capsys):
    """What to train first; a folder or an undecodable file as the query said as such."""
    results, folder, broken = tmp_path / 'results', tmp_path / 'photos', tmp_path / 'broken.jpg'
    folder.mkdir()
    broken.write_bytes(b'\xff\xd8\xff\xe0 this is not really a JPEG')
    cases = {  # flag -> the whole message, as a regular expression
        ('--data_base', 'car_uncropped_resnet18_512_data_base.pth'): re.escape(
            f'database not found: {results}/car_uncropped_resnet18_512_data_base.pth; train the model first: '
            f'python train.py --data_name car --crop_type uncropped --backbone_type resnet18 --feature_dim 512 '
            f'--results_dir {results} (with your --data_path) writes it, or give --data_base the path of an '
            f'existing database'),
        ('--data_base', 'notes.pth'): re.escape(
            f'database not found: {results}/notes.pth (expected a ..._data_base.pth written by train.py)'),
        ('--query_img_name', str(folder)): re.escape(f'the query {folder} is a folder; give one image file'),
        ('--query_img_name', str(broken)):  # then Pillow's reason, which varies with its version
            re.escape(f'cannot decode image {broken}: ') + '.+' + re.escape(' (damaged, or not an image)'),
    }
    for (flag, value), message in cases.items():
        argv = {'--query_img_name': tiny['paths'][0], '--data_base': tiny['db'], '--results_dir': str(results)}
        argv[flag] = value
        code, out, err = run([x for item in argv.items() for x in item], capsys)
        assert (code, out) == (1, '') and re.fullmatch(f'error: {message}\n', err), err
    assert not results.exists()


def _flag(flag, value, *expected):
    """A case that only changes one flag; `value` and `expected` texts may depend on the tmp folder."""
    def case(t, tiny):
        return [flag, value(t) if callable(value) else value], [e(t) if callable(e) else e for e in expected]
    return case


def _changed(change, *expected):
    """A case run on a copy of the tiny database changed by change(db) (written by the same writer)."""
    def case(t, tiny):
        copy = copy_database(tiny['db'], str(t / 'copy'), change)
        return ['--data_base', copy], [str(t / 'copy'), *expected]  # names the database or its model
    return case


def _database_file(write, *expected):
    """A case whose --data_base is odd_data_base.pth as write(path) made it."""
    def case(t, tiny):
        write(t / 'odd_data_base.pth')
        return ['--data_base', str(t / 'odd_data_base.pth')], [str(t / 'odd_data_base.pth'), *expected]
    return case


def _without_model(t, tiny):
    shutil.copy(tiny['db'], t / 'lonely_data_base.pth')
    return ['--data_base', str(t / 'lonely_data_base.pth')], [
        f'model file not found: {t / "tiny_uncropped_resnet18_8_model.pth"}']


def _moved_image(t, tiny):
    gone = str(t / 'gone.png')  # the dataset moved after training
    return _changed(_set('test_images', 5, gone), 'database image not found', gone)(t, tiny)


def _set(key, index, value):
    def change(db):
        db[key][index] = value
    return change


BAD_INPUTS = {  # case -> f(tmp folder, tiny) -> (flags to change, texts the message must hold)
    'missing database path': _flag('--data_base', lambda t: str(t / 'no' / 'db.pth'),
                                   lambda t: f'database not found: {t / "no" / "db.pth"}'),
    'missing model file': _without_model,
    'missing query image': _flag('--query_img_name', lambda t: str(t / 'none.jpg'),
                                 lambda t: f'query image not found: {t / "none.jpg"}'),
    'retrieval_num zero': _flag('--retrieval_num', '0', '--retrieval_num must be a positive integer, got 0'),
    'retrieval_num negative': _flag('--retrieval_num', '-2', '--retrieval_num must be a positive integer, got -2'),
    'retrieval_num over gallery': _flag('--retrieval_num', '9', '--retrieval_num 9', '(8 test images besides '
                                                                                     'the query)'),
    'not a database (keys)': _database_file(lambda p: p.write_bytes(files.torch_bytes({'w': torch.zeros(2)})),
                                            'not a usable CLF feature database: missing test_images'),
    'not a database (tensor)': _database_file(lambda p: p.write_bytes(files.torch_bytes(torch.zeros(3))),
                                              'it holds a Tensor, not a dict'),
    'not a database (text)': _database_file(lambda p: p.write_text('some text\n'), 'not a PyTorch file'),
    'database is a FIFO': _database_file(os.mkfifo, 'is not a regular file'),
    'database is /dev/zero': _flag('--data_base', '/dev/zero', 'feature database /dev/zero is not a regular file'),
    'NaN feature': _changed(_set('test_features', (2, 0), float('nan')), 'NaN, infinite or all-zero'),
    'all-zero feature': _changed(_set('test_features', 5, 0.0), 'NaN, infinite or all-zero'),
    'num_classes recorded wrong': _changed(_set('config', 'num_classes', 5), 'model.pth',
                                           'classifier.1.weight [3, 24] (expected [5, 24])'),
    'unknown backbone recorded': _changed(_set('config', 'backbone_type', 'vgg'),
                                          "records model settings that cannot be built: unknown backbone 'vgg'"),
    'database image missing': _moved_image,
    'unknown device': _flag('--device', 'gpu7', "--device 'gpu7'"),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_message_exit_1_results_untouched(case, tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    earlier = results / stem(tiny['paths'][0])  # an earlier test.py result for this query: kept as it is
    earlier.mkdir(parents=True)
    (earlier / files.MARKER).write_bytes(files.MARKER_TEXT)
    (earlier / 'retrieval_img_1_0.5000.jpg').write_bytes(b'earlier result')
    (results / 'other.txt').write_text('keep me')
    before = snapshot(results)
    changes, expected = BAD_INPUTS[case](tmp_path, tiny)
    argv = ['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--retrieval_num', '8',
            '--results_dir', str(results), '--device', 'cpu']
    for flag, value in zip(changes[::2], changes[1::2]):
        argv[argv.index(flag) + 1] = value
    code, out, err = run(argv, capsys)
    assert (code, out) == (1, '')
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert snapshot(results) == before


@pytest.mark.slow
def test_command_line_error(tiny, tmp_path):
    """The one run of the script itself: a bad query gives exit 1, exactly one line, no traceback."""
    results = tmp_path / 'results'
    results.mkdir()
    (results / 'earlier.txt').write_text('keep me')
    failed = run_process([sys.executable, REPO / 'test.py', '--data_base', tiny['db'], '--results_dir', results,
                          '--query_img_name', tmp_path / 'missing.jpg'])
    assert (failed.returncode, failed.stdout) == (1, '')
    assert failed.stderr == f'error: query image not found: {tmp_path / "missing.jpg"}\n'
    assert os.listdir(results) == ['earlier.txt']


def test_database_written_by_train_py(reference, tmp_path, capsys):
    """The session's train.py run (conftest) -> test.py on its database; then a copy of a test image as
    an own photo: embedded by test.py with the saved model, it finds the original at cosine 1.0."""
    from _train_fixtures import out as train_output
    db_path = train_output(reference[0], 'data_base.pth')
    db, _ = retrieval.load_database(db_path)
    results, query = tmp_path / 'results', 5
    code, out, err = run(['--query_img_name', db['test_images'][query], '--data_base', db_path,
                          '--retrieval_num', '4', '--results_dir', str(results)], capsys)
    assert code == 0, err
    order, scores = brute_force(db['test_features'][query], db['test_features'], query, db['test_labels'],
                                db['test_labels'][query])
    assert [r[3] for r in printed_ranking(out)] == [db['test_images'][i] for i in order[:4]]
    folder = results / stem(db['test_images'][query])
    assert result_files(folder) == pytest.approx(dict(enumerate(scores[:4], start=1)), abs=5.1e-5)
    for rank, i in enumerate(order[:4], start=1):
        picture = pixels(folder / f'retrieval_img_{rank}_{scores[rank - 1]:.4f}.jpg')
        same = db['test_labels'][i] == db['test_labels'][query]
        assert frame_colour(picture) == ('green' if same else 'red')

    photo = tmp_path / 'photos' / 'copy.png'
    photo.parent.mkdir()
    shutil.copy(db['test_images'][query], photo)
    code, out, err = run(['--query_img_name', str(photo), '--data_base', db_path, '--retrieval_num', '1',
                          '--results_dir', str(results), '--device', 'cpu'], capsys)
    assert code == 0, err
    (row,) = printed_ranking(out)
    assert row[3] == db['test_images'][query] and row[1] >= 0.9999  # same pixels, same preprocessing


def test_ranking_is_cosine_with_ties_against_the_query():
    """Hand-worked: equal similarities put other-class items first when the query's label is known, else keep
    database order; the excluded query never appears."""
    features = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-3.0, 0.0], [0.5, 0.0], [1.0, 1.0]])
    order, scores = search.top_k(torch.tensor([4.0, 0.0]), features, 5, exclude=2)
    assert order == [0, 4, 5, 1, 3]
    assert scores == pytest.approx([1.0, 1.0, 2 ** -0.5, 0.0, -1.0])
    labels = ['a', 'b', 'a', 'b', 'b', 'a']  # 0 (a) and 4 (b) tie at 1.0 for a query of class a: 4 first
    order, scores = search.top_k(torch.tensor([4.0, 0.0]), features, 5, 2, labels, 'a')
    assert order == [4, 0, 5, 1, 3]
    assert scores == pytest.approx([1.0, 1.0, 2 ** -0.5, 0.0, -1.0])
    order, _ = search.top_k(torch.tensor([4.0, 0.0]), features, 5, 2, labels, 'b')  # class b: 0 first
    assert order == [0, 4, 5, 1, 3]


def test_tied_database_images_rank_against_the_query(tiny, tmp_path, capsys):
    def tie(db):  # image 3 (class 2) and image 8 (class 3) become copies of the query, image 4 (class 2)
        db['test_features'][3] = db['test_features'][8] = db['test_features'][4]

    copy = copy_database(tiny['db'], str(tmp_path / 'tied'), tie)
    code, out, err = run(['--query_img_name', tiny['paths'][4], '--data_base', copy, '--retrieval_num', '2',
                          '--results_dir', str(tmp_path / 'results'), '--device', 'cpu'], capsys)
    assert code == 0, err
    rows = printed_ranking(out)
    assert [(r[2], r[3]) for r in rows] == [('3', tiny['paths'][8]), ('2', tiny['paths'][3])]  # other class first
    assert rows[0][1] == rows[1][1] == 1.0
