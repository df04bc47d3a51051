"""Train CLF: class-balanced label-smoothing cross-entropy on the training classes, evaluation on the
unseen test classes after every epoch; writes the statistics, the best model and its feature
database to results/, with a checkpoint each epoch so a killed run resumes where it stopped.

Single process: `python train.py ...`; several GPUs or nodes: `torchrun --nproc_per_node=N train.py ...`."""
import argparse
import math
import os
import time

import torch
from tqdm import tqdm

import cli
import data_utils
import distributed
import batches
import metrics as metrics_lib
import model as model_lib
import retrieval
import runs
import utils
from cli import UserError

# ---- the recipe ----
LR_WITH_WEIGHTS = 1e-4  # Adam on an ImageNet backbone whose BatchNorm stays frozen
LR_FROM_SCRATCH = 1e-3  # without weights the BatchNorm trains and needs a 10x larger rate
WEIGHT_DECAY = 1e-5
SMOOTHING, TEMPERATURE = 0.1, 1.0  # label smoothing and logit temperature of the loss
MILESTONES, GAMMA = (0.6, 0.8), 0.1  # LR x 0.1 after int(0.6 E) and int(0.8 E) epochs

# accepted ranges of the numeric flags: integers low..high, --lr in (0, LR_MAX]
INT_RANGES = {'feature_dim': (1, 8192), 'batch_size': (2, 65536), 'num_epochs': (1, 100000), 'image_size': (16, 1024),
              'seed': (0, cli.SEED_MAX), 'num_workers': (0, 256)}
