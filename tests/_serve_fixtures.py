"""serve.py for the tests: started in its own process (as the latency benchmark starts it, in a session of its own),
talked to with urllib."""
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
from serve_latency import multipart, stop_server  # noqa: E402,F401
import serve_latency  # noqa: E402
from _query_fixtures import load_script  # noqa: E402
from _train_fixtures import own_sessions  # noqa: E402
import retrieval  # noqa: E402
import search  # noqa: E402

script = load_script()  # test.py


def expected(database, path, k, device='cpu'):
    """What test.py computes for a query file with its own functions, on a loaded retrieval.Database ->
    (indices, scores, label) of the top k."""
    exclude, feature, label = database.locate(path)
    if feature is None:
        feature = retrieval.embed_image(database.model, path, database.config, device)
    indices, scores = search.top_k(feature, database.features, k, exclude, database.labels, label)
    return indices, scores, label


def start_server(db_path, *extra):
    """serve.py on db_path, any free port, CPU, one thread, in a session of its own -> (process, base URL); stop_server
    stops it, kill_groups([process]) ends whatever is left."""
    with own_sessions():
        return serve_latency.start_server(db_path, '--device', 'cpu', *extra,
                                          env={'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'})


def request(url, data=None, headers=None):
    """(HTTP status, decoded JSON or raw bytes) of a GET, or a POST when `data` is given."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, body, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as err:
        status, body, kind = err.code, err.read(), err.headers.get_content_type()
    return status, json.loads(body) if kind == 'application/json' else body


def upload(base, data, k=None, name='query.png'):
    """POST /api/search with an image's bytes -> (status, JSON)."""
    body, kind = multipart({'image': (name, data), **({} if k is None else {'k': str(k)})})
    return request(base + 'api/search', body, {'Content-Type': kind})


def rss_bytes(pid):
    """Resident memory of a process (Linux /proc)."""
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))
