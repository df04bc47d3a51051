"""Top-K retrieval for one query image from a saved feature database, written as pictures; or for every image
of a folder, written as one CSV.

    python test.py --query_img_name PATH [--data_base NAME_OR_PATH] [--retrieval_num K]
    python test.py --query_dir DIR [--data_base NAME_OR_PATH] [--retrieval_num K]
    python test.py --data_base NAME_OR_PATH --embedding_map
    python test.py --data_base NAME_OR_PATH --evaluate [--rerank aqe|kreciprocal [--rerank_args k=10] | --tune]

The first writes results/{query stem}/query_img.jpg, retrieval_img_{rank}_{score}.jpg and retrieval.png, the
second results/{DIR's name}_top{K}.csv. A query image that is not in the database is embedded with the
database's model file. The third writes results/{database stem}_map.png: a t-SNE of the database's test
embeddings, each image drawn as a thumbnail at its point, framed in its class's colour. The fourth prints the
database's figures per split as train.py's epoch line does; --rerank post-processes every search (rerank.py)."""
import argparse
import csv
import io
import os
import time

import torch
from PIL import Image
from tqdm import tqdm

import cli
import distributed
import files
import imaging
import indexes
import pictures
import rerank
import rerank_eval
import retrieval
import runs
from cli import UserError

BATCH = 32  # --query_dir: images decoded and embedded per forward pass
FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')  # a CSV cell starting so is a formula to a spreadsheet
DEFAULT_QUERY = '/home/data/car/uncropped/008055.jpg'  # the original's default query


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the top-K images of a feature database for a query image '
                                                 '(or for each image of a folder)')
    add = parser.add_argument
    query = parser.add_mutually_exclusive_group()
    query.add_argument('--query_img_name', default=None,
                       help=f'a database image or any image file [default: {DEFAULT_QUERY}, unless --embedding_map '
                            f'is given alone]')
    query.add_argument('--query_dir', help='rank every image under this folder (recursively) into one CSV instead')
    add('--data_base', default=runs.DEFAULT_DATABASE, help='a name in --results_dir, or a path')
    add('--retrieval_num', default=8, type=int, help='how many images to retrieve')
    add('--index', default=None, help='search this index of the database (a .faiss file, milvus://HOST:PORT/'
                                      'COLLECTION or a Milvus Lite PATH.db; index.py builds them) [default: exact]')
    indexes.add_search_arguments(add)
    add('--results_dir', default='results', help='where databases are found by name and {query stem}/ is written')
    add('--data_path', default=None, help="the dataset folder, when it moved since train.py's --data_path")
    add('--device', default=None, help='device for a query not in the database [default: cuda if there, else cpu]')
    add('--embedding_map', action='store_true',
        help='write {results_dir}/{database stem}_map.png: a 2-D t-SNE of the test embeddings drawn as thumbnails')
    add('--map_images', default=1500, type=int, help='at most this many images on the map [default: %(default)s]')
    add('--seed', default=0, type=int, help="seed of the map's sample and of t-SNE [default: %(default)s]")
    add('--evaluate', action='store_true', help="print the database's R@K, MAP@R and RP per split (val, test)")
    add('--rerank', default='none', choices=list(rerank.METHODS), help='post-processing [default: %(default)s]')
    add('--rerank_args', default=None, help="the method's parameters, e.g. k=10,alpha=3 [default: --tune's choice]")
    add('--tune', action='store_true', help="choose --rerank's parameters on the validation split, then evaluate")
    return parser.parse_args(argv)


def load_query(path):
    """The query as an RGB image; a folder, pipe, missing or undecodable file is a UserError saying so."""
    if os.path.isdir(path):
        raise UserError(f'the query {path} is a folder; give one image file')
    files.check_image_file(path, 'query image')  # missing, a pipe or device (which PIL would wait on), too large
    # undecodable: 'cannot decode image ...: reason (damaged, or not an image)'; turned upright as EXIF says
    return imaging.load_image(path, upright=True)


def database_picture(path, side, db_path):
    """A database image shrunk to side x side (bounded memory); a missing one says the dataset may have moved."""
    if not os.path.isfile(path):
        raise UserError(f'database image not found: {path} (listed in {db_path}; was the dataset moved?)')
    return imaging.load_image(path).resize((side, side), resample=Image.BILINEAR)


