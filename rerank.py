"""Post-processing of a ranking, from top-K neighbour lists (memory O(N x K), never N x N): the METHODS registry
(`none`, `aqe`, `kreciprocal`), their parameters (`k=10,alpha=3`), a split's ranking statistics after a method
(post_stats), and the Reranker that test.py and serve.py search through. Evaluating a database with them and --tune
are rerank_eval.py's.

aqe: every vector, gallery item or query, becomes itself plus its k nearest gallery vectors (never itself), each
weighted by max(similarity, 0)^alpha, renormalised (database-side augmentation; for a query, alpha query expansion;
Radenovic, Tolias and Chum, TPAMI 2019); queries are then ranked against the augmented gallery.
kreciprocal: Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017:
k-reciprocal sets of k1 with their k1/2 expansion, weights exp(-distance), local query expansion over k2
neighbours, Jaccard distance blended with the original squared distance by lambda; each query's first `depth`
results are reordered, the rest keep their order. Where query and gallery are one set, each item is left out of
its own lists; a separate query set joins the neighbour graph as in the reference implementation. Only the items a
query's distances read are encoded, so one query from outside a gallery (test.py, serve.py) costs its own lists, the
gallery lists it enters and a few hundred encodings, the gallery's lists being found once at start."""
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

import metrics
import search
from cli import UserError

CHUNK = 1024  # rows of one step of the list computations, at most
BYTES = 2 ** 26  # and the temporaries of one step at most this: 64 MiB


@dataclasses.dataclass(frozen=True)
class Param:
    kind: type
    low: float
    high: float
    default: float


@dataclasses.dataclass(frozen=True)
class Method:
    params: dict   # name -> Param
    grid: dict     # name -> values --tune tries (the others at their default)


METHODS = {
    'none': Method({}, {}),
    'aqe': Method({'k': Param(int, 0, 1000, 10), 'alpha': Param(float, 0, 100, 3.0)},
                  {'k': (2, 5, 10, 20), 'alpha': (1.0, 3.0)}),
    'kreciprocal': Method({'k1': Param(int, 1, 1000, 20), 'k2': Param(int, 1, 1000, 6),
                           'lambda': Param(float, 0, 1, 0.3), 'depth': Param(int, 1, 10 ** 6, 100)},
                          {'k1': (10, 20, 30), 'k2': (3, 6), 'lambda': (0.1, 0.3, 0.6)}),
}


# ---- parameters ----

def parse_args(method, text):
    """'k=10,alpha=3' -> {every parameter of the method: value} (defaults for the others); unknown names or values
    out of range are a UserError."""
    if method not in METHODS:
        raise UserError(f'--rerank {method}: unknown method; choose one of {", ".join(METHODS)}')
    spec, params = METHODS[method].params, {}
    for item in filter(None, (text or '').split(',')):
        name, sep, value = (part.strip() for part in item.partition('='))
        if name not in spec or not sep:
            known = ', '.join(spec) or 'none'
            raise UserError(f"--rerank_args '{text}': '{item}' is not NAME=VALUE of a parameter of {method} ({known})")
        p = spec[name]
        try:
            number = p.kind(value)
        except ValueError:
            number = math.nan
        if not p.low <= number <= p.high or (p.kind is float and not math.isfinite(float(value))):
            raise UserError(f"--rerank_args {name}={value}: {method}'s {name} must be "
                            f"{'an integer' if p.kind is int else 'a number'} from {p.low:g} to {p.high:g}")
        params[name] = number
    return {name: params.get(name, p.default) for name, p in spec.items()}


def params_text(params):
    return ','.join(f'{k}={v:g}' for k, v in params.items()) or '-'


# ---- neighbour lists ----

def neighbour_lists(queries, gallery, k):
    """The k nearest gallery items of each query (gallery None: of each item among the others) -> (scores [n, k]
    float64, indices [n, k]), best first."""
    n = len(gallery if gallery is not None else queries) - (gallery is None)
    k = min(k, n)
    if k == 0:
        return torch.zeros(len(queries), 0, dtype=torch.float64), torch.zeros(len(queries), 0, dtype=torch.long)
    scores, indices = search.knn(queries, gallery, k=k, exclude_self=gallery is None)
    return scores.double(), indices.long()


