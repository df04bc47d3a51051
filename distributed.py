"""Where and how a process computes: the device, mixed precision, and torchrun's process group (it sets RANK,
WORLD_SIZE, LOCAL_RANK). Without torchrun every helper is a no-op, so the same code runs on CPU, one GPU and many."""
import datetime
import os

import torch
import torch.distributed as dist

from cli import UserError


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
