"""Top-K retrieval for one query image from a saved feature database, written as pictures.

    python test.py --query_img_name PATH [--data_base NAME_OR_PATH] [--retrieval_num K]

writes results/{query stem}/query_img.jpg, retrieval_img_{rank}_{score}.jpg and retrieval.png.
A query image that is not in the database is embedded with the database's model file.
"""
import argparse
import io
import os
import re
import secrets
import shutil

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from model import BACKBONES, Model
from utils import UserError, atomic_write_bytes, load_image, resolve_device, run_cli, safe_load, test_transform

TILE = 224  # side of every written picture, as the original
BORDER = 8  # width of the match (green) / mismatch (red) frame
GREEN, RED = (0, 255, 0), (255, 0, 0)
PAD, CAPTION = 8, 44  # row picture: gap around tiles, room for two caption lines under each tile
ROW_MAX = 11  # tiles per line of the row picture (query + 10); a longer top-K wraps onto more lines
SPLIT_KEYS = ('images', 'labels', 'features')
CONFIG_KEYS = ('backbone_type', 'feature_dim', 'branches', 'num_classes', 'image_size', 'mean', 'std',
               'data_name', 'crop_type', 'model_file')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the top-K images of a feature database for a query image')
    parser.add_argument('--query_img_name', default='/home/data/car/uncropped/008055.jpg', type=str,
                        help='query image: one of the database images, or any image file of your own')
    parser.add_argument('--data_base', default='car_uncropped_resnet18_512_data_base.pth', type=str,
                        help='database written by train.py: a file name in --results_dir, or a path')
    parser.add_argument('--retrieval_num', default=8, type=int, help='how many images to retrieve')
    parser.add_argument('--results_dir', default='results', type=str,
                        help='where databases are looked up by name and results/{query stem}/ is written')
    parser.add_argument('--device', default=None, type=str,
                        help='device that embeds a query image not in the database (default: cuda if there, else cpu)')
    return parser.parse_args(argv)


def resolve_database_path(name, results_dir):
    """A bare file name is looked up in results_dir (as the original did), then in the current folder;
    anything with a folder in it is a path."""
    if os.path.dirname(name) == '':
        in_results = os.path.join(results_dir, name)
        if os.path.isfile(in_results):
            return in_results
        if not os.path.isfile(name):
            raise UserError(f'database not found: {in_results} (--data_base {name} is looked up in '
                            f'--results_dir {results_dir}; give a path to use a file elsewhere)')
    elif not os.path.isfile(name):
        raise UserError(f'database not found: {name} (expected a ..._data_base.pth written by train.py)')
    return name


def _as_list(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _is_number_triple(value):
    value = _as_list(value)
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def check_database(db, path):
    """Check that `db` has the structure train.py writes; labels become str. Returns True when isc-like."""
    expected = ('expected a feature database written by train.py: a dict with test_images, test_labels, '
                'test_features and config (and gallery_* for a query/gallery dataset)')
    if not isinstance(db, dict):
        raise UserError(f'{path} is not a CLF feature database (it holds a {type(db).__name__}); {expected}')
    gallery = [f'gallery_{k}' for k in SPLIT_KEYS]
    isc = any(k in db for k in gallery)
    required = [f'test_{k}' for k in SPLIT_KEYS] + (gallery if isc else []) + ['config']
    missing = [k for k in required if k not in db]
    if missing:
        raise UserError(f'{path} is not a CLF feature database (missing {", ".join(missing)}); {expected}')
    for split in ('test', 'gallery') if isc else ('test',):
        images, labels, features = (db[f'{split}_{k}'] for k in SPLIT_KEYS)
        if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) for p in images):
            raise UserError(f'{path}: {split}_images must be a list of image paths; {expected}')
        if not isinstance(labels, (list, tuple)) or not all(isinstance(v, (str, int)) for v in labels):
            raise UserError(f'{path}: {split}_labels must be a list of label strings; {expected}')
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            raise UserError(f'{path}: {split}_features must be a float tensor [N, D]; {expected}')
        if not len(images) == len(labels) == len(features) or len(images) == 0:
            raise UserError(f'{path}: {split}_images, {split}_labels and {split}_features must have the same, '
                            f'non-zero length (they have {len(images)}, {len(labels)} and {len(features)})')
        db[f'{split}_labels'] = [str(v) for v in labels]
    config = db['config']
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        missing = sorted(set(CONFIG_KEYS) - set(config)) if isinstance(config, dict) else list(CONFIG_KEYS)
        raise UserError(f'{path}: its config lacks {", ".join(missing)}; {expected}')
    for key in ('feature_dim', 'num_classes', 'image_size'):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] <= 0:
            raise UserError(f'{path}: config {key} must be a positive integer, got {config[key]!r}')
    for key in ('backbone_type', 'branches', 'model_file'):
        if not isinstance(config[key], str) or not config[key]:
            raise UserError(f'{path}: config {key} must be a non-empty string, got {config[key]!r}')
    for key in ('mean', 'std'):
        if not _is_number_triple(config[key]):
            raise UserError(f'{path}: config {key} must be three numbers (per RGB channel), got {config[key]!r}')
    if min(_as_list(config['std'])) <= 0:  # the normalisation divides by it
        raise UserError(f'{path}: config std must be positive, got {config["std"]!r}')
    dim = len(config['branches']) * config['feature_dim']  # embedding = concat of one feature per branch
    for split in ('test', 'gallery') if isc else ('test',):
        if db[f'{split}_features'].shape[1] != dim:
            raise UserError(f'{path}: {split}_features have {db[f"{split}_features"].shape[1]} dimensions, but its '
                            f'config (branches {config["branches"]}, feature_dim {config["feature_dim"]}) '
                            f'gives {dim}')
    return isc


