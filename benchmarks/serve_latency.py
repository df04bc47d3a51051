"""Latency of serve.py: p50/p95 per search and searches/s with 1 and 8 concurrent clients uploading photos, next
to the pure compute of the same search in this process (decode, embed, rank: the function the handler calls),
timed in alternating blocks with the one-client searches; then the embedding of one query alone on the CPU, PyTorch
eager against onnxruntime running the model's ONNX export (serve.py --onnx), in alternating blocks too.

    python benchmarks/serve_latency.py --data_base results/demo_uncropped_resnet18_512_data_base.pth
    python benchmarks/serve_latency.py --data_base PATH --requests 6 --clients 1,2 --skip_sop --threads 1   # quick

Besides the given database it builds a synthetic SOP-size one (60,502 random unit features of 1536 dimensions,
ResNet-18 SMG 512 with SOP's 11,318 classes, random weights, 224 px) in a temporary folder."""
import argparse
import http.client
import io
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
import onnxruntime
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import export  # noqa: E402
import imaging  # noqa: E402
import retrieval  # noqa: E402
import serve  # noqa: E402
from model import Model  # noqa: E402
import cli  # noqa: E402

SOP_SIZE, SOP_CLASSES, SOP_IMAGE_SIZE = 60502, 11318, 224
SOP_MEAN, SOP_STD = (0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095)


def start_server(db_path, *extra, env=None):
    """`python serve.py --data_base db_path --port 0 ...` in its own process -> (process, base URL), once it
    prints the URL it serves at."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    # Ctrl-C (stop_server) must reach it even when this runs with SIGINT ignored (nohup, a script's & job)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'serve.py'), '--data_base', os.fspath(db_path),
                             '--port', '0', *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()  # '' when it stopped instead
    if 'http://' not in line:
        proc.kill()
        raise RuntimeError(f'serve.py did not start: {line}{proc.stderr.read()}')
    return proc, 'http://' + line.split('http://', 1)[1].split()[0]


def stop_server(proc):
    """Stop the server as Ctrl-C does -> (exit status, what it wrote on stderr)."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)  # a ceiling for a hang; a busy machine may take a while
    return proc.returncode, err


def multipart(fields):
    """{name: str, or (file name, bytes)} -> (body, Content-Type header) of a multipart/form-data request."""
    boundary = secrets.token_hex(16)
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    f'Content-Type: application/octet-stream\r\n\r\n')
            parts.append(f'--{boundary}\r\n{head}'.encode() + value[1] + b'\r\n')
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b''.join(parts) + f'--{boundary}--\r\n'.encode(), f'multipart/form-data; boundary={boundary}'


