"""Train CLF: class-balanced label-smoothing cross-entropy on the training classes, evaluation on the
unseen test classes after every epoch; writes the statistics, the best model and its feature
database to results/, with a checkpoint each epoch so a killed run resumes where it stopped.

Single process: `python train.py ...`; several GPUs or nodes: `torchrun --nproc_per_node=N train.py ...`."""
import argparse
import contextlib
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data_utils
import metrics as metrics_lib
import model as model_lib
import utils
from utils import UserError

# ---- the recipe (README, Usage: Train model) ----
LR_WITH_WEIGHTS = 1e-4  # Adam on an ImageNet backbone whose BatchNorm stays frozen
LR_FROM_SCRATCH = 1e-3  # without weights the BatchNorm trains and needs a 10x larger rate
WEIGHT_DECAY = 1e-5
SMOOTHING, TEMPERATURE = 0.1, 1.0  # label smoothing and logit temperature of the loss
MILESTONES, GAMMA = (0.6, 0.8), 0.1  # LR x 0.1 after int(0.6 E) and int(0.8 E) epochs

# accepted ranges of the numeric flags, listed in README's flag table: integers low..high, --lr in (0, LR_MAX]
INT_RANGES = {'feature_dim': (1, 8192), 'batch_size': (2, 65536), 'num_epochs': (1, 100000), 'image_size': (16, 1024),
              'seed': (0, utils.SEED_MAX), 'num_workers': (0, 256)}
LR_MAX = 1.0  # far above any rate Adam trains with; 1e38 overflows float32 inside its step

STAT_COLUMNS = ('epoch', 'train_loss', 'train_accuracy')  # then test_recall@k per k, test_map@r, test_r_precision
# evaluate's figures after R@k, as (key in its dict, CSV column suffix, printed name): the columns {split}_{suffix}
RANKING_METRICS = (('MAP@R', 'map@r', 'MAP@R'), ('R-Precision', 'r_precision', 'RP'))
# flags a resumed run must share with its checkpoint: they change the numbers it produces
RESUME_KEYS = ('data_name', 'crop_type', 'backbone_type', 'feature_dim', 'branches', 'recalls',
               'batch_size', 'num_epochs', 'image_size', 'seed', 'pretrained', 'lr', 'val_split')
OUTPUTS = ('statistics.csv', 'model.pth', 'data_base.pth', 'checkpoint.pth', 'curves.png', 'settings.json')
VAL_STREAM = 0x76616C  # mixed into --seed for the choice of validation classes, apart from every epoch's draws
INTERRUPTED = 'stopped at once; the last checkpoint is intact: run the same command with --resume auto to continue'
DIVERGED = ('training stopped; the best model and database on disk are from earlier epochs and unchanged. Try a '
            'lower --lr (or --no_amp), then continue with --resume auto')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a CLF image-retrieval model')
    add = parser.add_argument
    add('--data_path', default='/home/data', help='datasets path [default: %(default)s]')
    add('--data_name', default='car', help='car, cub, sop, isc, demo or a data_utils.py folder [default: %(default)s]')
    add('--crop_type', default='uncropped', choices=data_utils.CROP_TYPES,
        help='box crops (datasets with boxes) or whole images [default: %(default)s]')
    add('--backbone_type', default='resnet18', choices=sorted(model_lib.BACKBONES), help='[default: %(default)s]')
    add('--feature_dim', default=512, type=int, help='feature dim of each branch [default: %(default)s]')
    add('--recalls', default='1,2,4,8', help='selected recall [default: %(default)s]')
    add('--batch_size', default=128, type=int, help='train batch size over all processes [default: %(default)s]')
    add('--num_epochs', default=20, type=int, help='train epoch number [default: %(default)s]')
    add('--device', default=None, help='cpu, cuda or cuda:N [default: cuda when available, else cpu]')
    add('--num_workers', default=None, type=int, help='loader workers per process, uncached [default: CPUs, <= 8]')
    add('--image_size', default=224, type=int, help='image side; train crops a size*8/7 resize [default: %(default)s]')
    add('--seed', default=0, type=int, help='random seed; a fixed seed repeats a CPU run [default: %(default)s]')
    add('--pretrained', default='imagenet', help="'imagenet', 'none' (from scratch) or a file [default: %(default)s]")
    add('--branches', default='SMG', help='local-feature branches: S (SPoC), M (MAC), G (GeM) [default: %(default)s]')
    add('--no_amp', action='store_true', help='train in float32 on CUDA [default: mixed precision]')
    add('--lr', default=None, type=float, help='learning rate [default: 1e-4 with ImageNet weights, 1e-3 from scratch]')
    add('--cache', default='auto', choices=utils.CACHE_CHOICES,
        help='decode images once into GPU memory or RAM [default: %(default)s: GPU if they fit, else RAM, else off]')
    add('--compile', action='store_true', help='torch.compile the model for training and feature extraction')
    add('--resume', default=None, help="'auto' (this run's checkpoint if there is one, else start fresh) or a file")
    add('--overwrite', action='store_true', help='start over, replacing a run of this name that has a checkpoint')
    add('--results_dir', default='results', help='where outputs are written [default: %(default)s]')
    add('--eval_untrained', action='store_true', help='also print the R@K before the first epoch (not saved)')
    add('--val_split', default=0.0, type=float,
        help='hold out this fraction of the training classes to choose the best epoch by [default: %(default)s: '
             'choose by test R@1, as the original]')
    return parser.parse_args(argv)


