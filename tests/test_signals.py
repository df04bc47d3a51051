"""Signals only recorded by their handler and acted on at a safe point (cli.safe_points / stop_point): a SIGTERM or
Ctrl-C that arrives while a DataLoader forks its workers (inside os.fork's hooks, where Python drops a handler's
exception) still stops training, with one line and the conventional exit status."""
import os
import signal
import subprocess
import sys

import pytest

import cli
from _train_fixtures import REPO, flags, out

# sends `SIGNAL` to itself from inside os.fork's first 'before' hook, i.e. as the first loader worker is forked
FORKING = '''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import cli, train
sent = []
def send():
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.{name})
os.register_at_fork(before=send)
cli.run_cli(lambda: train.main(sys.argv[2:]), train.INTERRUPTED)
'''


@pytest.mark.slow
@pytest.mark.parametrize('name, status', [('SIGTERM', 143), ('SIGINT', 130)])
def test_signal_while_workers_fork_stops_the_run(dataset, tmp_path, name, status):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    args = flags(dataset, tmp_path, '--cache', 'off', workers=2)
    process = subprocess.Popen([sys.executable, '-c', FORKING.format(name=name), str(REPO), *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the run and its loader workers
            process.wait()
    assert process.returncode == status, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f'interrupted: {__import__("train").INTERRUPTED}', stderr[-2000:]
    assert 'Traceback' not in stderr and 'Epoch 1/' not in stdout  # stopped before its first epoch ended
    assert not os.path.exists(out(tmp_path, 'checkpoint.pth'))


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


def test_a_second_signal_acts_at_once_and_outside_safe_points_at_once():
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
