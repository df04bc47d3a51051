"""Top-K retrieval for one query image from a saved feature database, written as pictures; or for every image
of a folder, written as one CSV.

    python test.py --query_img_name PATH [--data_base NAME_OR_PATH] [--retrieval_num K]
    python test.py --query_dir DIR [--data_base NAME_OR_PATH] [--retrieval_num K]
    python test.py --data_base NAME_OR_PATH --embedding_map

The first writes results/{query stem}/query_img.jpg, retrieval_img_{rank}_{score}.jpg and retrieval.png, the
second results/{DIR's name}_top{K}.csv. A query image that is not in the database is embedded with the
database's model file. The third writes results/{database stem}_map.png: a t-SNE of the database's test
embeddings, each image drawn as a thumbnail at its point, framed in its class's colour."""
import argparse
import colorsys
import contextlib
import csv
import fcntl
import io
import os
import re
import secrets
import shutil
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import retrieval
import utils
from data_utils import IMAGE_EXTENSIONS
from retrieval import embed_image, load_model, locate_query, resolve_database_path
from utils import UserError

TILE = 224  # side of every written picture, as the original
BORDER = 8  # width of the frame around the picture: match (green), mismatch (red), no label known (white)
INNER = TILE - 2 * BORDER  # side of the picture inside the frame
PAD, CAPTION = 8, 44  # row picture: gap around tiles, room for two caption lines under each tile
ROW_MAX = 11  # tiles per line of the row picture (query + 10); a longer top-K wraps onto more lines
BATCH = 32  # --query_dir: images decoded and embedded per forward pass
MARKER = '.written_by_test_py'  # inside every folder test.py writes: only a folder holding it is ever replaced
MARKER_TEXT = b'CLF test.py results; the next run for the same query name replaces this folder whole\n'
DEFAULT_QUERY = '/home/data/car/uncropped/008055.jpg'  # the original's default query
MAP_SIDE, THUMB, FRAME = 2000, 40, 3  # embedding map: canvas side, thumbnail side with its class-coloured frame
MAP_PER_CLASS = 5  # the sample takes at least this many images of each class it shows (where a class has them)
TSNE_PCA_DIMS = 50  # embeddings are reduced to this many dimensions by PCA before t-SNE (the usual practice)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the top-K images of a feature database for a query image '
                                                 '(or for each image of a folder)')
    add = parser.add_argument
    query = parser.add_mutually_exclusive_group()
    query.add_argument('--query_img_name', default=None,
                       help=f'a database image or any image file [default: {DEFAULT_QUERY}, unless --embedding_map '
                            f'is given alone]')
    query.add_argument('--query_dir', help='rank every image under this folder (recursively) into one CSV instead')
    add('--data_base', default='car_uncropped_resnet18_512_data_base.pth', help='a name in --results_dir, or a path')
    add('--retrieval_num', default=8, type=int, help='how many images to retrieve')
    add('--results_dir', default='results', help='where databases are found by name and {query stem}/ is written')
    add('--device', default=None, help='device for a query not in the database [default: cuda if there, else cpu]')
    add('--embedding_map', action='store_true',
        help='write {results_dir}/{database stem}_map.png: a 2-D t-SNE of the test embeddings drawn as thumbnails')
    add('--map_images', default=1500, type=int, help='at most this many images on the map [default: %(default)s]')
    add('--seed', default=0, type=int, help="seed of the map's sample and of t-SNE [default: %(default)s]")
    return parser.parse_args(argv)


def load_query(path):
    """The query as an RGB image; a folder, pipe, missing or undecodable file is a UserError saying so."""
    if os.path.isdir(path):
        raise UserError(f'the query {path} is a folder; give one image file')
    utils.read_bytes(path, 'query image')  # missing, a pipe or device (which PIL would wait on), unreadable
    return utils.load_image(path)  # undecodable: 'cannot decode image ...: reason (damaged, or not an image)'


def database_picture(path, side, db_path):
    """A database image shrunk to side x side (bounded memory); a missing one says the dataset may have moved."""
    if not os.path.isfile(path):
        raise UserError(f'database image not found: {path} (listed in {db_path}; was the dataset moved?)')
    return utils.load_image(path).resize((side, side), resample=Image.BILINEAR)


