"""Training images per second (forward, backward, Adam step) per backbone on synthetic batches,
under the original's settings (fp32, deterministic cuDNN, no cuDNN benchmark) and under the
project's defaults (mixed precision, channels-last, cuDNN benchmark; torch.compile with
--compile), with peak GPU memory and a comparison of the two loss curves on the same task from
the same initial weights. Both settings train with the project's loss (class-balanced
label-smoothing cross-entropy, utils.LabelSmoothingCrossEntropy).

    python benchmarks/train_speed.py                               # GPU: 128 x 224 px, 200 steps
    python benchmarks/train_speed.py --device cpu --batch_size 4 --image_size 64 --steps 3 --backbones resnet18
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
import cli  # noqa: E402
import distributed  # noqa: E402


def synthetic_task(num_batches, batch_size, image_size, num_classes, seed):
    """A fixed, learnable task: each class is a smooth random colour pattern, each image that
    pattern plus noise. Made on the CPU with its own generator, so every device gets the same data.
    -> images [num_batches, B, 3, s, s] float32, labels [num_batches, B] int64."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 7, 7, generator=g)
    templates = F.interpolate(templates, size=(image_size, image_size), mode='bilinear', align_corners=False)
    labels = torch.randint(0, num_classes, (num_batches, batch_size), generator=g)
    images = templates[labels] + 0.7 * torch.randn(num_batches, batch_size, 3, image_size, image_size, generator=g)
    return images, labels