def resolve_config(args):
    """Check every flag and the data lists before anything is written -> (config dict, data dicts)."""
    try:
        recalls = sorted({int(k) for k in args.recalls.split(',')})
    except ValueError:
        recalls = []
    if not recalls or recalls[0] < 1:
        raise UserError(f"--recalls '{args.recalls}': expected comma-separated positive integers, e.g. 1,2,4,8")
    for flag, (low, high) in INT_RANGES.items():
        utils.check_int(f'--{flag}', getattr(args, flag) or 0, low, high)  # num_workers None: chosen later
    if args.lr is not None:
        utils.check_float('--lr', args.lr, 0, LR_MAX)
    branches = model_lib.parse_branches(args.branches)
    if args.pretrained not in ('imagenet', 'none') and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained {args.pretrained}: expected 'imagenet', 'none' or an existing weights file")
    if args.resume not in (None, 'auto') and os.environ.get('RANK', '0') == '0' and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: checkpoint not found (use 'auto' to start fresh when there is none)")
    if args.resume and args.overwrite:
        raise UserError('--resume continues a run and --overwrite replaces it: pass one of them')
    utils.check_results_dir(args.results_dir)
    if not 0 <= args.val_split < 1:  # NaN fails too
        raise UserError(f'--val_split must be a fraction of the training classes, 0 <= F < 1, got {args.val_split}')

    dicts, dict_path = data_utils.load_data_dicts(args.data_path, args.data_name, args.crop_type)
    eval_splits = ('query', 'gallery') if 'gallery' in dicts else ('test',)
    candidates = sum(map(len, dicts[eval_splits[-1]].values())) - (len(eval_splits) == 1)  # not the query itself
    if recalls[-1] > candidates:
        raise UserError(f'--recalls {args.recalls}: R@{recalls[-1]} needs {recalls[-1]} candidates per query, but '
                        f'{dict_path} offers {candidates}')
    if args.val_split:
        dicts = dict(dicts, **split_validation(dicts['train'], args.val_split, args.seed, dict_path))
        candidates = sum(map(len, dicts['val'].values())) - 1
        if recalls[-1] > candidates:
            raise UserError(f'--recalls {args.recalls}: R@{recalls[-1]} needs {recalls[-1]} candidates per query, '
                            f'but the validation classes (--val_split {args.val_split}) offer {candidates}')
    weights = args.pretrained != 'none'
    config = dict(vars(args), recalls=recalls, branches=branches, freeze_backbone_bn=weights,
                  lr=args.lr or (LR_WITH_WEIGHTS if weights else LR_FROM_SCRATCH), amp=not args.no_amp,
                  num_classes=len(dicts['train']), eval_splits=eval_splits,
                  num_workers=utils.default_num_workers() if args.num_workers is None else args.num_workers,
                  name=f'{args.data_name}_{args.crop_type}_{args.backbone_type}_{args.feature_dim}')
    del config['no_amp']
    return config, dicts


def split_validation(train, fraction, seed, dict_path):
    """Hold out round(fraction x C) of the C training classes, drawn from the seed over the sorted class names
    (every process and a resumed run draw the same) -> {'train': the rest, 'val': the held-out classes}."""
    classes = sorted(train)
    held = math.floor(fraction * len(classes) + 0.5)
    if held < 2:
        raise UserError(f'--val_split {fraction} holds out {held} of the {len(classes)} training classes of '
                        f'{dict_path}; validation needs at least 2: raise --val_split')
    if len(classes) - held < 2:
        raise UserError(f'--val_split {fraction} holds out {held} of the {len(classes)} training classes of '
                        f'{dict_path}, leaving {len(classes) - held} to train on; at least 2 must remain')
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(utils.derive_seed(seed, VAL_STREAM)))
    val = {classes[i] for i in order[:held].tolist()}
    return {'train': {c: paths for c, paths in train.items() if c not in val},
            'val': {c: paths for c, paths in train.items() if c in val}}


# ---- images: decoded once into a cache, or loaded by DataLoader workers each epoch ----

