"""serve.py against strangers, through real HTTP to a running server: what uploads may cost (peak memory of the
server process under several costly uploads at once), which hosts and pages it answers, how long idle or slow
connections are kept, and which paths its answers show."""
import concurrent.futures
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.parse

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from _query_fixtures import make_database, make_split, run_test_script
from _serve_fixtures import multipart, request, script, start_server, stop_server, upload
from _train_fixtures import kill_groups
import imaging
import retrieval
import serve
from cli import UserError, run_cli

LABELS = ['a', 'a', 'b', 'b', 'c', 'c']
MiB = 2 ** 20


@pytest.fixture(scope='module')
def database(tmp_path_factory):
    """A 6-image database whose images lie in two folders under one dataset root -> (database path, root)."""
    root = tmp_path_factory.mktemp('dataset')
    first = make_split(str(root / 'photos' / 'one'), LABELS[:3], seed=1)
    second = make_split(str(root / 'photos' / 'two'), LABELS[3:], seed=2)
    images = (first[0] + second[0], first[1] + second[1])
    db_path, _ = make_database(str(tmp_path_factory.mktemp('results')), images)
    return db_path, str(root / 'photos')


@pytest.fixture(scope='module')
def served(database):
    """serve.py on the database, with --allowed_hosts search.example.org,10.1.2.3 -> (process, base URL)."""
    proc, base = start_server(database[0], '--allowed_hosts', 'search.example.org,10.1.2.3')
    try:
        yield proc, base
    finally:
        kill_groups([proc])


