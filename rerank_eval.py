"""A saved database evaluated with and without post-processing (rerank.py): each split's figures in train.py's
epoch-line format, the change with a 95 % interval from a paired bootstrap over classes (test.py --evaluate), and
--tune's choice of a method's parameters on the validation split, saved as {database stem}_rerank.json (this module
writes, reads and checks that file: one choice per method, `none` where no setting beat the plain ranking)."""
import json
import os

import numpy as np
import torch

import files
import metrics
import rerank
import runs
from cli import UserError

BOOTSTRAP_SAMPLES = 1000
VERSION = 2  # of {stem}_rerank.json; version 1 held one method's choice: {'method', 'params', ...}


# ---- the saved choice ----

def tuned_path(db_path):
    """Where --tune keeps its choices: {database stem}_rerank.json beside the database."""
    return os.path.splitext(db_path)[0] + '_rerank.json'


def read_choices(db_path):
    """{method tuned: {'method': it or 'none', 'params': {...}, ...}} saved beside the database ({} where none)."""
    path = tuned_path(db_path)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        choices = saved['choices'] if saved.get('version') == VERSION else {saved['method']: dict(saved)}
        return {tuned: dict(choice, params=rerank.parse_args(
            choice['method'], ','.join(f'{k}={v}' for k, v in choice['params'].items())))
            for tuned, choice in choices.items() if tuned in rerank.METHODS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as err:
        raise UserError(f'{path} is not a usable choice of --tune ({err}); delete it or run --tune again') from None


def write_choice(db_path, method, chosen, params, figures):
    """Save --tune's choice for `method` (chosen: it, or 'none') beside the database, keeping other methods'."""
    choices = read_choices(db_path)
    choices[method] = {'method': chosen, 'params': params, 'chosen_by': 'validation MAP@R', 'validation': figures}
    files.atomic_write({tuned_path(db_path): (json.dumps({'version': VERSION, 'choices': choices}, indent=1)
                                              + '\n').encode()})


def resolve(method, text, db_path):
    """(method, parameters) a run uses: --rerank_args when given, else the database's --tune choice for the method
    (which may be `none`: no setting beat the plain ranking on validation), else the defaults."""
    choice = read_choices(db_path).get(method) if text is None and method != 'none' else None
    if choice is None:
        return method, rerank.parse_args(method, text)
    if choice['method'] == 'none':
        print(f'--rerank {method}: --tune found no setting better than the plain ranking on validation '
              f'({tuned_path(db_path)}): using none', flush=True)
    return choice['method'], choice['params']


def for_database(method, text, database, index=None):
    """The Reranker test.py and serve.py search through: a retrieval.Database's searched split prepared once with
    --rerank_args, else its --tune choice, else the defaults. `index` (--index): its search is not post-processed."""
    if index and method != 'none':
        raise UserError(f'--rerank {method} post-processes exact search, whose neighbour lists it reads: leave '
                        f'--index out, or --rerank')
    return rerank.Reranker(*resolve(method, text, database.path), database.searched, database.labels)


# ---- evaluation ----

def split_data(db, split):
    """(queries, query labels, gallery or None, gallery labels or None) of a database split: 'val' or 'test'."""
    if split == 'test' and 'gallery_features' in db:
        return db['test_features'].float(), db['test_labels'], db['gallery_features'].float(), db['gallery_labels']
    return db[f'{split}_features'].float(), db[f'{split}_labels'], None, None


def bootstrap(before, after, query_labels, samples=BOOTSTRAP_SAMPLES, seed=0):
    """The change of R@1 and MAP@R (fractions) with 95 % intervals from a paired bootstrap over classes: classes are
    drawn with replacement, each bringing all its queries -> {'R@1': (change, low, high), 'MAP@R': ...}."""
    ids, _ = metrics.label_ids(query_labels, query_labels)
    num_classes = int(ids.max()) + 1
    found = before.r > 0
    r1 = [((s.r > 0) & (s.first_hit < 1)).double() for s in (before, after)]
    ap = [torch.where(found, s.precision_sum / s.r.clamp(min=1), 0) for s in (before, after)]
    per_class = {name: (torch.zeros(num_classes, dtype=torch.float64).index_add_(0, ids, new - old),
                        torch.zeros(num_classes, dtype=torch.float64).index_add_(0, ids, weight))
                 for name, (old, new), weight in (('R@1', r1, torch.ones(len(ids), dtype=torch.float64)),
                                                  ('MAP@R', ap, found.double()))}
    draws = torch.randint(num_classes, (samples, num_classes), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(samples, num_classes, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(samples, num_classes, dtype=torch.float64))
    result = {}
    for name, (change, weight) in per_class.items():
        drawn = (counts @ change) / (counts @ weight).clamp(min=1)
        low, high = np.percentile(drawn.numpy(), [2.5, 97.5])
        result[name] = (float(change.sum() / weight.sum().clamp(min=1)), float(low), float(high))
    return result


def change_text(change):
    return ' | '.join(f'{name} {100 * c:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]'
                      for name, (c, lo, hi) in change.items())


def evaluate_split(db, split, method, params, ks):
    """Print a split's figures in train.py's epoch-line format; with a method: plain, post-processed and the
    change -> (plain metrics, post-processed metrics, change or None)."""
    queries, labels, gallery, gallery_labels = split_data(db, split)
    plain = metrics.rank_stats(queries, labels, gallery, gallery_labels)
    figures = metrics.summary(plain, ks)
    if method == 'none':
        print(f'{split} {runs.metrics_text(figures, ks)}', flush=True)
        return figures, figures, None
    after = rerank.post_stats(method, params, queries, labels, gallery, gallery_labels, plain)
    new = metrics.summary(after, ks)
    change = bootstrap(plain, after, labels)
    print(f'{split} plain {runs.metrics_text(figures, ks)}\n'
          f'{split} {method} {rerank.params_text(params)} {runs.metrics_text(new, ks)}\n'
          f'{split} change (95 % interval, bootstrap over classes) {change_text(change)}', flush=True)
    return figures, new, change


def evaluate(db, method, params, ks):
    """--evaluate: every split the database holds, validation first."""
    return {split: evaluate_split(db, split, method, params, ks) for split in ('val', 'test')
            if f'{split}_features' in db}


def tune(db, db_path, method, ks):
    """--tune: the grid's best parameters by validation MAP@R (test labels never read), or none where no setting
    beats the plain ranking; saved beside the database, then the test split evaluated once with the choice."""
    if method == 'none':
        raise UserError('--tune chooses the parameters of a method: give --rerank aqe or --rerank kreciprocal')
    if 'val_features' not in db:
        raise UserError(f'{db_path} holds no validation features: train with --val_split (e.g. 0.25) to tune on '
                        f'held-out classes')
    queries, labels = db['val_features'].float(), db['val_labels']
    spec, grid = rerank.METHODS[method].params, rerank.METHODS[method].grid
    names = list(grid)
    combos = [dict(zip(names, values)) for values in np.array(np.meshgrid(*grid.values(), indexing='ij'),
                                                              dtype=object).reshape(len(names), -1).T]
    longest = max(max(grid.get(n, [spec[n].default])) for n in spec if n in ('k', 'k1', 'k2', 'depth'))
    lists = rerank.neighbour_lists(queries, None, longest)
    plain, cache = metrics.rank_stats(queries, labels), {}
    best = 'none', {}, metrics.summary(plain, ks)  # a setting must beat the plain ranking to be chosen
    for combo in combos:
        params = {name: spec[name].kind(combo.get(name, spec[name].default)) for name in spec}
        stats = rerank.post_stats(method, params, queries, labels, plain=plain, lists=lists, cache=cache)
        figures = metrics.summary(stats, ks)
        if figures['MAP@R'] > best[2]['MAP@R']:
            best = method, params, figures
    chosen, params, _ = best
    tried = f'--tune {method}: tried {len(combos)} settings ({"; ".join(f"{n} in {list(v)}" for n, v in grid.items())})'
    print(f'{tried} on the {len(queries)} validation images; ' + (
        f'best by MAP@R: {rerank.params_text(params)}' if chosen != 'none' else
        f'none beats the plain ranking by MAP@R ({100 * best[2]["MAP@R"]:.2f}%): choosing none (no post-processing)'),
        flush=True)
    val = evaluate_split(db, 'val', chosen, params, ks)
    write_choice(db_path, method, chosen, params, {k: 100 * v for k, v in val[1].items()})
    print(f'saved to {tuned_path(db_path)}', flush=True)
    return chosen, params, val, evaluate_split(db, 'test', chosen, params, ks)
