"""The pictures test.py writes: each query and hit framed by whether its label matches (the original's
224 px tiles), the row picture retrieval.png, and the embedding map (a t-SNE of a database drawn as thumbnails)."""
import colorsys
import io

import torch
from PIL import Image, ImageDraw, ImageFont

import utils


TILE = 224  # side of every written picture, as the original
BORDER = 8  # width of the frame around the picture: match (green), mismatch (red), no label known (white)
INNER = TILE - 2 * BORDER  # side of the picture inside the frame
PAD, CAPTION = 8, 44  # row picture: gap around tiles, room for two caption lines under each tile
ROW_MAX = 11  # tiles per line of the row picture (query + 10); a longer top-K wraps onto more lines
MAP_SIDE, THUMB, FRAME = 2000, 40, 3  # embedding map: canvas side, thumbnail side with its class-coloured frame
MAP_PER_CLASS = 5  # the sample takes at least this many images of each class it shows (where a class has them)
TSNE_PCA_DIMS = 50  # embeddings are reduced to this many dimensions by PCA before t-SNE (the usual practice)


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
