"""Retrieval from a saved feature database, shared by test.py and serve.py: find the database, load it with its
model, embed query images (one, a batch, or uploaded bytes) as train.py embedded the database, and rank."""
import dataclasses
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image

import utils
from model import Model
from utils import UserError

DATABASE_NAME = re.compile(r'(.+)_(uncropped|cropped)_(.+)_(\d+)_data_base\.pth')  # as train.py names it


def resolve_database_path(name, results_dir):
    """A bare file name is looked up in results_dir (as the original did), then in the current folder; anything
    with a folder in it is a path. A missing database says which training run writes it."""
    in_results, bare = os.path.join(results_dir, name), os.path.dirname(name) == ''
    path = in_results if bare and (os.path.lexists(in_results) or not os.path.lexists(name)) else name
    if os.path.lexists(path):  # a pipe or device goes on, to be refused as not a regular file
        return path
    parts = DATABASE_NAME.fullmatch(os.path.basename(path))
    if parts is None:
        raise UserError(f'database not found: {path} (expected a ..._data_base.pth written by train.py)')
    folder = os.path.dirname(path)  # train.py writes into --results_dir, default 'results'
    keys = ('data_name', 'crop_type', 'backbone_type', 'feature_dim', 'results_dir')[:4 + (folder != 'results')]
    flags = ' '.join(f'--{k} {v}' for k, v in zip(keys, parts.groups() + (folder,)))
    raise UserError(f'database not found: {path}; train the model first: python train.py {flags} (with your '
                    f'--data_path) writes it, or give --data_base the path of an existing database')


def load_model(db, db_path):
    """The model the database records, with the weights of its model file (SHA-checked), strictly."""
    state, model_path = utils.read_model_state(db, db_path)
    try:
        model = Model(*(db['config'][k] for k in ('backbone_type', 'feature_dim', 'num_classes', 'branches')))
    except UserError as err:
        raise UserError(f'{db_path} records model settings that cannot be built: {err}') from None
    utils.load_state_dict_strict(model, state, model_path)
    return model.eval(), model_path


@dataclasses.dataclass
class Database:
    """A checked feature database with its model; `split` is the one searched (isc: the gallery)."""
    path: str
    db: dict
    isc: bool
    model: torch.nn.Module
    model_path: str
    device: torch.device

    @property
    def split(self):
        return 'gallery' if self.isc else 'test'

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


def open_database(name, results_dir, device):
    """Find, read and check a database (test.py's lookup) and build its model on `device` -> Database."""
    path = resolve_database_path(name, results_dir)
    db, isc = utils.load_database(path)
    model, model_path = load_model(db, path)
    return Database(path, db, isc, model.to(device), model_path, device)


@torch.no_grad()
def embed_inputs(model, inputs, device):
    """Retrieval embeddings [B, n*feature_dim] (CPU, float) of preprocessed images [B, 3, s, s]."""
    return model.to(device)(inputs.to(device))[0].float().cpu()


def embed_image(model, path, config, device, data=None):
    """Retrieval embedding [n*feature_dim] of an image file (or its bytes `data`), preprocessed as train.py did the
    database's images."""
    x = utils.eval_input(path, config['image_size'], config['mean'], config['std'], data)  # [3, s, s]
    return embed_inputs(model, x[None], device)[0]


def check_upload(data, name):
    """An uploaded image's bytes before any decode: not empty, an image, and within PIL's MAX_IMAGE_PIXELS (read
    from its header: PIL itself only warns up to twice that, and the JPEG decoder used for embedding not at all)."""
    if not data:
        raise UserError(f'{name} is empty (0 bytes)')
    try:
        utils.open_image(name, data).close()  # reads the header only
    except UserError:  # over the pixel limit
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f'{name} is not an image (or not in a format Pillow reads)') from None
    except Exception as err:  # PIL raises SyntaxError, ValueError... on a damaged header
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f'cannot decode image {name}: {reason} (damaged, or not an image)') from None


def find_image(path, images):
    """Index of the query in a database image list (the same path, or the same file), else None."""
    target = os.path.normcase(os.path.abspath(path))
    same_path = (i for i, p in enumerate(images) if os.path.normcase(os.path.abspath(p)) == target)
    # a link to a database image: stat only the candidates with the same name (a database is large)
    same_file = (i for i, p in enumerate(images) if os.path.basename(p) == os.path.basename(path)
                 and os.path.exists(p) and os.path.samefile(p, path))
    index = next(same_path, None)
    return index if index is not None else next(same_file, None)


def locate_query(db, query_path, isc):
    """Where the query is in the database: (split searched, index to exclude, stored feature or None, label or None)."""
    split = 'gallery' if isc else 'test'
    for part in ('test', 'gallery') if isc else ('test',):
        index = find_image(query_path, db[f'{part}_images'])
        if index is not None:  # isc: a query-split image searches the whole gallery; else the others of its split
            return split, index if part == split else None, db[f'{part}_features'][index], db[f'{part}_labels'][index]
    return split, None, None, None


def check_k(k, images, exclude, asked, source, split):
    """k results exist for a query among `images` of `split` (less the query itself when `exclude` is set, i.e. it
    is one of them), else a UserError saying how many there are; `asked` names the request, e.g. '--retrieval_num 9'."""
    searchable = images - (exclude is not None)
    if k > searchable:
        raise UserError(f'{asked} asks for more images than {source} can return ({searchable} {split} images'
                        f'{" besides the query" if exclude is not None else ""})')


def rank_gallery(query_feature, gallery_features, exclude=None, gallery_labels=None, query_label=None):
    """Gallery indices sorted by cosine similarity to the query, best first -> (indices, scores). Ties go against
    the query, as in metrics.py: when its label is known, other-class items first; then index order."""
    # scores of the whole gallery, then the query's own entry dropped: indexing the scores [N], not the
    # features [N, D] (a 370 MB copy per query at SOP size)
    scores = F.normalize(gallery_features.float(), dim=1) @ F.normalize(query_feature.float(), dim=0)  # [N]
    candidates = torch.arange(len(gallery_features))
    if exclude is not None:  # the query itself is not a result
        candidates = candidates[candidates != exclude]
        scores = scores[candidates]
    order = torch.arange(len(candidates))  # [M] the tie order: index order...
    if query_label is not None:  # ...other-class items ahead of same-class ones
        same = torch.tensor([gallery_labels[i] == query_label for i in candidates.tolist()], dtype=torch.uint8)
        order = torch.argsort(same, stable=True)
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    return candidates[order], scores[order]


def top_k(query_feature, gallery_features, k, exclude=None, gallery_labels=None, query_label=None):
    """The k best gallery items for a query feature -> (indices, scores), lists of k: what test.py writes."""
    indices, scores = rank_gallery(query_feature, gallery_features, exclude, gallery_labels, query_label)
    return indices[:k].tolist(), scores[:k].tolist()
