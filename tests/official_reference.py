"""Test helpers: random state dicts in the official (mmcls) and PaddleClas layouts, and a straightforward
functional re-implementation of the official RedNet forward pass (the authors' naive involution), written
from the spec's description independently of ``rednet.model``."""
import pickle
from collections import OrderedDict
from typing import Dict

import torch
import torch.nn.functional as F

from rednet.model import DEPTHS

MIDS = (64, 128, 256, 512)


def official_state_dict(depth: int = 26, stem_kernel_size: int = 3, num_classes: int = 1000, head: bool = True,
                        prefix: bool = True, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights in the official key layout (random BN statistics too, so every term matters)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    pre = 'backbone.' if prefix else ''

    def conv(key, out_c, in_c, k=1, bias=False, gain=2.0):
        sd[key + '.weight'] = torch.randn(out_c, in_c, k, k, generator=g) * (gain / (in_c * k * k)) ** 0.5
        if bias:
            sd[key + '.bias'] = torch.randn(out_c, generator=g) * 0.1

    def bn(key, c, scale=1.0):
        sd[key + '.weight'] = scale * (1 + 0.2 * torch.randn(c, generator=g))
        sd[key + '.bias'] = 0.1 * torch.randn(c, generator=g)
        sd[key + '.running_mean'] = 0.1 * torch.randn(c, generator=g)
        sd[key + '.running_var'] = 0.5 + torch.rand(c, generator=g)
        sd[key + '.num_batches_tracked'] = torch.tensor(1000)

    def involution(key, c, k):
        conv(key + '.conv1.conv', c // 4, c)
        bn(key + '.conv1.bn', c // 4)
        # kernels of moderate size, so that activations stay O(1) through a deep random network
        conv(key + '.conv2.conv', k * k * (c // 16), c // 4, bias=True, gain=1.0 / (k * k))

    conv(pre + 'stem.0.conv', 32, 3, 3)
    bn(pre + 'stem.0.bn', 32)
    involution(pre + 'stem.1', 32, stem_kernel_size)
    bn(pre + 'stem.2', 32)
    conv(pre + 'stem.4.conv', 64, 32, 3)
    bn(pre + 'stem.4.bn', 64)
    in_c = 64
    for i, (blocks, mid) in enumerate(zip(DEPTHS[depth], MIDS)):
        for j in range(blocks):
            p = f'{pre}layer{i + 1}.{j}.'
            conv(p + 'conv1', mid, in_c)
            bn(p + 'bn1', mid)
            involution(p + 'conv2', mid, 7)
            bn(p + 'bn2', mid)
            conv(p + 'conv3', mid * 4, mid)
            bn(p + 'bn3', mid * 4, scale=0.05)
            if j == 0:
                conv(p + 'downsample.0', mid * 4, in_c)
                bn(p + 'downsample.1', mid * 4)
            in_c = mid * 4
    if head:
        sd[('head.' if prefix else '') + 'fc.weight'] = torch.randn(num_classes, 2048, generator=g) * 0.01
        sd[('head.' if prefix else '') + 'fc.bias'] = torch.randn(num_classes, generator=g) * 0.1
    return sd


def to_paddle(official: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Official layout -> PaddleClas layout: no prefixes, _mean/_variance, fc.weight [in, out], numpy."""
    out = OrderedDict()
    for key, value in official.items():
        key = key.replace('backbone.', '').replace('head.', '')
        if key.endswith('num_batches_tracked'):
            continue
        key = key.replace('running_mean', '_mean').replace('running_var', '_variance')
        if key == 'fc.weight':
            value = value.t()
        out[key] = value.numpy().copy()
    out['StructuredToParameterName@@'] = {k: f'param_{i}' for i, k in enumerate(out)}
    return out


def save_pdparams(obj, path, protocol: int = 2) -> None:
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                        False, 0.0, 1e-5)


def _conv_module(x, sd, p, stride=1, padding=0):
    return F.relu(_bn(F.conv2d(x, sd[p + 'conv.weight'], None, stride, padding), sd, p + 'bn.'))


def _official_involution(x, sd, p, k, stride):
    """The authors' naive involution: AvgPool2d(s, s), reduce, span, then nn.Unfold aggregation."""
    w = F.avg_pool2d(x, stride, stride) if stride > 1 else x
    w = _conv_module(w, sd, p + 'conv1.')
    w = F.conv2d(w, sd[p + 'conv2.conv.weight'], sd[p + 'conv2.conv.bias'])
    b, c, h, wd = x.shape[0], x.shape[1], w.shape[2], w.shape[3]
    groups = c // 16
    w = w.view(b, groups, k * k, h, wd).unsqueeze(2)
    cols = F.unfold(x, k, 1, (k - 1) // 2, stride).view(b, groups, 16, k * k, h, wd)
    return (w * cols).sum(dim=3).view(b, c, h, wd)


def official_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, depth: int, stem_kernel_size: int = 3):
    """Logits of the official RedNet (eval mode) for an official-layout state dict with prefixes."""
    p = 'backbone.'
    x = _conv_module(x, sd, p + 'stem.0.', stride=2, padding=1)
    x = _official_involution(x, sd, p + 'stem.1.', stem_kernel_size, 1)
    x = F.relu(_bn(x, sd, p + 'stem.2.'))
    x = _conv_module(x, sd, p + 'stem.4.', padding=1)
    x = F.max_pool2d(x, 3, 2, 1)
    for i, blocks in enumerate(DEPTHS[depth]):
        for j in range(blocks):
            q = f'{p}layer{i + 1}.{j}.'
            stride = 2 if (i > 0 and j == 0) else 1
            identity = x
            out = F.relu(_bn(F.conv2d(x, sd[q + 'conv1.weight']), sd, q + 'bn1.'))
            out = F.relu(_bn(_official_involution(out, sd, q + 'conv2.', 7, stride), sd, q + 'bn2.'))
            out = _bn(F.conv2d(out, sd[q + 'conv3.weight']), sd, q + 'bn3.')
            if j == 0:
                identity = _bn(F.conv2d(x, sd[q + 'downsample.0.weight'], stride=stride), sd, q + 'downsample.1.')
            x = F.relu(out + identity)
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd['head.fc.weight'], sd['head.fc.bias'])
