"""Limits the scripts state in one line: flag ranges (and README's table of them), oversized images, memory
running out while the cache is built, test.py's results folder and its hidden temporary folders, the
Train set line of a capped batch, the curves' legend, and the documents the project's files name."""
import io
import os
import re
import struct
import sys
import warnings
import zlib

import pytest
import torch
from PIL import Image

from _query_fixtures import load_script, make_database, make_split, run_test_script
from _train_fixtures import NAME, REPO, flags, out, python_env, run_process, run_script
import data_utils
import index
import serve
import train
from cli import UserError
import cli
import batches
import distributed
import imaging
import model as model_lib
import utils
import retrieval
import files
import runs

script = load_script()


def run(argv, capsys):
    return run_test_script(script, argv, capsys)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 6-image, 3-class database and its model."""
    root = tmp_path_factory.mktemp('tiny')
    paths, labels, _ = make_split(str(root / 'images'), ['1', '1', '2', '2', '3', '3'], seed=2)
    db_path, _ = make_database(str(root / 'db'), (paths, labels))
    return {'root': root, 'db': db_path, 'paths': paths}


# ---- flag ranges ----

@pytest.mark.parametrize('value, shown', [('1e38', '1e+38'), ('1.5', '1.5'), ('0', '0'), ('-0.001', '-0.001'),
                                          ('nan', 'nan'), ('inf', 'inf')])
def test_lr_outside_its_range_is_one_line(dataset, tmp_path, value, shown):
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, tmp_path / 'results', '--lr', value))
    assert str(err.value) == f'--lr must be greater than 0 and at most 1, got {shown}'
    assert not (tmp_path / 'results').exists()


def test_one_seed_range_for_data_utils_and_train(dataset, tmp_path):
    assert cli.SEED_MAX == 2 ** 32 - 1
    for seed in (cli.SEED_MAX + 1, -1):
        message = f'--seed must be between 0 and {cli.SEED_MAX}, got {seed}'
        with pytest.raises(UserError, match=f'^{message}$'):
            data_utils.main(['--data_path', str(tmp_path / 'data'), '--data_name', 'demo', '--seed', str(seed)])
        with pytest.raises(UserError, match=f'^{message}$'):
            train.resolve_config(train.parse_args(flags(dataset, tmp_path / 'results', '--seed', str(seed))))
    config, _ = train.resolve_config(train.parse_args(flags(dataset, tmp_path / 'results', '--seed',
                                                            str(cli.SEED_MAX))))
    assert config['seed'] == cli.SEED_MAX
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'results').exists()


def readme_ranges():
    """docs/flags.md's table of accepted values -> {(script, flag): text}."""
    rows = re.findall(r'^\| (\w+\.py) \| (`--[^|]+`) \| (.+) \|$', (REPO / 'docs' / 'flags.md').read_text(), re.M)
    table = {}
    for name, flag_cell, text in rows:
        for flag in re.findall(r'`(--\w+)`', flag_cell):
            table[name, flag] = text
    return table


def script_flags(parser_of):
    """The --flags an argparse parser defines, from its help text."""
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        with pytest.raises(SystemExit):
            parser_of(['--help'])
        text = sys.stdout.getvalue()
    finally:
        sys.stdout = stdout
    return set(re.findall(r'(--\w+)', text)) - {'--help'}


def test_readme_table_lists_every_flag_with_the_code_ranges():
    table = readme_ranges()
    switches = {'--no_amp', '--compile', '--overwrite', '--eval_untrained', '--embedding_map'}  # no value, named under the table
    for name, parse in (('data_utils.py', data_utils.main), ('train.py', train.parse_args),
                        ('test.py', script.parse_args), ('serve.py', serve.parse_args),
                        ('index.py', index.parse_args)):
        assert script_flags(parse) - switches == {flag for s, flag in table if s == name}, name
    for flag, (low, high) in train.INT_RANGES.items():
        assert table['train.py', f'--{flag}'].startswith(f'{low}–{high}'), flag
    assert table['data_utils.py', '--seed'] == table['train.py', '--seed'] == \
        f'0–{cli.SEED_MAX} (2³²−1, NumPy\'s seed range)'
    assert table['train.py', '--lr'] == f'greater than 0, at most {train.LR_MAX:g}'
    assert table['data_utils.py', '--split'].startswith('a number strictly between 0 and 1')
    for value, ok in (('0.0001', True), ('1', True), ('1.0000001', False), ('0', False)):
        try:
            cli.check_float('--lr', float(value), 0, train.LR_MAX)
        except UserError:
            assert not ok, value
        else:
            assert ok, value


# ---- oversized images: one line naming the file and its size, no PIL warning text ----

