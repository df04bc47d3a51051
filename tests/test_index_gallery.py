"""index.py --gallery_dir: a folder of photos becomes a gallery database tied to the model, with or without labels;
an interrupted run continues; unreadable files are listed and skipped; test.py and serve.py search the gallery."""
import csv
import os

import numpy as np
import pytest
import torch

from _query_fixtures import load_script, make_database, make_image, make_split, run_test_script
from _serve_fixtures import request, start_server, upload
from _train_fixtures import kill_groups
import index
import retrieval
import search

CPU = torch.device('cpu')
script = load_script()  # test.py



@pytest.fixture(scope='module')
def model_db(tmp_path_factory):
    """A tiny training database and its model (results/), and two photo folders: one with class sub-folders (and
    a damaged file), one flat."""
    root = tmp_path_factory.mktemp('gallery')
    paths, labels, _ = make_split(str(root / 'train'), ['1', '1', '2', '2', '3', '3'], seed=4)
    db_path, model = make_database(str(root / 'results'), (paths, labels))
    for i in range(4):
        make_image(str(root / 'sorted' / 'cats' / f'c{i}.png'), 100 + i)
        make_image(str(root / 'sorted' / 'dogs' / f'd{i}.jpg'), 200 + i)
        make_image(str(root / 'flat' / f'p{i}.png'), 300 + i)
    (root / 'sorted' / 'dogs' / 'broken.jpg').write_bytes(b'not a jpeg')
    return {'root': root, 'db': db_path, 'model': model, 'results': str(root / 'results')}


def run_index(argv, capsys):
    code, out, err = run_test_script(type('Script', (), {'main': staticmethod(index.main)}), argv, capsys)
    return code, out, err


def build(model_db, folder, capsys):
    code, out, err = run_index(['--data_base', model_db['db'], '--gallery_dir', str(model_db['root'] / folder),
                                '--results_dir', model_db['results'], '--device', 'cpu'], capsys)
    assert code == 0, err
    return out.strip().splitlines()[-1], err  # the last line is the path written


def test_gallery_of_class_folders_is_tied_to_the_model(model_db, capsys):
    path, err = build(model_db, 'sorted', capsys)
    assert path == os.path.join(model_db['results'], 'sorted_tiny_uncropped_resnet18_8_gallery.pth')
    assert 'broken.jpg' in err and '1 of 9 images' in err  # listed and skipped
    database = retrieval.open_database(path, model_db['results'], CPU)
    assert database.split == 'gallery' and len(database.images) == 8
    assert database.labels == ['cats'] * 4 + ['dogs'] * 4
    assert database.config['model_sha256'] == torch.load(model_db['db'], weights_only=True)['config']['model_sha256']
    for image, feature in zip(database.images, database.features):  # each as test.py embeds a query photo
        assert torch.allclose(feature, retrieval.embed_image(model_db['model'], image, database.config, CPU),
                              atol=1e-5)
    assert not os.path.exists(path + '.parts')  # the finished chunks are gone once the gallery is written


def test_flat_folder_gives_a_gallery_without_labels_test_py_searches(model_db, tmp_path, capsys):
    path, _ = build(model_db, 'flat', capsys)
    database = retrieval.open_database(path, model_db['results'], CPU)
    assert database.labels == [None] * 4
    out_dir = str(tmp_path / 'out')
    code, out, err = run_test_script(script, ['--query_dir', str(model_db['root'] / 'sorted' / 'cats'), '--data_base',
                                              path, '--retrieval_num', '3', '--results_dir', out_dir, '--device',
                                              'cpu'], capsys)
    assert code == 0, err
    with open(out.strip().splitlines()[-1].split('saved to ')[1]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r['label'] for r in rows} == {''}  # no labels: empty cells
    query = database.images[1]  # a gallery image: itself excluded, its stored feature
    code, out, err = run_test_script(script, ['--query_img_name', query, '--data_base', path, '--retrieval_num',
                                              '3', '--results_dir', out_dir, '--device', 'cpu'], capsys)
    assert code == 0, err
    expected, _ = search.top_k(database.features[1], database.features, 3, 1)
    assert [line.split()[-1] for line in out.splitlines() if line.startswith('   ')] == \
        [database.images[i] for i in expected]
    assert {'query_img.jpg', 'retrieval.png'} <= set(os.listdir(os.path.join(out_dir, 'p1')))


