"""Retrieval metrics: evaluate() and recall() against hand-worked cases and a brute-force reference."""

import math

import pytest
import torch

import utils
from utils import evaluate, recall


def brute_force(query, query_labels, ks, gallery=None, gallery_labels=None):
    """Reference: rank the whole gallery per query with an explicit sort, one query at a time."""
    self_mode = gallery is None
    if self_mode:
        gallery, gallery_labels = query, query_labels
    sims = (query.double() @ gallery.double().T).tolist()
    hits, precisions = {k: 0 for k in ks}, []
    for i, row in enumerate(sims):
        items = [(s, gallery_labels[j] == query_labels[i]) for j, s in enumerate(row)
                 if not (self_mode and j == i)]
        # more similar first; on equal similarity the same-class item first
        items.sort(key=lambda item: (-item[0], not item[1]))
        relevant = [same for _, same in items]
        r = sum(relevant)
        for k in ks:
            hits[k] += any(relevant[:k])
        if r:
            found, total = 0, 0.0
            for position, same in enumerate(relevant[:r], 1):
                if same:
                    found += 1
                    total += found / position
            precisions.append(total / r)
    result = {f'R@{k}': hits[k] / len(sims) for k in ks}
    result['MAP@R'] = sum(precisions) / len(precisions) if precisions else 0.0
    return result


def assert_same(result, expected):
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_hand_worked_self_mode():
    # 1-D features, so similarity = product. Labels a a b b a
    # q0 (1.0):  others 0.9a 0.2b -0.5b 0.1a -> ranked 0.9a 0.2b 0.1a -0.5b; R=2: P@1=1 -> AP=(1)/2=0.5
    # q1 (0.9):  0.9a 0.18b 0.09a -0.45b   -> same as q0: first hit rank 1, AP=0.5
    # q2 (0.2):  0.2a(q0 is other) 0.18 -0.1(q3 same) 0.02 -> [0.2o,0.18o,0.02o,-0.1s]; R=1 AP=0, hit@4
    # q3 (-0.5): -0.5o -0.45o -0.1s -0.05o -> sorted desc: -0.05o, -0.1s, -0.45o, -0.5o; R=1, hit@2, AP=0
    # q4 (0.1):  0.1a 0.09a 0.02b -0.05b   -> R=2 both at top: AP=(1+1)/2=1
    x = torch.tensor([[1.0], [0.9], [0.2], [-0.5], [0.1]])
    labels = ['a', 'a', 'b', 'b', 'a']
    result = evaluate(x, labels, [1, 2, 4])
    assert result['R@1'] == pytest.approx(3 / 5)     # q0 q1 q4
    assert result['R@2'] == pytest.approx(4 / 5)     # + q3
    assert result['R@4'] == pytest.approx(5 / 5)     # + q2
    assert result['MAP@R'] == pytest.approx((0.5 + 0.5 + 0 + 0 + 1) / 5)
    assert_same(result, brute_force(x, labels, [1, 2, 4]))


def test_self_excluded_by_index_with_negative_similarities():
    # All similarities negative: the original zeroed self-similarity, so every query found itself first.
    # q0=[1,0], q1=[-1,0.1] (same class a), q2=[-1,-0.1] (class b)
    # q0: q1 -1.0 (same), q2 -1.0 (other): tie -> same-class first: hit@1, AP 1
    # q1: q0 -1.0 (same), q2 1-0.01=0.99 (other) -> other first: hit@2, R=1, AP 0
    # q2: no same-class item: miss everywhere, not counted in MAP@R
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1]])
    result = evaluate(x, [0, 0, 1], [1, 2])
    assert result['R@1'] == pytest.approx(1 / 3)
    assert result['R@2'] == pytest.approx(2 / 3)
    assert result['MAP@R'] == pytest.approx(0.5)


def test_ties_rank_same_class_first():
    # q0 = 1 against items all at similarity 1: two other-class, one same-class -> rank 1
    x = torch.ones(4, 3)
    result = evaluate(x, torch.tensor([5, 5, 7, 7]), [1])
    assert result == {'R@1': 1.0, 'MAP@R': 1.0}


def test_hand_worked_gallery_mode_map_at_r():
    # Query q=[1] label 'x'; gallery sims 0.9x 0.8y 0.7x 0.6x 0.5y 0.4x: R=4
    # ranking: x y x x | y x -> relevant at 1,3,4 within top 4: (1/1 + 2/3 + 3/4)/4
    q = torch.tensor([[1.0]])
    g = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    gl = ['x', 'y', 'x', 'x', 'y', 'x']
    result = evaluate(q, ['x'], [1, 2], g, gl)
    assert result['R@1'] == 1.0
    assert result['MAP@R'] == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)
    # a query whose class is absent from the gallery is a miss and is left out of MAP@R
    result = evaluate(torch.tensor([[1.0], [1.0]]), ['x', 'z'], [6], g, gl)
    assert result['R@6'] == 0.5
    assert result['MAP@R'] == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)


def test_recall_wrapper_keeps_order():
    x = torch.tensor([[1.0], [0.9], [0.2], [-0.5], [0.1]])
    labels = ['a', 'a', 'b', 'b', 'a']
    assert recall(x, labels, [4, 1, 2]) == pytest.approx([1.0, 3 / 5, 4 / 5])
    g = torch.tensor([[0.9], [0.8]])
    assert recall(torch.tensor([[1.0]]), ['y'], [1, 2], g, ['x', 'y']) == [0.0, 1.0]


def plain_self_stats(queries, ids, num_classes):
    """Self-evaluation the plain way (each query against the whole set), not using symmetry."""
    return utils._gallery_stats(queries, ids, queries, ids, num_classes, True)