def list_length(params):
    """How long kreciprocal's lists are: they give the reordered candidates, the k1 and k2 nearest."""
    return max(params['depth'], params['k1'], params['k2'])


def similarities(gallery, queries):
    """gallery [c, D] x queries [n, D] -> [c, n] float64, rounded to float32 as search.py's scores are (so that
    they order among the lists' scores the same way, whichever product computed them)."""
    return (gallery.double() @ queries.double().T).float().double()


def merged_lists(lists, gallery, queries, k):
    """The lists of the set [queries; gallery] from the gallery's own lists (scores, indices into gallery): each
    query's k nearest among the others, each gallery list with the queries merged in -> (scores, indices) into the
    set; on equal scores the gallery items come first."""
    nq = len(queries)
    gs, gi = neighbour_lists(queries, gallery, k)
    gi = gi + nq
    if nq > 1:
        qs, qi = neighbour_lists(queries, None, k)
        gs, gi = _best(torch.cat([gs, qs], 1), torch.cat([gi, qi], 1), k)
    parts_s, parts_i = [], []
    for begin in range(0, len(gallery), CHUNK):
        block = slice(begin, begin + CHUNK)
        s, i = _with_queries(lists[0][block], lists[1][block], similarities(gallery[block], queries), k)
        parts_s.append(s)
        parts_i.append(i)
    return torch.cat([gs] + parts_s), torch.cat([gi] + parts_i)


def _with_queries(scores, indices, sims, k):
    """Gallery lists (scores, indices into the gallery) [c, K] with nq queries' similarities [c, nq] merged in ->
    the k best of each row, indices into [queries; gallery]."""
    nq = sims.shape[1]
    return _best(torch.cat([scores, sims], 1), torch.cat([indices + nq, torch.arange(nq).expand(len(sims), nq)], 1),
                 k)


def _best(scores, indices, k):
    """The k best of each row by score, stable: on equal scores the earlier column first."""
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


# ---- aqe ----

def augment(vectors, base, lists, k, alpha):
    """Each of vectors [n, D] plus its k listed base vectors weighted by max(similarity, 0)^alpha, renormalised ->
    [n, D]; lists (scores, indices into base) best first, never the vector itself. k = 0: vectors unchanged."""
    if k == 0:
        return vectors
    scores, indices = lists[0][:, :k], lists[1][:, :k]
    out = torch.empty_like(vectors)
    for begin in range(0, len(vectors), CHUNK):
        end = begin + CHUNK
        weights = scores[begin:end].clamp(min=0).pow(alpha).to(vectors.dtype)         # [c, k]
        neighbours = base[indices[begin:end]]                                           # [c, k, D]
        out[begin:end] = F.normalize(vectors[begin:end] + (weights[:, :, None] * neighbours).sum(1), dim=1)
    return out


# ---- k-reciprocal ----

def graph(lists):
    """The neighbour graph kreciprocal reads, from each item's list among the others (scores, indices) [N, K] ->
    (ranked [N, K + 1]: itself first, then its list; scale [N]: what divides its squared distances)."""
    num = len(lists[1])
    return torch.cat([torch.arange(num)[:, None], lists[1]], 1), _scales(lists, num)


def kreciprocal(features, neighbours, rows, candidates, k1, k2, lam, scores=None, jaccard=None):
    """Blended distances of the set features [N, D] (normalised) with its graph (ranked, scale; lists at least k1
    long), for the items `rows` [n] against their candidates [n, C] (set indices) -> distances [n, C] float64
    (Zhong et al.'s final distance; the reference squares its distance input, so the original distance here is the
    squared Euclidean one, 2 - 2 cos, divided by scale). scores [n, C]: the candidates' similarities where known
    (search.py's, float64 rounded to float32, as pair_similarities gives); jaccard: jaccard_distances' answer where
    known (it does not depend on lam)."""
    if jaccard is None:
        jaccard = jaccard_distances(features, neighbours, rows, candidates, k1, k2)
    if scores is None:
        scores = pair_similarities(features, rows, candidates)
    distance = (2 - 2 * scores.double()).clamp(min=0) / neighbours[1][rows][:, None]
    return (1 - lam) * jaccard + lam * distance


