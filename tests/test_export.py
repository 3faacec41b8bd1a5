"""scripts/export.py: ONNX and AOTInductor exports of a digits-trained RedNet-26 round-trip, carry their
preprocessing, keep each involution to a few ONNX nodes, and classify the digits validation set like eval.py."""
import contextlib
import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rednet
from rednet.ops.onnx_form import NODES_PER_INVOLUTION
from _train_utils import REPO, run_train

ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

# the digits data config (configs/data/digits.yaml): what the exported metadata must say
DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD = 12, [0.5] * 3, [0.5] * 3


@pytest.fixture(scope='module')
def export_mod():
    spec = importlib.util.spec_from_file_location('export', REPO / 'scripts' / 'export.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def digits_ckpt(tmp_path_factory):
    """RedNet-26 (small-input stem) trained one epoch on digits by train.py."""
    run = tmp_path_factory.mktemp('digits')
    result = run_train(['model=rednet26', 'data=digits', 'train.epochs=1', 'train.progress=false',
                        f'hydra.run.dir={run}'], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return run / 'checkpoints' / 'best.pt'


@pytest.fixture(scope='module')
def onnx_file(export_mod, digits_ckpt, tmp_path_factory):
    """(the exported file, what export.py printed)"""
    out, printed = tmp_path_factory.mktemp('onnx') / 'digits.onnx', io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_mod.main([str(digits_ckpt), '--format', 'onnx', '--out', str(out), '--batch', '2',
                                '--dynamic-batch']) == 0
    return out, printed.getvalue()


def _digits_val(meta):
    """The digits validation images, preprocessed by the metadata alone (resize to input_size, mean/std)."""
    from rednet.data import DigitsDataset
    ds = DigitsDataset(train=False, img_size=meta['input_size'][-1])
    mean = torch.tensor(meta['mean']).view(1, 3, 1, 1)
    std = torch.tensor(meta['std']).view(1, 3, 1, 1)
    return (ds.images - mean) / std, torch.tensor(ds.targets)


def test_onnx_roundtrip_metadata_and_dynamic_batch(onnx_file, digits_ckpt):
    onnx_file, out = onnx_file
    assert 'onnx vs PyTorch (batch 2 and 3): max abs error' in out and ': OK' in out and ' MB)' in out
    proto = onnx.load(str(onnx_file))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta['mean'] == DIGITS_MEAN and meta['std'] == DIGITS_STD
    assert meta['input_size'] == [3, DIGITS_SIZE, DIGITS_SIZE] and meta['crop_pct'] == 1.0
    assert meta['num_classes'] == 10
    model = rednet.load_model(digits_ckpt).eval()
    sess = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    for batch in (1, 5):
        x = torch.randn(batch, 3, DIGITS_SIZE, DIGITS_SIZE)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_onnx_nodes_per_involution(onnx_file):
    """Each involution's aggregation (the nodes in an Involution's own scope, not in its pool/reduce/span
    children) is one Gather + one MatMul and at most NODES_PER_INVOLUTION nodes (the 49-tap form: ~150)."""
    proto = onnx.load(str(onnx_file[0]))
    per_layer = {}
    for node in proto.graph.node:
        scope = {p.key: p.value for p in node.metadata_props}.get('namespace', '').split('/')
        if len(scope) >= 2 and scope[-2].endswith('rednet.model.Involution'):
            per_layer.setdefault(scope[-2], []).append(node.op_type)
    assert len(per_layer) == 9  # RedNet-26: the stem's involution and 8 bottlenecks (1 + 2 + 4 + 1)
    for layer, ops in per_layer.items():
        assert len(ops) <= NODES_PER_INVOLUTION, (layer, ops)
        assert ops.count('MatMul') == 1 and ops.count('Gather') == 1 and 'Mul' not in ops, (layer, ops)


def test_onnx_classifies_digits_like_eval(onnx_file, digits_ckpt, tmp_path):
    onnx_file = onnx_file[0]
    proto = onnx.load(str(onnx_file))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    images, targets = _digits_val(meta)
    sess = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    logits = sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]
    correct = int((torch.from_numpy(logits).argmax(1) == targets).sum())
    result = subprocess.run([sys.executable, 'eval.py', f'checkpoint={digits_ckpt}', 'data=digits',
                             'progress=false', f'hydra.run.dir={tmp_path}'], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert report['images'] == len(targets) == 360
    assert correct == round(report['top1'] * 360 / 100)  # the same images right, counted by eval.py
    assert correct > 180  # one epoch learns digits (chance is 10%)


@pytest.mark.slow
def test_aoti_roundtrip(export_mod, digits_ckpt, tmp_path, capsys):
    # static batch (a dynamic one compiles more code): AOTInductor's C++ build dominates this test
    out = tmp_path / 'digits.pt2'
    assert export_mod.main([str(digits_ckpt), '--format', 'aoti', '--out', str(out), '--batch', '2']) == 0
    printed = capsys.readouterr().out
    assert 'aoti vs PyTorch (batch 2): max abs error' in printed and ': OK' in printed
    compiled = torch._inductor.aoti_load_package(str(out))
    meta = {k: json.loads(v) for k, v in compiled.get_metadata().items() if k in ('mean', 'std', 'input_size')}
    assert meta == {'mean': DIGITS_MEAN, 'std': DIGITS_STD, 'input_size': [3, DIGITS_SIZE, DIGITS_SIZE]}
    model = rednet.load_model(digits_ckpt).eval()
    x = torch.randn(2, 3, DIGITS_SIZE, DIGITS_SIZE)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mismatch_exits_nonzero(export_mod, tmp_path, monkeypatch, capsys):
    # a runtime that returns wrong logits must fail the export (timm's tiny test_resnet: a fast export)
    real = export_mod.onnx_runner
    wrong = (lambda path: (lambda x: real(path)(x) + 1e-3))
    monkeypatch.setitem(export_mod.FORMATS, 'onnx', (export_mod.export_onnx, wrong))
    assert export_mod.main(['test_resnet', '--format', 'onnx', '--out', str(tmp_path / 'r.onnx'),
                            '--img-size', '32']) == 1
    assert 'MISMATCH' in capsys.readouterr().out


def test_bad_arguments_exit_2(export_mod, tmp_path, capsys):
    assert export_mod.main(['no_such_model', '--format', 'onnx', '--out', str(tmp_path / 'x.onnx')]) == 2
    assert 'neither a file nor a timm model name' in capsys.readouterr().err
    assert export_mod.main(['rednet26', '--format', 'onnx', '--out', str(tmp_path / 'x.onnx'),
                            '--batch', '0']) == 2
    assert '--batch and --img-size must be positive' in capsys.readouterr().err


def test_benchmark_deploy_table(capsys):
    # the --deploy table on tiny inputs; the compilers' rows are left out here (their exports are tested above)
    spec = importlib.util.spec_from_file_location('benchmark', REPO / 'scripts' / 'benchmark.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(['--deploy', '--models', 'resnet26,rednet26', '--runtimes', 'eager,ONNX Runtime', '--bounds',
                '--batch', '1', '--img-size', '32', '--model-repeats', '1', '--threads', '1'])
    out = capsys.readouterr().out
    for row in ('| resnet26 / rednet26 | eager |', '| resnet26 / rednet26 | ONNX Runtime |',
                '| resnet26 / rednet26 (bound: free aggregation) | ONNX Runtime |'):
        assert row in out, out
    assert 'resnet50' not in out.split('| models |')[1]
