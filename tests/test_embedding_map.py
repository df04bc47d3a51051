"""test.py --embedding_map: a t-SNE of the database's test embeddings drawn as class-framed thumbnails."""
import os

import numpy as np
import torch
from PIL import Image

from _query_fixtures import copy_database, load_script, make_database, make_split
import pictures

script = load_script()


def separated(num_classes, per_class, dim=24, seed=0):
    """Well-separated synthetic embeddings: a random unit centre per class plus small noise -> ([N, dim], labels)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    features = centres.repeat_interleave(per_class, 0) + 0.05 * torch.randn(num_classes * per_class, dim,
                                                                            generator=generator)
    return features, [str(c) for c in range(num_classes) for _ in range(per_class)]


def test_coordinates_keep_each_class_together():
    features, labels = separated(6, 40)
    xy = pictures.embedding_coordinates(features, seed=0)
    assert xy.shape == (240, 2) and np.isfinite(xy).all()
    same = np.array(labels)[:, None] == np.array(labels)[None, :]
    distances = np.linalg.norm(xy[:, None] - xy[None, :], axis=-1)  # [N, N]
    within = distances[same & ~np.eye(len(xy), dtype=bool)].mean()
    between = distances[~same].mean()
    assert within < between / 4, (within, between)
    # every point's nearest other point is of its own class
    np.fill_diagonal(distances, np.inf)
    assert (np.array(labels)[distances.argmin(1)] == np.array(labels)).all()
    assert np.array_equal(xy, pictures.embedding_coordinates(features, seed=0))  # the seed repeats it


def test_sample_is_class_balanced_and_seeded():
    labels = [f'c{c}' for c in range(12) for _ in range(20)]
    for limit, classes, per_class in ((120, 12, 10), (30, 6, 5), (500, 12, 20)):
        chosen = pictures.map_sample(labels, limit, seed=0)
        counts = {}
        for i in chosen:
            counts[labels[i]] = counts.get(labels[i], 0) + 1
        assert chosen == sorted(set(chosen)) and len(counts) == classes, limit
        assert set(counts.values()) == {per_class}, limit
    assert pictures.map_sample(labels, 30, seed=0) == pictures.map_sample(labels, 30, seed=0)
    assert pictures.map_sample(labels, 30, seed=0) != pictures.map_sample(labels, 30, seed=1)


def test_embedding_map_alone_writes_the_picture_and_runs_no_query(tmp_path, capsys):
    features, labels = separated(4, 12)
    test = make_split(str(tmp_path / 'images'), labels, seed=3)
    db_path, _ = make_database(str(tmp_path / 'db'), test)
    db_path = copy_database(db_path, str(tmp_path), lambda db: db.update(test_features=features))
    results = tmp_path / 'results'
    target = script.main(['--data_base', db_path, '--embedding_map', '--results_dir', str(results),
                          '--map_images', '40'])
    assert target == os.path.join(str(results), 'tiny_uncropped_resnet18_8_data_base_map.png')
    assert os.listdir(results) == ['tiny_uncropped_resnet18_8_data_base_map.png']  # no query folder
    out = capsys.readouterr().out
    assert 'Embedding map: t-SNE of 40 of the 48 test images (4 classes), running...' in out and 'query' not in out
    with Image.open(target) as picture:
        # fitted to the points (issue 24): the longer extent MAP_SIDE, a legend column to the right
        assert pictures.MAP_SIDE in (picture.height, picture.width - pictures.LEGEND_COLUMN)
        pixels = np.asarray(picture.convert('RGB')).reshape(-1, 3)
    # each class's frame colour is on the picture, and the background is white
    for colour in pictures.class_colours(labels).values():
        assert (pixels == colour).all(1).sum() >= 4 * pictures.THUMB, colour
    assert (pixels == 255).all(1).mean() > 0.5

    # with a query named, the retrieval runs as well
    script.main(['--data_base', db_path, '--embedding_map', '--results_dir', str(results), '--map_images', '40',
                 '--query_img_name', test[0][0], '--retrieval_num', '3'])
    assert sorted(os.listdir(results)) == sorted(['tiny_uncropped_resnet18_8_data_base_map.png',
                                                  os.path.splitext(os.path.basename(test[0][0]))[0]])
