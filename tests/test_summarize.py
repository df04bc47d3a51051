"""summarize.py: several seeds of one setting pooled into mean, standard deviation and a t interval."""
import json
import math
import re
from pathlib import Path

import pytest

import summarize
import train
from cli import UserError
import runs

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {'data_name': 'car', 'crop_type': 'uncropped', 'backbone_type': 'resnet50', 'feature_dim': 512,
            'branches': 'SMG', 'recalls': [1, 2], 'batch_size': 128, 'num_epochs': 3, 'image_size': 224,
            'pretrained': 'imagenet', 'lr': 1e-4, 'val_split': 0.25}
HEADER = 'epoch,train_loss,train_accuracy,test_recall@1,test_recall@2,test_map@r,test_r_precision'


def write_run(folder, seed, rows, header=HEADER, settings=None):
    """folder/seed{seed}/car_uncropped_resnet50_512_{statistics.csv, settings.json} -> the CSV path."""
    run = folder / f'seed{seed}'
    run.mkdir(parents=True, exist_ok=True)
    csv = run / 'car_uncropped_resnet50_512_statistics.csv'
    csv.write_text(header + '\n' + ''.join(','.join(map(str, row)) + '\n' for row in rows))
    (run / 'car_uncropped_resnet50_512_settings.json').write_text(json.dumps(dict(settings or SETTINGS, seed=seed)))
    return str(csv)


def by_hand(values):
    """Mean, sample sd and 95 % half-width from the definitions (t quantile of scipy, n - 1 degrees of freedom)."""
    from scipy.stats import t
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd, t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def table_row(text, metric):
    """The cells of a metric's line of the Markdown table."""
    line = next(line for line in text.splitlines() if line.startswith(f'| {metric} |'))
    return [cell.strip() for cell in line.strip('|').split('|')]


def three_runs(folder):
    """Three seeds with validation columns; each run's epoch of best val R@1 holds test R@1 60, 62, 67."""
    header = HEADER + ',val_recall@1,val_recall@2,val_map@r,val_r_precision'
    return [write_run(folder, seed, [(1, 1.0, 50, r1 - 9, r2 - 9, 10, 11, 30, 40, 5, 6),
                                     (2, 0.9, 60, r1, r2, mapr, mapr + 3, 35, 45, 6, 7),  # first maximum of val R@1
                                     (3, 0.8, 70, r1 + 5, r2 + 5, 20, 21, 35, 46, 6, 7)], header)
            for seed, (r1, r2, mapr) in zip((1, 2, 3), ((60, 70, 12), (62, 75, 13), (67, 77, 17)))]


def test_three_seeds_by_hand(tmp_path, capsys):
    paths = three_runs(tmp_path)
    text = summarize.main(paths)
    # 60, 62, 67: mean 63, sd sqrt(13) = 3.6056, t(0.975, 2) = 4.3027, half-width 4.3027 * 3.6056 / sqrt(3) = 8.957
    mean, sd, half = by_hand([60, 62, 67])
    assert (round(mean, 4), round(sd, 4), round(half, 3)) == (63, 3.6056, 8.957)
    assert table_row(text, 'test R@1') == ['test R@1', '63.00', '3.61', '± 8.96 (54.04 to 71.96)', '3', '90.2',
                                           '-27.20']  # car uncropped resnet50 512: the original's 90.2
    mean, sd, half = by_hand([70, 75, 77])
    assert table_row(text, 'test R@2')[1:5] == [f'{mean:.2f}', f'{sd:.2f}',
                                                f'± {half:.2f} ({mean - half:.2f} to {mean + half:.2f})', '3']
    assert table_row(text, 'test R@2')[5:] == ['94.5', f'{mean - 94.5:+.2f}']
    mean, sd, half = by_hand([12, 13, 17])
    assert table_row(text, 'test MAP@R') == ['test MAP@R', f'{mean:.2f}', f'{sd:.2f}',
                                             f'± {half:.2f} ({mean - half:.2f} to {mean + half:.2f})', '3', '', '']
    mean, sd, half = by_hand([15, 16, 20])
    assert table_row(text, 'test R-Precision')[1:3] == [f'{mean:.2f}', f'{sd:.2f}']
    assert table_row(text, 'val R@1')[1:3] == ['35.00', '0.00'] and table_row(text, 'val R-Precision')[1] == '7.00'
    out = capsys.readouterr().out
    assert out.count('(best val R@1)') == 3 and 'seed 2: epoch 2 (best val R@1)' in out


