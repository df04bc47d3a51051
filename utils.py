"""Shared pieces of CLF: errors and safe files, the feature database, seeding and distributed helpers,
image lists and the decode-once cache, the training loss and curves (the retrieval metrics: metrics.py)."""
import concurrent.futures
import contextlib
import datetime
import errno
import glob
import hashlib
import io
import math
import os
import random
import re
import signal
import stat
import sys
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


# ---- errors and files ----

class UserError(Exception):
    """A mistake the user can fix (bad flag, missing or unreadable file); printed without traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster pre-empting the job, torchrun stopping its workers): stops a script as Ctrl-C does."""


def run_cli(main, interrupted='stopped at once; files already written are intact'):
    """Run a script's main(): a UserError is one 'error: ...' line on stderr (under torchrun from the first
    process to fail) and exit status 1; Ctrl-C (status 130) or SIGTERM (status 143, restored after) stop it
    at once with one 'interrupted: ...' line."""
    rank, received, stopping, pid = int(os.environ.get('RANK', '0')), [], [], os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != pid:  # a forked child (a loader worker) ends quietly, as it would without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        if not stopping:  # once the script is ending, a SIGTERM (torchrun stopping the others) changes nothing
            raise Terminated()

    handle = threading.current_thread() is threading.main_thread()  # Python runs handlers there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if handle else None
    try:
        try:
            return main()
        except UserError as err:
            stopping.append(err)
            if _first_to_report(rank):
                print(f'{f"[rank {rank}] " if rank else ""}error: {err}', file=sys.stderr, flush=True)
            sys.exit(1)
    except (KeyboardInterrupt, Exception) as stop:  # Ctrl-C, or SIGTERM as Terminated
        stopping.append(stop)
        told = _error_reported()  # under torchrun: another process stopped with a user error it printed
        if not isinstance(stop, KeyboardInterrupt) and not received:
            if told:  # a collective broke as that process left: its error line is the one to read
                sys.exit(1)
            raise
        # a SIGTERM sent to the whole process group also ends the loader workers: whatever that raised is the stop
        if rank == 0 and not told:
            print(f'interrupted: {interrupted}', file=sys.stderr, flush=True)
        sys.exit(143 if received else 130)
    finally:
        if handle:
            signal.signal(signal.SIGTERM, previous)


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
        return rank == 0 or is_distributed()
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
    import fcntl
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


def read_bytes(path, what='file'):
    """The bytes of a regular file; a missing file, a folder, a pipe or a device is a UserError."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise UserError(f'{what} not found: {path}')
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} is not a regular file (a folder, pipe or device?)')
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


def load_state_dict_strict(module, state, source, what='weights of this model'):
    """Load `state` into `module` strictly; else a UserError saying that `source` does not hold `what`,
    listing up to 8 missing, unexpected and mis-shaped tensors each."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{source} does not hold {what}: expected a state dict (parameter name -> tensor)')
    expected = module.state_dict()
    problems = {'missing': [k for k in expected if k not in state],
                'unexpected': [k for k in state if k not in expected],
                'with the wrong shape': [f'{k} {list(state[k].shape)} (expected {list(v.shape)})'
                                         for k, v in expected.items() if k in state and state[k].shape != v.shape]}
    listed = [f'{len(names)} {kind}: {", ".join(names[:8])}{f" and {len(names) - 8} more" if len(names) > 8 else ""}'
              for kind, names in problems.items() if names]
    if listed:
        raise UserError(f'{source} does not hold {what} ({"; ".join(listed)})')
    module.load_state_dict(state, strict=True)


# ---- the feature database train.py writes and test.py searches ----
# {'test_images': [paths], 'test_labels': [str], 'test_features': [N, D] float, (query/gallery
#  data: the query split under test_*, and gallery_images, gallery_labels, gallery_features),
#  'config': {DATABASE_CONFIG}}. model_sha256 ties it to the model file written with it.
DATABASE_CONFIG = ('backbone_type', 'feature_dim', 'branches', 'num_classes', 'image_size', 'mean', 'std',
                   'data_name', 'crop_type', 'model_file', 'model_sha256')


def save_model_and_database(state_dict, database, model_path, database_path):
    """Write a state dict and its feature database together (atomic_write), the database recording the
    model file's name and SHA-256."""
    model_bytes = torch_bytes(state_dict)
    config = dict(database['config'], model_file=os.path.basename(model_path),
                  model_sha256=hashlib.sha256(model_bytes).hexdigest())
    atomic_write({model_path: model_bytes, database_path: torch_bytes(dict(database, config=config))})


