"""The pictures test.py writes: each query and hit framed by whether its label matches (the original's
224 px tiles), the row picture retrieval.png, and the embedding map (a t-SNE of a database drawn as thumbnails)."""
import io
import itertools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import utils
from cli import UserError


TILE = 224  # side of every written picture, as the original
BORDER = 8  # width of the frame around the picture: match (green), mismatch (red), no label known (white)
INNER = TILE - 2 * BORDER  # side of the picture inside the frame
PAD, CAPTION = 8, 44  # row picture: gap around tiles, room for two caption lines under each tile
ROW_MAX = 11  # tiles per line of the row picture (query + 10); a longer top-K wraps onto more lines
MAP_SIDE, THUMB, FRAME = 2000, 40, 4  # embedding map: longer side of the points' area, thumbnail side with its frame
MAP_MARGIN = 12  # white around the points
# up to LEGEND_MAX classes, a legend (a swatch and the label of each class) in rows and columns of these sizes
LEGEND_MAX, LEGEND_ROW, LEGEND_COLUMN, LEGEND_MIN_ROWS = 60, 26, 200, 16
COLLAPSED = 1e-6  # embeddings (unit vectors) within this distance of one line through their mean have collapsed
MAP_PER_CLASS = 5  # the sample takes at least this many images of each class it shows (where a class has them)
TSNE_PCA_DIMS = 50  # embeddings are reduced to this many dimensions by PCA before t-SNE (the usual practice)


def _fit(draw, text, font, width=TILE):
    """`text`, cut and ended with '...' where it would not fit under one tile (or in `width` pixels)."""
    cut = text
    while text and draw.textlength(cut, font=font) > width:
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
                 f'#{rank}  {score:.4f}', '' if label is None else f'label {label}')
                for rank, score, label, image, _ in hits]
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


def check_spread(features, source):
    """A UserError unless the unit-normalised embeddings [N, D] spread in two directions: identical or
    near-identical ones (all within COLLAPSED of one line through their mean: rank < 2 after centring) give
    t-SNE nothing to show, and scikit-learn's t-SNE crashes the process on them."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    x = x - x.mean(0)                                                     # [N, D] centred
    norms = x.norm(dim=1)
    axis = x[norms.argmax()] / norms.max().clamp_min(1e-300)              # [D] towards the farthest point
    off_line = (x - (x @ axis)[:, None] * axis).norm(dim=1).max()         # the largest distance from that line
    if not norms.max() > COLLAPSED or not off_line > COLLAPSED:
        raise UserError(f'the embeddings have collapsed: the {len(x)} test features of {source} are identical or '
                        f'lie on one line (a model that has not learnt, or a diverged one?); no map is drawn')


def embedding_coordinates(features, seed, source='the database'):
    """2-D t-SNE of embeddings [N, D] (PCA to TSNE_PCA_DIMS first when D is larger) -> float64 numpy [N, 2];
    collapsed embeddings are a UserError (check_spread)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    check_spread(features, source)
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy().astype('float64')
    if x.shape[1] > TSNE_PCA_DIMS and len(x) > TSNE_PCA_DIMS:
        x = PCA(TSNE_PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < N; 30 is its usual value
    return TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)


def _distance(a, b):
    """How different two RGB colours look ("redmean": RGB distance weighted as the eye weighs it)."""
    red = (a[0] + b[0]) / 2
    squares = (2 + red / 256) * (a[0] - b[0]) ** 2 + 4 * (a[1] - b[1]) ** 2 + (2 + (255 - red) / 256) * (a[2] - b[2]) ** 2
    return squares ** 0.5


def palette(n):
    """n colours, each as far as it can be from white (the background) and from the ones before it: picked one by
    one from a 6 x 6 x 6 grid; beyond the grid's 215 the colours repeat (the labels still tell the classes apart)."""
    grid = [c for c in itertools.product(range(0, 256, 51), repeat=3) if c != (255, 255, 255)]
    closest = {c: _distance(c, (255, 255, 255)) for c in grid}  # distance to the nearest colour taken (or white)
    chosen = []
    while len(chosen) < min(n, len(grid)):
        pick = max(grid, key=lambda c: (closest[c], c))
        chosen.append(pick)
        closest = {c: min(d, _distance(c, pick)) for c, d in closest.items() if c != pick}
        grid.remove(pick)
    return [chosen[k % len(chosen)] for k in range(n)]


