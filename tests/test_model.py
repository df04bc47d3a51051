"""Tests of model.py: the published Params/FLOPs table, shapes and norms, the pooling branches,
ImageNet weight files (SE-ResNet-50 checked against timm's layout), errors and frozen BatchNorm.
CPU only, nothing is downloaded."""
import os
import re
import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
from _train_fixtures import python_env, run_process  # noqa: E402
from cli import UserError, run_cli  # noqa: E402

# the seed README's table: Params | FLOPs at feature_dim 512, one 224x224 image
PUBLISHED = {
    'ResNet18': ['12.12M | 4.29G', '12.12M | 4.29G', '29.35M | 4.32G', '18.11M | 4.30G'],
    'ResNet50': ['26.81M | 10.64G', '26.81M | 10.64G', '44.04M | 10.68G', '32.80M | 10.66G'],
    'SEResNet50': ['29.34M | 11.20G', '29.34M | 11.20G', '46.57M | 11.24G', '35.33M | 11.22G'],
}
STAGE4 = {'resnet18': (512, 14), 'resnet50': (2048, 14), 'seresnet50': (2048, 15)}


def randomise_bn(net, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so that loading them matters."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return net


def torchvision_trunk(net, x):
    """Stage-4 map of a torchvision ResNet (its own forward without avgpool/fc)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.fixture(scope='module')
def timm_seresnet50(tmp_path_factory):
    """timm's legacy_seresnet50 with random weights and its state dict saved to a file."""
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    net = randomise_bn(timm.create_model('legacy_seresnet50', pretrained=False)).eval()
    path = tmp_path_factory.mktemp('weights') / 'se_resnet50-random.pth'
    torch.save(net.state_dict(), path)
    return net, str(path)


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
    """torchvision resnet18 with random weights, state dict saved to a file."""
    torch.manual_seed(1)
    net = randomise_bn(torchvision.models.resnet18(weights=None)).eval()
    path = tmp_path_factory.mktemp('weights') / 'resnet18-random.pth'
    torch.save(net.state_dict(), path)
    return net, str(path)


# ---------------------------------------------------------------------------------------------
# the published Params | FLOPs table
# ---------------------------------------------------------------------------------------------


def test_printed_table_equals_published(capsys):
    M.main([])  # what `python model.py` prints
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == '| Backbone | CARS196 | CUB200 | SOP | In-shop |'
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip('|').split(' | ')]
        rows[cells[0]] = [c.replace('\\|', '|') for c in cells[1:]]
    assert rows == PUBLISHED  # all 24 cells, to the printed digit


def test_counts_follow_the_2020_convention():
    with torch.device('meta'):  # shapes are all the counts need
        model = M.Model('resnet18', 512, 98)
    params, flops = M.count_params_flops(model)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its fc
    assert params == (11689512 - 513000) + 3 * 512 * 512 + 2 * 1536 + 1536 * 98
    # the head: 3 projections and the classifier Linear cost in + (in - 1) per output, BatchNorm1d 2
    _, backbone_flops = M.count_params_flops(model.backbone)
    assert flops - backbone_flops == 3 * 1023 * 512 + 2 * 1536 + 3071 * 98
    model.classifier[1] = nn.Linear(1536, 11318, bias=False, device='meta')
    params_sop, flops_sop = M.count_params_flops(model)
    assert params_sop - params == 1536 * (11318 - 98)
    assert flops_sop - flops == 3071 * (11318 - 98)


def test_meta_device_counts_equal_real_counts():
    # the table is computed on the meta device; a real CPU forward must count the same
    torch.manual_seed(0)
    real = M.count_params_flops(M.Model('resnet18', 512, 100))
    with torch.device('meta'):
        model = M.Model('resnet18', 512, 100)
    assert M.count_params_flops(model) == real


# ---------------------------------------------------------------------------------------------
# shapes, norms, branches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('backbone_type', ['resnet18', 'resnet50', 'seresnet50'])
def test_shapes_and_unit_norms(backbone_type):
    channels, side = STAGE4[backbone_type]
    with torch.device('meta'):  # exact shapes at 224 without the arithmetic
        model = M.Model(backbone_type, feature_dim=16, num_classes=7).eval()
        x = torch.empty(2, 3, 224, 224)
        assert model.features(x).shape == (2, channels, side, side)
        embedding, logits = model(x)
        assert embedding.shape == (2, 48) and logits.shape == (2, 7)
    torch.manual_seed(0)
    model = M.Model(backbone_type, feature_dim=16, num_classes=7).eval()
    with torch.no_grad():
        embedding, logits = model(torch.randn(2, 3, 48, 48))
    assert embedding.shape == (2, 48) and logits.shape == (2, 7)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert embedding.std() > 0.01 and logits.std() > 0.01  # not constant


