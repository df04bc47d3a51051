"""Crash safety of train.py: resume after SIGKILL is exact, loading is safe, bad states stop clearly.

Faults are injected from outside: tests/fault_launcher.py for subprocesses, the inject fixture in-process.
"""
import concurrent.futures
import errno
import glob
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch

from _train_fixtures import (RUN_NAME, VAL_FLAGS, assert_same_tensors, flags, make_dataset, out, run_process,
                             run_script, script_command, started, tensors)
import train
from cli import UserError
import cli
import files
import runs


def temporaries(results):
    return glob.glob(os.path.join(results, '.*.tmp'))


@pytest.mark.slow
@pytest.mark.parametrize('fault, workers, epoch_on_disk, val', [
    # mid-epoch, after a step; epoch 1's files may still be in the background writer. With a validation split: the
    # held-out classes are drawn again from the seed on resume, the same split, the same numbers
    ('kill:2:2', 0, None, True),
    ('kill-write:checkpoint:2', 2, 1, False),         # halfway through writing epoch 2's checkpoint
    ('kill-write:data_base:2', 0, 1, False),          # halfway through epoch 2's database (model already new)
    ('kill-write:checkpoint:1', 0, None, False),      # epoch 1's model and statistics, no checkpoint: starts fresh
])
def test_sigkill_then_resume_matches_uninterrupted(request, tmp_path, fault, workers, epoch_on_disk, val):
    data, ref = (request.getfixturevalue(name) for name in (('val_dataset', 'val_reference') if val else
                                                              ('dataset', 'reference')))
    kill_then_resume(data, ref[0], tmp_path / 'results', fault, workers, epoch_on_disk, VAL_FLAGS if val else ())


