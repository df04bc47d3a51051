"""Make something searchable: a folder of your own photos -> a gallery database that test.py and serve.py search.

    python index.py --data_base NAME_OR_PATH --gallery_dir DIR [--results_dir results]

Every image under DIR (recursively) is embedded with the model of the database NAME, in batches, and written as
{results_dir}/{DIR's name}_{model}_gallery.pth, tied to the same model file (its SHA-256 is checked on every load,
as a training database's). The labels are the names of DIR's sub-folders (an image directly in DIR has none); a
folder without sub-folders gives a gallery without labels. Images that cannot be read are listed and skipped.
An interrupted run continues where it stopped: finished chunks of images wait in {gallery}.parts/, each written
whole, and are used again when the model and the image list are still the same. The last line printed is the
path of the gallery."""
import argparse
import hashlib
import os
import shutil
import sys

import torch
from tqdm import tqdm

import cli
import distributed
import files
import retrieval
import runs
from cli import UserError

BATCH = 32  # images decoded and embedded per forward pass
CHUNK = 1024  # images per finished piece of an interrupted run (one .parts/ file each)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Embed a folder of images into a gallery database that test.py and '
                                                 'serve.py search')
    add = parser.add_argument
    add('--data_base', default=runs.DEFAULT_DATABASE, help='the database whose model embeds the images: a name in '
        '--results_dir, or a path')
    add('--gallery_dir', required=True, help='the folder of images (searched recursively; sub-folders name labels)')
    add('--results_dir', default='results', help='where --data_base is found by name and the gallery is written')
    add('--device', default=None, help='device that embeds the images [default: cuda if there, else cpu]')
    return parser.parse_args(argv)


def gallery_path(gallery_dir, database, results_dir):
    """{results_dir}/{DIR's name}_{model file's stem less _model}_gallery.pth: named from the folder and the model."""
    folder = os.path.basename(os.path.abspath(gallery_dir)) or 'root'
    model = os.path.splitext(os.path.basename(database.model_path))[0].removesuffix('_model')
    return os.path.join(results_dir, f'{folder}_{model}_gallery.pth')


def folder_images(gallery_dir):
    """The images under a folder -> (paths, labels: the first sub-folder's name or None each, [(path, reason)] of
    the files that are no readable regular file)."""
    listed = retrieval.list_images(gallery_dir, '--gallery_dir')
    paths, skipped = retrieval.regular_images(listed)
    labels = [None if os.sep not in rel else rel.split(os.sep)[0]
              for rel in (os.path.relpath(p, gallery_dir) for p in paths)]
    return paths, labels, skipped


def run_key(database, paths):
    """What a finished chunk of an earlier run must match: the model file's SHA-256, the preprocessing and the list
    of images (their paths, sizes and modification times, hashed)."""
    listing = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        listing.update(f'{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
    config = database.config
    return {'model_sha256': config['model_sha256'], 'image_size': config['image_size'],
            'mean': list(config['mean']), 'std': list(config['std']), 'images': listing.hexdigest(),
            'chunk': CHUNK}


def finished_chunks(parts, key):
    """The chunks an earlier run finished in `parts` for the same key -> [{'features': {index: [D]}, 'unreadable':
    [(path, reason)]}], in order; anything else there (another model, other images) is removed."""
    found = []
    if os.path.isdir(parts):
        while os.path.isfile(os.path.join(parts, f'{len(found):06d}.pth')):
            try:
                chunk = files.safe_load(os.path.join(parts, f'{len(found):06d}.pth'), 'finished chunk')
            except UserError:  # unreadable: made again
                break
            if not isinstance(chunk, dict) or chunk.get('key') != key:
                break
            found.append(chunk)
        if not found:
            shutil.rmtree(parts)  # of another model or other images: start over
    return found


def embed_gallery(database, paths, parts):
    """Embeddings of the images `paths`, CHUNK at a time, each finished chunk kept in `parts` (a resumed run starts
    after the last) -> (features {index: [D]}, [(path, reason)] of the unreadable)."""
    key = run_key(database, paths)
    done = finished_chunks(parts, key)
    if done:
        print(f'continuing: {min(len(done) * CHUNK, len(paths))} of {len(paths)} images embedded by an earlier run',
              flush=True)
    features, unreadable = {}, []
    for chunk in done:
        features.update(chunk['features'])
        unreadable += chunk['unreadable']
    index = {path: i for i, path in enumerate(paths)}
    with tqdm(total=len(paths), initial=min(len(done) * CHUNK, len(paths)), desc='Embedding gallery',
              dynamic_ncols=True) as bar:
        for number in range(len(done), -(-len(paths) // CHUNK)):
            part = paths[number * CHUNK:(number + 1) * CHUNK]
            embedded, failed = database.embed_files(part, BATCH, bar.update)
            chunk = {'key': key, 'features': {index[p]: f for p, f in embedded.items()}, 'unreadable': failed}
            os.makedirs(parts, exist_ok=True)
            files.atomic_write({os.path.join(parts, f'{number:06d}.pth'): files.torch_bytes(chunk)})
            features.update(chunk['features'])
            unreadable += failed
    return features, unreadable


def report_unreadable(unreadable, total, folder):
    if unreadable:
        listed = '; '.join(reason for _, reason in unreadable[:20])  # each names its file
        more = f' and {len(unreadable) - 20} more' if len(unreadable) > 20 else ''
        print(f'warning: {len(unreadable)} of {total} images under {folder} cannot be read and are skipped: '
              f'{listed}{more}', file=sys.stderr, flush=True)


def build_gallery(args, database):
    """--gallery_dir: embed the folder's images and write the gallery database -> its path."""
    paths, labels, skipped = folder_images(args.gallery_dir)
    target = gallery_path(args.gallery_dir, database, args.results_dir)
    parts = f'{target}.parts'
    print(f'{len(paths)} images under {args.gallery_dir}'
          f'{f" in {len(set(labels) - {None})} labelled sub-folders" if any(labels) else ", no labels"}; '
          f'embedding with {database.model_path}', flush=True)
    features, unreadable = embed_gallery(database, paths, parts) if paths else ({}, [])
    unreadable = skipped + unreadable
    report_unreadable(unreadable, len(paths) + len(skipped), args.gallery_dir)
    if not features:
        raise UserError(f'no image under --gallery_dir {args.gallery_dir} could be read; nothing was written')
    kept = sorted(features)  # indices into paths, in folder order
    gallery = retrieval.make_folder_gallery([os.path.abspath(paths[i]) for i in kept], [labels[i] for i in kept],
                                            torch.stack([features[i] for i in kept]), database, args.gallery_dir,
                                            args.results_dir)
    files.atomic_write({target: files.torch_bytes(gallery)})
    shutil.rmtree(parts, ignore_errors=True)  # its work is in the gallery now
    print(f'{len(kept)} images embedded into {target}', flush=True)
    return target


MODES = {'gallery_dir': build_gallery}  # the flag that picks a mode -> what it does


def main(argv=None):
    args = parse_args(argv)
    cli.check_results_dir(args.results_dir)
    mode = next(flag for flag in MODES if getattr(args, flag, None) is not None)
    database = runs.open_database(args.data_base, args.results_dir, distributed.resolve_device(args.device))
    target = MODES[mode](args, database)
    print(target)  # the last line: the path written
    return target


if __name__ == '__main__':
    cli.run_cli(main)