def embed_folder(database, paths, batch_size=BATCH):
    """[(path, feature [D], index to exclude or None, label or None)] of the readable queries: a database image's
    stored feature, else its embedding, in batches; unreadable ones -> (path, reason) in the second list."""
    located = {p: database.locate(p) for p in paths}  # -> (exclude, feature, label)
    outside = [p for p in paths if located[p][1] is None]
    with tqdm(total=len(outside), desc='Embedding queries', dynamic_ncols=True, leave=False) as bar:
        embedded, unreadable = database.embed_files(outside, batch_size, bar.update)
    located.update({path: (None, feature, None) for path, feature in embedded.items()})
    queries = [(p, located[p][1], located[p][0], located[p][2]) for p in paths if located[p][1] is not None]
    return queries, unreadable


def as_text(cell):
    """A CSV text cell (a file name, a label) that a spreadsheet shows as text: one starting with =, +, -, @, a tab
    or a carriage return would be read as a formula, so it gets the usual leading apostrophe; no label is ''."""
    if cell is None:
        return ''
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def ranked(database, index, reranker, feature, k, exclude, label):
    """The top k (indices, scores) for a query feature: exact search post-processed by `reranker`, or
    through `index` (indexes.open_index)."""
    if index is None:
        return reranker.top_k(feature, k, exclude, label)
    return indexes.top_k(index, database, feature, k, exclude, label)


def retrieve_folder(database, folder, k, results_dir, reranker, index=None):
    """Rank every image under `folder` into {results_dir}/{folder name}_top{k}.csv (query, rank, path, label,
    score; k rows per query, the rows test.py --query_img_name gives for it) -> the CSV's path."""
    paths, skipped = retrieval.regular_images(retrieval.list_images(folder, '--query_dir'))
    queries, unreadable = embed_folder(database, paths)
    unreadable = skipped + unreadable
    retrieval.warn_unreadable(unreadable, len(paths) + len(skipped), folder)
    if not queries:
        raise UserError(f'no image under --query_dir {folder} could be read; nothing was written')
    images, labels = database.images, database.labels
    excluded = next((exclude for _, _, exclude, _ in queries if exclude is not None), None)  # a database image
    retrieval.check_k(k, len(images), excluded, f'--retrieval_num {k}', database.path, database.split)
    if index is None:  # (indices [n, k], scores [n, k]) in chunks
        found = [t.tolist() for t in reranker.top_k_batch(torch.stack([q[1] for q in queries]), k,
                                                          [q[2] for q in queries], [q[3] for q in queries])]
    else:  # one query at a time through the index
        found = zip(*(indexes.top_k(index, database, feature, k, exclude, label) for _, feature, exclude, label in queries))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(('query', 'rank', 'path', 'label', 'score'))
    for (path, _, _, _), indices, scores in zip(queries, *found):
        writer.writerows((as_text(path), rank, as_text(images[i]), as_text(labels[i]), score)
                         for rank, (i, score) in enumerate(zip(indices, scores), start=1))
    name = os.path.basename(os.path.abspath(folder)) or 'root'  # a name, never a path: the CSV stays in results_dir
    target = os.path.join(results_dir, f'{name}_top{k}.csv')
    files.atomic_write({target: text.getvalue().encode()})
    print(f'{len(queries)} queries under {folder}, top {k} of the {database.split} images of {database.path} '
          f'each: saved to {target}')
    return target


def write_embedding_map(database, results_dir, limit, seed):
    """results_dir/{database stem}_map.png of the database's test embeddings (a sample of at most `limit`)."""
    if retrieval.is_folder_gallery(database.db):
        raise UserError(f'{database.path} is a gallery of a folder (index.py): an embedding map is drawn from the '
                        f'test split of a database train.py wrote')
    images, labels, features = (database.db[f'test_{k}'] for k in ('images', 'labels', 'features'))
    chosen = pictures.map_sample(labels, limit, seed)
    if len(chosen) < 5:
        raise UserError(f'an embedding map needs at least 5 images; {database.path} gives {len(chosen)} '
                        f'(--map_images {limit})')
    target = os.path.join(results_dir, f'{os.path.splitext(os.path.basename(database.path))[0]}_map.png')
    pictures.check_spread(features[chosen], database.path)  # collapsed embeddings: one line, no map, no crash
    # every picture is read before the slow part, so a moved dataset is found at once
    thumbnails = [database_picture(images[i], pictures.THUMB - 2 * pictures.FRAME, database.path) for i in chosen]
    start = time.time()
    print(f'Embedding map: t-SNE of {len(chosen)} of the {len(images)} test images '
          f'({len({labels[i] for i in chosen})} classes), running...', flush=True)
    coordinates = pictures.embedding_coordinates(features[chosen], seed, database.path)
    files.atomic_write({target: pictures.draw_embedding_map(coordinates, thumbnails, [labels[i] for i in chosen])})
    print(f'Embedding map: t-SNE {time.time() - start:.1f}s, saved to {target}', flush=True)
    return target


