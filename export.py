"""The embedding model of a feature database as an ONNX file, kept only after onnxruntime's features for the
database's own images were checked against PyTorch's, on the features, the top-K lists and the metric.

    python export.py --data_base NAME_OR_PATH [--results_dir results] [--opset 17]

writes {results_dir}/{model file's stem}.onnx: one input `images`, float32 [B, 3, H, W] already resized and
normalised (batch, height and width dynamic), first output `embedding` [B, n*feature_dim], L2-normalised. Its
metadata_props record, each value as JSON, what reproduces the database's features with PIL and numpy alone (METADATA).
This module owns that file: it writes it, reads it (OnnxEmbedder, what serve.py --onnx embeds uploads with) and
checks it against a database."""
import argparse
import io
import json
import math
import os
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn

import imaging
import metrics
import runs
from cli import UserError, check_int, run_cli
from files import atomic_write, read_bytes

VERSION = 1  # of the metadata below
OPSET, OPSETS = 17, (13, 20)  # default; accepted (20: the most the TorchScript-based exporter writes)
INPUT, OUTPUT = 'images', 'embedding'
RESIZE = 'bilinear, antialiased'  # imaging.resize_uint8: PIL's BILINEAR (to 1 grey level)
# metadata key -> the database config key it comes from (None: a fixed value or the format's version)
METADATA = {'clf_onnx_version': None, 'mean': 'mean', 'std': 'std', 'image_size': 'image_size', 'resize': None,
            'backbone_type': 'backbone_type', 'branches': 'branches', 'feature_dim': 'feature_dim',
            'model_sha256': 'model_sha256'}
# the checks every export passes before it is written
MAX_DIFFERENCE = 1e-4  # largest |ONNX - PyTorch| of any feature element, float32
SAME_TOP_K = 0.99  # share of queries whose top-K lists agree in order, up to swapped near ties (TIE)
TOP_K = 10
TIE = 1e-5  # two items whose PyTorch scores differ by this little may trade places (float32 sums in other orders)
METRIC_DIFFERENCE = 1e-4  # R@1 and MAP@R, as fractions
BATCH = 32  # images embedded at once in the check
OTHER_SIZE_IMAGES = 4  # images checked at a second input size: height and width are dynamic axes


class Embedding(nn.Module):
    """A Model's retrieval embedding alone (the classifier's logits are for training)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]  # [B, n*feature_dim]


def metadata(config):
    """The metadata_props of a database's export: {key: JSON text}."""
    values = {key: config[source] if source else None for key, source in METADATA.items()}
    values.update(clf_onnx_version=VERSION, resize=RESIZE, mean=[float(v) for v in config['mean']],
                  std=[float(v) for v in config['std']])
    return {key: json.dumps(value) for key, value in values.items()}


def onnx_bytes(model, config, opset=OPSET):
    """A Model in eval mode exported by the TorchScript-based exporter (see docs/export.md for why), with `config`'s
    metadata -> the ONNX file's bytes."""
    wrapper = Embedding(model).eval()  # the wrapper too: export restores its mode, and with it the model's
    side = int(config['image_size'])
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # torch 2.9+ calls this exporter legacy; it is the one pinned (docs/export.md)
        warnings.simplefilter('ignore')
        torch.onnx.export(wrapper, (torch.zeros(1, 3, side, side),), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                          dynamic_axes={INPUT: {0: 'batch', 2: 'height', 3: 'width'}, OUTPUT: {0: 'batch'}})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata(config))
    return proto.SerializeToString()


