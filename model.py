"""The CLF network: a ResNet backbone whose stage-4 grid of local features is aggregated in several
ways (SPoC, MAC, GeM), each projected and L2-normalised, then concatenated into one retrieval
embedding; a BatchNorm + Linear classifier on the same vector drives training.

`python model.py` prints the Params | FLOPs table of the three backbones on the four datasets."""
import argparse
import os
import re
import socket
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models

from cli import UserError, run_cli
from files import safe_load


# ---- backbones: stem + layer1..layer4, no avgpool/fc; stage 3 (layer3) keeps its input resolution ----

def _torchvision_resnet(arch):
    """torchvision's ResNet-18/50 trunk under torchvision's parameter names: its ImageNet weights load as they are."""
    net = getattr(models, arch)(weights=None)
    # the first block of layer3 downsamples in its strided conv and in its shortcut: undo both, so
    # a 224 input gives a 14x14 stage-4 map instead of 7x7 (finer local features, 4x the cost)
    block = net.layer3[0]
    (block.conv2 if hasattr(block, 'conv3') else block.conv1).stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    names = ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))


class SEBottleneck(nn.Module):
    """Caffe-style SE-ResNet bottleneck: the stride sits on the first 1x1 conv (torchvision puts it on the
    3x3), and a squeeze-and-excitation gate rescales the residual branch before the addition."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes * 4  # the bottleneck's expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        # the gate [B, C, 1, 1] from the global average; pooling by a module rather than x.mean(): thop counts
        # it (h*w + 1 per output), as the published FLOPs do (+0.01G)
        self.se = nn.Sequential(OrderedDict([
            ('avg_pool', nn.AdaptiveAvgPool2d(1)), ('fc1', nn.Conv2d(width, width // 16, kernel_size=1)),
            ('relu', nn.ReLU()), ('fc2', nn.Conv2d(width // 16, width, kernel_size=1)), ('sigmoid', nn.Sigmoid())]))
        self.downsample = None if stride == 1 and inplanes == width else nn.Sequential(
            nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out * self.se(out) + shortcut)


def _seresnet50():
    """SE-ResNet-50 trunk laid out like the public `se_resnet50-ce0d4300.pth` (see adapt_state_dict)."""
    def stage(inplanes, planes, blocks, stride):
        return nn.Sequential(SEBottleneck(inplanes, planes, stride),
                             *(SEBottleneck(planes * 4, planes) for _ in range(blocks - 1)))
    return nn.Sequential(OrderedDict([
        ('conv1', nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),  # [B, 64, 112, 112]
        ('bn1', nn.BatchNorm2d(64)),
        ('relu', nn.ReLU(inplace=True)),
        # the Caffe model pooled without padding; the original CLF pooled with padding 1 and its
        # published FLOPs count that: 112 -> 57 with ceil_mode, hence 15x15 at stage 4
        ('maxpool', nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)),  # [B, 64, 57, 57]
        ('layer1', stage(64, 64, 3, stride=1)),      # [B, 256, 57, 57]
        ('layer2', stage(256, 128, 4, stride=2)),    # [B, 512, 29, 29]
        ('layer3', stage(512, 256, 6, stride=1)),    # [B, 1024, 29, 29]  (stride 1: see above)
        ('layer4', stage(1024, 512, 3, stride=2))]))  # [B, 2048, 15, 15]


BACKBONES = {  # name -> (builder, stage-4 channels, ImageNet weights: torchvision's, timm's for SE-ResNet-50)
    'resnet18': (lambda: _torchvision_resnet('resnet18'), 512, models.ResNet18_Weights.IMAGENET1K_V1.url),
    'resnet50': (lambda: _torchvision_resnet('resnet50'), 2048, models.ResNet50_Weights.IMAGENET1K_V1.url),
    'seresnet50': (_seresnet50, 2048, 'https://github.com/rwightman/pytorch-image-models/releases/download/'
                                      'v0.1-cadene/se_resnet50-ce0d4300.pth')}


# ---- ImageNet weights (the URLs of BACKBONES) ----

def imagenet_weights(backbone_type, timeout=30):
    """(path, state dict) of a backbone's ImageNet weights, from the torch hub cache or downloaded into it."""
    url = BACKBONES[backbone_type][2]
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    if os.path.isfile(path):
        return path, safe_load(path, f'ImageNet weights for {backbone_type}')
    # torch.hub opens the URL without a timeout: a firewall that drops packets would hang for minutes
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:  # torchvision's file names end in the first digits of their SHA-256, checked as torchvision does
        return path, torch.hub.load_state_dict_from_url(url, map_location='cpu', weights_only=True,
                                                        check_hash=backbone_type != 'seresnet50')
    except Exception as err:  # no network, proxy refused, HTTP error, bad hash: all need the same fix
        reason = str(getattr(err, 'reason', None) or err).strip()
        reason = reason.splitlines()[0][:200] if reason else type(err).__name__
        raise UserError(f'cannot download the ImageNet weights of {backbone_type} ({reason}). The file '
                        f'{os.path.basename(path)} is needed: download it from {url} and put it in '
                        f'{os.path.dirname(path)}{os.sep} (the torch hub checkpoints folder), or pass its path with '
                        f'--pretrained PATH; to train from scratch, pass --pretrained none.') from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def adapt_state_dict(state_dict, backbone_type):
    """Rename an ImageNet state dict onto our backbone's names and drop its classifier."""
    if backbone_type == 'seresnet50':  # se_resnet50-ce0d4300.pth (and timm's legacy_seresnet50) names
        state_dict = {re.sub(r'^layer0\.', '', k).replace('.se_module.', '.se.'): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith(('fc.', 'last_linear.'))}  # the ImageNet heads