def infer_settings(state):
    """Model settings read back from a state dict's tensor names and shapes (branch letters cannot be:
    the pooling has no weights, only the number of branches shows)."""
    found = {}
    projections = [k for k in state if re.fullmatch(r'projections\.\d+\.weight', k)]
    if projections:  # one Linear(C, feature_dim) per branch: [feature_dim, C]
        found['feature_dim'] = int(state[projections[0]].shape[0])
        found['branches'] = len(projections)
    if 'classifier.1.weight' in state:  # BatchNorm1d, then Linear(n*feature_dim, num_classes): [classes, n*d]
        found['num_classes'] = int(state['classifier.1.weight'].shape[0])
    backbone = {k[len('backbone.'):]: tuple(v.shape) for k, v in state.items() if k.startswith('backbone.')}
    for name, (build, _) in BACKBONES.items():
        with torch.device('meta'):  # names and shapes only: nothing allocated, nothing initialised
            layout = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        if layout == backbone:
            found['backbone_type'] = name
    return found


def describe_mismatch(model, state, config):
    """(settings that differ, tensor-level details) between the database's config and a model file."""
    expected = model.state_dict()
    inferred, wanted = infer_settings(state), infer_settings(expected)
    differences = []
    for key in ('backbone_type', 'feature_dim', 'branches', 'num_classes'):
        if key == 'backbone_type' and key not in inferred and wanted.get(key) is not None:
            differences.append(f'backbone_type: database {config[key]}, model file a different backbone')
        elif key in inferred and inferred[key] != wanted.get(key):
            if key == 'branches':  # only the count is in the file
                differences.append(f'branches: database {config[key]} ({len(config[key])} branches), '
                                   f'model file {inferred[key]} branches')
            else:
                differences.append(f'{key}: database {config[key]}, model file {inferred[key]}')
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    details = []
    if missing:
        details.append(f'{len(missing)} tensors missing from the file, e.g. {missing[0]}')
    if unexpected:
        details.append(f'{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}')
    if shapes:
        k = shapes[0]
        details.append(f'{len(shapes)} with another shape, e.g. {k} {list(state[k].shape)} where the database\'s '
                       f'settings give {list(expected[k].shape)}')
    return '; '.join(differences) or 'the tensors differ', '; '.join(details)


