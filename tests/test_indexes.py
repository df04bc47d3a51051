"""indexes.py: faiss index files and Milvus Lite collections give the exact search's top K (Flat, IVF with every
list probed, Milvus FLAT and IVF_FLAT), HNSW a high recall; an index of another database, a damaged file or an
unreachable server is one line, and nothing is left half-written; test.py and serve.py answer through an index as
they do without one."""
import csv
import os
import types

import pytest
import torch

from _query_fixtures import load_script, make_database, make_split, run_test_script, snapshot
from cli import UserError
import indexes
import retrieval
import search
import serve

faiss = pytest.importorskip('faiss')
LABELS = [str(i % 6) for i in range(48)]
K = 5


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 48-image, 6-class database (features [48, 24]) and a second one of the same images from another model."""
    root = tmp_path_factory.mktemp('indexes')
    paths, labels, _ = make_split(str(root / 'images'), LABELS, seed=3)
    db_path, _ = make_database(str(root / 'db'), (paths, labels))
    other_path, _ = make_database(str(root / 'other'), (paths, labels), seed=1)
    open_db = lambda path: retrieval.open_database(path, str(root), torch.device('cpu'), with_model=False)
    return types.SimpleNamespace(root=root, db=open_db(db_path), other=open_db(other_path), paths=paths)


def exact(db, q):
    return search.top_k(db.features[q], db.features, K, q, db.labels, db.labels[q])


def through(index, db, q):
    return indexes.top_k(index, db, db.features[q], K, q, db.labels[q])


def assert_exact(index, db):
    for q in range(len(db.images)):
        (found, scores), (wanted, wanted_scores) = through(index, db, q), exact(db, q)
        assert found == wanted
        assert scores == pytest.approx(wanted_scores, abs=1e-5)


@pytest.mark.parametrize('spec, nprobe', [('Flat', None), ('IVF4,Flat', 4)])
def test_flat_and_ivf_with_every_list_probed_give_the_exact_top_k(tiny, spec, nprobe):
    path = indexes.build(tiny.db, spec, nprobe=nprobe, progress=False)
    assert path == indexes.index_path(tiny.db.path, spec) and os.path.dirname(path) == os.path.dirname(tiny.db.path)
    index = indexes.open_index(path, tiny.db)
    assert spec in index.description and path in index.description
    assert_exact(index, tiny.db)
    scores, found = index.search(indexes.normalised(tiny.db.features, 0, 3), K)  # the raw interface: [3, K] each
    assert found.shape == scores.shape == (3, K) and list(found[:, 0]) == [0, 1, 2]


def test_hnsw_finds_the_nearest_neighbour_of_almost_every_query(tiny):
    index = indexes.open_index(indexes.build(tiny.db, 'HNSW8', efsearch=32, progress=False), tiny.db)
    hits = sum(through(index, tiny.db, q)[0][0] == exact(tiny.db, q)[0][0] for q in range(len(LABELS)))
    assert hits / len(LABELS) >= 0.9


def test_search_time_parameters_override_what_the_index_records(tiny):
    path = indexes.build(tiny.db, 'IVF4,Flat', nprobe=1, progress=False)
    assert 'nprobe 1' in indexes.open_index(path, tiny.db).description
    index = indexes.open_index(path, tiny.db, nprobe=4)  # every list: exact
    assert 'nprobe 4' in index.description and faiss.extract_index_ivf(index.index).nprobe == 4
    assert_exact(index, tiny.db)
    hnsw = indexes.open_index(indexes.build(tiny.db, 'HNSW8', progress=False), tiny.db, efsearch=48)
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == 48 and 'efsearch 48' in hnsw.description
    for target, options, message in ((path, {'efsearch': 8}, '--efsearch applies to an index with a graph'),
                                     (path, {'nprobe': 0}, '--nprobe must be between 1'),
                                     (None, {'nprobe': 4}, 'give --index too'),
                                     ('IVF4,Flat', {}, r'not found: IVF4,Flat \(a spec is built first: index.py')):
        with pytest.raises(UserError, match=message):
            indexes.open_index(target, tiny.db, **options)
    assert indexes.open_index(None, tiny.db) is None


def test_an_index_of_another_database_is_refused(tiny):
    path = indexes.build(tiny.other, 'Flat', progress=False)
    with pytest.raises(UserError, match=r'built from another database .* \(its SHA-256 differs\)'):
        indexes.open_index(path, tiny.db)


@pytest.mark.parametrize('damage, message', [
    (lambda data: data[:-7], 'damaged or truncated'),
    (lambda data: data[:-40] + bytes([data[-40] ^ 1]) + data[-39:], 'damaged or truncated'),
    (lambda data: b'PK\x03\x04' + data[4:], 'not a CLF index file'),
    (lambda data: data[:10], 'not a CLF index file'),
])
def test_a_damaged_index_file_is_one_line(tiny, tmp_path, damage, message):
    path = indexes.build(tiny.db, 'Flat', progress=False)
    broken = tmp_path / 'broken.faiss'
    broken.write_bytes(damage(open(path, 'rb').read()))
    with pytest.raises(UserError, match=message) as err:
        indexes.open_index(str(broken), tiny.db)
    assert '\n' not in str(err.value)


def test_bad_specs_and_parameters_write_nothing(tiny, monkeypatch):
    before = snapshot(os.path.dirname(tiny.db.path))
    for spec, options, message in (('IVF4,Nonsense', {}, 'not a faiss index_factory string'),
                                   ('IVF100,Flat', {}, 'need at least 100 gallery images'),
                                   ('Flat', {'nprobe': 4}, '--nprobe applies to an index with inverted lists'),
                                   ('Flat', {'nprobe': 0}, '--nprobe must be between 1')):
        with pytest.raises(UserError, match=message) as err:
            indexes.build(tiny.db, spec, progress=False, **options)
        assert '.cpp' not in str(err.value) and 'faiss::' not in str(err.value)  # faiss's reason, not its source line

    def fails_midway(index, writer, real=faiss.write_index):  # the disk fills as the index's last bytes go out
        real(index, writer)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(faiss, 'write_index', fails_midway)
    with pytest.raises(UserError, match='No space left'):
        indexes.build(tiny.db, 'Flat', progress=False)
    assert snapshot(os.path.dirname(tiny.db.path)) == before  # no index, no hidden temporary file


def test_milvus_lite_flat_and_ivf_flat_give_the_exact_top_k(tiny, tmp_path):
    pytest.importorskip('milvus_lite')
    target = str(tmp_path / 'gallery.db')
    for index_type, nprobe in (('FLAT', None), ('IVF_FLAT', len(LABELS))):  # nprobe = every list there can be
        assert indexes.build(tiny.db, target, nprobe=nprobe, milvus_index=index_type, progress=False) == target
        index = indexes.open_index(target, tiny.db)
        assert f'Milvus {index_type}' in index.description
        assert_exact(index, tiny.db)
        index.client.close()
    index = indexes.open_index(target, tiny.db, nprobe=3)  # search-time nprobe over the recorded one
    assert index.record['search'] == {'nprobe': 3} and '(nprobe 3)' in index.description
    index.client.close()
    with pytest.raises(UserError, match='--efsearch does not apply to a Milvus IVF_FLAT index'):
        indexes.open_index(target, tiny.db, efsearch=8)
    with pytest.raises(UserError, match='published from another database'):
        indexes.open_index(target, tiny.other)
    with pytest.raises(UserError, match='Milvus Lite .* builds no IVF_PQ'):  # it would publish one it cannot load
        indexes.build(tiny.db, str(tmp_path / 'pq.db'), milvus_index='IVF_PQ', progress=False)
    assert not (tmp_path / 'pq.db').exists()


def test_an_unreachable_milvus_is_one_line_and_writes_nothing(tiny, tmp_path):
    pytest.importorskip('pymilvus')
    for call in (lambda: indexes.open_index('milvus://127.0.0.1:1/x', tiny.db),
                 lambda: indexes.build(tiny.db, 'milvus://127.0.0.1:1/x', milvus_index='FLAT', progress=False)):
        with pytest.raises(UserError, match='cannot reach Milvus at milvus://127.0.0.1:1/x') as err:
            call()
        assert '\n' not in str(err.value)
    with pytest.raises(UserError, match='expected milvus://HOST:PORT/COLLECTION'):
        indexes.open_index('milvus://host/no-port', tiny.db)
    with pytest.raises(UserError, match='Milvus Lite file not found'):
        indexes.open_index(str(tmp_path / 'none.db'), tiny.db)
    assert not (tmp_path / 'none.db').exists()


def test_index_py_builds_an_index_and_prints_its_path_last(tiny, capsys):
    import index as index_script
    built = index_script.main(['--data_base', tiny.db.path, '--index', 'IVF2,Flat', '--nprobe', '2', '--device', 'cpu'])
    assert capsys.readouterr().out.splitlines()[-1] == built == indexes.index_path(tiny.db.path, 'IVF2,Flat')
    with pytest.raises(SystemExit):  # one mode at a time
        index_script.parse_args(['--data_base', tiny.db.path, '--index', 'Flat', '--gallery_dir', str(tiny.root)])


def test_test_py_and_serve_answer_through_an_index_as_without_one(tiny, tmp_path, capsys):
    path = indexes.build(tiny.db, 'Flat', progress=False)
    script = load_script()
    csvs = []
    for extra in ([], ['--index', path]):
        results = tmp_path / f'results{len(extra)}'
        code, out, err = run_test_script(script, ['--query_dir', str(tiny.root / 'images'), '--data_base',
                                                  tiny.db.path, '--retrieval_num', str(K), '--results_dir',
                                                  str(results)] + extra, capsys)
        assert code == 0, err
        csvs.append(list(csv.reader(open(results / f'images_top{K}.csv'))))
    assert [row[:4] for row in csvs[0]] == [row[:4] for row in csvs[1]] and 'searching faiss Flat' in out
    assert [float(row[4]) for row in csvs[1][1:]] == pytest.approx([float(row[4]) for row in csvs[0][1:]], abs=1e-6)
    served = retrieval.open_database(tiny.db.path, str(tmp_path), torch.device('cpu'))  # with its model, as serve.py
    plain, indexed = serve.Searcher(served), serve.Searcher(served, index=indexes.open_index(path, served))
    assert plain.info['search'] == 'exact search' and indexed.info['search'].startswith('faiss Flat')
    for q in (0, 7, 47):
        assert [r['index'] for r in indexed.search(K, q)['results']] == [r['index'] for r in plain.search(K, q)['results']]
    code, _, err = run_test_script(script, ['--query_dir', str(tiny.root / 'images'), '--data_base', tiny.other.path,
                                            '--index', path, '--results_dir', str(tmp_path / 'refused')], capsys)
    assert code == 1 and 'built from another database' in err and not (tmp_path / 'refused').exists()
    code, _, err = run_test_script(script, ['--data_base', tiny.db.path, '--index', path, '--nprobe', '2',
                                            '--results_dir', str(tmp_path / 'refused')], capsys)
    assert code == 1 and '--nprobe applies to an index with inverted lists' in err