def settings_for(device, amp, channels_last, compile_model):
    """The two configurations compared: the original's and the project's defaults on `device`."""
    if amp == 'auto':  # what train.py does: bf16 where the GPU has it, else fp16; none on CPU
        if device.type == 'cuda':
            amp = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
        else:
            amp = 'off'
    if channels_last == 'auto':
        channels_last = 'on' if device.type == 'cuda' else 'off'
    original = dict(name='original', amp_dtype=None, channels_last=False, cudnn_benchmark=False,
                    deterministic=True, compile=False)
    project = dict(name='project', amp_dtype={'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[amp],
                   channels_last=channels_last == 'on', cudnn_benchmark=True, deterministic=False,
                   compile=compile_model)
    return original, project


def describe(setting):
    amp = {None: 'fp32', torch.bfloat16: 'AMP bf16', torch.float16: 'AMP fp16 + GradScaler'}[setting['amp_dtype']]
    parts = [amp, 'channels-last' if setting['channels_last'] else 'contiguous',
             'cudnn.benchmark' if setting['cudnn_benchmark'] else 'no cudnn.benchmark',
             'deterministic cuDNN' if setting['deterministic'] else 'non-deterministic cuDNN']
    if setting['compile']:
        parts.append('torch.compile')
    return ', '.join(parts)


def run(backbone, initial_state, images, labels, setting, device, args):
    """Train `args.steps` steps from `initial_state` over the fixed batches (cycled).
    -> (losses: list[float], images per second over the steps after warm-up, peak GPU bytes or None)."""
    import model as model_module
    torch.backends.cudnn.benchmark = setting['cudnn_benchmark']
    torch.backends.cudnn.deterministic = setting['deterministic']
    torch.manual_seed(args.seed)
    net = model_module.Model(backbone, args.feature_dim, args.num_classes, pretrained=False)
    net.load_state_dict(initial_state)
    memory_format = torch.channels_last if setting['channels_last'] else torch.contiguous_format
    net = net.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-5)
    # the project's loss: class-balanced label smoothing, weights from the labels of the fixed batches
    weights = utils.class_balanced_weights(labels.flatten(), args.num_classes)
    criterion = utils.LabelSmoothingCrossEntropy(smoothing=0.1, temperature=1.0, weight=weights).to(device)
    amp_dtype = setting['amp_dtype']
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_fn_model = torch.compile(net) if setting['compile'] else net

    # batches live on the device already: this measures the GPU, not the input pipeline
    images = [x.to(device).contiguous(memory_format=memory_format) for x in images]  # [B, 3, s, s] each
    labels = labels.to(device)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # GPU: wall clock around synchronised steps. CPU: this process's CPU time, so that other work on
    # the machine does not count (images per CPU-second; equal to wall-clock speed on an idle core)
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    warmup = min(args.warmup, args.steps // 2)
    losses, start = [], None
    for step in range(args.steps):
        if step == warmup:
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            start = clock()
        x, y = images[step % len(images)], labels[step % len(labels)]  # [B, 3, s, s], [B]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
            _, logits = step_fn_model(x)  # [B, num_classes]
            loss = criterion(logits, y)  # computed in float32 whatever the autocast dtype
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = clock() - start
    speed = (args.steps - warmup) * len(labels[0]) / seconds
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    losses = [v.item() for v in losses]  # one sync at the end, not one per step
    del net, step_fn_model, optimizer, images, labels
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return losses, speed, peak


def smooth(values, window):
    """Trailing moving average (the first points average what is there so far)."""
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v
        if k >= window:
            total -= values[k - window]
        out.append(total / min(k + 1, window))
    return out


def compare_curves(loss_o, loss_p, window):
    """-> (max relative difference of the smoothed curves, typical step-to-step noise of the
    original's curve: median |loss - smoothed| / smoothed), both as fractions."""
    s_o, s_p = smooth(loss_o, window), smooth(loss_p, window)
    diff = max(abs(a - b) / abs(a) for a, b in zip(s_o, s_p))
    noise = sorted(abs(v - s) / abs(s) for v, s in zip(loss_o, s_o))
    return diff, noise[len(noise) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--backbones', default='resnet18,resnet50,seresnet50')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=200, help='training steps per setting (timed after warm-up)')
    parser.add_argument('--warmup', type=int, default=20, help='untimed first steps (at most half of --steps)')
    parser.add_argument('--smooth', type=int, default=20, help='moving-average window for the loss curves')
    parser.add_argument('--data_batches', type=int, default=4, help='distinct synthetic batches, cycled')
    parser.add_argument('--feature_dim', type=int, default=512)
    parser.add_argument('--num_classes', type=int, default=100)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--amp', choices=['auto', 'bf16', 'fp16', 'off'], default='auto',
                        help="project setting's precision (auto: bf16 on GPUs that have it, else fp16; off on CPU)")
    parser.add_argument('--channels_last', choices=['auto', 'on', 'off'], default='auto',
                        help="project setting's memory format (auto: channels-last on CUDA)")
    parser.add_argument('--compile', action='store_true', help='also torch.compile the project setting')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0,
                        help='CPU threads for torch (0: one on CPU, for figures per core that other work on '
                             'the machine disturbs least; untouched on CUDA)')
    args = parser.parse_args()

    import model as model_module
    backbones = [b.strip() for b in args.backbones.split(',') if b.strip()]
    unknown = [b for b in backbones if b not in model_module.BACKBONES]
    if not backbones or unknown:
        raise cli.UserError(f'unknown backbone(s) {unknown or args.backbones!r}; '
                              f'valid: {", ".join(sorted(model_module.BACKBONES))}')
    if min(args.batch_size, args.image_size, args.steps, args.data_batches, args.smooth, args.num_classes) < 1:
        raise cli.UserError('--batch_size, --image_size, --steps, --data_batches, --smooth and '
                              '--num_classes must be >= 1')
    device = distributed.resolve_device(args.device)
    if args.threads > 0 or device.type == 'cpu':
        torch.set_num_threads(max(1, args.threads))
    original, project = settings_for(device, args.amp, args.channels_last, args.compile)

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'device: {name}; torch {torch.__version__}; batch {args.batch_size} x {args.image_size} px, '
          f'{args.steps} Adam steps per setting ({min(args.warmup, args.steps // 2)} untimed), '
          f'{args.num_classes} classes')
    if device.type == 'cuda':  # the original's "fp32" convolutions use TF32 on Ampere and later by default
        print(f'TF32: convolutions {torch.backends.cudnn.allow_tf32}, matmuls '
              f'{torch.backends.cuda.matmul.allow_tf32} (PyTorch defaults, both settings)')
    print('img/s: ' + ('wall clock, GPU synchronised' if device.type == 'cuda' else
                       'per CPU-second of this process (all its threads together)'))
    print(f'original: {describe(original)}')
    print(f'project:  {describe(project)}')
    images, labels = synthetic_task(args.data_batches, args.batch_size, args.image_size, args.num_classes, args.seed)
    window = min(args.smooth, args.steps)

    rows = []
    for backbone in backbones:
        torch.manual_seed(args.seed)  # same initial weights for both settings
        initial_state = model_module.Model(backbone, args.feature_dim, args.num_classes, pretrained=False).state_dict()
        loss_o, speed_o, peak_o = run(backbone, initial_state, images, labels, original, device, args)
        loss_p, speed_p, peak_p = run(backbone, initial_state, images, labels, project, device, args)
        diff, noise = compare_curves(loss_o, loss_p, window)
        rows.append((backbone, speed_o, speed_p, peak_o, peak_p, loss_o, loss_p, diff, noise))
        print(f'{backbone}: done', flush=True)

    def mib(v):
        return '-' if v is None else f'{v / 2 ** 20:.0f}'

    print()
    print('| backbone | original img/s | project img/s | speed-up | original peak MiB | project peak MiB | '
          'first loss | last loss original | last loss project | max smoothed-loss diff % | loss noise % |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for backbone, so, sp, po, pp, lo, lp, diff, noise in rows:
        s_o, s_p = smooth(lo, window), smooth(lp, window)
        print(f'| {backbone} | {so:.1f} | {sp:.1f} | {sp / so:.2f}x | {mib(po)} | {mib(pp)} | {lo[0]:.4f} | '
              f'{s_o[-1]:.4f} | {s_p[-1]:.4f} | {diff * 100:.2f} | {noise * 100:.2f} |')
    print()
    print(f'loss columns: moving average over {window} steps; "loss noise" is the median step-to-step '
          f'deviation of the original\'s loss from its own moving average')
    if device.type == 'cuda':
        data_mib = images.numel() * images.element_size() / 2 ** 20
        print(f'peak memory includes the {data_mib:.0f} MiB of synthetic batches kept on the GPU')
    nonfinite = [r[0] for r in rows if not all(math.isfinite(v) for v in r[5] + r[6])]
    if nonfinite:
        raise cli.UserError(f'non-finite loss for {", ".join(nonfinite)}')


if __name__ == '__main__':
    cli.run_cli(main)
