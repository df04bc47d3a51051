"""train.py: the loss, the LR schedule, frozen BatchNorm, an end-to-end run and bad input."""
import hashlib
import math
import os
import re
import shutil

import pandas as pd
import pytest
import torch
import torchvision

from _train_fixtures import EPOCHS, NAME, assert_same_tensors, flags, out, run_script, tensors
import data_utils
import metrics
import model as model_lib
import train
import utils
from cli import UserError
import distributed
import batches
import imaging
import retrieval


# ----------------------------------------------------------------------------------------------
# loss and schedule
# ----------------------------------------------------------------------------------------------


def test_class_balanced_weights_by_hand():
    # counts 3, 1, 2 of N = 6 -> N/n = 2, 6, 3 (sum 11) -> scaled to sum 3: 6/11, 18/11, 9/11
    w = utils.class_balanced_weights(torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    assert torch.allclose(w, torch.tensor([6 / 11, 18 / 11, 9 / 11]))
    assert math.isclose(float(w.sum()), 3.0, rel_tol=1e-6)
    # a class without samples gets 0; the rest still sum to the number of classes
    w = utils.class_balanced_weights([0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 0.0]))


def test_label_smoothing_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    weight = torch.tensor([6 / 11, 18 / 11, 9 / 11])

    def by_hand(row, t, temperature):
        z = [v / temperature for v in row]
        log_norm = math.log(sum(math.exp(v) for v in z))
        log_p = [v - log_norm for v in z]
        return 0.9 * -log_p[t] + 0.1 * -sum(log_p) / len(log_p)

    for temperature in (1.0, 0.5):
        rows = logits.tolist()
        plain = (by_hand(rows[0], 0, temperature) + by_hand(rows[1], 2, temperature)) / 2
        weighted = (6 / 11 * by_hand(rows[0], 0, temperature) + 9 / 11 * by_hand(rows[1], 2, temperature)) / 2
        loss = utils.LabelSmoothingCrossEntropy(0.1, temperature)(logits, target)
        assert math.isclose(float(loss), plain, rel_tol=1e-6)
        loss = utils.LabelSmoothingCrossEntropy(0.1, temperature, weight=weight)(logits, target)
        assert math.isclose(float(loss), weighted, rel_tol=1e-6)
    # sample 0 at T = 1 on paper: log-sum-exp(2, 0, -1) = 2.16984, so -log p = (0.16984, 2.16984,
    # 3.16984): 0.9 * 0.16984 + 0.1 * mean(...) = 0.15286 + 0.18365
    assert math.isclose(by_hand([2.0, 0.0, -1.0], 0, 1.0), 0.33651, rel_tol=1e-4)
    single = utils.LabelSmoothingCrossEntropy()(logits[:1], target[:1])
    assert math.isclose(float(single), 0.33651, rel_tol=1e-4)


def test_lr_schedule_milestones():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-4)
    scheduler = train.make_scheduler(optimizer, 20)
    lrs = []
    for _ in range(20):  # lr in force during epochs 1..20, stepped after each
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    for epoch, lr in enumerate(lrs, start=1):
        expected = 1e-4 if epoch <= 12 else 1e-5 if epoch <= 16 else 1e-6
        assert math.isclose(lr, expected, rel_tol=1e-9), (epoch, lr)
    # short runs: int(0.6 E) = 0 is dropped, repeats merged
    assert list(train.make_scheduler(optimizer, 1).milestones) == []
    assert sorted(train.make_scheduler(optimizer, 3).milestones) == [1, 2]
    assert sorted(train.make_scheduler(optimizer, 2).milestones) == [1]