def test_resnet18_stage4_is_14x14_at_224():
    torch.manual_seed(0)
    with torch.no_grad():
        grid = M.Model('resnet18', 8, 2).eval().features(torch.randn(1, 3, 224, 224))
    assert grid.shape == (1, 512, 14, 14)


def test_pooling_branches_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 2, 2)
    assert M.spoc(x).item() == pytest.approx(3.0)
    assert M.mac(x).item() == pytest.approx(6.0)
    assert M.gem(x).item() == pytest.approx(((1 + 8 + 27 + 216) / 4) ** (1 / 3))
    assert M.gem(x.half()).dtype == torch.float16  # pools in float32, returns the input's dtype
    assert M.gem(torch.full((1, 1, 2, 2), 50.0).half()).item() == pytest.approx(50.0, rel=1e-3)


def test_head_composition():
    # embedding = L2(concat of L2(Linear(pool(grid)))), logits = classifier(concat before the last L2)
    torch.manual_seed(0)
    model = M.Model('resnet18', feature_dim=8, num_classes=5, branches='GS').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embedding, logits = model(x)
        grid = model.features(x)  # [2, 512, 2, 2]
        gem = grid.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)  # [2, 512]
        g = nn.functional.normalize(gem @ model.projections[0].weight.T, dim=-1)  # [2, 8]
        s = nn.functional.normalize(grid.mean((2, 3)) @ model.projections[1].weight.T, dim=-1)
        concat = torch.cat([g, s], dim=-1)
        assert torch.allclose(embedding, concat / 2 ** 0.5, atol=1e-6)
        assert torch.allclose(logits, model.classifier(concat), atol=1e-5)
    assert embedding.shape == (2, 16)


def test_branch_sets():
    for s in ('SMG', 'GMS', 'M', 'GS'):
        assert M.parse_branches(s) == s
    for s, why in (('', 'empty'), ('SS', 'repeated letter(s) S'), ('SX', 'unknown letter(s) X'),
                   ('smg', 'unknown letter(s) g, m, s')):
        with pytest.raises(UserError, match=re.escape(why)):
            M.parse_branches(s)
    with pytest.raises(UserError, match='repeated'):
        M.Model('resnet18', 8, 3, branches='SMGS')
    model = M.Model('resnet18', 8, 3, branches='MG')
    assert model.branches == 'MG' and len(model.projections) == 2 and model.classifier[0].num_features == 16
    rebuilt = M.Model(backbone_type='resnet18', feature_dim=8, num_classes=3, branches='MG')
    rebuilt.load_state_dict(model.state_dict())  # same structure, strict


def test_bad_constructor_arguments():
    with pytest.raises(UserError, match='resnet18, resnet50, seresnet50'):
        M.Model('vgg16', 512, 10)
    with pytest.raises(UserError, match='feature_dim must be a positive integer'):
        M.Model('resnet18', 0, 10)
    with pytest.raises(UserError, match='num_classes must be a positive integer'):
        M.Model('resnet18', 8, -1)


# ---------------------------------------------------------------------------------------------
# ImageNet weight files
# ---------------------------------------------------------------------------------------------


def test_seresnet50_takes_over_timm_legacy_weights(timm_seresnet50):
    ref, path = timm_seresnet50
    model = M.Model('seresnet50', 8, 4, pretrained=path).eval()
    theirs = ref.state_dict()
    ours = model.backbone.state_dict()
    mapped = M.adapt_state_dict(theirs, 'seresnet50')
    assert len(ours) == len(theirs) - 2 == 382  # every tensor but last_linear.weight/bias
    assert set(mapped) == set(ours)
    assert all(torch.equal(ours[k], mapped[k]) for k in ours)

    # the same network once timm's stage 3 does not downsample and its stem pool pads by 1
    block = ref.layer3[0]
    old = block.conv1.stride, block.downsample[0].stride, ref.pool0.padding
    block.conv1.stride = block.downsample[0].stride = (1, 1)
    ref.pool0.padding = 1
    try:
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            expected, got = ref.forward_features(x), model.features(x)
    finally:
        block.conv1.stride, block.downsample[0].stride, ref.pool0.padding = old
    assert got.shape == expected.shape == (2, 2048, 5, 5)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1  # not a trivially zero map


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_state_dict_file_loads(arch, tmp_path, resnet18_file):
    if arch == 'resnet18':
        ref, path = resnet18_file
    else:
        torch.manual_seed(2)
        ref = randomise_bn(torchvision.models.resnet50(weights=None)).eval()
        path = str(tmp_path / 'resnet50.pth')
        torch.save(ref.state_dict(), path)
    model = M.Model(arch, 8, 4, pretrained=path).eval()
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith('fc.')}
    ours = model.backbone.state_dict()
    assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in ours)

    block = ref.layer3[0]
    strided = block.conv2 if arch == 'resnet50' else block.conv1
    strided.stride = block.downsample[0].stride = (1, 1)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model.features(x), torchvision_trunk(ref, x), rtol=1e-4, atol=1e-5)


