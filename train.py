"""Train CLF: class-balanced label-smoothing cross-entropy on the training classes, evaluation on the
unseen test classes after every epoch; writes the statistics, the best model and its feature
database to results/, with a checkpoint each epoch so a killed run resumes where it stopped.

Single process: `python train.py ...`; several GPUs or nodes: `torchrun --nproc_per_node=N train.py ...`.
"""
import argparse
import glob
import io
import math
import os
import random
import signal
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import data_utils
import model as model_lib
import utils
from utils import UserError

# CSV columns before the per-k recalls (percentages at full precision; epochs count from 1).
STAT_COLUMNS = ('epoch', 'train_loss', 'train_accuracy')
# Flags a resumed run must share with its checkpoint: they change the numbers it produces.
RESUME_KEYS = ('data_name', 'crop_type', 'backbone_type', 'feature_dim', 'branches', 'recalls',
               'batch_size', 'num_epochs', 'image_size', 'seed', 'pretrained', 'lr')


# ----------------------------------------------------------------------------------------------
# command line and validation (everything is checked before results/ is touched)
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a CLF image-retrieval model')
    add = parser.add_argument
    add('--data_path', default='/home/data', type=str, help='datasets path [default: %(default)s]')
    add('--data_name', default='car', type=str,
        help='dataset name: car, cub, sop, isc, demo or an own folder processed by data_utils.py '
             '[default: %(default)s]')
    add('--crop_type', default='uncropped', type=str, choices=data_utils.CROP_TYPES,
        help='crop data or not, it only works for car or cub dataset [default: %(default)s]')
    add('--backbone_type', default='resnet18', type=str, choices=sorted(model_lib.BACKBONES),
        help='backbone network type [default: %(default)s]')
    add('--feature_dim', default=512, type=int, help='feature dim of each branch [default: %(default)s]')
    add('--recalls', default='1,2,4,8', type=str, help='selected recall [default: %(default)s]')
    add('--batch_size', default=128, type=int,
        help='train batch size, global over all processes [default: %(default)s]')
    add('--num_epochs', default=20, type=int, help='train epoch number [default: %(default)s]')
    add('--device', default=None, type=str, help='cpu, cuda or cuda:N [default: cuda when available, else cpu]')
    add('--num_workers', default=None, type=int,
        help='data loader workers per process [default: from the CPU count, at most 8]')
    add('--image_size', default=224, type=int,
        help='train/test image size; training crops it from a round(size*8/7) resize [default: %(default)s]')
    add('--seed', default=0, type=int, help='random seed; on CPU a fixed seed gives identical runs '
                                            '[default: %(default)s]')
    add('--pretrained', default='imagenet', type=str,
        help="backbone weights: 'imagenet', 'none' (from scratch) or a weights file [default: %(default)s]")
    add('--branches', default='SMG', type=str,
        help='local-feature branches: letters of S (SPoC), M (MAC), G (GeM) [default: %(default)s]')
    add('--no_amp', action='store_true', help='train in float32 on CUDA [default: mixed precision]')
    add('--lr', default=None, type=float, help='learning rate [default: 1e-4 with pretrained weights, '
                                               '1e-3 from scratch]')
    add('--resume', default=None, type=str,
        help="'auto' (continue this run's checkpoint when there is one, else start fresh) or a checkpoint "
             "file [default: start fresh]")
    add('--results_dir', default='results', type=str, help='where outputs are written [default: %(default)s]')
    add('--eval_untrained', action='store_true',
        help='also evaluate the model before the first epoch and print its R@K, a baseline (not saved)')
    return parser.parse_args(argv)


def parse_recalls(text):
    """'1,2,4,8' -> [1, 2, 4, 8] (sorted, duplicates dropped); anything else is a UserError."""
    try:
        ks = [int(part) for part in text.split(',')]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--recalls '{text}': expected a comma-separated list of positive integers, e.g. 1,2,4,8")
    return sorted(set(ks))


