"""train.py --val_split: class-disjoint validation classes held out of training choose the best epoch."""
import json
import math

import pandas as pd
import pytest
import torch

from _train_fixtures import EPOCHS, VAL_FLAGS, flags, out, tensors
import data_utils
import metrics
import model as model_lib
import train
from cli import UserError
import demo
import distributed
import batches
import imaging
import runs


def figures(row, split):
    """'R@1 50.00% R@2 65.00% | MAP@R 34.72% RP 40.00%': a statistics row's figures of one split, as printed."""
    return (f'R@1 {row[f"{split}_recall@1"]:.2f}% R@2 {row[f"{split}_recall@2"]:.2f}% | MAP@R '
            f'{row[f"{split}_map@r"]:.2f}% RP {row[f"{split}_r_precision"]:.2f}%')


def classes(n):
    return {f'class_{i:02d}': [f'img_{i}_{j}.jpg' for j in range(3)] for i in range(n)}


def test_split_is_class_disjoint_sized_and_drawn_from_the_seed():
    train_dict = classes(12)
    split = train.split_validation(train_dict, 0.25, 0, 'x.pth')
    assert len(split['val']) == 3 and len(split['train']) == 9  # round(0.25 x 12)
    assert not set(split['val']) & set(split['train']) and {**split['train'], **split['val']} == train_dict
    assert list(split['train']) == [c for c in train_dict if c in split['train']]  # the lists keep their order
    # the same seed and classes give the same split, whatever order the dict lists them in
    reordered = dict(reversed(list(train_dict.items())))
    assert set(train.split_validation(reordered, 0.25, 0, 'x.pth')['val']) == set(split['val'])
    drawn = {frozenset(train.split_validation(train_dict, 0.25, seed, 'x.pth')['val']) for seed in range(6)}
    assert len(drawn) > 1  # another seed, other classes
    assert len(train.split_validation(classes(10), 0.25, 0, 'x.pth')['val']) == 3  # 2.5 rounds up


@pytest.mark.parametrize('num_classes, fraction, message', [
    (12, 0.1, '--val_split 0.1 holds out 1 of the 12 training classes of x.pth; validation needs at least 2'),
    (3, 0.5, '--val_split 0.5 holds out 2 of the 3 training classes of x.pth, leaving 1 to train on; at least 2'),
])
def test_split_too_small_is_one_clear_line(num_classes, fraction, message):
    with pytest.raises(UserError) as err:
        train.split_validation(classes(num_classes), fraction, 0, 'x.pth')
    assert str(err.value).startswith(message) and '\n' not in str(err.value)