def class_colours(labels):
    """{label: RGB}: well-separated colours (palette) in the order of the labels (numbers by value: 9 before 10)."""
    classes = sorted(set(labels), key=lambda v: (0, int(v), str(v)) if str(v).isdecimal() else (1, 0, str(v)))
    return dict(zip(classes, palette(len(classes))))


def map_layout(coordinates):
    """Where the thumbnails go: top-left corners int [N, 2] and the size (width, height) of the points' area,
    fitted to them: one scale for both axes (distances kept), the longer extent MAP_SIDE wide."""
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    room = MAP_SIDE - THUMB - 2 * MAP_MARGIN  # the corners' range along the longer extent
    scale = room / max(float((high - low).max()), 1e-12)
    corners = np.rint((coordinates - low) * scale).astype(int) + MAP_MARGIN  # [N, 2]
    width, height = (int(v) for v in corners.max(axis=0) + THUMB + MAP_MARGIN)
    return corners, (width, height)


def _text_colour(colour):
    return 'black' if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else 'white'


def draw_embedding_map(coordinates, thumbnails, labels):
    """PNG bytes of the embedding map: thumbnail k (a PIL image) at coordinates[k], framed in its label's colour,
    on a canvas fitted to the points; each class's label at its centre (the median of its points) and, up to
    LEGEND_MAX classes, a legend to the right (a swatch and the label of each class)."""
    corners, (width, height) = map_layout(coordinates)
    colours = class_colours(labels)
    font, small = ImageFont.load_default(size=20), ImageFont.load_default(size=17)
    legend = len(colours) <= LEGEND_MAX
    # the legend's rows: as many as the points' height holds, at least LEGEND_MIN_ROWS (a flat cloud: a taller canvas)
    rows = max((height - 2 * MAP_MARGIN) // LEGEND_ROW, min(len(colours), LEGEND_MIN_ROWS))
    columns = -(-len(colours) // rows) if legend else 0
    canvas = Image.new('RGB', (width + columns * LEGEND_COLUMN, max(height, 2 * MAP_MARGIN + rows * LEGEND_ROW)),
                       'white')
    draw = ImageDraw.Draw(canvas)
    for (x, y), thumbnail, label in zip(corners.tolist(), thumbnails, labels):
        tile = Image.new('RGB', (THUMB, THUMB), colours[label])
        tile.paste(thumbnail.resize((THUMB - 2 * FRAME,) * 2) if thumbnail.size != (THUMB - 2 * FRAME,) * 2
                   else thumbnail, (FRAME, FRAME))
        canvas.paste(tile, (x, y))
    centres = corners + THUMB / 2  # [N, 2]
    for label, colour in colours.items():  # each class's label on top of its points, in its colour
        cx, cy = np.median(centres[[k for k, v in enumerate(labels) if v == label]], axis=0)
        text = _fit(draw, str(label), font)
        box = draw.textbbox((cx, cy), text, font=font, anchor='mm')
        draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=colour, outline='black', width=1)
        draw.text((cx, cy), text, fill=_text_colour(colour), font=font, anchor='mm')
    for k, (label, colour) in enumerate(colours.items() if legend else ()):
        x, y = width + (k // rows) * LEGEND_COLUMN, MAP_MARGIN + (k % rows) * LEGEND_ROW
        draw.rectangle((x, y + 2, x + LEGEND_ROW - 5, y + LEGEND_ROW - 3), fill=colour)  # a swatch of 21 x 21 px
        draw.text((x + LEGEND_ROW + 2, y + LEGEND_ROW // 2), _fit(draw, str(label), small, LEGEND_COLUMN - 40),
                  fill='black', font=small, anchor='lm')
    return encode(canvas, 'PNG')
