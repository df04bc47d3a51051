"""Latency of exact search: search.py beside the plain arithmetic (`G @ q` and `torch.topk` on the same tensor) and
faiss `IndexFlatIP` (the library's exact search), one query at a time and in batches, in one run.

    python benchmarks/search_speed.py                                   # 60,502 x 1536 and 1,000,000 x 512
    python benchmarks/search_speed.py --sizes 2000x64 --queries 5 --batch 16   # quick run

Features: L2-normalised clustered synthetic ones (benchmarks/eval_scale.py's: class centres plus noise). One query:
the p50 over --queries queries, half of them gallery items (excluded from their own list, searched with their label:
a database query), half new vectors (an upload). Batched: --batch new vectors at once, the time per query. Each method runs in a process of its
own on the same saved features and queries; its top k lists are compared with search.py's (same items, same order)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search  # noqa: E402
from eval_scale import default_noise, make_features  # noqa: E402

METHODS = ('search.py', 'G @ q + topk', 'faiss IndexFlatIP')


def parse_size(text):
    try:
        num, dim = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not NUMxDIM') from None
    if num < 2 or dim < 1:
        raise argparse.ArgumentTypeError(f'{text}: need at least 2 vectors of at least 1 dimension')
    return num, dim


def one_query_methods(features, gallery, index, labels, k):
    """{method: search(query [D], its gallery index to leave out or None) -> top-k indices}; the plain ones ask
    for one more and drop the query itself, as a caller of theirs would."""
    def ours(query, exclude):
        label = None if exclude is None else labels[exclude]
        return search.top_k(query, gallery, k, exclude, labels, label)[0]

    def plain(query, exclude):
        found = torch.topk(features @ query, k + (exclude is not None)).indices.tolist()
        return [i for i in found if i != exclude][:k]

    def flat(query, exclude):
        found = index.search(query.numpy()[None], k + (exclude is not None))[1][0].tolist()
        return [i for i in found if i != exclude][:k]
    return dict(zip(METHODS, (ours, plain, flat)))


def batch_methods(features, gallery, index, k):
    """{method: search(queries [B, D]) -> top-k indices [B, k]} (new vectors: nothing excluded, no labels)."""
    chunk = max(1, search.CHUNK_BYTES // (4 * len(features)))

    def ours(queries):
        return search.top_k_batch(queries, gallery, k)[0]

    def plain(queries):  # the same chunks of queries as search.py
        return torch.cat([torch.topk(part @ features.T, k, dim=1).indices for part in queries.split(chunk)])

    def flat(queries):
        return torch.from_numpy(index.search(queries.numpy(), k)[1])
    return dict(zip(METHODS, (ours, plain, flat)))


def queries_for(features, args):
    """The single queries [(vector [D], its gallery index or None)]: half gallery items, half new vectors; and the
    batch [B, D] of new vectors. The same in every process (seeded)."""
    num, dim = features.shape
    inside = np.random.default_rng(args.seed + 1).choice(num, size=(args.queries + 1) // 2, replace=False).tolist()
    new = torch.nn.functional.normalize(torch.randn(args.queries // 2 + args.batch, dim,
                                                    generator=torch.Generator().manual_seed(args.seed)), dim=1)
    singles = [(features[i].clone(), i) for i in inside] + [(q, None) for q in new[:args.queries // 2]]
    return singles, new[args.queries // 2:]


def child(args):
    """One method on the saved features, in a process of its own (torch's and faiss's OpenMP threads, spinning
    after each parallel region, would slow each other down in one) -> one JSON line: the single queries' seconds
    and results, the batch's seconds and results."""
    features = torch.from_numpy(np.load(args.features))  # [N, D], unit rows
    labels = np.load(args.labels).tolist()
    gallery = search.Gallery(features) if args.method == METHODS[0] else None  # what a database holds once loaded
    index = None
    if args.method == METHODS[2]:
        import faiss
        index = faiss.IndexFlatIP(features.shape[1])
        index.add(features.numpy())
    singles, batch = queries_for(features, args)
    one = one_query_methods(features, gallery, index, labels, args.k)[args.method]
    one(*singles[0])  # warm
    seconds, found = [], []
    for query, exclude in singles:
        begin = time.perf_counter()
        found.append(one(query, exclude))
        seconds.append(time.perf_counter() - begin)
    many = batch_methods(features, gallery, index, args.k)[args.method]
    many(batch[:2])  # warm
    begin = time.perf_counter()
    found_batch = many(batch)
    batch_seconds = time.perf_counter() - begin
    print(json.dumps({'seconds': seconds, 'found': found, 'batch_seconds': batch_seconds,
                      'found_batch': found_batch.tolist()}))


