"""Retrieval metrics of CLF: Recall@K, R-Precision and MAP@R, exact, computed in chunks.

Every query ranks the gallery (without a gallery: every other query, itself excluded by index) by the inner
product of the embeddings, the cosine similarity for L2-normalised ones. Ties go against the query: a
same-class item ranks ahead of an other-class item only if it is strictly more similar, so a collapsed model
(every vector equal) scores 0, never 100 %. Identical vectors score identically.

evaluate() ranks once and returns every metric; recall() is the original's interface; rank_stats() and summary()
are its two halves, and reordered_stats() the ranking after post-processing reordered each query's first K. The metric functions
below read the per-query ranking statistics (RankStats) that the ranking leaves behind; the private helpers
after them produce those statistics without ever holding a queries x gallery matrix.
"""
import math
from typing import NamedTuple

import numpy as np
import torch


# ---- the metrics ----

class RankStats(NamedTuple):
    """What each query's ranking leaves for the metrics, each [Nq]."""
    first_hit: torch.Tensor      # int64: other-class items ranked ahead of the best same-class item
    r: torch.Tensor              # int64: R, the same-class items in the gallery (the query itself not counted)
    precision_sum: torch.Tensor  # float64: sum of P(i) over the same-class items at positions i <= R
    r_hits: torch.Tensor         # int64: same-class items at positions i <= R


def recall_at_k(stats, k):
    """Recall@K (Oh Song, Xiang, Jegelka and Savarese, "Deep Metric Learning via Lifted Structured Feature
    Embedding", CVPR 2016): the share of *all* queries with at least one same-class item among their K nearest
    neighbours. A query without a same-class item in the gallery is a miss."""
    return float(((stats.r > 0) & (stats.first_hit < k)).sum()) / len(stats.r)


def r_precision(stats):
    """R-Precision (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020): for a query with
    R >= 1 same-class items, the share of same-class items among its first R neighbours; the mean over those
    queries (0 when there is none)."""
    found = stats.r > 0
    return float((stats.r_hits[found].double() / stats.r[found]).mean()) if found.any() else 0.0


def map_at_r(stats):
    """MAP@R (Musgrave, Belongie and Lim, ECCV 2020): for a query with R >= 1 same-class items,
    AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i) is 1 when the i-th neighbour is of the query's
    class and P(i) is the precision among the first i; the mean over those queries (0 when there is none)."""
    found = stats.r > 0
    return float((stats.precision_sum[found] / stats.r[found]).mean()) if found.any() else 0.0


@torch.no_grad()
def evaluate(query_features, query_labels, ks, gallery_features=None, gallery_labels=None):
    """Exact R@k for each k in ks, MAP@R and R-Precision, as fractions: {'R@1': ..., 'MAP@R': ...,
    'R-Precision': ...}. Without a gallery each query ranks all other queries."""
    ks = check_ks(ks)
    return summary(rank_stats(query_features, query_labels, gallery_features, gallery_labels), ks)


def check_ks(ks):
    """ks as a list of positive integers, else a ValueError."""
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f'ks must be a non-empty list of positive integers, got {ks}')
    return ks


def summary(stats, ks):
    """The metrics of RankStats: {'R@k' for k in ks, 'MAP@R', 'R-Precision'} as fractions."""
    result = {f'R@{k}': recall_at_k(stats, k) for k in ks}
    result['MAP@R'] = map_at_r(stats)
    result['R-Precision'] = r_precision(stats)
    return result


@torch.no_grad()
def rank_stats(query_features, query_labels, gallery_features=None, gallery_labels=None):
    """Each query's RankStats (the exact ranking behind every metric) without a queries x gallery matrix; without a
    gallery each query ranks all other queries."""
    self_mode = gallery_features is None
    if self_mode:
        gallery_features, gallery_labels = query_features, query_labels
    q, g = query_features, gallery_features
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1] or not len(q) or not len(g) \
            or len(query_labels) != len(q) or len(gallery_labels) != len(g):
        raise ValueError(f'need at least one query and one gallery item, [N, D] with the same D, a label each; got '
                         f'{tuple(q.shape)}, {len(query_labels)} labels and {tuple(g.shape)}, {len(gallery_labels)}')
    if not torch.isfinite(q).all() or not torch.isfinite(g).all():
        raise ValueError('features contain NaN or infinite values (a diverged model?): no ranking exists')
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    queries = q.to(dtype).contiguous()
    gallery = queries if self_mode else g.to(device=q.device, dtype=dtype).contiguous()
    query_ids, gallery_ids = label_ids(query_labels, gallery_labels)
    duplicates = _duplicates(gallery)
    # the symmetric way keeps [N, w] tables per query and cannot equalise duplicate columns; a huge
    # class or repeated vectors take the plain way
    if self_mode and duplicates is None and \
            48 * len(queries) * int(torch.bincount(query_ids).max()) <= _budget(q.device):
        return _self_stats(queries, query_ids)
    num_classes = int(max(query_ids.max(), gallery_ids.max())) + 1
    return _gallery_stats(queries, query_ids, gallery, gallery_ids, num_classes, self_mode, duplicates)