def kill_then_resume(dataset, ref, results, fault, workers, epoch_on_disk, extra=()):
    """Kill a run with `fault`, resume it: every output equals the reference run's in `ref`. Resumed in this
    process, or with loader workers in its own, which must also exit promptly."""
    cache = ['--cache', 'off'] if workers else []  # the loader path too
    killed = run_script(flags(dataset, results, *cache, *extra, workers=workers), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if epoch_on_disk is None:  # none yet, or epoch 1's whole
        assert not os.path.exists(out(results, 'checkpoint.pth')) or tensors(out(results, 'checkpoint.pth'))['epoch'] == 1
    else:
        assert tensors(out(results, 'checkpoint.pth'))['epoch'] == epoch_on_disk  # the last one is whole
    if fault.startswith('kill-write'):
        assert temporaries(results)  # the half-written file, never renamed into place
    if 'data_base' in fault:  # the new model was written but not put in place without its database
        state = tensors(out(results, 'checkpoint.pth'))
        assert_same_tensors(tensors(out(results, 'model.pth')), state['model'])

    # resume (same flags + --resume auto); the worker count may differ from the reference's 0: each image's
    # augmentation depends only on (seed, epoch, index)
    resume = flags(dataset, results, '--resume', 'auto', *cache, *extra, workers=workers)
    if workers:
        resumed_with_workers_exits_promptly(resume)
    else:
        train.main(resume)
    for kind in ('statistics.csv', 'settings.json'):
        with open(out(ref, kind), 'rb') as a, open(out(results, kind), 'rb') as b:
            assert a.read() == b.read(), kind
    assert_same_tensors(tensors(out(ref, 'model.pth')), tensors(out(results, 'model.pth')))
    db_ref, db = tensors(out(ref, 'data_base.pth')), tensors(out(results, 'data_base.pth'))
    assert torch.equal(db_ref['test_features'], db['test_features']) and db_ref['config'] == db['config']
    assert temporaries(results) == []


def resumed_with_workers_exits_promptly(args):
    """train.py with loader workers: they end with their epoch, so nothing is left to wait for after the last line
    (no process of its group but itself when that line is read), and it exits 0."""
    with started(script_command(args)) as run:
        _, last = run.wait_for('Best R@1')
        assert run.others_in_group() == []
        result = run.finish()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == last.rstrip('\n')  # the last line


@pytest.mark.slow
def test_sigkill_from_outside_while_writing_then_resume(dataset, reference, tmp_path):
    # killed by another process right after the epoch-1 line is printed, i.e. while the epoch's
    # files are being written or the next epoch starts: wherever it lands, resuming gives the same
    results = tmp_path / 'results'
    with started(script_command(flags(dataset, results))) as run:
        run.wait_for('Epoch 1/')
        run.signal(signal.SIGKILL)
        killed = run.finish()
    assert killed.returncode == -signal.SIGKILL
    train.main(flags(dataset, results, '--resume', 'auto'))
    ref = reference[0]
    with open(out(ref, 'statistics.csv'), 'rb') as a, open(out(results, 'statistics.csv'), 'rb') as b:
        assert a.read() == b.read()
    assert_same_tensors(tensors(out(ref, 'model.pth')), tensors(out(results, 'model.pth')))
    assert temporaries(results) == []


@pytest.mark.slow
def test_ctrl_c_stops_and_keeps_last_checkpoint(dataset, tmp_path, inject, capsys):
    results = tmp_path / 'results'
    inject('interrupt:2:1')
    with pytest.raises(SystemExit) as err:
        cli.run_cli(lambda: train.main(flags(dataset, results)), train.INTERRUPTED)
    assert err.value.code == 130 and 'with --resume auto to continue' in capsys.readouterr().err
    state = tensors(out(results, 'checkpoint.pth'))
    assert state['epoch'] == 1 and len(state['statistics']) == 1 and temporaries(results) == []


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_then_resume_matches_uninterrupted(dataset, reference, tmp_path):
    # a cluster pre-empts the job: SIGTERM to the whole process group, loader workers included, once the epoch-1
    # line is printed. A hang (none expected) fails at the ceiling with the group killed, never leaves it running
    results = tmp_path / 'results'
    with started(script_command(flags(dataset, results, '--cache', 'off', workers=2))) as run:
        run.wait_for('Epoch 1/')
        run.signal(signal.SIGTERM)
        stopped = run.finish()
    stderr = stopped.stderr
    assert stopped.returncode == 143, stderr[-2000:]
    assert stderr.count('interrupted: stopped at once; the last checkpoint is intact') == 1
    assert 'Traceback' not in stderr and 'error' not in stderr
    assert tensors(out(results, 'checkpoint.pth'))['epoch'] >= 1 and temporaries(results) == []
    train.main(flags(dataset, results, '--resume', 'auto'))
    with open(out(reference[0], 'statistics.csv'), 'rb') as a, open(out(results, 'statistics.csv'), 'rb') as b:
        assert a.read() == b.read()
    assert_same_tensors(tensors(out(reference[0], 'model.pth')), tensors(out(results, 'model.pth')))


def test_sigterm_handler_installed_by_run_cli_and_restored(capsys):
    def main():
        assert signal.getsignal(signal.SIGTERM) is not before  # else the SIGTERM below would end pytest itself
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError('not stopped')  # Python runs the handler before the next line

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as err:
        cli.run_cli(main, 'files written so far are intact')
    assert err.value.code == 143
    assert capsys.readouterr().err == 'interrupted: files written so far are intact\n'
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_failed_background_write_stops_at_the_next_step(dataset, tmp_path, inject, monkeypatch):
    # epoch 1's checkpoint cannot be written: the run stops at the first step after the failure is known,
    # not after training epoch 2 without a checkpoint
    results = tmp_path / 'results'
    inject('fail-write:checkpoint:1')
    jobs, steps = [], []
    submit, step = files.BackgroundWriter.submit, train.train_step

    def kept(writer, write):
        submit(writer, write)
        jobs.append(writer.job)

    def counted_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:  # epoch 2's first step (3 per epoch): the writer has failed by its end
            concurrent.futures.wait(jobs[:1])
        return step(*args, **kwargs)

    monkeypatch.setattr(files.BackgroundWriter, 'submit', kept)
    monkeypatch.setattr(train, 'train_step', counted_step)
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results))
    assert f'cannot write {out(results, "checkpoint.pth")}: No space left on device' in str(err.value)
    assert len(steps) == 4  # epoch 2's second step never started
    assert not os.path.exists(out(results, 'checkpoint.pth')) and temporaries(results) == []