def load_database(path):
    """Read and check a feature database -> (database, query/gallery or not). Labels become str."""
    def error(problem):
        return UserError(f'{path} is not a usable CLF feature database: {problem} (expected the '
                         f'..._data_base.pth that train.py writes)')

    db = safe_load(path, 'feature database')
    if not isinstance(db, dict):
        raise error(f'it holds a {type(db).__name__}, not a dict')
    isc = any(k.startswith('gallery_') for k in db)
    splits = ('test', 'gallery') if isc else ('test',)
    missing = [f'{s}_{k}' for s in splits for k in ('images', 'labels', 'features') if f'{s}_{k}' not in db]
    config = db.get('config')
    missing += ['config'] if not isinstance(config, dict) else [k for k in DATABASE_CONFIG if k not in config]
    if missing:
        raise error(f'missing {", ".join(missing)}')
    for key in ('feature_dim', 'num_classes', 'image_size'):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] <= 0:
            raise error(f'config {key} must be a positive integer, got {config[key]!r}')
    for key in ('mean', 'std'):
        values = list(config[key]) if isinstance(config[key], (list, tuple)) else []
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) \
                or (key == 'std' and min(values) <= 0):
            raise error(f'config {key} must be three numbers (std positive), got {config[key]!r}')
    dim = len(str(config['branches'])) * config['feature_dim']  # one feature_dim block per branch
    for split in splits:
        images, labels, features = (db[f'{split}_{k}'] for k in ('images', 'labels', 'features'))
        if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) for p in images) or \
                not isinstance(labels, (list, tuple)) or not all(isinstance(v, (str, int)) for v in labels):
            raise error(f'{split}_images and {split}_labels must be lists of paths and labels')
        if not torch.is_tensor(features) or not features.is_floating_point() or features.shape[1:] != (dim,):
            raise error(f'{split}_features must be a float tensor [N, {dim}] (branches x feature_dim)')
        if not len(images) == len(labels) == len(features) or not images:
            raise error(f'{split}: {len(images)} images, {len(labels)} labels, {len(features)} features (unequal or 0)')
        if not torch.isfinite(features).all() or not (features.norm(dim=1) > 0).all():
            raise error(f'{split}_features hold NaN, infinite or all-zero vectors (from a diverged model?)')
        db[f'{split}_labels'] = [str(v) for v in labels]
    return db, isc


def read_model_state(db, db_path):
    """The state dict of the model file beside a database, checked against its recorded SHA-256 -> (state, path)."""
    model_path = os.path.join(os.path.dirname(db_path), os.path.basename(str(db['config']['model_file'])))
    data = read_bytes(model_path, 'model file')
    if hashlib.sha256(data).hexdigest() != db['config']['model_sha256']:
        raise UserError(f'the model file {model_path} is not the one the database {db_path} was written '
                        f'with (its SHA-256 differs); use the database and model file of the same training run')
    return load_bytes(data, model_path, 'model file'), model_path


# ---- reproducibility: every random draw of epoch e depends only on (seed, e), never on what ran before ----
# so a checkpoint needs no RNG state: each epoch reseeds everything from (seed, epoch, rank)


def derive_seed(*parts):
    """Mix integers into one 63-bit seed (SplitMix64 steps), so nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def epoch_order(size, seed, epoch, world_size=1, rank=0):
    """This rank's [(index, seed)] of an epoch, shuffled as DistributedSampler shuffles (seed + epoch); each
    image's own seed fixes its crop and flip whatever the worker count, the process that loads it, or the cache."""
    sampler = torch.utils.data.DistributedSampler(range(size), num_replicas=world_size, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return [(index, derive_seed(seed, epoch, index)) for index in sampler]


# ---- distributed: one process per device under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) ----
# Without torchrun every helper below is a no-op, so the same code runs on CPU, one GPU and many.


def resolve_device(device_arg=None):
    """The --device flag as a torch.device (default CUDA when available); a bad name is a UserError."""
    device_arg = device_arg or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device_arg)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(f"unknown --device '{device_arg}': expected cpu, cuda or cuda:N")
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f'--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA device(s); use '
                        f'--device cpu, or cuda:N below that count')
    return device