@pytest.mark.parametrize('extra, message', [
    (['--val_split', '1'], '--val_split must be a fraction of the training classes, 0 <= F < 1, got 1.0'),
    (['--val_split', '-0.1'], '0 <= F < 1, got -0.1'),
    (['--val_split', 'nan'], '0 <= F < 1, got nan'),
    (['--val_split', '0.2'], 'holds out 1 of the 5 training classes'),
    (['--val_split', '0.8'], 'leaving 1 to train on'),
    (['--val_split', '0.4', '--recalls', '1,8'], 'R@8 needs 8 candidates per query, but the validation classes '
                                                 '(--val_split 0.4) offer 7'),
])
def test_bad_val_split_stops_before_anything_is_written(val_dataset, tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        train.main(flags(val_dataset, tmp_path / 'results', *extra))
    assert not (tmp_path / 'results').exists()


def test_config_trains_only_the_remaining_classes(val_dataset, tmp_path):
    config, dicts = train.resolve_config(train.parse_args(flags(val_dataset, tmp_path, *VAL_FLAGS)))
    assert len(dicts['val']) == 2 and len(dicts['train']) == 3 and config['num_classes'] == 3
    assert len(dicts['test']) == 5 and config['eval_splits'] == ('test',)  # the test split is untouched
    images = batches.Images(dicts, dict(config, cache='off'), distributed.Runtime(torch.device('cpu'), amp=False))
    assert list(images.eval) == ['test', 'val'] and len(images.eval['val']) == 8 and len(images.train) == 12
    assert images.targets.max() == 2  # the classifier covers the 3 classes trained on


def test_val_split_run_selects_by_validation_and_saves_the_test_database(val_dataset, val_reference, tmp_path):
    results, stdout = val_reference
    stats = pd.read_csv(out(results, 'statistics.csv'))
    assert list(stats.columns) == ['epoch', 'train_loss', 'train_accuracy', 'test_recall@1', 'test_recall@2',
                                   'test_map@r', 'test_r_precision', 'val_recall@1', 'val_recall@2', 'val_map@r',
                                   'val_r_precision']
    with open(out(results, 'settings.json')) as f:
        settings = json.load(f)
    assert set(settings) == set(runs.RESUME_KEYS) and settings['val_split'] == 0.4 and settings['seed'] == 0

    # chosen by validation R@1, the first maximum; the epoch lines show both splits
    best = int(stats['val_recall@1'].idxmax())
    checkpoint = tensors(out(results, 'checkpoint.pth'))
    assert checkpoint['best_epoch'] == best + 1 and 100 * checkpoint['best_recall'] == stats['val_recall@1'][best]
    for _, row in stats.iterrows():
        assert (f'Epoch {row["epoch"]:.0f}/{EPOCHS} | train loss {row["train_loss"]:.4f} acc '
                f'{row["train_accuracy"]:.2f}% | val {figures(row, "val")} | test {figures(row, "test")} | ') in stdout
    chosen = stats.iloc[best]
    assert (f'Selected epoch {best + 1} by validation R@1 {chosen["val_recall@1"]:.2f}%; test at that epoch: '
            f'{figures(chosen, "test")}; model {out(results, "model.pth")}') in stdout

    # the database holds the test split at that epoch; the model file re-embeds both splits into their figures
    database = tensors(out(results, 'data_base.pth'))
    assert len(database['test_images']) == 20 and database['config']['num_classes'] == 3
    _, dicts = train.resolve_config(train.parse_args(flags(val_dataset, tmp_path, *VAL_FLAGS)))
    model = model_lib.Model('resnet18', 8, 3)
    model.load_state_dict(tensors(out(results, 'model.pth')))
    mean, std = imaging.normalization('tiny')
    for split, images in (('test', database['test_images']), ('val', [p for ps in dicts['val'].values() for p in ps])):
        labels = database['test_labels'] if split == 'test' else [c for c, ps in dicts['val'].items() for _ in ps]
        with torch.no_grad():
            features, _ = model.eval()(torch.stack([imaging.eval_input(p, 32, mean, std) for p in images]))
        figures_now = metrics.evaluate(features, labels, [1, 2])  # each image against the others of its split
        assert math.isclose(100 * figures_now['R@1'], chosen[f'{split}_recall@1'], abs_tol=1e-9), split
        assert math.isclose(100 * figures_now['MAP@R'], chosen[f'{split}_map@r'], rel_tol=1e-5), split
        assert math.isclose(100 * figures_now['R-Precision'], chosen[f'{split}_r_precision'], rel_tol=1e-5), split


@pytest.mark.slow
def test_demo_selects_the_best_validation_epoch_never_a_test_figure(tmp_path, monkeypatch, capsys):
    """A (shrunk) demo run with --val_split 0.25 whose validation R@1 is scripted as 1 - test R@1: the epoch
    saved and reported is validation's best, which is test's worst."""
    monkeypatch.setattr(demo, 'DEMO_CLASSES', 16)
    monkeypatch.setattr(demo, 'DEMO_PER_CLASS', 4)
    data_utils.process_dataset(str(tmp_path / 'data'), 'demo')
    real, test_r1 = train.retrieval_metrics, []

    def scripted(features, labels, ks, device):
        metrics = real(features, labels, ks, device)
        if 'val' not in labels:
            test_r1.append(metrics['R@1'])
            return metrics
        return dict(metrics, **{'R@1': 1.0 - test_r1[-1]})

    monkeypatch.setattr(train, 'retrieval_metrics', scripted)
    results = tmp_path / 'results'
    train.main(['--data_path', str(tmp_path / 'data'), '--data_name', 'demo', '--pretrained', 'none',
                '--image_size', '32', '--batch_size', '8', '--num_epochs', '3', '--feature_dim', '8',
                '--recalls', '1,2', '--device', 'cpu', '--num_workers', '0', '--val_split', '0.25',
                '--results_dir', str(results)])
    stdout = capsys.readouterr().out
    stats = pd.read_csv(results / 'demo_uncropped_resnet18_8_statistics.csv')
    assert stats['test_recall@1'].nunique() > 1  # else test's best and worst epochs would coincide
    selected = int(stats['val_recall@1'].idxmax())
    assert selected == int(stats['test_recall@1'].idxmin()) != int(stats['test_recall@1'].idxmax())
    row = stats.iloc[selected]
    assert (f'Selected epoch {selected + 1} by validation R@1 {row["val_recall@1"]:.2f}%; test at that epoch: '
            f'{figures(row, "test")}; model') in stdout
    assert tensors(results / 'demo_uncropped_resnet18_8_checkpoint.pth')['best_epoch'] == selected + 1
    # the saved database is that epoch's: its test R@1 is the row's
    database = tensors(results / 'demo_uncropped_resnet18_8_data_base.pth')
    again = metrics.evaluate(database['test_features'], database['test_labels'], [1])
    assert 100 * again['R@1'] == row['test_recall@1'] and len(set(database['test_labels'])) == 8
