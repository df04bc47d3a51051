"""The images train.py trains and evaluates on, batch by batch: the image-list datasets, the decode-once cache (on
the GPU or in RAM, shared by torchrun's processes on a node) or else DataLoader workers, each epoch's order, crops
and flips (the same pixels either way), and the shards each process evaluates."""
import concurrent.futures
import math
import os
import time

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import utils
from cli import UserError, stop_point
from distributed import is_distributed, shard_range
from imaging import Normalize, crop_flip_batch, load_image_uint8, normalization, resize_uint8


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


# Decoding a JPEG costs far more than a training step's share of the GPU, and the inputs are fixed-size
# resizes of fixed files: they are decoded once into uint8 [N, 3, side, side], on the GPU within
# CACHE_GPU_SHARE of its free memory, else in RAM within CACHE_RAM_SHARE of the available memory.
# Under torchrun one process per node decodes into /dev/shm and the others map the same pages.
CACHE_GPU_SHARE, CACHE_RAM_SHARE = 0.4, 0.4
CACHE_CHOICES = ('auto', 'gpu', 'ram', 'off')
MEMINFO = '/proc/meminfo'
CGROUP_MEMORY = '/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'  # cgroup v2: a container's limit


def available_ram():
    """Bytes of memory available for new allocations, or None when unknown: the host's MemAvailable, or what a
    container's memory limit leaves (cgroup v2 memory.max - memory.current) when that is smaller."""
    found = []
    try:
        with open(MEMINFO) as f:
            found += [next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))]
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        limit, used = (_read_text(path).strip() for path in CGROUP_MEMORY)
        if limit != 'max':  # 'max': no limit
            found.append(max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _read_text(path):
    with open(path) as f:
        return f.read()


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
    """The dataset's image k into out[k], a thread per core (decoders and resize release the GIL); a signal stops
    it between images (cli.stop_point), the images not yet started cancelled."""
    def one(k):
        out[k] = dataset[k][0]

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over images, not inside each resize
    pool = concurrent.futures.ThreadPoolExecutor(_cpus())
    try:
        for _ in tqdm(pool.map(one, range(len(out))), total=len(out), unit='img', disable=not show_bar,
                      desc=f'Decoding {len(out)} images once', leave=False):
            stop_point()
    finally:
        pool.shutdown(cancel_futures=True)
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


class Images:
    """The training set and evaluation splits, from a decode-once cache or a loader: uint8-exact batches either
    way, as both hold the same resized pixels and crop_flip_batch draws each crop and flip from (seed, epoch, index)."""

    def __init__(self, dicts, config, rt):
        Image.preinit()  # PIL's common plugins imported now, never first on the writer's thread while workers fork
        mean, std = normalization(config['data_name'])
        self.normalize, self.rt, self.seed = Normalize(mean, std), rt, config['seed']
        self.size, self.batch = config['image_size'], config['batch_size'] // rt.world_size
        # a loader per epoch, its workers ending with it: none linger at exit
        workers = config['num_workers']
        self.loader_kwargs = dict(num_workers=workers, pin_memory=rt.cuda, prefetch_factor=4 if workers else None)
        # training images at the resize the crops are cut from, round(8s/7); evaluation images at s: the test
        # splits, then the validation classes held out of training (--val_split)
        self.train = ImageListDataset(dicts['train'], round(self.size * 8 / 7))
        self.eval = {s: ImageListDataset(dicts[s], self.size)
                     for s in config['eval_splits'] + (('val',) if 'val' in dicts else ())}
        self.targets = torch.tensor(self.train.targets)
        self.caches = self.build_caches(config['cache'], config['name'])

    def build_caches(self, choice, name):
        """{split: uint8 [N, 3, side, side]} for 'train' (at the crop's resize) and the evaluation splits."""
        sets = {'train': self.train, **self.eval}
        nbytes = sum(len(d) * 3 * d.side ** 2 for d in sets.values())
        place = cache_place(choice, nbytes, self.rt.device)
        if place is None:
            return None
        start = time.time()
        caches = {s: build_cache(d, place, self.rt.device, f'{name}-{s}', self.rt.main)
                  for s, d in sets.items()}
        if self.rt.main:
            shared = ', shared by the processes of each node' if self.rt.world_size > 1 else ''
            where = self.rt.device if place == 'gpu' else f'RAM{shared}'
            shapes = ', '.join(f'{s} {len(d)}x{d.side}x{d.side}' for s, d in sets.items())
            print(f'Cache: {nbytes / 2 ** 30:.2f} GiB of decoded images ({shapes}) in {where}, decoded in '
                  f'{time.time() - start:.1f}s', flush=True)
        return caches

    def epoch_batches(self, epoch):
        """This process's [(index, seed)] batches of an epoch. The last one is kept, as the original
        kept it, unless it holds a single image (BatchNorm needs two)."""
        items = utils.epoch_order(len(self.train), self.seed, epoch, self.rt.world_size, self.rt.rank)
        batches = [items[k:k + self.batch] for k in range(0, len(items), self.batch)]
        return batches[:-1] if len(batches[-1]) == 1 else batches

    def train_batches(self, batches):
        """Yields (images [B, 3, s, s] float on the device, targets [B] on the device) of epoch_batches."""
        if self.caches is None:  # loaded batch k: batch k's images in order, copied as loaded (pinned: no wait)
            loader = DataLoader(self.train, batch_sampler=[[k for k, _ in b] for b in batches], **self.loader_kwargs)
            loaded = (images.to(self.rt.device, non_blocking=True) for images in self._loaded(loader))
            sources = zip(loaded, ([(k, seed) for k, (_, seed) in enumerate(b)] for b in batches))
        else:
            sources = ((self.caches['train'], batch) for batch in batches)
        for batch, (images, items) in zip(batches, sources):
            crops = crop_flip_batch(images, items, self.size)  # uint8 [B, 3, s, s]
            yield self.normalize(self.rt.inputs(crops, len(batch) == self.batch)), \
                self.targets[[index for index, _ in batch]].to(self.rt.device, non_blocking=True)

    def eval_batches(self, split):
        """Yields this process's shard of a split in order: images [B, 3, s, s] float on the device."""
        shard = shard_range(len(self.eval[split]), self.rt.rank, self.rt.world_size)
        size = 2 * self.batch  # no gradients: twice the training batch fits
        if self.caches is None:
            batches = self._loaded(DataLoader(Subset(self.eval[split], shard), batch_size=size, **self.loader_kwargs))
        else:
            batches = (self.caches[split][k:min(k + size, shard.stop)] for k in range(shard.start, shard.stop, size))
        for images in batches:  # uint8 [B, 3, s, s]
            yield self.normalize(self.rt.inputs(images, len(images) == size))

    def _loaded(self, loader):
        """The loader's uint8 images, batch by batch."""
        try:
            yield from (images for images, _ in loader)
        except UserError as err:  # raised in a loader worker: keep the message, drop the worker traceback
            raise UserError(worker_error_message(err)) from None
