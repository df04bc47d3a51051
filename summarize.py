"""Pool several train.py runs that differ only in --seed into one Markdown table: each metric's mean,
standard deviation and 95 % confidence interval at each run's selected epoch, beside the original's
published figure where the runs' setting is one of its table rows.

    python summarize.py results/seed*/cub_uncropped_resnet50_512_statistics.csv [--epoch last|N]"""
import argparse
import io
import json
import math
import os

import pandas as pd

import files
import runs
from cli import UserError, run_cli

# The original's published test figures (percent), laid out as its tables: per (data_name, backbone_type), R@k for
# k in PUBLISHED_RECALLS of the uncropped images, then of the cropped ones where it trained on those
PUBLISHED_RECALLS = {'car': (1, 2, 4, 8), 'cub': (1, 2, 4, 8), 'sop': (1, 10, 100, 1000),
                     'isc': (1, 10, 20, 30, 40, 50)}
PUBLISHED_TABLES = {
    ('car', 'resnet18'): ((84.3, 90.4, 94.3, 96.7), (91.2, 94.9, 97.1, 98.4)),
    ('car', 'resnet50'): ((90.2, 94.5, 96.9, 98.3), (94.2, 96.8, 98.1, 99.0)),
    ('car', 'seresnet50'): ((90.2, 94.3, 96.8, 98.4), (94.2, 96.8, 98.1, 98.9)),
    ('cub', 'resnet18'): ((61.9, 72.9, 82.1, 89.2), (68.3, 78.5, 86.3, 92.2)),
    ('cub', 'resnet50'): ((69.1, 79.6, 87.1, 92.1), (76.0, 84.0, 90.3, 94.3)),
    ('cub', 'seresnet50'): ((70.9, 79.9, 87.0, 92.4), (79.8, 87.1, 91.6, 95.0)),
    ('sop', 'resnet18'): ((70.6, 84.1, 92.1, 96.9),),
    ('sop', 'resnet50'): ((77.7, 88.5, 94.0, 97.3),),
    ('sop', 'seresnet50'): ((79.7, 89.9, 95.1, 98.1),),
    ('isc', 'resnet18'): ((76.6, 92.1, 94.4, 95.4, 96.0, 96.3),),
    ('isc', 'resnet50'): ((83.7, 94.8, 96.3, 96.9, 97.4, 97.6),),
    ('isc', 'seresnet50'): ((80.8, 93.5, 95.2, 96.1, 96.7, 97.1),),
}
SETTING = ('data_name', 'crop_type', 'backbone_type', 'feature_dim')  # the settings a published row is of
PUBLISHED = {(data, crop, backbone, 512): figures for (data, backbone), crops in PUBLISHED_TABLES.items()
             for crop, figures in zip(('uncropped', 'cropped'), crops)}  # {SETTING values: figures}
METRIC_NAMES = {suffix: name for name, suffix, _ in runs.RANKING_METRICS}  # map@r -> MAP@R; recall@k reads R@k
NOT_STATISTICS = 'expected a statistics CSV written by train.py'
CONFIDENCE = 0.95
RANGE = (0.0, 100.0)  # every metric column is a percentage; intervals are clipped to it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Mean, standard deviation and 95 % confidence interval of '
                                                 'several seeds of one train.py setting')
    parser.add_argument('statistics', nargs='+', help='..._statistics.csv files written by train.py, one per run')
    parser.add_argument('--epoch', default='selected',
                        help="the epoch taken from each run: 'selected' (best validation R@1 when the runs have a "
                             "validation split, else best test R@1, first maximum), 'last', or a number "
                             '[default: %(default)s]')
    parser.add_argument('--allow_partial', action='store_true',
                        help='pool runs that stopped before the epoch count their settings declare (each listed '
                             'with the epochs it reached); without it they are refused')
    return parser.parse_args(argv)


def read_settings(csv_path):
    """The settings train.py wrote beside a statistics CSV (runs.settings_json) -> dict."""
    if not csv_path.endswith('_statistics.csv'):
        raise UserError(f'{csv_path}: expected a ..._statistics.csv written by train.py')
    path = runs.output_path(csv_path, 'settings.json')
    if not os.path.isfile(path):
        raise UserError(f'settings file not found: {path} (train.py writes it beside {os.path.basename(csv_path)}; '
                        f'without it the runs cannot be checked to differ only in --seed)')
    try:
        settings = json.loads(files.read_bytes(path, 'settings file'))
    except (UnicodeDecodeError, ValueError):
        settings = None
    if not isinstance(settings, dict) or 'seed' not in settings:
        raise UserError(f'{path} is not a train.py settings file (expected a JSON object with the run\'s settings)')
    return settings