class Images:
    """The training set and evaluation splits, from a decode-once cache or a loader: uint8-exact batches either
    way, as both hold the same resized pixels and crop_flip_batch draws each crop and flip from (seed, epoch, index)."""

    def __init__(self, dicts, config, rt):
        mean, std = data_utils.normalization(config['data_name'])
        self.normalize, self.rt, self.seed = utils.Normalize(mean, std), rt, config['seed']
        self.size, self.batch = config['image_size'], config['batch_size'] // rt.world_size
        # a loader per epoch, its workers ending with it: none linger at exit
        workers = config['num_workers']
        self.loader_kwargs = dict(num_workers=workers, pin_memory=rt.cuda, prefetch_factor=4 if workers else None)
        # training images at the resize the crops are cut from, round(8s/7); evaluation images at s: the test
        # splits, then the validation classes held out of training (--val_split)
        self.train = utils.ImageListDataset(dicts['train'], round(self.size * 8 / 7))
        self.eval = {s: utils.ImageListDataset(dicts[s], self.size)
                     for s in config['eval_splits'] + (('val',) if 'val' in dicts else ())}
        self.targets = torch.tensor(self.train.targets)
        self.caches = self.build_caches(config['cache'], config['name'])

    def build_caches(self, choice, name):
        """{split: uint8 [N, 3, side, side]} for 'train' (at the crop's resize) and the evaluation splits."""
        sets = {'train': self.train, **self.eval}
        nbytes = sum(len(d) * 3 * d.side ** 2 for d in sets.values())
        place = utils.cache_place(choice, nbytes, self.rt.device)
        if place is None:
            return None
        start = time.time()
        caches = {s: utils.build_cache(d, place, self.rt.device, f'{name}-{s}', self.rt.main)
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
            crops = utils.crop_flip_batch(images, items, self.size)  # uint8 [B, 3, s, s]
            yield self.normalize(self.rt.inputs(crops, len(batch) == self.batch)), \
                self.targets[[index for index, _ in batch]].to(self.rt.device, non_blocking=True)

    def eval_batches(self, split):
        """Yields this process's shard of a split in order: images [B, 3, s, s] float on the device."""
        shard = utils.shard_range(len(self.eval[split]), self.rt.rank, self.rt.world_size)
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
            raise UserError(utils.worker_error_message(err)) from None


# ---- training and evaluation ----

def make_scheduler(optimizer, num_epochs):
    """LR x GAMMA after epochs int(0.6 E) and int(0.8 E), stepped once per epoch (0 and repeats dropped)."""
    milestones = sorted({int(m * num_epochs) for m in MILESTONES} - {0})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=GAMMA)


def train_step(model, images, targets, criterion, optimizer, rt):
    """One Adam step -> (loss, correct predictions) as device tensors."""
    with rt.autocast():
        _, logits = model(images)  # [B, num_classes]
    loss = criterion(logits, targets)  # float32 whatever the autocast dtype
    optimizer.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.step(optimizer)
    rt.scaler.update()
    return loss.detach(), (logits.argmax(1) == targets).sum()


def train_set_line(batches, batch_size, world_size, num_images):
    """'Train set: ...' for one process's epoch_batches: images and steps per epoch, and the step's real size
    where the whole epoch is one step smaller than --batch_size."""
    steps, images = len(batches), sum(map(len, batches)) * world_size
    step = f'{steps} step{"s" if steps != 1 else ""}'
    if steps == 1 and len(batches[0]) * world_size < batch_size:  # every image in one step: --batch_size capped
        size = len(batches[0]) * world_size
        return (f'Train set: {images} images, {step} of {size} images per epoch (--batch_size {batch_size} capped at '
                f'the {num_images} training images)')
    return f'Train set: {images} images, {step} of {batch_size} per epoch ({num_images} training images)'


def train_one_epoch(model, images, criterion, optimizer, rt, epoch, num_epochs, writer=None):
    """One pass over the training images -> {'loss', 'accuracy' (%), 'seconds'} over all processes; stops at
    the first step after a background write of `writer` failed."""
    model.train()  # Model keeps the backbone BatchNorm in eval mode when freeze_backbone_bn is set
    start, first_step, loss_sum, correct, seen = time.time(), 0.0, 0.0, 0.0, 0
    batches = images.epoch_batches(epoch)
    bar = tqdm(images.train_batches(batches), total=len(batches), disable=not rt.main, dynamic_ncols=True, leave=False)
    for step, (x, targets) in enumerate(bar, start=1):
        if writer is not None:
            writer.check()  # a full disk stops the run now, not after another epoch without a checkpoint
        loss, hits = train_step(model, x, targets, criterion, optimizer, rt)
        # one device sync per step: the NaN check and the bar need the values anyway
        loss_value, hits = torch.stack([loss, hits.float()]).tolist()
        first_step = first_step or time.time() - start  # with --compile: compilation included
        if not math.isfinite(loss_value):
            raise UserError(f'the loss became {loss_value} at epoch {epoch}, step {step}: {DIVERGED}')
        loss_sum, correct, seen = loss_sum + loss_value * len(targets), correct + hits, seen + len(targets)
        bar.set_description(f'Train Epoch {epoch}/{num_epochs} Loss: {loss_sum / seen:.4f} '
                            f'Acc: {100 * correct / seen:.2f}%')
    bar.close()
    loss_sum, correct, seen = utils.all_reduce_sum([loss_sum, correct, seen], rt.device)
    return {'loss': loss_sum / seen, 'accuracy': 100.0 * correct / seen, 'seconds': time.time() - start,
            'first_step': first_step}