def png_claiming(path, width, height):
    """A tiny 8x8 PNG whose header claims width x height (CRC fixed): PIL's open reads only the header."""
    buffer = io.BytesIO()
    Image.new('L', (8, 8)).save(buffer, 'PNG')
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b'IHDR'
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def jpeg_claiming(path, width, height):
    """A plain 8x8 JPEG whose frame header claims width x height (the torchvision decoding path's input)."""
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8), (10, 20, 30)).save(buffer, 'JPEG')
    data = bytearray(buffer.getvalue())
    sof = data.index(b'\xff\xc0')  # baseline frame: length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('make, loader', [(png_claiming, imaging.load_image), (png_claiming, imaging.load_image_uint8),
                                          (jpeg_claiming, imaging.load_image_uint8), (jpeg_claiming, imaging.load_image)])
@pytest.mark.parametrize('side', [11000, 20000])  # PIL warns above MAX_IMAGE_PIXELS, refuses above twice that
def test_image_over_pils_pixel_limit_is_refused_in_one_line(tmp_path, make, loader, side):
    path = make(tmp_path / f'huge.{"png" if make is png_claiming else "jpg"}', side, side)
    size = f'{side} x {side} = {side * side:,} pixels' if side * side <= 2 * Image.MAX_IMAGE_PIXELS \
        else f'{side * side:,} pixels'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(UserError) as err:
            loader(path)
    assert str(err.value) == (f'image {path} is too large to decode: {size}, more than the '
                              f'{Image.MAX_IMAGE_PIXELS:,} of PIL\'s Image.MAX_IMAGE_PIXELS (a guard against '
                              f'decompression bombs); shrink it first')
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_image_at_pils_pixel_limit_is_decoded(tmp_path):
    """The limit itself is allowed: 9459 x 9459 <= MAX_IMAGE_PIXELS passes the size check and fails only as
    the truncated file it is; a real picture 1 pixel short of it in area is decoded (1-bit: small on disk)."""
    assert 9459 ** 2 <= Image.MAX_IMAGE_PIXELS < 9460 ** 2
    with pytest.raises(UserError, match=r'^cannot decode image .*edge.png: '):
        imaging.load_image(png_claiming(tmp_path / 'edge.png', 9459, 9459))
    real = tmp_path / 'real.png'
    Image.new('1', (9459, 4000)).save(real)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert imaging.load_image(real).size == (9459, 4000)


def test_oversized_query_and_database_image_with_test_py(tiny, tmp_path, capsys):
    huge = png_claiming(tmp_path / 'huge.png', 11000, 11000)
    results = tmp_path / 'results'
    argv = ['--data_base', tiny['db'], '--retrieval_num', '5', '--results_dir', str(results), '--device', 'cpu']
    message = f'image {huge} is too large to decode: 11000 x 11000 = 121,000,000 pixels'
    code, stdout, err = run(['--query_img_name', str(huge)] + argv, capsys)
    assert (code, stdout) == (1, '') and err.startswith(f'error: {message}') and err.count('\n') == 1, err
    db = torch.load(tiny['db'], weights_only=True)  # a database that lists the huge image
    db['test_images'][3] = str(huge)
    copy = tmp_path / 'copy'
    state = torch.load(os.path.join(os.path.dirname(tiny['db']), db['config']['model_file']), weights_only=True)
    retrieval.save_model_and_database(state, db, str(copy / db['config']['model_file']),
                                  str(copy / os.path.basename(tiny['db'])))
    argv[1] = str(copy / os.path.basename(tiny['db']))
    code, stdout, err = run(['--query_img_name', tiny['paths'][0]] + argv, capsys)
    assert (code, stdout) == (1, '') and err.startswith(f'error: {message}') and err.count('\n') == 1, err
    assert not results.exists()


# ---- memory running out while the cache is built ----

@pytest.mark.slow
def test_out_of_memory_while_building_the_cache_is_one_line(dataset, tmp_path):
    """Under an address-space limit (ulimit -v) the cache tensor cannot be allocated: one line, exit 1."""
    dicts = torch.load(os.path.join(dataset, NAME, 'uncropped_data_dicts.pth'), weights_only=True)
    one = next(iter(dicts['train'].values()))[0]  # the same file listed 250 times: 1.0 GiB at 1170 x 1170
    big = {'train': {label: [one] * 125 for label in list(dicts['train'])[:2]}, 'test': dicts['test']}
    (tmp_path / 'big').mkdir()
    torch.save(big, tmp_path / 'big' / 'uncropped_data_dicts.pth')
    limit = ('import resource, sys; import train, cli; '
             'vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize")); '
             'resource.setrlimit(resource.RLIMIT_AS, (vm + 2 ** 29, resource.getrlimit(resource.RLIMIT_AS)[1])); '
             'cli.run_cli(lambda: train.main(sys.argv[1:]))')
    args = flags(tmp_path, tmp_path / 'results', '--data_name', 'big', '--image_size', '1024', '--cache', 'ram',
                 epochs=1)
    result = run_process([sys.executable, '-c', limit, *args], env=python_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'error: out of memory while decoding 250 images of 1170x1170 into the cache (0.96 GiB in RAM): use '
        '--cache off, or a smaller --image_size'), result.stderr
    assert 'Traceback' not in result.stderr and not os.path.exists(out(tmp_path / 'results', 'statistics.csv'))