def status_of(pid):
    """{VmRSS, VmHWM: bytes} of a process (Linux /proc)."""
    with open(f'/proc/{pid}/status') as f:
        return {line.split(':')[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(('VmRSS', 'VmHWM'))}


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


def smooth_jpeg(width, height):
    """A large but small-file JPEG (a smooth colour field)."""
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((width, height), Image.BILINEAR).save(buffer, format='JPEG', quality=80)
    return buffer.getvalue()


def one_line(status, body, statuses):
    assert status in statuses, (status, body)
    assert isinstance(body, dict) and list(body) == ['error'], body
    assert body['error'] and '\n' not in body['error'] and 'Traceback' not in body['error'], body
    return body['error']


# ---- item 1: what one upload may cost, and how many decode at once ----

@pytest.mark.slow
def test_costly_uploads_at_once_keep_the_server_within_its_memory_bound(served):
    """The issue's 157 KB file (a 16-bit grey PNG of 9000 x 9000: 2.1 GB to decode before the bound), several at
    once, next to uploads at the bound: the over-limit ones are refused with one line before decoding, the others
    answered, and the server's peak resident memory grows by at most DECODES x UPLOAD_MAX_DECODE, plus the request
    bodies it holds (each read once from its spooled file: twice their bytes), plus 256 MiB."""
    proc, base = served
    bomb = png(np.zeros((9000, 9000), np.uint16))
    assert len(bomb) < 200_000
    side = int((imaging.UPLOAD_MAX_DECODE / 32) ** 0.5)  # the costliest 16-bit picture an upload may be
    at_bound = png(np.random.default_rng(1).integers(0, 65536, (side, side), dtype=np.uint16))
    huge_jpeg = smooth_jpeg(8000, 6000)  # 48 megapixels: decoded by libjpeg at half size
    status, _ = upload(base, png(np.zeros((40, 48, 3), np.uint8)), k=2)  # warm: the model has run once
    assert status == 200
    decodes = len(os.sched_getaffinity(proc.pid))  # serve.DECODES as the server computed it
    try:
        with open(f'/proc/{proc.pid}/clear_refs', 'w') as f:
            f.write('5')  # VmHWM := VmRSS: the peak from now on
    except OSError:
        pass
    before = status_of(proc.pid)
    uploads = [bomb] * 4 + [at_bound] * 8 + [huge_jpeg] * 2
    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        answers = list(pool.map(lambda data: upload(base, data, k=2), uploads))
    after = status_of(proc.pid)
    bound = decodes * imaging.UPLOAD_MAX_DECODE + 2 * sum(map(len, uploads)) + 256 * MiB
    grown = after['VmHWM'] - before['VmRSS']
    assert after['VmHWM'] <= max(before['VmHWM'], before['VmRSS'] + bound), \
        f'peak {after["VmHWM"] / MiB:.0f} MiB, {grown / MiB:.0f} MiB over {before["VmRSS"] / MiB:.0f} MiB ' \
        f'before; bound {bound / MiB:.0f} MiB ({decodes} decodes at once)'
    for status, body in answers[:4]:
        assert 'too large to decode: 9000 x 9000' in one_line(status, body, (400, 413))
    assert [status for status, _ in answers[4:]] == [200] * 10, answers[4:]
    assert proc.poll() is None


def test_upload_bounds_in_process():
    """upload_scale: within the bounds whole (the very pixels test.py decodes); a JPEG over them at 1/2..1/8 by its
    own decoder; anything else over them, or a JPEG still over them at 1/8, refused naming its size and the bounds."""
    small = png(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert torch.equal(imaging.load_upload_uint8('q', small), imaging.load_image_uint8('q', small))
    jpeg = smooth_jpeg(800, 600)
    assert torch.equal(imaging.load_upload_uint8('q', jpeg), imaging.load_image_uint8('q', jpeg))
    # the same JPEG under bounds 4x and 20x smaller: decoded at half and quarter size by libjpeg
    for max_pixels, scale in ((800 * 600 // 4, 2), (800 * 600 // 20, 8)):
        x = imaging.load_upload_uint8('q', jpeg, max_pixels=max_pixels)
        assert tuple(x.shape) == (3, 600 // scale, 800 // scale)
    with pytest.raises(UserError) as refused:
        imaging.load_upload_uint8('the upload', jpeg, max_pixels=800 * 600 // 100)
    assert 'too large to decode: 800 x 600' in str(refused.value) and '1/8' in str(refused.value)
    with pytest.raises(UserError) as refused:
        imaging.load_upload_uint8('the upload', small, max_bytes=1000)
    assert 'too large to decode: 50 x 30 = 1,500 pixels' in str(refused.value)
    assert 'shrink it first' in str(refused.value) and '\n' not in str(refused.value)


# ---- item 2: the hosts it serves, the pages it answers ----

def raw(base, method, path, headers, body=None):
    """One request with exactly these headers (Host included) -> (status, JSON or bytes)."""
    url = urllib.parse.urlparse(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader('Content-Length', str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if response.getheader('content-type') == 'application/json' else data
    finally:
        connection.close()


@pytest.mark.slow
def test_only_served_hosts_and_own_page_writes(served):
    proc, base = served
    port = urllib.parse.urlparse(base).port
    photo = png(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    body, kind = multipart({'image': ('q.png', photo), 'k': '2'})
    for host in (f'127.0.0.1:{port}', f'localhost:{port}', 'localhost', f'[::1]:{port}', 'search.example.org',
                 'SEARCH.example.org.:8080', '10.1.2.3'):
        for path in ('/', '/api/info', '/images/0', '/api/search?index=0&k=2'):
            status, _ = raw(base, 'GET', path, {'Host': host})
            assert status == 200, (host, path, status)
    # DNS rebinding: another site's name pointed at this machine; and names the server was not given
    for host in ('evil.example', f'evil.example:{port}', 'localhost.evil.example', '127.0.0.1.nip.io',
                 '10.1.2.4', 'search.example.org@evil.example', ''):
        for path in ('/', '/api/info', '/images/0', '/api/search?index=0&k=2'):
            message = one_line(*raw(base, 'GET', path, {'Host': host}), (400,))
            assert 'is not one this server serves' in message and '--allowed_hosts' in message, message
        one_line(*raw(base, 'POST', '/api/search', {'Host': host, 'Content-Type': kind}, body), (400,))
    # writes: from no page (curl, scripts), this server's own page, or a host given with --allowed_hosts
    for host, origin in ((f'127.0.0.1:{port}', None), (f'127.0.0.1:{port}', f'http://127.0.0.1:{port}'),
                         (f'localhost:{port}', f'http://localhost:{port}'),
                         (f'127.0.0.1:{port}', 'https://search.example.org'),
                         ('search.example.org', 'https://search.example.org')):
        headers = {'Host': host, 'Content-Type': kind, **({'Origin': origin} if origin else {})}
        status, answer = raw(base, 'POST', '/api/search', headers, body)
        assert status == 200 and len(answer['results']) == 2, (origin, status, answer)
    # another site's page posting through the user's browser, even one on this machine at another port
    for origin in ('http://evil.example', f'http://evil.example:{port}', 'null', f'http://127.0.0.1:{port + 1}',
                   f'http://localhost:{port + 1}', 'https://localhost', 'http://search.example.org.evil.example',
                   'file://'):
        headers = {'Host': f'127.0.0.1:{port}', 'Content-Type': kind, 'Origin': origin}
        message = one_line(*raw(base, 'POST', '/api/search', headers, body), (403,))
        assert 'another site' in message, message
    assert proc.poll() is None


@pytest.mark.slow
def test_every_interface_warns_once_and_serves_addresses(database):
    db_path, _ = database
    proc, base = start_server(db_path, '--host', '0.0.0.0')
    port = urllib.parse.urlparse(base).port
    try:
        for host in (f'127.0.0.1:{port}', f'127.0.0.2:{port}', f'192.168.1.20:{port}', socket.gethostname()):
            assert raw(base, 'GET', '/api/info', {'Host': host})[0] == 200, host
        assert raw(base, 'GET', '/api/info', {'Host': 'evil.example'})[0] == 400
    finally:
        try:
            code, err = stop_server(proc)
        finally:
            kill_groups([proc])
    warning, stopped = err.splitlines()
    assert warning.startswith('warning: the server has no authentication') and f'port {port} ' in warning
    assert (code, stopped) == (130, 'interrupted: server stopped')


@pytest.mark.parametrize('value', ['http://a.example', 'a.example:80', '*', 'a b', 'a.example/x', '-a.example'])
def test_allowed_hosts_flag_refuses_what_is_no_host(database, value, capsys):
    try:
        run_cli(lambda: serve.main(['--data_base', database[0], '--port', '0', f'--allowed_hosts={value}']))
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 1 and err.startswith('error: --allowed_hosts:') and err.count('\n') == 1, err


# ---- item 6: idle and slow connections ----

@pytest.fixture
def limited_server(database):
    """serve.py's application in this process, under serve.limited_config with a 2 s head timeout, a 1 s keep-alive
    and room for 20 connections -> base URL."""
    db_path, _ = database
    app = serve.create_app(retrieval.open_database(db_path, 'results', torch.device('cpu')))
    server = uvicorn.Server(serve.limited_config(app, header_timeout=2, keep_alive=1, concurrency=20))
    sock = serve.listen('127.0.0.1', 0)
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f'http://127.0.0.1:{sock.getsockname()[1]}/'
    server.should_exit = True
    thread.join(30)
    sock.close()


def closed_by_server(s, within):
    """Whether the server closes connection `s` within `within` seconds (nothing else is sent on it)."""
    s.settimeout(within)
    try:
        return s.recv(1024) == b''
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.slow
def test_idle_and_slow_connections_are_closed(limited_server):
    base = limited_server
    url = urllib.parse.urlparse(base)
    start = time.monotonic()
    silent = [socket.create_connection((url.hostname, url.port)) for _ in range(15)]  # connect, send nothing
    partial = [socket.create_connection((url.hostname, url.port)) for _ in range(15)]  # half a request head
    for s in partial:
        s.sendall(b'GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n')
    time.sleep(0.3)
    status, _ = request(base + 'api/info')  # 30 held connections: over the limit of 20
    assert status == 503
    trickle = socket.create_connection((url.hostname, url.port))  # a byte every 0.3 s: the head's time still ends
    opened, closed = time.monotonic(), False
    for byte in b'GET /api/info':
        try:
            trickle.sendall(bytes([byte]))
        except OSError:  # closed already
            closed = True
            break
        time.sleep(0.3)
        if closed_by_server(trickle, 0.01):
            closed = True
            break
    assert closed and time.monotonic() - opened < 3.5  # 13 bytes would take 3.9 s
    assert all(closed_by_server(s, 3) for s in silent + partial)
    assert time.monotonic() - start < 10
    for s in silent + partial + [trickle]:
        s.close()
    status, _ = request(base + 'api/info')  # the limit freed again
    assert status == 200
    # a kept-alive connection idle after its answer: closed after the keep-alive time
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.request('GET', '/api/info')
    assert connection.getresponse().read()
    assert closed_by_server(connection.sock, 3)
    connection.close()


def test_the_served_limits_are_the_documented_ones():
    config = serve.limited_config(serve.create_app(None))
    assert (config.timeout_keep_alive, config.limit_concurrency) == (serve.KEEP_ALIVE_S, serve.MAX_CONCURRENCY)
    assert config.http.header_timeout == serve.HEADER_TIMEOUT_S
    text = open(os.path.join(os.path.dirname(serve.__file__), 'docs', 'serving.md')).read()
    for value in (f'{serve.KEEP_ALIVE_S} s', f'{serve.HEADER_TIMEOUT_S} s', f'{serve.MAX_CONCURRENCY}',
                  f'{imaging.UPLOAD_MAX_PIXELS:,}', f'{imaging.UPLOAD_MAX_DECODE // MiB} MiB'):
        assert value in text, value


# ---- item 13: paths relative to the dataset root ----

@pytest.mark.slow
def test_answers_show_paths_relative_to_the_dataset_root(database, served, tmp_path, capsys):
    (db_path, root), (_, base) = database, served
    stored = retrieval.load_database(db_path)[0]['test_images']
    status, info = request(base + 'api/info')
    assert status == 200 and (info['database'], info['model_file']) == (
        os.path.basename(db_path), os.path.basename(db_path).replace('data_base', 'model'))
    status, answer = request(base + 'api/search?index=0&k=5')
    assert status == 200
    assert [hit['path'] for hit in answer['results']] == [
        os.path.relpath(stored[hit['index']], root) for hit in answer['results']]
    assert {hit['path'].split('/')[0] for hit in answer['results']} == {'one', 'two'}
    status, answer = upload(base, open(stored[2], 'rb').read(), k=5)
    assert status == 200 and all(not os.path.isabs(hit['path']) for hit in answer['results'])
    # a moved image, a damaged one: the errors name them by their relative paths
    whole = open(stored[5], 'rb').read()
    os.rename(stored[4], stored[4] + '.moved')
    with open(stored[5], 'r+b') as f:
        f.truncate(30)
    try:
        moved = one_line(*request(base + 'images/4'), (404,))
        damaged = one_line(*request(base + 'images/5'), (404,))
    finally:
        os.rename(stored[4] + '.moved', stored[4])
        with open(stored[5], 'wb') as f:
            f.write(whole)
    assert f'not found: two/{os.path.basename(stored[4])} ' in moved, moved
    assert f'two/{os.path.basename(stored[5])}' in damaged, damaged
    for text in (json.dumps(info), json.dumps(answer), moved, damaged):
        assert root not in text and os.path.dirname(db_path) not in text, text
    # test.py prints the stored paths, as before
    code, out, _ = run_test_script(script, ['--query_img_name', stored[0], '--data_base', db_path, '--results_dir',
                                            str(tmp_path), '--retrieval_num', '3', '--device', 'cpu'], capsys)
    assert code == 0 and sum(path in out for path in stored) >= 3, out


def test_image_root_is_the_common_folder_of_the_images():
    assert serve.image_root(['/d/a/x.png', '/d/b/c/y.png']) == '/d'
    assert serve.image_root(['/d/a/x.png']) == '/d/a'
    assert serve.image_root(['/d/a/x.png', '/d/a/y.png']) == '/d/a'
    assert serve.image_root(['rel/a/x.png', 'rel/b/y.png']) == os.path.abspath('rel')


@pytest.mark.slow
def test_ctrl_c_stops_a_loopback_server_without_a_warning(served):
    """Last in this file: it stops the module's server, which listens on 127.0.0.1 and so prints no warning."""
    assert stop_server(served[0]) == (130, 'interrupted: server stopped\n')
