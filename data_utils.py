"""Turn a downloaded retrieval dataset (CARS196, CUB-200-2011, SOP, In-shop), a folder of class sub-folders, or the
generated demo set into image folders and lists, {data_path}/{name}/{crop_type}_data_dicts.pth: this module writes,
reads and checks that format (the datasets' own files are read by datasets.py)."""
import argparse
import contextlib
import difflib
import filecmp
import io
import os
import pathlib
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm import tqdm

import demo
from cli import SEED_MAX, UserError, check_int, run_cli
from datasets import CROP_TYPES, DATASETS, layout, read_cub, read_own
from files import TEMPORARY_EXTRA, atomic_write, hold_lock, read_bytes, remove_temporaries, safe_load, torch_bytes
from imaging import load_image

MAX_LISTED = 20  # bad files listed by name in one error; the rest are counted
BOXED = ('car', 'cub', 'demo')  # the datasets with bounding boxes: only they get cropped lists


def data_dict_path(data_path, data_name, crop_type):
    """Where the image lists of one dataset and crop type are stored."""
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


def _listing(paths, what):
    """'N <what>:' and at most MAX_LISTED of the paths, one a line."""
    more = [f'... and {len(paths) - MAX_LISTED} more'] if len(paths) > MAX_LISTED else []
    return f'{len(paths)} {what}:\n  ' + '\n  '.join([str(p) for p in paths[:MAX_LISTED]] + more)


# ---- the shared pipeline: check every name and source, place files, write the lists ----

def _describe_classes(labels):
    """'classes 1-100' for a run of class numbers, else a count and the first and last label."""
    if all(label.isdecimal() for label in labels):
        numbers = sorted(int(label) for label in labels)
        first, last = numbers[0], numbers[-1]
        if last - first + 1 == len(numbers):
            return f'classes {first}-{last}' if last > first else f'class {first}'
        return f'{len(numbers)} classes numbered {first} to {last}'
    ordered = sorted(labels)
    return f'{len(ordered)} classes ({ordered[0]} ... {ordered[-1]})' if len(ordered) > 1 else f'class {ordered[0]}'


def _check_annotations(items, splits, root, name):
    """What annotations (data from elsewhere) say, before any file is touched: every output name a plain file name,
    every source inside the dataset folder (lexically: links the dataset holds are followed), no empty split."""
    top, unsafe = os.path.normpath(os.path.abspath(root)), {'/', '\0', os.sep, os.altsep} - {None}
    for item in items:
        if item.name in ('', os.curdir, os.pardir) or any(c in item.name for c in unsafe):
            raise UserError(f'{name}: {item.origin}: output file name {item.name!r} is not a plain file name (a path '
                            f'separator, ".." or an absolute path in the annotation would place it outside '
                            f'{os.path.join(root, "<crop_type>")}); nothing was written')
        if '\0' in item.src or os.path.commonpath([top, os.path.normpath(os.path.abspath(item.src))]) != top:
            raise UserError(f'{name}: {item.origin}: image {item.src!r} is outside the dataset folder {root} '
                            f'(".." or an absolute path in the annotation); nothing was written')
    found = {split: {i.label for i in items if i.split == split} for split in splits}
    empty = [split for split in splits if not found[split]]
    if empty:  # an empty split trains or evaluates nothing
        labels, present = set().union(*found.values()), ' and '.join(s for s in splits if found[s])
        were = 'were' if len(labels) > 1 else 'was'
        have = f'{_describe_classes(labels)} {were} found, all {present}' if labels else 'no image is listed'
        rule = f'; {DATASETS[name].split_rule}' if name in DATASETS else ''
        raise UserError(f'{name}: no {" or ".join(empty)} classes: {have}{rule}; nothing was written')


