"""Tiny training runs for the train.py tests: a hard little dataset, the flags, and runners; every process a test
starts goes through started(), in a session of its own, its whole process group killed on leaving."""
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import data_utils  # noqa: E402

NAME = 'tiny'
RUN_NAME = 'tiny_uncropped_resnet18_8'  # {data_name}_{crop_type}_{backbone_type}_{feature_dim}
EPOCHS = 2
# the validation-split runs: 10 classes, of whose 5 training classes --val_split 0.4 holds out 2 and trains on 3
VAL_CLASSES, VAL_FLAGS = 10, ('--val_split', '0.4')


def write_noisy_classes(root, name=NAME, num_classes=6, per_class=4, size=40, seed=0):
    """root/name/class_k/img_j.png: mostly noise with a faint class tint, so retrieval is neither
    perfect nor hopeless and R@1 moves from epoch to epoch."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, name, f'class_{c}')
        os.makedirs(folder, exist_ok=True)
        tint = rng.integers(0, 256, 3)
        for j in range(per_class):
            noise = rng.integers(0, 256, (size, size, 3))
            jitter = rng.integers(0, 256, 3)  # per-image colour cast, as strong as the class tint
            pixels = (0.25 * tint + 0.25 * jitter + 0.5 * noise).astype(np.uint8)
            Image.fromarray(pixels, 'RGB').save(os.path.join(folder, f'img_{j}.png'))


def make_dataset(root, num_classes=6):
    """Write and process the dataset with data_utils: num_classes / 2 training classes x 4, as many test classes."""
    root = os.fspath(root)
    write_noisy_classes(root, num_classes=num_classes)
    data_utils.process_dataset(root, NAME)
    return root


def flags(data_path, results_dir, *extra, epochs=EPOCHS, workers=0):
    """train.py arguments for a few-second CPU run: 32 px, batch 4 (3 steps per epoch), 8-d branches."""
    return ['--data_path', os.fspath(data_path), '--data_name', NAME, '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '4', '--num_epochs', str(epochs), '--recalls', '1,2',
            '--feature_dim', '8', '--num_workers', str(workers), '--device', 'cpu',
            '--results_dir', os.fspath(results_dir), *extra]


def out(results_dir, kind):
    """Path of one output: kind in statistics.csv, model.pth, data_base.pth, checkpoint.pth, curves.png."""
    return os.path.join(os.fspath(results_dir), f'{RUN_NAME}_{kind}')


# a ceiling for any process a test starts: only a hang reaches it (a tiny run takes seconds idle, a minute or two
# at load 10 on 2 cores)
TIMEOUT = 600


def python_env(**extra):
    """The environment of a Python process a test starts: unbuffered output (lines arrive as printed) and one
    BLAS/OpenMP thread (on a busy 2-core machine spinning OpenMP threads slow tiny steps 20x)."""
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', **extra)


class Started:
    """A process started in a session of its own, so that its process group holds whatever it starts (loader
    workers, torchrun's ranks, a benchmark's server); its stdout and stderr are read line by line as they come.
    The group is only ever signalled before the process is reaped: until then no other process can be given its
    id (pid_max may be 32768 on a busy machine)."""

    def __init__(self, command, env=None, cwd=REPO, **popen):
        self.command = [os.fspath(c) for c in command]
        self.process = subprocess.Popen(self.command, cwd=cwd, env=python_env() if env is None else env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True, **popen)
        self.pidfd = os.pidfd_open(self.process.pid)  # readable once it has ended; reaping it is left to kill()
        self.lines = {'stdout': [], 'stderr': []}  # (time.monotonic() when read, line)
        self.closed, self.left = set(), None
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _read(self, name):
        for line in getattr(self.process, name):
            with self.changed:
                self.lines[name].append((time.monotonic(), line))
                self.changed.notify_all()
        with self.changed:
            self.closed.add(name)
            self.changed.notify_all()

    def text(self, name):
        with self.changed:
            return ''.join(line for _, line in self.lines[name])

    def describe(self):
        return (f'{" ".join(self.command)[-300:]}\n--- stdout (end) ---\n{self.text("stdout")[-3000:]}'
                f'\n--- stderr (end) ---\n{self.text("stderr")[-3000:]}')

    def wait_for(self, prefix, timeout=TIMEOUT):
        """The first stdout line starting with `prefix`, as soon as it is printed -> (time it was read, line).
        Fails when the process closes its output without it, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [entry for entry in self.lines['stdout'] if entry[1].startswith(prefix)]
                if found:
                    return found[0]
                if 'stdout' in self.closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    pytest.fail(f'no line starting {prefix!r} within {timeout}s (hung?); its process group was '
                                f'killed: {self.describe()}', pytrace=False)
                self.changed.wait(left)
        pytest.fail(f'ended without a line starting {prefix!r}: {self.describe()}', pytrace=False)

    def signal(self, signum):
        """Send `signum` to the whole process group, as a cluster's pre-emption or a terminal's Ctrl-C does."""
        assert self.process.returncode is None, 'signalled after it was reaped'
        os.killpg(self.process.pid, signum)

    def ended(self, timeout):
        """Whether the process ends within `timeout` seconds (it is not reaped: its group id stays its own)."""
        return bool(select.select([self.pidfd], [], [], max(0.0, timeout))[0])

    def others_in_group(self):
        """Living processes of its process group other than itself (Linux /proc), e.g. loader workers that did
        not end, whether still its children or orphaned by its end -> their process ids."""
        found = []
        for entry in os.listdir('/proc'):
            if entry.isdigit() and int(entry) != self.process.pid:
                with contextlib.suppress(OSError):
                    with open(f'/proc/{entry}/stat') as f:
                        state, _, group = f.read().rsplit(')', 1)[1].split()[:3]  # after '(name)'
                    if int(group) == self.process.pid and state != 'Z':
                        found.append(int(entry))
        return found

    def finish(self, timeout=TIMEOUT):
        """Wait for the process to end and its output to close (as subprocess.run does) -> CompletedProcess with
        all it printed; `left` then lists the processes of its group still running (none, unless something it
        started ignores its end), which are killed. Past `timeout` seconds the process is taken for hung: its
        process group is killed and the test fails saying so."""
        deadline = time.monotonic() + timeout
        try:
            if not self.ended(timeout):
                raise subprocess.TimeoutExpired(self.command, timeout)
            for reader in self.readers:  # the output closes when every process holding it has ended
                reader.join(max(0.0, deadline - time.monotonic()))
            if any(reader.is_alive() for reader in self.readers):
                raise subprocess.TimeoutExpired(self.command, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f'still running after {timeout}s (hung?); its process group was killed: {self.describe()}',
                        pytrace=False)
        self.left = self.others_in_group()
        self.kill()
        return subprocess.CompletedProcess(self.command, self.process.returncode, self.text('stdout'),
                                           self.text('stderr'))

    def kill(self):
        """SIGKILL to the whole process group (nothing of it outlives the test), then reap the process."""
        kill_groups([self.process])
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@contextlib.contextmanager
def started(command, env=None, cwd=REPO, **popen):
    """Start `command` (env: python_env() unless given; `popen`: more subprocess.Popen arguments) in a session of its
    own -> Started; on leaving, however the test went, its whole process group is killed."""
    process = Started(command, env, cwd, **popen)
    try:
        yield process
    finally:
        process.kill()