def read_statistics(path):
    """A statistics CSV -> pandas DataFrame with an epoch column and numeric test_* (and val_*) columns."""
    data = files.read_bytes(path, 'statistics file')  # missing, a folder or unreadable: named
    try:
        table = pd.read_csv(io.BytesIO(data))
    except pd.errors.EmptyDataError:
        raise UserError(f'{path} is empty: {NOT_STATISTICS}') from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError):
        raise UserError(f'{path} is not a CSV: {NOT_STATISTICS}') from None
    missing = [c for c in ('epoch', 'test_map@r') if c not in table.columns]
    if missing or not any(c.startswith('test_recall@') for c in table.columns):
        raise UserError(f'{path} lacks the column(s) {", ".join(missing or ["test_recall@k"])}: {NOT_STATISTICS}')
    figures = table[['epoch'] + metric_columns(table.columns)]
    if table.empty or not all(map(pd.api.types.is_numeric_dtype, figures.dtypes)) or figures.isna().any().any():
        raise UserError(f'{path} holds no epoch or non-numeric figures: {NOT_STATISTICS}')
    return table


def check_rows(table, path, settings):
    """Refuse figures no finished or unfinished train.py run writes: infinite values, a metric outside 0..100 %,
    epochs that are not whole numbers 1..num_epochs of the settings, or an epoch twice."""
    declared = settings.get('num_epochs')
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise UserError(f'the settings beside {path} record no epoch count (num_epochs {declared!r}): {NOT_STATISTICS}')
    numeric = table.select_dtypes('number')
    infinite = [c for c in numeric.columns if numeric[c].isin([math.inf, -math.inf]).any()]
    if infinite:
        raise UserError(f'{path} holds infinite figures (column {", ".join(infinite)}): {NOT_STATISTICS}')
    outside = [c for c in metric_columns(table.columns) if not table[c].between(*RANGE).all()]
    if outside:
        raise UserError(f'{path} holds figures outside 0 to 100 % (column {", ".join(outside)}): {NOT_STATISTICS}')
    epochs = table['epoch']
    wrong = [e for e in epochs if e != int(e) or not 1 <= e <= declared]
    if wrong:
        raise UserError(f'{path} holds epoch {wrong[0]:g}, not one of the 1 to {declared} its settings declare: '
                        f'{NOT_STATISTICS}')
    if epochs.duplicated().any():
        raise UserError(f'{path} holds epoch {int(epochs[epochs.duplicated()].iloc[0])} twice: {NOT_STATISTICS}')


def check_finished(pooled, allow_partial):
    """Refuse runs that stopped before their settings' num_epochs, unless allow_partial -> {path: 'k of N epochs'}
    of the runs that did."""
    partial = {path: f'{len(table)} of {settings["num_epochs"]} epochs' for path, settings, table in pooled
               if len(table) < settings['num_epochs']}
    if partial and not allow_partial:
        path, reached = next(iter(partial.items()))
        raise UserError(f'{path} holds {reached} its settings declare: an unfinished run (stopped, or still '
                        f'training); finish it with train.py --resume auto, or pass --allow_partial to pool it as '
                        f'it is')
    return partial


def seed_number(seed, path):
    """A run's seed as a number ("1" and 1 are one seed)."""
    if isinstance(seed, str) and seed.strip().lstrip('+-').isdigit():
        return int(seed)
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f'the settings beside {path} record seed {seed!r}, not a whole number')
    return seed


def metric_columns(columns):
    """A statistics CSV's figures, {split}_{metric} (runs.metric_columns): test_recall@k..., test_map@r..., val_*."""
    return [c for split in ('test', 'val') for c in columns if c.startswith(f'{split}_')]


def metric_name(column):
    """'test_recall@1' -> 'test R@1', 'val_map@r' -> 'val MAP@R'."""
    split, metric = column.split('_', 1)
    return f'{split} {METRIC_NAMES.get(metric, metric.replace("recall@", "R@"))}'


def select_row(table, path, epoch):
    """The row of the chosen epoch -> (row, why): by validation R@1 when the run has it, else by test R@1
    (strictly better, the first maximum wins, as train.py chose), the last one, or epoch N."""
    if epoch == 'selected':
        column = runs.selection_column(table.columns)
        if column not in table.columns:
            raise UserError(f'{path} has no {column} column to select the epoch by (--recalls without 1); pass '
                            f'--epoch last or an epoch number')
        return table.loc[table[column].idxmax()], f'best {metric_name(column)}'  # idxmax: the first maximum
    if epoch == 'last':
        return table.iloc[-1], 'last'
    rows = table[table['epoch'] == int(epoch)]
    if rows.empty:
        raise UserError(f'{path} has no epoch {epoch} (epochs {int(table["epoch"].min())} to '
                        f'{int(table["epoch"].max())})')
    return rows.iloc[0], f'epoch {epoch}'


