"""Exact nearest-neighbour search by cosine similarity: one query, many queries, or a set against itself.

The gallery is L2-normalised once (Gallery, in the dtype it was saved in). One query then costs one matrix-vector
product and a partial selection (torch.topk), many queries matrix-matrix products in chunks of bounded memory.

Order: higher similarity first; equal similarities go against the query (other-class items first when its label is
known, as in metrics.py), then gallery order. A float32 product is off by at most margin() from the true
similarity, and by different amounts depending on the kernel (one query or many, chunk, position in the matrix).
So only the selection uses it: the candidates within margin() of the k-th score are scored again in float64 and
ordered by those scores rounded to float32. The results are the same for one query or many, at any chunk size,
and identical vectors score identically; the tie rule only ever sorts those few candidates.
"""
import torch
import torch.nn.functional as F

import metrics

CHUNK_BYTES = 2 ** 28  # a batched search's similarity block [c, N] (float32) is at most this: 256 MiB
EXTRA = 16  # candidates selected beyond k: more than the near-ties of the k-th score, as a rule
PIECE_BYTES = 3 * 2 ** 24  # candidates scored again in float64 at a time: [piece, D] float64 of 48 MiB


class Gallery:
    """Gallery features [N, D] L2-normalised once: float32 and float64 ones stay in their dtype, lower precision ones
    are searched in float32 (CPU products in float16 are slow and their error large)."""

    def __init__(self, features):
        features = torch.as_tensor(features)
        if features.dim() != 2 or not features.is_floating_point() or not len(features):
            raise ValueError(f'gallery features must be a float tensor [N, D], N >= 1; got {tuple(features.shape)} '
                             f'{features.dtype}')
        dtype = features.dtype if features.dtype == torch.float64 else torch.float32
        self.features = F.normalize(features.to(dtype), dim=1).contiguous()  # [N, D]

    def __len__(self):
        return len(self.features)


def as_gallery(gallery):
    """A Gallery as it is, features [N, D] normalised into one (once per call: keep a Gallery for many calls)."""
    return gallery if isinstance(gallery, Gallery) else Gallery(gallery)


def margin(dtype, dim):
    """Twice the largest error of a similarity of unit vectors computed in `dtype` (any summation order): a dot
    product of length D is within D·u of the true value (u = eps / 2), the query's rounding adds u."""
    return (dim + 4) * torch.finfo(dtype).eps


def normalised_queries(queries):
    """Queries [n, D] (or one [D]) as unit vectors in float64 [n, D]; the float64 copy serves the second scoring."""
    queries = torch.as_tensor(queries).double()
    return F.normalize(queries.reshape(-1, queries.shape[-1]), dim=1)


@torch.no_grad()
def top_k(query_feature, gallery_features, k, exclude=None, gallery_labels=None, query_label=None):
    """The k best gallery items for one query feature [D] -> (indices, scores), lists of k, best first; `exclude`: a
    gallery index left out (the query itself); labels: ties go against the query (other-class items first)."""
    gallery = as_gallery(gallery_features)
    _check_k(k, len(gallery), exclude is not None)
    query = normalised_queries(query_feature)  # [1, D]
    scores = gallery.features @ query[0].to(gallery.features.dtype)  # [N] one matrix-vector product
    indices, values = _select(scores[None], query, gallery, k, [exclude], gallery_labels, [query_label])
    return indices[0].tolist(), values[0].tolist()


