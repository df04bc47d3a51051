"""serve.py as a real server on a trained database: the answers test.py gives, every kind of bad request (and
the next request still answered), 16 clients at once with flat memory, the command line, the latency benchmark."""
import http.client
import io
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.parse
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from _serve_fixtures import (expected, multipart, request, rss_bytes, script, serve_latency, start_server,
                             stop_server, upload)
from _train_fixtures import kill_groups, out, own_sessions
import retrieval
import serve
from cli import run_cli

pytestmark = pytest.mark.slow  # every test here talks to serve.py in its own process
CPU = torch.device('cpu')


def photo_bytes(fmt, seed):
    """A 48 x 40 picture that is not in the database, encoded as PNG or JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width, height):
    """A valid 1 x 1 PNG whose header claims width x height (PIL checks the size when it opens the file)."""
    buffer = io.BytesIO()
    Image.new('RGB', (1, 1)).save(buffer, format='PNG')
    data = bytearray(buffer.getvalue())
    struct.pack_into('>II', data, 16, width, height)  # IHDR: length, type at 8..15, then width and height
    struct.pack_into('>I', data, 29, zlib.crc32(data[12:29]))  # the chunk's CRC over type and data
    return bytes(data)


@pytest.fixture(scope='module')
def served(reference, tmp_path_factory):
    """serve.py on the reference run's database, the same database loaded here, and two outside photos."""
    results, _ = reference
    db_path = out(results, 'data_base.pth')
    proc, base = start_server(db_path)
    folder = tmp_path_factory.mktemp('photos')
    photos = {}
    for name, fmt, seed in (('outside.png', 'PNG', 1), ('outside.jpg', 'JPEG', 2)):
        photos[name] = os.path.join(folder, name)
        with open(photos[name], 'wb') as f:
            f.write(photo_bytes(fmt, seed))
    try:
        yield {'proc': proc, 'base': base, 'db_path': db_path, 'results': results, 'photos': photos,
               'database': retrieval.open_database(db_path, str(results), CPU)}
    finally:
        kill_groups([proc])


def shown_path(database, index):
    """A database image's path as the API shows it: relative to the dataset root, the images' common folder."""
    return os.path.relpath(database.images[index], serve.image_root(database.images)).replace(os.sep, '/')


def check_answer(answer, database, path, k):
    indices, scores, label = expected(database, path, k)
    assert [hit['index'] for hit in answer['results']] == indices
    assert [hit['score'] for hit in answer['results']] == pytest.approx(scores, abs=1e-5)
    assert [hit['rank'] for hit in answer['results']] == list(range(1, k + 1))
    assert [hit['path'] for hit in answer['results']] == [shown_path(database, i) for i in indices]
    assert [hit['label'] for hit in answer['results']] == [database.labels[i] for i in indices]
    assert answer['query_label'] == label
    assert 0 <= answer['seconds'] < 60


def printed_ranking(text):
    """(path, label, score) rows of test.py's printout."""
    return [(m[3], m[2], float(m[1])) for m in re.findall(r'^\s+(\d+)\s+(-?\d\.\d{4})\s+(\S+)\s+(\S+)$', text, re.M)]


def test_same_answers_as_test_py(served, tmp_path, capsys):
    base, database = served['base'], served['database']
    k = 5
    for index, path in enumerate(database.images):  # every database image: itself excluded, label known
        status, answer = request(f'{base}api/search?index={index}&k={k}')
        assert status == 200
        check_answer(answer, database, path, k)
    for name, path in served['photos'].items():  # photos from outside: embedded by the server's model
        with open(path, 'rb') as f:
            status, answer = upload(base, f.read(), k=k, name=name)
        assert status == 200
        check_answer(answer, database, path, k)
    # and test.py's own printout, for a database image and an outside photo
    for path, (status, answer) in ((database.images[3], request(f'{base}api/search?index=3&k={k}')),
                                   (served['photos']['outside.jpg'], upload(base, open(served['photos']['outside.jpg'],
                                                                                       'rb').read(), k=k))):
        run_cli(lambda: script.main(['--query_img_name', path, '--data_base', served['db_path'],
                                     '--retrieval_num', str(k), '--results_dir', str(tmp_path), '--device', 'cpu']))
        rows = printed_ranking(capsys.readouterr().out)
        assert [(database.images[hit['index']], hit['label']) for hit in answer['results']] == \
            [row[:2] for row in rows]  # test.py prints the stored paths
        assert [hit['score'] for hit in answer['results']] == pytest.approx([row[2] for row in rows], abs=5.1e-5)