def load_model(config, db_path):
    """Build the model the database records and load its model file (beside the database), strictly."""
    model_path = os.path.join(os.path.dirname(db_path), os.path.basename(config['model_file']))
    state = safe_load(model_path, 'model file')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{model_path} is not a model file (expected the state dict that train.py saves '
                        f'as ..._model.pth)')
    try:
        model = Model(config['backbone_type'], config['feature_dim'], config['num_classes'], config['branches'],
                      pretrained=False)
    except UserError as err:
        raise UserError(f'{db_path} records model settings that cannot be built: {err}') from None
    expected = model.state_dict()
    if set(expected) != set(state) or any(tuple(expected[k].shape) != tuple(state[k].shape) for k in expected):
        what, details = describe_mismatch(model, state, config)
        raise UserError(f'the database {db_path} does not match its model file {model_path}: {what} '
                        f'({details}); use the database and model file written by the same training run')
    model.load_state_dict(state, strict=True)
    return model.eval(), model_path


@torch.no_grad()
def embed_image(model, image, config, device):
    """Retrieval embedding [n*feature_dim] of one PIL image, preprocessed like the database's test images."""
    transform = test_transform(config['image_size'], tuple(config['mean']), tuple(config['std']))
    x = transform(image).unsqueeze(0).to(device)  # [1, 3, s, s]
    return model.to(device)(x)[0][0].float().cpu()


def find_image(path, images):
    """Index of the query in a database image list (the same path, or the same file), else None."""
    target = os.path.normcase(os.path.abspath(path))
    name = os.path.basename(path)
    for i, p in enumerate(images):
        if p == path or os.path.normcase(os.path.abspath(p)) == target:
            return i
    for i, p in enumerate(images):  # a link or another spelling of the same file: compare only same names
        if os.path.basename(p) == name:
            try:
                if os.path.samefile(p, path):
                    return i
            except OSError:
                pass
    return None


def rank_gallery(query_feature, gallery_features, exclude=None):
    """Gallery indices sorted by cosine similarity to the query, best first (ties keep index order)."""
    candidates = torch.arange(len(gallery_features))
    if exclude is not None:  # the query itself is not a result
        candidates = candidates[candidates != exclude]
    gallery = F.normalize(gallery_features[candidates].float(), dim=1)  # [M, D]
    scores = gallery @ F.normalize(query_feature.float(), dim=0)  # [M]
    order = torch.sort(scores, descending=True, stable=True).indices
    return candidates[order], scores[order]


def tile(image, color=None):
    """The TILE x TILE picture of an image, framed in `color` (None: no frame)."""
    image = image.resize((TILE, TILE), resample=Image.BILINEAR)
    if color is not None:
        ImageDraw.Draw(image).rectangle((0, 0, TILE - 1, TILE - 1), outline=color, width=BORDER)
    return image


def _fit(draw, text, font):
    """Cut `text` so that it fits under one tile."""
    if draw.textlength(text, font=font) <= TILE:
        return text
    while text and draw.textlength(text + '...', font=font) > TILE:
        text = text[:-1]
    return text + '...'


