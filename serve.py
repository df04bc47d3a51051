"""A query page and a JSON API over one feature database: the database and its model are loaded once, then every
search answers as test.py would (same lookup, checks, embedding and ranking: retrieval.py).

    python serve.py --data_base NAME_OR_PATH [--results_dir results] [--host 127.0.0.1] [--port 8000] [--onnx FILE]

GET / (the page), POST /api/search (multipart `image`, form `k`), GET /api/search?index=I&k=K (a database image
as the query, itself excluded), GET /images/I (database image I as a JPEG thumbnail), GET /api/info.

It answers only requests addressed to a host it serves (localhost, 127.0.0.1, --host, --allowed_hosts) and no
search posted by another site's page; what one upload may cost, and how many decode at once, is bounded."""
import argparse
import contextlib
import functools
import io
import ipaddress
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from typing import Annotated

import h11
import uvicorn
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

import distributed
import export
import imaging
import indexes
import rerank
import rerank_eval
import retrieval
import runs
from cli import UserError, check_int, run_cli

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')  # the page, inline CSS and JS
MAX_UPLOAD = 20 * 2 ** 20  # bytes of one uploaded image
MAX_BODY = MAX_UPLOAD + 2 ** 16  # a request: the image and the multipart framing around it
K_DEFAULT, K_MAX = 8, 100
THUMBNAIL = 256  # longest side of the pictures /images/I sends
THUMBNAILS_KEPT = 512  # recently sent pictures kept encoded (about 10 KB each)
TOO_LARGE = f'the upload is larger than {MAX_UPLOAD // 2 ** 20} MB'
# decodes (uploads and thumbnails) running at once: one per core; each upload's decode is bounded by
# imaging.UPLOAD_MAX_PIXELS and UPLOAD_MAX_DECODE, so together they take at most DECODES x UPLOAD_MAX_DECODE
DECODES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
LOOPBACK_HOSTS = ('localhost', '127.0.0.1', '::1')  # always served
# connection limits (uvicorn's, and the request head's, which uvicorn 0.55 does not have)
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
HEADER_TIMEOUT_S = 10  # a connection that has not sent a whole request head this long after it opened is closed
MAX_CONCURRENCY = 128  # open connections or requests in progress beyond which a request is answered 503


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Serve a query page and a JSON search API over a feature database')
    add = parser.add_argument
    add('--data_base', default=runs.DEFAULT_DATABASE, help='a name in --results_dir, or a path')
    add('--results_dir', default='results', help='where a database given by name is looked up')
    add('--data_path', default=None, help="the dataset folder, when it moved since train.py's --data_path")
    add('--index', default=None, help='search this index of the database (a .faiss file, milvus://HOST:PORT/'
                                      'COLLECTION or a Milvus Lite PATH.db; index.py builds them) [default: exact]')
    indexes.add_search_arguments(add)
    add('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
    add('--allowed_hosts', default='', help='more host names the server is reached by, comma-separated (besides '
        'localhost, 127.0.0.1 and --host)')
    add('--port', default=8000, type=int, help='port to listen on (0: any free port, printed)')
    add('--device', default=None, help='device that embeds uploaded images [default: cuda if there, else cpu]')
    add('--onnx', default=None, help="embed uploads with this export of the database's model (export.py) in "
        'onnxruntime, on the CPU, instead of PyTorch')
    add('--rerank', default='none', choices=list(rerank.METHODS), help='post-processing of every search (rerank.py)')
    add('--rerank_args', default=None, help="its parameters, e.g. k=10,alpha=3 [default: the choice test.py's tuning saved]")
    return parser.parse_args(argv)


def image_root(paths):
    """The dataset root the page and the API name images by: the common folder of the images' folders, or None
    where they have none (different drives)."""
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        return None


class Searcher:
    """One loaded database and its model; model calls are serialised by a lock (one forward pass at a time keeps
    memory flat whatever the number of clients; torch already spreads one pass over the cores), decodes by a
    semaphore (DECODES at once, each bounded by the upload limits). Images are named by their path relative to the
    dataset root (image_root), never by a local absolute path. `onnx`: an export.OnnxEmbedder that embeds uploads
    instead of the database's PyTorch model."""

    def __init__(self, database, onnx=None, index=None, reranker=None):
        self.database, self.index, self.lock, config = database, index, threading.Lock(), database.config
        self.embed, model_file = (onnx, onnx.name) if onnx else (database.embed, database.model_path)
        # exact search (the searched features normalised now, once, not at the first query), post-processed or not
        self.reranker = reranker or rerank.Reranker('none', {}, database.searched, database.labels)
        self.decodes = threading.BoundedSemaphore(DECODES)
        self.root = image_root(database.images)
        self.thumbnail = functools.lru_cache(THUMBNAILS_KEPT)(self._thumbnail)
        self.info = {'dataset': config['data_name'], 'crop_type': config['crop_type'],
                     'backbone': config['backbone_type'], 'branches': config['branches'],
                     'feature_dim': int(database.features.shape[1]), 'images': len(database.images),
                     'split': database.split, 'image_size': config['image_size'],
                     'database': os.path.basename(database.path), 'model_file': os.path.basename(model_file),
                     'k_default': K_DEFAULT, 'k_max': K_MAX, 'upload_max_bytes': MAX_UPLOAD,
                     'upload_max_pixels': imaging.UPLOAD_MAX_PIXELS,
                     'search': indexes.describe(index)}  # GET /api/info

    def shown(self, path):
        """A database image's path as the API shows it: relative to the dataset root, '/' between folders."""
        if self.root is None:
            return os.path.basename(path)
        return os.path.relpath(os.path.abspath(path), self.root).replace(os.sep, '/')

    def check_index(self, index):
        if not 0 <= index < len(self.database.images):
            raise UserError(f'no database image {index}: indices run from 0 to {len(self.database.images) - 1}')

    def search_upload(self, data, k):
        """Top k for an uploaded photo, embedded as test.py embeds a query that is not in the database. `data`: its
        bytes, or a file they are read from once a decode may start (a queued upload waits on disk, not in memory).
        Its decode is bounded before it starts (retrieval.check_upload, imaging.upload_input)."""
        start, d = time.perf_counter(), self.database
        retrieval.check_k(k, len(d.images), None, f'k = {k}', 'the database', d.split)
        with self.decodes:
            if not isinstance(data, bytes):
                data = data.read(MAX_UPLOAD + 1)
            if len(data) > MAX_UPLOAD:
                raise UserError(TOO_LARGE)
            retrieval.check_upload(data, 'the upload')
            x = imaging.upload_input('the upload', d.config['image_size'], d.config['mean'], d.config['std'], data)
        return self.search(k, x=x, start=start)

    def search(self, k, index=None, x=None, start=None):
        """The JSON answer for database image `index` of the searched split (itself excluded, as test.py) or for a
        preprocessed upload `x` [3, s, s]: its top k, each with rank, index, path, label and score."""
        start, d = start or time.perf_counter(), self.database
        if index is not None:
            self.check_index(index)
        retrieval.check_k(k, len(d.images), index, f'k = {k}', 'the database', d.split)
        label = None if index is None else d.labels[index]
        with self.lock:
            feature = d.features[index] if x is None else self.embed(x[None])[0]  # [D]
            if self.index is None:
                indices, scores = self.reranker.top_k(feature, k, index, label)
            else:
                indices, scores = indexes.top_k(self.index, d, feature, k, index, label)
        results = [{'rank': rank, 'index': i, 'path': self.shown(d.images[i]), 'label': d.labels[i], 'score': score}
                   for rank, (i, score) in enumerate(zip(indices, scores), start=1)]
        return {'results': results, 'query_label': label, 'query_index': index,
                'seconds': round(time.perf_counter() - start, 6)}

    def _thumbnail(self, index):
        """Database image `index` as JPEG bytes, its longest side at most THUMBNAIL."""
        self.check_index(index)
        path = self.database.images[index]
        shown = self.shown(path)
        if not os.path.isfile(path):
            raise UserError(f'database image {index} not found: {shown} (was the dataset moved?)')
        with self.decodes:
            try:
                image = imaging.load_image(path)
            except UserError as err:  # its message names the file: by its shown path
                raise UserError(str(err).replace(path, shown)) from None
            image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format='JPEG', quality=85)
        return buffer.getvalue()