def test_page_info_and_images(served):
    base, database = served['base'], served['database']
    status, page = request(base)
    assert status == 200 and b'<script>' in page and b'<style>' in page
    assert not re.search(rb'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere: works offline
    status, info = request(base + 'api/info')
    assert status == 200
    assert info['images'] == len(database.images) and info['split'] == 'test'
    assert info['feature_dim'] == database.features.shape[1] == 24 and info['backbone'] == 'resnet18'
    assert info['dataset'] == 'tiny' and info['model_file'] == os.path.basename(database.model_path)
    status, data = request(f'{base}images/2')
    assert status == 200
    picture = Image.open(io.BytesIO(data))
    assert picture.format == 'JPEG' and picture.size == Image.open(database.images[2]).size  # 40 px: not enlarged


def test_kept_alive_connection_answers_without_waiting_for_delayed_acks(served):
    """Answers on a reused connection must not wait for the client's delayed ACK (~40 ms on Linux): the server's
    connections have TCP_NODELAY. The fastest of 10 answers shows it, however busy the machine."""
    url = urllib.parse.urlparse(served['base'])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        connection.request('GET', '/api/info')
        assert connection.getresponse().read()
        times.append(time.perf_counter() - start)
    connection.close()
    assert min(times[1:]) < 0.02, times


def bad_requests(base, n):
    """(what, status, the request's (status, body)) for each kind of bad input."""
    png = photo_bytes('PNG', 3)
    jpeg = photo_bytes('JPEG', 4)
    limit = Image.MAX_IMAGE_PIXELS
    side_1x, side_2x = int((1.5 * limit) ** 0.5), int((2.5 * limit) ** 0.5)  # between 1x and 2x; above 2x
    assert limit < side_1x ** 2 < 2 * limit < side_2x ** 2
    yield 'not an image', 400, upload(base, b'plain text, not a picture\n' * 10)
    yield 'empty upload', 400, upload(base, b'')
    yield 'truncated PNG', 400, upload(base, png[:len(png) // 2])
    yield 'truncated JPEG', 400, upload(base, jpeg[:len(jpeg) - 40], name='q.jpg')
    yield 'one byte over 20 MB', 400, upload(base, png + bytes(serve.MAX_UPLOAD + 1 - len(png)))
    yield 'body declared over the limit', 413, declared_too_large(base)
    yield 'chunked body over the limit', 413, chunked_upload(base, bytes(serve.MAX_BODY + 1))
    yield 'bomb, 1x-2x the pixel limit', 400, upload(base, png_claiming(side_1x, side_1x))
    yield 'bomb, over 2x the pixel limit', 400, upload(base, png_claiming(side_2x, side_2x))
    yield 'no image field', 422, request(base + 'api/search', *multipart_k_only())
    for k in ('0', '101', '-3', 'abc', '1.5'):
        yield f'upload, k={k}', 422, upload(base, png, k=k)
        yield f'index, k={k}', 422, request(f'{base}api/search?index=0&k={k}')
    yield 'k beyond the database', 400, request(f'{base}api/search?index=0&k={n}')
    yield 'upload, k beyond the database', 400, upload(base, png, k=n + 1)
    for index in ('-1', str(n), '99999999999999999999', '/etc/passwd', '..%2F..%2Fetc%2Fpasswd'):
        yield f'search index {index}', (400, 422), request(f'{base}api/search?index={index}')
    for index in ('-1', str(n), '%2Fetc%2Fpasswd', '..%2F..%2Fetc%2Fpasswd', 'etc', '1%2F..%2F2'):
        yield f'image {index}', (404, 422), request(f'{base}images/{index}')
    yield 'no such page', 404, request(base + 'etc/passwd')


def declared_too_large(base):
    """Only the head of an upload that declares MAX_BODY + 1 bytes: the answer comes before any body is sent."""
    url = urllib.parse.urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(f'POST /api/search HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: multipart/form-data; '
                  f'boundary=x\r\nContent-Length: {serve.MAX_BODY + 1}\r\n\r\n'.encode())
        reply = s.makefile('rb').read()  # the server closes the connection after its answer
    head, _, payload = reply.partition(b'\r\n\r\n')
    return int(head.split()[1]), json.loads(payload)


def chunked_upload(base, data):
    """An upload sent in chunks, without a length -> (status, JSON)."""
    url = urllib.parse.urlparse(base)
    body, kind = multipart({'image': ('big.png', data)})
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request('POST', '/api/search', body=(body[i:i + 2 ** 16] for i in range(0, len(body), 2 ** 16)),
                           headers={'Content-Type': kind}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def multipart_k_only():
    body, kind = multipart({'k': '3'})
    return body, {'Content-Type': kind}


def test_bad_requests_answered_with_one_line_and_the_server_goes_on(served):
    base, database = served['base'], served['database']
    seen = []
    for what, statuses, (status, body) in bad_requests(base, len(database.images)):
        assert status in (statuses if isinstance(statuses, tuple) else (statuses,)), (what, status, body)
        assert isinstance(body, dict) and list(body) == ['error'], (what, body)
        assert body['error'] and '\n' not in body['error'] and 'Traceback' not in body['error'], (what, body)
        seen.append((what, body['error']))
        status, answer = request(f'{base}api/search?index=1&k=3')  # the next request is answered normally
        assert status == 200, what
        check_answer(answer, database, database.images[1], 3)
    messages = dict(seen)
    assert 'larger than 20 MB' in messages['one byte over 20 MB'] == messages['body declared over the limit'] \
        == messages['chunked body over the limit']
    assert 'decompression bomb' in messages['bomb, 1x-2x the pixel limit']
    assert 'decompression bomb' in messages['bomb, over 2x the pixel limit']
    assert 'empty' in messages['empty upload'] and 'truncated' in messages['truncated PNG']
    assert served['proc'].poll() is None


def test_sixteen_clients_at_once_all_correct_memory_flat(served):
    base, database = served['base'], served['database']
    photos = [open(p, 'rb').read() for p in served['photos'].values()]
    want = {('index', i): expected(database, p, 4) for i, p in enumerate(database.images)}
    want.update({('photo', j): expected(database, p, 4) for j, p in enumerate(served['photos'].values())})
    failures = []

    def client(c, rounds):
        for r in range(rounds):
            key = ('photo', (c + r) % 2) if (c + r) % 3 == 0 else ('index', (c * 7 + r) % len(database.images))
            status, answer = upload(base, photos[key[1]], k=4) if key[0] == 'photo' else \
                request(f'{base}api/search?index={key[1]}&k=4')
            indices, scores, _ = want[key]
            if status != 200 or [h['index'] for h in answer['results']] != indices or \
                    max(abs(h['score'] - s) for h, s in zip(answer['results'], scores)) > 1e-5:
                failures.append((c, r, key, status, answer))

    def wave(rounds):
        threads = [threading.Thread(target=client, args=(c, rounds)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    wave(2)  # warm-up: the server's worker threads and allocator caches exist afterwards
    before = rss_bytes(served['proc'].pid)
    wave(10)  # 16 clients x 10 searches
    after = rss_bytes(served['proc'].pid)
    assert failures == []
    assert after - before < 32 * 2 ** 20, (before, after)


def test_command_line_errors_are_test_py_s(served, tmp_path, capsys):
    def run(main, argv):
        try:
            run_cli(lambda: main(argv))
            code = 0
        except SystemExit as stop:
            code = stop.code
        return code, capsys.readouterr().err

    missing = ['--data_base', 'gone_uncropped_resnet18_8_data_base.pth', '--results_dir', str(tmp_path)]
    code, err = run(serve.main, missing + ['--port', '0'])
    assert code == 1 and err.startswith('error: database not found') and err.count('\n') == 1
    assert (code, err) == run(script.main, missing + ['--query_img_name', served['database'].images[0]])
    # a database whose model file is missing: the same check and message as test.py
    copy = tmp_path / 'copy'
    copy.mkdir()
    db_copy = copy / os.path.basename(served['db_path'])
    db_copy.write_bytes(open(served['db_path'], 'rb').read())
    code, err = run(serve.main, ['--data_base', str(db_copy), '--port', '0'])
    assert code == 1 and 'model file not found' in err and err.count('\n') == 1
    assert (code, err) == run(script.main, ['--data_base', str(db_copy), '--results_dir', str(tmp_path),
                                            '--query_img_name', served['database'].images[0]])
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(serve.main, ['--data_base', served['db_path'], '--port', str(port)])
    assert code == 1 and err == f'error: cannot listen on 127.0.0.1:{port}: Address already in use\n'
    code, err = run(serve.main, ['--data_base', served['db_path'], '--port', '70000'])
    assert code == 1 and err == 'error: --port must be between 0 and 65535, got 70000\n'
    code, err = run(serve.main, ['--data_base', served['db_path'], '--device', 'tpu'])
    assert code == 1 and err.startswith("error: unknown --device 'tpu'")
    with pytest.raises(SystemExit) as stop:
        serve.parse_args(['--port', 'eighty'])
    assert stop.value.code == 2


def test_latency_benchmark_tiny_run(served, capsys):
    with own_sessions() as made:  # in process; it starts its own server
        try:
            serve_latency.main(['--data_base', served['db_path'], '--requests', '6', '--clients', '1,2', '--skip_sop',
                                '--threads', '1'])
        finally:
            kill_groups(made)
    printed = capsys.readouterr().out
    rows = re.findall(r'^\| tiny \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$',
                      printed, re.M)
    assert [int(r[0]) for r in rows] == [1, 2], printed
    for _, p50, p95, per_second, compute, ratio in rows:
        assert 0 < float(compute) and 0 < float(p50) <= float(p95) and float(per_second) > 0
        # the ratio of the unrounded times; p50 and compute are printed to 0.05 ms, the ratio to 0.005
        p50, compute = float(p50), float(compute)
        assert (p50 - 0.05) / (compute + 0.05) - 0.005 <= float(ratio) <= (p50 + 0.05) / (compute - 0.05) + 0.005


def test_ctrl_c_stops_with_one_line(served):
    """Last in this file: it stops the module's server."""
    code, err = stop_server(served['proc'])
    assert (code, err) == (130, 'interrupted: server stopped\n')