def test_interrupted_run_continues_where_it_stopped(model_db, tmp_path, capsys, monkeypatch):
    folder = tmp_path / 'many'
    for i in range(7):
        make_image(str(folder / f'x{i}.png'), 400 + i)
    argv = ['--data_base', model_db['db'], '--gallery_dir', str(folder), '--results_dir', str(tmp_path / 'r'),
            '--device', 'cpu']
    fresh_path, _ = build_elsewhere(argv, capsys)
    fresh = torch.load(fresh_path, weights_only=True)
    os.remove(fresh_path)
    monkeypatch.setattr(index, 'CHUNK', 3)
    embedded, original = [], retrieval.Database.embed_files

    def stop_after_two_chunks(self, paths, *args):
        if len(embedded) >= 6:
            raise KeyboardInterrupt
        embedded.extend(paths)
        return original(self, paths, *args)

    monkeypatch.setattr(retrieval.Database, 'embed_files', stop_after_two_chunks)
    code, _, err = run_index(argv, capsys)
    assert code == 130 and not os.path.exists(fresh_path)
    assert sorted(os.listdir(fresh_path + '.parts')) == ['000000.pth', '000001.pth']
    embedded.clear()
    monkeypatch.setattr(retrieval.Database, 'embed_files', lambda self, paths, *args: (embedded.extend(paths), original(
        self, paths, *args))[1])
    path, _ = build_elsewhere(argv, capsys)
    assert [os.path.basename(p) for p in embedded] == ['x6.png']  # only the unfinished chunk
    resumed = torch.load(path, weights_only=True)
    assert resumed['gallery_images'] == fresh['gallery_images']
    assert torch.allclose(resumed['gallery_features'], fresh['gallery_features'], atol=1e-6)


def build_elsewhere(argv, capsys):
    code, out, err = run_index(argv, capsys)
    assert code == 0, err
    return out.strip().splitlines()[-1], err


@pytest.mark.parametrize('case', ['empty', 'only_broken', 'missing'])
def test_bad_folders_are_one_line_and_write_nothing(case, model_db, tmp_path, capsys):
    folder = tmp_path / 'photos'
    if case != 'missing':
        folder.mkdir()
    if case == 'only_broken':
        (folder / 'a.png').write_bytes(b'\x89PNG broken')
    code, out, err = run_index(['--data_base', model_db['db'], '--gallery_dir', str(folder), '--results_dir',
                                str(tmp_path / 'r'), '--device', 'cpu'], capsys)
    expected = {'empty': 'holds no image', 'only_broken': 'could be read', 'missing': 'not found'}[case]
    assert code == 1 and expected in err.splitlines()[-1] and err.splitlines()[-1].startswith('error: ')
    assert 'Traceback' not in err
    assert not [f for f in os.listdir(tmp_path / 'r') if f.endswith('.pth')] if (tmp_path / 'r').exists() else True


def test_gallery_with_another_model_file_is_refused(model_db, tmp_path, capsys):
    path, _ = build(model_db, 'flat', capsys)
    gallery = torch.load(path, weights_only=True)
    gallery['config']['model_sha256'] = '0' * 64
    tampered = tmp_path / os.path.basename(path)  # elsewhere: its model file found by the relative path it records
    gallery['config']['model_file'] = os.path.relpath(os.path.join(model_db['results'], 'tiny_uncropped_resnet18_8_'
                                                                   'model.pth'), tmp_path)
    torch.save(gallery, tampered)
    with pytest.raises(retrieval.UserError, match='SHA-256 differs'):
        retrieval.open_database(str(tampered), str(tmp_path), CPU)


@pytest.mark.slow
def test_serve_searches_a_gallery_without_labels(model_db, capsys):
    path, _ = build(model_db, 'flat', capsys)
    database = retrieval.open_database(path, model_db['results'], CPU)
    proc, base = start_server(path)
    try:
        status, info = request(base + 'api/info')
        assert status == 200 and info['images'] == 4 and info['split'] == 'gallery'
        status, answer = request(f'{base}api/search?index=2&k=3')
        expected, scores = search.top_k(database.features[2], database.features, 3, 2)
        assert status == 200 and [hit['index'] for hit in answer['results']] == expected
        assert [hit['label'] for hit in answer['results']] == [None] * 3 and answer['query_label'] is None
        assert np.allclose([hit['score'] for hit in answer['results']], scores, atol=1e-6)
        with open(model_db['root'] / 'sorted' / 'cats' / 'c0.png', 'rb') as f:
            status, answer = upload(base, f.read(), k=2)
        assert status == 200 and len(answer['results']) == 2
        assert request(base)[0] == 200 and request(f'{base}images/0')[0] == 200
    finally:
        kill_groups([proc])