class OnnxEmbedder:
    """An exported model run by onnxruntime on the CPU: embeds preprocessed images as the database's model does."""

    def __init__(self, data, name, threads=0):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's choice (one per core)
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(data, options, providers=['CPUExecutionProvider'])
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf / ... on a damaged file
            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
            raise UserError(f'{name} is not a usable ONNX model ({reason}); export one with export.py') from None
        self.name = name
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = {key: json.loads(props[key]) for key in METADATA}
        except (KeyError, ValueError):
            missing = [key for key in METADATA if key not in props]
            raise UserError(f'{name} is an ONNX model without the metadata export.py writes '
                            f'({"missing " + ", ".join(missing) if missing else "a value is not JSON"}); export the '
                            f'model with export.py') from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if self.metadata['clf_onnx_version'] != VERSION or len(inputs) != 1 or len(inputs[0].shape) != 4 \
                or inputs[0].shape[1] != 3 or not outputs:
            raise UserError(f'{name} is not an export of this CLF (format version {VERSION}: one input [B, 3, H, W], '
                            f'the embedding first); export the model again with export.py')
        self.input = inputs[0].name

    @classmethod
    def open(cls, path, threads=0):
        return cls(read_bytes(path, 'ONNX model'), os.fspath(path), threads)

    def check_database(self, config, db_path):
        """That this export is of the model of the database at db_path (config: its config), with its preprocessing;
        else a UserError saying what differs."""
        meta = self.metadata
        if meta['model_sha256'] != config['model_sha256']:
            raise UserError(f'{self.name} is not an export of the model of {db_path}: it was exported from a model '
                            f'file of SHA-256 {str(meta["model_sha256"])[:12]}..., the database was written with '
                            f'{config["model_sha256"][:12]}... (python export.py --data_base {db_path} exports its model)')
        for key, text in metadata(config).items():  # JSON keeps floats exactly: equal means equal
            if json.loads(text) != meta[key]:
                raise UserError(f'the metadata of {self.name} does not match {db_path}: {key} is {meta[key]!r} in '
                                f'the ONNX file and {json.loads(text)!r} in the database (an edited or damaged file? '
                                f'export it again with export.py)')

    def __call__(self, inputs):
        """Retrieval embeddings [B, D] (CPU, float) of preprocessed images [B, 3, s, s] (a tensor)."""
        x = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


def onnx_path(database, results_dir):
    """{results_dir}/{the stem of the database's model file}.onnx."""
    stem = os.path.splitext(os.path.basename(str(database.config['model_file'])))[0]
    return os.path.join(results_dir, f'{stem}.onnx')


def split_inputs(paths, config, side=None):
    """Batches [B, 3, s, s] of a database's images, preprocessed as train.py evaluated them (the stored pixels)."""
    side = side or config['image_size']
    for begin in range(0, len(paths), BATCH):
        yield torch.stack([imaging.eval_input(p, side, config['mean'], config['std'], upright=False)
                           for p in paths[begin:begin + BATCH]])


def embed_both(database, embedder, paths, side=None):
    """(PyTorch's, onnxruntime's) features [N, D] of database images."""
    pairs = [(database.embed(x), embedder(x)) for x in split_inputs(paths, database.config, side)]
    return torch.cat([p for p, _ in pairs]), torch.cat([o for _, o in pairs])


def top_k_lists(queries, gallery, k, self_mode, chunk=512):
    """Indices [Nq, k] of each query's k most similar gallery items (itself left out in self mode)."""
    lists = []
    for begin in range(0, len(queries), chunk):
        sims = queries[begin:begin + chunk] @ gallery.T  # [c, Ng]
        if self_mode:
            rows = torch.arange(len(sims))
            sims[rows, rows + begin] = -math.inf
        lists.append(sims.topk(k, dim=1).indices)
    return torch.cat(lists)


def tied(queries, gallery, a, b, chunk=512):
    """Per query: whether its lists a and b [Nq, k] of gallery indices have the same PyTorch scores at every rank
    within TIE, i.e. differ at most by the order of near ties -> bool [Nq]."""
    same = []
    for begin in range(0, len(a), chunk):
        q = queries[begin:begin + chunk, None, :]  # [c, 1, D]
        scores = [(gallery[lists[begin:begin + chunk]] * q).sum(-1) for lists in (a, b)]  # 2 x [c, k]
        same.append(((scores[0] - scores[1]).abs() <= TIE).all(dim=1))
    return torch.cat(same) if same else torch.zeros(0, dtype=torch.bool)


