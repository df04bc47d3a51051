"""export.py: the ONNX file it writes (metadata, features of every backbone and branch set against PyTorch's, at the
trained size and another), a bad export refused with nothing left behind, the file's checks against a database,
docs/export.md's PIL + numpy snippet, serve.py --onnx answering as the PyTorch path does, and the benchmark's
onnxruntime column."""
import contextlib
import io
import json
import os
import re

import numpy as np
import onnx
import pytest
import torch

from _query_fixtures import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, REPO, make_database, make_split
from _serve_fixtures import expected, request, serve_latency, start_server, stop_server, upload
from _train_fixtures import kill_groups
import export
import imaging
import retrieval
import search
import serve
from cli import run_cli
from model import Model

CPU = torch.device('cpu')


def run(main, argv, capsys):
    """A script's main through run_cli -> (exit status, stdout, stderr)."""
    try:
        run_cli(lambda: main(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    printed, err = capsys.readouterr()
    return code, printed, err


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(('.onnx', '.tmp')))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A random-weight ResNet-18 database of 12 images in 3 classes, exported by export.py -> dict."""
    folder = tmp_path_factory.mktemp('export')
    images = make_split(os.path.join(folder, 'tiny', 'images'), [str(i % 3) for i in range(12)], seed=1)[:2]
    db_path, model = make_database(str(folder), images)
    results, printed = os.path.join(folder, 'onnx'), io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main(['--data_base', db_path, '--results_dir', results])
    return {'folder': folder, 'db_path': db_path, 'model': model, 'images': images[0], 'printed': printed.getvalue(),
            'onnx': os.path.join(results, 'tiny_uncropped_resnet18_8_model.onnx')}


def test_export_records_the_preprocessing_and_the_model_file(exported):
    proto = onnx.load(exported['onnx'])
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    config = torch.load(exported['db_path'], weights_only=True)['config']
    assert meta == {'clf_onnx_version': 1, 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD),
                    'image_size': IMAGE_SIZE, 'resize': 'bilinear, antialiased', 'backbone_type': 'resnet18',
                    'branches': 'SMG', 'feature_dim': 8, 'model_sha256': config['model_sha256']}
    assert proto.opset_import[0].version == export.OPSET
    graph = proto.graph
    assert [i.name for i in graph.input] == ['images'] and graph.output[0].name == 'embedding'
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']


def test_exported_features_equal_pytorch_at_any_batch_and_size(exported):
    embedder, model = export.OnnxEmbedder.open(exported['onnx']), exported['model']
    for shape in ((1, 3, IMAGE_SIZE, IMAGE_SIZE), (5, 3, IMAGE_SIZE, IMAGE_SIZE), (2, 3, 48, 40)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(x)[0]
        got = embedder(x)
        assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-5


def test_export_prints_the_check(exported):
    printed = exported['printed']
    assert printed.startswith('exporting ') and re.search(rf'\nwrote {re.escape(exported["onnx"])} \([\d.]+ MiB\)\n$',
                                                          printed), printed
    found = re.search(r'checked on 12 images: features within ([\d.e+-]+) of PyTorch\'s, the same top-10 for '
                      r'100\.00 % of queries \(100\.00 % without swapping near ties\), R@1 ([\d.]+) % \(PyTorch \2 %\), MAP@R ([\d.]+) % \(PyTorch \3 %\)',
                      printed)
    assert found and float(found[1]) <= 1e-4, printed


@pytest.mark.slow
def test_a_bad_export_is_refused_and_nothing_is_left(exported, monkeypatch, capsys):
    """An export whose weights drifted from the model's (as a wrong mode or a broken operator would make it)."""
    real = export.onnx_bytes

    def drifted(model, config, opset):
        copy = Model('resnet18', 8, 3, 'SMG').eval()
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            copy.projections[0].weight.add_(torch.randn_like(copy.projections[0].weight) * 0.05)
        return real(copy, config, opset)

    monkeypatch.setattr(export, 'onnx_bytes', drifted)
    results = os.path.join(exported['folder'], 'refused')
    code, printed, err = run(export.main, ['--data_base', exported['db_path'], '--results_dir', results], capsys)
    assert code == 1 and err.count('\n') == 1, err
    assert re.fullmatch(r'error: the ONNX export of .*tiny_uncropped_resnet18_8_model\.pth differs from PyTorch on '
                        r'the images of .*: features differ by up to [\d.]+e-0[1-3] \(allowed 0\.0001\).*; nothing was '
                        r'written\n', err), err
    assert not os.path.exists(results) or leftovers(results) == []


@pytest.mark.slow
def test_a_query_gallery_database_is_checked_on_both_splits(tmp_path, capsys):
    """In-shop's protocol: the query split searches the gallery; both splits' features are compared."""
    root = os.path.join(tmp_path, 'tiny', 'images')
    query, gallery = (make_split(root, [str(i % 3) for i in range(n)], seed)[:2] for n, seed in ((6, 3), (9, 4)))
    db_path, _ = make_database(str(tmp_path), query, gallery)
    code, printed, err = run(export.main, ['--data_base', db_path, '--results_dir', str(tmp_path)], capsys)
    assert (code, err) == (0, '') and 'checked on 15 images: ' in printed and \
        'the same top-9 for 100.00 % of queries' in printed, printed


def test_near_ties_may_trade_places():
    queries = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.0, 1.0]])  # scores 0.6, 0.6, 0.0
    a = torch.tensor([[0, 1, 2]])
    assert export.tied(queries, gallery, a, torch.tensor([[1, 0, 2]])).tolist() == [True]
    assert export.tied(queries, gallery, a, torch.tensor([[0, 2, 1]])).tolist() == [False]