def error(status, message):
    """The API's answer to a request it refuses: {'error': the first line of the message}."""
    text = str(message).strip()
    return JSONResponse({'error': text.splitlines()[0] if text else 'error'}, status_code=status)


def refuse_large_bodies(app):
    """ASGI middleware: a request that declares more than MAX_BODY bytes is answered 413 at once, in the API's
    error style, before its body is read (a body sent without a length is cut off by the route's max_body_size)."""
    async def middleware(scope, receive, send):
        length = dict(scope.get('headers', ())).get(b'content-length', b'')
        if scope['type'] == 'http' and length.isdigit() and int(length) > MAX_BODY:
            return await error(413, TOO_LARGE)(scope, receive, send)
        return await app(scope, receive, send)
    return middleware


def host_port(value, scheme='http'):
    """(host name in lower case, port) of a Host header ('name', 'name:port', '[v6]:port') or an Origin's
    'scheme://name[:port]'; None where it is not one."""
    try:
        url = urllib.parse.urlsplit(value if '://' in value else f'{scheme}://{value}')
        port = url.port or {'http': 80, 'https': 443}.get(url.scheme)
    except ValueError:  # a bad port
        return None
    if not url.hostname or url.path or url.query or url.fragment or url.username:
        return None
    return url.hostname.rstrip('.'), port