def label_ids(query_labels, gallery_labels):
    """Labels (lists of str/int, or tensors) -> int64 ids shared by queries and gallery: [Nq], [Ng]."""
    labels = [v.tolist() if torch.is_tensor(v) else list(v) for v in (query_labels, gallery_labels)]
    ids = {label: i for i, label in enumerate(dict.fromkeys(labels[0] + labels[1]))}
    return tuple(torch.tensor([ids[label] for label in v], dtype=torch.long) for v in labels)


def reordered_stats(stats, before, after):
    """RankStats after each query's first K results were put in another order, the rest left as they were.
    before, after [N, K] bool: whether the i-th of those K is of the query's class, in the old order (the one
    `stats` ranks by, ties against the query) and in the new. Positions past K keep their items, so only the first
    K change R@K, and MAP@R's and R-Precision's sums only by their part inside the first K."""
    changed = (before != after).any(1)
    if not changed.any():
        return stats
    width, r = after.shape[1], stats.r
    position = torch.arange(1, width + 1, dtype=torch.float64)

    def inside(flags):  # [N, K] -> the sum of P(i) and the hits at positions i <= min(R, K)
        counted = flags & (position[None, :] <= r[:, None])
        return torch.where(counted, flags.cumsum(1) / position, 0).sum(1), counted.sum(1)

    old_sum, _ = inside(before)
    new_sum, new_hits = inside(after)
    short = r <= width  # every position up to R lies inside the first K
    precision_sum = torch.where(short, new_sum, stats.precision_sum - old_sum + new_sum)
    r_hits = torch.where(short, new_hits, stats.r_hits)
    found = after.any(1)
    first_hit = torch.where(found, after.to(torch.int8).argmax(1), stats.first_hit)
    keep = ~changed
    return RankStats(torch.where(keep, stats.first_hit, first_hit), r,
                     torch.where(keep, stats.precision_sum, precision_sum), torch.where(keep, stats.r_hits, r_hits))


def recall(feature_vectors, feature_labels, rank, gallery_vectors=None, gallery_labels=None):
    """The original's interface: list of R@k fractions, one per k in `rank`, in that order."""
    metrics = evaluate(feature_vectors, feature_labels, rank, gallery_vectors, gallery_labels)
    return [metrics[f'R@{k}'] for k in rank]


# ---- ranking in chunks ----
# Only two things per query decide every metric: how many other-class items are at least as similar as its best
# same-class item (R@K), and the R best other-class similarities against its R same-class ones (the positions
# of the same-class items among the first R: R-Precision and MAP@R). No top-1000 list is kept.

def _duplicates(features):
    """Rows of features [N, D] that repeat an earlier row bit for bit -> (rows [n], first [n]: the earlier row
    each repeats), or None when all rows differ."""
    # BLAS can give two identical vectors similarities 1 ulp apart by their place in the matrix; copying
    # the first one's column over the others makes identical vectors score identically
    num, dim = features.shape
    bits = features.contiguous().view(torch.int32 if features.dtype == torch.float32 else torch.int64)  # [N, D]
    weights = torch.randint(-2 ** 62, 2 ** 62, (dim,), generator=torch.Generator().manual_seed(0)).to(bits.device)
    # a hash of each row's exact bits (wraps around; only equality counts), a chunk of rows at a time: the int64
    # copy and its product are [c, D], not [N, D] (743 MB each at SOP size)
    step = _chunk_rows(16 * dim, features.device)
    key = torch.cat([(bits[i:i + step].long() * weights).sum(1) for i in range(0, num, step)])  # [N]
    _, group = torch.unique(key, return_inverse=True)
    position = torch.arange(num, device=key.device)
    first = torch.full_like(key, num).scatter_reduce(0, group, position, 'amin')[group]  # [N] first of its hash
    rows = torch.nonzero(first != position).flatten()
    if not len(rows):
        return None
    # a hash collision is no duplicate: compare the values, a chunk of candidates at a time
    rows = torch.cat([part[(features[part] == features[first[part]]).all(1)] for part in rows.split(step)])
    return (rows, first[rows]) if len(rows) else None


def similarities(queries, gallery):
    """[c, D] x [Ng, D] -> [c, Ng]; on CPU by NumPy's BLAS (1.5x torch.mm's speed at [1024, 1536] x [1536, 60502])."""
    if queries.is_cuda:
        return queries @ gallery.T
    return torch.from_numpy(np.dot(queries.numpy(), gallery.numpy().T))