def init_distributed(device_arg=None):
    """This process's device, joining torchrun's process group if any (cuda:LOCAL_RANK and NCCL, or gloo)."""
    device = resolve_device(device_arg)
    torchrun = int(os.environ.get('WORLD_SIZE', '1')) > 1 and 'RANK' in os.environ
    if torchrun and device.type == 'cuda':
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f'LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA '
                            f'device(s): --nproc_per_node must not exceed the GPUs per node')
        device = torch.device('cuda', local_rank)
    if device.type == 'cuda' and device.index is not None:
        torch.cuda.set_device(device)  # bf16 support, pinned memory and RNG refer to it; no context on GPU 0
    if torchrun and not dist.is_initialized():  # rank 0 evaluates and writes while the others wait: 60 min
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(minutes=60))
    return device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def shard_range(n, rank, world_size):
    """Contiguous block of range(n) for `rank`; blocks in rank order concatenate back to range(n)."""
    per = -(-n // world_size)  # ceil
    return range(min(rank * per, n), min((rank + 1) * per, n))


def all_gather_rows(tensor):
    """Every rank's [n_r, ...] tensor concatenated along dim 0 in rank order (n_r may differ)."""
    if not is_distributed():
        return tensor
    sizes = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, len(tensor))  # all_gather needs equal shapes: pad to the largest n_r, then trim
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def broadcast_object(obj, src=0):
    """Rank `src`'s picklable `obj` on every rank (e.g. a checkpoint only rank 0 can read)."""
    if not is_distributed():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def broadcast_buffers(module, src=0):
    """Copy rank `src`'s buffers (BatchNorm statistics) to every rank. DDP does so only at the next training
    forward: each rank would evaluate its shard with its own statistics, not those rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (float64, so counts stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Runtime:
    """Where and how this process computes: device, mixed precision and its loss scaler, memory format, rank."""

    def __init__(self, device, amp):
        self.device, self.cuda = device, device.type == 'cuda'
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        self.main = self.rank == 0  # the process that prints progress and writes files
        self.amp_dtype = None
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            if amp:
                self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp_dtype == torch.float16)  # bf16 needs none

    def autocast(self):
        return torch.autocast(self.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def inputs(self, images, full_batch=True):
        """A batch on the device in the layout the convolutions like."""
        if self.cuda:
            torch.backends.cudnn.benchmark = full_batch  # a ragged last batch would pay a second search
            return images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return images


# ---- images: decode, resize, crop and flip, normalise ----

_OPEN_LOCK = threading.Lock()  # the warning filters are global: decoder threads take turns at changing them


def open_image(path, data=None):
    """PIL's open (the header only) of an image file, or of its bytes `data`, within PIL's pixel limit
    (Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); a larger one is a UserError giving its size."""
    limit = Image.MAX_IMAGE_PIXELS
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # PIL's two-line warning: checked below
        try:
            img = Image.open(path if data is None else io.BytesIO(data))
        except Image.DecompressionBombError as err:  # over twice the limit: PIL states only the pixel count
            found = re.search(r'\((\d+) pixels\)', str(err))
            size = f'{int(found[1]):,} pixels' if found else 'too many pixels'
            img = None
    if img is not None:
        if _within_limit(img.size):
            return img
        img.close()
        size = f'{img.width} x {img.height} = {img.width * img.height:,} pixels'
    raise UserError(f'image {path} is too large to decode: {size}, more than the {limit:,} of PIL\'s '
                    f'Image.MAX_IMAGE_PIXELS (a guard against decompression bombs); shrink it first')


def load_image(path, data=None):
    """Open and fully decode an image as RGB (PIL); an unreadable or oversized file is a UserError naming it. `data`:
    the file's bytes when already in memory (an upload; `path` then only names it)."""
    path = os.fspath(path)
    try:
        with open_image(path, data) as img:
            img.load()  # decode now, inside the try, so a damaged file fails here and not later
            return _to_rgb(img)
    except (UserError, MemoryError):  # MemoryError: no fault of the file (build_cache says what to do)
        raise
    except FileNotFoundError:
        raise UserError(f'image not found: {path}') from None
    except IsADirectoryError:
        raise UserError(f'{path} is a folder, not an image file') from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        if isinstance(err, OSError) and err.errno is not None:  # the OS refused (permissions, I/O)
            raise UserError(f'cannot read image {path}: {err.strerror or err}') from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f'cannot decode image {path}: {reason} (damaged, or not an image)') from None


def _to_rgb(img):
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        # 16-bit / 32-bit greys: rescale to 8 bits instead of clipping everything above 255 to white
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), 'L')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (img.mode == 'P' and 'transparency' in img.info):
        # transparent pixels on white, the background of product photos
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert('RGBA')).convert('RGB')
    # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, P
    return img if img.mode == 'RGB' else img.convert('RGB')