def is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def served_hosts(host, allowed_hosts=()):
    """The host names requests may be addressed to: the loopback names, --host and --allowed_hosts."""
    return {name.strip('[]').lower().rstrip('.') for name in (*LOOPBACK_HOSTS, host, *allowed_hosts)}


def guard_hosts(app, hosts, trusted=(), any_ip=False):
    """ASGI middleware: a request whose Host header names a host not in `hosts` is refused (400; a page of another
    site that has its name point at this machine, DNS rebinding, cannot read the answers), and so is a write (any
    method but GET, HEAD and OPTIONS) whose Origin header is not the server's own (403: another site's page cannot
    search through the user's browser). An Origin is the server's own when it has the host and port the request was
    addressed to, or when its host is one of `trusted` (--allowed_hosts: a proxy's name). `any_ip`: every address
    literal is a served host too (the server listens on every interface; an address involves no DNS to rebind)."""
    hosts, trusted = frozenset(hosts), frozenset(trusted)

    async def middleware(scope, receive, send):
        if scope['type'] != 'http':
            return await app(scope, receive, send)
        headers = dict(scope.get('headers', ()))
        host = headers.get(b'host')
        target = host_port(host.decode('latin-1')) if host is not None else None
        if host is not None and (target is None or target[0] not in hosts and not (any_ip and is_ip(target[0]))):
            shown = host.decode('latin-1')[:100]
            return await error(400, f'host {shown!r} is not one this server serves ({", ".join(sorted(hosts))}); '
                                    f'name more with --allowed_hosts')(scope, receive, send)
        origin = headers.get(b'origin')
        if origin is not None and scope['method'] not in ('GET', 'HEAD', 'OPTIONS'):
            source = host_port(origin.decode('latin-1'))
            if source is None or not (source == target or source[0] in trusted):
                shown = origin.decode('latin-1')[:100]
                return await error(403, f'a page of another site ({shown}) may not search here: only this server\'s '
                                        f'own page, and hosts given with --allowed_hosts')(scope, receive, send)
        return await app(scope, receive, send)
    return middleware


class LimitedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a time limit on request heads, which uvicorn 0.55 lacks (its keep-alive
    timeout starts only after a first answer): a connection that has not sent a whole request head HEADER_TIMEOUT_S
    after it opened, or after the first byte of its next request, is closed. Idle or slow clients then hold a
    connection for seconds, not for ever."""
    header_timeout = None  # set by limited_config

    def connection_made(self, transport):
        self.head_timer = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data):
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head begun, not yet whole
            self._arm()
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def _arm(self):
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _head_too_slow(self):
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def limited_config(app, header_timeout=None, keep_alive=None, concurrency=None):
    """uvicorn's Config for `app` with the connection limits (HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_CONCURRENCY)."""
    protocol = type('LimitedH11Protocol', (LimitedH11Protocol,),
                    {'header_timeout': header_timeout or HEADER_TIMEOUT_S})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=keep_alive or KEEP_ALIVE_S,
                          limit_concurrency=concurrency or MAX_CONCURRENCY, log_level='warning', access_log=False)