def test_backbone_batchnorm_frozen_with_loaded_weights(tmp_path, dataset):
    # an 'ImageNet' file (torchvision layout, fc included) with non-trivial BN statistics
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()
    for m in imagenet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / 'resnet18_imagenet.pth'
    torch.save(imagenet.state_dict(), weights)

    args = train.parse_args(flags(dataset, tmp_path / 'results', '--pretrained', str(weights)))
    config, dicts = train.resolve_config(args)
    assert config['freeze_backbone_bn'] is True and config['lr'] == 1e-4  # weights loaded: recipe values
    model = model_lib.Model('resnet18', 8, config['num_classes'], pretrained=str(weights),
                            freeze_backbone_bn=config['freeze_backbone_bn'])
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items()
                 if 'running' in k or 'num_batches' in k}
    conv_before = model.backbone.conv1.weight.detach().clone()
    head_bn_before = model.classifier[0].running_mean.clone()

    rt = distributed.Runtime(torch.device('cpu'), amp=False)
    images = batches.Images(dicts, dict(config, cache='off'), rt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train.train_one_epoch(model, images, utils.LabelSmoothingCrossEntropy(), optimizer, rt, 1, 1)
    assert stats['loss'] > 0.5  # 3 classes, untrained: near ln 3
    for k, v in model.backbone.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k
    assert not torch.equal(model.backbone.conv1.weight, conv_before)  # it did train
    assert not torch.equal(model.classifier[0].running_mean, head_bn_before)  # head BN is not frozen

    # from scratch the backbone BN trains (frozen, it keeps an untrained backbone near chance)
    args = train.parse_args(flags(dataset, tmp_path / 'results'))
    config, _ = train.resolve_config(args)
    assert config['freeze_backbone_bn'] is False and config['lr'] == 1e-3


# ----------------------------------------------------------------------------------------------
# end to end: data_utils -> train.py -> statistics, model, database, curves
# ----------------------------------------------------------------------------------------------


def test_end_to_end_outputs_consistent(reference):
    results, stdout = reference
    stats = pd.read_csv(out(results, 'statistics.csv'))
    assert list(stats.columns) == ['epoch', 'train_loss', 'train_accuracy', 'test_recall@1', 'test_recall@2',
                                   'test_map@r', 'test_r_precision']
    assert stats['epoch'].tolist() == list(range(1, EPOCHS + 1))
    assert stats['train_loss'].between(0, 10).all() and stats['train_accuracy'].between(0, 100).all()
    assert (stats['test_recall@1'] <= stats['test_recall@2']).all()

    # printed: resolved config, Params/FLOPs, the Train set line (its forms: test_limits), one line per epoch with
    # every R@K, MAP@R and R-Precision
    assert 'Config:' in stdout and 'Params: ' in stdout and 'FLOPs: ' in stdout
    assert 'Train set: 12 images, 3 steps of 4 per epoch (12 training images)' in stdout
    for row in stats.itertuples():
        assert (f'Epoch {row.epoch}/{EPOCHS} | train loss {row.train_loss:.4f} acc {row.train_accuracy:.2f}% | '
                f'R@1 {row._4:.2f}% R@2 {row._5:.2f}% | MAP@R {row._6:.2f}% RP {row.test_r_precision:.2f}%') in stdout

    # the database holds the best epoch (first strict maximum of R@1) and re-evaluates to its row
    best = int(stats['test_recall@1'].idxmax())
    database = tensors(out(results, 'data_base.pth'))
    assert set(database) == {'version', 'test_images', 'test_labels', 'test_features', 'config'}
    assert database['version'] == retrieval.VERSION
    features, labels = database['test_features'], database['test_labels']
    assert features.shape == (12, 24) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=1), torch.ones(12), atol=1e-5)
    assert len(database['test_images']) == 12 and all(os.path.isfile(p) for p in database['test_images'])
    ids = {label: k for k, label in enumerate(sorted(set(labels)))}
    found = metrics.evaluate(features, torch.tensor([ids[label] for label in labels]), [1, 2])
    assert 100 * found['R@1'] == stats['test_recall@1'][best]
    assert 100 * found['R@2'] == stats['test_recall@2'][best]
    assert 100 * found['MAP@R'] == stats['test_map@r'][best]
    assert 100 * found['R-Precision'] == stats['test_r_precision'][best]
    config = database['config']
    mean, std = imaging.normalization(NAME)
    assert config == {'backbone_type': 'resnet18', 'feature_dim': 8, 'branches': 'SMG', 'num_classes': 3,
                      'image_size': 32, 'mean': list(mean), 'std': list(std),
                      'data_name': NAME, 'crop_type': 'uncropped',
                      'model_file': os.path.basename(out(results, 'model.pth')),
                      'model_sha256': hashlib.sha256(open(out(results, 'model.pth'), 'rb').read()).hexdigest(),
                      'settings': tensors(out(results, 'checkpoint.pth'))['config']}  # the run's, as resume checks them

    # the model file is that epoch's model: it re-embeds the test images into the stored features
    state = tensors(os.path.join(results, config['model_file']))
    model = model_lib.Model('resnet18', 8, 3, branches='SMG')
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        batch = torch.stack([imaging.eval_input(p, 32, config['mean'], config['std']) for p in database['test_images']])
        again, _ = model(batch)
    assert torch.allclose(again, features, atol=1e-5)

    checkpoint = tensors(out(results, 'checkpoint.pth'))
    assert checkpoint['epoch'] == EPOCHS and checkpoint['best_epoch'] == best + 1
    assert checkpoint['best_recall'] * 100 == stats['test_recall@1'][best]
    with open(out(results, 'curves.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert not [p for p in os.listdir(results) if p.endswith('.tmp')]


def test_resume_when_done_changes_nothing(dataset, reference, tmp_path, capsys):
    results = shutil.copytree(reference[0], tmp_path / 'copy')
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    train.main(flags(dataset, results, '--resume', 'auto'))
    assert 'Nothing to do' in capsys.readouterr().out
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before


# ----------------------------------------------------------------------------------------------
# bad input: one clear message, nothing in results/ touched
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('extra, message', [
    (['--data_name', 'nosuch'], "unknown dataset 'nosuch'"),
    (['--crop_type', 'cropped'], 'cropped_data_dicts.pth'),
    (['--recalls', '1,x'], 'comma-separated positive integers'),
    (['--recalls', '0,1'], 'comma-separated positive integers'),
    (['--recalls', '1,12'], 'R@12 needs 12 candidates per query, but'),
    (['--feature_dim', '0'], '--feature_dim must be between 1 and 8192, got 0'),
    (['--feature_dim', '3000000'], '--feature_dim must be between 1 and 8192, got 3000000'),
    (['--branches', 'SX'], "invalid branch set 'SX'"),
    (['--pretrained', 'missing_weights.pth'], '--pretrained missing_weights.pth'),
    (['--resume', 'missing_checkpoint.pth'], '--resume missing_checkpoint.pth: checkpoint not found'),
    (['--resume', 'auto', '--overwrite'], 'pass one of them'),
    (['--batch_size', '1'], '--batch_size must be between 2 and 65536, got 1'),
    (['--num_epochs', '0'], '--num_epochs must be between 1 and 100000, got 0'),
    (['--image_size', '8'], '--image_size must be between 16 and 1024, got 8'),
    (['--image_size', '5000'], '--image_size must be between 16 and 1024, got 5000'),
    (['--seed', '4294967296'], '--seed must be between 0 and 4294967295, got 4294967296'),
    (['--lr', '1e38'], '--lr must be greater than 0 and at most 1, got 1e+38'),
    (['--num_workers', '-1'], '--num_workers must be between 0 and 256, got -1'),
    (['--device', 'tpu'], "--device 'tpu'"),
])
def test_bad_input_clear_message_results_untouched(dataset, tmp_path, extra, message):
    results = tmp_path / 'results'
    results.mkdir()
    sentinel = results / 'tiny_uncropped_resnet18_8_statistics.csv'
    sentinel.write_bytes(b'previous run\n')
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, *extra))
    assert message in str(err.value)
    assert os.listdir(results) == [sentinel.name] and sentinel.read_bytes() == b'previous run\n'


