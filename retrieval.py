"""The feature database, and nothing else writes, reads or checks it: its fields and format version, save (beside
its model file, tied to it by SHA-256), load and validation, which split a query searches (a dataset with a gallery
searches the gallery), the model rebuilt from it, queries embedded as train.py embedded the database's images, and
the searched features normalised once for search.py (exact search, ties against the query). test.py and serve.py
answer through it.

A database: {'version': VERSION, 'test_images': [paths], 'test_labels': [str], 'test_features': float [N, D],
('gallery_images', 'gallery_labels', 'gallery_features': a query/gallery dataset's gallery, its query split under
test_*, as the original stored it), ('val_images', 'val_labels', 'val_features': the held-out training classes of a
run with --val_split; older databases have none), 'config': {DATABASE_CONFIG, 'settings': the run's settings}}. A
gallery of a folder (index.py, make_folder_gallery) holds only the gallery_* fields, its labels str or None (no
sub-folder), its config the model's database's with 'gallery_dir' added and 'model_file' relative to its own folder.
The image paths
are as train.py was given them (relative ones to the folder it ran in, found from the database's folder when read
from elsewhere); they lie under {data_path}/{data_name}/, so a moved dataset is found under a new data_path."""
import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import sys

import torch
from PIL import Image

import files
import imaging
import search
from cli import UserError
from datasets import IMAGE_EXTENSIONS
from files import atomic_write, load_bytes, read_bytes, safe_load, torch_bytes
from model import Model, load_state_dict_strict

VERSION = 1  # of the format; a database that records none is of version 1 (the fields are the same)
FIELDS = ('images', 'labels', 'features')
MODEL_KEYS = ('backbone_type', 'feature_dim', 'branches', 'num_classes', 'image_size', 'data_name', 'crop_type')
DATABASE_CONFIG = MODEL_KEYS + ('mean', 'std', 'model_file', 'model_sha256')


def make_database(splits, config, mean, std, settings, val=None):
    """A database of splits [(image paths, labels, features [N, D])]: the test split (a query/gallery dataset's
    query split), then the gallery if there is one; val: the validation split, as one more; `config` holds
    MODEL_KEYS. The model file is added on save."""
    named = list(zip(('test', 'gallery'), splits)) + ([('val', val)] if val is not None else [])
    database = {f'{prefix}_{field}': value for prefix, split in named for field, value in zip(FIELDS, split)}
    config = dict({key: config[key] for key in MODEL_KEYS}, mean=list(mean), std=list(std), settings=settings)
    return dict(database, version=VERSION, config=config)


def save_model_and_database(state_dict, database, model_path, database_path):
    """Write a state dict and its feature database together (atomic_write), the database recording the
    model file's name and SHA-256."""
    model_bytes = torch_bytes(state_dict)
    config = dict(database['config'], model_file=os.path.basename(model_path),
                  model_sha256=hashlib.sha256(model_bytes).hexdigest())
    atomic_write({model_path: model_bytes, database_path: torch_bytes(dict(database, config=config))})


def make_folder_gallery(images, labels, features, database, gallery_dir, folder):
    """A gallery database of a folder's images [N] (labels str or None each, features [N, D]) embedded by the model
    of `database` (a Database), to be written into `folder`: it records the same model file and SHA-256."""
    model_file = os.path.relpath(os.path.abspath(database.model_path), os.path.abspath(folder))
    config = dict(database.config, model_file=model_file, gallery_dir=os.path.abspath(gallery_dir))
    return {'version': VERSION, 'gallery_images': list(images), 'gallery_labels': list(labels),
            'gallery_features': features, 'config': config}


def is_folder_gallery(db):
    """Whether a database is a gallery of a folder (index.py), which has no test split."""
    return isinstance(db.get('config'), dict) and 'gallery_dir' in db['config']


def _splits(db):
    """The splits a database holds."""
    return ('gallery',) if is_folder_gallery(db) else ('test', 'gallery') if has_gallery(db) else ('test',)


