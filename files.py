"""Files the project writes and reads: atomic writes (a reader sees the old files or all the new ones; one file
streamed into place), safe reading of torch files (never code), OS locks, a background writer, and the folders
test.py replaces whole."""
import concurrent.futures
import contextlib
import errno
import fcntl
import glob
import io
import hashlib
import os
import re
import secrets
import shutil
import stat
import warnings

import torch

from cli import UserError


TEMPORARY_EXTRA = len('..') + 16 + len('.tmp')  # what write_temporary adds to a file name


def write_temporary(data, path):
    """Write bytes to a new hidden temporary file .{name}.{16 hex digits}.tmp beside `path`, synced -> its name."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.{os.urandom(8).hex()}.tmp')
    f = open(tmp, 'xb')  # 'x' (O_EXCL): a new file of its own; mode 0o666 less the umask (mkstemp's: 0600)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


@contextlib.contextmanager
def atomic_file(path):
    """An open file whose content replaces `path` only once the block ends without error (synced first)."""
    tmp = write_temporary(b'', path)  # the hidden .{name}.{hex}.tmp beside path, created empty
    try:
        with open(tmp, 'r+b') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f'cannot write {path}: {err.strerror or err}; the previous file, if any, is unchanged') from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write(files):
    """Write {path: bytes} so that readers see the old files or all the new ones (a model and its
    database are replaced together), never a part; a failure is a UserError and changes nothing."""
    pending, path = [], None  # [(temporary file, path)]: all written and synced before the first rename
    try:
        for path, data in files.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            pending.append((write_temporary(data, path), path))
        for tmp, path in pending:
            os.replace(tmp, path)
        for folder in {os.path.dirname(os.path.abspath(p)) for p in files}:
            with contextlib.suppress(OSError):  # not every filesystem allows fsync on a folder
                dir_fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # the renames made durable
                finally:
                    os.close(dir_fd)
    except OSError as err:
        raise UserError(f'cannot write {path}: {err.strerror or err}; the previous file, if any, is '
                        f'unchanged (check free disk space and that the folder is writable)') from None
    finally:
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)


def torch_bytes(obj):
    """What torch.save writes for `obj`, as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def to_cpu(obj):
    """A CPU copy of every tensor in nested dicts/lists: training goes on changing the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs one at a time in a thread, so the GPU need not wait for the disk; a failed job's
    error surfaces at the next check() (cheap: called at every training step) or wait."""

    def __init__(self):
        self.pool, self.job = concurrent.futures.ThreadPoolExecutor(1), None

    def submit(self, write):
        self.wait()
        self.job = self.pool.submit(write)

    def check(self):
        """Raise the error of a finished job that failed (a full disk): the run stops at its next step."""
        if self.job is not None and self.job.done():
            self.wait()

    def wait(self):
        job, self.job = self.job, None
        if job is not None:
            job.result()

    def close(self):
        self.wait()
        self.pool.shutdown()


def hold_lock(path, script, busy, read_only_ok=False):
    """Hold an exclusive OS lock (released when the process ends, even killed) on `path`, a plain file of its own,
    created if missing and never opened through a link -> its descriptor, `process PID` written in it. A link,
    hard link, pipe or device planted there is a UserError, and so is another holder: busy(its note). With
    read_only_ok, in a folder this user may only read, an existing lock file is locked read-only and a missing
    one means no lock (-> None): such a run can create nothing there either. Other OS errors propagate."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK  # a planted link fails (ELOOP); a planted pipe does not block the open
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f'{path} is a symbolic link, not the lock file {script} makes; remove it') from None
        if not read_only_ok or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:  # the lock file an earlier run left still excludes the writers
            fd, writable = os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:
            return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link would write into another file too
            raise UserError(f'{path} is not the lock file {script} makes (not a regular file of its own); remove it')
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(busy(os.pread(fd, 64, 0).decode(errors='replace').strip() or 'process id unknown')) \
                from None
        if writable:
            with contextlib.suppress(OSError):  # the holder's note only informs a second run
                os.ftruncate(fd, 0)
                os.pwrite(fd, f'process {os.getpid()}\n'.encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_temporaries(paths):
    """Delete the hidden temporary files that a killed atomic_write of these paths left behind."""
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        for tmp in glob.glob(os.path.join(glob.escape(folder), '.' + glob.escape(name) + '.*.tmp')):
            with contextlib.suppress(OSError):
                os.remove(tmp)


# An image file larger than this is refused unread: more than an uncompressed 16-bit RGB image at PIL's
# default pixel limit (89.5 M pixels x 6 bytes = 537 MB) takes
IMAGE_FILE_LIMIT = 2 ** 30


def file_problem(path, what='file', limit=None):
    """Why `path` is no regular file that may be read (within `limit` bytes), as a message naming it, or None.
    One stat, following links: a link to a folder, pipe or device (/dev/zero, which never ends; a FIFO, which
    waits for a writer) is refused without being opened."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return f'{what} not found: {path}'
    try:
        info = os.stat(path)
    except OSError:  # a link to nothing, a folder we may not search
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        return f'{what} {path} is not a regular file (a folder, pipe or device?)'
    if limit is not None and info.st_size > limit:
        return f'{what} {path} is {info.st_size:,} bytes, more than the {limit:,} an image file may have'
    return None


def check_image_file(path, what='image'):
    """A UserError unless `path` is a regular file within IMAGE_FILE_LIMIT: what every query image passes before
    it is opened (test.py's --query_img_name and --query_dir)."""
    problem = file_problem(path, what, IMAGE_FILE_LIMIT)
    if problem:
        raise UserError(problem)


