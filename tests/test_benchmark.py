"""scripts/benchmark.py runs end to end on tiny shapes (its numbers are for humans; here only that it works and
that its lower-bound stand-ins keep the shapes and gradients of the layers they replace)."""
import importlib.util
import os

import pytest
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('benchmark', os.path.join(ROOT, 'scripts', 'benchmark.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize('bound', ['bound: free aggregation', 'bound: free involution'])
def test_bound_variants_keep_shapes_and_train(bench, bound):
    torch.manual_seed(0)
    real = timm.create_model('rednet26', num_classes=5)
    free = bench.build_model('rednet26', bound)
    free.reset_classifier(5)
    x = torch.randn(2, 3, 45, 38)
    assert free(x).shape == real(x).shape == (2, 5)
    free(x).sum().backward()
    grads = {k: p.grad for k, p in free.named_parameters()}
    assert grads['fc.weight'] is not None and grads['stem.conv1.conv.weight'].abs().sum() > 0
    # the free aggregation still runs the kernel generator forward and backward; the free involution does not
    span_grad = grads['layer2.0.inv.span.weight']
    if bound == 'bound: free aggregation':
        assert span_grad is not None and span_grad.abs().sum() == 0
    else:
        assert span_grad is None


def test_benchmark_prints_all_tables(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, 'OP_SHAPES', [(2, 32, 9, 1), (2, 32, 10, 2)])
    monkeypatch.setattr(bench, 'FUSE_SHAPES', [(2, 32, 17, 1), (2, 32, 9, 2)])
    import rednet.model
    monkeypatch.setattr(rednet.model, 'FUSE_MIN_BYTES', {'native': 100_000, 'cpp': 100_000})  # first row only
    bench.main(['--models', 'resnet50,rednet26', '--backends', 'reference,native,cpp,native-fused', '--bounds',
                '--batch', '2', '--img-size', '32', '--repeats', '1', '--model-repeats', '1', '--threads', '1'])
    out = capsys.readouterr().out
    for row in ('| (2, 32, 9), 1 | native |', '| (2, 32, 10), 2 | reference |', '| (2, 32, 17), 1 | native | 0.2 |',
                '| (2, 32, 9), 2 | native | 0.0 |', '| (2, 32, 9), 2 | cpp | 0.0 |', '| resnet50 | ',
                '| rednet26 (cpp) |', '| rednet26 (native-fused) |',
                '| rednet26 (bound: free aggregation) |', '| rednet26 (bound: free involution) |'):
        assert row in out, row
    assert '| fused |' in out and '| unfused |' in out  # the default's choice per fuse-table row
