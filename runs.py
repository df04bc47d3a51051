"""A training run's outputs, and nothing else writes, reads or checks them: their names
({results_dir}/{name}_{statistics.csv, model.pth, data_base.pth, checkpoint.pth, curves.png, settings.json}), the
lock that keeps one run per name, the refusal / --overwrite / --resume rules, the checkpoint, the statistics
columns and lines, the settings and the curves."""
import contextlib
import hashlib
import io
import json
import math
import os
import re

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here, never lazily on the writer's thread
from matplotlib.figure import Figure  # not pyplot: no display, no global backend

import distributed
import files
import retrieval
from cli import UserError
from model import load_state_dict_strict

STAT_COLUMNS = ('epoch', 'train_loss', 'train_accuracy')  # then test_recall@k per k, test_map@r, test_r_precision
# evaluate's figures after R@k, as (key in its dict, CSV column suffix, printed name): the columns {split}_{suffix}
RANKING_METRICS = (('MAP@R', 'map@r', 'MAP@R'), ('R-Precision', 'r_precision', 'RP'))
# flags a resumed run must share with its checkpoint: they change the numbers it produces
RESUME_KEYS = ('data_name', 'crop_type', 'backbone_type', 'feature_dim', 'branches', 'recalls',
               'batch_size', 'num_epochs', 'image_size', 'seed', 'pretrained', 'lr', 'val_split')
VERSION = 1  # of the checkpoint's format; a checkpoint that records none is of version 1
# the checkpoint's field 'sha256': content_sha256 of every other field, written with it, checked on resume (a
# checkpoint written before it was recorded has none and loads unchecked)
OUTPUTS = ('statistics.csv', 'model.pth', 'data_base.pth', 'checkpoint.pth', 'curves.png', 'settings.json')


NAME_KEYS = ('data_name', 'crop_type', 'backbone_type', 'feature_dim')  # a run's name, as the original named it
DATABASE_NAME = re.compile(r'(.+)_(uncropped|cropped)_(.+)_(\d+)_data_base\.pth')
DEFAULT_DATABASE = 'car_uncropped_resnet18_512_data_base.pth'  # of train.py's default flags, as the original's test.py


def run_name(settings):
    """'{data_name}_{crop_type}_{backbone_type}_{feature_dim}': the first part of each output's name."""
    return '_'.join(str(settings[key]) for key in NAME_KEYS)


def selection_column(columns):
    """The statistics column whose first strict maximum is the saved epoch: validation R@1 where the run held
    classes out (--val_split), else test R@1 (the original's protocol), as Run.record chooses."""
    return 'val_recall@1' if any(c.startswith('val_') for c in columns) else 'test_recall@1'


def output_paths(config):
    return {kind: os.path.join(config['results_dir'], f'{config["name"]}_{kind}') for kind in OUTPUTS}


def output_path(path, kind):
    """The path of output `kind` of the run that wrote output `path` (e.g. its settings.json beside its CSV)."""
    stem = next((path[:-len(k)] for k in OUTPUTS if path.endswith('_' + k)), None)
    return None if stem is None else stem + kind


def open_database(name, results_dir, device, **options):
    """retrieval.open_database; a missing database of a run's name says the train.py command that writes it."""
    try:
        return retrieval.open_database(name, results_dir, device, **options)
    except retrieval.NotFound as err:
        parts = DATABASE_NAME.fullmatch(os.path.basename(err.path))
        if parts is None:
            raise
        folder = os.path.dirname(err.path)  # train.py writes into --results_dir, default 'results'
        flags = ' '.join(f'--{k} {v}' for k, v in zip(NAME_KEYS + ('results_dir',), parts.groups() + (folder,))
                         if k != 'results_dir' or folder != 'results')
        raise UserError(f'database not found: {err.path}; train the model first: python train.py {flags} (with your '
                        f'--data_path) writes it, or give --data_base the path of an existing database') from None


def run_settings(config):
    """The flags a run's numbers depend on (RESUME_KEYS), as its checkpoint and database record them."""
    return {key: config[key] for key in RESUME_KEYS}