def _count_at_least(sims, thresholds):
    """Per row, entries of sims [c, W] at least their row's threshold [c] -> [c] (NumPy on CPU: ~9x torch's speed)."""
    if sims.is_cuda:
        return (sims >= thresholds[:, None]).sum(1)
    return torch.from_numpy(np.count_nonzero(sims.numpy() >= thresholds.numpy()[:, None], axis=1))


def cells_at_least(sims, thresholds, cap):
    """Cells of sims [q, W] (maybe a transposed view) at least their row's threshold [q], as (row, column)
    index tensors grouped by row; None when there are more than `cap`."""
    if sims.is_cuda:
        mask = sims >= thresholds[:, None]
        return None if int(mask.sum()) > cap else mask.nonzero(as_tuple=True)
    mask = np.greater_equal(sims.numpy(), thresholds.numpy()[:, None], order='C')  # [q, W] bool
    flat = mask.reshape(-1)
    if np.count_nonzero(flat) > cap:
        return None
    # candidates are sparse: find the non-zero 8-byte words first, then the cells inside them
    whole = flat.size // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    cells = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    cells = np.concatenate([cells[flat[cells]], whole + np.flatnonzero(flat[whole:])])
    return tuple(torch.from_numpy(v) for v in np.divmod(cells, mask.shape[1]))


def _budget(device):
    """Bytes one chunk of work may use: 256 MiB on CPU, a quarter of the free memory on CUDA."""
    return torch.cuda.mem_get_info(device)[0] // 4 if device.type == 'cuda' else 256 * 2 ** 20


