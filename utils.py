"""Shared pieces of CLF: errors and safe files, distributed helpers, image lists and transforms,
the training loss and the retrieval metrics."""
import io
import os
import pickle
import sys
import tempfile

import torch


# ----------------------------------------------------------------------------------------------
# errors and files
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing or unreadable file); printed without traceback."""


def run_cli(main, *args, **kwargs):
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and exit status 1."""
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print('interrupted: stopped at once; files already written are intact', file=sys.stderr, flush=True)
        sys.exit(130)


def atomic_write_bytes(data, path):
    """Write bytes to `path` so that readers see either the old file or the whole new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:  # make the rename itself durable; not every filesystem allows fsync on a folder
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except OSError as err:
        raise UserError(f'cannot write {path}: {err.strerror or err}; the previous file, if any, is '
                        f'unchanged (check free disk space and that the folder is writable)') from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save `obj` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def safe_load(path, what='file'):
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f'refusing to load {path}: it is not a plain {what} (it holds objects other than '
                        f'tensors and plain containers, which could run code on load; '
                        f'first lines: {str(err).splitlines()[0][:200]})') from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f'cannot read {what} {path}: the file is damaged or not a PyTorch file '
                        f'({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})') from None



# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# images and transforms
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# retrieval metrics
# ----------------------------------------------------------------------------------------------
