"""The command line: UserError (a mistake the user can fix) and the one-line error exit, signals (SIGTERM stops a
script as Ctrl-C does), the torchrun error claim (one error line per job), and flag range checks."""
import contextlib
import datetime
import os
import signal
import sys
import threading

import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing or unreadable file); printed without traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster pre-empting the job, torchrun stopping its workers): stops a script as Ctrl-C does."""


# Signals are process-wide: so is this record of them. Within safe_points() a SIGINT or SIGTERM is only recorded
# and the script acts on it at its next stop_point(); elsewhere it stops the script at once.
_SIGNALS = {'depth': 0, 'pending': None}


@contextlib.contextmanager
def safe_points():
    """A region whose signals wait for a stop_point(): never raised inside os.fork's hooks (a loader starting its
    workers), where Python drops a handler's exception and the stop would be lost. A second signal acts at once."""
    _SIGNALS['depth'] += 1
    try:
        yield
        stop_point()
    finally:
        _SIGNALS['depth'] -= 1


def stop_point():
    """A safe point: stop here (as Ctrl-C does) if a SIGINT or SIGTERM has arrived."""
    if _SIGNALS['pending'] is not None:
        raise Terminated() if _SIGNALS['pending'] == signal.SIGTERM else KeyboardInterrupt()


def run_cli(main, interrupted='stopped at once; files already written are intact'):
    """Run a script's main(): a UserError is one 'error: ...' line on stderr (under torchrun from the first
    process to fail) and exit status 1; Ctrl-C (status 130) or SIGTERM (status 143, restored after) stop it
    with one 'interrupted: ...' line (at once, or within safe_points() at the next stop_point())."""
    rank, received, stopping, pid = int(os.environ.get('RANK', '0')), [], [], os.getpid()
    _SIGNALS['pending'] = None

    def on_signal(signum, frame):
        if os.getpid() != pid:  # a forked child (a loader worker) ends as it would without this handler
            if signum == signal.SIGINT:
                signal.signal(signum, signal.default_int_handler)
                raise KeyboardInterrupt()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        if stopping:  # once the script is ending, a SIGTERM (torchrun stopping the others) changes nothing
            return
        if _SIGNALS['depth'] and _SIGNALS['pending'] is None:
            _SIGNALS['pending'] = signum
            return
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    handle = threading.current_thread() is threading.main_thread()  # Python runs handlers there only
    # a SIGINT ignored from the start (a job started with & by a script, nohup) stays ignored
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN] if handle else []
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        try:
            return main()
        except UserError as err:
            stopping.append(err)
            if _first_to_report(rank):
                print(f'{f"[rank {rank}] " if rank else ""}error: {err}', file=sys.stderr, flush=True)
            sys.exit(1)
    except BrokenPipeError:  # the reader of stdout left (`| head`): end quietly, as a process killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        sys.exit(128 + signal.SIGPIPE)
    except (KeyboardInterrupt, Exception) as stop:  # Ctrl-C, or SIGTERM as Terminated
        stopping.append(stop)
        told = _error_reported()  # under torchrun: another process stopped with a user error it printed
        if not isinstance(stop, KeyboardInterrupt) and not received:
            if told:  # a collective broke as that process left: its error line is the one to read
                sys.exit(1)
            raise
        # a signal sent to the whole process group also ends the loader workers: whatever that raised is the stop
        if rank == 0 and not told:
            print(f'interrupted: {interrupted}', file=sys.stderr, flush=True)
        sys.exit(143 if signal.SIGTERM in received else 130)
    finally:
        _SIGNALS['pending'] = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _report_store():
    """(torchrun agent's key-value store, key) where a job's processes count their user errors, or None
    without one: the agent serves it before its workers start and until they have all ended."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    try:
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
    except Exception:  # no store to reach (another launcher): the rank-0 rule applies
        return None
    return store, f'clf/user-error/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}'


def _first_to_report(rank):
    """Whether this process prints its user error: under torchrun the first process of the job to fail,
    whichever rank and node it is, so the line appears once even when torchrun stops the others at once."""
    found = _report_store()
    if found is None:  # errors of before the process group are every process's: rank 0 tells them
        return rank == 0 or dist.is_available() and dist.is_initialized()
    store, key = found
    try:
        return store.add(key, 1) == 1
    except Exception:  # reporting an error must never raise one of its own
        return rank == 0


def _error_reported():
    """Whether a process of this torchrun job has printed a user error (and torchrun is stopping the rest)."""
    found = _report_store()
    if found is None:
        return False
    with contextlib.suppress(Exception):
        return found[0].check([found[1]])
    return False


SEED_MAX = 2 ** 32 - 1  # NumPy's seed range, 0 .. 2**32 - 1: one range for every script's --seed


def check_int(name, value, low, high):
    """A flag's integer within [low, high], else a UserError naming the flag and the range."""
    if not low <= value <= high:
        raise UserError(f'{name} must be between {low} and {high}, got {value}')
    return value


def check_float(name, value, low, high):
    """A flag's number in the half-open range (low, high], else a UserError naming the flag and the range
    (NaN and infinities included)."""
    if not low < value <= high:  # False for NaN
        raise UserError(f'{name} must be greater than {low:g} and at most {high:g}, got {value:g}')
    return value


def check_results_dir(path):
    """--results_dir must name a folder, existing or to be made: not '' (the current folder by accident), not a file."""
    if not path or os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--results_dir '{path}': expected a folder")
    return path