def test_epoch_choice_and_the_original_protocol(tmp_path):
    paths = three_runs(tmp_path)
    assert table_row(summarize.main(paths + ['--epoch', 'last']), 'test R@1')[1] == f'{(65 + 67 + 72) / 3:.2f}'
    assert table_row(summarize.main(paths + ['--epoch', '1']), 'test R@1')[1] == f'{(51 + 53 + 58) / 3:.2f}'
    with pytest.raises(UserError, match=r'has no epoch 9 \(epochs 1 to 3\)'):
        summarize.main(paths + ['--epoch', '9'])
    # without validation columns the original's choice: best test R@1, the first maximum
    plain = [write_run(tmp_path / 'plain', seed, [(1, 1, 1, 50, 60, 5, 6), (2, 1, 1, v, 70, 6, 7),
                                                  (3, 1, 1, v, 71, 7, 8)])  # test R@1 ties: epoch 2 wins
             for seed, v in ((1, 55), (2, 58))]
    text = summarize.main(plain)
    assert table_row(text, 'test R@2')[1] == '70.00' and table_row(text, 'test MAP@R')[1] == '6.00'
    assert not any(line.startswith('| val ') for line in text.splitlines())


def test_one_run_says_the_interval_needs_two(tmp_path):
    text = summarize.main(three_runs(tmp_path)[:1])
    assert table_row(text, 'test R@1')[1:5] == ['60.00', '-', 'needs two runs', '1']


def test_no_published_column_for_a_setting_the_original_did_not_report(tmp_path):
    settings = dict(SETTINGS, data_name='demo', num_epochs=1)  # finished runs of one epoch
    paths = [write_run(tmp_path, seed, [(1, 1, 1, 50, 60, 5, 6)], settings=settings) for seed in (1, 2)]
    text = summarize.main(paths)
    assert text.splitlines()[0] == '| metric | mean | sd | 95 % CI | n |'


def test_refusals_are_one_line_naming_the_file(tmp_path):
    paths = three_runs(tmp_path)
    other = write_run(tmp_path / 'other', 4, [(1, 1, 1, 50, 60, 5, 6)], settings=dict(SETTINGS, lr=1e-3))
    with pytest.raises(UserError, match=r'settings differ other than in --seed \(lr 0.0001 vs 0.001\)'):
        summarize.main([paths[0], other])
    same_seed = write_run(tmp_path / 'again', 1, [(1, 1, 1, 50, 60, 5, 6)])
    with pytest.raises(UserError, match='are both seed 1: not independent runs'):
        summarize.main([paths[0], same_seed])
    Path(same_seed).with_name('car_uncropped_resnet50_512_settings.json').unlink()
    with pytest.raises(UserError, match='settings file not found: .*again/seed1/car_uncropped_resnet50_512_settings'):
        summarize.main([same_seed])
    cases = {'empty': ('', 'is empty'), 'binary': ('\x00\xff\xfe garbage "', 'is not a CSV|lacks the column'),
             'columns': ('epoch,loss\n1,2\n', r'lacks the column\(s\) test_map@r'),
             'no rows': (HEADER + '\n', 'holds no epoch'), 'text': (HEADER + '\n1,a,b,c,d,e,f\n', 'non-numeric')}
    for name, (content, message) in cases.items():
        bad = write_run(tmp_path / name.replace(' ', '_'), 7, [])
        Path(bad).write_text(content)
        with pytest.raises(UserError, match=message) as err:
            summarize.main([bad])
        assert bad in str(err.value) and '\n' not in str(err.value), name
    with pytest.raises(UserError, match=r'expected a \.\.\._statistics\.csv'):
        summarize.main([str(tmp_path / 'results.csv')])


def test_train_writes_the_settings_summarize_reads(val_reference):
    results = val_reference[0]
    csv = str(results / 'tiny_uncropped_resnet18_8_statistics.csv')
    settings = summarize.read_settings(csv)
    assert set(settings) == set(runs.RESUME_KEYS) and settings['val_split'] == 0.4
    text = summarize.main([csv])
    assert table_row(text, 'val R@1')[2:4] == ['-', 'needs two runs']


def test_published_figures_are_the_readme_tables():
    """PUBLISHED is README's 'Retrieval results published by the original', cell for cell."""
    readme = (REPO / 'README.md').read_text()
    section = readme.split('### Retrieval results published by the original')[1].split('\n### ')[0]
    names = {'CARS196': 'car', 'CUB200': 'cub', 'SOP': 'sop', 'In-shop': 'isc'}
    parsed = {}
    for block in section.split('#### ')[1:]:
        name = names[block.split()[0].rstrip(',')]
        lines = [line for line in block.splitlines() if line.startswith('| ')]
        ks = tuple(int(cell.strip()[2:]) for cell in lines[0].strip('|').split('|')[1:])
        assert ks == summarize.PUBLISHED_RECALLS[name]
        for line in lines[2:]:
            cells = [cell.strip() for cell in re.split(r'(?<!\\)\|', line.strip())[1:-1]]
            crops = [[float(v.strip(' %')) for v in cell.split('\\|')] for cell in cells[1:]]
            for c, crop in enumerate(('uncropped', 'cropped')[:len(crops[0])]):
                parsed[(name, crop, cells[0].lower(), 512)] = tuple(values[c] for values in crops)
    assert len(parsed) == 18 and parsed == summarize.PUBLISHED