def small_checkpoint(config, epoch=1):
    """A checkpoint of the run `config` describes with `epoch` epochs done, as runs.Run.save writes one (state dicts
    left empty: their tensors are checked when loaded)."""
    columns = runs.statistics_columns(config['recalls'], config['val_split'] > 0)
    rows = [dict({column: 50.0 for column in columns}, epoch=k) for k in range(1, epoch + 1)]
    return {'version': runs.VERSION, 'epoch': epoch, 'model': {}, 'optimizer': {}, 'scheduler': {}, 'scaler': {},
            'best_recall': 0.5, 'best_epoch': 1, 'statistics': rows, 'config': runs.run_settings(config)}


def config_of(dataset, results):
    """The configuration train.py resolves for flags(dataset, results): what a checkpoint is checked against."""
    return train.resolve_config(train.parse_args(flags(dataset, results)))[0]


def copy_without_checkpoint(run, copy):
    """A run's folder without its checkpoint (134 MB of weights and optimizer state), for a test that puts a
    checkpoint of its own there, or none."""
    return shutil.copytree(run, copy, ignore=lambda folder, names: [n for n in names if n.endswith('checkpoint.pth')])


@pytest.mark.parametrize('field, value, expected', [
    ('statistics', [1, 2, 3], 'its statistics are not a list of 1 rows'),
    ('statistics', [{'epoch': 1, 'train_loss': 'x'}], 'its statistics row 1 is not epoch 1 with numbers for epoch'),
    ('epoch', 7, 'its epoch 7 is not one of 1..2'),
    ('best_epoch', 2, 'its best_epoch 2 is not one of 1..1'),
    ('best_recall', None, 'its best_recall None is not a fraction'),
    ('optimizer', [], 'its optimizer not state dicts'),
    ('scaler', None, 'its scaler not state dicts'),
])
def test_hand_edited_checkpoint_refused_in_one_line(dataset, tmp_path, field, value, expected):
    config = config_of(dataset, tmp_path)
    state = small_checkpoint(config)  # epoch 2 to run
    runs.check_checkpoint(state, 'c.pth', config)  # as written: accepted
    state[field] = value
    with pytest.raises(UserError) as err:
        runs.check_checkpoint(state, 'c.pth', config)
    assert str(err.value).startswith(f'cannot resume from c.pth: {expected}')
    assert str(err.value).endswith('start over with --overwrite')


def test_hand_edited_checkpoint_refused_before_anything_runs(dataset, reference, tmp_path, capsys):
    # what check_checkpoint refuses (above) stops train.py before it writes or prints anything
    results = copy_without_checkpoint(reference[0], tmp_path / 'copy')
    state = small_checkpoint(config_of(dataset, results))  # epoch 2 to run
    state['statistics'] = [1, 2, 3]
    torch.save(state, out(results, 'checkpoint.pth'))
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--resume', 'auto'))
    assert str(err.value).startswith(f'cannot resume from {out(results, "checkpoint.pth")}: its statistics are not '
                                     f'a list of 1 rows')
    assert str(err.value).endswith('start over with --overwrite')
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before
    assert capsys.readouterr().out == ''  # refused before the configuration is printed


def test_truncated_auto_checkpoint_suggests_overwrite(dataset, reference, tmp_path, capsys):
    results = copy_without_checkpoint(reference[0], tmp_path / 'copy')
    data = files.torch_bytes(small_checkpoint(config_of(dataset, results)))
    with open(out(results, 'checkpoint.pth'), 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--resume', 'auto'))
    assert str(err.value) == (f'cannot read checkpoint {out(results, "checkpoint.pth")}: the file is damaged or '
                              f'truncated; start over with --overwrite (replaces its files)')
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('flag', ['--pretrained', 'download'])
def test_bad_weights_refused_before_results_folder_exists(dataset, tmp_path, monkeypatch, capsys, flag):
    results = tmp_path / 'results'
    if flag == 'download':  # no network and nothing in the hub cache
        monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))

        def offline(url, *args, **kwargs):
            raise OSError(errno.ENETUNREACH, 'Network is unreachable')
        monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
        extra, expected = ['--pretrained', 'imagenet'], 'cannot download the ImageNet weights of resnet18'
    else:
        (tmp_path / 'weights.pth').write_bytes(b'not weights')
        extra, expected = ['--pretrained', str(tmp_path / 'weights.pth')], 'not a PyTorch file'
    with pytest.raises(UserError, match=expected):
        train.main(flags(dataset, results, *extra))
    assert not results.exists() and capsys.readouterr().out == ''


