"""The paper's ablations: involution hyperparameters as model arguments and config, their cost (parameters,
FLOPs), checkpoints that rebuild them, Hydra sweeps, scripts/compare_runs.py, and Involution as a drop-in layer."""
import csv
import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

import rednet
from rednet.checkpoint import CheckpointError
from rednet.flops import count_flops
from rednet.model import Involution
from rednet.ops import involution_reference

from _train_utils import REPO, TINY, compose, run_train

import train  # noqa: E402  (repository root is on sys.path via _train_utils)
from rednet.train_config import check_involution_overrides, check_overrides

# from the spec (/work/shared/spec/architecture.md), not from rednet.model
WIDTHS = (64, 128, 256, 512)
BLOCKS = {26: (1, 2, 4, 1), 50: (3, 4, 6, 3)}
DEFAULT = dict(kernel_size=7, group_channels=16, reduction_ratio=4)


def official_involution_params(c, kernel_size, group_channels, reduction_ratio):
    """The official formula: reduce conv C -> C/r and its BN, span conv C/r -> K*K*G with bias."""
    cr, kkg = c // reduction_ratio, kernel_size ** 2 * (c // group_channels)
    return c * cr + 2 * cr + cr * kkg + kkg


def _params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('depth,args', [
    (26, dict(kernel_size=3)), (26, dict(kernel_size=9)), (26, dict(group_channels=1)),
    (26, dict(group_channels=32)), (26, dict(reduction_ratio=1)), (26, dict(reduction_ratio=8)),
    (26, dict(kernel_size=5, group_channels=8, reduction_ratio=2, dilation=2)),
    (50, dict(kernel_size=5, group_channels=4)),
])
def test_ablation_parameter_counts_equal_the_official_formula(depth, args):
    model = timm.create_model(f'rednet{depth}', **args)
    default = timm.create_model(f'rednet{depth}')
    variant = {**DEFAULT, **{k: v for k, v in args.items() if k != 'dilation'}}
    for stage, c in enumerate(WIDTHS):
        for block in getattr(model, f'layer{stage + 1}'):
            assert _params(block.inv) == official_involution_params(c, **variant)
    # the stem keeps its official K=3, 16 group channels and reduction 4
    assert _params(model.stem) == _params(default.stem)
    assert _params(model.stem.inv) == official_involution_params(32, 3, 16, 4)
    expected_change = sum(n * (official_involution_params(c, **variant) - official_involution_params(c, **DEFAULT))
                          for n, c in zip(BLOCKS[depth], WIDTHS))
    assert _params(model) - _params(default) == expected_change


def test_default_arguments_are_the_official_model():
    explicit = timm.create_model('rednet50', kernel_size=7, group_channels=16, reduction_ratio=4, dilation=1)
    assert _params(explicit) == 15_540_806
    inv = explicit.layer3[0].inv
    assert (inv.kernel_size, inv.groups, inv.reduction_ratio, inv.dilation, inv.stride) == (7, 16, 4, 1, 2)


def test_flop_count_of_one_ablation_layer_by_hand():
    """Involution(C=64, K=5, stride 2, 8 channels per group, reduction 2, dilation 2) on a 64x10x10 input."""
    layer = Involution(64, kernel_size=5, stride=2, group_channels=8, reduction_ratio=2, dilation=2)
    ho = wo = 5
    groups, cr = 64 // 8, 64 // 2
    pool = 64 * 10 * 10                          # average pooling reads every input element
    reduce = cr * ho * wo * 64                   # 1x1 conv 64 -> 32, no bias
    bn_relu = 2 * cr * ho * wo + cr * ho * wo    # affine BN and ReLU on 32 x 5 x 5
    span = 25 * groups * ho * wo * cr            # 1x1 conv 32 -> K*K*G = 200 channels
    span_bias = 25 * groups * ho * wo
    aggregate = 64 * ho * wo * 25                # K*K multiply-adds per output element
    assert count_flops(layer, (64, 10, 10), elementwise=False) == reduce + span + aggregate
    assert count_flops(layer, (64, 10, 10)) == pool + reduce + bn_relu + span + span_bias + aggregate