def claim_results(config, paths, resumed):
    """Hold this results name for the run (an OS lock, released even when the process is killed) and
    refuse to replace another run's outputs unless asked (check_outputs) -> the lock file's descriptor."""
    folder = config['results_dir']
    check_outputs(config, paths, resumed)  # a refusal creates nothing: checked again once the lock is held
    lock_path = os.path.join(folder, f'.{config["name"]}.lock')
    try:
        os.makedirs(folder, exist_ok=True)
        lock = files.hold_lock(lock_path, 'train.py', lambda holder: f'another train.py is running on '
                               f'{os.path.join(folder, config["name"])}_* ({holder}); wait for it or use another '
                               f'--results_dir')
    except OSError as err:
        raise UserError(f'cannot write to results folder {folder}: {err.strerror or err}; nothing written') from None
    try:
        try:
            check_outputs(config, paths, resumed)  # another run may have ended in between
            for path in paths.values():
                if config['overwrite'] and os.path.lexists(path):
                    os.remove(path)  # a link itself, never its target
            files.remove_temporaries(paths.values())  # left by a killed run: the real files are whole
        except OSError as err:
            raise UserError(f'cannot replace the files of {os.path.join(folder, config["name"])}_*: '
                            f'{err.strerror or err}') from None
    except BaseException:
        os.close(lock)
        raise
    return lock


def check_outputs(config, paths, resumed):
    """Refuse to replace any output of this name (a link counts: atomic writes replace links, never
    write through them) unless --overwrite, or --resume continuing it (`resumed`: the checkpoint's
    os.stat when read), or --resume auto starting fresh over what a killed first epoch left."""
    found = [path for path in paths.values() if os.path.lexists(path)]
    checkpoint = paths['checkpoint.pth']
    if not found or config['overwrite'] or config['resume'] not in (None, 'auto'):
        return
    if config['resume'] == 'auto':
        now = os.stat(checkpoint) if os.path.isfile(checkpoint) else None
        if resumed is not None or now is not None:
            if now is None or resumed is None or (now.st_ino, now.st_size, now.st_mtime_ns) != \
                    (resumed.st_ino, resumed.st_size, resumed.st_mtime_ns):
                raise UserError(f'{checkpoint} changed while this run started (another train.py?); run it again')
            return
        if first_epoch_remains(config, paths):
            return
        raise UserError(f'{", ".join(found)} hold a run of this name without a checkpoint (removed, or made with '
                        f'other settings): it cannot be continued; start over with --overwrite (replaces its files)')
    if checkpoint in found:
        done = describe_checkpoint(checkpoint)
        raise UserError(f'{checkpoint} holds a run of this name ({done}); continue it with --resume auto, or start '
                        f'over with --overwrite (replaces its files)' if done else f'{checkpoint} holds a run of this '
                        f'name, but it is damaged or unreadable; start over with --overwrite (replaces its files)')
    raise UserError(f'{", ".join(found)} hold a run of this name without a checkpoint; start over with --overwrite '
                    f'(replaces its files), or choose another --results_dir')


def describe_checkpoint(path):
    """'epoch 3, best R@1 61.20%' of a readable checkpoint, else None."""
    with contextlib.suppress(UserError):
        state = files.safe_load(path, 'checkpoint')
        if isinstance(state, dict) and type(state.get('epoch')) is int and isinstance(state.get('best_recall'), float):
            chosen = 'validation ' if isinstance(state.get('config'), dict) and state['config'].get('val_split') else ''
            return f'epoch {state["epoch"]}, best {chosen}R@1 {100 * state["best_recall"]:.2f}%'
    return None


def first_epoch_remains(config, paths):
    """Whether outputs without a checkpoint can be what this command's first epoch wrote before a kill
    (the checkpoint is written last): at most one statistics row, a database of these settings or none."""
    if os.path.lexists(paths['statistics.csv']):
        try:
            with open(paths['statistics.csv'], 'rb') as f:
                if len(f.read().splitlines()) > 2:  # the header and epoch 1
                    return False
        except OSError:
            return False
    if not os.path.lexists(paths['data_base.pth']):
        return True  # the model is renamed into place before its database
    return retrieval.recorded_settings(paths['data_base.pth']) == run_settings(config)


def read_checkpoint(config, rt, paths):
    """The checkpoint to continue from, checked (check_checkpoint) -> (state, path, its os.stat on rank 0), or
    (None, path, None) to start fresh. Rank 0 reads it and hands it to the others: results/ may be on its disk only."""
    auto = config['resume'] == 'auto'
    path = paths['checkpoint.pth'] if auto else config['resume']
    state, read = None, None
    if rt.main and path and os.path.isfile(path):
        read = os.stat(path)
        try:
            state = files.safe_load(path, 'checkpoint')
        except UserError as err:
            raise UserError(f'{err}; start over with --overwrite (replaces its files)' if auto else str(err)) from None
        check_checkpoint(state, path, config)
    return distributed.broadcast_object(state), path, read