def test_resume_with_other_settings_refused_touches_nothing(dataset, reference, tmp_path, capsys):
    results = copy_without_checkpoint(reference[0], tmp_path / 'copy')
    torch.save(small_checkpoint(config_of(dataset, results), epoch=2), out(results, 'checkpoint.pth'))
    os.remove(results / f'.{RUN_NAME}.lock')
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--resume', 'auto', '--seed', '5', '--lr', '0.01'))
    assert 'it was made with other settings' in str(err.value)
    assert 'seed: checkpoint 0, now 5' in str(err.value) and 'lr: checkpoint 0.001, now 0.01' in str(err.value)
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before  # no lock file either
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('resume', [[], ['--resume', 'auto']])
def test_run_without_checkpoint_not_replaced(dataset, reference, tmp_path, resume):
    # the checkpoint was removed (or never written by a run of other settings): its model, database and
    # statistics are not replaced by a run of other settings, with or without --resume auto
    results = copy_without_checkpoint(reference[0], tmp_path / 'copy')
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--seed', '5', *resume))
    assert f'{out(results, "statistics.csv")}, {out(results, "model.pth")}' in str(err.value)
    assert 'hold a run of this name without a checkpoint' in str(err.value) and '--overwrite' in str(err.value)
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before


@pytest.mark.slow
def test_symlinks_in_results_folder_never_written_through(dataset, tmp_path):
    results, victim = tmp_path / 'results', tmp_path / 'victim.txt'
    results.mkdir()
    victim.write_bytes(b'precious')
    lock = results / f'.{RUN_NAME}.lock'
    lock.symlink_to(victim)
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, epochs=1))
    assert str(err.value).startswith(f'{lock} is a symbolic link')
    assert victim.read_bytes() == b'precious'
    os.remove(lock)
    # outputs planted as links: an existing output refuses the run; --overwrite removes the links themselves
    for kind in runs.OUTPUTS:
        os.symlink(victim, out(results, kind))
    with pytest.raises(UserError, match='holds a run of this name, but it is damaged or unreadable'):
        train.main(flags(dataset, results, epochs=1))
    train.main(flags(dataset, results, '--overwrite', epochs=1))
    assert victim.read_bytes() == b'precious'
    assert not any(os.path.islink(out(results, kind)) for kind in runs.OUTPUTS)
    # an atomic write replaces a link in place of its target
    link = tmp_path / 'link.csv'
    link.symlink_to(victim)
    files.atomic_write({link: b'new'})
    assert not link.is_symlink() and link.read_bytes() == b'new' and victim.read_bytes() == b'precious'


def test_malicious_checkpoint_refused_payload_never_runs(dataset, tmp_path):
    marker = tmp_path / 'payload_ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    results = tmp_path / 'results'
    results.mkdir()
    torch.save({'epoch': 1, 'model': Payload()}, out(results, 'checkpoint.pth'))
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--resume', 'auto'))
    assert 'refusing to load' in str(err.value) and out(results, 'checkpoint.pth') in str(err.value)
    assert 'posix.system' in str(err.value)
    for what in ('data dict', 'database'):
        with pytest.raises(UserError, match='refusing to load'):
            files.safe_load(out(results, 'checkpoint.pth'), what)
    assert not marker.exists()
    # refused before the results folder is touched: not even the run's lock file is created
    assert os.listdir(results) == [os.path.basename(out(results, 'checkpoint.pth'))]