def _problem(db):
    """What makes a loaded object no usable database, or None."""
    if not isinstance(db, dict):
        return f'it holds a {type(db).__name__}, not a dict'
    if db.get('version', VERSION) != VERSION:
        return (f'it is of format version {db["version"]!r}, this CLF reads version {VERSION}; rebuild it with '
                f'train.py (the same flags and --overwrite)')
    splits, unlabelled = _splits(db), (None,) if is_folder_gallery(db) else ()
    splits += ('val',) if any(key.startswith('val_') for key in db) else ()
    config = db.get('config')
    missing = [f'{s}_{f}' for s in splits for f in FIELDS if f'{s}_{f}' not in db]
    missing += ['config'] if not isinstance(config, dict) else [k for k in DATABASE_CONFIG if k not in config]
    if missing:
        return f'missing {", ".join(missing)}'
    for key in ('feature_dim', 'num_classes', 'image_size'):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] <= 0:
            return f'config {key} must be a positive integer, got {config[key]!r}'
    for key in ('mean', 'std'):
        values = list(config[key]) if isinstance(config[key], (list, tuple)) else []
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) \
                or (key == 'std' and min(values) <= 0):
            return f'config {key} must be three numbers (std positive), got {config[key]!r}'
    dim = len(str(config['branches'])) * config['feature_dim']  # one feature_dim block per branch
    for split in splits:
        images, labels, features = (db[f'{split}_{f}'] for f in FIELDS)
        if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) for p in images) or \
                not isinstance(labels, (list, tuple)) or \
                not all(isinstance(v, (str, int)) or v in unlabelled for v in labels):
            return f'{split}_images and {split}_labels must be lists of paths and labels'
        if not torch.is_tensor(features) or not features.is_floating_point() or features.shape[1:] != (dim,):
            return f'{split}_features must be a float tensor [N, {dim}] (branches x feature_dim)'
        if not len(images) == len(labels) == len(features) or not images:
            return f'{split}: {len(images)} images, {len(labels)} labels, {len(features)} features (unequal or 0)'
        if not torch.isfinite(features).all() or not (features.norm(dim=1) > 0).all():
            return f'{split}_features hold NaN, infinite or all-zero vectors (from a diverged model?)'
    return None


def has_gallery(db):
    """Whether a database searches a separate gallery (In-shop's protocol) rather than its test split itself."""
    return any(key.startswith('gallery_') for key in db)


def load_database(path, data_path=None):
    """Read and check a feature database -> (database, has a gallery). Labels become str; the image paths are
    found from this folder (resolve_images), under `data_path` when given."""
    db = safe_load(path, 'feature database')
    problem = _problem(db)
    if problem:
        raise UserError(f'{path} is not a usable CLF feature database: {problem} (expected the '
                        f'..._data_base.pth that train.py writes)')
    for key in ('test_labels', 'gallery_labels', 'val_labels'):
        if key in db:
            db[key] = [None if v is None else str(v) for v in db[key]]
    for key in ('test_images', 'gallery_images', 'val_images'):
        if key in db:
            db[key] = resolve_images(db[key], db['config'], path, data_path)
    return db, has_gallery(db)


def resolve_images(images, config, db_path, data_path=None):
    """A database's image paths as found from the current folder. Relative ones are relative to the folder
    train.py ran in: when they are not found from here, they are looked up from the database's folder and each
    folder above it (results/ usually lies in that folder). Under `data_path` when given (the dataset moved; as
    train.py's --data_path, the folder holding {data_name}/): each path's part after its {data_name} folder."""
    if data_path is None:
        first = images[0]
        folder = os.path.dirname(os.path.abspath(db_path))
        while not (os.path.isabs(first) or os.path.exists(first)):
            if os.path.exists(os.path.join(folder, first)):  # the folder train.py ran in
                return [os.path.join(folder, p) for p in images]
            folder, above = os.path.dirname(folder), folder
            if folder == above:
                break  # not found anywhere: as stored, for the error that names it
        return list(images)
    name = str(config['data_name'])
    try:
        common = os.path.commonpath(images).split(os.sep)  # the last folder named data_name in it
        prefix = os.sep.join(common[:len(common) - common[::-1].index(name)])
    except ValueError:  # absolute and relative paths mixed, or no folder named data_name
        raise UserError(f'--data_path {data_path}: the images of {db_path} do not all lie in one folder named '
                        f'{name}, so they cannot be found under another --data_path') from None
    resolved = [os.path.join(data_path, name, os.path.relpath(p, prefix)) for p in images]
    if not os.path.isfile(resolved[0]):
        raise UserError(f'--data_path {data_path}: the images of {db_path} are not there (first: {resolved[0]}); '
                        f'give the folder holding {name}/, as train.py\'s --data_path')
    return resolved


def recorded_settings(path):
    """The run settings a readable database records, else None."""
    try:
        db = safe_load(path, 'feature database')
    except UserError:
        return None
    config = db.get('config') if isinstance(db, dict) else None
    return config.get('settings') if isinstance(config, dict) else None


def read_model_state(db, db_path):
    """The state dict of the model file beside a database, checked against its recorded SHA-256 -> (state, path)."""
    # a name beside the database (train.py's), or a path relative to its folder (a gallery of a folder's)
    model_path = os.path.normpath(os.path.join(os.path.dirname(db_path), str(db['config']['model_file'])))
    data = read_bytes(model_path, 'model file')
    if hashlib.sha256(data).hexdigest() != db['config']['model_sha256']:
        raise UserError(f'the model file {model_path} is not the one the database {db_path} was written '
                        f'with (its SHA-256 differs); use the database and model file of the same training run')
    return load_bytes(data, model_path, 'model file'), model_path