def _check_split(split, name, path):
    """A data-dict split must be {label: [paths]} with at least one image."""
    if not isinstance(split, dict) or not split or \
            not all(isinstance(paths, (list, tuple)) for paths in split.values()) or \
            sum(len(paths) for paths in split.values()) == 0:
        raise UserError(f"data dict {path}: split '{name}' is empty or not {{label: [image paths]}}; "
                        f"re-run data_utils.py")
    first = next(iter(p for paths in split.values() for p in paths))
    if not os.path.exists(first):
        raise UserError(f"data dict {path}: images of split '{name}' not found (first: {first}); the "
                        f"dataset moved since data_utils.py ran? re-run it with the current --data_path")


def load_data_dicts(args):
    """Load and check {data_path}/{data_name}/{crop_type}_data_dicts.pth -> dict of splits."""
    name = args.data_name
    if not name or os.sep in name or name in ('.', '..'):
        raise UserError(f"--data_name '{name}': expected a dataset name, not a path")
    folder = os.path.join(args.data_path, name)
    path = data_utils.data_dict_path(args.data_path, name, args.crop_type)
    if not os.path.isdir(folder) and (name in data_utils.DATASETS or name == 'demo'):
        raise UserError(f"dataset folder not found: {folder}; put the {name} download there (or pass the "
                        f"--data_path that holds it) and run `python data_utils.py --data_path {args.data_path} "
                        f"--data_name {name}` first")
    if not os.path.isdir(folder):
        raise UserError(f"unknown dataset '{name}': {folder} is not a folder. Expected one of "
                        f"{', '.join(data_utils.DATASETS)}, demo or an own dataset, downloaded/made under "
                        f"--data_path {args.data_path} and processed with `python data_utils.py "
                        f"--data_path {args.data_path} --data_name {name}`")
    if not os.path.isfile(path):
        raise UserError(f'data dict not found: {path}; run `python data_utils.py --data_path {args.data_path} '
                        f'--data_name {name}` first' + (' (cropped lists exist only for datasets with boxes)'
                                                        if args.crop_type == 'cropped' else ''))
    dicts = utils.safe_load(path, 'data dict')
    if not isinstance(dicts, dict) or 'train' not in dicts or \
            not ('test' in dicts or ('query' in dicts and 'gallery' in dicts)):
        raise UserError(f"data dict {path}: expected splits 'train' and 'test' (or 'query' and 'gallery'), "
                        f"found {sorted(dicts) if isinstance(dicts, dict) else type(dicts).__name__}")
    for split in ('train', 'test', 'query', 'gallery'):
        if split in dicts:
            _check_split(dicts[split], split, path)
    return dicts, path