def test_opset_range(capsys):
    code, _, err = run(export.main, ['--opset', '12'], capsys)
    assert (code, err) == (1, 'error: --opset must be between 13 and 20, got 12\n')


@pytest.mark.slow
@pytest.mark.parametrize('opset, branches', [(13, 'SM'), (20, 'MG')])
def test_opsets_at_the_ends_of_the_range(opset, branches):
    check_backbone('resnet18', branches, opset)


def check_backbone(backbone_type, branches, opset=export.OPSET):
    """Export a random-weight model at 32 px and compare its features with PyTorch's at 32 and 40 px."""
    torch.manual_seed(0)
    model = Model(backbone_type, 4, 3, branches).eval()
    config = {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD, 'image_size': 32, 'backbone_type': backbone_type,
              'branches': branches, 'feature_dim': 4, 'model_sha256': '0' * 64}
    embedder = export.OnnxEmbedder(export.onnx_bytes(model, config, opset), 'the export')
    for side in (32, 40):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            want = model(x)[0]
        got = embedder(x)
        assert got.shape == (2, 4 * len(branches)) and float((got - want).abs().max()) <= 1e-5


# Each export takes seconds: every backbone and every branch set once, not their product (a branch pools the stage-4
# map whatever the backbone, which only sets its channels): ResNet-18 SMG is the `exported` fixture, SM and MG are
# exported at the ends of the opset range, SG on SE-ResNet-50.

@pytest.mark.slow
@pytest.mark.parametrize('branches', ['S', 'M', 'G'])
def test_each_branch_alone_exports(branches):
    check_backbone('resnet18', branches)


@pytest.mark.slow
@pytest.mark.parametrize('backbone_type, branches', [('resnet50', 'SMG'), ('seresnet50', 'SG')])
def test_every_backbone_exports(backbone_type, branches):
    check_backbone(backbone_type, branches)


# ---- the file against a database: serve.py --onnx refuses what does not match, in one line ----

def serve_error(capsys, db_path, onnx_path, *extra):
    code, printed, err = run(serve.main, ['--data_base', db_path, '--onnx', onnx_path, '--port', '0', *extra], capsys)
    assert code == 1 and printed == '' and err.count('\n') == 1 and err.startswith('error: '), (printed, err)
    return err


def edited(exported, name, change):
    """A copy of the export with its metadata changed by change({key: JSON text})."""
    proto = onnx.load(exported['onnx'])
    props = {p.key: p.value for p in proto.metadata_props}
    change(props)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    path = os.path.join(exported['folder'], name)
    onnx.save(proto, path)
    return path


def test_a_corrupt_onnx_file_is_one_line(exported, capsys):
    path = os.path.join(exported['folder'], 'corrupt.onnx')
    with open(exported['onnx'], 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 3])  # truncated
    assert f'error: {path} is not a usable ONNX model (' in serve_error(capsys, exported['db_path'], path)


def test_onnx_without_metadata_is_one_line(exported, capsys):
    path = edited(exported, 'plain.onnx', lambda props: props.clear())
    err = serve_error(capsys, exported['db_path'], path)
    assert err.startswith(f'error: {path} is an ONNX model without the metadata export.py writes (missing '), err