class NotFound(UserError):
    """No database at `path` (runs.open_database adds the train.py command that writes one of a run's name)."""

    def __init__(self, path):
        super().__init__(f'database not found: {path} (expected a ..._data_base.pth written by train.py)')
        self.path = path


def resolve_database_path(name, results_dir):
    """A bare file name is looked up in results_dir (as the original did), then in the current folder; anything
    with a folder in it is a path; none there is NotFound."""
    in_results, bare = os.path.join(results_dir, name), os.path.dirname(name) == ''
    path = in_results if bare and (os.path.lexists(in_results) or not os.path.lexists(name)) else name
    if not os.path.lexists(path):  # a pipe or device goes on, to be refused as not a regular file
        raise NotFound(path)
    return path


def load_model(db, db_path):
    """The model the database records, with the weights of its model file (SHA-checked), strictly."""
    state, model_path = read_model_state(db, db_path)
    try:
        model = Model(*(db['config'][k] for k in ('backbone_type', 'feature_dim', 'num_classes', 'branches')))
    except UserError as err:
        raise UserError(f'{db_path} records model settings that cannot be built: {err}') from None
    load_state_dict_strict(model, state, model_path)
    return model.eval(), model_path


@dataclasses.dataclass
class Database:
    """A checked feature database with its model; `split` is the one a query searches."""
    path: str
    db: dict
    has_gallery: bool
    model: torch.nn.Module
    model_path: str
    device: torch.device

    @property
    def split(self):
        return 'gallery' if self.has_gallery else 'test'

    @property
    def images(self):
        return self.db[f'{self.split}_images']

    @property
    def labels(self):
        return self.db[f'{self.split}_labels']

    @property
    def features(self):
        return self.db[f'{self.split}_features']

    @property
    def config(self):
        return self.db['config']

    @functools.cached_property
    def searched(self):
        """The searched split's features as a search.Gallery: normalised once, in the dtype they were saved in."""
        return search.Gallery(self.features)

    def locate(self, query_path):
        """Where a query file is in the database: (index to exclude from the searched split, stored feature or
        None, label or None). A query-split image searches the whole gallery; a test image the rest of its split."""
        for part in _splits(self.db):
            index = find_image(query_path, self.db[f'{part}_images'], self._identities.setdefault(part, {}))
            if index is not None:
                feature, label = self.db[f'{part}_features'][index], self.db[f'{part}_labels'][index]
                return (index if part == self.split else None), feature, label
        return None, None, None

    @functools.cached_property
    def _identities(self):
        """{split: find_image's {(st_dev, st_ino): index} of its images}, each built at its first use."""
        return {}

    def embed(self, inputs):
        """Retrieval embeddings [B, D] (CPU, float) of preprocessed images [B, 3, s, s]."""
        return embed_inputs(self.model, inputs, self.device)

    def embed_files(self, paths, batch_size, progress=None):
        """Retrieval embeddings of image files, decoded and embedded batch_size at a time -> ({path: feature [D]},
        [(path, reason)] of those that cannot be read: each named and skipped). progress(n): n more files done."""
        embedded, unreadable, config = {}, [], self.config
        for begin in range(0, len(paths), batch_size):
            inputs = {}  # path -> [3, s, s]: one batch decoded at a time (bounded memory)
            for path in paths[begin:begin + batch_size]:  # one by one, so that a damaged file is named and skipped
                try:
                    inputs[path] = imaging.eval_input(path, config['image_size'], config['mean'], config['std'],
                                                      upright=True)
                except UserError as err:
                    unreadable.append((path, str(err)))
            if inputs:
                embedded.update(zip(inputs, self.embed(torch.stack(list(inputs.values())))))  # [D] each
            if progress is not None:
                progress(len(paths[begin:begin + batch_size]))
        return embedded, unreadable

    def embed_file(self, path, data=None):
        """Retrieval embedding [D] of a query image file (or its bytes `data`), preprocessed as train.py did the
        database's images, after turning it upright as its EXIF orientation tag says (phone photos)."""
        return embed_image(self.model, path, self.config, self.device, data, upright=True)


def open_database(name, results_dir, device, with_model=True, data_path=None):
    """Find, read and check a database (test.py's lookup) and build its model on `device` -> Database; `data_path`:
    where the dataset is now, when it moved since train.py ran."""
    path = resolve_database_path(name, results_dir)
    db, gallery = load_database(path, data_path)
    model, model_path = load_model(db, path) if with_model else (None, None)
    return Database(path, db, gallery, model and model.to(device), model_path, device)


