"""ONNX export (each involution as one Gather + one MatMul, rednet.ops.onnx_form), checked in onnxruntime."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import rednet
from rednet.model import Involution

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')


def _run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)


def test_rednet_onnx_export_matches_pytorch(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('rednet26', involution_backend='native', num_classes=10).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / 'rednet26.onnx'
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['image'], output_names=['logits'],
                      dynamic_axes={'image': {0: 'batch'}})
    import onnx
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert 'Conv' in ops and 'Mul' in ops
    with torch.no_grad():
        want = model(x).numpy()
    got = _run_onnx(path, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # a different batch size through the dynamic axis
    x3 = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(_run_onnx(path, x3), model(x3).numpy(), rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


def test_involution_layer_dynamo_onnx_export(tmp_path):
    # the torch.export-based exporter traces the custom autograd Function (its functional branch)
    torch.manual_seed(0)
    layer = nn.Sequential(Involution(32, 7, stride=2, backend='native'), nn.ReLU()).eval()
    _randomise_bn(layer)
    x = torch.randn(1, 32, 13, 14)
    path = tmp_path / 'inv.onnx'
    torch.onnx.export(layer, (x,), str(path), dynamo=True, external_data=False)
    with torch.no_grad():
        want = layer(x).numpy()
    np.testing.assert_allclose(_run_onnx(path, x), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('k,stride,dilation,size', [(7, 1, 1, (9, 11)), (7, 2, 1, (10, 13)), (3, 2, 2, (8, 7)),
                                                    (3, 1, 1, (5, 6))])
def test_onnx_form_matches_reference_float64(k, stride, dilation, size):
    # the Gather + MatMul formulation against the official unfold math, in PyTorch (float64)
    from rednet.ops import involution_reference, output_size
    from rednet.ops.onnx_form import involution_onnx
    gen = torch.Generator().manual_seed(0)
    pad = dilation * (k - 1) // 2
    ho, wo = (output_size(s, k, stride, pad, dilation) for s in size)
    x = torch.randn(2, 32, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 2, k, k, ho, wo, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(involution_onnx(x, w, stride, pad, dilation),
                               involution_reference(x, w, stride, pad, dilation), rtol=1e-12, atol=1e-12)


def test_onnx_form_tap_index_by_hand():
    # 4x5 padded plane, K=3, stride 2, dilation 1, 1x2 outputs: pixel (0, 1) starts at column 2
    from rednet.ops.onnx_form import tap_index
    want = [0, 1, 2, 5, 6, 7, 10, 11, 12, 2, 3, 4, 7, 8, 9, 12, 13, 14]
    assert tap_index(4, 5, 3, 2, 1, 1, 2).tolist() == want


def test_involution_op_exports_as_gather_matmul(tmp_path):
    # the rednet.ops.involution hook: whatever the backend, the exported op is the Gather + MatMul form
    class Agg(nn.Module):
        def forward(self, x, w):
            return rednet.ops.involution(x, w, stride=2, backend='cpp')

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, 9, 8, generator=gen), torch.randn(2, 2, 7, 7, 5, 4, generator=gen)
    path = tmp_path / 'agg.onnx'
    torch.onnx.export(Agg(), (x, w), str(path), dynamo=False, input_names=['x', 'w'])
    import onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count('MatMul') == 1 and ops.count('Gather') >= 1 and 'Mul' not in ops, ops
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = sess.run(None, {'x': x.numpy(), 'w': w.numpy()})[0]
    want = rednet.ops.involution_reference(x, w, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
