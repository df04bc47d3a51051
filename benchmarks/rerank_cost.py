"""Time and peak memory of evaluating a database split with each post-processing method against without, on
synthetic normalised features with 5 images a class (SOP's shape: 5.3) at growing N, or as many as --per_class
says (CUB: 5,924 test images of 100 classes, --per_class 59); each measurement in a fresh process (peak RSS is per
process), the machine's load average printed with it.

    python benchmarks/rerank_cost.py [--sizes 7500,15000,30000,60502] [--dim 1536] [--per_class 5] [--threads 2]"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(n, dim, method, threads, per_class):
    """One fresh process: features made, then evaluate -> {seconds, extra peak MiB over the features}."""
    code = f'''
import json, resource, sys, time, torch
sys.path.insert(0, {REPO!r})
import metrics, rerank
torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
labels = torch.arange({n}) // {per_class}
centres = torch.randn({n} // {per_class} + 1, {dim}, generator=g)
x = torch.empty({n}, {dim})
for begin in range(0, {n}, 4096):  # in pieces, so that making them peaks at the features, not a few copies
    part = labels[begin:begin + 4096]
    x[begin:begin + 4096] = torch.nn.functional.normalize(centres[part] + 1.2 * torch.randn(len(part), {dim},
                                                                                           generator=g), dim=1)
del centres
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
plain = metrics.rank_stats(x, labels)
if {method!r} != 'none':
    rerank.post_stats({method!r}, rerank.parse_args({method!r}, ''), x, labels, plain=plain)
print(json.dumps({{'seconds': time.perf_counter() - start,
                  'extra_mib': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
'''
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', default='7500,15000,30000,60502')
    parser.add_argument('--dim', default=1536, type=int)
    parser.add_argument('--per_class', default=5, type=int)
    parser.add_argument('--threads', default=2, type=int)
    args = parser.parse_args()
    print('| N | method | seconds | x plain | extra peak MiB | load |\n| --- | --- | --- | --- | --- | --- |',
          flush=True)
    for n in (int(v) for v in args.sizes.split(',')):
        plain = None
        for method in ('none', 'aqe', 'kreciprocal'):
            load = os.getloadavg()[0]
            m = measure(n, args.dim, method, args.threads, args.per_class)
            plain = plain or m
            print(f'| {n:,} | {method} | {m["seconds"]:.1f} | {m["seconds"] / plain["seconds"]:.2f} | '
                  f'{m["extra_mib"]:.0f} | {load:.1f} |', flush=True)


if __name__ == '__main__':
    main()
