"""Signals only recorded by their handler and acted on at a safe point (cli.safe_points / stop_point): a SIGTERM
sent at any moment of training (before, while and after a loader forks its workers, during evaluation, during a
background write) stops the run with one line and exit status 143, leaving no process behind; the same for Ctrl-C."""
import os
import signal
import sys

import pytest

import cli
import files
import runs
from _train_fixtures import REPO, flags, out, python_env, run_process, started

# train.py in a child that sends itself a signal at one moment of the run, from inside the code running then
LAUNCHER = '''
import functools, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import batches, cli, files, train
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
moment, signum, sent = sys.argv[2], getattr(signal, sys.argv[3]), []

def send():
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signum)

def before(function, when=lambda *a, **k: True):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            send()
        return function(*args, **kwargs)
    return wrapper

if moment == 'fork':  # inside os.fork's hooks, where Python drops an exception raised by a handler
    os.register_at_fork(before=send)
elif moment == 'before_workers':
    batches.Images.train_batches = before(batches.Images.train_batches)
elif moment == 'after_workers':
    train.train_step = before(train.train_step)
elif moment == 'evaluation':
    train.retrieval_metrics = before(train.retrieval_metrics)
elif moment == 'background_write':  # on the writer's thread, while the checkpoint of epoch 1 is written
    files.atomic_write = before(files.atomic_write, lambda found: any('checkpoint' in p for p in found))
cli.run_cli(lambda: train.main(sys.argv[4:]), train.INTERRUPTED)
'''
MOMENTS = ('fork', 'before_workers', 'after_workers', 'evaluation', 'background_write')


def stopped_run(dataset, results, moment, name):
    """train.py (2 loader workers, no cache) signalled at `moment` in its own session -> (status, stdout, stderr),
    after checking that no process of the session is left."""
    args = flags(dataset, results, '--cache', 'off', workers=2)
    with started([sys.executable, '-c', LAUNCHER, REPO, moment, name, *args]) as run:
        result = run.finish()  # a ceiling for a hang, never reached by a stop
    assert run.left == [], 'a process of the stopped run (a loader worker?) is still running'
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('moment', MOMENTS)
def test_sigterm_at_any_moment_stops_the_run(dataset, tmp_path, moment):
    import train
    status, stdout, stderr = stopped_run(dataset, tmp_path, moment, 'SIGTERM')
    assert status == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f'interrupted: {train.INTERRUPTED}' and 'Traceback' not in stderr
    assert 'Epoch 2/' not in stdout  # stopped within the epoch it was signalled in
    checkpoint = out(tmp_path, 'checkpoint.pth')
    if moment in ('evaluation', 'background_write'):  # epoch 1's files were being handed over: all written
        assert 'Epoch 1/' in stdout and os.path.isfile(checkpoint)
        state = files.safe_load(checkpoint, 'checkpoint')
        assert state['epoch'] == 1 and runs.checkpoint_problem(state, {'num_epochs': 2, 'recalls': [1, 2],
                                                                       'val_split': 0.0}) is None
    else:
        assert 'Epoch 1/' not in stdout and not os.path.exists(checkpoint)


@pytest.mark.slow
def test_ctrl_c_while_workers_fork_stops_the_run(dataset, tmp_path):
    status, stdout, stderr = stopped_run(dataset, tmp_path, 'fork', 'SIGINT')
    assert status == 130 and 'Traceback' not in stderr and stderr.strip().splitlines()[-1].startswith('interrupted:')


def test_safe_points_defer_a_signal_to_the_next_stop_point():
    reached = []

    def main():
        with cli.safe_points():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append('after the signal')  # recorded only: the script goes on to its safe point
            cli.stop_point()
            reached.append('after the stop point')

    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main)
    assert stop.value.code == 143 and reached == ['after the signal']


@pytest.fixture
def ctrl_c():
    """Ctrl-C's SIGINT handled as in a terminal while the test runs, even when the suite runs with it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_signal_acts_at_once_and_outside_safe_points_at_once(ctrl_c):
    reached = []

    def main():
        with cli.safe_points():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append('first recorded')
            os.kill(os.getpid(), signal.SIGINT)  # impatient: the second one stops it here
            reached.append('second ignored')

    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main)
    assert stop.value.code == 130 and reached == ['first recorded']

    def plain():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append('outside safe points')

    with pytest.raises(SystemExit) as stop:
        cli.run_cli(plain)
    assert stop.value.code == 143 and reached == ['first recorded']


def test_an_ignored_sigint_stays_ignored():
    """A job started with SIGINT ignored (by a script's &, or nohup) is not stopped by one."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def main():
            os.kill(os.getpid(), signal.SIGINT)
            return 'finished'
        assert cli.run_cli(main) == 'finished' and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_the_ctrl_c_tests_pass_where_sigint_is_ignored():
    """The suite started with SIGINT ignored (nohup, a script's & job): the test that stops a run with Ctrl-C still
    passes, as the fault launcher delivers it as a terminal does (serve_latency.start_server does so for servers)."""
    result = run_process([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'ctrl_c',
                          'tests/test_reliability.py'], env=python_env(), timeout=900,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and ' passed' in output and 'failed' not in output, output[-3000:]  # 0: all ran