def check_checkpoint(state, path, config):
    """Refuse a checkpoint that cannot continue this run: other settings, or any field of the wrong type or range."""
    if not isinstance(state, dict) or not isinstance(state.get('config'), dict):
        raise UserError(f'{path} is not a train.py checkpoint')
    differ = [f'{key}: checkpoint {state["config"].get(key)!r}, now {config[key]!r}'
              for key in RESUME_KEYS if state['config'].get(key) != config[key]]
    if differ:
        raise UserError(f'cannot resume from {path}: it was made with other settings ({"; ".join(differ)}); '
                        f'use the same flags, or start over with --overwrite')
    problem = checkpoint_problem(state, config)
    if problem:  # the settings matched, so the contents were altered or come from another version of train.py
        raise UserError(f'cannot resume from {path}: {problem} (altered, or written by another version of '
                        f'train.py); start over with --overwrite')


def checkpoint_problem(state, config):
    """What is wrong with a checkpoint's fields (the tensors are checked when loaded), or None."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    missing = [key for key in ('epoch', 'model', 'optimizer', 'scheduler', 'scaler', 'best_recall', 'best_epoch',
                               'statistics') if key not in state]
    if missing:
        return f'it lacks {", ".join(missing)}'
    if state.get('version', VERSION) != VERSION:
        return f'its format version {state["version"]!r} is not {VERSION}'
    epoch, best_epoch, best_recall, rows = (state[key] for key in ('epoch', 'best_epoch', 'best_recall', 'statistics'))
    if type(epoch) is not int or not 1 <= epoch <= config['num_epochs']:
        return f'its epoch {epoch!r} is not one of 1..{config["num_epochs"]}'
    if type(best_epoch) is not int or not 1 <= best_epoch <= epoch:
        return f'its best_epoch {best_epoch!r} is not one of 1..{epoch}'
    if not isinstance(best_recall, float) or not 0 <= best_recall <= 1:
        return f'its best_recall {best_recall!r} is not a fraction'
    if not isinstance(rows, list) or len(rows) != epoch:
        return f'its statistics are not a list of {epoch} rows, one per epoch done'
    columns = statistics_columns(config['recalls'], config['val_split'] > 0)
    for k, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not all(number(row.get(c)) for c in columns) or row['epoch'] != k:
            return f'its statistics row {k} is not epoch {k} with numbers for {", ".join(columns)}'
    wrong = [key for key in ('model', 'optimizer', 'scheduler', 'scaler') if not isinstance(state[key], dict)]
    return f'its {", ".join(wrong)} not state dicts' if wrong else None


def content_sha256(state):
    """SHA-256 of a checkpoint's contents but its 'sha256' field: every tensor's dtype, shape and bytes and every
    other value's repr, in order; the same after torch.save and torch.load (unlike the file's bytes, which hold
    names of torch's choosing)."""
    digest = hashlib.sha256()

    def feed(value):
        if torch.is_tensor(value):
            digest.update(f'tensor {value.dtype} {tuple(value.shape)};'.encode())
            digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
        elif isinstance(value, (dict, list, tuple)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            digest.update(f'{type(value).__name__} {len(value)};'.encode())
            for key, item in items:
                feed(key)
                feed(item)
        else:
            digest.update(f'{type(value).__name__} {value!r};'.encode())
    feed({key: value for key, value in state.items() if key != 'sha256'})
    return digest.hexdigest()


def check_content(state, path):
    """Refuse a checkpoint whose contents differ from the SHA-256 written with them (a flipped bit on disk, an
    edit); one that records none (written before CLF recorded it) passes."""
    if 'sha256' in state and state['sha256'] != content_sha256(state):
        raise UserError(f'cannot resume from {path}: its contents do not match the SHA-256 recorded when it was '
                        f'written (damaged on disk, or altered); start over with --overwrite')


class Run:
    """One training run's outputs and progress, from the checkpoint it continues (if any) to its last write:
    the statistics rows, the best epoch, the lock on its name (rank 0) and the background writer of its files."""

    def __init__(self, config, rt):
        """Read and check the checkpoint to continue from; nothing is written yet."""
        self.config, self.rt, self.paths = config, rt, output_paths(config)
        self.state, self.checkpoint, self.read = read_checkpoint(config, rt, self.paths)
        self.statistics, self.best, self.first_epoch = [], {'recall': -1.0, 'epoch': 0}, 1
        self.lock, self.writer = None, files.BackgroundWriter()

    def resume(self, model, optimizer, scheduler):
        """Load the checkpoint (if any) into the model, optimizer, scheduler and loss scaler."""
        state, path, scaler = self.state, self.checkpoint, self.rt.scaler
        self.state = None  # its tensors are in the model and optimizer now
        if state is None:
            return
        try:
            load_state_dict_strict(model, state['model'], path)
            optimizer.load_state_dict(state['optimizer'])
            scheduler.load_state_dict(state['scheduler'])
            if state['scaler'] and scaler.is_enabled():  # empty when saved without fp16 (CPU, bf16, --no_amp)
                scaler.load_state_dict(state['scaler'])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError):
            raise UserError(f'cannot resume from {path}: its contents do not fit this run (altered, or written by '
                            f'another version of train.py); start over with --overwrite') from None
        check_content(state, path)  # after the fit: a checkpoint of another shape says so first
        self.statistics, self.first_epoch = list(state['statistics']), state['epoch'] + 1
        self.best = {'recall': state['best_recall'], 'epoch': state['best_epoch']}

    def claim(self):
        """Hold the results name (rank 0) and clear what --overwrite replaces; the resume line, if resuming."""
        if not self.rt.main:
            return None
        self.lock = claim_results(self.config, self.paths, self.read)
        if self.first_epoch > 1:
            chosen = 'validation ' if self.config['val_split'] else ''
            return (f'Resuming from {self.checkpoint}: epoch {self.first_epoch - 1} of {self.config["num_epochs"]} '
                    f'done, best {chosen}R@1 {100 * self.best["recall"]:.2f}% (epoch {self.best["epoch"]})')
        return None

    def record(self, epoch, stats, test_metrics, val_metrics=None):
        """An epoch's statistics row from its training stats and evaluate's fractions; the epoch becomes the best
        when its selection R@1 (validation's if held out, else test's, the original's protocol) is strictly higher
        (the first maximum wins) -> the row."""
        recalls = self.config['recalls']
        row = {'epoch': epoch, 'train_loss': stats['loss'], 'train_accuracy': stats['accuracy'],
               **metric_row('test', test_metrics, recalls), **(metric_row('val', val_metrics, recalls)
                                                                  if val_metrics else {})}
        self.statistics.append(row)
        chosen_by = val_metrics or test_metrics
        if chosen_by['R@1'] > self.best['recall']:
            self.best = {'recall': chosen_by['R@1'], 'epoch': epoch}
        return row

    def save(self, epoch, model, optimizer, scheduler, database):
        """Write epoch `epoch`'s files in the background from CPU copies (training goes on changing the originals):
        the model and `database` when the epoch is the best, the statistics, settings and curves, the checkpoint."""
        config, paths, recalls, val = self.config, self.paths, self.config['recalls'], self.config['val_split'] > 0
        best_files = (files.to_cpu(model.state_dict()), database) if self.best['epoch'] == epoch else None
        state = files.to_cpu({'version': VERSION, 'epoch': epoch, 'model': model.state_dict(),
                              'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                              'scaler': self.rt.scaler.state_dict(), 'best_recall': self.best['recall'],
                              'best_epoch': self.best['epoch'], 'statistics': list(self.statistics),
                              'config': run_settings(config)})

        def write():  # best model and database first, checkpoint last: a kill in between repeats this epoch on resume
            if best_files is not None:
                retrieval.save_model_and_database(*best_files, paths['model.pth'], paths['data_base.pth'])
            files.atomic_write({paths['settings.json']: settings_json(config),
                                paths['statistics.csv']: statistics_csv(state['statistics'], recalls, val),
                                paths['curves.png']: plot_curves(state['statistics'], recalls, config['name'])})
            files.atomic_write({paths['checkpoint.pth']: files.torch_bytes(dict(state, sha256=content_sha256(state)))})
        self.writer.submit(write)

    def final_line(self):
        """How the saved epoch was chosen and where the outputs are."""
        if self.first_epoch > self.config['num_epochs']:
            return f'Nothing to do: all {self.config["num_epochs"]} epochs are done.'
        return (f'{selection_text(self.best, self.statistics, self.config)}; model {self.paths["model.pth"]}, '
                f'database {self.paths["data_base.pth"]}, statistics {self.paths["statistics.csv"]}')

    def close(self):
        """Every submitted write on disk, then the name released."""
        try:
            self.writer.close()
        finally:
            if self.lock is not None:
                os.close(self.lock)