def jaccard_distances(features, neighbours, rows, candidates, k1, k2):
    """kreciprocal's Jaccard distances [n, C] float64 of rows [n] against candidates [n, C]. Only the items they
    read are encoded: the rows, the candidates and their k2 nearest."""
    ranked, scale = neighbours
    num = len(features)
    half = int(np.around(k1 / 2.))
    wanted = torch.unique(torch.cat([rows, candidates.flatten()]))           # [w] the items whose weights are read
    near = ranked[wanted, :max(k2, 1)]                                       # [w, k2] itself first
    encoded = torch.unique(near)                                             # [e] the items encoded
    v_ids, v_vals = _encode(features, ranked, encoded, k1, half, scale)      # [e, W] each, ids sorted
    slot = torch.full((num,), -1, dtype=torch.long)
    slot[encoded] = torch.arange(len(encoded))
    if k2 > 1:
        v_ids, v_vals = _local_expansion(slot[near], v_ids, v_vals, num)     # [w, W'], ids sorted
    else:
        v_ids, v_vals = v_ids[slot[wanted]], v_vals[slot[wanted]]
    slot[wanted] = torch.arange(len(wanted))
    jaccard = torch.empty(candidates.shape, dtype=torch.float64)
    step = _rows(candidates.shape[1] * v_ids.shape[1] * 24)
    for begin in range(0, len(rows), step):
        r, cand = slot[rows[begin:begin + step]], slot[candidates[begin:begin + step]]  # [c], [c, C]
        own_ids, own_vals = v_ids[r], v_vals[r]                              # [c, W] the rows' weights
        ids, vals = v_ids[cand].flatten(1), v_vals[cand].flatten(1)          # [c, C W] the candidates'
        # each candidate weight meets the row's weight of the same id, found by bisection in the row's sorted ids
        at = torch.searchsorted(own_ids, ids).clamp(max=own_ids.shape[1] - 1)
        met = torch.where(own_ids.gather(1, at) == ids, own_vals.gather(1, at), 0)  # padding meets value 0
        shared = torch.minimum(vals, met).view(cand.shape + (-1,)).sum(2)   # [c, C]
        jaccard[begin:begin + step] = 1 - shared / (2 - shared)
    return jaccard


def pair_similarities(features, rows, columns):
    """features [N, D] (normalised): each row item's similarity with its columns, rows [n], columns [n, m] ->
    [n, m] float64 of the float64 products rounded to float32, as search.py scores (and orders) its lists."""
    out = torch.empty(columns.shape, dtype=torch.float64)
    step = _rows(columns.shape[1] * features.shape[1] * 12)
    for begin in range(0, len(rows), step):
        part = features[columns[begin:begin + step]].double()               # [c, m, D]
        out[begin:begin + step] = torch.bmm(part, features[rows[begin:begin + step]].double()[:, :, None])[..., 0]
    return out.float().double()


