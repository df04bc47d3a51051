"""Stand-in for the search module of the gallery-scale work (replaced by it on merge): k nearest neighbours in
bounded memory."""
import torch


def knn(queries, gallery=None, k=10, exclude_self=True):
    """The k most similar gallery items of each query by inner product -> (scores [n, k], indices [n, k]), best
    first; gallery None: the queries themselves, each left out of its own list."""
    base = queries if gallery is None else gallery
    scores, indices = [], []
    for begin in range(0, len(queries), 1024):
        sims = queries[begin:begin + 1024].float() @ base.float().T
        if gallery is None and exclude_self:
            rows = torch.arange(len(sims))
            sims[rows, rows + begin] = -float('inf')
        top = sims.topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)