@torch.no_grad()
def top_k_batch(query_features, gallery_features, k, excludes=None, gallery_labels=None, query_labels=None,
                chunk=None):
    """top_k for many queries [n, D] -> (indices [n, k] int64, scores [n, k] float32), row i what top_k gives query
    i; `excludes`, `query_labels`: one per query (None: nothing excluded, label unknown). `chunk`: queries per
    matrix product [default: as many as keep the similarity block within CHUNK_BYTES]."""
    gallery = as_gallery(gallery_features)
    queries = normalised_queries(query_features)  # [n, D]
    excludes = [None] * len(queries) if excludes is None else list(excludes)
    query_labels = [None] * len(queries) if query_labels is None else list(query_labels)
    if not len(excludes) == len(query_labels) == len(queries):
        raise ValueError(f'{len(queries)} queries, {len(excludes)} excludes, {len(query_labels)} labels')
    _check_k(k, len(gallery), any(e is not None for e in excludes))
    chunk = chunk or max(1, CHUNK_BYTES // (4 * len(gallery)))
    indices, scores = [torch.empty(0, k, dtype=torch.long)], [torch.empty(0, k)]
    for begin in range(0, len(queries), chunk):
        part = slice(begin, begin + chunk)
        block = queries[part].to(gallery.features.dtype) @ gallery.features.T  # [c, N]
        found = _select(block, queries[part], gallery, k, excludes[part], gallery_labels, query_labels[part])
        indices.append(found[0])
        scores.append(found[1])
    return torch.cat(indices), torch.cat(scores)


def knn(queries, gallery=None, k=10, exclude_self=None, chunk=None):
    """The k nearest gallery items of each query by cosine similarity -> (scores [n, k] float32, indices [n, k]
    int64), best first, ties in gallery order. queries: [n, D]; gallery: [N, D] or a Gallery; None: the queries
    themselves, each then left out of its own list (exclude_self defaults to True exactly then: index i of the
    gallery is query i). `chunk`: rows per matrix product."""
    exclude_self = gallery is None if exclude_self is None else exclude_self
    if gallery is None and exclude_self:
        indices, scores = _set_top_k(queries, k, chunk)
        return scores, indices
    gallery = queries if gallery is None else gallery
    excludes = range(len(queries)) if exclude_self else None
    indices, scores = top_k_batch(queries, gallery, k, excludes, chunk=chunk)
    return scores, indices


@torch.no_grad()
def _set_top_k(features, k, chunk=None):
    """top_k_batch of a set [N, D] against itself, each item excluded -> (indices [N, k], scores [N, k]), the same
    lists; each block of products is computed once and serves its rows and (transposed) its columns, halving them."""
    features = torch.as_tensor(features)
    gallery = as_gallery(features)
    x, num = gallery.features, len(gallery)
    _check_k(k, num, True)
    if x.dtype != torch.float32 or x.is_cuda:  # float64 or a GPU: the plain way
        return top_k_batch(features, gallery, k, range(num), chunk=chunk)
    width = min(num - 1, k + EXTRA)
    chunk = chunk or max(1, CHUNK_BYTES // (4 * num))
    lists = _Lists(num, width)
    bounds = [(b, min(b + chunk, num)) for b in range(0, num, chunk)]
    # diagonal blocks first: every list then starts near its final threshold, so the strips pass few cells on
    for begin, end in bounds:
        block = metrics.similarities(x[begin:end], x[begin:end])  # [c, c]
        block.fill_diagonal_(-float('inf'))
        lists.add(block, begin, begin)
    for begin, end in bounds[:-1]:
        strip = metrics.similarities(x[begin:end], x[end:])      # [c, N - end]
        lists.add(strip, begin, end)                              # rows: these items
        lists.add(strip.T, end, begin)                            # columns: the later items
    values, columns = lists.values, lists.columns                 # [N, width] float32 scores, best first
    threshold = values[:, k - 1] - margin(x.dtype, x.shape[1])    # [N]
    # a row whose list may hold too few of the near-ties of its k-th score is searched again the plain way
    redo = torch.nonzero(values[:, -1] >= threshold).flatten() if width < num - 1 else torch.zeros(0, dtype=torch.long)
    row, position = torch.nonzero(values >= threshold[:, None], as_tuple=True)
    keep = ~torch.isin(row, redo)
    row, col = row[keep], columns[row[keep], position[keep]]
    indices, scores = _rank_candidates(row, col, lambda rows: _rows_normalised(features, rows), gallery, k, num,
                                       [None] * num, None)
    if len(redo):
        indices[redo], scores[redo] = top_k_batch(features[redo], gallery, k, redo.tolist(), chunk=chunk)
    return indices, scores


def _rows_normalised(features, rows):
    """normalised_queries(features)[rows] for rows [p] in runs (grouped), without a float64 copy of all features."""
    runs, inverse = torch.unique_consecutive(rows, return_inverse=True)
    return normalised_queries(features.index_select(0, runs))[inverse]


class _Lists:
    """The `width` best float32 similarities of N rows and their columns, fed block by block."""

    def __init__(self, num, width):
        self.values = torch.full((num, width), -float('inf'))       # [N, width]
        self.columns = torch.zeros(num, width, dtype=torch.long)    # [N, width]

    def add(self, block, first_row, first_column):
        """Merge block [q, W] (maybe a transposed view): rows first_row.., columns first_column.."""
        rows = slice(first_row, first_row + block.shape[0])
        # beyond ~1 cell in 32 (the first blocks), a dense selection is cheaper than gathering the cells
        found = metrics.cells_at_least(block, self.values[rows, -1], cap=block.numel() // 32)
        if found is None:
            fresh, at = block.topk(min(self.values.shape[1], block.shape[1]), dim=1)
            fresh_columns = at + first_column
        else:
            row, col = found
            if not len(row):
                return
            values = block[row, col]
            order = torch.argsort(values, descending=True, stable=True)
            order = order[torch.argsort(row[order], stable=True)]  # by row, best first within each
            row, col, values = row[order], col[order], values[order]
            counts = torch.bincount(row, minlength=block.shape[0])
            rank = torch.arange(len(row)) - (torch.cumsum(counts, 0) - counts)[row]
            kept = rank < self.values.shape[1]  # a row's cells beyond its `width` best never enter: [q, width] at most
            row, col, values, rank = row[kept], col[kept], values[kept], rank[kept]
            fresh = torch.full((block.shape[0], int(rank.max()) + 1), -float('inf'))
            fresh_columns = torch.zeros(fresh.shape, dtype=torch.long)
            fresh[row, rank], fresh_columns[row, rank] = values, col + first_column
        top, at = torch.cat([self.values[rows], fresh], 1).topk(self.values.shape[1], dim=1)
        self.values[rows] = top
        self.columns[rows] = torch.cat([self.columns[rows], fresh_columns], 1).gather(1, at)


def _check_k(k, size, excluding):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size - excluding:
        raise ValueError(f'k must be 1 to {size - excluding} (gallery of {size}'
                         f'{", the query excluded" if excluding else ""}), got {k!r}')


def _select(scores, queries, gallery, k, excludes, gallery_labels, query_labels):
    """The top k of each row of float32 similarities scores [c, N] (changed in place) -> (indices [c, k], scores
    [c, k]): the candidates within margin() of the row's k-th score, scored in float64 against queries [c, D]
    (float64, unit vectors), ordered by (that score rounded to float32, descending; same class; gallery index)."""
    excluded = [(row, exclude) for row, exclude in enumerate(excludes) if exclude is not None]
    if excluded:
        rows, cols = zip(*excluded)
        scores[list(rows), list(cols)] = -float('inf')  # never within the margin of a finite k-th score
    width = min(scores.shape[1], k + EXTRA)
    while True:  # a partial selection wide enough to hold every candidate of each row
        values, columns = scores.topk(width, dim=1)  # [c, width], best first
        threshold = values[:, k - 1] - margin(scores.dtype, queries.shape[1])  # [c]
        if width == scores.shape[1] or not (values[:, -1] >= threshold).any():
            break
        width = min(scores.shape[1], 4 * width)  # many near-ties (repeated vectors): wider
    row, position = torch.nonzero(values >= threshold[:, None], as_tuple=True)  # [m] candidates
    return _rank_candidates(row, columns[row, position], lambda rows: queries.index_select(0, rows), gallery, k,
                            len(scores), query_labels, gallery_labels)


def _rank_candidates(row, col, query_rows, gallery, k, num_rows, query_labels, gallery_labels):
    """The k best of each row's candidates (row, col) [m], grouped by row, at least k a row -> (indices [n, k],
    scores [n, k]): each scored in float64 against its query (query_rows(rows [p]) -> [p, D] float64 unit vectors)
    and ordered by (that score rounded to float32, descending; same class; gallery index)."""
    if not len(col):
        return torch.zeros(num_rows, k, dtype=torch.long), torch.zeros(num_rows, k)
    # index_select, not features[col]: advanced indexing of the large gallery costs milliseconds here
    piece = max(1, PIECE_BYTES // (8 * gallery.features.shape[1]))  # 4096 candidates at D = 1536
    exact = torch.cat([(gallery.features.index_select(0, col[i:i + piece]).double()
                        * query_rows(row[i:i + piece])).sum(1)
                       for i in range(0, len(col), piece)]).float()  # [m]
    order = torch.argsort(col, stable=True)  # gallery order...
    if gallery_labels is not None and any(label is not None for label in query_labels):
        same = torch.tensor([query_labels[r] is not None and gallery_labels[g] == query_labels[r]
                             for r, g in zip(row.tolist(), col.tolist())], dtype=torch.uint8)
        order = order[torch.argsort(same[order], stable=True)]  # ...other-class items ahead of same-class ones...
    order = order[torch.argsort(exact[order], descending=True, stable=True)]  # ...under the score...
    order = order[torch.argsort(row[order], stable=True)]  # ...within each query's row
    counts = torch.bincount(row, minlength=num_rows)  # [n], each >= k (or 0: a row filled in elsewhere)
    first = (torch.cumsum(counts, 0) - counts)[:, None] + torch.arange(k)  # [n, k] positions of the k best
    picked = order[first.clamp(max=len(order) - 1)]
    return col[picked], exact[picked]
