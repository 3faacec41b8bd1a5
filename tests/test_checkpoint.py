"""Loading released checkpoints: official mmcls / bare / backbone-only, PaddleClas, ours; safety; errors."""
import os
import pickle

import numpy as np
import pytest
import timm
import torch

import rednet
from rednet.checkpoint import CheckpointError
from official_reference import official_forward, official_state_dict, save_pdparams, to_paddle

# entry counts of the authors' released files (/work/shared/spec/official-checkpoints.md), not of our helper
OFFICIAL_KEY_COUNTS = {26: 251, 38: 351, 50: 451, 101: 876, 152: 1301}


@pytest.mark.parametrize('depth', sorted(OFFICIAL_KEY_COUNTS))
def test_official_layout_maps_onto_our_model_exactly(depth):
    sd = official_state_dict(depth)
    assert len(sd) == OFFICIAL_KEY_COUNTS[depth]
    converted = rednet.checkpoint.to_rednet_keys(sd)
    ours = timm.create_model(f'rednet{depth}').state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def official_r26():
    return official_state_dict(26, num_classes=1000, seed=1)


@pytest.fixture(scope='module')
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def official_logits(official_r26, image):
    return official_forward(official_r26, image, 26)


def test_mmcls_file_gives_official_logits(tmp_path, official_r26, image, official_logits):
    path = tmp_path / 'rednet26_mmcls.pth'
    torch.save({'meta': {'epoch': 130, 'CLASSES': ['a'] * 1000, 'config': 'model = dict(...)'},
                'state_dict': official_r26}, path)
    model = rednet.load_model(path).eval()
    assert model.num_classes == 1000 and model.stem.inv.kernel_size == 3 and len(model.layer3) == 4
    with torch.no_grad():
        assert _max_rel_err(model(image), official_logits) < 1e-5