def test_a_database_of_another_model_is_one_line(exported, capsys, tmp_path):
    images = make_split(os.path.join(tmp_path, 'tiny', 'images'), ['0', '1', '2'], seed=2)[:2]
    other, _ = make_database(str(tmp_path), images, seed=1)  # the same settings, other weights
    err = serve_error(capsys, other, exported['onnx'])
    assert err.startswith(f'error: {exported["onnx"]} is not an export of the model of {other}: '), err


def test_metadata_that_does_not_match_the_database_is_one_line(exported, capsys):
    path = edited(exported, 'edited.onnx', lambda props: props.update(image_size='64'))
    err = serve_error(capsys, exported['db_path'], path)
    assert err == (f'error: the metadata of {path} does not match {exported["db_path"]}: image_size is 64 in the '
                   f'ONNX file and 32 in the database (an edited or damaged file? export it again with export.py)\n')


def test_onnx_embeds_on_the_cpu_only(exported, capsys):
    err = serve_error(capsys, exported['db_path'], exported['onnx'], '--device', 'cuda')
    assert err == 'error: --device: with --onnx, onnxruntime embeds uploads on the CPU (leave --device out)\n'


# ---- docs/export.md's snippet: PIL, numpy and onnxruntime alone ----

def test_the_docs_snippet_reproduces_the_database_features(exported):
    text = (REPO / 'docs' / 'export.md').read_text()
    code = re.search(r'```python\n(.*?)```', text, re.S)[1]
    assert 'import torch' not in code and "'my_photo.jpg'" in code
    namespace = {}
    exec(code.replace("'results/demo_uncropped_resnet18_512_model.onnx'", repr(exported['onnx']))
             .replace("'my_photo.jpg'", repr(exported['images'][0])), namespace)
    database = torch.load(exported['db_path'], weights_only=True)
    got = torch.from_numpy(np.stack([namespace['embed'](p) for p in exported['images']]))
    # PIL's BILINEAR and imaging.resize_uint8 agree to 1 grey level: the features nearly, the rankings exactly
    assert float((got - database['test_features']).abs().max()) <= 0.02
    assert torch.equal((got @ got.T).argsort(dim=1, descending=True)[:, :3],
                       (database['test_features'] @ database['test_features'].T).argsort(dim=1, descending=True)[:, :3])
    x = np.asarray(namespace['Image'].open(exported['images'][0]).convert('RGB').resize(
        (IMAGE_SIZE, IMAGE_SIZE), namespace['Image'].BILINEAR), dtype=np.int16)
    reference = imaging.resize_uint8(imaging.load_image_uint8(exported['images'][0]), IMAGE_SIZE)
    assert np.abs(x - reference.permute(1, 2, 0).numpy().astype(np.int16)).max() <= 1


# ---- serve.py --onnx against the PyTorch path ----

@pytest.mark.slow
def test_serve_onnx_answers_as_pytorch(exported, tmp_path):
    db_path, onnx_path = exported['db_path'], exported['onnx']
    database = retrieval.open_database(db_path, 'results', CPU)
    proc, base = start_server(db_path, '--onnx', onnx_path)
    try:
        status, info = request(base + 'api/info')
        assert status == 200 and info['model_file'] == os.path.basename(onnx_path)
        for seed in (1, 2):  # photos not in the database
            path = os.path.join(tmp_path, f'outside{seed}.jpg')
            with open(path, 'wb') as f:
                f.write(serve_latency.photo(seed, size=(60, 45)))
            with open(path, 'rb') as f:
                status, answer = upload(base, f.read(), k=5)
            indices, scores, _ = expected(database, path, 5)
            assert status == 200 and [hit['index'] for hit in answer['results']] == indices
            assert [hit['score'] for hit in answer['results']] == pytest.approx(scores, abs=1e-4)
        status, answer = request(base + 'api/search?index=3&k=4')  # a database image: its stored feature
        indices, scores = search.top_k(database.features[3], database.features, 4, 3, database.labels,
                                       database.labels[3])
        assert status == 200 and [hit['index'] for hit in answer['results']] == indices
    finally:
        code, err = stop_server(proc)
        kill_groups([proc])
    assert (code, err) == (130, 'interrupted: server stopped\n')


@pytest.mark.slow
def test_benchmark_times_both_runtimes(exported):
    eager, onnx = serve_latency.embed_times(exported['db_path'], serve_latency.photo(0), count=6, threads=1)
    assert 0 < eager < 60 and 0 < onnx < 60