def statistics_columns(recalls, val=False):
    """The statistics CSV's columns; val: with the validation columns."""
    return list(STAT_COLUMNS) + metric_columns('test', recalls) + (metric_columns('val', recalls) if val else [])


def statistics_csv(statistics, recalls, val=False):
    """Rows -> CSV bytes (pandas; floats at full precision); val: with the validation columns."""
    return pd.DataFrame(statistics, columns=statistics_columns(recalls, val)).to_csv(index=False).encode()


def settings_json(config):
    """The settings that make a run's numbers (RESUME_KEYS), written beside its statistics: summarize.py pools
    only runs that differ in --seed alone."""
    return (json.dumps(run_settings(config), indent=1, sort_keys=True) + '\n').encode()


def metric_columns(prefix, recalls):
    """The CSV columns of one evaluated split: {prefix}_recall@k per k, {prefix}_map@r, {prefix}_r_precision."""
    return [f'{prefix}_recall@{k}' for k in recalls] + [f'{prefix}_{suffix}' for _, suffix, _ in RANKING_METRICS]


def metric_row(prefix, metrics, recalls):
    """evaluate's fractions -> {column: percent} of metric_columns."""
    keys = [f'R@{k}' for k in recalls] + [key for key, _, _ in RANKING_METRICS]
    return {column: 100.0 * metrics[key] for column, key in zip(metric_columns(prefix, recalls), keys)}


