"""Searches through rerank.Reranker: a query from outside the gallery answers as that query evaluated together with the
gallery, without encoding the whole gallery; test.py --query_img_name and --query_dir and serve.py give its
answers; --tune on a run with validation features chooses without the test labels."""
import csv
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import rerank
import rerank_eval
import retrieval
import serve
from _query_fixtures import load_script, make_image, run_test_script
from _train_fixtures import out

CPU = torch.device('cpu')


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def evaluated_together(query, gallery, params):
    """The query's reordered candidates and distances as the evaluation builds them for the set [query; gallery]."""
    length, depth = rerank.list_length(params), params['depth']
    lists = rerank.merged_lists(rerank.neighbour_lists(gallery, None, length), gallery, query[None], length)
    _, cand = rerank.neighbour_lists(query[None], gallery, depth)
    distances = rerank.kreciprocal(torch.cat([query[None], gallery]), rerank.graph(lists), torch.tensor([0]), cand + 1,
                                   params['k1'], params['k2'], params['lambda'])[0]
    order = torch.argsort(distances, stable=True)
    return cand[0][order].tolist(), (1 - distances[order]).tolist()


@pytest.mark.parametrize('size', [300, 40])  # lists shorter than the gallery; lists covering it
def test_outside_query_equals_it_evaluated_with_the_gallery(size, monkeypatch):
    gallery, params = unit(size, 16, 0), rerank.parse_args('kreciprocal', 'k1=10,k2=3,lambda=0.3,depth=30')
    reranker = rerank.Reranker('kreciprocal', params, gallery, None)
    encoded, encode = [], rerank._encode
    monkeypatch.setattr(rerank, '_encode', lambda *a: encoded.append(len(a[2])) or encode(*a))
    for query in unit(5, 16, 1):
        indices, scores = reranker.top_k(query, 30)
        expected_indices, expected_scores = evaluated_together(query, gallery, params)
        assert indices == expected_indices
        assert scores == pytest.approx(expected_scores, abs=1e-6)
    if size == 300:  # the items its distances read, not the gallery
        assert max(encoded) < size / 2


def test_gallery_query_uses_the_gallery_graph_and_aqe_batch_equals_one_at_a_time():
    gallery = unit(120, 8, 2)
    kre = rerank.Reranker('kreciprocal', rerank.parse_args('kreciprocal', 'k1=6,k2=2,depth=20'), gallery, None)
    params = kre.params
    lists = rerank.neighbour_lists(gallery, None, rerank.list_length(params))
    distances = rerank.kreciprocal(gallery, rerank.graph(lists), torch.tensor([7]), lists[1][7:8, :20], 6, 2, 0.3)[0]
    assert kre.top_k(gallery[7], 20, exclude=7)[0] == lists[1][7][torch.argsort(distances, stable=True)].tolist()
    aqe = rerank.Reranker('aqe', rerank.parse_args('aqe', 'k=3'), gallery, None)
    queries = torch.cat([unit(3, 8, 3), gallery[:2]])
    batch = aqe.top_k_batch(queries, 5, [None, None, None, 0, 1])
    for i, exclude in enumerate([None, None, None, 0, 1]):
        assert aqe.top_k(queries[i], 5, exclude)[0] == batch[0][i].tolist()


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('outside')
    for i in range(3):
        make_image(str(folder / f'photo_{i}.png'), seed=20 + i)
    return folder


ARGS = ('--rerank', 'kreciprocal', '--rerank_args', 'k1=3,k2=2,lambda=0.2,depth=12')


def expected_answer(database, path, k):
    reranker = rerank_eval.for_database(ARGS[1], ARGS[3], database)
    exclude, feature, label = database.locate(path)
    if feature is None:
        feature = retrieval.embed_image(database.model, path, database.config, CPU)
    return reranker.top_k(feature, k, exclude, label)


