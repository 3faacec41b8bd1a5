"""ONNX export through the native involution path, checked by running the exported graph in onnxruntime."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import rednet  # noqa: F401
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