def test_wrong_weight_file_is_a_clear_error(tmp_path, timm_seresnet50, resnet18_file):
    _, se_path = timm_seresnet50
    _, r18_path = resnet18_file
    state = torch.load(se_path, weights_only=True)
    del state['layer2.1.conv2.weight']
    state['layer5.0.conv1.weight'] = torch.zeros(1)
    broken = tmp_path / 'broken.pth'
    torch.save(state, broken)
    with pytest.raises(UserError) as err:
        M.Model('seresnet50', 8, 4, pretrained=str(broken))
    message = str(err.value)
    assert message.startswith(f'{broken} does not hold ImageNet weights for seresnet50')
    assert '1 missing: layer2.1.conv2.weight' in message
    assert '1 unexpected: layer5.0.conv1.weight' in message

    # a resnet18 file offered to resnet50: shapes and names disagree, every mismatch is counted
    with pytest.raises(UserError, match=r'missing: .* and \d+ more.*wrong shape: .*\(expected'):
        M.Model('resnet50', 8, 4, pretrained=r18_path)
    with pytest.raises(UserError, match='not found: .*nowhere.pth'):
        M.Model('resnet18', 8, 4, pretrained=str(tmp_path / 'nowhere.pth'))


def test_pretrained_true_uses_the_hub_cache(tmp_path, monkeypatch, resnet18_file):
    ref, path = resnet18_file
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    checkpoints = tmp_path / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    os.link(path, checkpoints / 'resnet18-f37072fd.pth')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: pytest.fail('no download'))
    model = M.Model('resnet18', 8, 4, pretrained=True)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


@pytest.mark.parametrize('backbone_type', ['resnet18', 'resnet50', 'seresnet50'])
def test_failed_download_message(backbone_type, tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError) as err:
        M.Model(backbone_type, 8, 4, pretrained=True)
    message = str(err.value)
    file_name = {'resnet18': 'resnet18-f37072fd.pth', 'resnet50': 'resnet50-0676ba61.pth',
                 'seresnet50': 'se_resnet50-ce0d4300.pth'}[backbone_type]
    assert '\n' not in message
    assert 'Temporary failure in name resolution' in message
    assert f'The file {file_name} is needed' in message
    assert f'put it in {tmp_path / "hub" / "checkpoints"}{os.sep} ' in message
    assert '--pretrained PATH' in message and '--pretrained none' in message


@pytest.mark.slow
def test_failed_download_through_run_cli_has_no_traceback(tmp_path):
    # a real download attempt through a proxy that refuses connections: fails at once, offline or not
    env = python_env(TORCH_HOME=str(tmp_path), http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                     HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9', no_proxy='', NO_PROXY='')
    code = "import model, cli; cli.run_cli(lambda: model.Model('seresnet50', 8, 4, pretrained=True))"
    result = run_process([sys.executable, '-c', code], env=env, cwd=ROOT)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: cannot download the ImageNet weights of seresnet50 (')
    assert 'se_resnet50-ce0d4300.pth' in last and '--pretrained none' in last
    assert not os.path.exists(tmp_path / 'hub' / 'checkpoints' / 'se_resnet50-ce0d4300.pth')


def test_run_cli_exit_status(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: M.Model('resnet18', 8, 4, pretrained=str(tmp_path / 'missing.pth')))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith('error: ImageNet weights for resnet18 not found: ')


# ---------------------------------------------------------------------------------------------
# frozen backbone BatchNorm
# ---------------------------------------------------------------------------------------------


def test_freeze_backbone_bn_keeps_running_stats(resnet18_file):
    _, path = resnet18_file
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for freeze in (True, False):
        model = M.Model('resnet18', 8, 3, pretrained=path, freeze_backbone_bn=freeze).train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        _, logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        after = model.state_dict()
        stats = [k for k in after if k.startswith('backbone.') and
                 k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
        assert len(stats) == 20 * 3
        unchanged = [torch.equal(before[k], after[k]) for k in stats]
        assert all(unchanged) if freeze else not any(unchanged)
        # the backbone's weights still learn; the classifier's BatchNorm always trains
        assert not torch.equal(before['backbone.layer4.1.conv2.weight'], after['backbone.layer4.1.conv2.weight'])
        assert not torch.equal(before['classifier.0.running_mean'], after['classifier.0.running_mean'])
        assert model.classifier[0].training and model.backbone.bn1.training is not freeze
    model.eval()
    assert not model.backbone.bn1.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_mixed_precision_forward_on_cuda():
    # float16 autocast, channels_last as train.py runs it: finite and close to the float32 result
    torch.manual_seed(0)
    model = M.Model('resnet50', 64, 10).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device='cuda').to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, _ = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            embedding, logits = model(x)
    assert torch.isfinite(embedding).all() and torch.isfinite(logits).all()
    assert (embedding.float() * reference).sum(-1).min() > 0.99  # cosine similarity