def _fit(draw, text, font):
    """`text`, cut and ended with '...' where it would not fit under one tile."""
    cut = text
    while text and draw.textlength(cut, font=font) > TILE:
        text = text[:-1]
        cut = text + '...'
    return cut


def encode(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def render(query_image, query_label, hits):
    """Encoded pictures {file name: bytes}: the query and its hits [(rank, score, label, image, path)], each framed,
    and retrieval.png with all of them in a row (ROW_MAX per line), two caption lines under each."""
    known = query_label is not None
    # (file name, image, same label as the query: None where no label is known, caption lines)
    entries = [('query_img.jpg', query_image, None, 'query', f'label {query_label}' if known else 'label unknown')]
    entries += [(f'retrieval_img_{rank}_{score:.4f}.jpg', image, label == query_label if known else None,
                 f'#{rank}  {score:.4f}', f'label {label}') for rank, score, label, image, _ in hits]
    cols, lines = min(len(entries), ROW_MAX), -(-len(entries) // ROW_MAX)
    row = Image.new('RGB', (cols * TILE + (cols + 1) * PAD, lines * (TILE + CAPTION + PAD) + PAD), 'white')
    draw, font = ImageDraw.Draw(row), ImageFont.load_default(size=15)
    files = {}
    for i, (name, image, match, line1, line2) in enumerate(entries):
        # the picture shrunk inside the frame, so that the frame surrounds it instead of covering its edge
        tile = Image.new('RGB', (TILE, TILE), 'white' if match is None else (0, 255, 0) if match else (255, 0, 0))
        tile.paste(image.resize((INNER, INNER), resample=Image.BILINEAR), (BORDER, BORDER))
        files[name] = encode(tile, 'JPEG')
        x, y = PAD + (i % ROW_MAX) * (TILE + PAD), PAD + (i // ROW_MAX) * (TILE + CAPTION + PAD)
        row.paste(tile, (x, y))
        color = 'black' if match is None else (0, 128, 0) if match else (192, 0, 0)
        draw.text((x, y + TILE + 4), _fit(draw, line1, font), fill=color, font=font)
        draw.text((x, y + TILE + 4 + CAPTION // 2), _fit(draw, line2, font), fill=color, font=font)
    files['retrieval.png'] = encode(row, 'PNG')
    return files


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
            utils.atomic_write({os.path.join(tmp, name): data for name, data in files.items()})
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


def list_images(folder):
    """Image files (by extension) under `folder`, recursively, in sorted order; hidden entries are left out."""
    if not os.path.isdir(folder):
        raise UserError(f'--query_dir {folder} is not a folder' if os.path.lexists(folder) else
                        f'--query_dir not found: {folder}')
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise UserError(f'--query_dir {folder} holds no image (looked for {", ".join(IMAGE_EXTENSIONS)}, recursively)')
    return found


def embed_folder(database, paths, batch_size=BATCH):
    """Per query path (stored feature [D] or None, index to exclude, label or None), embedding the images that are
    not in the database in batches; unreadable ones -> (path, reason) in the second list, left out of the first."""
    located = {p: locate_query(database.db, p, database.isc) for p in paths}  # -> (split, exclude, feature, label)
    outside = [p for p in paths if located[p][2] is None]
    unreadable, config = [], database.config
    bar = tqdm(total=len(outside), desc='Embedding queries', dynamic_ncols=True, leave=False)
    for begin in range(0, len(outside), batch_size):
        inputs = {}  # path -> [3, s, s]: one batch decoded at a time (bounded memory)
        for path in outside[begin:begin + batch_size]:  # one by one, so that a damaged file is named and skipped
            try:
                inputs[path] = utils.eval_input(path, config['image_size'], config['mean'], config['std'])
            except UserError as err:
                unreadable.append((path, str(err)))
        if inputs:
            features = retrieval.embed_inputs(database.model, torch.stack(list(inputs.values())), database.device)
            for path, feature in zip(inputs, features):  # [D] each
                located[path] = located[path][:2] + (feature, None)
        bar.update(len(outside[begin:begin + batch_size]))
    bar.close()
    queries = [(p, located[p][2], located[p][1], located[p][3]) for p in paths if located[p][2] is not None]
    return queries, unreadable


def retrieve_folder(folder, data_base, k, results_dir, device):
    """Rank every image under `folder` into {results_dir}/{folder name}_top{k}.csv (query, rank, path, label,
    score; k rows per query, the rows test.py --query_img_name gives for it) -> the CSV's path."""
    paths = list_images(folder)
    database = retrieval.open_database(data_base, results_dir, device)
    queries, unreadable = embed_folder(database, paths)
    if unreadable:
        listed = '; '.join(reason for _, reason in unreadable[:20])  # each names its file
        more = f' and {len(unreadable) - 20} more' if len(unreadable) > 20 else ''
        print(f'warning: {len(unreadable)} of {len(paths)} images under {folder} cannot be read and are skipped: '
              f'{listed}{more}', file=sys.stderr, flush=True)
    if not queries:
        raise UserError(f'no image under --query_dir {folder} could be read; nothing was written')
    images, labels, features = database.images, database.labels, database.features
    excluded = next((exclude for _, _, exclude, _ in queries if exclude is not None), None)  # a database image
    retrieval.check_k(k, len(images), excluded, f'--retrieval_num {k}', database.path, database.split)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(('query', 'rank', 'path', 'label', 'score'))
    for path, feature, exclude, label in queries:
        indices, scores = retrieval.top_k(feature, features, k, exclude, labels, label)
        writer.writerows((path, rank, images[i], labels[i], score)
                         for rank, (i, score) in enumerate(zip(indices, scores), start=1))
    name = os.path.basename(os.path.abspath(folder)) or 'root'  # a name, never a path: the CSV stays in results_dir
    target = os.path.join(results_dir, f'{name}_top{k}.csv')
    utils.atomic_write({target: text.getvalue().encode()})
    print(f'{len(queries)} queries under {folder}, top {k} of the {database.split} images of {database.path} '
          f'each: saved to {target}')
    return target


# ---- the embedding map: t-SNE of the test embeddings, each image a thumbnail at its point ----

def map_sample(labels, limit, seed):
    """Indices of at most `limit` images, class-balanced and drawn from the seed: the classes in a random order,
    each with the same number of random images (or all it has), the number chosen so the sample fills `limit`
    while showing at least MAP_PER_CLASS images of a class -> sorted list."""
    generator = torch.Generator().manual_seed(utils.derive_seed(seed))
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    classes = sorted(members)
    quota = max(limit // len(classes), MAP_PER_CLASS)
    chosen = []
    for c in torch.randperm(len(classes), generator=generator).tolist():
        images = members[classes[c]]
        take = min(quota, len(images), limit - len(chosen))
        chosen += [images[k] for k in torch.randperm(len(images), generator=generator)[:take].tolist()]
        if len(chosen) == limit:
            break
    return sorted(chosen)


def embedding_coordinates(features, seed):
    """2-D t-SNE of embeddings [N, D] (PCA to TSNE_PCA_DIMS first when D is larger) -> float64 numpy [N, 2]."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy().astype('float64')
    if x.shape[1] > TSNE_PCA_DIMS and len(x) > TSNE_PCA_DIMS:
        x = PCA(TSNE_PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < N; 30 is its usual value
    return TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)


def class_colours(labels):
    """{label: RGB}: hues spread by the golden ratio, so classes next in the sorted order differ clearly."""
    return {label: tuple(round(255 * v) for v in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.9, 0.95))
            for k, label in enumerate(sorted(set(labels)))}


def draw_embedding_map(coordinates, thumbnails, labels):
    """PNG bytes of a MAP_SIDE x MAP_SIDE picture: thumbnail k (a PIL image) at coordinates[k] (scaled to the
    canvas), framed in its label's colour."""
    canvas = Image.new('RGB', (MAP_SIDE, MAP_SIDE), 'white')
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    room = MAP_SIDE - THUMB  # top-left corners range over [0, room]
    scale = room / max(float((high - low).max()), 1e-12)  # one scale for both axes: distances kept
    offset = (room - (high - low) * scale) / 2  # [2]: the shorter axis centred
    colours = class_colours(labels)
    for point, thumbnail, label in zip(coordinates, thumbnails, labels):
        tile = Image.new('RGB', (THUMB, THUMB), colours[label])
        tile.paste(thumbnail, (FRAME, FRAME))
        x, y = (point - low) * scale + offset
        canvas.paste(tile, (int(x), int(y)))
    return encode(canvas, 'PNG')


def write_embedding_map(db, db_path, results_dir, limit, seed):
    """results_dir/{database stem}_map.png of the database's test embeddings (a sample of at most `limit`)."""
    images, labels, features = (db[f'test_{k}'] for k in ('images', 'labels', 'features'))
    chosen = map_sample(labels, limit, seed)
    if len(chosen) < 5:
        raise UserError(f'an embedding map needs at least 5 images; {db_path} gives {len(chosen)} '
                        f'(--map_images {limit})')
    target = os.path.join(results_dir, f'{os.path.splitext(os.path.basename(db_path))[0]}_map.png')
    # every picture is read before the slow part, so a moved dataset is found at once
    thumbnails = [database_picture(images[i], THUMB - 2 * FRAME, db_path) for i in chosen]
    start = time.time()
    print(f'Embedding map: t-SNE of {len(chosen)} of the {len(images)} test images '
          f'({len({labels[i] for i in chosen})} classes), running...', flush=True)
    coordinates = embedding_coordinates(features[chosen], seed)
    utils.atomic_write({target: draw_embedding_map(coordinates, thumbnails, [labels[i] for i in chosen])})
    print(f'Embedding map: t-SNE {time.time() - start:.1f}s, saved to {target}', flush=True)
    return target


def retrieve(args, query_path, db, db_path, isc, device):
    """The top --retrieval_num images of the database for one query, written to results_dir/{query stem}/."""
    query_image = load_query(query_path)
    stem = os.path.splitext(os.path.basename(query_path))[0]
    check_replaceable(os.path.join(args.results_dir, stem))  # fail before the work, not after
    model, model_path = load_model(db, db_path)  # always: a database must agree with its model
    split, exclude, query_feature, query_label = locate_query(db, query_path, isc)
    if query_feature is None:  # query by your own photo: embed it as the database images were
        query_feature = embed_image(model, query_path, db['config'], device)
    images, labels, features = (db[f'{split}_{k}'] for k in ('images', 'labels', 'features'))
    retrieval.check_k(args.retrieval_num, len(images), exclude, f'--retrieval_num {args.retrieval_num}', db_path, split)
    indices, scores = retrieval.top_k(query_feature, features, args.retrieval_num, exclude, labels, query_label)
    hits = []  # every picture is read and encoded before anything is written
    for rank, (i, score) in enumerate(zip(indices, scores), start=1):
        hits.append((rank, score, labels[i], database_picture(images[i], INNER, db_path), images[i]))
    target = write_result_folder(args.results_dir, stem, render(query_image, query_label, hits))
    source = (f'label {query_label}, feature from {db_path}' if query_label is not None
              else f'not in the database: embedded with {model_path}')
    searched = len(images) - (exclude is not None)  # the query itself is no result
    print(f'query {query_path} ({source}); top {args.retrieval_num} of {searched} {split} images:')
    for rank, score, label, _, path in hits:
        print(f'{rank:>4}  {score:.4f}  {label:<12} {path}')
    print(f'saved to {target}/')
    return target


def main(argv=None):
    args = parse_args(argv)
    if args.retrieval_num <= 0:
        raise UserError(f'--retrieval_num must be a positive integer, got {args.retrieval_num}')
    if args.map_images < 5:
        raise UserError(f'--map_images must be at least 5, got {args.map_images}')
    utils.check_int('--seed', args.seed, 0, utils.SEED_MAX)
    utils.check_results_dir(args.results_dir)
    device = utils.resolve_device(args.device)
    target = None
    if args.query_dir is not None:
        target = retrieve_folder(args.query_dir, args.data_base, args.retrieval_num, args.results_dir, device)
        if not args.embedding_map:
            return target
    db_path = resolve_database_path(args.data_base, args.results_dir)
    db, isc = utils.load_database(db_path)
    if args.query_img_name is not None or not (args.embedding_map or args.query_dir):  # a map alone runs no query
        target = retrieve(args, args.query_img_name or DEFAULT_QUERY, db, db_path, isc, device)
    if args.embedding_map:
        map_path = write_embedding_map(db, db_path, args.results_dir, args.map_images, args.seed)
        target = target or map_path
    return target


if __name__ == '__main__':
    utils.run_cli(main)