def resolve_config(args):
    """Check every flag and the data dict; return (config dict, data dicts). Raises UserError."""
    recalls = parse_recalls(args.recalls)
    if args.feature_dim <= 0:
        raise UserError(f'--feature_dim must be a positive integer, got {args.feature_dim}')
    if args.batch_size < 2:  # the classifier's BatchNorm1d needs 2+ images per batch
        raise UserError(f'--batch_size must be at least 2, got {args.batch_size}')
    if args.num_epochs < 1:
        raise UserError(f'--num_epochs must be a positive integer, got {args.num_epochs}')
    if args.image_size < 16:
        raise UserError(f'--image_size must be at least 16 (the backbone downsamples by 16), got {args.image_size}')
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {args.num_workers}')
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f'--lr must be a positive number, got {args.lr}')
    branches = model_lib.parse_branches(args.branches)
    pretrained = args.pretrained
    if pretrained not in ('imagenet', 'none') and not os.path.isfile(pretrained):
        raise UserError(f"--pretrained {pretrained}: expected 'imagenet', 'none' or an existing weights file")
    on_rank0 = os.environ.get('RANK', '0') == '0'  # under torchrun only rank 0 reads the checkpoint
    if args.resume not in (None, 'auto') and on_rank0 and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: checkpoint not found (use 'auto' to start fresh when "
                        f"there is none)")

    dicts, dict_path = load_data_dicts(args)
    # R@k needs k candidates per query: the other test images, or the gallery
    if 'gallery' in dicts:
        candidates = sum(len(p) for p in dicts['gallery'].values())
        what = f'the gallery of {dict_path} has {candidates} images'
    else:
        candidates = sum(len(p) for p in dicts['test'].values()) - 1
        what = f'a test image of {dict_path} has only {candidates} other images'
    if max(recalls) > candidates:
        raise UserError(f'--recalls {args.recalls}: R@{max(recalls)} asks for {max(recalls)} neighbours but {what}')
    num_train = sum(len(p) for p in dicts['train'].values())
    if num_train < 2:
        raise UserError(f'data dict {dict_path}: training needs at least 2 images, found {num_train}')

    weights = pretrained != 'none'
    config = {
        'data_path': args.data_path, 'data_name': args.data_name, 'crop_type': args.crop_type,
        'backbone_type': args.backbone_type, 'feature_dim': args.feature_dim, 'branches': branches,
        'recalls': recalls, 'batch_size': args.batch_size, 'num_epochs': args.num_epochs,
        'image_size': args.image_size, 'seed': args.seed, 'pretrained': pretrained,
        # from scratch the backbone needs trainable BatchNorm and a 10x larger rate: with frozen BN
        # and 1e-4 an untrained ResNet-18 stays near chance
        'lr': args.lr if args.lr is not None else (1e-4 if weights else 1e-3),
        'freeze_backbone_bn': weights,
        'num_classes': len(dicts['train']),
        'num_workers': utils.default_num_workers() if args.num_workers is None else args.num_workers,
        'amp': not args.no_amp, 'resume': args.resume, 'results_dir': args.results_dir,
        'name': f'{args.data_name}_{args.crop_type}_{args.backbone_type}_{args.feature_dim}',
    }
    return config, dicts


