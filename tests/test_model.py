"""The RedNet model zoo: exact parameter counts, the timm API, features, odd sizes, the reference op."""
import pytest
import timm
import torch
import torch.nn.functional as F

import rednet
from rednet.model import Involution
from rednet.ops import involution, involution_reference

PARAMS = {26: 9_233_166, 38: 12_386_986, 50: 15_540_806, 101: 25_652_950, 152: 33_984_582}


@pytest.mark.parametrize('depth', sorted(PARAMS))
def test_parameter_counts_equal_official(depth):
    model = timm.create_model(f'rednet{depth}')
    assert sum(p.numel() for p in model.parameters()) == PARAMS[depth]


def test_stem_kernel_7_adds_720_parameters():
    k3 = sum(p.numel() for p in timm.create_model('rednet50').parameters())
    k7 = sum(p.numel() for p in timm.create_model('rednet50', stem_kernel_size=7).parameters())
    assert k7 - k3 == 720


def test_official_init():
    model = timm.create_model('rednet26')
    for m in model.modules():
        if isinstance(m, rednet.Bottleneck):
            assert torch.all(m.bn3.weight == 0) and torch.all(m.bn3.bias == 0)
            assert torch.all(m.bn2.weight == 1)
    assert torch.all(model.fc.bias == 0) and 0.005 < model.fc.weight.std() < 0.015
    assert torch.all(model.layer1[0].inv.span.bias == 0)


def _direct_loop(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    _, g, k, _, ho, wo = weight.shape
    xp = F.pad(x, (padding,) * 4)
    out = torch.zeros(n, c, ho, wo, dtype=x.dtype)
    for ch in range(c):
        grp = ch // (c // g)
        for i in range(ho):
            for j in range(wo):
                for a in range(k):
                    for b in range(k):
                        out[:, ch, i, j] += weight[:, grp, a, b, i, j] * \
                            xp[:, ch, i * stride + a * dilation, j * stride + b * dilation]
    return out


@pytest.mark.parametrize('shape,groups,k,stride,dilation', [
    ((2, 8, 7, 9), 2, 3, 1, 1),
    ((1, 6, 9, 8), 3, 5, 2, 1),
    ((2, 4, 8, 7), 1, 3, 2, 2),
    ((1, 4, 5, 5), 4, 7, 1, 1),
])
def test_reference_op_matches_direct_loop(shape, groups, k, stride, dilation):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    padding = dilation * (k - 1) // 2
    ho = (shape[2] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (shape[3] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    weight = torch.randn(shape[0], groups, k, k, ho, wo, dtype=torch.float64)
    expected = _direct_loop(x, weight, stride, padding, dilation)
    torch.testing.assert_close(involution(x, weight, stride, None, dilation, backend='reference'), expected)
    torch.testing.assert_close(involution_reference(x, weight, stride, padding, dilation), expected)


def test_op_rejects_bad_arguments():
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match='does not match the output size'):
        involution(x, torch.randn(1, 2, 3, 3, 5, 5))
    with pytest.raises(ValueError, match='divisible'):
        involution(x, torch.randn(1, 3, 3, 3, 6, 6))
    with pytest.raises(ValueError, match='unknown backend'):
        involution(x, torch.randn(1, 2, 3, 3, 6, 6), backend='cupy')


def test_timm_api():
    model = timm.create_model('rednet26', num_classes=7, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 2048)
    assert model(x).shape == (2, 7)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['first_conv'] == 'stem.conv1.conv' and cfg['classifier'] == 'fc'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert dict(model.named_modules())[cfg['first_conv']].in_channels == 1
    assert 'rednet50' in timm.list_models('rednet*')


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=4, small_input=True, zero_init_last=False)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls = []
    model.layer2[0].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    # checkpointed: the block ran once without keeping activations and once more, recomputed, during backward
    assert len(calls) == 2


def test_features_only_for_detection():
    model = timm.create_model('rednet50', features_only=True, stem_kernel_size=7).eval()
    outs = model(torch.randn(1, 3, 128, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 64, 48), (256, 32, 24), (512, 16, 12), (1024, 8, 6),
                                                    (2048, 4, 3)]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    picked = timm.create_model('rednet26', features_only=True, out_indices=(2, 3, 4))
    assert picked.feature_info.channels() == [512, 1024, 2048]


def test_small_input_keeps_resolution():
    model = timm.create_model('rednet26', small_input=True, features_only=True).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[-1] for o in outs] == [32, 32, 16, 8, 4]


@pytest.mark.parametrize('size', [(97, 75), (33, 31), (225, 223)])
def test_odd_input_sizes(size):
    model = timm.create_model('rednet26', num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_stride2_kernel_on_odd_size_averages_valid_pixels():
    """Odd sizes: one kernel per output pixel, generated from the mean of the in-bounds part of the window."""
    torch.manual_seed(0)
    inv = Involution(16, kernel_size=3, stride=2).eval()
    x = torch.randn(1, 16, 7, 5)
    pooled = inv.pool(x)
    assert pooled.shape[-2:] == (4, 3)
    torch.testing.assert_close(pooled[..., :3, :2], F.avg_pool2d(x[..., :6, :4], 2, 2))
    torch.testing.assert_close(pooled[..., 3, 2], x[..., 6, 4])  # corner window holds one pixel
    torch.testing.assert_close(pooled[..., 3, 0], x[..., 6, 0:2].mean(-1))
    assert inv(x).shape == (1, 16, 4, 3)