@torch.no_grad()
def extract_features(model, images, rt, dim):
    """Embeddings of every evaluation split, each process embedding its shard -> {split: CPU float [N, dim]}."""
    model.eval()
    features = {}
    for split in images.eval:
        parts = []
        for x in tqdm(images.eval_batches(split), desc=f'Extracting {split} features', disable=not rt.main,
                      dynamic_ncols=True, leave=False):
            with rt.autocast():
                parts.append(model(x)[0].float())  # [B, dim], L2-normalised
        shard = torch.cat(parts) if parts else torch.zeros(0, dim, device=rt.device)
        features[split] = utils.all_gather_rows(shard).cpu()
    return features


def check_finite(model, features, epoch):
    """A diverged model is never evaluated or saved: its embeddings or weights hold NaN or inf, or an embedding
    is all zeros (no direction to rank by: test.py would refuse the database)."""
    if not all(torch.isfinite(t).all() for t in [*features.values(), *model.parameters()]):
        raise UserError(f'the model diverged at epoch {epoch}: NaN or infinite weights or embeddings; {DIVERGED}')
    zero = sum(int((v.norm(dim=1) == 0).sum()) for v in features.values())  # load_database's test: norm > 0
    if zero:
        total = sum(len(v) for v in features.values())
        raise UserError(f'the model diverged at epoch {epoch}: {zero} of {total} embeddings are all zeros; {DIVERGED}')


def retrieval_metrics(features, labels, ks, device):
    """R@k, MAP@R and R-Precision (fractions) on `device`: labels {split: labels} of one split searched against
    itself (test, val), or {'query': ..., 'gallery': ...}."""
    splits = list(labels)  # [split] or ['query', 'gallery']
    vectors = [features[split].to(device) for split in splits]
    if len(splits) == 2:
        return metrics_lib.evaluate(vectors[0], labels[splits[0]], ks, vectors[1], labels[splits[1]])
    return metrics_lib.evaluate(vectors[0], labels[splits[0]], ks)


def metric_columns(prefix, recalls):
    """The CSV columns of one evaluated split: {prefix}_recall@k per k, {prefix}_map@r, {prefix}_r_precision."""
    return [f'{prefix}_recall@{k}' for k in recalls] + [f'{prefix}_{suffix}' for _, suffix, _ in RANKING_METRICS]


def metric_row(prefix, metrics, recalls):
    """evaluate's fractions -> {column: percent} of metric_columns."""
    keys = [f'R@{k}' for k in recalls] + [key for key, _, _ in RANKING_METRICS]
    return {column: 100.0 * metrics[key] for column, key in zip(metric_columns(prefix, recalls), keys)}


def row_text(row, prefix, recalls):
    """'R@1 62.50% R@2 74.31% | MAP@R 18.20% RP 21.05%': a statistics row's {prefix}_* columns (percent, two
    decimals; RP: R-Precision)."""
    recall_text = ' '.join(f'R@{k} {row[f"{prefix}_recall@{k}"]:.2f}%' for k in recalls)
    ranking_text = ' '.join(f'{name} {row[f"{prefix}_{suffix}"]:.2f}%' for _, suffix, name in RANKING_METRICS)
    return f'{recall_text} | {ranking_text}'


def metrics_text(metrics, recalls):
    """'R@1 62.50% R@2 74.31% | MAP@R 18.20% RP 21.05%' of evaluate's fractions."""
    return row_text(metric_row('', metrics, recalls), '', recalls)


def selection_text(best, statistics, config):
    """How the saved epoch was chosen: 'Best R@1 62.50% at epoch 3' (test R@1, the original's protocol), or by
    validation R@1, with the test figures at that epoch."""
    if not config['val_split']:
        return f'Best R@1 {100 * best["recall"]:.2f}% at epoch {best["epoch"]}'
    row = next(row for row in statistics if row['epoch'] == best['epoch'])
    return (f'Selected epoch {best["epoch"]} by validation R@1 {100 * best["recall"]:.2f}%; test at that epoch: '
            f'{row_text(row, "test", config["recalls"])}')