@pytest.mark.parametrize('backend,fuse', [('native', False), ('native', True), ('cpp', False), ('cpp', True)])
def test_dilated_involution_matches_reference(backend, fuse):
    """The layer passes its dilation (and the "same" padding) to every backend, fused or not, in float64."""
    torch.manual_seed(0)
    layer = Involution(16, kernel_size=3, stride=2, group_channels=4, reduction_ratio=2, dilation=2,
                       backend=backend, fuse_span=fuse).double()
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 16, 5, 4)  # ceil(H / stride): the padding keeps the size for every dilation
    ref_x = x.detach().clone().requires_grad_()
    weight = layer.span(layer.reduce(layer.pool(ref_x))).view(2, 4, 3, 3, 5, 4)
    expected = involution_reference(ref_x, weight, 2, 2, 2)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_bad_values_name_the_key_and_the_valid_values():
    with pytest.raises(ValueError, match=r'group_channels=24 is not valid: use one of 1, 2, 4, 8, 16, 32, 64'):
        timm.create_model('rednet26', group_channels=24)
    for args, key in ((dict(kernel_size=4), 'kernel_size=4'), (dict(reduction_ratio=3), 'reduction_ratio=3'),
                      (dict(dilation=0), 'dilation=0'), (dict(stem_kernel_size=2), 'stem_kernel_size=2')):
        with pytest.raises(ValueError, match=key):
            timm.create_model('rednet26', **args)
    with pytest.raises(train.ConfigError, match=r'model.group_channels=24 .* 1, 2, 4, 8, 16, 32, 64'):
        train.validate_config(compose(['model=rednet26', 'data=synthetic', 'model.group_channels=24']))
    with pytest.raises(train.ConfigError, match='only to RedNet'):
        train.validate_config(compose(['model=resnet26', 'data=synthetic', 'model.kernel_size=3']))
    # a multirun sweep is checked value by value before Hydra starts the first job
    sweep = ['-m', 'model.kernel_size=3,5,7,9', 'model.group_channels=range(8,33,8)']
    assert check_overrides(sweep) is None
    assert 'model.group_channels=24' in check_involution_overrides(sweep)
    assert check_involution_overrides(['-m', 'model.kernel_size=3,5,7,9', 'model.reduction_ratio=1,2,4,8']) is None


def test_cli_sweep_with_a_bad_value_fails_before_the_first_job(tmp_path):
    r = run_train(['-m', *TINY, 'model.kernel_size=3,4', f'hydra.sweep.dir={tmp_path}/sweep'], timeout=120)
    assert r.returncode == 2 and 'model.kernel_size=4 is not valid' in r.stderr
    assert not (tmp_path / 'sweep').exists()


def _ablation_model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=10, small_input=True, zero_init_last=False, **kwargs)
    return model.eval()


def test_checkpoints_rebuild_ablation_models(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    # ours: the training checkpoint carries every argument, dilation included
    args = dict(kernel_size=5, group_channels=8, reduction_ratio=2, dilation=2)
    model = _ablation_model(**args)
    torch.save({'model': model.state_dict(), 'arch': 'rednet26',
                'model_args': dict(num_classes=10, small_input=True, **args)}, tmp_path / 'last.pt')
    restored = rednet.load_model(tmp_path / 'last.pt').eval()
    assert restored.layer2[0].inv.dilation == 2
    torch.testing.assert_close(restored(x), model(x))
    # a foreign file (a bare state dict, no metadata): K, group channels and reduction come from the shapes
    foreign = _ablation_model(kernel_size=9, group_channels=32, reduction_ratio=8)
    torch.save({f'backbone.{k}': v for k, v in foreign.state_dict().items()}, tmp_path / 'bare.pth')
    loaded = rednet.load_model(tmp_path / 'bare.pth', small_input=True).eval()
    inv = loaded.layer4[0].inv
    assert (inv.kernel_size, inv.group_channels, inv.reduction_ratio) == (9, 32, 8)
    torch.testing.assert_close(loaded(x), foreign(x))
    # building the wrong model for the file says which argument to change
    with pytest.raises(CheckpointError, match='create it with kernel_size=9, group_channels=32, reduction_ratio=8'):
        timm.create_model('rednet26', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'bare.pth')))


def test_involution_as_a_drop_in_for_a_3x3_conv():
    """Swap a 3x3 conv of a small network for a 7x7 involution and train a step (as in the authors' FPN)."""
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    model = net()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))
    conv_shape = model[:3](x).shape
    model[2] = rednet.Involution(16, kernel_size=7, stride=2, group_channels=4)
    assert model[:3](x).shape == conv_shape  # same channels, same stride, same output size
    before = {k: v.clone() for k, v in model[2].state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model[2].parameters())
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model[2].state_dict().items())


