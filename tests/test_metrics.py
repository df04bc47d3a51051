"""Retrieval metrics: evaluate() and recall() against hand-worked cases, a brute-force reference and
pytorch-metric-learning's AccuracyCalculator."""

import math

import pytest
import torch

import metrics
from metrics import evaluate, recall


def brute_force(query, query_labels, ks, gallery=None, gallery_labels=None):
    """Reference: rank the whole gallery per query with an explicit sort, one query at a time (ties against
    the query: on equal similarity the other-class item first)."""
    self_mode = gallery is None
    if self_mode:
        gallery, gallery_labels = query, query_labels
    sims = (query.double() @ gallery.double().T).tolist()
    hits, precisions, r_precisions = {k: 0 for k in ks}, [], []
    for i, row in enumerate(sims):
        items = [(s, gallery_labels[j] == query_labels[i]) for j, s in enumerate(row)
                 if not (self_mode and j == i)]
        # more similar first; on equal similarity the other-class item first
        items.sort(key=lambda item: (-item[0], item[1]))
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
            r_precisions.append(sum(relevant[:r]) / r)
    result = {f'R@{k}': hits[k] / len(sims) for k in ks}
    result['MAP@R'] = sum(precisions) / len(precisions) if precisions else 0.0
    result['R-Precision'] = sum(r_precisions) / len(r_precisions) if r_precisions else 0.0
    return result


def assert_same(result, expected):
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_hand_worked_self_mode():
    # 1-D features, so similarity = product. Labels a a b b a
    # q0 (1.0):  others 0.9a 0.2b -0.5b 0.1a -> ranked 0.9a 0.2b 0.1a -0.5b; R=2: P@1=1 -> AP=(1)/2=0.5, RP 1/2
    # q1 (0.9):  0.9a 0.18b 0.09a -0.45b   -> same as q0: first hit rank 1, AP=0.5, RP 1/2
    # q2 (0.2):  0.2a(q0 is other) 0.18 -0.1(q3 same) 0.02 -> [0.2o,0.18o,0.02o,-0.1s]; R=1 AP=0, RP 0, hit@4
    # q3 (-0.5): -0.5o -0.45o -0.1s -0.05o -> sorted desc: -0.05o, -0.1s, -0.45o, -0.5o; R=1, hit@2, AP=0, RP 0
    # q4 (0.1):  0.1a 0.09a 0.02b -0.05b   -> R=2 both at top: AP=(1+1)/2=1, RP 1
    x = torch.tensor([[1.0], [0.9], [0.2], [-0.5], [0.1]])
    labels = ['a', 'a', 'b', 'b', 'a']
    result = evaluate(x, labels, [1, 2, 4])
    assert result['R@1'] == pytest.approx(3 / 5)     # q0 q1 q4
    assert result['R@2'] == pytest.approx(4 / 5)     # + q3
    assert result['R@4'] == pytest.approx(5 / 5)     # + q2
    assert result['MAP@R'] == pytest.approx((0.5 + 0.5 + 0 + 0 + 1) / 5)
    assert result['R-Precision'] == pytest.approx((0.5 + 0.5 + 0 + 0 + 1) / 5)
    assert_same(result, brute_force(x, labels, [1, 2, 4]))


def test_self_excluded_by_index_with_negative_similarities():
    # All similarities negative: the original zeroed self-similarity, so every query found itself first.
    # q0=[1,0], q1=[-0.9,0.1] (same class a), q2=[-1,-0.1] (class b)
    # q0: q1 -0.9 (same), q2 -1.0 (other): hit@1, AP 1
    # q1: q0 -0.9 (same), q2 0.9-0.01=0.89 (other) -> other first: hit@2, R=1, AP 0
    # q2: no same-class item: miss everywhere, not counted in MAP@R
    x = torch.tensor([[1.0, 0.0], [-0.9, 0.1], [-1.0, -0.1]])
    result = evaluate(x, [0, 0, 1], [1, 2])
    assert result['R@1'] == pytest.approx(1 / 3)
    assert result['R@2'] == pytest.approx(2 / 3)
    assert result['MAP@R'] == pytest.approx(0.5)
    assert result['R-Precision'] == pytest.approx(0.5)


def test_ties_go_against_the_query():
    # every similarity 3: for each query one same-class item and two other-class ones, all tied -> rank 3
    x = torch.ones(4, 3)
    result = evaluate(x, torch.tensor([5, 5, 7, 7]), [1, 2, 3])
    assert result == {'R@1': 0.0, 'R@2': 0.0, 'R@3': 1.0, 'MAP@R': 0.0, 'R-Precision': 0.0}
    # a same-class item strictly more similar than tied other-class ones still comes first
    result = evaluate(torch.tensor([[1.0]]), ['a'], [1], torch.tensor([[1.0], [2.0], [2.0]]), ['b', 'a', 'b'])
    assert result == {'R@1': 0.0, 'MAP@R': 0.0, 'R-Precision': 0.0}
    result = evaluate(torch.tensor([[1.0]]), ['a'], [1], torch.tensor([[1.0], [2.0], [1.5]]), ['b', 'a', 'b'])
    assert result == {'R@1': 1.0, 'MAP@R': 1.0, 'R-Precision': 1.0}