@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('mode', ['symmetric', 'plain', 'gallery'])
def test_against_brute_force_with_ties(monkeypatch, chunked, mode):
    # small integer coordinates: every similarity is an exact float, many exactly tied, many negative
    generator = torch.Generator().manual_seed(3 + 2 * chunked + len(mode))
    x = torch.randint(-2, 3, (90, 4), generator=generator).float()
    labels = torch.randint(0, 12, (90,), generator=generator)
    ks = [1, 2, 5, 10, 89]
    with_gallery = mode == 'gallery'
    if mode == 'plain':
        monkeypatch.setattr(utils, '_self_stats', plain_self_stats)
    if chunked:  # many small chunks and strips exercise their boundaries
        monkeypatch.setattr(utils, '_chunk_rows', lambda *args: 7)
    if with_gallery:
        g = torch.randint(-2, 3, (70, 4), generator=generator).float()
        gl = [str(v) for v in torch.randint(0, 15, (70,), generator=generator).tolist()]
        ql = [str(v) for v in labels.tolist()]
        result, expected = evaluate(x, ql, ks, g, gl), brute_force(x, ql, ks, g, gl)
    else:
        result, expected = evaluate(x, labels, ks), brute_force(x, labels.tolist(), ks)
    assert_same(result, expected)
    assert 0 < expected['R@1'] < expected['R@10'] < 1 and 0 < expected['MAP@R'] < 1


def test_against_brute_force_normalised_features_and_large_classes():
    # continuous L2-normalised features, a few large classes (R up to ~40) and singletons
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(150, 8, generator=generator), dim=1)
    labels = torch.cat([torch.randint(0, 3, (120,), generator=generator), torch.arange(10, 40)])
    ks = [1, 4, 16]
    assert_same(evaluate(x, labels, ks), brute_force(x, labels.tolist(), ks))
    assert_same(evaluate(x.double(), labels, ks), brute_force(x, labels.tolist(), ks))


def test_label_types_agree():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=generator)
    labels = torch.randint(0, 6, (40,), generator=generator)
    expected = evaluate(x, labels, [1, 3])
    assert evaluate(x, labels.tolist(), [1, 3]) == expected
    assert evaluate(x, [f'class{v}' for v in labels.tolist()], [1, 3]) == expected


def test_no_relevant_items_anywhere():
    result = evaluate(torch.randn(4, 3), ['a', 'b', 'c', 'd'], [1, 3])
    assert result == {'R@1': 0.0, 'R@3': 0.0, 'MAP@R': 0.0}
    # gallery mode where no query's class is in the gallery (a whole chunk without any R >= 1)
    result = evaluate(torch.randn(2, 3), ['a', 'b'], [1, 3], torch.randn(3, 3), ['c', 'd', 'e'])
    assert result == {'R@1': 0.0, 'R@3': 0.0, 'MAP@R': 0.0}


@pytest.mark.parametrize('ks', [[], [0], [1, -2], [1.5]])
def test_bad_ks(ks):
    with pytest.raises(ValueError):
        evaluate(torch.randn(4, 3), [0, 0, 1, 1], ks)


def test_mismatched_shapes():
    with pytest.raises(ValueError):
        evaluate(torch.randn(4, 3), [0, 0, 1], [1])
    with pytest.raises(ValueError):
        evaluate(torch.randn(4, 3), [0, 0, 1, 1], [1], torch.randn(4, 2), [0, 0, 1, 1])
    with pytest.raises(ValueError, match='one gallery item'):
        evaluate(torch.randn(4, 3), [0, 0, 1, 1], [1], torch.randn(0, 3), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (300, 6), generator=generator).float()
    labels = torch.randint(0, 40, (300,), generator=generator)
    assert_same(evaluate(x.cuda(), labels, [1, 5, 50]), evaluate(x, labels, [1, 5, 50]))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_features_are_an_error(bad):
    # every comparison with NaN is false: counted as hits, a diverged model would score R@1 100 %
    with pytest.raises(ValueError, match='NaN or infinite'):
        evaluate(torch.full((6, 4), bad), [0, 0, 1, 1, 2, 2], [1])
    x = torch.randn(6, 4)
    x[3, 1] = bad
    with pytest.raises(ValueError, match='NaN or infinite'):
        evaluate(torch.randn(2, 4), [0, 1], [1], x, [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize('mode', ['self', 'gallery'])
def test_identical_vectors_score_identically(mode, monkeypatch):
    """BLAS may give two identical gallery vectors similarities 1 ulp apart by their place in the
    matrix; simulated here by nudging every odd column up by 1 ulp. The copy of another class must
    still not beat the identical copy of the query's class (the tie rule)."""
    products = utils._similarities

    def nudged(queries, gallery):
        sims = products(queries, gallery)
        sims[:, 1::2] = torch.nextafter(sims[:, 1::2], torch.tensor(math.inf))
        return sims

    monkeypatch.setattr(utils, '_similarities', nudged)
    generator = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    # gallery: [g0 class 0, g0 class 1, g1 class 1, g1 class 2, ...]: the other-class copy sits at odd places
    gallery = g.repeat_interleave(2, 0)
    labels = [k // 2 + k % 2 for k in range(16)]
    if mode == 'gallery':
        assert evaluate(g, list(range(8)), [1], gallery, labels)['R@1'] == 1.0
    else:  # every even item has its same-class twin in the next pair: odd items miss, even ones hit
        pairs = torch.cat([gallery, gallery[::2]])  # a same-class copy of each even item
        result = evaluate(pairs, labels + labels[::2], [1])
        assert result['R@1'] == pytest.approx(16 / 24)