def check_poolable(pooled):
    """Runs pool only when they are independent (different seeds) and alike in every setting but the seed."""
    (first, first_settings, first_table), seeds = pooled[0], {}
    for path, settings, table in pooled:
        seed = seed_number(settings['seed'], path)
        if seed in seeds:
            raise UserError(f'{seeds[seed]} and {path} are both seed {seed}: not independent runs; pool runs of '
                            f'different --seed')
        seeds[seed] = path
        differ = [f'{key} {first_settings.get(key)!r} vs {settings.get(key)!r}'
                  for key in sorted(set(first_settings) | set(settings))
                  if key != 'seed' and first_settings.get(key) != settings.get(key)]
        if differ:
            raise UserError(f'cannot pool {first} and {path}: their settings differ other than in --seed '
                            f'({"; ".join(differ)})')
        if metric_columns(table.columns) != metric_columns(first_table.columns):
            raise UserError(f'cannot pool {first} and {path}: their statistics have other columns')


def interval(values):
    """(mean, sample standard deviation, half-width of the 95 % Student-t interval), the last two None for n = 1."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    from scipy.stats import t
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd, float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)


def table_text(columns, rows, setting, chosen='best test R@1', partial=()):
    """The Markdown table: a line per metric, beside the original's published figure where it reported `setting`
    (marked when the runs' epochs were `chosen` otherwise than the original's, by test R@1), then its notes."""
    published = {f'test_recall@{k}': v
                 for k, v in zip(PUBLISHED_RECALLS.get(setting[0], ()), PUBLISHED.get(setting, ()))}  # {column: %}
    unlike = published and chosen != 'best test R@1'  # the original chose its epoch on the test set
    original = ['original (its epoch chosen on test)' if unlike else 'original', 'difference']
    head = ['metric', 'mean', 'sd', '95 % CI', 'n'] + (original if published else [])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for column in columns:
        values = [float(row[column]) for row in rows]
        mean, sd, half = interval(values)
        low, high = (None, None) if sd is None else (max(RANGE[0], mean - half), min(RANGE[1], mean + half))
        spread = ['-', 'needs two runs'] if sd is None else [f'{sd:.2f}', f'± {half:.2f} ({low:.2f} to {high:.2f})']
        cells = [metric_name(column), f'{mean:.2f}', *spread, str(len(values))]
        if published:
            figure = published.get(column)
            cells += ['', ''] if figure is None else [f'{figure:.1f}', f'{mean - figure:+.2f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    notes = [f'95 % CI: mean ± t({0.5 + CONFIDENCE / 2}, n - 1) x sd / sqrt(n) (Student), clipped to the metrics\' '
             f'range, 0 to 100 %']
    if published:
        notes.append(f'original: the published figure of {" ".join(map(str, setting))} (its README); difference: '
                     f'mean - original, in points')
    if unlike:
        notes.append(f'not like for like: the original chose its epoch by test R@1 (selected on the test set, '
                     f'optimistic); these runs\' epoch: {chosen}')
    if partial:
        notes.append(f'unfinished runs pooled (--allow_partial): {"; ".join(partial)}')
    return '\n'.join(lines + [''] + notes)


def main(argv=None):
    args = parse_args(argv)
    if args.epoch not in ('selected', 'last') and not args.epoch.isdigit():
        raise UserError(f"--epoch {args.epoch}: expected 'selected', 'last' or an epoch number")
    pooled = [(path, read_settings(path), read_statistics(path)) for path in args.statistics]
    for path, settings, table in pooled:
        check_rows(table, path, settings)
    check_poolable(pooled)
    partial = check_finished(pooled, args.allow_partial)
    chosen = [select_row(table, path, args.epoch) for path, _, table in pooled]
    settings = pooled[0][1]
    setting = tuple(settings.get(k) for k in SETTING)
    val = f', val_split {settings["val_split"]}' if settings.get('val_split') else ''
    print(f'{len(pooled)} run(s) of {" ".join(map(str, setting))}{val}:')
    for (path, run, _), (row, why) in zip(pooled, chosen):
        reached = f' (partial: {partial[path]} reached)' if path in partial else ''
        print(f'  seed {run["seed"]}: epoch {int(row["epoch"])} ({why}) of {path}{reached}')
    print()
    text = table_text(metric_columns(pooled[0][2].columns), [row for row, _ in chosen], setting, chosen[0][1],
                      [f'seed {run["seed"]} reached {partial[path]}' for path, run, _ in pooled if path in partial])
    print(text)
    return text


if __name__ == '__main__':
    run_cli(main)