def run_process(command, env=None, cwd=REPO, timeout=TIMEOUT, **popen):
    """subprocess.run for tests: `command` in a session of its own, its output captured, its process group killed
    when it ends -> CompletedProcess."""
    with started(command, env, cwd, **popen) as process:
        return process.finish(timeout)


@contextlib.contextmanager
def own_sessions(timeout=TIMEOUT):
    """For code the tests do not own that starts processes itself (a benchmark starting serve.py): while inside,
    every subprocess.Popen starts a session of its own -> the list of those started, for kill_groups. Should the
    block last past `timeout` seconds (hung), their groups are killed and the test fails saying so."""
    made, original, expired = [], subprocess.Popen, []

    class Popen(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, start_new_session=True))
            made.append(self)

    def expire():
        expired.append(True)
        kill_groups(made)

    watchdog = threading.Timer(timeout, expire)
    subprocess.Popen = Popen
    watchdog.start()
    try:
        yield made
    finally:
        watchdog.cancel()
        subprocess.Popen = original
        if expired:
            pytest.fail(f'still running after {timeout}s (hung?); the process groups it started were killed: '
                        f'{[" ".join(map(str, p.args))[-300:] for p in made]}', pytrace=False)


def kill_groups(processes):
    """SIGKILL to the whole group of each process (each started in a session of its own), then reap it; a group whose
    process was already reaped (by code that waited for it) is left alone: its id may be another process's by now."""
    for process in processes:
        if process.returncode is None:  # alive, or ended but not reaped: the group id is still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def script_command(args, fault=None, launcher=(sys.executable,), script='train.py'):
    """`launcher script args`, with `fault` injected by tests/fault_launcher.py when given."""
    command = [str(REPO / 'tests' / 'fault_launcher.py'), fault] if fault else []
    return [*launcher, *command, str(REPO / script), *args]


def run_script(args, fault=None, timeout=TIMEOUT, launcher=(sys.executable,), script='train.py'):
    """Run `launcher script args` in a fresh interpreter (SIGKILL and exit codes need one), with `fault` injected
    by tests/fault_launcher.py when given -> CompletedProcess."""
    return run_process(script_command(args, fault, launcher, script), timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tensors(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