def test_damaged_checkpoint_clear_message(dataset, tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    with open(out(results, 'checkpoint.pth'), 'wb') as f:
        f.write(b'PK\x03\x04 not really a zip')
    with pytest.raises(UserError, match='not a PyTorch file|damaged or truncated'):
        train.main(flags(dataset, results, '--resume', out(results, 'checkpoint.pth')))
    # a text file is damaged input, not code: its first byte ('#') is no pickle opcode
    with open(out(results, 'checkpoint.pth'), 'w') as f:
        f.write('# notes\n')
    with pytest.raises(UserError, match='not a PyTorch file|damaged or truncated'):
        files.safe_load(out(results, 'checkpoint.pth'), 'checkpoint')


def test_altered_checkpoint_contents_clear_message(dataset, reference, tmp_path):
    # the right settings, but a model that is not this network's: refused before anything is written
    results = copy_without_checkpoint(reference[0], tmp_path / 'copy')
    state = small_checkpoint(config_of(dataset, results), epoch=2)
    state['model'] = {'fc.weight': torch.zeros(2, 2)}
    torch.save(state, out(results, 'checkpoint.pth'))
    before = {p: (results / p).read_bytes() for p in os.listdir(results)}
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results, '--resume', 'auto'))
    message = str(err.value)
    assert message.startswith(f'{out(results, "checkpoint.pth")} does not hold weights of this model (')
    assert '1 unexpected: fc.weight' in message and 'missing: backbone.conv1.weight' in message
    assert {p: (results / p).read_bytes() for p in os.listdir(results)} == before


@pytest.mark.slow
def test_nan_loss_stops_best_files_untouched(dataset, reference, tmp_path, inject):
    results = tmp_path / 'results'
    inject('nan:2:1')
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results))
    assert 'the loss became nan at epoch 2, step 1' in str(err.value)
    # on disk: exactly what epoch 1 wrote (the best files are epoch 1's, as in the reference run)
    state = tensors(out(results, 'checkpoint.pth'))
    assert state['epoch'] == 1 and state['best_epoch'] == 1
    assert_same_tensors(tensors(out(results, 'model.pth')), state['model'])
    with open(out(reference[0], 'statistics.csv')) as f:
        first_epoch = ''.join(f.readlines()[:2])
    with open(out(results, 'statistics.csv')) as f:
        assert f.read() == first_epoch
    assert temporaries(results) == []


@pytest.mark.slow
def test_failed_write_clear_message_previous_files_intact(dataset, tmp_path, inject):
    results = tmp_path / 'results'
    inject('fail-write:checkpoint:2')  # the disk fills up at epoch 2's checkpoint
    with pytest.raises(UserError) as err:
        train.main(flags(dataset, results))
    assert f'cannot write {out(results, "checkpoint.pth")}: No space left on device' in str(err.value)
    assert 'previous file, if any, is unchanged' in str(err.value)
    assert tensors(out(results, 'checkpoint.pth'))['epoch'] == 1 and temporaries(results) == []


def _read_only_runner(tmp_path):
    """A command prefix that runs train.py unable to write one folder, or (None, reason).

    CI runs as root, which ignores permission bits: drop to nobody with setpriv when nobody can run
    this Python, else use a read-only bind mount in a private mount namespace (unshare)."""
    if os.geteuid() != 0:
        return [], 'chmod'
    setpriv = shutil.which('setpriv')
    if setpriv:
        probe = run_process([setpriv, '--reuid=nobody', '--regid=nogroup', '--clear-groups', sys.executable,
                             '-c', 'import torch, pandas, thop'], cwd='/')
        if probe.returncode == 0:
            return [setpriv, '--reuid=nobody', '--regid=nogroup', '--clear-groups'], 'nobody'
    unshare = shutil.which('unshare')
    if unshare:
        target = tmp_path / 'probe'
        target.mkdir()
        probe = run_process([unshare, '--mount', 'sh', '-c', f'mount --bind {target} {target} && '
                             f'mount -o remount,bind,ro {target} {target} && touch {target}/x'])
        if probe.returncode != 0 and 'Read-only file system' in probe.stderr:
            return 'unshare', 'read-only mount'
    return None, ('running as root, nobody cannot import this Python and its packages, and a read-only '
                  'bind mount (unshare --mount) is not permitted here')