def _jpeg_size(data):
    """(width, height) from a JPEG's frame header (SOFn), or None where none is found: the markers before it only."""
    k = 2  # after the start-of-image marker
    while k + 9 <= len(data) and data[k] == 0xFF:
        marker = data[k + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame; not DHT, JPG, DAC
            height, width = int.from_bytes(data[k + 5:k + 7], 'big'), int.from_bytes(data[k + 7:k + 9], 'big')
            return width, height
        k += 1 if marker == 0xFF else 2 + int.from_bytes(data[k + 2:k + 4], 'big')  # fill byte, or a segment
    return None


def _within_limit(size):
    """Whether a (width, height) is known and within PIL's Image.MAX_IMAGE_PIXELS."""
    limit = Image.MAX_IMAGE_PIXELS
    return size is not None and (limit is None or size[0] * size[1] <= limit)


def load_image_uint8(path, data=None):
    """A fully decoded image as uint8 [3, H, W] (a channels-last view of [H, W, 3] pixels); `data` as load_image's."""
    path = os.fspath(path)
    try:  # plain JPEGs: torchvision's libjpeg-turbo, whole file at once, ~25 % faster than PIL, same pixels
        if data is None:
            with open(path, 'rb') as f:
                data = f.read()
        # JPEG, not an Adobe CMYK one, within PIL's pixel limit (a larger one: load_image says so)
        if data[:3] == b'\xff\xd8\xff' and b'Adobe' not in data[:4096] and _within_limit(_jpeg_size(data)):
            with warnings.catch_warnings(action='ignore', category=DeprecationWarning):  # 0.29: "torchcodec"
                from torchvision.io import ImageReadMode, decode_jpeg
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, OSError, ValueError):
        pass  # a later torchvision without it, a file it refuses, or one the OS refuses: PIL names the error
    return torch.from_numpy(np.array(load_image(path, data))).permute(2, 0, 1)


def resize_uint8(x, side):
    """uint8 [..., 3, H, W] -> [..., 3, side, side]: bilinear, antialiased (PIL's BILINEAR to +-1 grey level)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    batch = x if x.dim() == 4 else x[None]
    out = torch.nn.functional.interpolate(batch, size=(side, side), mode='bilinear', antialias=True)
    return out if x.dim() == 4 else out[0]


class Normalize:
    """uint8 [..., 3, H, W] -> float32 as (x / 255 - mean) / std in one fused pass, on x's device."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f'mean and std need 3 values each, std > 0; got {mean}, {std}')
        mean64, std64 = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (self.mean, self.std))
        self.scale, self.shift = (1.0 / (255.0 * std64)).float(), (-mean64 / std64).float()  # [3, 1, 1] each

    def __call__(self, x):
        if self.shift.device != x.device:  # moved once, not copied to the GPU every batch
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
        # a channels-last batch (Runtime.inputs on CUDA) stays channels-last for the convolutions; anything
        # else, e.g. the permuted view of one decoded image, becomes contiguous
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=layout)
        return torch.addcmul(self.shift, x, self.scale, out=out)  # shift + x * scale


def crop_flip_draws(resize_side, side, generator=None):
    """One training image's random crop offsets and flip, drawn in torchvision's order (RandomCrop's
    i, j, then RandomHorizontalFlip) -> (i, j, flip)."""
    room = resize_side - side + 1
    i = int(torch.randint(0, room, (1,), generator=generator)) if room > 1 else 0
    j = int(torch.randint(0, room, (1,), generator=generator)) if room > 1 else 0
    return i, j, bool(torch.rand(1, generator=generator) < 0.5)


def crop_flip_batch(images, batch, side):
    """The training crops and flips, each drawn from its image's seed: images uint8 [N, 3, r, r] (the cache, or
    a loaded batch), batch [(index into images, seed)] * B -> uint8 [B, 3, side, side] on the images' device."""
    draws = [crop_flip_draws(images.shape[-1], side, torch.Generator().manual_seed(seed)) for _, seed in batch]
    if images.is_cuda:
        return gather_crops(images, [k for k, _ in batch], draws, side)
    # on a CPU slices and copies are faster: 128 crops of 224 px in 0.01 s, the gather 0.05 s (2 cores)
    crops = [images[k, :, i:i + side, j:j + side] for (k, _), (i, j, _) in zip(batch, draws)]
    return torch.stack([crop.flip(-1) if flip else crop for crop, (_, _, flip) in zip(crops, draws)])


