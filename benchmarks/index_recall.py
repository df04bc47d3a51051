"""What an approximate index costs and gives, per index spec: build time, index size (its memory once loaded), p50
latency of one query (indexes.top_k: the index's candidates scored exactly, as test.py and serve.py search), 1-NN
recall against exact search, and class-level R@1 / R@8 beside exact search's on the same queries. An index is
built once and searched with each nprobe / efSearch listed (search-time parameters, as test.py --nprobe sets them).
Builds use --build_threads faiss threads; queries are timed on one thread (see one_thread).

    nice python benchmarks/index_recall.py                      # demo, SOP size, 1M x 512, Milvus Lite beside
    nice python benchmarks/index_recall.py --cases 1m --only IVF  # the 1M case's IVF specs alone
    python benchmarks/index_recall.py --cases demo --queries 100  # quick

Cases: `demo`, a 576-image (24 classes) database written by the tests' helper (random ResNet-18, 1536-d features:
the demo's test split in size); `sop`, 60,502 x 1536 synthetic; `1m`, 1,000,000 x 512 synthetic. The synthetic
features are clustered as real embeddings are (see clustered): in a 48-dimensional subspace plus a little isotropic
noise, in two levels: super-classes of 500 images, classes of 2-12 images (mean 5.3, as SOP's) around a point of
their super-class, images around their class's point; the image spread (`--spread`, per case by default) makes
exact R@1 about 70 %, as a trained model's on SOP (it is printed). `milvus` publishes the demo database and a
20,000-row slice of the 1M features to a Milvus Lite file (FLAT and IVF_FLAT) and times the same queries there."""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]
import indexes  # noqa: E402
import retrieval  # noqa: E402
import search  # noqa: E402

CASES = {  # name -> (rows, dim, image spread, [(spec, search parameter, [its values, each measured])])
    'demo': (576, 1536, None, [('Flat', None, [None]), ('IVF16,Flat', 'nprobe', [4]), ('HNSW32', 'efsearch', [64])]),
    'sop': (60_502, 1536, 1.2, [('IVF256,Flat', 'nprobe', [8, 16]), ('HNSW32', 'efsearch', [64, 128]),
                                ('IVF256,PQ96', 'nprobe', [16, 64]), ('IVF256,PQ192x4fs', 'nprobe', [16, 64])]),
    '1m': (1_000_000, 512, 1.1, [('IVF1024,Flat', 'nprobe', [16, 32, 64]),
                                 ('IVF256,PQ64x4fs', 'nprobe', [8, 16, 32, 64, 128]),
                                 ('IVF1024,PQ64x4fs', 'nprobe', [64, 128]), ('HNSW32', 'efsearch', [64, 128])]),
}
MILVUS_ROWS = 20_000