@pytest.mark.slow
def test_read_only_results_folder(tmp_path):
    prefix, how = _read_only_runner(tmp_path)
    if prefix is None:
        pytest.skip(how)
    # a world-readable folder of its own: nobody cannot enter pytest's private tmp folders
    base = tempfile.mkdtemp(prefix='clf-read-only-')
    try:
        os.chmod(base, 0o755)
        data = make_dataset(os.path.join(base, 'data'))
        results = os.path.join(base, 'results')
        os.mkdir(results)
        previous = os.path.join(results, f'{RUN_NAME}_statistics.csv')
        with open(previous, 'wb') as f:
            f.write(b'epoch\n1\n')
        # even asked to replace that run (--overwrite), nothing is removed before the lock is held
        command = [sys.executable, 'train.py', *flags(data, results, '--overwrite', epochs=1)]
        if how == 'read-only mount':
            command = ['unshare', '--mount', 'sh', '-c', 'mount --bind "$0" "$0" && '
                       'mount -o remount,bind,ro "$0" "$0" && exec "$@"', results, *command]
        elif how == 'nobody':
            command = prefix + command  # results/ belongs to root, mode 755: nobody may not write
        else:
            os.chmod(results, 0o555)
        result = run_process(command)
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.strip().startswith(f'error: cannot write to results folder {results}')
        assert 'Traceback' not in result.stderr
        assert os.listdir(results) == [os.path.basename(previous)]
        with open(previous, 'rb') as f:
            assert f.read() == b'epoch\n1\n'
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize('split, workers, cache', [('train', 1, 'off'), ('test', 0, 'ram')])
def test_image_corrupted_after_preprocessing(tmp_path, split, workers, cache):
    data = make_dataset(tmp_path / 'data')
    dicts = tensors(os.path.join(data, 'tiny', 'uncropped_data_dicts.pth'))
    victim = sorted(dicts[split].values())[1][2]
    with open(victim, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)  # a PNG header, then nothing decodable
    with pytest.raises(UserError) as err:
        train.main(flags(data, tmp_path / 'results', '--cache', cache, epochs=1, workers=workers))
    stop_loader_workers(err.value)
    message = str(err.value)
    assert message.startswith(f'cannot decode image {victim}') and '\n' not in message
    assert 'Traceback' not in message and 'DataLoader worker' not in message


def stop_loader_workers(error):
    """Shut down the loader iterators an error's tracebacks still hold, as test_input does: left to the garbage
    collector (they sit in reference cycles), each one's worker shutdown waits out a 5 s timeout in a later test."""
    while error is not None:
        frame = error.__traceback__
        while frame is not None:
            for value in list(frame.tb_frame.f_locals.values()):
                if isinstance(value, torch.utils.data.dataloader._MultiProcessingDataLoaderIter):
                    value._shutdown_workers()
            frame = frame.tb_next
        error = error.__context__


def test_group_write_all_or_nothing(tmp_path, inject):
    model, database = tmp_path / 'run_model.pth', tmp_path / 'run_data_base.pth'
    model.write_bytes(b'old model')
    database.write_bytes(b'old database')
    inject('fail-write:data_base:1')  # the second file of the pair fails
    with pytest.raises(UserError, match=f'cannot write {database}: No space left on device'):
        files.atomic_write({model: b'new model', database: b'new database'})
    assert model.read_bytes() == b'old model' and database.read_bytes() == b'old database'
    assert sorted(os.listdir(tmp_path)) == ['run_data_base.pth', 'run_model.pth']
    files.atomic_write({model: b'new model', database: b'new database'})
    assert model.read_bytes() == b'new model' and database.read_bytes() == b'new database'
    umask = os.umask(0o027)  # a file gets what a plain open() would give under the umask
    try:
        files.atomic_write({model: b'newer'})
    finally:
        os.umask(umask)
    assert oct(os.stat(model).st_mode & 0o777) == oct(0o640)


def test_bare_pickle_refused_in_one_line(tmp_path, recwarn):
    import pickle
    path = tmp_path / 'raw.pth'
    path.write_bytes(pickle.dumps({'epoch': 1}, protocol=4))
    with pytest.raises(UserError) as err:
        files.safe_load(path, 'checkpoint')
    assert str(err.value) == f'refusing to load {path}: a bare Python pickle, not a torch.save file (nothing was run)'
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # torch never saw it


def test_empty_results_dir_is_a_clear_error(dataset):
    with pytest.raises(UserError, match="--results_dir '': expected a folder"):
        train.main(flags(dataset, ''))