def test_missing_data_dict_names_file(tmp_path):
    (tmp_path / NAME).mkdir()
    with pytest.raises(UserError) as err:
        train.main(flags(tmp_path, tmp_path / 'results'))
    assert os.path.join(str(tmp_path), NAME, 'uncropped_data_dicts.pth') in str(err.value)
    assert 'python data_utils.py' in str(err.value) and not (tmp_path / 'results').exists()


def test_results_dir_that_is_a_file(dataset, tmp_path):
    results = tmp_path / 'results'
    results.write_bytes(b'not a folder')
    with pytest.raises(UserError, match=f"--results_dir '{results}': expected a folder"):
        train.main(flags(dataset, results))
    assert results.read_bytes() == b'not a folder'


def test_unknown_backbone_is_an_argparse_error(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main(flags(dataset, tmp_path / 'results', '--backbone_type', 'vgg16'))
    assert err.value.code == 2 and "invalid choice: 'vgg16'" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_exit_status_and_no_traceback(dataset, tmp_path):
    result = run_script(flags(dataset, tmp_path / 'results', '--recalls', '1,two'))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --recalls '1,two': expected comma-separated positive integers, e.g. 1,2,4,8"]
    assert not (tmp_path / 'results').exists()


@pytest.mark.slow
def test_query_gallery_dataset(dataset, tmp_path):
    # an In-shop-like data dict: the test images split into a query and a gallery half per class
    dicts = tensors(os.path.join(dataset, NAME, 'uncropped_data_dicts.pth'))
    query = {label: paths[:2] for label, paths in dicts['test'].items()}
    gallery = {label: paths[2:] for label, paths in dicts['test'].items()}
    data_path = tmp_path / 'data'
    (data_path / 'shop').mkdir(parents=True)
    torch.save({'train': dicts['train'], 'query': query, 'gallery': gallery},
               data_path / 'shop' / 'uncropped_data_dicts.pth')
    results = tmp_path / 'results'
    args = flags(data_path, results, '--data_name', 'shop', epochs=1)
    with pytest.raises(UserError, match='R@7 needs 7 candidates per query, but .* offers 6'):
        train.main(args + ['--recalls', '1,7'])
    train.main(args)

    database = tensors(os.path.join(results, 'shop_uncropped_resnet18_8_data_base.pth'))
    assert database['test_images'] == [p for paths in query.values() for p in paths]
    assert database['gallery_images'] == [p for paths in gallery.values() for p in paths]
    assert database['test_features'].shape == (6, 24) and database['gallery_features'].shape == (6, 24)
    labels = sorted(set(database['test_labels']))
    q = torch.tensor([labels.index(x) for x in database['test_labels']])
    g = torch.tensor([labels.index(x) for x in database['gallery_labels']])
    found = metrics.evaluate(database['test_features'], q, [1, 2], database['gallery_features'], g)
    stats = pd.read_csv(os.path.join(results, 'shop_uncropped_resnet18_8_statistics.csv'))
    assert stats['test_recall@1'][0] == 100 * found['R@1'] and stats['test_map@r'][0] == 100 * found['MAP@R']
    assert stats['test_r_precision'][0] == 100 * found['R-Precision']


# ----------------------------------------------------------------------------------------------
# images: the decode-once cache, the last batch
# ----------------------------------------------------------------------------------------------


def test_cached_batches_equal_loaded_batches(dataset, tmp_path):
    """The same pixels, crops and flips from the cache as from full decodes by the loader's workers."""
    config, dicts = train.resolve_config(train.parse_args(flags(dataset, tmp_path)))
    rt = distributed.Runtime(torch.device('cpu'), amp=False)
    cached = batches.Images(dicts, dict(config, cache='ram'), rt)
    loaded = batches.Images(dicts, dict(config, cache='off', num_workers=2), rt)
    assert cached.caches['train'].shape == (12, 3, 37, 37) and loaded.caches is None  # round(32 * 8 / 7)
    for epoch in (1, 2):
        pairs = list(zip(cached.train_batches(cached.epoch_batches(epoch)),
                         loaded.train_batches(loaded.epoch_batches(epoch))))
        assert len(pairs) == 3
        for (a, ta), (b, tb) in pairs:
            assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ta, tb)
    a, b = torch.cat(list(cached.eval_batches('test'))), torch.cat(list(loaded.eval_batches('test')))
    assert a.shape == (12, 3, 32, 32) and torch.equal(a, b)
    # epochs differ: the crops are drawn from (seed, epoch, image)
    assert not torch.equal(next(cached.train_batches(cached.epoch_batches(1)))[0],
                           next(cached.train_batches(cached.epoch_batches(2)))[0])


