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
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import cli
import distributed
import imaging
import retrieval
from cli import UserError

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
    add('--data_base', default='car_uncropped_resnet18_512_data_base.pth', help='a name in --results_dir, or a path')
    add('--results_dir', default='results', help='where a database given by name is looked up')
    add('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
    add('--port', default=8000, type=int, help='port to listen on (0: any free port, printed)')
    add('--device', default=None, help='device that embeds uploaded images [default: cuda if there, else cpu]')
    return parser.parse_args(argv)


class Searcher:
    """One loaded database and its model; model calls are serialised by a lock (one forward pass at a time keeps
    memory flat whatever the number of clients; torch already spreads one pass over the cores)."""

    def __init__(self, database):
        self.database, self.lock = database, threading.Lock()
        self.thumbnail = functools.lru_cache(THUMBNAILS_KEPT)(self._thumbnail)

    def info(self):
        d, config = self.database, self.database.config
        return {'dataset': config['data_name'], 'crop_type': config['crop_type'], 'backbone': config['backbone_type'],
                'branches': config['branches'], 'feature_dim': int(d.features.shape[1]), 'images': len(d.images),
                'split': d.split, 'image_size': config['image_size'], 'database': d.path, 'model_file': d.model_path,
                'k_default': K_DEFAULT, 'k_max': K_MAX}

    def check_k(self, k, exclude):
        retrieval.check_k(k, len(self.database.images), exclude, f'k = {k}', 'the database', self.database.split)

    def check_index(self, index):
        if not 0 <= index < len(self.database.images):
            raise UserError(f'no database image {index}: indices run from 0 to {len(self.database.images) - 1}')

    def answer(self, feature, k, exclude, query_label, start):
        """The JSON answer for a query feature: its top k, each with rank, index, path, label and score."""
        d = self.database
        with self.lock:
            indices, scores = retrieval.top_k(feature, d.features, k, exclude, d.labels, query_label)
        results = [{'rank': rank, 'index': i, 'path': d.images[i], 'label': d.labels[i], 'score': score}
                   for rank, (i, score) in enumerate(zip(indices, scores), start=1)]
        return {'results': results, 'query_label': query_label, 'query_index': exclude,
                'seconds': round(time.perf_counter() - start, 6)}

    def search_upload(self, data, k):
        """Top k for an uploaded photo, embedded as test.py embeds a query that is not in the database."""
        start = time.perf_counter()
        self.check_k(k, None)
        if len(data) > MAX_UPLOAD:
            raise UserError(TOO_LARGE)
        retrieval.check_upload(data, 'the upload')
        d = self.database
        x = imaging.eval_input('the upload', d.config['image_size'], d.config['mean'], d.config['std'], data)
        with self.lock:
            feature = retrieval.embed_inputs(d.model, x[None], d.device)[0]  # [D]
        return self.answer(feature, k, None, None, start)

    def search_index(self, index, k):
        """Top k for database image `index` of the searched split, itself excluded (as test.py)."""
        start = time.perf_counter()
        self.check_index(index)
        self.check_k(k, index)
        return self.answer(self.database.features[index], k, index, self.database.labels[index], start)

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
    return JSONResponse({'error': message}, status_code=status)


class RefuseLargeBodies:
    """ASGI middleware: a request that declares more than MAX_BODY bytes is answered 413 at once, in the API's
    error style, before its body is read (a body sent without a length is cut off by the route's max_body_size)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        length = dict(scope.get('headers', ())).get(b'content-length', b'')
        if scope['type'] == 'http' and length.isdigit() and int(length) > MAX_BODY:
            return await error(413, TOO_LARGE)(scope, receive, send)
        return await self.app(scope, receive, send)


def first_line(text):
    return str(text).strip().splitlines()[0] if str(text).strip() else 'error'


def create_app(database):
    """The FastAPI application over a loaded retrieval.Database (handed to every request by the lifespan)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {'searcher': Searcher(database)}  # request.state.searcher, the same object for every request

    app = FastAPI(title='CLF retrieval', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RefuseLargeBodies)

    @app.exception_handler(UserError)
    async def user_error(request, err):  # a bad query: what is wrong, in one line
        return error(400, first_line(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        message = TOO_LARGE if err.status_code == 413 else err.detail
        return error(err.status_code, first_line(message))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err):  # e.g. "k: Input should be less than or equal to 100"
        problem = err.errors()[0]
        return error(422, f'{problem["loc"][-1]}: {first_line(problem["msg"])}')

    with open(PAGE, encoding='utf-8') as f:
        page = f.read()

    @app.get('/', response_class=HTMLResponse)
    def index_page():
        return page

    @app.get('/api/info')
    def info(request: Request):
        return request.state.searcher.info()

    @app.get('/api/search')
    def search_by_index(request: Request, index: Annotated[int, Query(ge=0)],
                        k: Annotated[int, Query(ge=1, le=K_MAX)] = K_DEFAULT):
        return request.state.searcher.search_index(index, k)

    @app.post('/api/search', max_body_size=MAX_BODY)
    def search_by_upload(request: Request, image: Annotated[UploadFile, File()],
                         k: Annotated[int, Form(ge=1, le=K_MAX)] = K_DEFAULT):
        return request.state.searcher.search_upload(image.file.read(MAX_UPLOAD + 1), k)

    @app.get('/images/{index}')
    def database_image(request: Request, index: int):
        try:
            data = request.state.searcher.thumbnail(index)
        except UserError as err:
            raise HTTPException(404, first_line(err)) from None
        return Response(data, media_type='image/jpeg', headers={'Cache-Control': 'max-age=3600'})

    return app


def listen(host, port):
    """A socket bound to host:port; taken, or not an address of this machine, is a UserError."""
    cli.check_int('--port', port, 0, 65535)
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
        database = retrieval.open_database(args.data_base, args.results_dir, device)
        host, port = sock.getsockname()[:2]
        shown = f'[{host}]' if ':' in host else host
        print(f'serving {database.path} ({len(database.images)} {database.split} images, model '
              f'{database.model_path}) at http://{shown}:{port}/ (Ctrl-C stops)', flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(database), log_level='warning', access_log=False))
        server.run(sockets=[sock])  # Ctrl-C: uvicorn finishes the requests in flight, then re-raises it


if __name__ == '__main__':
    cli.run_cli(main, interrupted='server stopped')