def force_candidates(monkeypatch, candidates):
    """Make _Ranking.update take the sparse (candidate cells) or the dense way on every strip."""
    gather = metrics.cells_at_least
    monkeypatch.setattr(metrics, 'cells_at_least', (lambda sims, thresholds, cap: gather(sims, thresholds, math.inf))
                        if candidates == 'sparse' else (lambda sims, thresholds, cap: None))


def force_path(monkeypatch, mode, chunked):
    """symmetric: _self_stats even for repeated vectors; plain: self mode through _gallery_stats; chunked: 7 rows
    per chunk and strip, so their boundaries fall everywhere."""
    if mode == 'symmetric':  # identical vectors normally take the plain way
        monkeypatch.setattr(metrics, '_duplicates', lambda features: None)
    if mode == 'plain':
        monkeypatch.setattr(metrics, '_self_stats', plain_self_stats)
    if chunked:
        monkeypatch.setattr(metrics, '_chunk_rows', lambda *args: 7)


@pytest.mark.parametrize('candidates', ['sparse', 'dense'])
@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('mode', ['symmetric', 'plain', 'gallery'])
def test_collapsed_model_scores_zero(monkeypatch, mode, chunked, candidates):
    # a collapsed model: every embedding equal (all zeros, or one constant vector: every similarity the same
    # exact float). Ties go against the query, so a same-class item comes after all 12 other-class ones.
    force_path(monkeypatch, mode, chunked)
    force_candidates(monkeypatch, candidates)
    labels = [i // 4 for i in range(16)]  # 4 classes of 4
    for value in (0.0, 0.5):
        x = torch.full((16, 8), value)
        if mode == 'gallery':  # the queries: 2 of each class, searched in the 16
            result = evaluate(x[::2], labels[::2], [1, 12, 13], x, labels)
        else:
            result = evaluate(x, labels, [1, 12, 13])
        assert result == {'R@1': 0.0, 'R@12': 0.0, 'R@13': 1.0, 'MAP@R': 0.0, 'R-Precision': 0.0}


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
    return metrics._gallery_stats(queries, ids, queries, ids, num_classes, True)


@pytest.mark.parametrize('candidates', ['sparse', 'dense', 'either'])
@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('mode', ['symmetric', 'plain', 'gallery'])
def test_against_brute_force_with_ties(monkeypatch, chunked, mode, candidates):
    # small integer coordinates: every similarity is an exact float, many exactly tied, many negative
    generator = torch.Generator().manual_seed(3 + 2 * chunked + len(mode))
    x = torch.randint(-2, 3, (90, 4), generator=generator).float()
    labels = torch.randint(0, 12, (90,), generator=generator)
    ks = [1, 2, 5, 10, 89]
    with_gallery = mode == 'gallery'
    force_path(monkeypatch, mode, chunked)  # symmetric too: every similarity is an exact integer
    if candidates != 'either':
        force_candidates(monkeypatch, candidates)
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
    assert result == {'R@1': 0.0, 'R@3': 0.0, 'MAP@R': 0.0, 'R-Precision': 0.0}
    # gallery mode where no query's class is in the gallery (a whole chunk without any R >= 1)
    result = evaluate(torch.randn(2, 3), ['a', 'b'], [1, 3], torch.randn(3, 3), ['c', 'd', 'e'])
    assert result == {'R@1': 0.0, 'R@3': 0.0, 'MAP@R': 0.0, 'R-Precision': 0.0}


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
    matrix; simulated here by nudging every odd column up by 1 ulp. The same-class copy there must
    still tie with the identical other-class copy, and so rank after it (the tie rule)."""
    products = metrics.similarities

    def nudged(queries, gallery):
        sims = products(queries, gallery)
        sims[:, 1::2] = torch.nextafter(sims[:, 1::2], torch.tensor(math.inf))
        return sims

    monkeypatch.setattr(metrics, 'similarities', nudged)
    generator = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    # gallery: [g0 class 100, g0 class 0, g1 class 101, g1 class 1, ...]: the same-class copy at odd places
    gallery = g.repeat_interleave(2, 0)
    labels = [k // 2 + 100 * (1 - k % 2) for k in range(16)]
    if mode == 'gallery':  # g_i queries the gallery: the other-class copy first, its own one second
        result = evaluate(g, list(range(8)), [1, 2], gallery, labels)
        assert result == {'R@1': 0.0, 'R@2': 1.0, 'MAP@R': 0.0, 'R-Precision': 0.0}
    else:  # a third copy of each g_i, of class i: both class-i copies find the class-100+i one first
        result = evaluate(torch.cat([gallery, g]), labels + list(range(8)), [1, 2])
        assert result == {'R@1': 0.0, 'R@2': 16 / 24, 'MAP@R': 0.0, 'R-Precision': 0.0}


def pml_metrics(query, query_labels, reference=None, reference_labels=None):
    """pytorch-metric-learning's precision_at_1, r_precision and mean_average_precision_at_r: exact (k up to
    the largest class), by inner product in float64 with its own torch k-NN (no faiss), on the CPU."""
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    knn = CustomKNN(DotProductSimilarity(normalize_embeddings=False))

    def float64_knn(query, k, reference, ref_includes_query=False):  # it casts the inputs to float32
        return knn(query.double(), k, reference.double(), ref_includes_query)

    calculator = AccuracyCalculator(include=('precision_at_1', 'r_precision', 'mean_average_precision_at_r'),
                                    k='max_bin_count', device=torch.device('cpu'), knn_func=float64_knn)
    # without a reference the query set is its own reference, each query excluded from its own results
    return calculator.get_accuracy(query, query_labels, reference, reference_labels)


def labels_of_sizes(counts, seed):
    """Labels [N] with counts[c] items of class c, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return labels[torch.randperm(len(labels), generator=generator)]