@pytest.mark.parametrize('batch, sizes', [(5, [5, 5, 2]), (11, [11]), (4, [4, 4, 4])])
def test_last_batch_kept_unless_single(dataset, tmp_path, batch, sizes):
    config, dicts = train.resolve_config(train.parse_args(flags(dataset, tmp_path, '--batch_size', str(batch))))
    images = batches.Images(dicts, dict(config, cache='off'), distributed.Runtime(torch.device('cpu'), amp=False))
    assert [len(b) for b in images.epoch_batches(1)] == sizes  # 12 images; 11 + 1 drops the single one


# ----------------------------------------------------------------------------------------------
# one run per results name; a finished run is not replaced without a word
# ----------------------------------------------------------------------------------------------


def test_second_run_on_the_same_name_stops_at_once(dataset, tmp_path):
    import fcntl
    results = tmp_path / 'results'
    results.mkdir()
    with open(results / '.tiny_uncropped_resnet18_8.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        (results / '.tiny_uncropped_resnet18_8_checkpoint.pth.abc.tmp').write_bytes(b'in flight')
        with pytest.raises(UserError, match='another train.py is running on .*tiny_uncropped_resnet18_8'):
            train.main(flags(dataset, results))
        assert (results / '.tiny_uncropped_resnet18_8_checkpoint.pth.abc.tmp').exists()  # not its to remove


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(dataset, reference, tmp_path, capsys):
    results = shutil.copytree(reference[0], tmp_path / 'copy')
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    best = pd.read_csv(out(results, 'statistics.csv'))['test_recall@1'].max()
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results))
    assert f'holds a run of this name (epoch {EPOCHS}, best R@1 {best:.2f}%)' in str(err.value)
    assert '--resume auto' in str(err.value) and '--overwrite' in str(err.value)
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before
    train.main(flags(dataset, results, '--overwrite', epochs=1))
    assert tensors(out(results, 'checkpoint.pth'))['epoch'] == 1
    assert len(pd.read_csv(out(results, 'statistics.csv'))) == 1