def photo(seed, size=(500, 375)):
    """A photo-like JPEG (smooth colour field plus noise), as a phone might upload, quality 90."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = rng.random((4, 4, 3)) * 255
    smooth = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float64)
    pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def make_sop_database(folder, seed=0):
    """A SOP-size database with random unit features and a ResNet-18 model file of the matching shape."""
    torch.manual_seed(seed)
    model = Model('resnet18', 512, SOP_CLASSES, 'SMG')
    features = torch.nn.functional.normalize(torch.randn(SOP_SIZE, 3 * 512), dim=1)  # [60502, 1536]
    labels = torch.randint(0, SOP_CLASSES, (SOP_SIZE,)).tolist()
    db = {'test_images': [f'sop/synthetic_{i:05d}.jpg' for i in range(SOP_SIZE)],
          'test_labels': [str(v) for v in labels], 'test_features': features,
          'config': {'backbone_type': 'resnet18', 'feature_dim': 512, 'branches': 'SMG', 'num_classes': SOP_CLASSES,
                     'image_size': SOP_IMAGE_SIZE, 'mean': list(SOP_MEAN), 'std': list(SOP_STD),
                     'data_name': 'sop', 'crop_type': 'uncropped'}}
    stem = os.path.join(folder, 'sop_uncropped_resnet18_512')
    retrieval.save_model_and_database(model.state_dict(), db, f'{stem}_model.pth', f'{stem}_data_base.pth')
    return f'{stem}_data_base.pth'


class Client:
    """One client: a kept-alive connection that uploads photos in turn and times each search."""

    def __init__(self, base, bodies, k):
        url = urllib.parse.urlparse(base)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
        self.requests = [multipart({'image': (f'q{i}.jpg', data), 'k': str(k)}) for i, data in enumerate(bodies)]

    def search(self, i):
        """Seconds of upload i (mod the photos), from sending to the whole answer."""
        body, kind = self.requests[i % len(self.requests)]
        start = time.perf_counter()
        self.connection.request('POST', '/api/search', body=body, headers={'Content-Type': kind})
        response = self.connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f'the server answered {response.status}: {data[:200]!r}')
        return seconds


def one_client_and_compute(base, searcher, bodies, k, count, block=10):
    """(server latencies, in-process compute times) of `count` searches each, in alternating blocks of `block`,
    so that other work on the machine weighs on both alike (one search each in turn would time each side while
    the other's idle threads still spin)."""
    client, served, computed = Client(base, bodies, k), [], []
    client.search(0)
    searcher.search_upload(bodies[0], k)  # warm-up
    for begin in range(0, count, block):
        for i in range(begin, min(begin + block, count)):
            start = time.perf_counter()
            searcher.search_upload(bodies[i % len(bodies)], k)  # what POST /api/search runs, without HTTP
            computed.append(time.perf_counter() - start)
        client.connection.close()  # the server drops connections idle for 5 s (uvicorn's keep-alive timeout)
        client.search(begin)  # a fresh connection, untimed
        served += [client.search(i) for i in range(begin, min(begin + block, count))]
    return served, computed


def many_clients(base, bodies, k, clients, total):
    """(latencies, searches per second) of `total` uploads spread over `clients` concurrent clients."""
    pool = [Client(base, bodies, k) for _ in range(clients)]
    for client in pool:
        client.search(0)  # warm-up, and the connections opened
    results = [[] for _ in pool]
    def run(c):
        results[c].extend(pool[c].search(i) for i in range(total // clients))

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    times = [t for r in results for t in r]
    if len(times) != clients * (total // clients):
        raise RuntimeError('a client failed (see above)')
    return times, len(times) / wall


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def bench(name, db_path, bodies, args):
    """One table row per client count for a database."""
    threads = {'OMP_NUM_THREADS': str(args.threads), 'MKL_NUM_THREADS': str(args.threads)} if args.threads else {}
    proc, base = start_server(db_path, '--device', 'cpu', env=threads)
    try:
        searcher = serve.Searcher(retrieval.open_database(db_path, 'results', torch.device('cpu')))
        served, computed = one_client_and_compute(base, searcher, bodies, args.k, args.requests)
        del searcher  # its memory (a SOP-size database) back before the concurrent rows
        compute = statistics.median(computed)
        for clients in args.clients:
            times, rate = (served, len(served) / sum(served)) if clients == 1 else \
                many_clients(base, bodies, args.k, clients, max(args.requests, clients))
            p50 = percentile(times, 50)
            print(f'| {name} | {clients} | {1e3 * p50:.1f} | {1e3 * percentile(times, 95):.1f} | {rate:.1f} | '
                  f'{1e3 * compute:.1f} | {p50 / compute:.2f}x |', flush=True)
    finally:
        stop_server(proc)


def embed_times(db_path, body, count, threads, block=10):
    """(PyTorch eager, onnxruntime) median seconds to embed one preprocessed query [1, 3, s, s] on the CPU, each with
    `threads` threads (0: each runtime's own choice), in alternating blocks of `block`; the ONNX export is made here
    (export.onnx_bytes) and must give the same embedding to 1e-4."""
    database = retrieval.open_database(db_path, 'results', torch.device('cpu'))
    config = database.config
    onnx = export.OnnxEmbedder(export.onnx_bytes(database.model, config), 'the export', threads)
    x = imaging.upload_input('the query', config['image_size'], config['mean'], config['std'], body)[None]
    runtimes = (database.embed, onnx)
    difference = float((runtimes[0](x) - runtimes[1](x)).abs().max())  # and the warm-up
    if not difference <= 1e-4:
        raise RuntimeError(f'the ONNX export differs from PyTorch by {difference:.2e}')
    times = ([], [])
    for begin in range(0, count, block):
        for runtime, spent in zip(runtimes, times):
            for _ in range(begin, min(begin + block, count)):
                start = time.perf_counter()
                runtime(x)
                spent.append(time.perf_counter() - start)
    return tuple(statistics.median(spent) for spent in times)


def bench_embedding(name, db_path, body, args):
    """One row of the embedding table: PyTorch eager against onnxruntime."""
    eager, onnx = embed_times(db_path, body, args.requests, args.threads)
    print(f'| {name} | {1e3 * eager:.1f} | {1e3 * onnx:.1f} | {eager / onnx:.2f}x |', flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data_base', required=True, help='a database train.py wrote (its path)')
    parser.add_argument('--requests', type=int, default=200, help='searches per client count')
    parser.add_argument('--clients', default='1,8', help='comma list of concurrent client counts')
    parser.add_argument('--k', type=int, default=8, help='results per search')
    parser.add_argument('--skip_sop', action='store_true', help='leave out the synthetic SOP-size database')
    parser.add_argument('--threads', type=int, default=0, help='torch threads of the server and of this process '
                        '(1 gives steadier figures on a busy machine) [default: torch\'s own choice]')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clients = [int(c) for c in args.clients.split(',')]
    bodies = [photo(seed) for seed in range(8)]
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; uploads: 500x375 '
          f'JPEG (~{len(bodies[0]) // 1024} KiB), k = {args.k}, {args.requests} searches per row')
    print('| database | clients | p50 ms | p95 ms | searches/s | compute p50 ms | p50 / compute |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    db = retrieval.resolve_database_path(args.data_base, 'results')
    name = retrieval.load_database(db)[0]['config']['data_name']
    bench(name, db, bodies, args)
    with tempfile.TemporaryDirectory() as folder:
        sop = None if args.skip_sop else make_sop_database(folder)
        if sop:
            bench('sop-synthetic', sop, bodies, args)
        threads = args.threads or "each runtime's own number of"
        print(f'\nembedding one query on the CPU, {threads} threads, onnxruntime {onnxruntime.__version__}, median of '
              f'{args.requests}:')
        print('| database | PyTorch eager ms | onnxruntime ms | PyTorch / onnxruntime |')
        print('| --- | ---: | ---: | ---: |')
        bench_embedding(name, db, bodies[0], args)
        if sop:
            bench_embedding('sop-synthetic', sop, bodies[0], args)


if __name__ == '__main__':
    cli.run_cli(main)
