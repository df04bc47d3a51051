"""Time and peak memory of exact retrieval evaluation at SOP size, each method in its own process.

metrics.evaluate against the original's full-matrix method and (when installed) a faiss exact search.

    python benchmarks/eval_scale.py                      # 60,502 x 1536, R@{1,10,100,1000}
    python benchmarks/eval_scale.py --num 3000 --dim 64  # quick run

The default noise around the class centres is 3.0 * (dim / 1536) ** 0.25 (3.0 at 1536 dims, 1.36 at
64): same-class and other-class squared distances differ by about 2 * dim (the centres' variance)
while their spread grows like noise**2 * sqrt(dim), so this keeps the task about as hard at every
dimension (R@1 80.9 % at full size, 59.6 % for the quick run above) instead of making a small
dimension hopeless (a fixed 3.0 gives R@1 2.3 % at 3000 x 64).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('evaluate', 'full_matrix', 'faiss')
FULL_DIM, FULL_NOISE = 1536, 3.0  # the full-size setting the default noise is scaled from


def default_noise(dim):
    """Noise that keeps retrieval about as hard as FULL_NOISE at FULL_DIM (see the docstring)."""
    return FULL_NOISE * (dim / FULL_DIM) ** 0.25


def make_features(num, dim, class_size, noise, seed):
    """Synthetic L2-normalised embeddings: a random centre per class plus Gaussian noise.
    Class sizes 2..12 with mean about `class_size` (SOP test: 60,502 images, 11,316 classes)."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(2 + rng.poisson(class_size - 2, size=num), 2, 12)
    labels = np.repeat(np.arange(len(sizes)), sizes)[:num]  # [N], classes in blocks
    labels = labels[rng.permutation(num)]
    centres = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)
    features = centres[labels]
    features += noise * rng.standard_normal((num, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, labels


def rss_bytes():
    """Current resident memory of this process (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def recalls_from_neighbours(neighbours, labels, ks):
    """R@k from a [N, >=max(ks)] table of neighbour indices with the query itself already removed."""
    first = np.full(len(labels), np.iinfo(np.int64).max)
    same = labels[neighbours] == labels[:, None]          # [N, K]
    found = same.any(1)
    first[found] = same[found].argmax(1)
    return {f'R@{k}': float((first < k).mean()) for k in ks}


def run_evaluate(features, labels, ks):
    import torch
    sys.path.insert(0, ROOT)
    from metrics import evaluate
    return evaluate(torch.from_numpy(features), torch.from_numpy(labels), ks)


def run_full_matrix(features, labels, ks):
    """The original's method: the whole similarity matrix in torch, then top-k per row."""
    import torch
    x = torch.from_numpy(features)
    sims = x @ x.T                                          # [N, N], 14.6 GB at SOP size
    sims.fill_diagonal_(-float('inf'))                      # exclude self exactly (the original used 0)
    neighbours = sims.topk(min(max(ks), len(x) - 1), dim=1).indices.numpy()
    return recalls_from_neighbours(neighbours, labels, ks)


def run_faiss(features, labels, ks):
    """Exact inner-product search for max(ks) + 1 neighbours, then the query itself dropped."""
    import faiss
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    k = min(max(ks) + 1, len(features))
    _, found = index.search(features, k)                    # [N, k]
    is_self = found == np.arange(len(features))[:, None]
    # drop the query itself from its row (it is almost always first, but ties may move it)
    keep = np.where(is_self.any(1, keepdims=True), ~is_self, np.arange(k) < k - 1)
    neighbours = found[keep].reshape(len(features), k - 1)
    return recalls_from_neighbours(neighbours, labels, ks)


def child(args):
    """Run one method on the saved features and print one JSON line: seconds, peak memory delta, metrics."""
    if args.method == 'faiss':
        import faiss  # noqa: F401  imported before the baseline, as torch is for the others
    else:
        import torch  # noqa: F401
    features, labels = np.load(args.features), np.load(args.labels)
    baseline = rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    metrics = {'evaluate': run_evaluate, 'full_matrix': run_full_matrix, 'faiss': run_faiss}[args.method](
        features, labels, args.ks)
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime  # all threads together
    peak = end.ru_maxrss * 1024                                           # Linux reports KiB
    print(json.dumps({'seconds': seconds, 'cpu_seconds': cpu, 'peak_delta': max(peak - baseline, 0),
                      'metrics': metrics}))


def faiss_installed():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def main(args):
    from cli import UserError  # here, not at the top: the faiss child stays free of torch
    if args.num < 2 or args.dim < 1 or args.class_size < 2 or args.noise < 0:
        raise UserError(f'--num must be >= 2, --dim >= 1, --class_size >= 2 and --noise >= 0; got --num {args.num} '
                        f'--dim {args.dim} --class_size {args.class_size} --noise {args.noise}')
    methods = list(args.methods)
    if 'faiss' in methods and not faiss_installed():
        methods.remove('faiss')
        print('faiss is not installed: skipped', flush=True)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        features, labels = make_features(args.num, args.dim, args.class_size, args.noise, args.seed)
        paths = os.path.join(folder, 'features.npy'), os.path.join(folder, 'labels.npy')
        np.save(paths[0], features)
        np.save(paths[1], labels)
        print(f'features: {args.num} x {args.dim} float32 ({features.nbytes / 2 ** 30:.2f} GiB), '
              f'{labels.max() + 1} classes, noise {args.noise:.2f}, made in {time.perf_counter() - start:.1f} s; '
              f'ks = {args.ks}', flush=True)
        del features
        results = {}
        for method in methods:
            command = [sys.executable, os.path.abspath(__file__), '--child', method, '--features', paths[0],
                       '--labels', paths[1], '--ks', ','.join(map(str, args.ks))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f'{method} failed (exit {done.returncode}):\n{done.stderr[-2000:]}')
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f'{method:12s} {r["seconds"]:8.1f} s ({r["cpu_seconds"]:.1f} s CPU)  '
                  f'{r["peak_delta"] / 2 ** 30:7.2f} GiB  '
                  + '  '.join(f'{k} {v * 100:.2f}' for k, v in r['metrics'].items()), flush=True)

    base = results['evaluate']
    print('\n| method | time (s) | CPU time (s) | peak memory beyond features (GiB) | time / evaluate | '
          'memory / evaluate |')
    print('| --- | --- | --- | --- | --- | --- |')
    for method, r in results.items():
        print(f'| {method} | {r["seconds"]:.1f} | {r["cpu_seconds"]:.1f} | {r["peak_delta"] / 2 ** 30:.2f} | '
              f'{r["seconds"] / base["seconds"]:.2f} | {r["peak_delta"] / max(base["peak_delta"], 1):.1f} |')
    recall_keys = [f'R@{k}' for k in args.ks]
    agree = all(r['metrics'][key] == base['metrics'][key] for r in results.values() for key in recall_keys)
    print(f'\nR@K of all methods identical: {"yes" if agree else "NO"}; MAP@R (evaluate) '
          f'{base["metrics"]["MAP@R"] * 100:.2f}, R-Precision (evaluate) {base["metrics"]["R-Precision"] * 100:.2f}')
    return 0 if agree else 1


def parse_args(argv=None):
    def ks(text):
        values = [int(v) for v in text.split(',')]
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError('a comma list of positive integers')
        return values
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num', type=int, default=60502, help='number of feature vectors (SOP test: 60502)')
    parser.add_argument('--dim', type=int, default=1536, help='feature dimension (3 branches x 512)')
    parser.add_argument('--class_size', type=float, default=5.3, help='mean images per class')
    parser.add_argument('--noise', type=float, default=None,
                        help='noise scale around class centres (default: 3.0 * (dim / 1536) ** 0.25)')
    parser.add_argument('--ks', type=ks, default=[1, 10, 100, 1000], help='comma list of K for R@K')
    def methods(text):
        values = text.split(',')
        if 'evaluate' not in values or any(v not in METHODS for v in values):
            raise argparse.ArgumentTypeError(f'a comma list from {",".join(METHODS)} that includes evaluate '
                                             f'(the reference of the comparison)')
        return values
    parser.add_argument('--methods', type=methods, default=list(METHODS),
                        help=f'comma list from {",".join(METHODS)}; evaluate is required')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--child', dest='method', choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument('--features', help=argparse.SUPPRESS)
    parser.add_argument('--labels', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.noise is None:
        args.noise = default_noise(args.dim)
    return args


if __name__ == '__main__':
    arguments = parse_args()
    if arguments.method:
        child(arguments)
    else:
        sys.path.insert(0, ROOT)
        import cli
        sys.exit(cli.run_cli(lambda: main(arguments)))