def nan_rows(features):
    return features * float('nan')


def zero_rows(features):  # a collapsed model: most embeddings all zeros (the ties would score 0, not 100 %)
    return features * (torch.arange(len(features)) % 4 == 0)[:, None]


@pytest.mark.slow
@pytest.mark.parametrize('fault, message', [(nan_rows, 'NaN or infinite weights or embeddings'),
                                            (zero_rows, '9 of 12 embeddings are all zeros')])
def test_diverged_embeddings_stop_the_run_best_files_kept(dataset, reference, tmp_path, monkeypatch, fault, message):
    results = tmp_path / 'results'
    extract = train.extract_features
    calls = []

    def diverging(model, images, rt, dim):  # the second epoch's embeddings
        features = extract(model, images, rt, dim)
        calls.append(1)
        return {k: fault(v) for k, v in features.items()} if len(calls) == 2 else features

    monkeypatch.setattr(train, 'extract_features', diverging)
    with pytest.raises(UserError, match=f'the model diverged at epoch 2: {message}; training stopped'):
        train.main(flags(dataset, results))
    state = tensors(out(results, 'checkpoint.pth'))
    assert state['epoch'] == 1 and state['best_epoch'] == 1
    with open(out(reference[0], 'statistics.csv')) as f:  # nothing of epoch 2 written
        first_epoch = ''.join(f.readlines()[:2])
    with open(out(results, 'statistics.csv')) as f:
        assert f.read() == first_epoch
    database, _ = retrieval.load_database(out(results, 'data_base.pth'))  # what test.py accepts
    assert_same_tensors(tensors(out(results, 'model.pth')), state['model'])
    assert torch.isfinite(database['test_features']).all() and (database['test_features'].norm(dim=1) > 0).all()


@pytest.mark.slow
def test_compile_and_untrained_baseline_train_the_same_numbers(dataset, reference, tmp_path, monkeypatch, capsys):
    # one run with --compile --eval_untrained. Dynamo captures the graphs as --compile does; a counting backend runs
    # them eagerly (inductor's C++ build takes minutes on 2 cores), so the numbers must equal the plain reference
    # run's exactly: neither compiling nor evaluating before training changes the run
    graphs, compile_ = [], torch.compile

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, 'compile', lambda module, **kwargs: compile_(module, backend=backend, **kwargs))
    torch._dynamo.reset()
    try:
        train.main(flags(dataset, tmp_path, '--compile', '--eval_untrained'))
    finally:
        torch._dynamo.reset()
    stdout = capsys.readouterr().out
    assert len(graphs) >= 2  # a training graph and an extraction (eval mode) graph at least
    assert len(re.findall(r'^Compile: \d+\.\ds \(the first training step', stdout, re.M)) == 1
    with open(out(tmp_path, 'statistics.csv'), 'rb') as a, open(out(reference[0], 'statistics.csv'), 'rb') as b:
        assert a.read() == b.read()
    checkpoint, model = tensors(out(tmp_path, 'checkpoint.pth')), tensors(out(tmp_path, 'model.pth'))
    assert_same_tensors(model, tensors(out(reference[0], 'model.pth')))  # no '_orig_mod.' prefix either
    assert checkpoint['model'].keys() == model.keys()

    # the baseline is the seeded initial model's R@K on the test images
    line = [text for text in stdout.splitlines() if text.startswith('Before training | ')]
    assert len(line) == 1
    database = tensors(out(reference[0], 'data_base.pth'))
    config = database['config']
    torch.manual_seed(0)
    initial = model_lib.Model('resnet18', 8, 3, branches='SMG').eval()
    with torch.no_grad():
        features, _ = initial(torch.stack([imaging.eval_input(p, 32, config['mean'], config['std'])
                                           for p in database['test_images']]))
    ids = {label: k for k, label in enumerate(sorted(set(database['test_labels'])))}
    found = metrics.evaluate(features, torch.tensor([ids[label] for label in database['test_labels']]), [1, 2])
    assert line[0] == (f'Before training | R@1 {100 * found["R@1"]:.2f}% R@2 {100 * found["R@2"]:.2f}% '
                       f'| MAP@R {100 * found["MAP@R"]:.2f}% RP {100 * found["R-Precision"]:.2f}%')