def _check_image(item):
    """None if the image decodes completely, else a reason (draft mode: fast, yet reads all of a JPEG)."""
    if not os.path.isfile(item.src):
        return 'missing'
    try:
        with Image.open(item.src) as img:
            img.draft('RGB', (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        # the whole first line, never cut mid-word ('... could be decompression bomb DOS attack.')
        return f'unreadable ({(str(err).strip() or type(err).__name__).splitlines()[0]})'
    if item.box is not None and (item.box[2] <= item.box[0] or item.box[3] <= item.box[1]):
        return f'empty bounding box {item.box}'
    return None


def _check_items(items, root, name):
    """Every check before a write (distinct names the file system allows, images that decode) -> (items, sources)."""
    by_name = {}
    for item in items:
        by_name.setdefault(item.name, set()).add(item.src)
    clashes = [f'{n}: ' + ', '.join(sorted(s)) for n, s in by_name.items() if len(s) > 1]
    if clashes:
        raise UserError(f'{name}: different images would get the same file name; ' + _listing(clashes, 'names'))
    name_max = 255  # when the file system does not say
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name_max = max(os.pathconf(root, 'PC_NAME_MAX'), 0) or 255  # -1: no limit given
    too_long = [n for n in by_name if len(os.fsencode(n)) + TEMPORARY_EXTRA > name_max]
    if too_long:
        raise UserError(f'{name}: ' + _listing(too_long, f'output file name(s) longer than the file system allows '
                                               f'({name_max} bytes, {TEMPORARY_EXTRA} of them for a temporary name)') +
                        '\nnothing was written; shorten those class folder or image names')
    items = list({(i.src, i.name, i.split): i for i in items}.values())
    sources = list({i.src: i for i in items}.values())
    reasons = _pmap(_check_image, sources, f'{name}: checking images')  # all problems found in one pass
    missing = [i.src for i, r in zip(sources, reasons) if r == 'missing']
    bad = [f'{i.src}: {r}' for i, r in zip(sources, reasons) if r not in (None, 'missing')]
    parts = ([_listing(missing, 'image file(s) listed by the annotations are missing')] if missing else []) + \
        ([_listing(bad, 'image file(s) are unreadable, truncated or have an empty box')] if bad else [])
    if parts:
        raise UserError(f'{name}: ' + '\n'.join(parts) + f'\nnothing was written; expected layout:\n{layout(name)}')
    return items, sources


def _write_crop(folder, item):
    """Write an image's box crop (JPEG q95, lossless PNG for .png) -> None, or the path if another crop is there."""
    crop = load_image(item.src).crop(item.box)  # any mode -> RGB as training sees it
    buffer, dst = io.BytesIO(), os.path.join(folder, item.name)
    crop.save(buffer, 'PNG' if item.name.lower().endswith('.png') else 'JPEG', quality=95, subsampling=0)
    if not os.path.exists(dst):
        atomic_write({dst: buffer.getvalue()})
    elif read_bytes(dst, 'crop') != buffer.getvalue():
        return dst
    return None


def _pmap(fn, items, desc):
    """fn over items in a thread pool (PIL releases the GIL while decoding), with a progress bar."""
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit='img', leave=False))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C, images not started are skipped