def gather_crops(images, indices, draws, side):
    """crop_flip_batch's crops in one gather kernel (a GPU then launches one kernel, not B copies)."""
    device = images.device
    i, j, flip = torch.tensor(draws, device=device).unbind(1)                        # [B] each
    steps = torch.arange(side, device=device)
    rows, cols = i[:, None] + steps, j[:, None] + steps                               # [B, s]
    cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)                      # reversed where flipped
    index = torch.tensor(indices, device=device)
    return images[index[:, None, None, None], torch.arange(3, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def eval_input(path, side, mean, std, data=None):
    """An image file (or its bytes `data`) as train.py evaluates it: the full decode resized to side x side,
    normalised -> float [3, s, s]."""
    return Normalize(mean, std)(resize_uint8(load_image_uint8(path, data), side))


class ImageListDataset(torch.utils.data.Dataset):
    """Images of a data-dict split {label: [paths]}; targets index the sorted labels. Item `index` ->
    (uint8 [3, side, side]: the full decode resized, as the cache holds it, target)."""

    def __init__(self, data_dict_split, side):
        self.classes = sorted(data_dict_split)
        self.images, self.labels, self.targets = [], [], []
        for label, paths in data_dict_split.items():
            self.images += [os.fspath(p) for p in paths]
            self.labels += [label] * len(paths)
            self.targets += [self.classes.index(label)] * len(paths)
        self.side = side

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return resize_uint8(load_image_uint8(self.images[index]), self.side), self.targets[index]


def _cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def default_num_workers():
    """Loader workers per process: its CPUs shared among torchrun's processes on this node, at most 8."""
    per_process = _cpus() // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    return 0 if per_process <= 1 else min(8, per_process)  # more rarely helps and costs memory


def worker_error_message(err):
    """The one-line message of a UserError raised in a DataLoader worker (re-raised in the main process
    with the worker's traceback glued in front)."""
    text = str(err).strip()
    return text.splitlines()[-1].split('UserError: ', 1)[-1] if 'DataLoader worker' in text else text


# ---- decode-once image cache ----
# Decoding a JPEG costs far more than a training step's share of the GPU, and the inputs are fixed-size
# resizes of fixed files: they are decoded once into uint8 [N, 3, side, side], on the GPU within
# CACHE_GPU_SHARE of its free memory, else in RAM within CACHE_RAM_SHARE of the available memory.
# Under torchrun one process per node decodes into /dev/shm and the others map the same pages.
CACHE_GPU_SHARE, CACHE_RAM_SHARE = 0.4, 0.4
CACHE_CHOICES = ('auto', 'gpu', 'ram', 'off')


def available_ram():
    """Bytes of memory available for new allocations (MemAvailable), or None when unknown."""
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None


def cache_place(choice, nbytes, device):
    """Where a cache of `nbytes` goes for --cache `choice`: 'gpu', 'ram' or None (the loader)."""
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else 0
    ram = available_ram()
    fits = {'gpu': nbytes <= CACHE_GPU_SHARE * gpu_free,
            'ram': ram is None or nbytes <= CACHE_RAM_SHARE * ram}
    if choice == 'auto':
        return 'gpu' if fits['gpu'] else 'ram' if fits['ram'] else None
    if choice in fits and not fits[choice]:
        where = f'{CACHE_GPU_SHARE:.0%} of the free memory of {device}' if choice == 'gpu' else \
            f'{CACHE_RAM_SHARE:.0%} of the available RAM'
        raise UserError(f'--cache {choice}: the decoded images take {nbytes / 2 ** 30:.2f} GiB, more than '
                        f'{where}; use --cache auto or off, or a smaller --image_size')
    return None if choice == 'off' else choice


def _decode_into(out, dataset, show_bar):
    """The dataset's image k into out[k], a thread per core (decoders and resize release the GIL)."""
    from tqdm import tqdm

    def one(k):
        out[k] = dataset[k][0]

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over images, not inside each resize
    try:
        with concurrent.futures.ThreadPoolExecutor(_cpus()) as pool:
            list(tqdm(pool.map(one, range(len(out))), total=len(out), unit='img', disable=not show_bar,
                      desc=f'Decoding {len(out)} images once', leave=False))
    finally:
        torch.set_num_threads(previous)


def _out_of_memory(err):
    """Whether an exception says that memory ran out: Python's, torch's CUDA one, or its CPU allocator's."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or \
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def build_cache(dataset, place, device, key, show_bar=True):
    """uint8 [N, 3, side, side]: an ImageListDataset's images, decoded once per node, on `device` for place
    'gpu', in host memory for 'ram'. `key` names the /dev/shm file under torchrun. Running out of memory
    on the way (a ulimit, other processes) is a UserError that offers the ways around it."""
    try:
        return _build_cache(dataset, place, device, key, show_bar)
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        nbytes = len(dataset) * 3 * dataset.side ** 2
        where = device if place == 'gpu' else 'RAM'
        raise UserError(f'out of memory while decoding {len(dataset)} images of {dataset.side}x{dataset.side} '
                        f'into the cache ({nbytes / 2 ** 30:.2f} GiB in {where}): use --cache off, or a smaller '
                        f'--image_size') from None


def _build_cache(dataset, place, device, key, show_bar):
    shape = (len(dataset), 3, dataset.side, dataset.side)
    if not is_distributed():
        host = torch.empty(shape, dtype=torch.uint8)
        _decode_into(host, dataset, show_bar)
    else:
        shm = os.path.join('/dev/shm', f'clf-cache-{key}-{os.environ.get("TORCHELASTIC_RUN_ID", "run")}.u8')
        local_main = int(os.environ.get('LOCAL_RANK', '0')) == 0
        try:
            if local_main:
                host = torch.from_file(shm, shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)
                _decode_into(host, dataset, show_bar)
            dist.barrier()  # decoded: the node's other processes map the same pages
            if not local_main:
                host = torch.from_file(shm, shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)
            dist.barrier()  # everyone has it mapped: the name can go, the pages stay while mapped
        finally:
            if local_main and os.path.exists(shm):
                os.remove(shm)
    return host.to(device) if place == 'gpu' else host


# ---- loss ----

def class_balanced_weights(targets, num_classes):
    """Per-class weights w_c ∝ N / n_c summing to `num_classes` -> float [num_classes]: every class
    weighs about equally in the loss; a class with no sample gets 0 (it is never a target)."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    counts = torch.bincount(targets, minlength=num_classes)[:num_classes].double()
    weights = torch.where(counts > 0, targets.numel() / counts.clamp(min=1), torch.zeros_like(counts))
    return (weights * num_classes / weights.sum()).float()


class LabelSmoothingCrossEntropy(torch.nn.Module):
    """Cross-entropy of logits / temperature against a smoothed target ((1 - smoothing) on the true
    class, smoothing spread over all); each sample's loss times its class `weight`, then the batch mean."""

    def __init__(self, smoothing=0.1, temperature=1.0, weight=None):
        super().__init__()
        self.smoothing, self.temperature = smoothing, temperature
        self.register_buffer('weight', None if weight is None else torch.as_tensor(weight, dtype=torch.float))

    def forward(self, logits, target):
        # logits [B, C] (any float dtype; computed in float32), target [B] class indices
        log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)  # [B]
        uniform = -log_probs.mean(dim=-1)  # [B]: cross-entropy with the uniform distribution
        loss = (1.0 - self.smoothing) * nll + self.smoothing * uniform
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


# ---- training curves ----

def plot_curves(statistics, recalls, title):
    """Loss, accuracy, test R@K, MAP@R and R-Precision per epoch (and validation R@1 where the rows hold it)
    -> PNG bytes."""
    from matplotlib.figure import Figure  # not pyplot: no display, no global backend

    epochs = [row['epoch'] for row in statistics]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [row['train_loss'] for row in statistics], marker='o')
    axes[1].plot(epochs, [row['train_accuracy'] for row in statistics], marker='o')
    for k in recalls:
        axes[2].plot(epochs, [row[f'test_recall@{k}'] for row in statistics], marker='o', label=f'R@{k}')
    for column, label in (('test_map@r', 'MAP@R'), ('test_r_precision', 'R-Precision'), ('val_recall@1', 'val R@1')):
        if all(column in row for row in statistics):  # R-Precision: not in rows of a checkpoint from before it
            axes[2].plot(epochs, [row[column] for row in statistics], marker='s', linestyle='--', label=label)
    # beside the panel, not on it: inside, it covered the R@1 markers and the MAP@R line
    axes[2].legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    retrieval = 'test and validation retrieval (%)' if 'val_recall@1' in statistics[0] else 'test retrieval (%)'
    for ax, name in zip(axes, ('train loss', 'train accuracy (%)', retrieval)):
        ax.set(title=name, xlabel='epoch')
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.91, bottom=0.13, top=0.85, wspace=0.2)  # tight_layout is slow
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100, metadata={'Software': None})
    return buffer.getvalue()

