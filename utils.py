"""Shared pieces of CLF: errors and safe files, distributed helpers, image lists and transforms,
the training loss and the retrieval metrics."""
import errno
import io
import math
import os
import pickle
import signal
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image


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


# Test-only fault injection. CLF_FAULT holds comma-separated faults; the file-writing ones act here,
# the training ones in train.py:
#   kill-write:NAME:N   SIGKILL this process halfway through its N-th atomic write of a file whose
#                       name contains NAME (the temporary file is half written, the target untouched)
#   fail-write:NAME:N   that write fails as if the disk were full
#   nan:E:S, kill:E:S, interrupt:E:S   (train.py) the loss of step S of epoch E is NaN / SIGKILL /
#                       SIGINT after that step
# Unset in normal use; nothing here changes behaviour when it is unset.
FAULT_ENV = 'CLF_FAULT'
_fault_write_counts = {}  # (CLF_FAULT value, kind, NAME) -> matching writes so far in this process


def faults(kind):
    """The argument lists of the CLF_FAULT entries of `kind`, e.g. faults('nan') -> [['2', '1']]."""
    found = []
    for entry in os.environ.get(FAULT_ENV, '').split(','):
        parts = entry.strip().split(':')
        if parts[0] == kind:
            found.append(parts[1:])
    return found


def _write_fault(path):
    """'kill' or 'fail' when a CLF_FAULT write fault targets this write of `path`, else None."""
    for kind in ('kill-write', 'fail-write'):
        for name, n in faults(kind):
            if name in os.path.basename(path):
                key = (os.environ.get(FAULT_ENV), kind, name)  # a new CLF_FAULT value counts afresh
                _fault_write_counts[key] = _fault_write_counts.get(key, 0) + 1
                if _fault_write_counts[key] == int(n):
                    return kind.split('-')[0]
    return None


def _file_mode():
    """Permissions a plain open() would give a new file (mkstemp's are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(data, path):
    """Write bytes to `path` so that readers see either the old file or the whole new one, never a part."""
    atomic_write_group([(data, path)])


def atomic_write_group(items):
    """Write several [(bytes, path)] files that belong together (a model and its feature database):
    every temporary file is written and synced first, then all are renamed in one quick pass, so a
    crash while writing leaves all the old files, never a new one beside an old one."""
    pending = []  # (temporary file, path), in the order given
    path = None
    try:
        for data, path in items:
            path = os.fspath(path)
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fault = _write_fault(path)
            fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
            pending.append((tmp, path))
            with os.fdopen(fd, 'wb') as f:
                if fault == 'fail':
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if fault == 'kill':  # die with a half-written temporary file, as a pre-emption would
                    f.write(data[:len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
        for folder in {os.path.dirname(os.path.abspath(os.fspath(p))) for _, p in items}:
            try:  # make the renames durable; not every filesystem allows fsync on a folder
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
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj, path):
    """torch.save `obj` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write_group([(_torch_bytes(obj), path)])


def atomic_save_group(items):
    """torch.save several [(obj, path)] together: see atomic_write_group."""
    atomic_write_group([(_torch_bytes(obj), path) for obj, path in items])


def safe_load(path, what='file'):
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a damaged file can fail anywhere inside the unpickler (KeyError, ...)
        text = str(err)
        # 'Unsupported operand' = a byte that is no pickle opcode: a damaged or non-PyTorch file, not code
        if (isinstance(err, pickle.UnpicklingError) and 'Weights only load failed' in text
                and 'nsupported operand' not in text):
            # torch names the offending global, e.g. 'Trying to load unsupported GLOBAL posix.system ...'
            culprit = next((line.strip() for line in text.splitlines() if 'nsupported' in line), '')
            raise UserError(f'refusing to load {path}: it is not a plain {what} (it holds objects other '
                            f'than tensors and plain containers, which could run code on load; nothing '
                            f'from it was run){": " + culprit[:200] if culprit else ""}') from None
        if isinstance(err, OSError):
            raise UserError(f'cannot read {what} {path}: {err.strerror or err}') from None
        # a KeyError's text is just the stray byte it met (e.g. '101'): no help to anyone; of torch's
        # zip errors the first sentence says it, the rest is advice about other causes
        detail = '' if isinstance(err, KeyError) or not text.strip() else \
            f' ({text.splitlines()[0].split(". ")[0][:200]})'
        raise UserError(f'cannot read {what} {path}: the file is damaged, truncated or not a PyTorch '
                        f'file{detail}') from None



# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------
# One process per device under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK); without it every
# helper below is a no-op, so the same code runs on CPU, one GPU and many.


def resolve_device(device_arg=None):
    """The --device flag as a torch.device (default CUDA when available); a bad name is a UserError."""
    if device_arg is None:
        device_arg = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(device_arg)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device '{device_arg}': expected cpu, cuda or cuda:N") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {device_arg}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ('cpu', 'cuda'):
        raise UserError(f"unsupported --device '{device_arg}': expected cpu, cuda or cuda:N")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f'--device {device_arg}: only {torch.cuda.device_count()} CUDA device(s) here')
    return device


def init_distributed(device_arg=None):
    """Pick the device (`device_arg`, default CUDA when available) and join torchrun's process group.

    Returns the torch.device this process works on: `cuda:LOCAL_RANK` under torchrun with CUDA.
    """
    import datetime
    import torch.distributed as dist

    device = resolve_device(device_arg)
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or 'RANK' not in os.environ:
        if device.type == 'cuda' and device.index is not None:
            # make it the current device: bf16 support, pinned memory and RNG calls then refer to it,
            # and no CUDA context is opened on GPU 0 as well
            torch.cuda.set_device(device)
        return device
    if not dist.is_initialized():
        if device.type == 'cuda':
            local_rank = int(os.environ.get('LOCAL_RANK', '0'))
            if local_rank >= torch.cuda.device_count():
                raise UserError(f'LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA '
                                f'device(s): --nproc_per_node must not exceed the GPUs per node')
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        # rank 0 evaluates and writes files while the others wait: allow a long quiet spell
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                timeout=datetime.timedelta(minutes=60))
    elif device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    return device


def is_distributed():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def get_rank():
    import torch.distributed as dist
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    import torch.distributed as dist
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    """True on rank 0 (or without torchrun): the process that prints progress and writes files."""
    return get_rank() == 0


def barrier():
    import torch.distributed as dist
    if is_distributed():
        dist.barrier()


def cleanup_distributed():
    import torch.distributed as dist
    if is_distributed():
        dist.destroy_process_group()


def shard_range(n, rank=None, world_size=None):
    """Contiguous block of range(n) for `rank`; blocks in rank order concatenate back to range(n)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    per = -(-n // world_size)  # ceil
    return range(min(rank * per, n), min((rank + 1) * per, n))


def all_gather_rows(tensor):
    """Concatenate every rank's [n_r, ...] tensor along dim 0 in rank order (n_r may differ).

    all_gather needs equal shapes, so each shard is padded to the largest n_r and trimmed after.
    """
    import torch.distributed as dist
    if not is_distributed():
        return tensor
    world_size = get_world_size()
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def broadcast_object(obj, src=0):
    """Rank `src`'s picklable `obj` on every rank (e.g. a checkpoint only rank 0 can read)."""
    import torch.distributed as dist
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def broadcast_buffers(module, src=0):
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank. DDP does this only at
    the start of the next training forward, so without it each rank would evaluate its shard with
    its own statistics, not those of the model rank 0 saves."""
    import torch.distributed as dist
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (float64, so counts stay exact)."""
    import torch.distributed as dist
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# images and transforms
# ----------------------------------------------------------------------------------------------