def clustered(n, dim, spread, seed, intrinsic=48, noise=0.1, super_size=500):
    """Synthetic features [n, dim] (float32, normalised) and labels [n], clustered as embeddings are: points of an
    `intrinsic`-dimensional space (super-class points, class points around them with unit variance, images around
    their class point with `spread` times that), placed in `dim` dimensions by a random orthonormal map, with
    isotropic noise of norm about `noise` added. A trained embedding's spread lies in a few dozen directions, not in
    all of them: with spread in every dimension the nearest neighbour is barely nearer than hundreds of others."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(2 + rng.poisson(3.3, size=n), 2, 12)
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]  # classes in blocks, so a super-class is a run of them
    classes = labels[-1] + 1
    supers = rng.standard_normal((max(1, n // super_size), intrinsic), dtype=np.float32)
    centres = supers[np.arange(classes) * len(supers) // classes] + rng.standard_normal((classes, intrinsic),
                                                                                       dtype=np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)  # [intrinsic, dim]
    features = np.empty((n, dim), dtype=np.float32)
    for begin in range(0, n, 100_000):  # bounded temporaries
        end = min(begin + 100_000, n)
        inner = centres[labels[begin:end]] + spread * rng.standard_normal((end - begin, intrinsic), dtype=np.float32)
        block = (inner / np.linalg.norm(inner, axis=1, keepdims=True)) @ basis  # [b, dim], unit rows
        block += noise / dim ** 0.5 * rng.standard_normal((end - begin, dim), dtype=np.float32)
        features[begin:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return torch.from_numpy(features), [str(v) for v in labels]


def demo_database(folder):
    """The demo's test split in size, written by the tests' helper (random images, random ResNet-18, 1536-d)."""
    from _query_fixtures import make_database, make_split
    paths, labels, _ = make_split(os.path.join(folder, 'images'), [str(i // 24) for i in range(576)], seed=5)
    path, _ = make_database(os.path.join(folder, 'db'), (paths, labels), feature_dim=512)
    return retrieval.open_database(path, folder, torch.device('cpu'), with_model=False)


@contextlib.contextmanager
def one_thread():
    """One query is a matrix-vector product or a few short scans: timed on one thread (torch and faiss). On a shared
    2-core machine two threads made search.top_k of 576 rows take 52 ms instead of 1 ms (threads waiting for
    each other), which measures the machine's load, not the search."""
    import faiss
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def exact_neighbours(features, queries, k=8, batch=64):
    """Exact top k of each query (itself excluded), by batched products -> [q, k] indices. Ties, which the
    synthetic features do not have, would be ordered as torch.topk orders them."""
    found = []
    for begin in range(0, len(queries), batch):
        chunk = torch.as_tensor(queries[begin:begin + batch])
        scores = F.normalize(features[chunk].float(), dim=1) @ F.normalize(features.float(), dim=1).T  # [b, N]
        scores[torch.arange(len(chunk)), chunk] = -float('inf')  # the query itself is no result
        found.append(scores.topk(k, dim=1).indices.numpy())
    return np.concatenate(found)


@one_thread()
def exact_ms(database, queries, repeats=5):
    """p50 of one query by the exact search test.py and serve.py use without an index (search.top_k over the
    features normalised once)."""
    times, gallery = [], search.Gallery(database.features)
    for q in queries[:repeats]:
        start = time.perf_counter()
        search.top_k(database.features[q], gallery, 8, q, database.labels, database.labels[q])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def recalls(found, labels, queries, ks=(1, 8)):
    """R@k (%) of neighbour lists [q][<=8] for the queries."""
    return [100 * np.mean([any(labels[i] == labels[q] for i in row[:k]) for row, q in zip(found, queries)])
            for k in ks]


@one_thread()
def measure(index, database, queries, truth, build_s, size):
    """One row: build s, size MiB, p50 ms, 1-NN recall, R@1, R@8 through indexes.top_k."""
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        indices, _ = indexes.top_k(index, database, database.features[q], 8, q, database.labels[q])
        times.append(time.perf_counter() - start)
        found.append(indices)
    nn = np.mean([len(row) > 0 and row[0] == t[0] for row, t in zip(found, truth)])
    r1, r8 = recalls(found, database.labels, queries)
    return [f'{build_s:.1f}', f'{size / 2 ** 20:.1f}', f'{1000 * statistics.median(times):.2f}', f'{nn:.3f}',
            f'{r1:.2f}', f'{r8:.2f}']


def index_bytes(index):
    """What the index takes in memory, as the bytes faiss serialises it to (counted, not kept)."""
    import faiss
    total = [0]

    def count(block):
        total[0] += len(block)
        return len(block)
    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total[0]


def run_case(name, database, specs, n_queries, seed, build_threads):
    n, dim = database.features.shape
    queries = np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False)
    truth = exact_neighbours(database.features, queries)
    r1, r8 = recalls(truth, database.labels, queries)
    rows = [[name, 'exact (search.top_k)', '-', f'{n * dim * 4 / 2 ** 20:.1f}', f'{exact_ms(database, queries):.2f}',
             '1.000', f'{r1:.2f}', f'{r8:.2f}']]
    print(' | '.join(rows[-1]), flush=True)
    import faiss
    for spec, parameter, values in specs:
        faiss.omp_set_num_threads(build_threads)
        start = time.perf_counter()
        index = indexes.build_faiss(database.features, spec, progress=False)
        build_s, size = time.perf_counter() - start, index_bytes(index)
        for value in values:  # search-time parameters, as test.py / serve.py --nprobe / --efsearch set them
            indexes.set_search_parameters(index, *((value, None) if parameter == 'nprobe' else (None, value)), spec)
            opened = types.SimpleNamespace(index=index, search=lambda x, k, index=index: index.search(x, k))
            shown = f'faiss {spec}' + (f' ({parameter} {value})' if parameter else '')
            rows.append([name, shown] + measure(opened, database, queries, truth, build_s, size))
            print(' | '.join(rows[-1]), flush=True)
        del index, opened
    return rows, queries, truth