def compare(database, embedder):
    """Both runtimes' features for every image of the database, top-K lists and metrics -> (figures, problems):
    figures a dict for the report, problems one phrase per check that failed."""
    db, gallery = database.db, database.has_gallery
    splits = ('test', 'gallery') if gallery else ('test',)
    features = {s: embed_both(database, embedder, db[f'{s}_images']) for s in splits}  # {split: (torch, onnx)}
    few = db['test_images'][:OTHER_SIZE_IMAGES]  # the dynamic height and width, at a size not trained at
    other = embed_both(database, embedder, few, database.config['image_size'] + 32)
    difference = max(float((t - o).abs().max()) for t, o in [*features.values(), other])
    # each runtime's queries and what they search: the gallery, or the other test images
    target = 'gallery' if gallery else 'test'
    labels, target_labels = db['test_labels'], db[f'{target}_labels']
    k = min(TOP_K, len(target_labels) - (not gallery))
    lists, scores = [], []
    for runtime in (0, 1):  # PyTorch, onnxruntime
        queries, targets = features['test'][runtime], features[target][runtime]
        lists.append(top_k_lists(queries, targets, k, not gallery))
        scores.append(metrics.evaluate(queries, labels, [1], *((targets, target_labels) if gallery else ())))
    exact = (lists[0] == lists[1]).all(dim=1)  # [Nq]
    differing = (~exact).nonzero().flatten()
    explained = tied(features['test'][0][differing], features[target][0], lists[0][differing], lists[1][differing])
    same = (exact.sum().item() + explained.sum().item()) / len(exact)
    figures = {'images': sum(len(db[f'{s}_images']) for s in splits), 'difference': difference, 'k': k,
               'same_top_k': same, 'exact_top_k': exact.float().mean().item(), 'scores': scores}
    problems = []
    if not difference <= MAX_DIFFERENCE:  # NaN too
        problems.append(f'features differ by up to {difference:.2e} (allowed {MAX_DIFFERENCE:g})')
    if same < SAME_TOP_K:
        problems.append(f'the top-{k} lists agree for {100 * same:.2f} % of queries, near ties aside (needed '
                        f'{100 * SAME_TOP_K:g} %)')
    for metric in ('R@1', 'MAP@R'):
        if not abs(scores[0][metric] - scores[1][metric]) <= METRIC_DIFFERENCE:
            problems.append(f'{metric} {100 * scores[1][metric]:.2f} % against PyTorch\'s {100 * scores[0][metric]:.2f} %')
    return figures, problems


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export the model of a feature database as ONNX, checked against '
                                                 'PyTorch on the database\'s own images before it is written')
    add = parser.add_argument
    add('--data_base', default=runs.DEFAULT_DATABASE, help='a name in --results_dir, or a path')
    add('--results_dir', default='results', help='where a database given by name is looked up and the .onnx written')
    add('--data_path', default=None, help="the dataset folder, when it moved since train.py's --data_path")
    add('--opset', default=OPSET, type=int, help=f'ONNX opset, {OPSETS[0]}-{OPSETS[1]} [{OPSET}]')
    args = parser.parse_args(argv)
    check_int('--opset', args.opset, *OPSETS)
    return args


def main(argv=None):
    args = parse_args(argv)
    database = runs.open_database(args.data_base, args.results_dir, torch.device('cpu'), data_path=args.data_path)
    config, path = database.config, onnx_path(database, args.results_dir)
    print(f'exporting {database.model_path} ({config["backbone_type"]}, branches {config["branches"]}, '
          f'feature_dim {config["feature_dim"]}, {config["image_size"]} px) with opset {args.opset}', flush=True)
    data = onnx_bytes(database.model, config, args.opset)
    figures, problems = compare(database, OnnxEmbedder(data, path))
    if problems:
        raise UserError(f'the ONNX export of {database.model_path} differs from PyTorch on the images of '
                        f'{database.path}: {"; ".join(problems)}; nothing was written')
    (torch_scores, onnx_scores), k = figures['scores'], figures['k']
    print(f'checked on {figures["images"]} images: features within {figures["difference"]:.1e} of PyTorch\'s, the '
          f'same top-{k} for {100 * figures["same_top_k"]:.2f} % of queries ({100 * figures["exact_top_k"]:.2f} % '
          f'without swapping near ties), R@1 {100 * onnx_scores["R@1"]:.2f} % '
          f'(PyTorch {100 * torch_scores["R@1"]:.2f} %), MAP@R {100 * onnx_scores["MAP@R"]:.2f} % '
          f'(PyTorch {100 * torch_scores["MAP@R"]:.2f} %)')
    atomic_write({path: data})
    print(f'wrote {path} ({len(data) / 2 ** 20:.1f} MiB)')


if __name__ == '__main__':
    run_cli(main)