@pytest.mark.parametrize('counts, dim', [
    ([2, 3, 5, 8, 13], 4),                                # few large classes
    ([1, 1, 2, 2, 3, 3, 4, 4, 5, 5] * 4, 8),              # classes of size 1 (no R: left out of MAP@R and RP)
    ([6] * 30 + [1] * 20, 16),                            # 200 items, many classes
])
def test_against_pytorch_metric_learning_self(counts, dim):
    labels = labels_of_sizes(counts, len(counts))
    generator = torch.Generator().manual_seed(dim)
    x = torch.nn.functional.normalize(torch.randn(len(labels), dim, generator=generator), dim=1)
    ours, pml = evaluate(x.double(), labels, [1]), pml_metrics(x, labels)
    assert ours['MAP@R'] == pytest.approx(pml['mean_average_precision_at_r'], abs=1e-6)
    assert ours['R-Precision'] == pytest.approx(pml['r_precision'], abs=1e-6)
    # PML leaves the queries without a same-class item out of precision_at_1; R@1 counts them as misses
    answerable = sum(c for c in counts if c > 1) / len(labels)
    assert ours['R@1'] == pytest.approx(pml['precision_at_1'] * answerable, abs=1e-6)
    assert 0 < ours['R-Precision'] < 1 and 0 < ours['MAP@R'] < ours['R@1'] < 1


@pytest.mark.parametrize('seed', [0, 1])
def test_against_pytorch_metric_learning_query_gallery(seed):
    # 120 queries of classes 0-29, a gallery of 200 of classes 5-44: classes 0-4 have no gallery item
    generator = torch.Generator().manual_seed(seed)
    query_labels = torch.randint(0, 30, (120,), generator=generator)
    gallery_labels = torch.randint(5, 45, (200,), generator=generator)
    centres = torch.randn(45, 8, generator=generator)  # some structure, so that the metrics are not tiny
    query, gallery = (torch.nn.functional.normalize(centres[v] + 1.5 * torch.randn(len(v), 8, generator=generator),
                                                    dim=1) for v in (query_labels, gallery_labels))
    ours = evaluate(query.double(), query_labels, [1], gallery.double(), gallery_labels)
    pml = pml_metrics(query, query_labels, gallery, gallery_labels)
    assert ours['MAP@R'] == pytest.approx(pml['mean_average_precision_at_r'], abs=1e-6)
    assert ours['R-Precision'] == pytest.approx(pml['r_precision'], abs=1e-6)
    answerable = float(torch.isin(query_labels, gallery_labels).double().mean())
    assert 0 < answerable < 1
    assert ours['R@1'] == pytest.approx(pml['precision_at_1'] * answerable, abs=1e-6)
    assert 0 < ours['R-Precision'] < 1 and 0 < ours['MAP@R'] < ours['R@1'] < 1


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_duplicates_found_across_hash_chunks(monkeypatch, dtype):
    # rows are hashed 3 at a time: repeats within a chunk, across chunks and in the last, short chunk
    monkeypatch.setattr(metrics, '_chunk_rows', lambda *args: 3)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert metrics._duplicates(x) is None
    x[1], x[7], x[13], x[19] = x[0], x[2], x[2], x[11]
    rows, first = metrics._duplicates(x)
    assert rows.tolist() == [1, 7, 13, 19] and first.tolist() == [0, 2, 2, 11]


def test_duplicates_never_copy_the_whole_matrix(monkeypatch):
    # the exact-bit hash used to build int64 copies of all of features [N, D] (743 MB each at SOP size);
    # a chunk of 100 rows now: no single allocation comes near [N, D] int64 (2 MB here)
    monkeypatch.setattr(metrics, '_chunk_rows', lambda *args: 100)
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    x[10] = x[3]
    # the autograd profiler records each operator's allocations (the kineto one takes ~10 s to start here)
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        rows, first = metrics._duplicates(x)
    assert rows.tolist() == [10] and first.tolist() == [3]
    assert max(event.cpu_memory_usage for event in prof.function_events) < 4000 * 64 * 8 / 8