def _differing_params(c_blocks, k_a, k_b):
    return sum(n * (official_involution_params(c, k_b, 16, 4) - official_involution_params(c, k_a, 16, 4))
               for n, c in c_blocks)


@pytest.mark.slow
def test_sweep_then_compare_runs(tmp_path):
    sweep = tmp_path / 'sweep'
    r = run_train(['-m', *[a for a in TINY if not a.startswith('train.epochs')], 'train.epochs=1',
                   'data.train_size=32', 'data.val_size=16', 'model.kernel_size=3,5', f'hydra.sweep.dir={sweep}'],
                  timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ('0', '1'):  # each job has its own checkpoints, metrics, TensorBoard logs and Hydra record
        for name in ('metrics.jsonl', 'checkpoints/last.pt', 'tb', '.hydra/overrides.yaml'):
            assert (sweep / job / name).exists(), (job, name)
    out = tmp_path / 'compare'
    r = subprocess.run([sys.executable, 'scripts/compare_runs.py', str(sweep), '--out', str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    assert [row['model.kernel_size'] for row in rows] == ['3', '5']
    assert set(rows[0]) == {'run', 'model.kernel_size', 'params', 'epochs', 'best_top1', 'final_top1', 'best_top5',
                            'final_top5', 'img_per_sec', 'wall_time_s'}  # only the differing override
    params = [int(row['params']) for row in rows]
    assert params[1] - params[0] == _differing_params(zip(BLOCKS[26], WIDTHS), 3, 5)
    for job, row in zip(('0', '1'), rows):
        metrics = [json.loads(line) for line in (sweep / job / 'metrics.jsonl').read_text().splitlines()]
        assert float(row['final_top1']) == pytest.approx(metrics[-1]['val_top1'])
        assert float(row['wall_time_s']) >= metrics[-1]['epoch_time'] > 0
    assert '| model.kernel_size |' in (out / 'summary.md').read_text()
    png = (out / 'curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    # several run directories work the same way: with the sweep's two jobs given one by one
    r = subprocess.run([sys.executable, 'scripts/compare_runs.py', str(sweep / '1'), str(sweep / '0'),
                        '--out', str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [row['model.kernel_size'] for row in csv.DictReader(open(out / 'summary.csv'))] == ['5', '3']


def test_compare_runs_without_hydra_records(tmp_path):
    """Run directories written by train.train(cfg, run_dir) (no .hydra/): the stored configs are compared, and
    the parameters are counted from the checkpoint's weights without the BatchNorm statistics."""
    bn = nn.BatchNorm2d(4)
    for name, lr, conv in (('a', 0.1, nn.Conv2d(3, 4, 3)), ('b', 0.2, nn.Conv2d(3, 4, 5))):
        run = tmp_path / name
        (run / 'checkpoints').mkdir(parents=True)
        state = {**conv.state_dict(), **{f'bn.{k}': v for k, v in bn.state_dict().items()}}
        config = {'optimizer': {'lr': lr, 'momentum': 0.9}, 'train': {'epochs': 2}}
        torch.save({'model': state, 'config': config}, run / 'checkpoints' / 'last.pt')
        metrics = [dict(epoch=e, train_loss=1.0 / (e + 1), val_top1=50.0 + 10 * e + lr, val_top5=90.0, lr=lr,
                        img_per_sec=100.0, epoch_time=2.0, val_img_per_sec=50.0, val_images=100) for e in range(2)]
        (run / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metrics))
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'scripts/compare_runs.py', str(tmp_path / 'a'), str(tmp_path / 'b'),
                        '--out', str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    assert [row['optimizer.lr'] for row in rows] == ['0.1', '0.2'] and 'train.epochs' not in rows[0]
    # conv weight + bias and BN weight + bias: 4*3*3*3 + 4 + 8 and 4*3*5*5 + 4 + 8
    assert [int(row['params']) for row in rows] == [120, 312]
    assert float(rows[1]['best_top1']) == pytest.approx(60.2)
    assert float(rows[0]['wall_time_s']) == pytest.approx(2 * (2.0 + 100 / 50.0))
    r = subprocess.run([sys.executable, 'scripts/compare_runs.py', str(tmp_path / 'out'), '--out', str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'no run directory' in r.stderr