def load_state_dict_strict(module, state, source, what='weights of this model'):
    """Load `state` into `module` strictly; else a UserError saying that `source` does not hold `what`,
    listing up to 8 missing, unexpected and mis-shaped tensors each."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{source} does not hold {what}: expected a state dict (parameter name -> tensor)')
    expected = module.state_dict()
    problems = {'missing': [k for k in expected if k not in state],
                'unexpected': [k for k in state if k not in expected],
                'with the wrong shape': [f'{k} {list(state[k].shape)} (expected {list(v.shape)})'
                                         for k, v in expected.items() if k in state and state[k].shape != v.shape]}
    listed = [f'{len(names)} {kind}: {", ".join(names[:8])}{f" and {len(names) - 8} more" if len(names) > 8 else ""}'
              for kind, names in problems.items() if names]
    if listed:
        raise UserError(f'{source} does not hold {what} ({"; ".join(listed)})')
    module.load_state_dict(state, strict=True)


def build_backbone(backbone_type, pretrained):
    """The backbone with the ImageNet weights `pretrained` names: True (the hub cache, downloaded if needed), a
    path, or False; any missing, unexpected or mis-shaped tensor is a UserError naming them."""
    if not pretrained:
        return BACKBONES[backbone_type][0]()
    what = f'ImageNet weights for {backbone_type}'
    # read the weights first, so that a missing file fails before anything is built
    source, state_dict = imagenet_weights(backbone_type) if pretrained is True else \
        (os.fspath(pretrained), safe_load(pretrained, what))
    if isinstance(state_dict, dict):  # anything else is refused by load_state_dict_strict
        state_dict = adapt_state_dict(state_dict, backbone_type)
    backbone = BACKBONES[backbone_type][0]()
    load_state_dict_strict(backbone, state_dict, source, what)
    return backbone


# ---- the multi-local-feature head: each branch reduces the stage-4 grid [B, C, h, w] to one vector [B, C] ----

def spoc(x):
    """Sum-pooled convolutional features: the mean of the local features."""
    return x.mean((2, 3))


def mac(x):
    """Maximum activation of convolutions: the per-channel maximum."""
    return x.amax((2, 3))


def gem(x, p=3.0, eps=1e-6):
    """Generalised mean pooling; p = 3 lies between mean (p = 1) and max (p -> inf)."""
    # cubes of activations overflow float16 (max 65504) from about 40 on: pool in float32
    return x.float().clamp(min=eps).pow(p).mean((2, 3)).pow(1.0 / p).to(x.dtype)


BRANCHES = {'S': spoc, 'M': mac, 'G': gem}


def parse_branches(s):
    """Validate a branch set such as 'SMG' (letters of BRANCHES, each at most once, any order)."""
    s = str(s)
    bad, repeated = sorted(set(s) - set(BRANCHES)), sorted({c for c in s if s.count(c) > 1})
    if not s or bad or repeated:
        why = ('it is empty' if not s else f'unknown letter(s) {", ".join(bad)}' if bad
               else f'repeated letter(s) {", ".join(repeated)}')
        raise UserError(f"invalid branch set '{s}': {why}; use S (SPoC, mean), M (MAC, max), G (GeM), e.g. SMG")
    return s


class Model(nn.Module):
    """Backbone -> one (pool -> Linear -> L2) branch per letter of `branches` -> concatenation -> L2, and logits.
    `pretrained`: see build_backbone; `freeze_backbone_bn`: train() keeps the backbone's BatchNorm in eval mode."""

    def __init__(self, backbone_type, feature_dim, num_classes, branches='SMG', pretrained=False,
                 freeze_backbone_bn=False):
        super().__init__()
        if backbone_type not in BACKBONES:
            raise UserError(f"unknown backbone '{backbone_type}': expected one of {', '.join(BACKBONES)}")
        for name, value in (('feature_dim', feature_dim), ('num_classes', num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f'{name} must be a positive integer, got {value!r}')
        self.branches, self.freeze_backbone_bn = parse_branches(branches), freeze_backbone_bn
        self.backbone = build_backbone(backbone_type, pretrained)
        channels = BACKBONES[backbone_type][1]
        # one projection per branch: [B, C] -> [B, feature_dim]
        self.projections = nn.ModuleList(nn.Linear(channels, feature_dim, bias=False) for _ in self.branches)
        width = len(self.branches) * feature_dim
        self.classifier = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, num_classes, bias=False))

    def train(self, mode=True):
        super().train(mode)
        if mode and self.freeze_backbone_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, x):
        """Stage-4 map [B, C, h, w]: 14x14 at 224 input (15x15 for SE-ResNet-50)."""
        return self.backbone(x)

    def forward(self, x):
        """x [B, 3, H, W] -> (embedding [B, n*feature_dim], L2-normalised; logits [B, num_classes])."""
        grid = self.features(x)  # [B, C, h, w]
        parts = [F.normalize(proj(BRANCHES[b](grid)), dim=-1)  # n x [B, feature_dim], unit norm
                 for b, proj in zip(self.branches, self.projections)]
        concat = torch.cat(parts, dim=-1)  # [B, n*feature_dim], norm sqrt(n)
        return F.normalize(concat, dim=-1), self.classifier(concat)  # and logits [B, num_classes]