def row_picture(tiles, captions):
    """Tiles in a row (ROW_MAX per line) with two caption lines under each: captions [(line1, line2, colour)]."""
    cols, lines = min(len(tiles), ROW_MAX), -(-len(tiles) // ROW_MAX)
    width, line_height = cols * TILE + (cols + 1) * PAD, TILE + CAPTION + PAD
    canvas = Image.new('RGB', (width, lines * line_height + PAD), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    for i, (picture, (line1, line2, color)) in enumerate(zip(tiles, captions)):
        x, y = PAD + (i % ROW_MAX) * (TILE + PAD), PAD + (i // ROW_MAX) * line_height
        canvas.paste(picture, (x, y))
        draw.text((x, y + TILE + 4), _fit(draw, line1, font), fill=color, font=font)
        draw.text((x, y + TILE + 4 + CAPTION // 2), _fit(draw, line2, font), fill=color, font=font)
    return canvas


def encode(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def write_result_folder(results_dir, stem, files):
    """Write every file into a fresh hidden folder, then swap it in for results/{stem}: never a half set."""
    target = os.path.join(results_dir, stem)
    tmp = os.path.join(results_dir, f'.{stem}.{secrets.token_hex(4)}.tmp')
    old = None
    try:
        os.makedirs(results_dir, exist_ok=True)
        os.mkdir(tmp)
        for name, data in files.items():
            atomic_write_bytes(data, os.path.join(tmp, name))
        if os.path.lexists(target):  # keep the previous results until the new set is complete
            old = tmp[:-len('.tmp')] + '.old.tmp'
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
        tmp = None
    except UserError as err:
        raise UserError(f'cannot write the results to {target}: {err}') from None
    except OSError as err:
        raise UserError(f'cannot write the results to {target}: {err.strerror or err}; previous results, if any, '
                        f'are unchanged (check free disk space and that {results_dir} is writable)') from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover is not None and os.path.lexists(leftover):
                os.remove(leftover)
    return target


def locate_query(db, query_path, isc):
    """Where the query is in the database: (split searched, index to exclude, stored feature, label);
    feature and label are None for an image the database does not hold."""
    split = 'gallery' if isc else 'test'
    index = find_image(query_path, db['test_images'])
    if index is not None:  # isc: a query-split image searches the whole gallery; else the others
        return split, None if isc else index, db['test_features'][index], db['test_labels'][index]
    if isc and (index := find_image(query_path, db['gallery_images'])) is not None:
        return split, index, db['gallery_features'][index], db['gallery_labels'][index]
    return split, None, None, None


def render(query_image, query_label, hits):
    """Encoded pictures {file name: bytes} for the query and its hits [(rank, score, label, image)]."""
    query_tile = tile(query_image)
    files = {'query_img.jpg': encode(query_tile, 'JPEG')}
    tiles = [query_tile]
    captions = [('query', 'label unknown' if query_label is None else f'label {query_label}', 'black')]
    for rank, score, label, image in hits:
        match = None if query_label is None else label == query_label  # None: no label, no frame
        picture = tile(image, None if match is None else GREEN if match else RED)
        files[f'retrieval_img_{rank}_{score:.4f}.jpg'] = encode(picture, 'JPEG')
        tiles.append(picture)
        text = 'black' if match is None else (0, 128, 0) if match else (192, 0, 0)
        captions.append((f'#{rank}  {score:.4f}', f'label {label}', text))
    files['retrieval.png'] = encode(row_picture(tiles, captions), 'PNG')
    return files


def main(argv=None):
    args = parse_args(argv)
    if args.retrieval_num <= 0:
        raise UserError(f'--retrieval_num must be a positive integer, got {args.retrieval_num}')
    device = resolve_device(args.device)
    db_path = resolve_database_path(args.data_base, args.results_dir)
    db = safe_load(db_path, 'feature database')
    isc = check_database(db, db_path)
    config = db['config']
    query_path = args.query_img_name
    if not os.path.isfile(query_path):
        raise UserError(f'query image not found: {query_path}')
    query_image = load_image(query_path)
    model, model_path = load_model(config, db_path)  # always: a database must agree with its model

    split, exclude, query_feature, query_label = locate_query(db, query_path, isc)
    if query_feature is None:  # query by your own photo: embed it as the database images were
        query_feature = embed_image(model, query_image, config, device)
    images, labels, features = (db[f'{split}_{k}'] for k in SPLIT_KEYS)
    searchable = len(images) - (exclude is not None)
    if args.retrieval_num > searchable:
        raise UserError(f'--retrieval_num {args.retrieval_num} asks for more images than {db_path} can return '
                        f'({searchable} {split} images{" besides the query" if exclude is not None else ""})')
    indices, scores = rank_gallery(query_feature, features, exclude)

    hits = []  # every picture is read and encoded before anything is written
    for rank, (i, score) in enumerate(zip(indices[:args.retrieval_num].tolist(),
                                          scores[:args.retrieval_num].tolist()), start=1):
        if not os.path.isfile(images[i]):
            raise UserError(f'database image not found: {images[i]} (listed in {db_path}; was the dataset moved?)')
        hits.append((rank, score, labels[i], tile(load_image(images[i])), images[i]))  # 224x224: bounded memory
    files = render(query_image, query_label, [h[:4] for h in hits])
    stem = os.path.splitext(os.path.basename(query_path))[0]
    target = write_result_folder(args.results_dir, stem, files)

    source = f'label {query_label}, feature from {db_path}' if query_label is not None else \
        f'not in the database: embedded with {model_path}'
    print(f'query {query_path} ({source}); top {args.retrieval_num} of {searchable} {split} images:')
    for rank, score, label, _, path in hits:
        print(f'{rank:>4}  {score:.4f}  {label:<12} {path}')
    print(f'saved to {target}/')
    return target


if __name__ == '__main__':
    run_cli(main)