def read_bytes(path, what='file'):
    """The bytes of a regular file; a missing file, a folder, a pipe or a device is a UserError."""
    path = os.fspath(path)
    problem = file_problem(path, what)
    if problem:
        raise UserError(problem)
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as err:
        raise UserError(f'cannot read {what} {path}: {err.strerror or err}') from None


def load_bytes(data, path, what='file'):
    """torch.load of a file's bytes with weights_only=True (tensors and plain containers, never code);
    a bare pickle is refused without being opened."""
    # a torch zip file, or torch's pre-1.6 format: pickle protocol 2, then a long-int magic number
    if data[:4] not in (b'PK\x03\x04', b'\x80\x02\x8a\x0a'):
        if data[:1] == b'\x80':  # a pickle protocol marker
            raise UserError(f'refusing to load {path}: a bare Python pickle, not a torch.save file (nothing was run)')
        raise UserError(f'cannot read {what} {path}: not a PyTorch file (damaged, truncated or another format)')
    try:
        with warnings.catch_warnings(action='ignore'):
            return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception:  # a damaged file can fail anywhere inside the unpickler (KeyError, ...)
        unsafe = []
        with contextlib.suppress(Exception):  # the globals it would need (zip files only; damaged: none)
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        if unsafe:
            raise UserError(f'refusing to load {path}: not a plain {what}, it holds objects that could run code '
                            f'on load (nothing was run): {", ".join(unsafe[:5])}') from None
        raise UserError(f'cannot read {what} {path}: the file is damaged or truncated') from None


def safe_load(path, what='file'):
    """Read and torch.load a file safely (see load_bytes)."""
    return load_bytes(read_bytes(path, what), os.fspath(path), what)


MARKER = '.written_by_test_py'  # inside every folder test.py writes: only a folder holding it is ever replaced
MARKER_TEXT = b'CLF test.py results; the next run for the same query name replaces this folder whole\n'


def check_replaceable(target):
    """Only a folder test.py wrote (a real folder with MARKER inside) may be replaced, never someone else's."""
    if os.path.lexists(target) and (os.path.islink(target) or not os.path.isfile(os.path.join(target, MARKER))):
        raise UserError(f'{target} exists and was not written by test.py (it holds no {MARKER}); nothing was '
                        f'removed: move it away, rename the query image or pass another --results_dir')


def _temporary_names(stem):
    """write_result_folder's hidden folders for `stem`: .{stem}.{8 hex digits}.tmp (the new set) and
    .{stem}.{same digits}.old.tmp (the set it replaces) -> a pattern whose group 1 is the digits."""
    return re.compile(re.escape(f'.{stem}.') + r'([0-9a-f]{8})(?:\.old)?\.tmp')


def _held(marker):
    """Whether a running test.py holds this marker file locked (it does while it writes its folder)."""
    try:
        with open(marker, 'rb') as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # gone: nobody holds it
        pass
    return False


def remove_stale_folders(results_dir, stem):
    """Delete the hidden folders a killed test.py left for this query name: only folders named as
    write_result_folder names them, with MARKER inside, and not held by a test.py still writing."""
    pattern = _temporary_names(stem)
    with contextlib.suppress(OSError):
        for name in os.listdir(results_dir):
            found, path = pattern.fullmatch(name), os.path.join(results_dir, name)
            if found is None or os.path.islink(path) or not os.path.isfile(os.path.join(path, MARKER)):
                continue
            # the pair's new set is locked while its run writes or swaps: then both are in use
            if not _held(os.path.join(results_dir, f'.{stem}.{found[1]}.tmp', MARKER)):
                shutil.rmtree(path, ignore_errors=True)


def write_result_folder(results_dir, stem, files):
    """Write every file into a fresh hidden folder, then swap it in for results/{stem}: never a half set.
    The hidden folders of an earlier, killed run for `stem` are removed first."""
    target = os.path.join(results_dir, stem)
    remove_stale_folders(results_dir, stem)
    tmp = os.path.join(results_dir, f'.{stem}.{secrets.token_hex(4)}.tmp')
    old = tmp[:-len('.tmp')] + '.old.tmp'  # the previous results, kept until the new set is in place
    try:
        os.makedirs(tmp)  # and results_dir if needed
        # the marker first, locked until the swap is done: a killed run's folders are recognisably test.py's
        with open(os.path.join(tmp, MARKER), 'xb') as marker:
            fcntl.flock(marker, fcntl.LOCK_EX)
            marker.write(MARKER_TEXT)
            marker.flush()
            os.fsync(marker.fileno())
            atomic_write({os.path.join(tmp, name): data for name, data in files.items()})
            check_replaceable(target)  # again, just before the swap: the path may have changed meanwhile
            if os.path.lexists(target):
                os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                if os.path.isdir(old):  # put the previous results back
                    os.rename(old, target)
                raise
    except OSError as err:
        raise UserError(f'cannot write the results to {target}: {err.strerror or err}; previous results, if any, '
                        f'are unchanged (check free disk space and that {results_dir} is writable)') from None
    finally:
        for leftover in (tmp, old):  # only our own hidden folders (if there): the fresh set, or the replaced one
            shutil.rmtree(leftover, ignore_errors=True)
    return target


def file_sha256(path):
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2 ** 20), b''):
            digest.update(block)
    return digest.hexdigest()