def check_writable(folder):
    """Fail now, not after an epoch of work, when results cannot be written (nothing is overwritten)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--results_dir {folder}: expected a folder, found a file')
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f'cannot write to results folder {folder}: {err.strerror or err} (check that it is '
                        f'writable and the disk has space); nothing was written') from None


# ----------------------------------------------------------------------------------------------
# reproducibility: every random draw of epoch e depends only on (seed, e), never on what ran before
# ----------------------------------------------------------------------------------------------


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
    torch.manual_seed(seed)


def rng_state():
    """RNG states of Python, NumPy and torch (CPU and CUDA) as tensors and lists (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'python': [version, list(internal), gauss],
        'numpy': [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        'torch': torch.get_rng_state(),
        # only when CUDA is in use: asking would otherwise start a CUDA context for a CPU run
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


class SeededSampler(torch.utils.data.Sampler):
    """Shuffles like DistributedSampler (order from seed + epoch; this rank's share) and hands each
    index out with its own seed, so an image's crop and flip in an epoch are the same whatever
    the worker count, the process that loads it, or the RNG history."""

    def __init__(self, dataset, seed, num_replicas=1, rank=0):
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self):
        return len(self.sampler)


class SeededDataset(Dataset):
    """Wraps an ImageListDataset: item (index, seed) is transformed with torch/Python RNGs seeded by
    `seed`; an image that cannot be read becomes a UserError naming the file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # CPU generator only: safe in forked workers
            random.seed(seed)
        try:
            return self.dataset[index]
        except UserError:
            raise
        except Exception as err:  # anything the decoder or transform throws, with the file named
            raise UserError(f'cannot read image {self.dataset.images[index]}: '
                            f'{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}') from None


# ----------------------------------------------------------------------------------------------
# training and feature extraction
# ----------------------------------------------------------------------------------------------


def make_scheduler(optimizer, num_epochs):
    """LR x 0.1 after epochs int(0.6 E) and int(0.8 E) (stepped once per epoch; 0 and repeats dropped)."""
    milestones = sorted({int(0.6 * num_epochs), int(0.8 * num_epochs)} - {0})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def train_one_epoch(model, loader, criterion, optimizer, scaler, device, amp_dtype, epoch, num_epochs,
                    show_bar=True, faults=None):
    """One pass over `loader` -> {'loss': mean loss, 'accuracy': % correct} over all processes.

    `faults` (test only, see read_faults): {'nan' | 'kill' | 'interrupt': {(epoch, step), ...}}.
    """
    faults = faults or {}
    model.train()  # Model keeps the backbone BatchNorm in eval mode when freeze_backbone_bn is set
    channels_last = device.type == 'cuda'
    loss_sum, correct, seen = 0.0, 0.0, 0
    bar = tqdm(loader, disable=not show_bar, dynamic_ncols=True, leave=False)
    for step, (images, targets) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True,
                           memory_format=torch.channels_last if channels_last else torch.preserve_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            _, logits = model(images)  # logits [B, num_classes]
        loss = criterion(logits, targets)  # float32 whatever the autocast dtype
        if (epoch, step) in faults.get('nan', ()):
            loss = loss * float('nan')
        # one device sync per step: the loss check and the bar need the values anyway
        loss_value, hits = torch.stack([loss.detach(), (logits.argmax(1) == targets).sum().float()]).tolist()
        if not math.isfinite(loss_value):
            raise UserError(f'the loss became {loss_value} at epoch {epoch}, step {step}; training stopped. '
                            f'The best model and database on disk are from earlier epochs and unchanged. Try '
                            f'a lower --lr (or --no_amp), then continue from the last checkpoint with --resume auto')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss_value * targets.shape[0]
        correct += hits
        seen += targets.shape[0]
        bar.set_description(f'Train Epoch {epoch}/{num_epochs} Loss: {loss_sum / seen:.4f} '
                            f'Acc: {100 * correct / seen:.2f}%')
        if (epoch, step) in faults.get('kill', ()):
            os.kill(os.getpid(), signal.SIGKILL)
        if (epoch, step) in faults.get('interrupt', ()):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
    bar.close()
    loss_sum, correct, seen = utils.all_reduce_sum([loss_sum, correct, seen], device)
    return {'loss': loss_sum / seen, 'accuracy': 100.0 * correct / seen}


@torch.no_grad()
def extract_features(model, loader, device, amp_dtype, dim, show_bar=True, desc='Features'):
    """Embeddings of this process's shard, gathered from every process in order -> CPU FloatTensor [N, dim]."""
    model.eval()
    channels_last = device.type == 'cuda'
    parts = []
    for images, _ in tqdm(loader, desc=desc, disable=not show_bar, dynamic_ncols=True, leave=False):
        images = images.to(device, non_blocking=True,
                           memory_format=torch.channels_last if channels_last else torch.preserve_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            embedding, _ = model(images)  # [B, dim], L2-normalised
        parts.append(embedding.float())
    features = torch.cat(parts) if parts else torch.zeros(0, dim, device=device)
    return utils.all_gather_rows(features).cpu()


def extract_all(model, loaders, device, amp_dtype, dim, show_bar=True):
    """Features of every evaluation split -> {split: CPU FloatTensor [N, dim]}."""
    try:
        return {split: extract_features(model, loader, device, amp_dtype, dim, show_bar=show_bar,
                                        desc=f'Extracting {split} features')
                for split, loader in loaders.items()}
    except UserError as err:  # raised in a loader worker: keep the message, drop the worker traceback
        raise UserError(utils.worker_error_message(err)) from None


def metrics_text(metrics, recalls):
    """'R@1 62.50% R@2 74.31% | MAP@R 18.20%' (percent, two decimals, as the original printed)."""
    return (' '.join(f'R@{k} {100 * metrics[f"R@{k}"]:.2f}%' for k in recalls)
            + f' | MAP@R {100 * metrics["MAP@R"]:.2f}%')


def build_datasets(dicts, image_size, mean, std):
    """Training images get the random crop/flip, evaluation images the plain resize.
    -> (train set, {'test': set} or {'query': set, 'gallery': set})."""
    train_set = utils.ImageListDataset(dicts['train'], utils.train_transform(image_size, mean, std))
    splits = ('query', 'gallery') if 'gallery' in dicts else ('test',)
    eval_sets = {split: utils.ImageListDataset(dicts[split], utils.test_transform(image_size, mean, std))
                 for split in splits}
    return train_set, eval_sets


def build_loaders(train_set, eval_sets, config, batch_size, rank, world_size, device):
    """-> (sampler, train loader over this rank's share, {split: loader over this rank's shard})."""
    kwargs = utils.loader_kwargs(config['num_workers'], device)
    sampler = SeededSampler(train_set, config['seed'], world_size, rank)
    train_loader = DataLoader(SeededDataset(train_set), batch_size=batch_size, sampler=sampler,
                              # BatchNorm1d needs 2+ images: drop the ragged last batch when it can be
                              drop_last=len(sampler) >= batch_size, **kwargs)
    # evaluation: contiguous shards, so the gathered features come back in dataset order
    eval_loaders = {split: DataLoader(torch.utils.data.Subset(SeededDataset(dataset),
                                                              utils.shard_range(len(dataset), rank, world_size)),
                                      batch_size=batch_size, **kwargs)
                    for split, dataset in eval_sets.items()}
    return sampler, train_loader, eval_loaders


def retrieval_metrics(features, labels, ks, device):
    """R@k and MAP@R (fractions): test against itself, or query against gallery; on the GPU when
    training on one (SOP's 60k x 60k comparisons take a minute on a CPU, a second on a GPU)."""
    features = {split: f.to(device) for split, f in features.items()}
    if 'gallery' in features:
        return utils.evaluate(features['query'], labels[0], ks, features['gallery'], labels[1])
    return utils.evaluate(features['test'], labels[0], ks)


def label_ids(*label_lists):
    """Label strings -> LongTensors of ids shared across the lists (same string, same id)."""
    index = {label: k for k, label in enumerate(sorted(set().union(*label_lists)))}
    return [torch.tensor([index[label] for label in labels], dtype=torch.long) for labels in label_lists]


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def output_paths(results_dir, name):
    return {kind: os.path.join(results_dir, f'{name}_{kind}')
            for kind in ('statistics.csv', 'model.pth', 'data_base.pth', 'checkpoint.pth', 'curves.png')}


def make_database(eval_sets, features, config, mean, std, model_file):
    """The feature database test.py searches, with what it takes to embed new images the same way.
    Query/gallery data: the query split is stored under test_*, as the original did."""
    query = 'query' if 'gallery' in eval_sets else 'test'
    database = {'test_images': eval_sets[query].images, 'test_labels': eval_sets[query].labels,
                'test_features': features[query]}
    if 'gallery' in eval_sets:
        database.update(gallery_images=eval_sets['gallery'].images, gallery_labels=eval_sets['gallery'].labels,
                        gallery_features=features['gallery'])
    database['config'] = {
        'backbone_type': config['backbone_type'], 'feature_dim': config['feature_dim'],
        'branches': config['branches'], 'num_classes': config['num_classes'], 'image_size': config['image_size'],
        'mean': list(mean), 'std': list(std), 'data_name': config['data_name'], 'crop_type': config['crop_type'],
        'model_file': model_file}
    return database


def save_checkpoint(path, epoch, model, optimizer, scheduler, scaler, best, statistics, config):
    """Everything a resume needs, written atomically (a kill leaves the previous checkpoint whole)."""
    state = {
        'epoch': epoch,
        'model': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'best_recall': best['recall'], 'best_epoch': best['epoch'],
        'statistics': statistics,
        'rng': rng_state(),
        'config': {key: config[key] for key in RESUME_KEYS},
    }
    utils.atomic_save(state, path)


def load_checkpoint(path, config):
    """Read a checkpoint safely and check it belongs to a run with the same settings."""
    state = utils.safe_load(path, 'checkpoint')
    needed = ('epoch', 'model', 'optimizer', 'scheduler', 'scaler', 'best_recall', 'best_epoch',
              'statistics', 'rng', 'config')
    if not isinstance(state, dict) or any(key not in state for key in needed) or \
            not isinstance(state['config'], dict):
        raise UserError(f'{path} is not a train.py checkpoint (missing or malformed: '
                        f'{[k for k in needed if not isinstance(state, dict) or k not in state] or ["config"]})')
    differ = [f'{key}: checkpoint {state["config"].get(key)!r}, now {config[key]!r}'
              for key in RESUME_KEYS if state['config'].get(key) != config[key]]
    if differ:
        raise UserError(f'cannot resume from {path}: it was made with other settings ({"; ".join(differ)}); '
                        f'use the same flags, or start fresh without --resume')
    return state


def restore_checkpoint(state, path, model, optimizer, scheduler, scaler):
    """Put a checkpoint's model, optimizer, scheduler, scaler and RNG states in place
    -> (statistics rows, best {'recall', 'epoch'}, first epoch still to run)."""
    try:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if state['scaler'] and scaler.is_enabled():  # empty when saved without fp16 (CPU, bf16, --no_amp)
            scaler.load_state_dict(state['scaler'])
        set_rng_state(state['rng'])
        statistics, start_epoch = list(state['statistics']), int(state['epoch']) + 1
        best = {'recall': float(state['best_recall']), 'epoch': int(state['best_epoch'])}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        # the settings matched, so the contents were altered or come from another version of train.py
        raise UserError(f'cannot resume from {path}: its contents do not fit this run '
                        f'({" ".join(str(err).split())[:200] or type(err).__name__}); start fresh without '
                        f'--resume') from None
    return statistics, best, start_epoch


def statistics_csv(statistics, recalls):
    """Rows -> CSV bytes (pandas; floats at full precision)."""
    import pandas as pd
    columns = list(STAT_COLUMNS) + [f'test_recall@{k}' for k in recalls] + ['test_map@r']
    return pd.DataFrame(statistics, columns=columns).to_csv(index=False).encode()


def plot_curves(statistics, recalls, title):
    """Loss, accuracy, R@K and MAP@R per epoch -> PNG bytes."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row['epoch'] for row in statistics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [row['train_loss'] for row in statistics], marker='o')
    axes[0].set(title='train loss', xlabel='epoch')
    axes[1].plot(epochs, [row['train_accuracy'] for row in statistics], marker='o')
    axes[1].set(title='train accuracy (%)', xlabel='epoch')
    for k in recalls:
        axes[2].plot(epochs, [row[f'test_recall@{k}'] for row in statistics], marker='o', label=f'R@{k}')
    axes[2].plot(epochs, [row['test_map@r'] for row in statistics], marker='s', linestyle='--', label='MAP@R')
    axes[2].set(title='test retrieval (%)', xlabel='epoch')
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.85, wspace=0.2)  # tight_layout is slow
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100, metadata={'Software': None})
    plt.close(fig)
    return buffer.getvalue()


def remove_stale_temporaries(paths):
    """Temporary files a killed write of these outputs left behind (the real files are intact)."""
    for path in [tmp for target in paths.values() for tmp in glob.glob(os.path.join(
            glob.escape(os.path.dirname(target)), '.' + glob.escape(os.path.basename(target)) + '.*.tmp'))]:
        try:
            os.remove(path)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def print_config(config, device, world_size, amp_dtype):
    shown = dict(config, device=str(device), world_size=world_size,
                 amp=str(amp_dtype).replace('torch.', '') if amp_dtype else 'off')
    width = max(len(key) for key in shown)
    print('Config:\n' + '\n'.join(f'  {key:<{width}} {value}' for key, value in shown.items()), flush=True)


def read_faults():
    """Test-only fault injection from the CLF_FAULT environment variable (unset in normal use):
    comma-separated entries
      nan:E:S         the loss of step S of epoch E becomes NaN (the run must stop cleanly)
      kill:E:S        SIGKILL this process right after step S of epoch E (a pre-emption)
      interrupt:E:S   SIGINT (Ctrl-C) after step S of epoch E
      kill-write:NAME:N, fail-write:NAME:N   see utils.FAULT_ENV: die halfway through / fail (disk
                      full) the N-th write of an output file whose name contains NAME
    -> {'nan' | 'kill' | 'interrupt': {(epoch, step), ...}}."""
    return {kind: {(int(e), int(s)) for e, s in utils.faults(kind)} for kind in ('nan', 'kill', 'interrupt')}


def main(argv=None):
    args = parse_args(argv)
    config, dicts = resolve_config(args)
    device = utils.init_distributed(args.device)
    rank, world_size, main_process = utils.get_rank(), utils.get_world_size(), utils.is_main_process()
    if config['batch_size'] % world_size or config['batch_size'] // world_size < 2:
        raise UserError(f'--batch_size {config["batch_size"]} is the global batch: it must split evenly into '
                        f'at least 2 images for each of the {world_size} processes')
    per_process_batch = config['batch_size'] // world_size
    amp_dtype = None
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if config['amp']:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    paths = output_paths(config['results_dir'], config['name'])

    mean, std = data_utils.normalization(config['data_name'])
    train_set, eval_sets = build_datasets(dicts, config['image_size'], mean, std)
    if len(train_set) // world_size < 2:
        raise UserError(f'{len(train_set)} training images cannot be split over {world_size} processes')

    # model: the new layers' initial weights come from the seed
    torch.manual_seed(config['seed'])
    weights = {'imagenet': True, 'none': False}.get(config['pretrained'], config['pretrained'])
    model = model_lib.Model(config['backbone_type'], config['feature_dim'], config['num_classes'],
                            branches=config['branches'], pretrained=weights,
                            freeze_backbone_bn=config['freeze_backbone_bn'])
    dim = len(config['branches']) * config['feature_dim']

    resume_path = config['resume']
    if resume_path == 'auto':
        resume_path = paths['checkpoint.pth'] if os.path.isfile(paths['checkpoint.pth']) else None
    # rank 0 reads the checkpoint and hands it to the others: results/ may be on node 0's disk only
    state = load_checkpoint(resume_path, config) if resume_path and main_process else None
    state = utils.broadcast_object(state)
    if main_process:
        check_writable(config['results_dir'])  # last check before any file is written
        remove_stale_temporaries(paths)
        print_config(config, device, world_size, amp_dtype)
        with torch.device('meta'):  # counts need shapes only: no weights copied, no real forward
            shape_model = model_lib.Model(config['backbone_type'], config['feature_dim'], config['num_classes'],
                                          branches=config['branches'])
        params, flops = model_lib.count_params_flops(shape_model, config['image_size'])
        print(f'Params: {params / 1e6:.2f}M | FLOPs: {flops / 1e9:.2f}G '
              f'(at {config["image_size"]}x{config["image_size"]})', flush=True)

    model.to(device)
    if device.type == 'cuda':
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config['lr'], weight_decay=1e-5)
    scheduler = make_scheduler(optimizer, config['num_epochs'])
    scaler = torch.amp.GradScaler('cuda', enabled=amp_dtype == torch.float16)  # fp16 only; bf16 needs none
    class_weights = utils.class_balanced_weights(train_set.targets, config['num_classes'])
    criterion = utils.LabelSmoothingCrossEntropy(smoothing=0.1, temperature=1.0, weight=class_weights).to(device)

    statistics, best, start_epoch = [], {'recall': -1.0, 'epoch': 0}, 1
    if state is not None:
        statistics, best, start_epoch = restore_checkpoint(state, resume_path, model, optimizer, scheduler, scaler)
        if main_process:
            print(f'Resuming from {resume_path}: epoch {state["epoch"]} of {config["num_epochs"]} done, '
                  f'best R@1 {100 * best["recall"]:.2f}% (epoch {best["epoch"]})', flush=True)
    if start_epoch > config['num_epochs'] and main_process:
        print(f'Nothing to do: all {config["num_epochs"]} epochs are done.', flush=True)

    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    sampler, train_loader, eval_loaders = build_loaders(train_set, eval_sets, config, per_process_batch,
                                                        rank, world_size, device)
    eval_labels = label_ids(*[dataset.labels for dataset in eval_sets.values()])
    faults = read_faults()

    if args.eval_untrained and state is None:
        # a baseline to read the trained R@K against; nothing is saved, and every epoch reseeds
        # its RNGs, so the run that follows is the same with or without it
        features = extract_all(model, eval_loaders, device, amp_dtype, dim, show_bar=main_process)
        if main_process:
            metrics = retrieval_metrics(features, eval_labels, config['recalls'], device)
            print(f'Before training | {metrics_text(metrics, config["recalls"])}', flush=True)
        utils.barrier()

    for epoch in range(start_epoch, config['num_epochs'] + 1):
        seed_everything(derive_seed(config['seed'], epoch, rank))
        sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(train_model, train_loader, criterion, optimizer, scaler, device, amp_dtype,
                                    epoch, config['num_epochs'], show_bar=main_process, faults=faults)
        except UserError as err:  # raised in a loader worker: keep the message, drop the worker traceback
            raise UserError(utils.worker_error_message(err)) from None
        utils.broadcast_buffers(model)  # every shard embedded by the model rank 0 saves
        features = extract_all(model, eval_loaders, device, amp_dtype, dim, show_bar=main_process)
        scheduler.step()

        if main_process:
            # R@1 picks the best epoch even when --recalls leaves it out
            metrics = retrieval_metrics(features, eval_labels, sorted(set(config['recalls']) | {1}), device)
            row = {'epoch': epoch, 'train_loss': stats['loss'], 'train_accuracy': stats['accuracy']}
            row.update({f'test_recall@{k}': 100.0 * metrics[f'R@{k}'] for k in config['recalls']})
            row['test_map@r'] = 100.0 * metrics['MAP@R']
            statistics.append(row)
            print(f'Epoch {epoch}/{config["num_epochs"]} | train loss {stats["loss"]:.4f} '
                  f'acc {stats["accuracy"]:.2f}% | {metrics_text(metrics, config["recalls"])}', flush=True)

            # order matters for crash safety: the best files first, the checkpoint last, so a kill
            # anywhere in between repeats this epoch on resume and rewrites the same files; the
            # model and its database are replaced together, never one without the other
            if metrics['R@1'] > best['recall']:
                best = {'recall': metrics['R@1'], 'epoch': epoch}
                utils.atomic_save_group([
                    ({k: v.detach().cpu() for k, v in model.state_dict().items()}, paths['model.pth']),
                    (make_database(eval_sets, features, config, mean, std, os.path.basename(paths['model.pth'])),
                     paths['data_base.pth'])])
            utils.atomic_write_bytes(statistics_csv(statistics, config['recalls']), paths['statistics.csv'])
            utils.atomic_write_bytes(plot_curves(statistics, config['recalls'], config['name']), paths['curves.png'])
            save_checkpoint(paths['checkpoint.pth'], epoch, model, optimizer, scheduler, scaler, best,
                            statistics, config)
        utils.barrier()  # the others wait while rank 0 evaluates and writes

    if main_process and statistics:
        print(f'Best R@1 {100 * best["recall"]:.2f}% at epoch {best["epoch"]}; model {paths["model.pth"]}, '
              f'database {paths["data_base.pth"]}, statistics {paths["statistics.csv"]}', flush=True)
    utils.cleanup_distributed()


if __name__ == '__main__':
    utils.run_cli(main)