def run_milvus(name, database, queries, truth, folder):
    rows = []
    for index_type, nprobe in (('FLAT', None), ('IVF_FLAT', 16)):
        target = os.path.join(folder, f'milvus_{len(rows)}_{len(database.labels)}.db')
        start = time.perf_counter()
        indexes.build(database, target, nprobe=nprobe, milvus_index=index_type, progress=False)
        build_s = time.perf_counter() - start
        index = indexes.open_index(target, database)
        row = measure(index, database, queries, truth, build_s, 0)
        rows.append([name, f'Milvus Lite {index_type}{f" (nprobe {nprobe})" if nprobe else ""}', row[0], '-'] + row[2:])
        print(' | '.join(rows[-1]), flush=True)
        index.client.close()
    return rows


def synthetic_database(features, labels, folder, name):
    """A stand-in for retrieval.Database over synthetic features: a file to hash (the features' bytes), names."""
    path = os.path.join(folder, f'{name}.npy')
    np.save(path, features.numpy())
    return types.SimpleNamespace(path=path, features=features, labels=labels, split='test',
                                 images=[f'{name}/{i}.jpg' for i in range(len(labels))])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cases', default='demo,sop,1m,milvus', help='comma-separated: demo, sop, 1m, milvus')
    parser.add_argument('--queries', default=300, type=int, help='queries per case (gallery items, self excluded)')
    parser.add_argument('--spread', default=None, type=float, help='image spread around the class points '
                        '[default: per case, exact R@1 about 70 %%: sop 1.2, 1m 1.1]')
    parser.add_argument('--only', default='', help='measure only the specs containing this text (e.g. HNSW)')
    parser.add_argument('--build_threads', default=1, type=int, help='faiss threads while building [default: 1: on '
                        'a loaded 2-core machine two threads made IVF-PQ adds 3.6x slower, waiting for each other]')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--exact_only', action='store_true', help='exact search alone (no index built)')
    args = parser.parse_args(argv)
    cases = args.cases.split(',')
    print(f'torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}')
    print('case | index | build s | size MiB | p50 ms | 1-NN recall | R@1 % | R@8 % (exact: its own R@K)')
    table = []
    with tempfile.TemporaryDirectory() as folder:
        demo = demo_database(folder) if 'demo' in cases or 'milvus' in cases else None
        for name in ('demo', 'sop', '1m'):
            if name not in cases and not (name in ('demo', '1m') and 'milvus' in cases):
                continue
            n, dim, spread, specs = CASES[name]
            database = demo if name == 'demo' else synthetic_database(
                *clustered(n, dim, args.spread or spread, args.seed), folder, name)
            specs = [spec for spec in specs if args.only in spec[0]] if name in cases and not args.exact_only else []
            rows, queries, truth = run_case(name, database, specs, args.queries, args.seed, args.build_threads)
            table += rows if name in cases else []
            if 'milvus' in cases and name in ('demo', '1m'):
                if name == '1m':  # a slice: Milvus Lite's inserts and index builds are slow
                    features, labels = database.features[:MILVUS_ROWS].clone(), database.labels[:MILVUS_ROWS]
                    database = synthetic_database(features, labels, folder, 'slice')
                    name = f'1m, first {MILVUS_ROWS:,}'
                    rows, queries, truth = run_case(name, database, [], args.queries, args.seed, args.build_threads)
                    table += rows
                table += run_milvus(name, database, queries, truth, folder)
            del database
    print('\n| case | index | build s | size MiB | p50 ms | 1-NN recall | R@1 % | R@8 % |\n| --- ' * 1 +
          '| --- ' * 7 + '|')
    for row in table:
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