def load_image(path, draft_size=None):
    """Open and fully decode an image as RGB. `draft_size=(w, h)` lets a JPEG decode at 1/2, 1/4
    or 1/8 scale, never below that size (the DCT does the downscaling almost for free)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == 'JPEG':
                img.draft('RGB', (int(draft_size[0]), int(draft_size[1])))
            img.load()  # decode now, inside the try, so a damaged file fails here and not later
            return _to_rgb(img)
    except FileNotFoundError:
        raise UserError(f'image not found: {path}') from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        if isinstance(err, OSError) and err.errno is not None:  # the OS refused (a folder, permissions, I/O)
            raise UserError(f'cannot read image {path}: {err.strerror or err}') from None
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f'cannot decode image {path}: {reason} (the file is damaged, not an image, '
                        f'or changed after preprocessing; replace it or re-run data_utils.py)') from None


def _to_rgb(img):
    """Any PIL mode -> RGB. Transparent pixels are composited on white (the background of
    product photos), so RGBA, LA and palette images with transparency agree with their look."""
    if img.mode == 'RGB':
        return img
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        # 16-bit / 32-bit greys: rescale to 8 bits instead of clipping everything above 255 to white
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')  # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, P


def load_image_uint8(path, draft_size=None):
    """Like load_image, but -> uint8 tensor [3, H, W] (a channels-last view of [H, W, 3] pixels).
    JPEGs that draft mode cannot shrink by 2 or more are decoded by torchvision (libjpeg-turbo
    on the whole file at once, no PIL copies: ~25 % faster than PIL, same pixels); anything else,
    and any file torchvision refuses, goes through PIL, which decides and names the error."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            plain_jpeg = img.format == 'JPEG' and img.mode in ('RGB', 'L')  # YCbCr or grey, not CMYK
            if plain_jpeg and draft_size is not None and \
                    min(img.size[0] // int(draft_size[0]), img.size[1] // int(draft_size[1])) >= 2:
                img.draft('RGB', (int(draft_size[0]), int(draft_size[1])))
                img.load()
                return _image_to_uint8(_to_rgb(img))
    except Exception:  # noqa: BLE001 - load_image below reports it properly
        plain_jpeg = False
    if plain_jpeg:
        try:
            with open(path, 'rb') as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            with warnings.catch_warnings():  # torchvision 0.29 announces its decoders move to torchcodec
                warnings.simplefilter('ignore', DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_jpeg
                return decode_jpeg(data, mode=ImageReadMode.RGB)  # [3, H, W], strides (1, 3W, 3)
        except (ImportError, RuntimeError, OSError, ValueError):
            pass  # a later torchvision without it, or a file it refuses: PIL below
    return _image_to_uint8(load_image(path, draft_size))


def _image_to_uint8(img):
    """PIL RGB (or a uint8 tensor [3, H, W]) -> uint8 tensor [3, H, W] (a channels-last view of the
    [H, W, 3] pixels: no transpose copy, and torch's uint8 resize is fastest on that layout)."""
    if isinstance(img, torch.Tensor):
        return img
    if img.mode != 'RGB':
        img = _to_rgb(img)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _resize_uint8(x, size):
    """[3, H, W] uint8 -> [3, h, w] uint8, bilinear with antialiasing (matches PIL's BILINEAR to +-1)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x[None], size=size, mode='bilinear', antialias=True,
                                           align_corners=False)[0]


class _Normalize:
    """uint8 [3, H, W] -> float32 [3, H, W] as (x / 255 - mean) / std in one fused pass."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f'mean and std need 3 values each, std > 0; got {mean}, {std}')
        mean64 = torch.tensor(self.mean, dtype=torch.float64).view(3, 1, 1)
        std64 = torch.tensor(self.std, dtype=torch.float64).view(3, 1, 1)
        self.scale = (1.0 / (255.0 * std64)).float()  # [3, 1, 1]
        self.shift = (-mean64 / std64).float()        # [3, 1, 1]

    def __call__(self, x):
        out = torch.empty(x.shape, dtype=torch.float32)  # contiguous whatever the layout of x
        return torch.addcmul(self.shift, x, self.scale, out=out)  # shift + x * scale: [3, H, W]


class TrainTransform:
    """Resize((r, r)) -> RandomCrop(s) -> RandomHorizontalFlip -> ToTensor -> Normalize, r = round(8s/7),
    computed on uint8 with torch's fast resize and one fused normalisation. Random draws come from
    torch's RNG in the same order as torchvision's, so a seed gives the same crops and flips."""

    def __init__(self, image_size, mean, std):
        self.image_size = int(image_size)
        self.resize_size = int(round(self.image_size * 8 / 7))
        self.draft_size = (self.resize_size, self.resize_size)  # read by ImageListDataset
        self.accepts_uint8_tensor = True
        self.normalize = _Normalize(mean, std)

    def __call__(self, img):
        s, r = self.image_size, self.resize_size
        x = _resize_uint8(_image_to_uint8(img), (r, r))  # [3, r, r]
        i = torch.randint(0, r - s + 1, size=(1,)).item() if r > s else 0
        j = torch.randint(0, r - s + 1, size=(1,)).item() if r > s else 0
        x = x[:, i:i + s, j:j + s]  # [3, s, s] view
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        return self.normalize(x)

    def __repr__(self):
        return (f'TrainTransform(resize=({self.resize_size}, {self.resize_size}), crop={self.image_size}, '
                f'hflip=0.5, mean={self.normalize.mean}, std={self.normalize.std})')


class TestTransform:
    """Resize((s, s)) -> ToTensor -> Normalize, on uint8 with one fused normalisation."""

    def __init__(self, image_size, mean, std):
        self.image_size = int(image_size)
        self.draft_size = None  # full decode: database and query embeddings must see the same pixels
        self.accepts_uint8_tensor = True
        self.normalize = _Normalize(mean, std)

    def __call__(self, img):
        s = self.image_size
        return self.normalize(_resize_uint8(_image_to_uint8(img), (s, s)))

    def __repr__(self):
        return (f'TestTransform(resize=({self.image_size}, {self.image_size}), '
                f'mean={self.normalize.mean}, std={self.normalize.std})')


def train_transform(image_size, mean, std):
    """The training transform (random crop of a round(8s/7) resize, flip, normalise) -> [3, s, s]."""
    return TrainTransform(image_size, mean, std)


def test_transform(image_size, mean, std):
    """The evaluation transform (resize to s x s, normalise) -> [3, s, s]."""
    return TestTransform(image_size, mean, std)


# not tests, whatever their names: pytest must not collect them where a test file imports them
test_transform.__test__ = False
TestTransform.__test__ = False


def original_train_transform(image_size, mean, std):
    """The original's torchvision pipeline, kept for the speed and statistics comparison."""
    from torchvision import transforms
    r = int(round(image_size * 8 / 7))
    return transforms.Compose([transforms.Resize((r, r)), transforms.RandomCrop(image_size),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def original_test_transform(image_size, mean, std):
    """The original's torchvision evaluation pipeline."""
    from torchvision import transforms
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


class ImageListDataset(torch.utils.data.Dataset):
    """Images of a data-dict split {label: [paths]}; targets index the sorted labels."""

    def __init__(self, data_dict_split, transform):
        self.classes = sorted(data_dict_split)
        self.class_to_idx = {label: k for k, label in enumerate(self.classes)}
        self.images, self.labels, self.targets = [], [], []
        for label, paths in data_dict_split.items():
            self.images += [os.fspath(p) for p in paths]
            self.labels += [label] * len(paths)
            self.targets += [self.class_to_idx[label]] * len(paths)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        draft_size = getattr(self.transform, 'draft_size', None)
        if getattr(self.transform, 'accepts_uint8_tensor', False):  # the project's transforms
            img = load_image_uint8(self.images[index], draft_size)
        else:  # any other transform gets what torchvision transforms expect: a PIL image
            img = load_image(self.images[index], draft_size)
        return self.transform(img), self.targets[index]


def default_num_workers():
    """Loader workers per process: the CPUs this process may use, shared among the processes
    torchrun started on this node, at most 8 (more rarely helps and costs memory)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    per_process = cpus // local_processes
    return 0 if per_process <= 1 else min(8, per_process)


def loader_kwargs(num_workers, device):
    """DataLoader settings: pinned memory for CUDA copies, workers kept alive between epochs."""
    device = torch.device(device)
    kwargs = {'num_workers': num_workers, 'pin_memory': device.type == 'cuda'}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return kwargs


def worker_error_message(err):
    """The one-line message of a UserError (or its text) raised inside a DataLoader worker (the
    loader re-raises it in the main process with the worker's traceback glued in front)."""
    text = str(err).strip()
    if 'DataLoader worker' not in text:
        return text
    last = text.splitlines()[-1]
    return last.split('UserError: ', 1)[-1]


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------


def class_balanced_weights(targets, num_classes):
    """Per-class weights w_c ∝ N / n_c, scaled so they sum to `num_classes` -> FloatTensor[num_classes].

    Rare classes weigh more, so every class contributes about equally to the loss. A class with no
    sample gets weight 0 (it never appears as a target).
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    counts = torch.bincount(targets, minlength=num_classes)[:num_classes].double()
    weights = torch.where(counts > 0, targets.numel() / counts.clamp(min=1), torch.zeros_like(counts))
    return (weights * num_classes / weights.sum()).float()


class LabelSmoothingCrossEntropy(torch.nn.Module):
    """Cross-entropy against a smoothed target: (1 - smoothing) on the true class + smoothing spread
    uniformly over all classes; logits divided by `temperature` first.

    With `weight` (FloatTensor[num_classes]) each sample's loss is multiplied by the weight of its
    class; the result is the mean over the batch of these weighted per-sample losses.
    """

    def __init__(self, smoothing=0.1, temperature=1.0, weight=None):
        super().__init__()
        self.smoothing = smoothing
        self.temperature = temperature
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


# ----------------------------------------------------------------------------------------------
# retrieval metrics
# ----------------------------------------------------------------------------------------------


def _label_ids(query_labels, gallery_labels):
    """Map labels (list of str/int, or a tensor) to int ids shared by queries and gallery: [Nq], [Ng]."""
    def as_list(labels):
        return labels.tolist() if torch.is_tensor(labels) else list(labels)
    query, gallery = as_list(query_labels), as_list(gallery_labels)
    ids = {label: i for i, label in enumerate(dict.fromkeys(query + gallery))}
    return (torch.tensor([ids[label] for label in query], dtype=torch.long),
            torch.tensor([ids[label] for label in gallery], dtype=torch.long), len(ids))


def _similarities(queries, gallery):
    """Similarities of a query chunk with gallery items, [c, Ng]. On CPU NumPy's BLAS does the product:
    measured 1.5x faster than torch.mm for [1024, 1536] x [1536, 60502] float32 on 2 cores."""
    if queries.is_cuda:
        return queries @ gallery.T
    return torch.from_numpy(np.dot(queries.numpy(), gallery.numpy().T))


def _count_greater(sims, thresholds):
    """Per row, how many entries of sims [c, W] are strictly greater than thresholds [c]
    (NumPy on CPU: measured ~9x faster than torch's sum of a bool mask)."""
    if sims.is_cuda:
        return (sims > thresholds[:, None]).sum(1)
    return torch.from_numpy(np.count_nonzero(sims.numpy() > thresholds.numpy()[:, None], axis=1))


def _budget(device):
    """Bytes one chunk of work may use: a fixed 256 MiB on CPU, a quarter of the free memory on CUDA."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0] // 4
    return 256 * 2 ** 20


def _query_chunk(num_gallery, max_class, device):
    """Queries per chunk against a gallery: a similarity row (4 B) and a mask (1 B) per gallery item,
    about 64 B per class member."""
    return max(1, min(_budget(device) // (5 * num_gallery + 64 * max_class + 64), 4096))


def _strip_rows(num, device):
    """Rows per similarity strip of the symmetric self-evaluation: per item a similarity (4 B), a mask
    (1 B), and room for a transposed copy in the dense path (4 B)."""
    return max(1, min(_budget(device) // (10 * num), 4096))


def _merge_top(top, values):
    """Best `w` of each row of top [c, w] (descending) and values [c, t]: [c, w] descending."""
    return torch.cat([top, values], 1).topk(top.shape[1], dim=1).values


def _precision_sums(same, top, r):
    """Sum over the R best positions of precision@i at same-class items i: [c] float64.
    same [c, w]: same-class similarities, descending; top [c, t]: best other-class similarities,
    descending, t >= R; r [c]: R. The m-th same-class item sits at position m + #{others > it}."""
    width = same.shape[1]
    ahead = top.shape[1] - torch.searchsorted(top.flip(1).contiguous(), same.contiguous(), right=True)
    m = torch.arange(1, width + 1, device=same.device, dtype=torch.float64)
    position = m + ahead                                              # [c, w]
    counted = (m <= r[:, None]) & (position <= r[:, None])
    return torch.where(counted, m / position, 0).sum(1)


def _gallery_stats(queries, query_ids, gallery, gallery_ids, num_classes, self_mode):
    """Queries against a gallery (or against each other, self excluded), one query chunk at a time.
    Returns first_hit [Nq] (other-class items strictly more similar than the best same-class one),
    r [Nq] (same-class items in the gallery) and precision_sum [Nq] (see _precision_sums)."""
    device, num_query = queries.device, len(queries)
    # gallery members of every class: order[starts[k] : starts[k] + counts[k]]
    order = torch.argsort(gallery_ids, stable=True)
    counts = torch.bincount(gallery_ids, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    chunk = _query_chunk(len(gallery), int(counts.max()), device)
    first_hit = torch.empty(num_query, dtype=torch.long)
    num_relevant = torch.empty(num_query, dtype=torch.long)
    precision_sum = torch.zeros(num_query, dtype=torch.float64)
    for begin in range(0, num_query, chunk):
        end = min(begin + chunk, num_query)
        ids = query_ids[begin:end]
        size = counts[ids]                                            # [c] class size in the gallery
        slot = torch.arange(max(int(size.max()), 1))  # width >= 1 even when no query's class is there
        in_class = slot[None, :] < size[:, None]                      # [c, w]
        members = order[torch.where(in_class, starts[ids][:, None] + slot, 0)]  # [c, w] gallery indices
        relevant = in_class
        if self_mode:  # the query itself is never a result
            relevant = in_class & (members != torch.arange(begin, end)[:, None])
        r = relevant.sum(1)
        num_relevant[begin:end] = r

        sims = _similarities(queries[begin:end], gallery)             # [c, Ng]
        members, in_class, relevant = members.to(device), in_class.to(device), relevant.to(device)
        same = sims.gather(1, members).masked_fill(~relevant, -math.inf).sort(dim=1, descending=True).values
        # drop the query's whole class (itself included): sims keeps only other-class items
        rows = torch.arange(end - begin, device=device)[:, None].expand_as(members)
        sims[rows[in_class], members[in_class]] = -math.inf
        first_hit[begin:end] = _count_greater(sims, same[:, 0]).cpu()
        r_max = int(r.max())
        if r_max > 0:  # positions beyond R do not count, so the R best other-class items suffice
            top = sims.topk(min(r_max, sims.shape[1]), dim=1).values
            precision_sum[begin:end] = _precision_sums(same[:, :r_max], top, r.to(device)).cpu()
    return first_hit, num_relevant, precision_sum


def _cells_above(sims, thresholds, cap):
    """Cells of sims [q, W] (may be a transposed view) strictly above their row's threshold [q], as
    (row, column) index tensors grouped by row; None when there are more than `cap` of them."""
    if sims.is_cuda:
        mask = sims > thresholds[:, None]
        return None if int(mask.sum()) > cap else mask.nonzero(as_tuple=True)
    mask = np.greater(sims.numpy(), thresholds.numpy()[:, None], order='C')  # [q, W] bool
    flat = mask.reshape(-1)
    if np.count_nonzero(flat) > cap:
        return None
    # candidates are sparse: find the non-zero 8-byte words first, then the cells inside them
    whole = flat.size // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    cells = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    cells = np.concatenate([cells[flat[cells]], whole + np.flatnonzero(flat[whole:])])
    return tuple(torch.from_numpy(v) for v in np.divmod(cells, mask.shape[1]))


class _SelfStats:
    """Running per-query statistics of the symmetric self-evaluation, in class-sorted order:
    same [N, w] same-class similarities (descending), first_hit [N], top [N, w] best other-class."""

    def __init__(self, same):
        self.same = same
        r = (same > -math.inf).sum(1)
        # +inf for a query without same-class items: nothing counts for it
        self.best = same[:, 0].masked_fill(r == 0, math.inf)
        # an other-class item matters for MAP@R only if it beats the R-th same-class item
        self.weakest = same.gather(1, (r - 1).clamp(min=0)[:, None])[:, 0].masked_fill(r == 0, math.inf)
        self.first_hit = torch.zeros(len(same), dtype=torch.long, device=same.device)
        self.top = torch.full_like(same, -math.inf)

    def update(self, sims, queries):
        """Add other-class similarities sims [q, W] (rows: the queries, a slice) to the statistics."""
        top, best = self.top[queries], self.best[queries]               # [q, w], [q]
        width = top.shape[1]
        # only cells above the best same-class item (first hit) or above both the weakest same-class
        # item and the current w-th best other (MAP@R) matter; after the first strips they are few
        low = torch.maximum(self.weakest[queries], top[:, -1])
        # beyond ~1 candidate in 32 cells, a dense pass is cheaper than gathering candidates
        found = _cells_above(sims, torch.minimum(best, low), cap=max(top.numel(), sims.numel() // 32))
        if found is None:
            self.first_hit[queries] += _count_greater(sims, best).to(best.device)
            self.top[queries] = _merge_top(top, sims.topk(min(width, sims.shape[1]), dim=1).values)
            return
        row, col = (v.to(sims.device) for v in found)
        values = sims[row, col]
        self.first_hit[queries] += torch.bincount(row[values > best[row]], minlength=len(top))
        keep = values > low[row]
        row, values = row[keep], values[keep]
        if len(row) == 0:
            return
        # rows are grouped: place each row's candidates side by side, then keep the best `width`
        counts = torch.bincount(row, minlength=len(top))
        rank = torch.arange(len(row), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
        fresh = torch.full((len(top), max(width, int(counts.max()))), -math.inf, device=top.device,
                           dtype=top.dtype)
        fresh[row, rank] = values
        self.top[queries] = _merge_top(top, fresh)


def _self_stats(features, ids, num_classes):
    """Every item against all others, using symmetry: in class-sorted order each block of similarities
    is computed once and serves its rows and (transposed) its columns, halving the matrix products.
    Same returns as _gallery_stats (in class-sorted order)."""
    device, num = features.device, len(features)
    perm = torch.argsort(ids, stable=True)
    ids = ids[perm].to(device)
    x = features[perm.to(device)]                                     # [N, D] copy in class order
    counts = torch.bincount(ids, minlength=num_classes)
    width = max(int(counts.max()) - 1, 1)                             # most same-class items of a query
    class_ends = torch.cumsum(counts[counts > 0], 0)
    # chunk boundaries fall between classes, so every same-class pair lies in a diagonal block
    chunk = _strip_rows(num, device)
    targets = torch.tensor(list(range(chunk, num, chunk)), dtype=torch.long, device=device)
    bounds = [0] + torch.unique(class_ends[torch.searchsorted(class_ends, targets)]).tolist()
    if bounds[-1] != num:
        bounds.append(num)
    blocks = list(zip(bounds[:-1], bounds[1:]))

    same = torch.full((num, width), -math.inf, device=device, dtype=x.dtype)
    for begin, end in blocks:
        block = _similarities(x[begin:end], x[begin:end])              # [c, c]
        other = ids[begin:end, None] != ids[None, begin:end]
        other.fill_diagonal_(True)                                     # the query itself is no result
        block.masked_fill_(other.to(block.device), -math.inf)
        kept = min(width, end - begin)
        same[begin:end, :kept] = block.topk(kept, dim=1).values
    stats = _SelfStats(same)
    for begin, end in blocks:
        strip = _similarities(x[begin:end], x[begin:])                 # [c, N - begin]
        diagonal = strip[:, :end - begin]
        diagonal.masked_fill_(ids[begin:end, None] == ids[None, begin:end], -math.inf)
        stats.update(strip, slice(begin, end))                         # rows: these queries
        if end < num:
            stats.update(strip[:, end - begin:].T, slice(end, num))    # columns: the later queries
    r = counts[ids] - 1
    return stats.first_hit.cpu(), r.cpu(), _precision_sums(stats.same, stats.top, r).cpu()


@torch.no_grad()
def evaluate(query_features, query_labels, ks, gallery_features=None, gallery_labels=None):
    """Exact R@k for each k in ks and MAP@R, as fractions: {'R@1': ..., 'MAP@R': ...}.

    Without a gallery each query is ranked against all other queries (itself excluded by index).
    An item of another class ranks ahead of a same-class item only if strictly more similar.
    R@k: share of all queries with a same-class item in their top k (none in the gallery: a miss).
    MAP@R (Musgrave et al., 2020): mean over queries with R >= 1 same-class gallery items of
    (1/R) * sum_{i<=R} precision@i * [item i is same-class]; 0 when no query has one.
    Works in chunks, never holding a queries x gallery matrix.
    """
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f'ks must be a non-empty list of positive integers, got {ks}')
    self_mode = gallery_features is None
    if self_mode:
        gallery_features, gallery_labels = query_features, query_labels
    if query_features.dim() != 2 or gallery_features.dim() != 2 or \
            query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(f'features must be [N, D] with the same D, got {tuple(query_features.shape)} '
                         f'and {tuple(gallery_features.shape)}')
    if len(query_features) == 0 or len(gallery_features) == 0 or len(query_labels) != len(query_features) \
            or len(gallery_labels) != len(gallery_features):
        raise ValueError(f'need at least one query, one gallery item and one label per feature vector, got '
                         f'{len(query_features)} queries / {len(query_labels)} labels, '
                         f'{len(gallery_features)} gallery items / {len(gallery_labels)} labels')
    device = query_features.device
    dtype = query_features.dtype if query_features.dtype in (torch.float32, torch.float64) else torch.float32
    queries = query_features.to(dtype).contiguous()
    query_ids, gallery_ids, num_classes = _label_ids(query_labels, gallery_labels)
    if self_mode:
        width = int(torch.bincount(query_ids).max())
        # the symmetric way keeps [N, w] tables per query; a huge class falls back to the plain way
        if 48 * len(queries) * width <= _budget(device):
            first_hit, r, precision_sum = _self_stats(queries, query_ids, num_classes)
        else:
            first_hit, r, precision_sum = _gallery_stats(queries, query_ids, queries, query_ids,
                                                         num_classes, True)
    else:
        gallery = gallery_features.to(device=device, dtype=dtype).contiguous()
        first_hit, r, precision_sum = _gallery_stats(queries, query_ids, gallery, gallery_ids,
                                                     num_classes, False)
    found = r > 0
    result = {f'R@{k}': float((found & (first_hit < k)).sum()) / len(queries) for k in ks}
    result['MAP@R'] = float((precision_sum[found] / r[found]).mean()) if found.any() else 0.0
    return result


def recall(feature_vectors, feature_labels, rank, gallery_vectors=None, gallery_labels=None):
    """The original's interface: list of R@k fractions, one per k in `rank`, in that order."""
    metrics = evaluate(feature_vectors, feature_labels, rank, gallery_vectors, gallery_labels)
    return [metrics[f'R@{k}'] for k in rank]
