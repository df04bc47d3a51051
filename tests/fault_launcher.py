"""Run a project script with faults injected from outside, by patching its write and step functions:

    python tests/fault_launcher.py FAULTS SCRIPT.py [script arguments...]

FAULTS is a comma-separated list (works under torchrun too: every process applies it):
  kill-write:NAME:N   SIGKILL halfway through the N-th atomic write of a file whose name contains NAME
                      (the temporary file is half written, the target untouched: a pre-emption)
  fail-write:NAME:N   that write fails as if the disk were full
  nan:E:S             the loss of step S of epoch E is NaN          (train.py)
  kill:E:S            SIGKILL right after step S of epoch E          (train.py)
  interrupt:E:S       SIGINT (what Ctrl-C sends) after step S of epoch E (train.py)
  terminate:E:S       SIGTERM (a cluster's pre-emption) after step S of epoch E, to torchrun when under
                      it (which forwards it to every process), else to this process (train.py)
"""
import errno
import functools
import importlib
import inspect
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(text):
    """'kill:2:1,fail-write:checkpoint:2' -> {kind: [(a, b), ...]}."""
    faults = {}
    for entry in filter(None, text.split(',')):
        kind, a, b = entry.split(':')
        faults.setdefault(kind, []).append((a, int(b)) if 'write' in kind else (int(a), int(b)))
    return faults


def patch_writes(files, faults):
    original, counts = files.write_temporary, {}

    @functools.wraps(original)
    def write_temporary(data, path):
        for kind in ('kill-write', 'fail-write'):
            for name, n in faults.get(kind, ()):
                if name in os.path.basename(path):
                    counts[kind, name] = counts.get((kind, name), 0) + 1
                    if counts[kind, name] != n:
                        continue
                    if kind == 'fail-write':
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    original(data[:len(data) // 2], path)
                    os.kill(os.getpid(), signal.SIGKILL)
        return original(data, path)

    files.write_temporary = write_temporary


def patch_steps(train, faults):
    """Wrap train_one_epoch (to know the epoch) and train_step (to count steps and act after one)."""
    where = {'epoch': 0, 'step': 0}
    one_epoch, one_step = train.train_one_epoch, train.train_step
    epoch_parameter = inspect.signature(one_epoch)

    @functools.wraps(one_epoch)
    def train_one_epoch(*args, **kwargs):
        where['epoch'] = epoch_parameter.bind(*args, **kwargs).arguments['epoch']
        where['step'] = 0
        return one_epoch(*args, **kwargs)

    @functools.wraps(one_step)
    def train_step(*args, **kwargs):
        where['step'] += 1
        now = (where['epoch'], where['step'])
        if now in faults.get('nan', ()):
            criterion = kwargs.get('criterion') or inspect.signature(one_step).bind(*args, **kwargs).arguments['criterion']
            forward = criterion.forward
            criterion.forward = lambda *a, **k: forward(*a, **k) * float('nan')
            try:
                return one_step(*args, **kwargs)
            finally:
                criterion.forward = forward
        result = one_step(*args, **kwargs)
        if now in faults.get('kill', ()):
            os.kill(os.getpid(), signal.SIGKILL)
        if now in faults.get('interrupt', ()):
            # Ctrl-C as a terminal delivers it, even where this runs with SIGINT ignored (nohup, a script's & job)
            ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            if ignored:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                os.kill(os.getpid(), signal.SIGINT)
            finally:
                if ignored:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
        if now in faults.get('terminate', ()):
            os.kill(os.getppid() if 'TORCHELASTIC_RUN_ID' in os.environ else os.getpid(), signal.SIGTERM)
        return result

    train.train_one_epoch, train.train_step = train_one_epoch, train_step


def main():
    faults, script, args = parse(sys.argv[1]), sys.argv[2], sys.argv[3:]
    sys.path.insert(0, REPO)
    sys.argv = [script, *args]
    import cli
    import files
    patch_writes(files, faults)
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    if hasattr(module, 'train_step'):
        patch_steps(module, faults)
    cli.run_cli(module.main, *[module.INTERRUPTED] if hasattr(module, 'INTERRUPTED') else [])


if __name__ == '__main__':
    main()