def row_text(row, prefix, recalls):
    """'R@1 62.50% R@2 74.31% | MAP@R 18.20% RP 21.05%': a statistics row's {prefix}_* columns (percent, two
    decimals; RP: R-Precision)."""
    recall_text = ' '.join(f'R@{k} {row[f"{prefix}_recall@{k}"]:.2f}%' for k in recalls)
    ranking_text = ' '.join(f'{name} {row[f"{prefix}_{suffix}"]:.2f}%' for _, suffix, name in RANKING_METRICS)
    return f'{recall_text} | {ranking_text}'


def metrics_text(metrics, recalls):
    """'R@1 62.50% R@2 74.31% | MAP@R 18.20% RP 21.05%' of evaluate's fractions."""
    return row_text(metric_row('', metrics, recalls), '', recalls)


def selection_text(best, statistics, config):
    """How the saved epoch was chosen: 'Best R@1 62.50% at epoch 3' (test R@1, the original's protocol), or by
    validation R@1, with the test figures at that epoch."""
    if not config['val_split']:
        return f'Best R@1 {100 * best["recall"]:.2f}% at epoch {best["epoch"]}'
    row = next(row for row in statistics if row['epoch'] == best['epoch'])
    return (f'Selected epoch {best["epoch"]} by validation R@1 {100 * best["recall"]:.2f}%; test at that epoch: '
            f'{row_text(row, "test", config["recalls"])}')


def plot_curves(statistics, recalls, title):
    """Loss, accuracy, test R@K, MAP@R and R-Precision per epoch (and validation R@1 where the rows hold it)
    -> PNG bytes."""
    epochs = [row['epoch'] for row in statistics]
    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [row['train_loss'] for row in statistics], marker='o')
    axes[1].plot(epochs, [row['train_accuracy'] for row in statistics], marker='o')
    for k in recalls:
        axes[2].plot(epochs, [row[f'test_recall@{k}'] for row in statistics], marker='o', label=f'R@{k}')
    for column, label in (('test_map@r', 'MAP@R'), ('test_r_precision', 'R-Precision'), ('val_recall@1', 'val R@1')):
        if all(column in row for row in statistics):
            axes[2].plot(epochs, [row[column] for row in statistics], marker='s', linestyle='--', label=label)
    # beside the panel, not on it: inside, it covered the R@1 markers and the MAP@R line
    axes[2].legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    panel = 'test and validation retrieval (%)' if 'val_recall@1' in statistics[0] else 'test retrieval (%)'
    for ax, name in zip(axes, ('train loss', 'train accuracy (%)', panel)):
        ax.set(title=name, xlabel='epoch')
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.91, bottom=0.13, top=0.85, wspace=0.2)  # tight_layout is slow
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100, metadata={'Software': None})
    return buffer.getvalue()
