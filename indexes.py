"""Approximate and remote indexes over a feature database's searched split, and nothing else writes, reads or checks
them: a faiss index file beside the database, or a Milvus collection (a server, or a Milvus Lite file). Both are
built from the database (`build`), tied to it by its SHA-256, opened and checked against it (`open_index`) and
searched through one interface: `.search(queries [n, D] float32, normalised, k) -> (scores [n, k], indices [n, k])`
and a one-line `.description`. `top_k` answers a query as exact search does, from the index's candidates.

A faiss index file: FIXED (magic, payload SHA-256, payload length, header length), a JSON header (format version,
spec, the database's file name and SHA-256, rows, dim, search parameters), then faiss's own serialisation of the
index. Evaluation (metrics.evaluate) never uses an index: it is for search only.

faiss and pymilvus are imported where an index is built or opened, so exact search (the default) pays for neither."""
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import search
from cli import UserError, check_int
import files
from files import atomic_file

VERSION = 1  # of the index file's format
MAGIC = b'CLFFAISS'
FIXED = struct.Struct('<8s32sQI')  # magic, payload SHA-256, payload bytes, header bytes
CHUNK_BYTES = 64 * 2 ** 20  # float32 rows normalised and added (faiss) or sent (Milvus) at a time
TRAIN_PER_LIST, TRAIN_MIN = 50, 20_000  # rows sampled to train an index: per inverted list, and at least
RESCORED = 32  # an index's candidates scored exactly per query, k+1 if more: compressed codes (PQ) misorder neighbours
SEED = 0  # of the training sample (and of faiss's k-means, which seeds itself with a fixed number)
MILVUS_COLLECTION = 'clf_gallery'  # the collection a Milvus Lite file PATH.db holds
MILVUS_TIMEOUT_S = 10  # connecting to a Milvus server: a refused connection fails at once, a silent host after this
SHA_PROPERTY = 'clf.database_sha256'  # collection properties: the database the collection was published from
PARAMS_PROPERTY = 'clf.search'  # collection properties: the index type and search parameters (JSON)
# Milvus index types -> (build parameters for n rows of dim d, the search parameter --nprobe/--efsearch sets)
MILVUS_TYPES = {
    'FLAT': (lambda n, d: {}, None),
    'IVF_FLAT': (lambda n, d: {'nlist': _nlist(n)}, 'nprobe'),
    'IVF_SQ8': (lambda n, d: {'nlist': _nlist(n)}, 'nprobe'),
    'IVF_PQ': (lambda n, d: {'nlist': _nlist(n), 'm': _pq_m(d), 'nbits': 8}, 'nprobe'),
    'HNSW': (lambda n, d: {'M': 32, 'efConstruction': 200}, 'ef')}
DEFAULT_SEARCH = {'nprobe': 16, 'ef': 64}