def test_bare_state_dict_and_timm_route(tmp_path, official_r26, image, official_logits):
    path = tmp_path / 'bare.pth'
    torch.save(official_r26, path)
    model = timm.create_model('rednet26', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert _max_rel_err(model(image), official_logits) < 1e-5
    # a new head for another task keeps the backbone
    model10 = timm.create_model('rednet26', pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(model10.layer4[0].conv3.weight, model.layer4[0].conv3.weight)
    assert model10(image).shape == (2, 10)


@pytest.mark.parametrize('protocol,as_tuples', [(2, False), (4, True)])
def test_paddle_file_gives_official_logits(tmp_path, official_r26, image, official_logits, protocol, as_tuples):
    paddle = to_paddle(official_r26)
    if as_tuples:
        paddle = {k: (f'param_{i}', v) if isinstance(v, np.ndarray) else v for i, (k, v) in enumerate(paddle.items())}
    path = tmp_path / 'RedNet26_pretrained.pdparams'
    save_pdparams(paddle, path, protocol)
    model = rednet.load_model(path).eval()
    with torch.no_grad():
        assert _max_rel_err(model(image), official_logits) < 1e-5
    via_timm = timm.create_model('rednet26', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert _max_rel_err(via_timm(image), official_logits) < 1e-5


def test_backbone_only_file_and_stem_k7(tmp_path):
    sd = official_state_dict(50, stem_kernel_size=7, head=False, prefix=False)
    path = tmp_path / 'rednet50_k7_backbone.pth'
    torch.save(sd, path)
    model = rednet.load_model(path)
    assert model.stem.inv.kernel_size == 7 and len(model.layer3) == 6 and model.num_classes == 0
    torch.testing.assert_close(model.stem.inv.span.weight, sd['stem.1.conv2.conv.weight'])
    backbone = timm.create_model('rednet50', pretrained=True, features_only=True, stem_kernel_size=7,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert len(backbone(torch.randn(1, 3, 64, 64))) == 5
    with pytest.raises(CheckpointError, match='stem_kernel_size=7'):
        timm.create_model('rednet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_our_state_dict_and_training_checkpoint(tmp_path):
    model = timm.create_model('rednet26', num_classes=10, small_input=True).eval()
    torch.nn.init.normal_(model.layer1[0].bn3.weight)
    torch.save(model.state_dict(), tmp_path / 'plain.pth')
    torch.save({'model': model.state_dict(), 'arch': 'rednet26', 'epoch': 3,
                'model_args': {'num_classes': 10, 'small_input': True}}, tmp_path / 'last.pt')
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    restored = rednet.load_model(tmp_path / 'last.pt').eval()
    assert restored.maxpool.__class__.__name__ == 'Identity'
    torch.testing.assert_close(restored(x), expected)
    plain = rednet.load_model(tmp_path / 'plain.pth', small_input=True).eval()
    torch.testing.assert_close(plain(x), expected)


class _Call:
    """Unpickles as ``fn(*args)``."""
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payload(kind, marker):
    """A pickled call that would create ``marker``, through a global of each family an attacker can reach for."""
    import subprocess
    from numpy.testing._private.utils import runstring  # exec()s a string: numpy's own code-execution gadget
    return {
        'os.system': _Call(os.system, f'touch {marker}'),
        'builtins.eval': _Call(eval, f'__import__("pathlib").Path({str(marker)!r}).touch()'),
        'numpy.runstring': _Call(runstring, f'import pathlib; pathlib.Path({str(marker)!r}).touch()', {}),
        'subprocess': _Call(subprocess.check_call, ['touch', str(marker)]),
        'torch.save': _Call(torch.save, 0, str(marker)),
    }[kind]


@pytest.mark.parametrize('suffix', ['.pth', '.pdparams'])
@pytest.mark.parametrize('kind', ['os.system', 'builtins.eval', 'numpy.runstring', 'subprocess', 'torch.save'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix, kind):
    marker = tmp_path / 'pwned'
    path = tmp_path / f'evil{suffix}'
    payload = {'stem.0.conv.weight': np.zeros(3, np.float32), 'x': _payload(kind, marker)}
    if suffix == '.pth':
        torch.save(payload, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError, match='Nothing in it was executed|nothing in it was executed'):
        rednet.load_model(path)
    assert not marker.exists()
    # the payloads are live: an unrestricted unpickler runs them
    with open(path, 'rb') as f:
        if suffix == '.pth':
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert marker.exists()


def test_mismatched_files_name_the_keys(tmp_path):
    sd = official_state_dict(26)
    path = tmp_path / 'r26.pth'
    torch.save({'state_dict': sd}, path)
    model = timm.create_model('rednet50')
    with pytest.raises(CheckpointError, match=r'missing keys \(\d+\): layer1\.1\.'):
        rednet.checkpoint.load_weights(model, path)
    del sd['backbone.layer2.0.bn1.running_var']
    sd['backbone.layer2.0.extra.weight'] = torch.zeros(1)
    sd['backbone.layer1.0.conv1.weight'] = torch.zeros(64, 64, 3, 3)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        rednet.load_model(path)
    msg = str(err.value)
    assert 'layer2.0.bn1.running_var' in msg and 'layer2.0.extra.weight' in msg
    assert 'layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)' in msg


def test_not_a_rednet_file(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('resnet18').state_dict(), path)
    with pytest.raises(CheckpointError, match='not a RedNet checkpoint'):
        rednet.load_model(path)
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        rednet.load_model(tmp_path / 'nope.pth')


def test_new_head_override_keeps_backbone(tmp_path):
    model = timm.create_model('rednet26', num_classes=10, small_input=True)
    path = tmp_path / 'last.pt'
    torch.save({'model': model.state_dict(), 'arch': 'rednet26',
                'model_args': {'num_classes': 10, 'small_input': True},
                'config': {'data': {'img_size': 32, 'mean': [0.5] * 3, 'std': [0.25] * 3, 'crop_pct': 1.0}}}, path)
    loaded = rednet.load_model(path)
    assert loaded.pretrained_cfg['input_size'] == (3, 32, 32) and loaded.pretrained_cfg['std'] == (0.25,) * 3
    finetune = rednet.load_model(path, num_classes=3)
    assert finetune.fc.out_features == 3 and finetune.small_input
    torch.testing.assert_close(finetune.layer2[0].inv.span.weight, model.layer2[0].inv.span.weight)