def measure(num, dim, args, folder):
    """One gallery size, each method in its own process -> {method: (one-query p50 ms, batched ms per query, share
    of queries whose top k is search.py's)}."""
    start = time.perf_counter()
    features, labels = make_features(num, dim, 5.3, default_noise(dim), args.seed)
    paths = os.path.join(folder, 'features.npy'), os.path.join(folder, 'labels.npy')
    np.save(paths[0], features)
    np.save(paths[1], labels)
    del features
    print(f'{num:,} x {dim}: features made in {time.perf_counter() - start:.1f} s', flush=True)
    runs = {}
    for method in METHODS:
        command = [sys.executable, os.path.abspath(__file__), '--child', method, '--features', paths[0],
                   '--labels', paths[1], '--queries', str(args.queries), '--batch', str(args.batch),
                   '--k', str(args.k), '--seed', str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'{method} failed (exit {done.returncode}):\n{done.stderr[-2000:]}')
        runs[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f'  {method}: done', flush=True)
    ours = runs[METHODS[0]]
    total = args.queries + args.batch
    return {m: (statistics.median(r['seconds']) * 1e3, r['batch_seconds'] / args.batch * 1e3,
                (sum(a == b for a, b in zip(r['found'], ours['found']))
                 + sum(a == b for a, b in zip(r['found_batch'], ours['found_batch']))) / total)
            for m, r in runs.items()}


def main(args):
    import faiss
    print(f'torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} '
          f'({faiss.omp_get_max_threads()} threads), k = {args.k}', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for num, dim in args.sizes:
            results = measure(num, dim, args, folder)
            base_one, base_batch = results[METHODS[1]][0], results[METHODS[1]][1]
            for method, (one, batched, agree) in results.items():
                rows.append(f'| {num:,} x {dim} | {method} | {one:.2f} | {one / base_one:.2f} | {batched:.3f} | '
                            f'{batched / base_batch:.2f} | {agree * 100:.0f} % |')
    print('\n| gallery | method | one query p50 (ms) | / G @ q + topk | batched (ms per query) | / G @ Q + topk '
          '| top k as search.py |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    print('\n'.join(rows))
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', default='60502x1536,1000000x512',
                        type=lambda text: [parse_size(s) for s in text.split(',')],
                        help='comma list of NUMxDIM galleries [default: %(default)s]')
    parser.add_argument('--queries', type=int, default=60, help='single queries timed per size [%(default)s]')
    parser.add_argument('--batch', type=int, default=1024, help='queries of the batched search [%(default)s]')
    parser.add_argument('--k', type=int, default=10, help='results per query [%(default)s]')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--child', dest='method', choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument('--features', help=argparse.SUPPRESS)
    parser.add_argument('--labels', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.queries < 2 or args.batch < 2 or args.k < 1 or any(args.k + 1 > num for num, _ in args.sizes):
        parser.error('--queries and --batch must be at least 2, --k from 1 to the smallest gallery less one')
    return args


if __name__ == '__main__':
    arguments = parse_args()
    if arguments.method:
        child(arguments)
    else:
        import cli
        sys.exit(cli.run_cli(lambda: main(arguments)))