def _place_all(sources, out, name):
    """Originals byte for byte (hard links where possible) in uncropped/, crops in cropped/."""
    linked = [folder for folder in out.values() if os.path.islink(folder)]
    if linked:  # whatever a link points to is no folder of this dataset: never written through
        raise UserError(f'{name}: {linked[0]} is a symbolic link; the images are written only into a real folder: '
                        f'remove the link and run again (a link to the whole dataset folder is fine)')
    originals = {os.path.join(out['uncropped'], i.name): i.src for i in sources}  # {destination: source}
    conflicts = []  # another image under the same name: a conflict, never an overwrite
    for dst, src in originals.items():
        with contextlib.suppress(OSError):  # a hard link, or a copy with the same bytes, is the same image
            if not os.path.lexists(dst) or os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
                continue
        conflicts.append(dst)
    if conflicts:
        raise UserError(f'{name}: ' + _listing(conflicts, 'file(s) already exist and differ from the new image') +
                        f'\nremove {out["uncropped"]} (it holds only links or copies of the originals) and run again')
    for folder in out.values():
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise UserError(f'{name}: cannot create {folder}: {err.strerror or err}') from None
        # killed writes left .{name}.{16 hex}.tmp: one listing finds those of our names (100,000s of images)
        leftovers = {e[1:1 - TEMPORARY_EXTRA] for e in os.listdir(folder) if e.startswith('.') and e.endswith('.tmp')}
        remove_temporaries([os.path.join(folder, i.name) for i in sources if i.name in leftovers])
    for dst, src in tqdm(originals.items(), desc=f'{name}: linking originals', unit='img', leave=False):
        if not os.path.exists(dst):  # one that exists was checked to be the same file
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links not supported: an atomic copy
                atomic_write({dst: read_bytes(src, 'image')})
    if 'cropped' in out:
        written = _pmap(lambda item: _write_crop(out['cropped'], item), sources, f'{name}: writing crops')
        conflicts = [dst for dst in written if dst]
        if conflicts:
            raise UserError(f'{name}: ' + _listing(conflicts, 'crop(s) already exist with other content') +
                            f'\nremove {out["cropped"]} and run again')


def _holds(path, data):
    """True if path is a regular file with exactly these bytes."""
    with contextlib.suppress(OSError):
        return os.path.isfile(path) and os.path.getsize(path) == len(data) and pathlib.Path(path).read_bytes() == data
    return False


def process_items(items, data_path, name, splits=('train', 'test')):
    """Check all names and sources, place them in {name}/uncropped (and crops in {name}/cropped when all have
    boxes), then write the .pth lists atomically, together (else the previous ones stay) -> {crop_type: dicts}."""
    root = os.path.join(data_path, name)
    _check_annotations(items, splits, root, name)
    items, sources = _check_items(items, root, name)
    crop_types = CROP_TYPES if all(i.box is not None for i in items) else ('uncropped',)
    remove_temporaries([data_dict_path(data_path, name, c) for c in CROP_TYPES])
    _place_all(sources, {c: os.path.join(root, c) for c in crop_types}, name)
    # {crop_type: {split: {label: [paths]}}}: splits in order, labels and paths in annotation order
    result = {crop: {split: {} for split in splits} for crop in crop_types}
    for item in items:
        for crop, dicts in result.items():
            dicts[item.split].setdefault(item.label, []).append(os.path.join(root, crop, item.name))
    lists = {data_dict_path(data_path, name, crop): torch_bytes(d) for crop, d in result.items()}
    # lists already as they would be are not rewritten: a processed read-only dataset re-runs
    atomic_write({path: data for path, data in lists.items() if not _holds(path, data)})
    for crop, dicts in result.items():
        summary = ', '.join(f'{s} {len(d)} classes / {sum(map(len, d.values()))} images' for s, d in dicts.items())
        print(f'{name} {crop}: {summary} -> {data_dict_path(data_path, name, crop)}', flush=True)
    return result


# ---- datasets by name: processing one, and reading its lists back (train.py) ----

def _check_options(names, split=None, seed=0):
    """Dataset names and flags, checked before any dataset is touched."""
    for name in names:
        if not name or name != os.path.basename(name) or name.startswith('.'):
            raise UserError(f'--data_name {name!r} must be a folder name inside --data_path (no path separators)')
    check_int('--seed', seed, 0, SEED_MAX)
    fixed = [n for n in names if n in DATASETS or n == 'demo']
    if split is not None and fixed:
        raise UserError(f'--split applies to own class-folder datasets, not to {", ".join(fixed)} (fixed splits)')
    if split is not None and not 0 < split < 1:
        raise UserError(f'--split must be between 0 and 1 (share of classes used for training), got {split}')


def _folder_error(root, name):
    """The message for a missing dataset folder (not the demo's: it is generated)."""
    if name in DATASETS:
        return f'{name}: folder not found: {root}\nexpected layout:\n{layout(name)}'
    return (f'unknown dataset {name!r}: {root} is not a folder. Use one of {", ".join(DATASETS)}, demo, '
            f'or an own dataset laid out as\n{layout(name)}')