# ---- Params and FLOPs, counted as thop did in 2020 (when the published table was made) ----

def count_params_flops(model, image_size=224):
    """(params, flops) of `model` on one 3 x image_size x image_size image, in eval mode."""
    with warnings.catch_warnings():  # thop compares versions with distutils' deprecated LooseVersion
        warnings.simplefilter('ignore', DeprecationWarning)
        from thop import profile  # only this function needs thop

    def linear_2020(m, x, y):  # in multiplications + (in - 1) additions per output; today's thop counts only `in`
        m.total_ops += torch.DoubleTensor([(2 * m.in_features - 1) * y.numel()])

    def bn_2020(m, x, y):  # 2 operations per element (scale and shift); today's thop: 4 when affine
        m.total_ops += torch.DoubleTensor([2 * x[0].numel()])

    custom = {nn.Linear: linear_2020, **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm), bn_2020)}
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    flops, _ = profile(model, inputs=(x,), custom_ops=custom, verbose=False)  # restores train/eval
    return sum(p.numel() for p in model.parameters()), int(flops)


DATASET_CLASSES = {'CARS196': 98, 'CUB200': 100, 'SOP': 11318, 'In-shop': 3997}  # training classes
TABLE_NAMES = {'resnet18': 'ResNet18', 'resnet50': 'ResNet50', 'seresnet50': 'SEResNet50'}


def main(argv=None):
    """Print the Params | FLOPs table in Markdown (rows: backbones, columns: datasets; feature_dim 512, 224 input)."""
    argparse.ArgumentParser(description='Print the Params | FLOPs table of every backbone at feature_dim 512 and '
                                        "224 x 224 input, one column per dataset's training classes").parse_args(argv)
    print('| Backbone | ' + ' | '.join(DATASET_CLASSES) + ' |\n| --- |' + ' --- |' * len(DATASET_CLASSES))
    for backbone_type in BACKBONES:
        cells = []
        for num_classes in DATASET_CLASSES.values():
            with torch.device('meta'):  # counts need shapes only: nothing allocated or computed, so this takes seconds
                model = Model(backbone_type, 512, num_classes)
            params, flops = count_params_flops(model)
            cells.append(f'{params / 1e6:.2f}M \\| {flops / 1e9:.2f}G')
        print(f'| {TABLE_NAMES[backbone_type]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    run_cli(main)