# ---- files: one run per results name, its outputs, checkpoints written in the background ----

def claim_results(config, paths, resumed):
    """Hold this results name for the run (an OS lock, released even when the process is killed) and
    refuse to replace another run's outputs unless asked (check_outputs) -> the lock file's descriptor."""
    folder = config['results_dir']
    check_outputs(config, paths, resumed)  # a refusal creates nothing: checked again once the lock is held
    lock_path = os.path.join(folder, f'.{config["name"]}.lock')
    try:
        os.makedirs(folder, exist_ok=True)
        lock = utils.hold_lock(lock_path, 'train.py', lambda holder: f'another train.py is running on '
                               f'{os.path.join(folder, config["name"])}_* ({holder}); wait for it or use another '
                               f'--results_dir')
    except OSError as err:
        raise UserError(f'cannot write to results folder {folder}: {err.strerror or err}; nothing written') from None
    try:
        try:
            check_outputs(config, paths, resumed)  # another run may have ended in between
            for path in paths.values():
                if config['overwrite'] and os.path.lexists(path):
                    os.remove(path)  # a link itself, never its target
            utils.remove_temporaries(paths.values())  # left by a killed run: the real files are whole
        except OSError as err:
            raise UserError(f'cannot replace the files of {os.path.join(folder, config["name"])}_*: '
                            f'{err.strerror or err}') from None
    except BaseException:
        os.close(lock)
        raise
    return lock


def check_outputs(config, paths, resumed):
    """Refuse to replace any output of this name (a link counts: atomic writes replace links, never
    write through them) unless --overwrite, or --resume continuing it (`resumed`: the checkpoint's
    os.stat when read), or --resume auto starting fresh over what a killed first epoch left."""
    found = [path for path in paths.values() if os.path.lexists(path)]
    checkpoint = paths['checkpoint.pth']
    if not found or config['overwrite'] or config['resume'] not in (None, 'auto'):
        return
    if config['resume'] == 'auto':
        now = os.stat(checkpoint) if os.path.isfile(checkpoint) else None
        if resumed is not None or now is not None:
            if now is None or resumed is None or (now.st_ino, now.st_size, now.st_mtime_ns) != \
                    (resumed.st_ino, resumed.st_size, resumed.st_mtime_ns):
                raise UserError(f'{checkpoint} changed while this run started (another train.py?); run it again')
            return
        if first_epoch_remains(config, paths):
            return
        raise UserError(f'{", ".join(found)} hold a run of this name without a checkpoint (removed, or made with '
                        f'other settings): it cannot be continued; start over with --overwrite (replaces its files)')
    if checkpoint in found:
        done = describe_checkpoint(checkpoint)
        raise UserError(f'{checkpoint} holds a run of this name ({done}); continue it with --resume auto, or start '
                        f'over with --overwrite (replaces its files)' if done else f'{checkpoint} holds a run of this '
                        f'name, but it is damaged or unreadable; start over with --overwrite (replaces its files)')
    raise UserError(f'{", ".join(found)} hold a run of this name without a checkpoint; start over with --overwrite '
                    f'(replaces its files), or choose another --results_dir')


def describe_checkpoint(path):
    """'epoch 3, best R@1 61.20%' of a readable checkpoint, else None."""
    with contextlib.suppress(UserError):
        state = utils.safe_load(path, 'checkpoint')
        if isinstance(state, dict) and type(state.get('epoch')) is int and isinstance(state.get('best_recall'), float):
            chosen = 'validation ' if isinstance(state.get('config'), dict) and state['config'].get('val_split') else ''
            return f'epoch {state["epoch"]}, best {chosen}R@1 {100 * state["best_recall"]:.2f}%'
    return None


def first_epoch_remains(config, paths):
    """Whether outputs without a checkpoint can be what this command's first epoch wrote before a kill
    (the checkpoint is written last): at most one statistics row, a database of these settings or none."""
    if os.path.lexists(paths['statistics.csv']):
        try:
            with open(paths['statistics.csv'], 'rb') as f:
                if len(f.read().splitlines()) > 2:  # the header and epoch 1
                    return False
        except OSError:
            return False
    if not os.path.lexists(paths['data_base.pth']):
        return True  # the model is renamed into place before its database
    try:
        database = utils.safe_load(paths['data_base.pth'], 'feature database')
    except UserError:
        return False
    recorded = database.get('config') if isinstance(database, dict) else None
    return isinstance(recorded, dict) and recorded.get('settings') == run_settings(config)


def statistics_columns(recalls, val=False):
    """The statistics CSV's columns; val: with the validation columns."""
    return list(STAT_COLUMNS) + metric_columns('test', recalls) + (metric_columns('val', recalls) if val else [])


