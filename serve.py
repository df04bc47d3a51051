"""A query page and a JSON API over one feature database: the database and its model are loaded once, then every
search answers as test.py would (same lookup, checks, embedding and ranking: retrieval.py).

    python serve.py --data_base NAME_OR_PATH [--results_dir results] [--host 127.0.0.1] [--port 8000]

GET / (the page), POST /api/search (multipart `image`, form `k`), GET /api/search?index=I&k=K (a database image
as the query, itself excluded), GET /images/I (database image I as a JPEG thumbnail), GET /api/info."""
import argparse
import contextlib
import functools
import io
import os
import socket
import threading
import time
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import distributed
import imaging
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Serve a query page and a JSON search API over a feature database')
    add = parser.add_argument
    add('--data_base', default=runs.DEFAULT_DATABASE, help='a name in --results_dir, or a path')
    add('--results_dir', default='results', help='where a database given by name is looked up')
    add('--data_path', default=None, help="the dataset folder, when it moved since train.py's --data_path")
    add('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
    add('--port', default=8000, type=int, help='port to listen on (0: any free port, printed)')
    add('--device', default=None, help='device that embeds uploaded images [default: cuda if there, else cpu]')
    return parser.parse_args(argv)


class Searcher:
    """One loaded database and its model; model calls are serialised by a lock (one forward pass at a time keeps
    memory flat whatever the number of clients; torch already spreads one pass over the cores)."""

    def __init__(self, database):
        self.database, self.lock, config = database, threading.Lock(), database.config
        self.thumbnail = functools.lru_cache(THUMBNAILS_KEPT)(self._thumbnail)
        self.info = {'dataset': config['data_name'], 'crop_type': config['crop_type'],
                     'backbone': config['backbone_type'], 'branches': config['branches'],
                     'feature_dim': int(database.features.shape[1]), 'images': len(database.images),
                     'split': database.split, 'image_size': config['image_size'], 'database': database.path,
                     'model_file': database.model_path, 'k_default': K_DEFAULT, 'k_max': K_MAX}  # GET /api/info

    def check_index(self, index):
        if not 0 <= index < len(self.database.images):
            raise UserError(f'no database image {index}: indices run from 0 to {len(self.database.images) - 1}')

    def search_upload(self, data, k):
        """Top k for an uploaded photo, embedded as test.py embeds a query that is not in the database."""
        return self.search(k, data=data)

    def search(self, k, index=None, data=None):
        """The JSON answer for database image `index` of the searched split (itself excluded, as test.py) or for
        uploaded bytes `data`: its top k, each with rank, index, path, label and score."""
        start, d = time.perf_counter(), self.database
        if index is not None:
            self.check_index(index)
        retrieval.check_k(k, len(d.images), index, f'k = {k}', 'the database', d.split)
        if data is not None:
            if len(data) > MAX_UPLOAD:
                raise UserError(TOO_LARGE)
            retrieval.check_upload(data, 'the upload')
            # decoded outside the lock: only the model and the ranking are serialised
            x = imaging.eval_input('the upload', d.config['image_size'], d.config['mean'], d.config['std'], data)
        label = None if index is None else d.labels[index]
        with self.lock:
            feature = d.features[index] if data is None else d.embed(x[None])[0]  # [D]
            indices, scores = retrieval.top_k(feature, d.features, k, index, d.labels, label)
        results = [{'rank': rank, 'index': i, 'path': d.images[i], 'label': d.labels[i], 'score': score}
                   for rank, (i, score) in enumerate(zip(indices, scores), start=1)]
        return {'results': results, 'query_label': label, 'query_index': index,
                'seconds': round(time.perf_counter() - start, 6)}

    def _thumbnail(self, index):
        """Database image `index` as JPEG bytes, its longest side at most THUMBNAIL."""
        self.check_index(index)
        path = self.database.images[index]
        if not os.path.isfile(path):
            raise UserError(f'database image {index} not found: {path} (was the dataset moved?)')
        image = imaging.load_image(path)
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


def create_app(database):
    """The FastAPI application over a loaded retrieval.Database (handed to every request by the lifespan)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {'searcher': Searcher(database)}  # request.state.searcher, the same object for every request

    app = FastAPI(title='CLF retrieval', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(refuse_large_bodies)

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
        return request.state.searcher.search_upload(image.file.read(MAX_UPLOAD + 1), k)

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


def main(argv=None):
    args = parse_args(argv)
    device = distributed.resolve_device(args.device)
    with contextlib.closing(listen(args.host, args.port)) as sock:  # first: a taken port is reported at once
        database = runs.open_database(args.data_base, args.results_dir, device, data_path=args.data_path)
        host, port = sock.getsockname()[:2]
        shown = f'[{host}]' if ':' in host else host
        print(f'serving {database.path} ({len(database.images)} {database.split} images, model '
              f'{database.model_path}) at http://{shown}:{port}/ (Ctrl-C stops)', flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(database), log_level='warning', access_log=False))
        server.run(sockets=[sock])  # Ctrl-C: uvicorn finishes the requests in flight, then re-raises it


if __name__ == '__main__':
    run_cli(main, interrupted='server stopped')
