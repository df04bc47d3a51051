"""search.py against the reference ranking (_query_fixtures.brute_force, today's rule: ties against the query, then
index order) on many small cases with exact ties; batched search equals one query at a time at every chunk size."""
import sys

import pytest
import torch

from _query_fixtures import REPO, brute_force
from _train_fixtures import run_process
import search


def tied_features(seed, n, dim, distinct):
    """[n, dim] rows drawn from `distinct` random vectors, each scaled by a power of two (exact ties after
    normalisation: the same cosine to any query, bit for bit), with labels from 3 classes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, dim, generator=g)
    rows = torch.randint(0, distinct, (n,), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (n, 1), generator=g).float()
    labels = [str(int(v)) for v in torch.randint(0, 3, (n,), generator=g)]
    return base[rows] * scale, labels


def cases():
    """(features, labels, query feature, exclude, query label, k) over sizes, tie densities, excludes, labels."""
    for seed in range(60):
        n, dim = 2 + seed * 7 % 50, 1 + seed % 9 * 3
        features, labels = tied_features(seed, n, dim, distinct=max(1, n // (1 + seed % 5)))
        query = seed % n
        exclude = query if seed % 2 else None
        label = labels[query] if seed % 3 else None
        k = 1 + seed * 5 % (n - (exclude is not None))
        yield features, labels, features[query].clone(), exclude, label, k


def test_top_k_equals_the_reference_ranking_with_many_exact_ties():
    ties = 0
    for features, labels, query, exclude, label, k in cases():
        expected, scores = brute_force(query, features, exclude, labels, label)
        got, got_scores = search.top_k(query, features, k, exclude, labels, label)
        assert got == expected[:k]
        assert got_scores == pytest.approx(scores[:k], abs=1e-6)
        ties += len(got_scores) - len(set(got_scores))
    assert ties > 100  # the cases do test the tie rule


def test_hand_worked_ties_go_against_the_query():
    features = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-3.0, 0.0], [0.5, 0.0], [1.0, 1.0]])
    labels = ['a', 'b', 'a', 'b', 'b', 'a']
    query = torch.tensor([4.0, 0.0])
    assert search.top_k(query, features, 2, 2) == ([0, 4], [1.0, 1.0])
    assert search.top_k(query, features, 2, 2, labels, 'a') == ([4, 0], [1.0, 1.0])  # other class first
    assert search.top_k(query, features, 1, None, labels, 'b') == ([0], [1.0])  # 0, 2 and 4 tie: class a, index 0
    indices, scores = search.top_k(query, features, 5, 2, labels, 'a')
    assert indices == [4, 0, 5, 1, 3] and scores == pytest.approx([1.0, 1.0, 2 ** -0.5, 0.0, -1.0])


def test_collapsed_gallery_ranks_every_other_class_item_first():
    features = torch.ones(50, 4)
    labels = [str(i % 2) for i in range(50)]
    indices, scores = search.top_k(torch.ones(4), features, 30, 0, labels, '0')
    assert indices == list(range(1, 50, 2)) + [2, 4, 6, 8, 10] and set(scores) == {1.0}


@pytest.mark.parametrize('chunk', [1, 3, 7, 64, None])
def test_batched_equals_one_at_a_time_at_every_chunk_size(chunk):
    features, labels = tied_features(1, 300, 16, distinct=120)
    queries = torch.cat([features[:20], torch.randn(10, 16, generator=torch.Generator().manual_seed(2))])
    excludes = list(range(20)) + [None] * 10
    query_labels = [labels[i] if i % 3 else None for i in range(20)] + [None] * 10
    gallery = search.Gallery(features)
    indices, scores = search.top_k_batch(queries, gallery, 12, excludes, labels, query_labels, chunk=chunk)
    assert indices.shape == scores.shape == (30, 12)
    for i, query in enumerate(queries):
        alone = search.top_k(query, gallery, 12, excludes[i], labels, query_labels[i])
        assert (indices[i].tolist(), scores[i].tolist()) == alone  # the same, bit for bit


def test_knn_of_a_set_against_itself_leaves_each_item_out():
    features, _ = tied_features(3, 80, 8, distinct=30)
    scores, indices = search.knn(features, k=5, chunk=16)
    assert scores.shape == indices.shape == (80, 5)
    for i in range(80):
        assert indices[i].tolist() == brute_force(features[i], features, i)[0][:5]
    assert all(i not in row for i, row in enumerate(indices.tolist()))
    other = torch.randn(7, 8)
    scores, indices = search.knn(other, features, 3)  # a separate gallery: nothing left out
    assert indices.tolist() == [brute_force(q, features)[0][:3] for q in other]
    assert torch.allclose(scores[:, 0], (torch.nn.functional.normalize(other) @
                                         torch.nn.functional.normalize(features).T).max(1).values, atol=1e-6)


@pytest.mark.parametrize('chunk', [1, 7, 40, None])
def test_knn_of_a_set_equals_the_batched_search_bit_for_bit(chunk):
    """The set's own way (each block of products serving its rows and its columns) gives top_k_batch's lists."""
    features, _ = tied_features(4, 200, 12, distinct=90)
    features = torch.cat([features, torch.randn(100, 12, generator=torch.Generator().manual_seed(5))])
    for k in (1, 9, 40):
        scores, indices = search.knn(features, k=k, chunk=chunk)
        expected = search.top_k_batch(features, features, k, range(300))
        assert torch.equal(indices, expected[0]) and torch.equal(scores, expected[1])


def test_gallery_is_normalised_once_in_its_dtype():
    features = torch.randn(10, 4, dtype=torch.float64) * 3
    gallery = search.Gallery(features)
    assert gallery.features.dtype == torch.float64
    assert torch.allclose(gallery.features.norm(dim=1), torch.ones(10, dtype=torch.float64))
    assert search.Gallery(features.float()).features.dtype == torch.float32
    assert search.top_k(features[0], gallery, 3, 0) == search.top_k(features[0], features, 3, 0)


@pytest.mark.parametrize('k', [0, 10, True])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match='k must be 1 to 9'):
        search.top_k(torch.ones(4), torch.randn(10, 4), k, exclude=3)


@pytest.mark.slow
def test_search_speed_benchmark_tiny_run():
    result = run_process([sys.executable, 'benchmarks/search_speed.py', '--sizes', '3000x16', '--queries', '4',
                          '--batch', '8', '--k', '5'], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| 3,000 x 16 |')]
    assert [row[1].strip() for row in rows] == ['search.py', 'G @ q + topk', 'faiss IndexFlatIP']
    assert all(row[-1].strip() == '100 %' for row in rows)  # every method's top k is search.py's
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)