def statistics_csv(statistics, recalls, val=False):
    """Rows -> CSV bytes (pandas; floats at full precision); val: with the validation columns."""
    import pandas as pd
    return pd.DataFrame(statistics, columns=statistics_columns(recalls, val)).to_csv(index=False).encode()


def settings_json(config):
    """The settings that make a run's numbers (RESUME_KEYS), written beside its statistics: summarize.py pools
    only runs that differ in --seed alone."""
    import json
    return (json.dumps(run_settings(config), indent=1, sort_keys=True) + '\n').encode()


def make_database(images, features, config):
    """The feature database test.py searches (utils.load_database's format); the query split of a
    query/gallery dataset is stored under test_*, as the original did."""
    database = {}
    for split, prefix in zip(config['eval_splits'], ('test', 'gallery')):
        database.update({f'{prefix}_images': images.eval[split].images, f'{prefix}_labels': images.eval[split].labels,
                         f'{prefix}_features': features[split]})
    keys = ('backbone_type', 'feature_dim', 'branches', 'num_classes', 'image_size', 'data_name', 'crop_type')
    database['config'] = dict({key: config[key] for key in keys}, mean=list(images.normalize.mean),
                              std=list(images.normalize.std), settings=run_settings(config))
    return database


def epoch_files(epoch, trained, best, statistics, config, images, features):
    """CPU copies of what epoch `epoch` writes (trained: model, optimizer, scheduler, scaler) -> their writer."""
    (model, optimizer, scheduler, scaler), paths, recalls = trained, output_paths(config), config['recalls']
    val = config['val_split'] > 0  # the statistics hold validation columns
    best_files = (utils.to_cpu(model.state_dict()), make_database(images, features, config)) \
        if best['epoch'] == epoch else None
    state = utils.to_cpu({'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                          'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
                          'best_recall': best['recall'], 'best_epoch': best['epoch'], 'statistics': list(statistics),
                          'config': run_settings(config)})

    def write():  # best model and database first, checkpoint last: a kill in between repeats this epoch on resume
        if best_files is not None:
            utils.save_model_and_database(*best_files, paths['model.pth'], paths['data_base.pth'])
        utils.atomic_write({paths['settings.json']: settings_json(config),
                            paths['statistics.csv']: statistics_csv(state['statistics'], recalls, val),
                            paths['curves.png']: utils.plot_curves(state['statistics'], recalls, config['name'])})
        utils.atomic_write({paths['checkpoint.pth']: utils.torch_bytes(state)})
    return write


def run_settings(config):
    """The flags a run's numbers depend on (RESUME_KEYS), as its checkpoint and database record them."""
    return {key: config[key] for key in RESUME_KEYS}


def output_paths(config):
    return {kind: os.path.join(config['results_dir'], f'{config["name"]}_{kind}') for kind in OUTPUTS}


def read_checkpoint(config, rt, paths):
    """The checkpoint to continue from, checked (check_checkpoint) -> (state, path, its os.stat on rank 0), or
    (None, path, None) to start fresh. Rank 0 reads it and hands it to the others: results/ may be on its disk only."""
    auto = config['resume'] == 'auto'
    path = paths['checkpoint.pth'] if auto else config['resume']
    state, read = None, None
    if rt.main and path and os.path.isfile(path):
        read = os.stat(path)
        try:
            state = utils.safe_load(path, 'checkpoint')
        except UserError as err:
            raise UserError(f'{err}; start over with --overwrite (replaces its files)' if auto else str(err)) from None
        check_checkpoint(state, path, config)
    return utils.broadcast_object(state), path, read


def check_checkpoint(state, path, config):
    """Refuse a checkpoint that cannot continue this run: other settings, or any field of the wrong type or range."""
    if not isinstance(state, dict) or not isinstance(state.get('config'), dict):
        raise UserError(f'{path} is not a train.py checkpoint')
    differ = [f'{key}: checkpoint {state["config"].get(key)!r}, now {config[key]!r}'
              for key in RESUME_KEYS if state['config'].get(key) != config[key]]
    if differ:
        raise UserError(f'cannot resume from {path}: it was made with other settings ({"; ".join(differ)}); '
                        f'use the same flags, or start over with --overwrite')
    problem = checkpoint_problem(state, config)
    if problem:  # the settings matched, so the contents were altered or come from another version of train.py
        raise UserError(f'cannot resume from {path}: {problem} (altered, or written by another version of '
                        f'train.py); start over with --overwrite')