def _chunk_rows(row_bytes, device):
    """Rows of `row_bytes` each that one chunk holds within _budget, 1 to 4096."""
    return max(1, min(_budget(device) // row_bytes, 4096))


class _Ranking:
    """Collects the RankStats of N queries from their other-class similarities, strip by strip, given their
    same-class similarities same [N, w] (descending, -inf padded) and R = r [N]."""

    def __init__(self, same, r):
        self.same, self.r = same, r
        # +inf for a query without same-class items: nothing counts for it
        self.best = same[:, 0].masked_fill(r == 0, math.inf)                                          # [N]
        # an other-class item matters for R-Precision and MAP@R only if at least as similar as the R-th
        # same-class item (a tie goes against the query)
        self.weakest = same.gather(1, (r - 1).clamp(min=0)[:, None])[:, 0].masked_fill(r == 0, math.inf)  # [N]
        self.first_hit = torch.zeros(len(same), dtype=torch.long, device=same.device)               # [N]
        self.top = torch.full_like(same, -math.inf)  # [N, w]: the w best other-class similarities so far

    def update(self, sims, queries):
        """Add other-class similarities sims [q, W] (rows: the queries, a slice) to the statistics."""
        top, best = self.top[queries], self.best[queries]               # [q, w], [q]
        width = top.shape[1]
        # only cells at least as similar as the best same-class item (first hit), or as both the weakest
        # same-class item and the current w-th best other (R-Precision, MAP@R) matter; after the first strips
        # they are few
        low = torch.maximum(self.weakest[queries], top[:, -1])
        # beyond ~1 candidate in 32 cells, a dense pass is cheaper than gathering candidates
        found = cells_at_least(sims, torch.minimum(best, low), cap=max(top.numel(), sims.numel() // 32))
        if found is None:
            self.first_hit[queries] += _count_at_least(sims, best).to(best.device)
            fresh = sims.topk(min(width, sims.shape[1]), dim=1).values
        else:
            row, col = (v.to(sims.device) for v in found)
            values = sims[row, col]
            self.first_hit[queries] += torch.bincount(row[values >= best[row]], minlength=len(top))
            keep = values >= low[row]
            row, values = row[keep], values[keep]
            if len(row) == 0:
                return
            # rows are grouped: place each row's candidates side by side
            counts = torch.bincount(row, minlength=len(top))
            rank = torch.arange(len(row), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
            fresh = torch.full((len(top), int(counts.max())), -math.inf, device=top.device, dtype=top.dtype)
            fresh[row, rank] = values
        self.top[queries] = torch.cat([top, fresh], 1).topk(width, dim=1).values  # the best `width`

    def result(self):
        """The RankStats, on the CPU."""
        same, top, r = self.same, self.top, self.r[:, None]
        # the m-th same-class item sits at position m + #{other-class items at least as similar}; top holds
        # the w >= R best, so every position up to R is exact (a larger one is only known to exceed R)
        ahead = top.shape[1] - torch.searchsorted(top.flip(1).contiguous(), same.contiguous())  # [N, w]
        m = torch.arange(1, same.shape[1] + 1, device=same.device, dtype=torch.float64)
        position = m + ahead                                              # [N, w]
        among_r = (m <= r) & (position <= r)                              # [N, w]: the same-class items in the top R
        precision = torch.where(among_r, m / position, 0)
        return RankStats(self.first_hit.cpu(), self.r.cpu(), precision.sum(1).cpu(), among_r.sum(1).cpu())


def _gallery_stats(queries, query_ids, gallery, gallery_ids, num_classes, self_mode, duplicates=None):
    """Queries [Nq, D] against a gallery [Ng, D] (or each other, self excluded: self_mode), a chunk of queries
    at a time -> RankStats of [Nq]. duplicates: _duplicates(gallery)."""
    device = queries.device
    # gallery members of every class: order[starts[k] : starts[k] + counts[k]]
    order = torch.argsort(gallery_ids, stable=True)
    counts = torch.bincount(gallery_ids, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    # per query a similarity (4 B) and a mask (1 B) per gallery item, about 64 B per class member
    chunk = _chunk_rows(5 * len(gallery) + 64 * int(counts.max()) + 64, device)
    if duplicates is not None:  # (rows, first): moved once, used by every chunk
        duplicates = tuple(v.to(device) for v in duplicates)
    results = []
    for begin in range(0, len(queries), chunk):
        end = min(begin + chunk, len(queries))
        ids = query_ids[begin:end]
        size = counts[ids]                                            # [c] class size in the gallery
        slot = torch.arange(max(int(size.max()), 1))  # width >= 1 even when no query's class is there
        in_class = slot[None, :] < size[:, None]                      # [c, w]
        members = order[torch.where(in_class, starts[ids][:, None] + slot, 0)]  # [c, w] gallery indices
        relevant = in_class
        if self_mode:  # the query itself is never a result
            relevant = in_class & (members != torch.arange(begin, end)[:, None])
        sims = similarities(queries[begin:end], gallery)              # [c, Ng]
        if duplicates is not None:
            sims[:, duplicates[0]] = sims[:, duplicates[1]]
        members, in_class, relevant = members.to(device), in_class.to(device), relevant.to(device)
        same = sims.gather(1, members).masked_fill(~relevant, -math.inf).sort(dim=1, descending=True).values
        # drop the query's whole class (itself included): sims keeps only other-class items
        rows = torch.arange(end - begin, device=device)[:, None].expand_as(members)
        sims[rows[in_class], members[in_class]] = -math.inf
        ranking = _Ranking(same, relevant.sum(1))
        ranking.update(sims, slice(None))
        results.append(ranking.result())
    return RankStats(*(torch.cat(parts) for parts in zip(*results)))


def _self_stats(features, ids):
    """Every item of features [N, D] against all others, using symmetry -> RankStats of [N], in class order."""
    # in class-sorted order each block of similarities is computed once and serves its rows and
    # (transposed) its columns, halving the matrix products
    device, num = features.device, len(features)
    perm = torch.argsort(ids, stable=True)
    ids = ids[perm].to(device)
    x = features[perm.to(device)]                                     # [N, D] copy in class order
    counts = torch.bincount(ids)
    class_ends = torch.cumsum(counts[counts > 0], 0)
    # strips of rows, per item a similarity (4 B), a mask (1 B) and a transposed copy in the dense path
    # (4 B); their boundaries fall between classes, so every same-class pair lies in a diagonal block
    chunk = _chunk_rows(10 * num, device)
    targets = torch.tensor(range(chunk, num, chunk), dtype=torch.long, device=device)
    bounds = [0] + sorted(set(class_ends[torch.searchsorted(class_ends, targets)].tolist()) | {num})
    blocks = list(zip(bounds[:-1], bounds[1:]))

    width = max(int(counts.max()) - 1, 1)                             # most same-class items of a query
    same = torch.full((num, width), -math.inf, device=device, dtype=x.dtype)
    for begin, end in blocks:
        block = similarities(x[begin:end], x[begin:end])               # [c, c]
        other = ids[begin:end, None] != ids[None, begin:end]
        other.fill_diagonal_(True)                                     # the query itself is no result
        block.masked_fill_(other.to(block.device), -math.inf)
        kept = min(width, end - begin)
        same[begin:end, :kept] = block.topk(kept, dim=1).values
    ranking = _Ranking(same, counts[ids] - 1)
    for begin, end in blocks:
        strip = similarities(x[begin:end], x[begin:])                  # [c, N - begin]
        diagonal = strip[:, :end - begin]
        diagonal.masked_fill_(ids[begin:end, None] == ids[None, begin:end], -math.inf)
        ranking.update(strip, slice(begin, end))                       # rows: these queries
        if end < num:
            ranking.update(strip[:, end - begin:].T, slice(end, num))  # columns: the later queries
    return ranking.result()