LR_MAX = 1.0  # far above any rate Adam trains with; 1e38 overflows float32 inside its step

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
    add('--cache', default='auto', choices=batches.CACHE_CHOICES,
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
        cli.check_int(f'--{flag}', getattr(args, flag) or 0, low, high)  # num_workers None: chosen later
    if args.lr is not None:
        cli.check_float('--lr', args.lr, 0, LR_MAX)
    branches = model_lib.parse_branches(args.branches)
    if args.pretrained not in ('imagenet', 'none') and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained {args.pretrained}: expected 'imagenet', 'none' or an existing weights file")
    if args.resume not in (None, 'auto') and os.environ.get('RANK', '0') == '0' and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: checkpoint not found (use 'auto' to start fresh when there is none)")
    if args.resume and args.overwrite:
        raise UserError('--resume continues a run and --overwrite replaces it: pass one of them')
    cli.check_results_dir(args.results_dir)
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
                  num_workers=batches.default_num_workers() if args.num_workers is None else args.num_workers,
                  name=runs.run_name(vars(args)))
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
        cli.stop_point()
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
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], rt.device)
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
            cli.stop_point()
            with rt.autocast():
                parts.append(model(x)[0].float())  # [B, dim], L2-normalised
        shard = torch.cat(parts) if parts else torch.zeros(0, dim, device=rt.device)
        features[split] = distributed.all_gather_rows(shard).cpu()
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
    rt = distributed.Runtime(distributed.init_distributed(config['device']), config['amp'])
    if config['batch_size'] % rt.world_size or config['batch_size'] // rt.world_size < 2:
        raise UserError(f'--batch_size {config["batch_size"]} is the global batch: it must split evenly into at '
                        f'least 2 images for each of the {rt.world_size} processes')
    # whatever can refuse the run is read and checked before results/ is touched or anything printed:
    # the checkpoint, the weights (downloaded if need be), the resume itself
    run = runs.Run(config, rt)
    try:
        model, runner = build_model(config, rt)
        optimizer = torch.optim.Adam(model.parameters(), lr=config['lr'], weight_decay=WEIGHT_DECAY)
        scheduler = make_scheduler(optimizer, config['num_epochs'])
        run.resume(model, optimizer, scheduler)
        resuming = run.claim()
        if rt.main:
            shown = dict(config, device=str(rt.device), world_size=rt.world_size,
                         amp=str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off')
            print('Config:\n' + '\n'.join(f'  {key:<18} {value}' for key, value in shown.items()), flush=True)
            with torch.device('meta'):  # counts need shapes only: no weights copied, no real forward
                shape_model = model_lib.Model(config['backbone_type'], config['feature_dim'], config['num_classes'],
                                              branches=config['branches'])
            params, flops = model_lib.count_params_flops(shape_model, config['image_size'])
            print(f'Params: {params / 1e6:.2f}M | FLOPs: {flops / 1e9:.2f}G (at {config["image_size"]}px)', flush=True)
            if resuming:
                print(resuming, flush=True)
        distributed.barrier()
        with cli.safe_points():  # a signal stops the run between steps, never inside a loader's fork
            train(config, dicts, rt, run, model, runner, optimizer, scheduler)
    except torch.OutOfMemoryError:
        raise UserError(f'out of memory on {rt.device}: lower --batch_size (now {config["batch_size"]}) or '
                        f'--image_size (now {config["image_size"]}), or use --cache off') from None
    finally:
        run.close()  # every submitted write is on disk before the process ends
    distributed.cleanup_distributed()


def train(config, dicts, rt, run, model, runner, optimizer, scheduler):
    """Train from the run's first epoch to the last, evaluating and handing each epoch's files to the run."""
    if run.first_epoch > config['num_epochs']:  # a finished run: nothing to decode or train
        if rt.main:
            print(run.final_line(), flush=True)
        return
    images = batches.Images(dicts, config, rt)
    criterion = utils.LabelSmoothingCrossEntropy(SMOOTHING, TEMPERATURE, utils.class_balanced_weights(
        images.targets, config['num_classes'])).to(rt.device)
    labels = {split: images.eval[split].labels for split in config['eval_splits']}
    val_labels = {'val': images.eval['val'].labels} if 'val' in images.eval else None
    dim, recalls, ks = len(config['branches']) * config['feature_dim'], config['recalls'], sorted({1, *config['recalls']})
    if rt.main:
        print(train_set_line(images.epoch_batches(run.first_epoch), config['batch_size'], rt.world_size,
                             len(images.train)), flush=True)
    if config['eval_untrained'] and run.first_epoch == 1:
        # a baseline, not saved; every epoch reseeds its RNGs, so the run that follows is the same without it
        features = extract_features(runner, images, rt, dim)
        if rt.main:
            print(f'Before training | {runs.metrics_text(retrieval_metrics(features, labels, recalls, rt.device), recalls)}',
                  flush=True)
    for epoch in range(run.first_epoch, config['num_epochs'] + 1):
        cli.stop_point()
        utils.seed_everything(utils.derive_seed(config['seed'], epoch, rt.rank))
        stats = train_one_epoch(runner, images, criterion, optimizer, rt, epoch, config['num_epochs'], run.writer)
        distributed.broadcast_buffers(model)  # every shard embedded by the model rank 0 saves
        eval_start = time.time()
        features = extract_features(runner, images, rt, dim)
        check_finite(model, features, epoch)
        scheduler.step()
        if rt.main:
            test = retrieval_metrics(features, labels, ks, rt.device)
            # the held-out training classes choose the epoch when there are some, never a test figure
            val = retrieval_metrics(features, val_labels, ks, rt.device) if val_labels else None
            row = run.record(epoch, stats, test, val)
            eval_seconds, write_start = time.time() - eval_start, time.time()
            run.save(epoch, model, optimizer, scheduler, database(images, features, config))
            seconds = stats['seconds'] + eval_seconds + time.time() - write_start
            figures = f'val {runs.row_text(row, "val", recalls)} | test {runs.row_text(row, "test", recalls)}' \
                if val_labels else runs.row_text(row, 'test', recalls)
            print(f'Epoch {epoch}/{config["num_epochs"]} | train loss {stats["loss"]:.4f} acc '
                  f'{stats["accuracy"]:.2f}% | {figures} | {seconds:.2f}s (train '
                  f'{stats["seconds"]:.2f}s, eval {eval_seconds:.2f}s, writes {time.time() - write_start:.2f}s)',
                  flush=True)
            if config['compile'] and epoch == run.first_epoch:
                print(f'Compile: {stats["first_step"]:.1f}s (the first training step, compilation included; '
                      f'extraction compiles in its first epoch too)', flush=True)
        distributed.barrier()  # the others wait while rank 0 evaluates
    if rt.main:
        print(run.final_line(), flush=True)


def database(images, features, config):
    """The feature database of an epoch: the evaluation splits' images, labels and embeddings."""
    splits = [(images.eval[s].images, images.eval[s].labels, features[s]) for s in config['eval_splits']]
    val = (images.eval['val'].images, images.eval['val'].labels, features['val']) if 'val' in features else None
    return retrieval.make_database(splits, config, images.normalize.mean, images.normalize.std,
                                   runs.run_settings(config), val)


if __name__ == '__main__':
    cli.run_cli(main, INTERRUPTED)