def checkpoint_problem(state, config):
    """What is wrong with a checkpoint's fields (the tensors are checked when loaded), or None."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    missing = [key for key in ('epoch', 'model', 'optimizer', 'scheduler', 'scaler', 'best_recall', 'best_epoch',
                               'statistics') if key not in state]
    if missing:
        return f'it lacks {", ".join(missing)}'
    epoch, best_epoch, best_recall, rows = (state[key] for key in ('epoch', 'best_epoch', 'best_recall', 'statistics'))
    if type(epoch) is not int or not 1 <= epoch <= config['num_epochs']:
        return f'its epoch {epoch!r} is not one of 1..{config["num_epochs"]}'
    if type(best_epoch) is not int or not 1 <= best_epoch <= epoch:
        return f'its best_epoch {best_epoch!r} is not one of 1..{epoch}'
    if not isinstance(best_recall, float) or not 0 <= best_recall <= 1:
        return f'its best_recall {best_recall!r} is not a fraction'
    if not isinstance(rows, list) or len(rows) != epoch:
        return f'its statistics are not a list of {epoch} rows, one per epoch done'
    columns = statistics_columns(config['recalls'], config['val_split'] > 0)
    for k, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not all(number(row.get(c)) for c in columns) or row['epoch'] != k:
            return f'its statistics row {k} is not epoch {k} with numbers for {", ".join(columns)}'
    wrong = [key for key in ('model', 'optimizer', 'scheduler', 'scaler') if not isinstance(state[key], dict)]
    return f'its {", ".join(wrong)} not state dicts' if wrong else None


def resume(config, rt, state, path, trained):
    """Load a checked checkpoint into (model, optimizer, scheduler) -> (statistics rows, best, first epoch to run)."""
    if state is None:
        return [], {'recall': -1.0, 'epoch': 0}, 1
    model, optimizer, scheduler = trained
    try:
        utils.load_state_dict_strict(model, state['model'], path)
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if state['scaler'] and rt.scaler.is_enabled():  # empty when saved without fp16 (CPU, bf16, --no_amp)
            rt.scaler.load_state_dict(state['scaler'])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError):
        raise UserError(f'cannot resume from {path}: its contents do not fit this run (altered, or written by '
                        f'another version of train.py); start over with --overwrite') from None
    best = {'recall': state['best_recall'], 'epoch': state['best_epoch']}
    return list(state['statistics']), best, state['epoch'] + 1


# ---- main ----

def build_model(config, rt):
    """The network on the device, and the (compiled) module that training and extraction call."""
    torch.manual_seed(config['seed'])  # the new layers' initial weights come from the seed
    weights = {'imagenet': True, 'none': False}.get(config['pretrained'], config['pretrained'])
    model = model_lib.Model(config['backbone_type'], config['feature_dim'], config['num_classes'],
                            branches=config['branches'], pretrained=weights,
                            freeze_backbone_bn=config['freeze_backbone_bn']).to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None) \
        if rt.world_size > 1 else model
    return model, torch.compile(runner) if config['compile'] else runner


def main(argv=None):
    config, dicts = resolve_config(parse_args(argv))  # before the process group: every process checks alike
    rt = utils.Runtime(utils.init_distributed(config['device']), config['amp'])
    if config['batch_size'] % rt.world_size or config['batch_size'] // rt.world_size < 2:
        raise UserError(f'--batch_size {config["batch_size"]} is the global batch: it must split evenly into at '
                        f'least 2 images for each of the {rt.world_size} processes')
    paths, lock = output_paths(config), None
    try:
        # whatever can refuse the run is read and checked before results/ is touched or anything printed:
        # the checkpoint, the weights (downloaded if need be), the resume itself
        state, path, read = read_checkpoint(config, rt, paths)
        model, runner = build_model(config, rt)
        optimizer = torch.optim.Adam(model.parameters(), lr=config['lr'], weight_decay=WEIGHT_DECAY)
        scheduler = make_scheduler(optimizer, config['num_epochs'])
        progress = resume(config, rt, state, path, (model, optimizer, scheduler))
        del state  # its tensors are in the model and optimizer now
        lock = claim_results(config, paths, read) if rt.main else None  # rank 0 holds the name for the run
        if rt.main:
            shown = dict(config, device=str(rt.device), world_size=rt.world_size,
                         amp=str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off')
            print('Config:\n' + '\n'.join(f'  {key:<18} {value}' for key, value in shown.items()), flush=True)
            with torch.device('meta'):  # counts need shapes only: no weights copied, no real forward
                shape_model = model_lib.Model(config['backbone_type'], config['feature_dim'], config['num_classes'],
                                              branches=config['branches'])
            params, flops = model_lib.count_params_flops(shape_model, config['image_size'])
            print(f'Params: {params / 1e6:.2f}M | FLOPs: {flops / 1e9:.2f}G (at {config["image_size"]}px)', flush=True)
            _, best, first_epoch = progress
            if first_epoch > 1:
                chosen = 'validation ' if config['val_split'] else ''
                print(f'Resuming from {path}: epoch {first_epoch - 1} of {config["num_epochs"]} done, best {chosen}'
                      f'R@1 {100 * best["recall"]:.2f}% (epoch {best["epoch"]})', flush=True)
        utils.barrier()
        run(config, dicts, rt, paths, (model, runner, optimizer, scheduler), progress)
    except torch.OutOfMemoryError:
        raise UserError(f'out of memory on {rt.device}: lower --batch_size (now {config["batch_size"]}) or '
                        f'--image_size (now {config["image_size"]}), or use --cache off') from None
    finally:
        if lock is not None:
            os.close(lock)
    utils.cleanup_distributed()


def run(config, dicts, rt, paths, trained, progress):
    """Train from progress = (statistics rows, best, first epoch) to the last epoch, writing each epoch's files."""
    (model, runner, optimizer, scheduler), (statistics, best, first_epoch) = trained, progress
    images = Images(dicts, config, rt)
    criterion = utils.LabelSmoothingCrossEntropy(SMOOTHING, TEMPERATURE, utils.class_balanced_weights(
        images.targets, config['num_classes'])).to(rt.device)
    labels = {split: images.eval[split].labels for split in config['eval_splits']}
    val_labels = {'val': images.eval['val'].labels} if 'val' in images.eval else None
    dim, recalls = len(config['branches']) * config['feature_dim'], config['recalls']
    if rt.main:
        print(train_set_line(images.epoch_batches(first_epoch), config['batch_size'], rt.world_size,
                             len(images.train)), flush=True)
    if config['eval_untrained'] and first_epoch == 1:
        # a baseline, not saved; every epoch reseeds its RNGs, so the run that follows is the same without it
        features = extract_features(runner, images, rt, dim)
        if rt.main:
            print(f'Before training | {metrics_text(retrieval_metrics(features, labels, recalls, rt.device), recalls)}',
                  flush=True)
    writer = utils.BackgroundWriter()
    try:
        for epoch in range(first_epoch, config['num_epochs'] + 1):
            utils.seed_everything(utils.derive_seed(config['seed'], epoch, rt.rank))
            stats = train_one_epoch(runner, images, criterion, optimizer, rt, epoch, config['num_epochs'], writer)
            utils.broadcast_buffers(model)  # every shard embedded by the model rank 0 saves
            eval_start = time.time()
            features = extract_features(runner, images, rt, dim)
            check_finite(model, features, epoch)
            scheduler.step()
            if rt.main:
                metrics = retrieval_metrics(features, labels, sorted({1, *recalls}), rt.device)
                row = {'epoch': epoch, 'train_loss': stats['loss'], 'train_accuracy': stats['accuracy'],
                       **metric_row('test', metrics, recalls)}
                chosen_by = metrics  # the original's protocol: the epoch of the best test R@1
                if val_labels:  # the held-out training classes choose instead, never a test figure
                    chosen_by = retrieval_metrics(features, val_labels, sorted({1, *recalls}), rt.device)
                    row.update(metric_row('val', chosen_by, recalls))
                eval_seconds, write_start = time.time() - eval_start, time.time()
                statistics.append(row)
                if chosen_by['R@1'] > best['recall']:  # strictly better: the first maximum wins
                    best = {'recall': chosen_by['R@1'], 'epoch': epoch}
                writer.submit(epoch_files(epoch, (model, optimizer, scheduler, rt.scaler), best, statistics, config,
                                          images, features))
                seconds = stats['seconds'] + eval_seconds + time.time() - write_start
                figures = f'val {row_text(row, "val", recalls)} | test {row_text(row, "test", recalls)}' \
                    if val_labels else row_text(row, 'test', recalls)
                print(f'Epoch {epoch}/{config["num_epochs"]} | train loss {stats["loss"]:.4f} acc '
                      f'{stats["accuracy"]:.2f}% | {figures} | {seconds:.2f}s (train '
                      f'{stats["seconds"]:.2f}s, eval {eval_seconds:.2f}s, writes {time.time() - write_start:.2f}s)',
                      flush=True)
                if config['compile'] and epoch == first_epoch:
                    print(f'Compile: {stats["first_step"]:.1f}s (the first training step, compilation included; '
                          f'extraction compiles in its first epoch too)', flush=True)
            utils.barrier()  # the others wait while rank 0 evaluates
    finally:
        writer.close()  # every submitted write is on disk before the process ends
    if rt.main:
        print(f'Nothing to do: all {config["num_epochs"]} epochs are done.' if first_epoch > config['num_epochs'] else
              f'{selection_text(best, statistics, config)}; model {paths["model.pth"]}, '
              f'database {paths["data_base.pth"]}, statistics {paths["statistics.csv"]}', flush=True)


if __name__ == '__main__':
    utils.run_cli(main, INTERRUPTED)