@pytest.mark.parametrize('error', [MemoryError(), torch.OutOfMemoryError('CUDA out of memory. Tried to allocate'),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_cache_memory_errors_become_one_line(dataset, monkeypatch, error):
    dataset_list = batches.ImageListDataset({'a': [os.path.join(dataset, NAME, 'x.png')] * 3}, 40)

    def fail(out, data, show_bar):
        raise error
    monkeypatch.setattr(batches, '_decode_into', fail)
    with pytest.raises(UserError, match=r"^out of memory while decoding 3 images of 40x40 into the cache \(0.00 GiB "
                                        r"in RAM\): use --cache off, or a smaller --image_size$"):
        batches.build_cache(dataset_list, 'ram', torch.device('cpu'), 'key', show_bar=False)
    error = RuntimeError('other failure')
    with pytest.raises(RuntimeError, match='other failure'):  # not every RuntimeError is memory
        batches.build_cache(dataset_list, 'ram', torch.device('cpu'), 'key', show_bar=False)


# ---- test.py: its results folder, its hidden temporary folders ----

@pytest.mark.parametrize('kind', ['empty', 'file'])
def test_test_py_results_dir_must_be_a_folder(tiny, tmp_path, capsys, monkeypatch, kind):
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    value = '' if kind == 'empty' else str(tmp_path / 'results.txt')
    if kind == 'file':
        (tmp_path / 'results.txt').write_text('notes')
    code, stdout, err = run(['--query_img_name', tiny['paths'][0], '--data_base', tiny['db'], '--retrieval_num', '2',
                             '--results_dir', value], capsys)
    assert (code, stdout, err) == (1, '', f"error: --results_dir '{value}': expected a folder\n")
    assert os.listdir(cwd) == [] and (kind == 'empty' or (tmp_path / 'results.txt').read_text() == 'notes')


@pytest.mark.slow
def test_killed_test_py_leaves_folders_the_next_run_removes(tiny, tmp_path, capsys):
    results = tmp_path / 'results'
    query = tiny['paths'][0]
    stem = os.path.splitext(os.path.basename(query))[0]
    argv = ['--query_img_name', query, '--data_base', tiny['db'], '--retrieval_num', '3', '--results_dir',
            str(results), '--device', 'cpu']
    killed = run_script(argv, fault='kill-write:retrieval_img_2:1', script='test.py')
    assert killed.returncode == -9, killed.stderr
    left = os.listdir(results)
    assert len(left) == 1 and re.fullmatch(re.escape(f'.{stem}.') + r'[0-9a-f]{8}\.tmp', left[0])
    assert (results / left[0] / files.MARKER).is_file()  # the marker goes in first: the folder is test.py's
    # what else may lie there: a replaced set a kill left (removed), and folders that are not test.py's to remove
    (results / f'.{stem}.0123abcd.old.tmp').mkdir()
    (results / f'.{stem}.0123abcd.old.tmp' / files.MARKER).write_bytes(files.MARKER_TEXT)
    kept = [f'.{stem}.89abcdef.tmp', f'.{stem}.notours.tmp', f'.other_{stem}.0123abcd.tmp', f'.{stem}.fedcba98.tmp']
    for name in kept[:3]:
        (results / name).mkdir()
        (results / name / files.MARKER).write_bytes(b'')
    (results / kept[3]).mkdir()  # named like test.py's, but no marker: someone else's
    (results / kept[3] / 'notes.txt').write_text('mine')
    import fcntl
    with open(results / kept[0] / files.MARKER, 'rb') as held:  # a test.py still writing holds its marker
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(os.listdir(results)) == sorted([stem] + kept)
    assert (results / kept[3] / 'notes.txt').read_text() == 'mine'
    written = os.listdir(results / stem)  # the whole new set: 3 retrievals, the query, the row, the marker
    assert len(written) == 6 and {files.MARKER, 'query_img.jpg', 'retrieval.png'} < set(written)


# ---- train.py: the Train set line; the curves ----

@pytest.mark.parametrize('sizes, batch, world, images, line', [
    ([4, 4, 4], 4, 1, 12, 'Train set: 12 images, 3 steps of 4 per epoch (12 training images)'),
    ([11], 11, 1, 12, 'Train set: 11 images, 1 step of 11 per epoch (12 training images)'),
    ([24], 128, 1, 24, 'Train set: 24 images, 1 step of 24 images per epoch (--batch_size 128 capped at the 24 '
                       'training images)'),
    ([12], 128, 2, 24, 'Train set: 24 images, 1 step of 24 images per epoch (--batch_size 128 capped at the 24 '
                       'training images)'),
])
def test_train_set_line_counts(sizes, batch, world, images, line, monkeypatch):
    assert train.train_set_line([[(0, 0)] * n for n in sizes], batch, world, images) == line
    # benchmarks/end_to_end.py times runs from this line: it reads every form of it
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import end_to_end
    found = end_to_end.TRAIN_SET_RE.match(line)
    assert found and (int(found[1]), int(found[2])) == (sum(sizes) * world, len(sizes))


def test_capped_batch_is_named_and_trains_as_before(dataset, tmp_path):
    """--batch_size 64 on 12 training images: one step of 12, the same numbers as --batch_size 12. Apart from the
    flag, the two runs have the same settings, batches, evaluation batches and training epoch."""
    rt = distributed.Runtime(torch.device('cpu'), amp=False)
    configs, images = {}, {}
    for batch in (64, 12):
        configs[batch], dicts = train.resolve_config(train.parse_args(flags(dataset, tmp_path, '--batch_size',
                                                                            str(batch))))
        images[batch] = batches.Images(dicts, configs[batch], rt)
    assert dict(configs[64], batch_size=12) == configs[12]
    assert train.train_set_line(images[64].epoch_batches(1), 64, 1, len(images[64].train)) == (
        'Train set: 12 images, 1 step of 12 images per epoch (--batch_size 64 capped at the 12 training images)')
    for epoch in (1, 2):
        epoch_batches = images[64].epoch_batches(epoch)
        assert epoch_batches == images[12].epoch_batches(epoch) and [len(b) for b in epoch_batches] == [12]
        for (a, ta), (b, tb) in zip(images[64].train_batches(epoch_batches), images[12].train_batches(epoch_batches)):
            assert torch.equal(a, b) and torch.equal(ta, tb)
    a, b = torch.cat(list(images[64].eval_batches('test'))), torch.cat(list(images[12].eval_batches('test')))
    assert a.shape == (12, 3, 32, 32) and torch.equal(a, b)
    trained = {}
    for batch in (64, 12):  # an epoch as train.py runs it: the same loss, accuracy and weights
        torch.manual_seed(configs[batch]['seed'])
        model = model_lib.Model('resnet18', 8, 3)
        optimizer = torch.optim.Adam(model.parameters(), lr=configs[batch]['lr'], weight_decay=train.WEIGHT_DECAY)
        utils.seed_everything(utils.derive_seed(configs[batch]['seed'], 1, 0))
        stats = train.train_one_epoch(model, images[batch], utils.LabelSmoothingCrossEntropy(), optimizer, rt, 1, 1)
        trained[batch] = ({k: stats[k] for k in ('loss', 'accuracy')}, model.state_dict())
    assert trained[64][0] == trained[12][0]
    assert trained[64][1].keys() == trained[12][1].keys()
    assert all(torch.equal(trained[64][1][k], trained[12][1][k]) for k in trained[64][1])


def test_curves_legend_outside_the_panels(monkeypatch):
    from matplotlib.figure import Figure
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, 'savefig', lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    rows = [{'epoch': e, 'train_loss': 3.0 / e, 'train_accuracy': 10.0 * e, 'test_map@r': 5.0 + e,
             **{f'test_recall@{k}': 40.0 + 5 * e + k for k in (1, 2, 4, 8)}} for e in range(1, 9)]
    png = runs.plot_curves(rows, [1, 2, 4, 8], 'demo_uncropped_resnet18_512')
    assert png.startswith(b'\x89PNG') and len(figures) == 1
    fig = figures[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()  # the layout savefig drew
    legend = fig.axes[2].get_legend().get_window_extent(renderer)
    whole = fig.bbox
    assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()] == ['R@1', 'R@2', 'R@4', 'R@8', 'MAP@R']
    for ax in fig.axes:  # over no panel: the markers and lines stay visible
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    # inside the picture: nothing clipped
    assert whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and whole.y0 <= legend.y0 and legend.y1 <= whole.y1


# ---- the project's files cite only what the repository holds ----

def test_every_document_the_files_name_is_in_the_repository():
    files = run_process(['git', 'ls-files']).stdout.split()
    if not files:
        pytest.skip('not a git checkout: the tracked files are unknown')
    named = {}
    for name in files:
        if name.endswith(('.py', '.md', '.txt')) or '/' not in name and '.' not in name:
            text = (REPO / name).read_text(errors='replace') if (REPO / name).is_file() else ''
            for document in re.findall(r'[\w./-]*\w\.md\b', text):
                named.setdefault(document, name)
    missing = {d: by for d, by in named.items() if os.path.basename(d) not in {os.path.basename(f) for f in files}}
    assert missing == {}