def retrieve(database, query_path, k, results_dir, reranker, index=None):
    """The top k images of the database for one query, written to results_dir/{query stem}/."""
    query_image = load_query(query_path)
    stem = os.path.splitext(os.path.basename(query_path))[0]
    files.check_replaceable(os.path.join(results_dir, stem))  # fail before the work, not after
    exclude, query_feature, query_label = database.locate(query_path)
    stored = query_feature is not None
    if not stored:  # query by your own photo: embed it as the database images were
        query_feature = database.embed_file(query_path)
    images, labels, split = database.images, database.labels, database.split
    retrieval.check_k(k, len(images), exclude, f'--retrieval_num {k}', database.path, split)
    indices, scores = ranked(database, index, reranker, query_feature, k, exclude, query_label)
    hits = []  # every picture is read and encoded before anything is written
    for rank, (i, score) in enumerate(zip(indices, scores), start=1):
        hits.append((rank, score, labels[i], database_picture(images[i], pictures.INNER, database.path), images[i]))
    target = files.write_result_folder(results_dir, stem, pictures.render(query_image, query_label, hits))
    source = (f'label {query_label}, feature from {database.path}' if stored
              else f'not in the database: embedded with {database.model_path}')
    searched = len(images) - (exclude is not None)  # the query itself is no result
    print(f'query {query_path} ({source}); top {k} of {searched} {split} images:')
    for rank, score, label, _, path in hits:
        print(f'{rank:>4}  {score:.4f}  {"-" if label is None else label:<12} {path}')
    print(f'saved to {target}/')
    return target


def main(argv=None):
    args = parse_args(argv)
    if args.retrieval_num <= 0:
        raise UserError(f'--retrieval_num must be a positive integer, got {args.retrieval_num}')
    if args.map_images < 5:
        raise UserError(f'--map_images must be at least 5, got {args.map_images}')
    cli.check_int('--seed', args.seed, 0, cli.SEED_MAX)
    cli.check_results_dir(args.results_dir)
    device = distributed.resolve_device(args.device)
    query = args.query_img_name is not None or args.query_dir is not None or \
        not (args.embedding_map or args.evaluate or args.tune)
    # a map or evaluation alone needs only the database's features; a query also its model
    database = runs.open_database(args.data_base, args.results_dir, device, with_model=query, data_path=args.data_path)
    if args.evaluate or args.tune:
        ks = database.config.get('settings', {}).get('recalls', [1, 2, 4, 8])
        return (rerank_eval.tune(database.db, database.path, args.rerank, ks) if args.tune else rerank_eval.evaluate(
            database.db, *rerank_eval.resolve(args.rerank, args.rerank_args, database.path), ks))
    target, reranker = None, query and rerank_eval.for_database(args.rerank, args.rerank_args, database, args.index)
    index = indexes.open_index(args.index, database, args.nprobe, args.efsearch)
    if query and index is not None:
        print(f'searching {index.description}', flush=True)
    if args.query_dir is not None:
        target = retrieve_folder(database, args.query_dir, args.retrieval_num, args.results_dir, reranker, index)
    elif query:
        target = retrieve(database, args.query_img_name or DEFAULT_QUERY, args.retrieval_num, args.results_dir,
                          reranker, index)
    if args.embedding_map:  # also with a query: written as well (the query's target is returned)
        drawn = write_embedding_map(database, args.results_dir, args.map_images, args.seed)
        target = target or drawn
    return target


if __name__ == '__main__':
    cli.run_cli(main)