def process_dataset(data_path, name, split=None, seed=0):
    """Process one dataset by name (a benchmark, 'demo' or an own class-folder dataset) holding the OS lock
    {data_path}/.{name}.lock: a second run on the same folder stops at once instead of mixing its files in."""
    _check_options([name], split, seed)
    root, splits = os.path.join(data_path, name), ('train', 'test')
    lock = os.path.join(data_path, f'.{name}.lock')  # beside the folder: the demo redraw replaces the folder
    if name == 'demo':
        try:
            os.makedirs(data_path, exist_ok=True)  # the lock file lives there
        except OSError as err:
            raise UserError(f'demo: cannot write the demo images to {root}: {err.strerror or err} '
                            f'(check that {data_path} is a folder and writable)') from None
    elif not os.path.isdir(root):
        raise UserError(_folder_error(root, name))
    try:  # released when the process ends, even killed
        fd = hold_lock(lock, 'data_utils.py', lambda holder: f'another data_utils.py is processing {root} ({holder}); '
                       'wait for it', read_only_ok=True)
    except OSError as err:
        raise UserError(f'cannot create the lock file {lock}: {err.strerror or err}') from None
    try:
        if name == 'demo':
            try:  # the sizes as they are now (tests shrink them)
                demo.make_demo(root, seed, demo.DEMO_CLASSES, demo.DEMO_PER_CLASS)
            except OSError as err:  # disk full, no permission: the next run starts the drawing afresh
                raise UserError(f'demo: cannot write the demo images to {root}: {err.strerror or err} '
                                f'(check free disk space and that {data_path} is writable)') from None
            items = read_cub(root, num_train_classes=demo.DEMO_CLASSES // 2, name='demo')
        elif name in DATASETS:
            items, splits = DATASETS[name].read(root), DATASETS[name].splits
        else:
            items = read_own(root, name, 0.5 if split is None else split)
        return process_items(items, data_path, name, splits)
    finally:
        if fd is not None:
            os.close(fd)


def _near(name, names):
    """The closest of `names` to a mistyped `name` (difflib), else None."""
    return next(iter(difflib.get_close_matches(name, [n for n in names if n != name], n=1)), None)


def load_data_dicts(data_path, data_name, crop_type):
    """Read and check the lists this script wrote -> (dicts, path); each problem is a UserError saying what to run,
    or which near name was meant (the known datasets and the folders in data_path)."""
    _check_options([data_name])
    if crop_type not in CROP_TYPES:
        near = _near(crop_type, CROP_TYPES)
        raise UserError(f'--crop_type {crop_type!r}: expected one of {", ".join(CROP_TYPES)}'
                        f'{f" (did you mean {near}?)" if near else ""}')
    root, path = os.path.join(data_path, data_name), data_dict_path(data_path, data_name, crop_type)
    command = f'`python data_utils.py --data_path {data_path} --data_name {data_name}`'  # makes the lists
    if not os.path.isdir(root):
        folders = []
        with contextlib.suppress(OSError):
            folders = [f for f in os.listdir(data_path)
                       if not f.startswith('.') and os.path.isdir(os.path.join(data_path, f))]
        near = _near(data_name, [*DATASETS, 'demo', *folders]) if data_name not in (*DATASETS, 'demo') else None
        if near:  # a typo: the near name, not a data_utils.py command for the mistyped one (which would fail too)
            raise UserError(f'unknown dataset {data_name!r}: {root} is not a folder; did you mean --data_name {near}? '
                            f'(known datasets: {", ".join(DATASETS)}, demo; folders in {data_path}: '
                            f'{", ".join(sorted(folders)) or "none"})')
        raise UserError(f'demo: folder not found: {root}; the demo is generated: run {command}' if data_name == 'demo'
                        else f'{_folder_error(root, data_name)}\nthen run {command}')
    if not os.path.isfile(path):
        if crop_type == 'cropped' and data_name not in BOXED:  # data_utils.py cannot make these: say what works
            then = '' if os.path.isfile(data_dict_path(data_path, data_name, 'uncropped')) else f', after {command}'
            raise UserError(f'data dict not found: {path}; {data_name} has no bounding boxes, so data_utils.py '
                            f'makes only uncropped lists for it (cropped ones exist for {", ".join(BOXED)}): use '
                            f'--crop_type uncropped{then}')
        boxes = f' (cropped lists exist only for datasets with bounding boxes: {", ".join(BOXED)})'
        raise UserError(f'data dict not found: {path}; run {command} first{boxes if crop_type == "cropped" else ""}')
    dicts = safe_load(path, 'data dict')
    splits = [s for s in ('train', 'test', 'query', 'gallery') if isinstance(dicts, dict) and s in dicts]
    if 'train' not in splits or not ('test' in splits or 'query' in splits and 'gallery' in splits):
        raise UserError(f"data dict {path}: expected splits 'train' and 'test' (or 'query' and 'gallery'), "
                        f"found {sorted(map(str, dicts)) if isinstance(dicts, dict) else type(dicts).__name__}")
    for split in splits:
        lists = dicts[split]  # {label: [image paths]} with at least one path
        well_formed = isinstance(lists, dict) and all(
            isinstance(paths, (list, tuple)) and all(isinstance(p, str) for p in paths) for paths in lists.values())
        if not well_formed or not any(lists.values()):
            raise UserError(f"data dict {path}: split {split!r}: empty or not {{label: [paths]}}; re-run data_utils.py")
    for split in splits:  # after every split's form: the clearer error
        first = next(p for paths in dicts[split].values() for p in paths)
        if not os.path.exists(first):
            raise UserError(f"data dict {path}: images of split '{split}' not found (first: {first}); the "
                            f"dataset moved since data_utils.py ran? re-run it with the current --data_path")
    return dicts, path


# ---- command line ----

def main(argv=None):
    parser = argparse.ArgumentParser(description='Preprocess retrieval datasets into image lists '
                                                 '({data_path}/{name}/{crop_type}_data_dicts.pth)')
    parser.add_argument('--data_path', default='/home/data', type=str, help='folder holding the datasets')
    parser.add_argument('--data_name', nargs='+', help='car, cub, sop, isc, demo or an own folder '
                        'DATA_PATH/NAME/<class>/<image>; default: every benchmark folder present')
    parser.add_argument('--split', type=float, default=None,
                        help='own folders: share of the sorted class names used for training (default 0.5)')
    parser.add_argument('--seed', type=int, default=0, help='demo: random seed of the drawing (0 .. 2**32-1)')
    args = parser.parse_args(argv)
    _check_options(args.data_name or list(DATASETS), args.split, args.seed)
    if args.data_name != ['demo'] and not os.path.isdir(args.data_path):  # the demo makes its folder
        raise UserError(f'--data_path {args.data_path} is not a folder')
    names = args.data_name or [n for n in DATASETS if os.path.isdir(os.path.join(args.data_path, n))]
    if args.data_name is None and len(names) < len(DATASETS):
        print(f'skipping {", ".join(n for n in DATASETS if n not in names)}: no such folder in {args.data_path}',
              flush=True)
    if not names:  # only without --data_name, which takes one name or more
        raise UserError(f'no dataset folder ({", ".join(DATASETS)}) in {args.data_path}; --data_name demo draws one')
    failed = []
    for name in names:
        try:
            process_dataset(args.data_path, name, split=args.split, seed=args.seed)
        except UserError as err:
            if len(names) == 1:
                raise
            print(f'error: {err}', file=sys.stderr, flush=True)  # the other datasets go on
            failed.append(name)
    if failed:
        raise UserError(f'{len(failed)} of {len(names)} datasets not processed: {", ".join(failed)}')


if __name__ == '__main__':
    run_cli(main)
