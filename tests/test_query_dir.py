"""test.py --query_dir: one CSV for a folder of queries, each query's rows those of --query_img_name, batch
embedding equal to one at a time, unreadable images warned about and skipped, bad folders refused."""
import csv
import os
import re

import numpy as np
import pytest
import torch

from _data_fixtures import write_image
from _query_fixtures import run_test_script
from _serve_fixtures import expected, script
from _train_fixtures import out
import retrieval
import search

CPU = torch.device('cpu')


def run(argv, capsys):
    return run_test_script(script, argv, capsys)


@pytest.fixture(scope='module')
def queries(reference, tmp_path_factory):
    """A folder of queries: links to three database images (in a sub-folder), four outside photos (PNG, JPEG,
    grey), an unreadable 'photo' and a text file -> (folder, database path, database images linked)."""
    results, _ = reference
    db_path = out(results, 'data_base.pth')
    images = retrieval.open_database(db_path, str(results), CPU).images
    folder = tmp_path_factory.mktemp('holiday') / 'holiday'
    (folder / 'from_db').mkdir(parents=True)
    linked = [images[i] for i in (0, 5, 10)]
    for path in linked:
        os.symlink(path, folder / 'from_db' / os.path.basename(path))
    for i, name in enumerate(('a.png', 'b.jpg', 'deeper/c.png', 'deeper/d.jpeg')):
        write_image(str(folder / name), size=(36 + 4 * i, 30), mode='L' if i == 3 else 'RGB', seed=10 + i)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a JPEG')
    (folder / 'notes.txt').write_text('not an image, not a query\n')
    return folder, db_path, linked


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def test_one_csv_with_the_rows_of_query_img_name(queries, tmp_path, capsys):
    folder, db_path, linked = queries
    k = 4
    code, printed, err = run(['--query_dir', str(folder), '--data_base', db_path, '--retrieval_num', str(k),
                              '--results_dir', str(tmp_path), '--device', 'cpu'], capsys)
    assert code == 0, err
    target = tmp_path / f'holiday_top{k}.csv'
    assert printed.strip().endswith(f'saved to {target}')
    assert os.listdir(tmp_path) == [target.name]  # nothing else, no temporary file left
    rows = read_csv(target)
    assert rows[0] == ['query', 'rank', 'path', 'label', 'score']
    by_query = {}
    for row in rows[1:]:
        by_query.setdefault(row[0], []).append(row)
    expected_queries = sorted(str(folder / n) for n in ('a.png', 'b.jpg', 'deeper/c.png', 'deeper/d.jpeg')) + \
        [str(folder / 'from_db' / os.path.basename(p)) for p in linked]
    assert sorted(by_query) == sorted(expected_queries)
    warnings = re.findall(r'(?:^|\r)(warning: .*)', err, re.M)  # the progress bar shares stderr
    assert len(warnings) == 1 and warnings[0].startswith('warning: 1 of 8 images') and 'broken.jpg' in warnings[0]
    database = retrieval.open_database(db_path, os.path.dirname(db_path), CPU)
    for query, query_rows in by_query.items():  # each as test.py ranks it alone
        assert [int(r[1]) for r in query_rows] == list(range(1, k + 1))
        indices, scores, _ = expected(database, query, k)
        assert [(r[2], r[3]) for r in query_rows] == [(database.images[i], database.labels[i]) for i in indices]
        assert [float(r[4]) for r in query_rows] == pytest.approx(scores, abs=1e-5)
        if 'from_db' in query:  # a database image is not its own result
            assert os.path.realpath(query) not in [r[2] for r in query_rows]
    for query in (str(folder / 'b.jpg'), str(folder / 'from_db' / os.path.basename(linked[1]))):
        code, single, _ = run(['--query_img_name', query, '--data_base', db_path, '--retrieval_num', str(k),
                               '--results_dir', str(tmp_path / 'single'), '--device', 'cpu'], capsys)
        assert code == 0  # and its printout: the same rows
        shown = re.findall(r'^\s+\d+\s+(-?\d\.\d{4})\s+(\S+)\s+(\S+)$', single, re.M)
        assert [(r[2], r[3]) for r in by_query[query]] == [(path, label) for _, label, path in shown]
        assert [float(r[4]) for r in by_query[query]] == pytest.approx([float(s) for s, _, _ in shown], abs=5.1e-5)


def test_batch_embedding_equals_one_at_a_time(queries):
    folder, db_path, _ = queries
    database = retrieval.open_database(db_path, os.path.dirname(db_path), CPU)
    paths = retrieval.list_images(str(folder), '--query_dir')
    found, unreadable = script.embed_folder(database, paths, batch_size=3)  # batches of 3, 2 and a lone one
    assert [p for p, _ in unreadable] == [str(folder / 'broken.jpg')]
    outside = [(p, feature) for p, feature, exclude, label in found if label is None]
    assert len(outside) == 4
    for path, feature in outside:
        alone = retrieval.embed_image(database.model, path, database.config, CPU)
        assert torch.allclose(feature, alone, atol=1e-5)
        scores = [search.top_k(f, database.features, 5)[1] for f in (feature, alone)]
        assert np.allclose(*scores, atol=1e-5)


@pytest.mark.parametrize('case', ['empty', 'only_text', 'only_broken', 'missing', 'a_file', 'both_flags', 'k_big'])
def test_bad_folders_say_what_is_wrong(case, queries, tmp_path, capsys):
    _, db_path, _ = queries
    folder = tmp_path / 'q'
    folder.mkdir()
    argv = ['--query_dir', str(folder), '--data_base', db_path, '--results_dir', str(tmp_path / 'out')]
    expected = {'empty': 'holds no image', 'only_text': 'holds no image', 'only_broken': 'could be read',
                'missing': 'not found', 'a_file': 'is not a folder', 'k_big': 'asks for more images'}
    if case == 'only_text':
        (folder / 'readme.txt').write_text('hello')
    elif case == 'only_broken':
        (folder / 'x.png').write_bytes(b'\x89PNG broken')
    elif case == 'missing':
        argv[1] = str(tmp_path / 'nowhere')
    elif case == 'a_file':
        (tmp_path / 'one.png').write_bytes(b'')
        argv[1] = str(tmp_path / 'one.png')
    elif case == 'both_flags':
        with pytest.raises(SystemExit) as stop:
            script.parse_args(argv + ['--query_img_name', 'x.png'])
        assert stop.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err
        return
    elif case == 'k_big':
        write_image(str(folder / 'p.png'), seed=1)
        argv += ['--retrieval_num', '100']
    code, _, err = run(argv, capsys)
    assert code == 1 and expected[case] in err.splitlines()[-1] and err.splitlines()[-1].startswith('error: ')
    assert not (tmp_path / 'out').exists()  # nothing written