def create_app(database, hosts=None, trusted=(), any_ip=False, onnx=None, index=None, reranker=None):
    """The FastAPI application over a loaded retrieval.Database (handed to every request by the lifespan), answering
    requests to `hosts` (default: the loopback names) and writes from its own page or `trusted` hosts (guard_hosts);
    `onnx`: see Searcher."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {'searcher': Searcher(database, onnx, index, reranker)}  # request.state.searcher, one for all requests

    app = FastAPI(title='CLF retrieval', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(refuse_large_bodies)
    app.add_middleware(guard_hosts, hosts=served_hosts('localhost') if hosts is None else hosts, trusted=trusted,
                       any_ip=any_ip)

    @app.exception_handler(UserError)
    async def user_error(request, err):  # a bad query: what is wrong, in one line
        return error(400, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return error(err.status_code, TOO_LARGE if err.status_code == 413 else err.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err):  # e.g. "k: Input should be less than or equal to 100"
        problem = err.errors()[0]
        return error(422, f'{problem["loc"][-1]}: {problem["msg"]}')

    with open(PAGE, encoding='utf-8') as f:
        page = f.read()

    @app.get('/', response_class=HTMLResponse)
    def index_page():
        return page

    @app.get('/api/info')
    def info(request: Request):
        return request.state.searcher.info

    @app.get('/api/search')
    def search_by_index(request: Request, index: Annotated[int, Query(ge=0)],
                        k: Annotated[int, Query(ge=1, le=K_MAX)] = K_DEFAULT):
        return request.state.searcher.search(k, index)

    @app.post('/api/search', max_body_size=MAX_BODY)
    def search_by_upload(request: Request, image: Annotated[UploadFile, File()],
                         k: Annotated[int, Form(ge=1, le=K_MAX)] = K_DEFAULT):
        return request.state.searcher.search_upload(image.file, k)  # read once its decode may start

    @app.get('/images/{index}')
    def database_image(request: Request, index: int):
        try:
            data = request.state.searcher.thumbnail(index)
        except UserError as err:
            return error(404, err)
        return Response(data, media_type='image/jpeg', headers={'Cache-Control': 'max-age=3600'})

    return app


def listen(host, port):
    """A socket bound to host:port; taken, or not an address of this machine, is a UserError."""
    check_int('--port', port, 0, 65535)
    sock = None
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto IPPROTO_TCP, not 0: only then does asyncio set TCP_NODELAY on the connections (without it a
        # kept-alive connection waits ~40 ms per answer for the client's delayed ACK)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as err:
        if sock is not None:
            sock.close()
        raise UserError(f'cannot listen on {host}:{port}: {err.strerror or err}') from None
    return sock


HOST_NAME = re.compile(r'[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?', re.I)


def parse_hosts(text):
    """--allowed_hosts: comma-separated host names or addresses -> [names in lower case]; anything else (a scheme,
    a port, a wildcard) is a UserError."""
    names = [name.strip() for name in text.split(',') if name.strip()]
    for name in names:
        if not (HOST_NAME.fullmatch(name) and len(name) <= 253 or is_ip(name.strip('[]'))):
            raise UserError(f'--allowed_hosts: {name!r} is not a host name or address (give names such as '
                            f'search.example.org or 192.168.1.20, comma-separated, without scheme or port)')
    return [name.strip('[]').lower().rstrip('.') for name in names]


def is_loopback(address):
    """Whether a bound address only this machine can reach (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(address.split('%')[0]).is_loopback
    except ValueError:
        return False


def main(argv=None):
    args = parse_args(argv)
    allowed = parse_hosts(args.allowed_hosts)
    if args.onnx and args.device not in (None, 'cpu'):
        raise UserError('--device: with --onnx, onnxruntime embeds uploads on the CPU (leave --device out)')
    device = distributed.resolve_device(args.device or ('cpu' if args.onnx else None))
    with contextlib.closing(listen(args.host, args.port)) as sock:  # first: a taken port is reported at once
        # with --onnx the PyTorch model is not loaded: the export's recorded SHA-256 ties it to the database
        database = runs.open_database(args.data_base, args.results_dir, device, with_model=not args.onnx,
                                      data_path=args.data_path)
        onnx = export.OnnxEmbedder.open(args.onnx) if args.onnx else None
        if onnx:
            onnx.check_database(database.config, database.path)
        index = indexes.open_index(args.index, database, args.nprobe, args.efsearch)
        reranker = rerank_eval.for_database(args.rerank, args.rerank_args, database, args.index)  # the gallery side, once
        host, port = sock.getsockname()[:2]
        shown = f'[{host}]' if ':' in host else host
        any_ip = ipaddress.ip_address(host).is_unspecified  # 0.0.0.0 or ::, every interface
        hosts = served_hosts(args.host, allowed) | ({host} if not any_ip else set())
        if any_ip:
            hosts |= {socket.gethostname().lower()}
        print(f'serving {database.path} ({len(database.images)} {database.split} images, model '
              f'{onnx.name if onnx else database.model_path}, {indexes.describe(index)}) at http://{shown}:{port}/ '
              f'(Ctrl-C stops)', flush=True)
        if not is_loopback(host):
            where = f'port {port} of this machine' if any_ip else f'{shown}:{port}'
            print(f'warning: the server has no authentication: anyone who can reach {where} can search the '
                  f'database and see its images (--host 127.0.0.1 serves this machine only)', file=sys.stderr,
                  flush=True)
        app = create_app(database, hosts, set(allowed), any_ip, onnx, index, reranker)
        server = uvicorn.Server(limited_config(app))
        server.run(sockets=[sock])  # Ctrl-C: uvicorn finishes the requests in flight, then re-raises it


if __name__ == '__main__':
    run_cli(main, interrupted='server stopped')