def _nlist(n):
    """Inverted lists for n rows: about 4 sqrt(n), at least 1, at most n / 39 (k-means wants 39 rows a list)."""
    return int(max(1, min(round(4 * n ** 0.5), n // 39, 65536)))


def _pq_m(d):
    """Sub-quantizers of a Milvus IVF_PQ: the most that divides d with at least 8 dimensions each (1 at worst)."""
    return max([m for m in range(1, d // 8 + 1) if d % m == 0] or [1])


def is_milvus(target):
    """Whether --index names a Milvus collection (milvus://HOST:PORT/COLLECTION or a Milvus Lite PATH.db)."""
    return target.startswith('milvus://') or target.endswith('.db')


def normalised(features, begin, end):
    """Rows begin:end of a feature tensor [N, D], L2-normalised, as a C-contiguous float32 array."""
    return np.ascontiguousarray(F.normalize(features[begin:end].float(), dim=1).numpy())


def chunks(n, d):
    """Row ranges of CHUNK_BYTES of float32 each."""
    step = max(1, CHUNK_BYTES // (4 * d))
    return [(begin, min(begin + step, n)) for begin in range(0, n, step)]


def index_path(database_path, spec):
    """Where a faiss index of this spec lives: beside the database, {database stem}_{spec slug}.faiss."""
    stem = os.path.splitext(database_path)[0]
    stem = stem[:-len('_data_base')] if stem.endswith('_data_base') else stem
    return f'{stem}_{re.sub(r"[^0-9a-z]+", "-", spec.lower()).strip("-")}.faiss'


# ---- faiss ----

def import_faiss():
    try:  # imported here: exact search, the default, never pays for it
        import faiss
    except ImportError:
        raise UserError('a faiss index needs the faiss package: pip install faiss-cpu (see requirements.txt)') from None
    return faiss


def set_search_parameters(index, nprobe, efsearch, spec):
    """nprobe (inverted lists searched) and efSearch (HNSW's candidate list) on a faiss index; one its spec does
    not have is a UserError."""
    faiss = import_faiss()
    for name, value, kind in (('nprobe', nprobe, 'inverted lists (IVF)'), ('efSearch', efsearch, 'a graph (HNSW)')):
        if value is not None:
            try:
                faiss.ParameterSpace().set_index_parameter(index, name, value)
            except RuntimeError:
                raise UserError(f'--{name.lower()} applies to an index with {kind}; {spec} has none') from None


def training_sample(n, index, seed):
    """Seeded sample of row indices (sorted) to train an index on: TRAIN_PER_LIST per inverted list, TRAIN_MIN at
    least, every row when there are fewer."""
    ivf = import_faiss().try_extract_index_ivf(index)  # None: no inverted lists (PQ, HNSW, a transform alone)
    lists = ivf.nlist if ivf is not None else 0
    size = min(n, max(TRAIN_PER_LIST * lists, TRAIN_MIN))
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)), lists


def faiss_reason(err):
    """A faiss RuntimeError's reason, without the C++ function, source line and failed assertion it names."""
    reason = (str(err).strip().splitlines() or [''])[-1]
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", '', reason) or 'not understood'


def build_faiss(features, spec, nprobe=None, efsearch=None, seed=SEED, progress=True):
    """A faiss index of `spec` over features [N, D] (inner product on normalised rows): trained on a seeded
    sample, then filled by chunked adds (one chunk of float32 rows in memory beside the features and the index)."""
    faiss = import_faiss()
    n, d = features.shape
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UserError(f'--index {spec}: not a faiss index_factory string for {d} dimensions '
                        f'({faiss_reason(err)})') from None
    set_search_parameters(index, nprobe, efsearch, spec)
    for part in filter(None, (index, faiss.try_extract_index_ivf(index))):
        part = faiss.downcast_index(part)  # PQ codes ordered for a Hamming search, which is never made: 180 s of
        if hasattr(part, 'do_polysemous_training'):  # IVF256,PQ96's 200 s training at SOP size, for nothing
            part.do_polysemous_training = False
    if not index.is_trained:
        sample, lists = training_sample(n, index, seed)
        if n < lists:
            raise UserError(f'--index {spec}: {lists} inverted lists need at least {lists} gallery images to train; '
                            f'the database has {n} (choose fewer lists)')
        try:
            index.train(np.ascontiguousarray(F.normalize(features[torch.from_numpy(sample)].float(), dim=1).numpy()))
        except RuntimeError as err:  # e.g. PQ with more centroids than training rows
            raise UserError(f'--index {spec}: cannot be trained on {len(sample)} rows: {faiss_reason(err)}') from None
    for begin, end in tqdm(chunks(n, d), desc=f'Adding to {spec}', disable=not progress, leave=False):
        index.add(normalised(features, begin, end))
    return index


def save_faiss(index, path, header):
    """Write a faiss index with its header (atomically, streamed: no second copy of the index in memory)."""
    faiss = import_faiss()
    text = json.dumps(dict(header, version=VERSION), sort_keys=True).encode()
    digest, written = hashlib.sha256(), [0]

    with atomic_file(path) as f:
        f.write(FIXED.pack(MAGIC, bytes(32), 0, len(text)) + text)

        def write(block):
            digest.update(block)
            written[0] += len(block)
            return f.write(block)
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        f.seek(0)
        f.write(FIXED.pack(MAGIC, digest.digest(), written[0], len(text)))
    return path


def read_faiss(path):
    """(header, faiss index) of an index file; anything else, damaged or truncated, is a UserError, and the payload
    is checked against its SHA-256 before faiss reads a byte of it (a damaged one could crash faiss)."""
    faiss = import_faiss()
    damaged = f'the index file {path} is damaged or truncated (rebuild it with index.py)'
    if not os.path.isfile(path):
        if os.path.lexists(path):
            raise UserError(f'--index {path} is not a regular file')
        raise UserError(f'index file not found: {path}' + ('' if path.endswith('.faiss') else
                        f' (a spec is built first: index.py --data_base NAME --index {path})'))
    with open(path, 'rb') as f:
        fixed = f.read(FIXED.size)
        if len(fixed) < FIXED.size or fixed[:8] != MAGIC:
            raise UserError(f'{path} is not a CLF index file (expected a .faiss written by index.py --index SPEC)')
        _, sha, size, length = FIXED.unpack(fixed)
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise UserError(damaged) from None
        if not isinstance(header, dict) or header.get('version') != VERSION:
            raise UserError(f'{path} is of another index format version than {VERSION}; rebuild it with index.py')
        start, digest = f.tell(), hashlib.sha256()
        for block in iter(lambda: f.read(2 ** 20), b''):
            digest.update(block)
        if f.tell() - start != size or digest.digest() != sha:
            raise UserError(damaged)
        f.seek(start)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except RuntimeError:
            raise UserError(damaged) from None
    return header, index


class FaissIndex:
    """An opened faiss index file."""

    def __init__(self, path, header, index):
        self.path, self.header, self.index = path, header, index
        params = ', '.join(f'{k} {header[k]}' for k in ('nprobe', 'efsearch') if header.get(k) is not None)
        self.description = (f'faiss {header["spec"]}{f" ({params})" if params else ""}, {header["rows"]:,} rows: '
                            f'{path}')

    def search(self, queries, k):
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # scores, indices [n, k]; -1: none


# ---- Milvus ----

def milvus_target(target):
    """(client URI, collection, what to call it in messages) of milvus://HOST:PORT/COLLECTION or PATH.db."""
    if not target.startswith('milvus://'):
        return os.path.abspath(target), MILVUS_COLLECTION, target
    found = re.fullmatch(r'milvus://([^/:]+|\[[0-9a-fA-F:]+\]):(\d+)/([A-Za-z_][A-Za-z0-9_]*)', target)
    if found is None:
        raise UserError(f'--index {target}: expected milvus://HOST:PORT/COLLECTION (a collection name of letters, '
                        f'digits and underscores) or a Milvus Lite file PATH.db')
    return f'http://{found[1]}:{found[2]}', found[3], target


def milvus_client(uri, shown):
    """A connected MilvusClient; an unreachable server (or an unusable Lite file) is one line."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError('a Milvus index needs pymilvus (and milvus-lite for a .db file): pip install -r '
                        'requirements.txt') from None
    try:
        return MilvusClient(uri=uri, timeout=MILVUS_TIMEOUT_S)
    except Exception as err:  # pymilvus raises MilvusException or grpc errors, of many kinds
        reason = str(getattr(err, 'message', '') or err).strip().splitlines()[0][:200]
        raise UserError(f'cannot reach Milvus at {shown}: {reason} (is the server running?)') from None


def milvus_search(index_type, nprobe, efsearch, recorded):
    """The search parameters of a Milvus index_type: --nprobe / --efsearch where given, else `recorded`'s; one that
    the type does not have is a UserError."""
    search_key, given = MILVUS_TYPES[index_type][1], {'nprobe': nprobe, 'ef': efsearch}
    for key, value in given.items():
        if value is not None and key != search_key:
            raise UserError(f'--{"efsearch" if key == "ef" else key} does not apply to a Milvus {index_type} index')
    return {search_key: given[search_key] or recorded[search_key]} if search_key else {}


def collection_properties(client, collection):
    return dict(client.describe_collection(collection).get('properties') or {})


def build_milvus(database, target, index_type, nprobe=None, efsearch=None, progress=True):
    """Publish the database's searched split (id = index into it, vector, path, label) to a Milvus collection with
    an index of `index_type`: written under a temporary name and renamed over an earlier CLF collection at the end,
    so a failed build leaves the old one (or none) -> target."""
    from pymilvus import DataType
    if index_type not in MILVUS_TYPES:
        raise UserError(f'--milvus_index {index_type}: expected one of {", ".join(MILVUS_TYPES)}')
    if index_type == 'IVF_PQ' and not target.startswith('milvus://'):  # Lite accepts it, then fails to load it
        raise UserError(f'--milvus_index IVF_PQ: Milvus Lite ({target}) builds no IVF_PQ; choose another '
                        f'--milvus_index, or publish to a Milvus server (milvus://HOST:PORT/COLLECTION)')
    uri, collection, shown = milvus_target(target)
    created = not target.startswith('milvus://') and not os.path.lexists(uri)  # a Lite file this build makes
    features, n = database.features, len(database.images)
    d = features.shape[1]
    build_params, search = MILVUS_TYPES[index_type][0], milvus_search(index_type, nprobe, efsearch, DEFAULT_SEARCH)
    client = milvus_client(uri, shown)
    temporary = f'{collection}_building_{secrets.token_hex(4)}'
    try:
        if client.has_collection(collection) and SHA_PROPERTY not in collection_properties(client, collection):
            raise UserError(f'{shown}: collection {collection} exists and was not published by index.py; nothing '
                            f'was changed (choose another collection name)')
        schema = client.create_schema(auto_id=False, description=f'CLF gallery of {os.path.basename(database.path)}')
        schema.add_field('id', DataType.INT64, is_primary=True)  # the index into the database's searched split
        schema.add_field('vector', DataType.FLOAT_VECTOR, dim=d)
        schema.add_field('path', DataType.VARCHAR, max_length=65535)
        schema.add_field('label', DataType.VARCHAR, max_length=65535)
        index_params = client.prepare_index_params()
        index_params.add_index('vector', index_type=index_type, metric_type='IP', params=build_params(n, d))
        properties = {SHA_PROPERTY: files.file_sha256(database.path),
                      PARAMS_PROPERTY: json.dumps({'index_type': index_type, 'search': search, 'rows': n})}
        client.create_collection(temporary, schema=schema, index_params=index_params, properties=properties)
        for begin, end in tqdm(chunks(n, d), desc=f'Publishing to {shown}', disable=not progress, leave=False):
            rows = normalised(features, begin, end)
            client.insert(temporary, [{'id': i, 'vector': rows[i - begin], 'path': database.images[i],
                                       'label': '' if database.labels[i] is None else str(database.labels[i])} for i in range(begin, end)])
        client.flush(temporary)
        if client.has_collection(collection):
            client.drop_collection(collection)
        client.rename_collection(temporary, collection)
    except BaseException as err:
        with contextlib.suppress(Exception):
            client.drop_collection(temporary)
        client.close()
        if created:
            shutil.rmtree(uri, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, UserError):
            reason = str(getattr(err, 'message', '') or err).strip().splitlines()[0][:200]
            raise UserError(f'publishing to {shown} failed: {reason}; nothing was published') from None
        raise
    client.close()
    return target


class MilvusIndex:
    """An opened Milvus collection, checked against the database it was published from."""

    def __init__(self, client, collection, shown, record):
        self.client, self.collection, self.record = client, collection, record
        params = ', '.join(f'{k} {v}' for k, v in record['search'].items())
        self.description = (f'Milvus {record["index_type"]}{f" ({params})" if params else ""}, {record["rows"]:,} '
                            f'rows: {shown}')

    def search(self, queries, k):
        answers = self.client.search(self.collection, data=list(np.asarray(queries, dtype=np.float32)), limit=k,
                                     search_params={'metric_type': 'IP', 'params': self.record['search']},
                                     output_fields=['id'])
        scores = np.full((len(answers), k), -np.inf, dtype=np.float32)
        indices = np.full((len(answers), k), -1, dtype=np.int64)
        for row, hits in enumerate(answers):
            for column, hit in enumerate(list(hits)[:k]):
                scores[row, column], indices[row, column] = hit['distance'], hit['id']
        return scores, indices


def open_milvus(target, database, nprobe=None, efsearch=None):
    uri, collection, shown = milvus_target(target)
    if not target.startswith('milvus://') and not os.path.isdir(uri):
        raise UserError(f'Milvus Lite file not found: {target} (publish one with index.py --index {target})')
    client = milvus_client(uri, shown)
    try:
        if not client.has_collection(collection):
            raise UserError(f'{shown} has no collection {collection} (publish it with index.py --index {target})')
        properties = collection_properties(client, collection)
        if SHA_PROPERTY not in properties:
            raise UserError(f'{shown}: collection {collection} was not published by index.py')
        if properties[SHA_PROPERTY] != files.file_sha256(database.path):
            raise UserError(f'{shown} was published from another database than {database.path} (its SHA-256 '
                            f'differs); publish this one with index.py --index {target}')
        record = json.loads(properties[PARAMS_PROPERTY])
        record['search'] = milvus_search(record['index_type'], nprobe, efsearch, record['search'])
        client.load_collection(collection)
    except UserError:
        client.close()
        raise
    except Exception as err:
        client.close()
        reason = str(getattr(err, 'message', '') or err).strip().splitlines()[0][:200]
        raise UserError(f'cannot open collection {collection} at {shown}: {reason}') from None
    return MilvusIndex(client, collection, shown, record)


# ---- one interface ----

def check_search(nprobe, efsearch):
    for flag, value in (('--nprobe', nprobe), ('--efsearch', efsearch)):
        if value is not None:
            check_int(flag, value, 1, 1 << 20)


def build(database, target, nprobe=None, efsearch=None, milvus_index='HNSW', seed=SEED, progress=True):
    """Build an index of a retrieval.Database's searched split: a faiss spec -> the .faiss path beside the
    database; a Milvus URI or Lite file -> the target, published."""
    check_search(nprobe, efsearch)
    if is_milvus(target):
        return build_milvus(database, target, milvus_index, nprobe, efsearch, progress)
    index = build_faiss(database.features, target, nprobe, efsearch, seed, progress)
    header = {'spec': target, 'database_file': os.path.basename(database.path),
              'database_sha256': files.file_sha256(database.path), 'split': database.split, 'rows': index.ntotal,
              'dim': index.d, 'nprobe': nprobe, 'efsearch': efsearch, 'seed': seed}
    return save_faiss(index, index_path(database.path, target), header)


def open_index(target, database, nprobe=None, efsearch=None):
    """An index of `database` (a .faiss path, milvus://HOST:PORT/COLLECTION or PATH.db), checked to have been
    built from this very database file, searched with nprobe / efsearch where given (else as it was built) -> an
    object with .search and .description; None for a target None (exact search)."""
    check_search(nprobe, efsearch)
    if target is None and (nprobe, efsearch) != (None, None):
        raise UserError('--nprobe and --efsearch set how an index is searched: give --index too')
    if target is None:
        return None
    if is_milvus(target):
        return open_milvus(target, database, nprobe, efsearch)
    header, index = read_faiss(target)
    if header.get('database_sha256') != files.file_sha256(database.path):
        raise UserError(f'the index {target} was built from another database ({header.get("database_file")}) than '
                        f'{database.path} (its SHA-256 differs); build one with index.py --data_base {database.path} '
                        f'--index {header.get("spec")}')
    if (index.ntotal, index.d) != tuple(database.features.shape):
        raise UserError(f'the index {target} holds {index.ntotal} x {index.d} features, the database '
                        f'{database.path} {tuple(database.features.shape)}: rebuild it with index.py')
    header.update((key, value) for key, value in (('nprobe', nprobe), ('efsearch', efsearch)) if value is not None)
    set_search_parameters(index, header.get('nprobe'), header.get('efsearch'), header.get('spec'))
    return FaissIndex(target, header, index)


def top_k(index, database, query_feature, k, exclude=None, query_label=None):
    """The k best of the database's searched split for a query feature [D] found through an index -> (indices,
    scores), lists as search.top_k's: the index's RESCORED (or k+1) candidates scored exactly and ordered by the
    exact search's rule (ties against the query, then index order). An index that finds fewer than k gives fewer."""
    query = F.normalize(query_feature.float(), dim=0).numpy()[None]  # [1, D]
    _, found = index.search(query, max(RESCORED, k + (exclude is not None)))  # [1, k'] candidates
    candidates = sorted({int(i) for i in found[0] if i >= 0 and i != exclude})  # index order, for the tie rule
    if not candidates:
        return [], []
    labels = [database.labels[i] for i in candidates]
    order, scores = search.top_k(query_feature, database.features[candidates], min(k, len(candidates)), None,
                                 labels, query_label)
    return [candidates[i] for i in order], scores


def describe(index):
    """What a search uses, in one line: the index's description, or exact search."""
    return 'exact search' if index is None else index.description


# ---- index.py's mode ----

def add_search_arguments(add, default='what the index was built with'):
    """--nprobe and --efsearch: index.py's record them in the index, test.py's and serve.py's override that."""
    add('--nprobe', default=None, type=int, help=f'inverted lists searched per query (IVF indexes) [{default}]')
    add('--efsearch', default=None, type=int, help=f'candidate list of an HNSW search [{default}]')


def add_arguments(parser, modes):
    """index.py's flags for building an index: --index in the group of its modes, its parameters."""
    add = parser.add_argument
    modes.add_argument('--index', default=None, help='a faiss index_factory spec (IVF4096,Flat, IVF16384,PQ64, HNSW32, ...) built '
        'beside the database, or milvus://HOST:PORT/COLLECTION or PATH.db (Milvus Lite) to publish the gallery to')
    add_search_arguments(add, f'faiss: 1 and 16, Milvus: {DEFAULT_SEARCH["nprobe"]} and {DEFAULT_SEARCH["ef"]}')
    add('--milvus_index', default='HNSW', choices=tuple(MILVUS_TYPES), help='the index type of a Milvus collection '
        '[default: %(default)s]')


def build_from_args(args, database):
    """index.py --data_base NAME --index SPEC|URI: build it, say what was built -> its path or URI."""
    start = time.perf_counter()
    built = build(database, args.index, args.nprobe, args.efsearch, args.milvus_index)
    shown = args.milvus_index if is_milvus(args.index) else args.index
    print(f'{shown} index of the {len(database.images):,} {database.split} images of {database.path} built in '
          f'{time.perf_counter() - start:.1f}s', flush=True)
    return built