@torch.no_grad()
def embed_inputs(model, inputs, device):
    """Retrieval embeddings [B, n*feature_dim] (CPU, float) of preprocessed images [B, 3, s, s]."""
    return model.to(device)(inputs.to(device))[0].float().cpu()


def embed_image(model, path, config, device, data=None, upright=True):
    """Retrieval embedding [n*feature_dim] of an image file (or its bytes `data`), preprocessed as train.py did the
    database's images; upright: turned first as its EXIF orientation tag says (imaging.eval_input)."""
    x = imaging.eval_input(path, config['image_size'], config['mean'], config['std'], data, upright)  # [3, s, s]
    return embed_inputs(model, x[None], device)[0]


def list_images(folder, flag):
    """Image files (by extension) under `folder`, recursively, in sorted order; hidden entries are left out. `flag`
    names the folder in errors (e.g. '--query_dir')."""
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is not a folder' if os.path.lexists(folder) else
                        f'{flag} not found: {folder}')
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [os.path.join(root, f) for f in sorted(names)
                  if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise UserError(f'{flag} {folder} holds no image (looked for {", ".join(IMAGE_EXTENSIONS)}, recursively)')
    return found


def regular_images(paths):
    """The paths that are regular files within files.IMAGE_FILE_LIMIT (the check one query image gets), and
    [(path, reason)] of the others, never opened: pipes, devices, links to them (/dev/zero), larger files."""
    problems = {path: files.file_problem(path, 'image', files.IMAGE_FILE_LIMIT) for path in paths}
    return [p for p in paths if problems[p] is None], [(p, problems[p]) for p in paths if problems[p] is not None]


def warn_unreadable(unreadable, total, folder):
    """One 'warning:' line on stderr listing the images of a folder that cannot be read [(path, reason)] (skipped)."""
    if unreadable:
        listed = '; '.join(reason for _, reason in unreadable[:20])  # each names its file
        more = f' and {len(unreadable) - 20} more' if len(unreadable) > 20 else ''
        print(f'warning: {len(unreadable)} of {total} images under {folder} cannot be read and are skipped: '
              f'{listed}{more}', file=sys.stderr, flush=True)


def check_upload(data, name):
    """An uploaded image's bytes before any decode: not empty, an image, within PIL's MAX_IMAGE_PIXELS (read from its
    header: PIL itself only warns up to twice that, and the JPEG decoder used for embedding not at all), and within
    the bounds of an upload's decode, or a JPEG its decoder can reduce to them (imaging.upload_scale)."""
    if not data:
        raise UserError(f'{name} is empty (0 bytes)')
    try:
        with imaging.open_image(name, data) as img:  # reads the header only
            imaging.upload_scale(img, name)
    except UserError:  # over the pixel limit or the bounds of an upload
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f'{name} is not an image (or not in a format Pillow reads)') from None
    except Exception as err:  # PIL raises SyntaxError, ValueError... on a damaged header
        reason = imaging.decode_reason(err)
        raise UserError(f'cannot decode image {name}: {reason} (damaged, or not an image)') from None


def find_image(path, images, identities=None):
    """Index of the query in a database image list: the same path, else the same file under another name (a link or
    a hard link: the same st_dev and st_ino), else None. `identities`: a dict kept between calls for the same list,
    filled with {(st_dev, st_ino): index} at the first query not found by its path (one stat per image, once)."""
    target = os.path.normcase(os.path.abspath(path))
    index = next((i for i, p in enumerate(images) if os.path.normcase(os.path.abspath(p)) == target), None)
    if index is not None:
        return index
    try:
        query = os.stat(path)
    except OSError:  # no file: nothing to compare
        return None
    identities = {} if identities is None else identities
    if not identities:
        for i, p in enumerate(images):
            with contextlib.suppress(OSError):  # a moved database image matches no query
                found = os.stat(p)
                identities.setdefault((found.st_dev, found.st_ino), i)  # the first listing of a file, as by path
        identities.setdefault(None, None)  # built, even where no image could be found
    return identities.get((query.st_dev, query.st_ino))


def check_k(k, images, exclude, asked, source, split):
    """k results exist for a query among `images` of `split` (less the query itself when `exclude` is set, i.e. it
    is one of them), else a UserError saying how many there are; `asked` names the request, e.g. '--retrieval_num 9'."""
    searchable = images - (exclude is not None)
    if k > searchable:
        raise UserError(f'{asked} asks for more images than {source} can return ({searchable} {split} images'
                        f'{" besides the query" if exclude is not None else ""})')