def _rows(row_bytes):
    """Rows of one step whose temporaries take row_bytes each: at most CHUNK, and at most BYTES in all."""
    return max(1, min(CHUNK, BYTES // max(row_bytes, 1)))


def _scales(lists, num):
    """Each item's largest squared distance (the reference's row normalisation) where its list covers the whole
    set; else 4, the largest two unit vectors can have (the farthest item is not in a top-K list)."""
    if lists[0].shape[1] >= num - 1:
        return (2 - 2 * lists[0].min(1).values).clamp(min=1e-12)
    return torch.full((num,), 4.0, dtype=torch.float64)


def _reciprocal(ranked, listed, owners, k):
    """Whether each item of `listed` [..., m] has its owner (owners [...], one per row of m) among its own k + 1
    nearest (itself first) -> bool [..., m]."""
    return (ranked[listed, :k + 1] == owners[..., None, None]).any(-1)


def _encode(features, ranked, items, k1, half, scale):
    """The k-reciprocal set of each of `items` [e], expanded by the half sets that overlap it by more than 2/3, as
    sparse weights exp(-distance) summing to 1 -> (ids [e, W], values [e, W]); padding: id N, value 0."""
    num = len(ranked)
    parts, step = [], _rows((k1 + 1) ** 2 * (half + 1) * 8)               # `inside` below: [c, k1+1, half+1, k1+1]
    for begin in range(0, len(items), step):
        rows = items[begin:begin + step]                                     # [c]
        forward = ranked[rows, :k1 + 1]                                      # [c, k1 + 1]
        own = _reciprocal(ranked, forward, rows, k1)
        members = torch.where(own, forward, -1)                              # [c, k1 + 1] the reciprocal set
        halves = ranked[forward, :half + 1]                                  # [c, k1 + 1, half + 1]
        half_ok = _reciprocal(ranked, halves, forward, half)
        inside = (halves[..., None] == members[:, None, None, :]).any(3) & half_ok
        accept = own & (inside.sum(2) > 2. / 3 * half_ok.sum(2))             # [c, k1 + 1]
        extra = torch.where(half_ok & accept[..., None], halves, -1).flatten(1)
        ids = torch.cat([members, extra], 1)                                 # [c, W0], -1: none
        ids = torch.where(ids < 0, num, ids).sort(1).values
        ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = num                          # duplicates
        ids = ids.sort(1).values
        width = int((ids < num).sum(1).max())
        ids = ids[:, :width]
        valid = ids < num
        sims = pair_similarities(features, rows, ids.clamp(max=num - 1))   # [c, W]
        weight = torch.where(valid, torch.exp(-(2 - 2 * sims).clamp(min=0) / scale[rows][:, None]), 0)
        parts.append((ids, weight / weight.sum(1, keepdim=True)))
    return _pad(parts, num)


def _local_expansion(near, ids, vals, num):
    """Weights averaged over each row of near [w, k2] (rows of ids, vals: an item's k2 nearest, itself first) ->
    (ids, values) [w, W'] as _encode."""
    parts, k2 = [], near.shape[1]
    for begin in range(0, len(near), CHUNK // 4):
        group = near[begin:begin + CHUNK // 4]                               # [c, k2]
        gi, order = ids[group].flatten(1).sort(dim=1, stable=True)              # [c, k2 W] each row's ids in order
        gv = vals[group].flatten(1).gather(1, order)
        first = torch.ones_like(gi, dtype=torch.bool)
        first[:, 1:] = gi[:, 1:] != gi[:, :-1]                               # an id's first place in its row
        run = torch.cumsum(first.flatten(), 0) - 1                           # [c k2 W] each place's (row, id) run
        sums = torch.zeros(int(run[-1]) + 1, dtype=torch.float64).index_add_(0, run, gv.flatten()) / k2
        slot = torch.cumsum(first, 1) - 1                                    # [c, k2 W] each id's column
        width = max(int(slot[:, -1].max()) + 1, 1)
        out_i = torch.full((len(group), width), num, dtype=torch.long).scatter_(1, slot, gi)
        out_v = torch.zeros(len(group), width, dtype=torch.float64).scatter_(1, slot, sums[run].view(gi.shape))
        parts.append((out_i, out_v))
    return _pad(parts, num)


def _pad(parts, num):
    width = max(p[0].shape[1] for p in parts)
    ids = torch.cat([F.pad(i, (0, width - i.shape[1]), value=num) for i, _ in parts])
    vals = torch.cat([F.pad(v, (0, width - v.shape[1])) for _, v in parts])
    return ids, vals


# ---- a database's splits, post-processed ----

def post_stats(method, params, queries, query_labels, gallery=None, gallery_labels=None, plain=None, lists=None,
               cache=None):
    """RankStats of the queries after `method` (gallery None: the queries rank each other, each left out of its own
    lists); plain: their RankStats without it (kreciprocal reorders those); lists: the set's own lists, when known;
    cache: a dict kept across calls on the same data (kreciprocal's Jaccard distances by k1, k2, depth)."""
    if method == 'none':
        return plain if plain is not None else metrics.rank_stats(queries, query_labels, gallery, gallery_labels)
    queries, gallery = (None if x is None else F.normalize(x.float(), dim=1) for x in (queries, gallery))
    base = queries if gallery is None else gallery
    if method == 'aqe':
        lists = lists or neighbour_lists(base, None, params['k'])
        augmented = augment(base, base, lists, params['k'], params['alpha'])
        if gallery is None:
            return metrics.rank_stats(augmented, query_labels)
        expanded = augment(queries, gallery, neighbour_lists(queries, gallery, params['k']), params['k'],
                           params['alpha'])
        return metrics.rank_stats(expanded, query_labels, augmented, gallery_labels)
    plain = plain if plain is not None else metrics.rank_stats(queries, query_labels, gallery, gallery_labels)
    if params['lambda'] == 1:  # the original distance alone: the plain ranking, exactly
        return plain
    depth, length = params['depth'], list_length(params)
    lists = (lists[0][:, :length], lists[1][:, :length]) if lists else neighbour_lists(base, None, length)
    query_ids, gallery_ids = metrics.label_ids(query_labels, query_labels if gallery is None else gallery_labels)
    if gallery is None:
        features, rows, cand_scores, cand = base, torch.arange(len(base)), lists[0][:, :depth], lists[1][:, :depth]
    else:
        features, rows = torch.cat([queries, gallery]), torch.arange(len(queries))
        lists = merged_lists(lists, gallery, queries, length)
        cand_scores, cand = neighbour_lists(queries, gallery, depth)
    neighbours, columns = graph(lists), cand + (0 if gallery is None else len(queries))  # [n, depth] set indices
    key, cache = (params['k1'], params['k2'], depth), {} if cache is None else cache
    if key not in cache:
        cache[key] = jaccard_distances(features, neighbours, rows, columns, params['k1'], params['k2'])
    distances = kreciprocal(features, neighbours, rows, columns, params['k1'], params['k2'], params['lambda'],
                            cand_scores, cache[key])
    same = gallery_ids[cand] == query_ids[:, None]                                  # [n, depth]
    # ties go against the query, as in metrics.py: other-class items first
    before = _order(-cand_scores, same)
    after = _order(distances, same)
    return metrics.reordered_stats(plain, same.gather(1, before), same.gather(1, after))


def _order(keys, same):
    """Column order by keys [n, C] ascending, ties with other-class (same False) columns first."""
    first = torch.argsort(same.to(torch.int8), dim=1, stable=True)
    return first.gather(1, torch.argsort(keys.gather(1, first), dim=1, stable=True))


# ---- searching through a method ----

class Reranker:
    """A gallery (search.Gallery or features [N, D]) and its labels prepared once for a method: for aqe the gallery
    augmented, for kreciprocal its neighbour lists; then each search answers as search.top_k(_batch) does."""

    def __init__(self, method, params, gallery, labels):
        self.method, self.params, self.labels = method, params, labels
        self.gallery = self.searched = search.as_gallery(gallery)
        self.features = features = self.gallery.features.float()  # [N, D] normalised
        if method == 'aqe':
            self.lists = neighbour_lists(features, None, params['k'])
            self.searched = search.Gallery(augment(features, features, self.lists, params['k'], params['alpha']))
        if method == 'kreciprocal':
            # lists covering the gallery: as the evaluation builds them; otherwise the k1 and k2 nearest are all
            # a query's distances read, and an outside query is merged into the few lists it enters
            self.length = list_length(params)
            self.full = self.length >= len(features) - 1
            self.lists = neighbour_lists(features, None, self.length if self.full else max(params['k1'], params['k2']))
            self.graph = graph(self.lists)
            self.shifted = torch.cat([torch.zeros(1, self.graph[0].shape[1], dtype=torch.long), self.graph[0] + 1])

    def top_k(self, feature, k, exclude=None, query_label=None):
        """The k best items for a query feature [D] (exclude: its index where it is a gallery item) -> (indices,
        scores), lists of k; kreciprocal's score is 1 - the blended distance."""
        indices, scores = self.top_k_batch(feature[None], k, [exclude], [query_label])
        return indices[0].tolist(), scores[0].tolist()

    def top_k_batch(self, queries, k, excludes=None, query_labels=None):
        """top_k for queries [n, D] -> (indices [n, k], scores [n, k]); excludes, query_labels: one per query."""
        excludes = [None] * len(queries) if excludes is None else list(excludes)
        query_labels = [None] * len(queries) if query_labels is None else list(query_labels)
        if self.method == 'kreciprocal':
            found = [self._kreciprocal(q, k, e, label) for q, e, label in zip(queries, excludes, query_labels)]
            return torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])
        if self.method == 'aqe':
            queries = F.normalize(torch.as_tensor(queries).float(), dim=1)
            lists = neighbour_lists(queries, self.features, self.params['k'])
            queries = augment(queries, self.features, lists, self.params['k'], self.params['alpha'])
            inside = [i for i, e in enumerate(excludes) if e is not None]  # a gallery item: augmented at start
            queries[inside] = self.searched.features[[excludes[i] for i in inside]].float()
        return search.top_k_batch(queries, self.searched, k, excludes, self.labels, query_labels)

    def _kreciprocal(self, feature, k, exclude, label):
        p = self.params
        depth = min(p['depth'], len(self.features) - (exclude is not None))
        order, plain = search.top_k_batch(feature[None], self.gallery, max(k, depth), [exclude], self.labels, [label])
        order, plain = order[0], plain[0].double()
        if p['lambda'] == 1:
            return order[:k], plain[:k].float()
        if exclude is not None:  # a gallery item: the gallery's own graph
            features, neighbours, row, offset = self.features, self.graph, exclude, 0
        else:
            query = F.normalize(feature.float(), dim=0)[None]  # [1, D]
            features, neighbours, row, offset = torch.cat([query, self.features]), self._with_query(query), 0, 1
        cand = order[:depth]
        distances = kreciprocal(features, neighbours, torch.tensor([row]), (cand + offset)[None], p['k1'], p['k2'],
                                p['lambda'], plain[None, :depth])[0]
        rest = (1 - p['lambda']) + p['lambda'] * (2 - 2 * plain[depth:]) / neighbours[1][row]
        reorder = torch.argsort(distances, stable=True)
        final = torch.cat([cand[reorder], order[depth:]])
        return final[:k], (1 - torch.cat([distances[reorder], rest]))[:k].float()

    def _with_query(self, query):
        """The graph of [query; gallery] (what the evaluation builds for one query) from the gallery's: the query's
        own list, and the gallery lists whose last score it beats merged with it (a few, not N)."""
        if self.full:
            return graph(merged_lists(self.lists, self.features, query, self.length))
        width = self.lists[1].shape[1]
        ranked = self.shifted.clone()  # [N + 1, width + 1]
        ranked[0, 1:] = neighbour_lists(query, self.features, width)[1][0] + 1
        sims = similarities(self.features, query)  # [N, 1]
        entered = torch.nonzero(sims[:, 0] > self.lists[0][:, -1]).flatten()
        ranked[entered + 1, 1:] = _with_queries(self.lists[0][entered], self.lists[1][entered], sims[entered],
                                                width)[1]
        return ranked, torch.full((len(ranked),), 4.0, dtype=torch.float64)  # _scales of lists not covering the set