def test_query_img_name_query_dir_and_serve_search_through_the_method(reference, photos, tmp_path, capsys):
    results, _ = reference
    db_path, script, k = out(results, 'data_base.pth'), load_script(), 6
    database = retrieval.open_database(db_path, str(results), CPU)
    plain = rerank_eval.for_database('none', None, database)
    changed = False
    for path in (str(photos / 'photo_0.png'), database.images[4]):
        indices, scores = expected_answer(database, path, k)
        code, printed, err = run_test_script(script, ['--query_img_name', path, '--data_base', db_path,
                                                      '--retrieval_num', str(k), '--results_dir', str(tmp_path),
                                                      '--device', 'cpu', *ARGS], capsys)
        assert code == 0, err
        rows = re.findall(r'^\s+\d+\s+(-?\d\.\d{4})\s+\S+\s+(\S+)$', printed, re.M)
        assert [row[1] for row in rows] == [database.images[i] for i in indices]
        assert [float(row[0]) for row in rows] == pytest.approx(scores, abs=5.1e-5)
        exclude, feature, label = database.locate(path)
        feature = database.embed_file(path) if feature is None else feature
        changed |= plain.top_k(feature, k, exclude, label) != (indices, scores)
    assert changed  # the method did something to these answers
    code, _, err = run_test_script(script, ['--query_dir', str(photos), '--data_base', db_path, '--retrieval_num',
                                            str(k), '--results_dir', str(tmp_path), '--device', 'cpu', *ARGS], capsys)
    assert code == 0, err
    with open(tmp_path / f'{photos.name}_top{k}.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    for name in ('photo_0.png', 'photo_2.png'):
        indices, scores = expected_answer(database, str(photos / name), k)
        mine = [row for row in rows if row['query'].endswith(name)]
        assert [row['path'] for row in mine] == [database.images[i] for i in indices]
        assert [float(row['score']) for row in mine] == pytest.approx(scores, abs=1e-6)
    args = serve.parse_args(['--data_base', db_path, *ARGS])
    searcher = serve.Searcher(database, reranker=rerank_eval.for_database(args.rerank, args.rerank_args, database))
    indices, _ = expected_answer(database, database.images[4], k)
    assert [hit['index'] for hit in searcher.search(k, index=4)['results']] == indices


def test_tune_on_validation_features_never_reads_test_labels(val_reference, tmp_path, capsys):
    results, _ = val_reference
    db = torch.load(out(results, 'data_base.pth'), weights_only=False)
    chosen = []
    for name, labels in (('a', db['test_labels']), ('b', db['test_labels'][::-1])):  # other test labels
        folder = tmp_path / name
        folder.mkdir()
        torch.save(dict(db, test_labels=labels), out(folder, 'data_base.pth'))
        code, printed, err = run_test_script(load_script(), ['--data_base', out(folder, 'data_base.pth'), '--tune',
                                                             '--rerank', 'aqe'], capsys)
        assert code == 0, err
        saved = json.load(open(rerank_eval.tuned_path(out(folder, 'data_base.pth'))))['choices']['aqe']
        grid = rerank.METHODS['aqe'].grid
        if saved['method'] == 'aqe':
            assert all(saved['params'][n] in grid[n] for n in grid)
            assert re.search(r'--tune aqe: tried 8 settings .* best by MAP@R: k=\d+,alpha=\d', printed)
            assert 'val aqe' in printed and 'test change (95 % interval' in printed
        else:  # no setting beat the plain ranking on validation
            assert saved == dict(saved, method='none', params={}) and 'none beats the plain ranking' in printed
        chosen.append(saved['params'])
        code, again, _ = run_test_script(load_script(), ['--data_base', out(folder, 'data_base.pth'), '--evaluate',
                                                         '--rerank', 'aqe'], capsys)  # the saved choice is used
        used = rerank.params_text(saved['params']) if saved['params'] else 'using none'
        assert code == 0 and used in again
    assert chosen[0] == chosen[1]
    assert not os.path.exists(rerank_eval.tuned_path(out(results, 'data_base.pth')))  # the shared run untouched


def test_tune_keeps_none_when_nothing_beats_the_plain_ranking_and_one_choice_per_method(tmp_path, capsys):
    """Tight, well-apart classes: the plain ranking is perfect on validation, so no setting beats it; tuning the
    second method keeps the first's choice."""
    centres = unit(8, 16, 4) * 4
    val = F.normalize(centres.repeat_interleave(6, 0) + 0.01 * unit(48, 16, 5), dim=1)
    db = {'val_features': val, 'val_labels': [str(i // 6) for i in range(48)],
          'test_features': unit(30, 16, 6), 'test_labels': [str(i // 5) for i in range(30)]}
    path = str(tmp_path / 'db.pth')
    for method in ('aqe', 'kreciprocal'):
        chosen, params, val_figures, _ = rerank_eval.tune(db, path, method, [1, 2])
        assert (chosen, params, val_figures[0]['MAP@R']) == ('none', {}, 1.0)
        assert f'--tune {method}: tried' in capsys.readouterr().out
    saved = json.load(open(rerank_eval.tuned_path(path)))['choices']
    assert sorted(saved) == ['aqe', 'kreciprocal'] and all(c['method'] == 'none' for c in saved.values())
    assert rerank_eval.resolve('aqe', None, path) == ('none', {})
    assert rerank_eval.resolve('aqe', 'k=3', path) == ('aqe', {'k': 3, 'alpha': 3.0})
    rerank_eval.write_choice(path, 'aqe', 'aqe', {'k': 2, 'alpha': 1.0}, {})
    assert rerank_eval.resolve('aqe', None, path) == ('aqe', {'k': 2, 'alpha': 1.0})
    assert rerank_eval.resolve('kreciprocal', None, path) == ('none', {})
