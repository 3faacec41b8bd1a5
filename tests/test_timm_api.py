"""timm's model conventions beyond the basics in test_model.py: dropout and stochastic depth,
forward_intermediates / prune_intermediate_layers, and running timm's own scripts."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import rednet  # noqa: F401  (registers the models with timm)

REPO = Path(__file__).resolve().parents[1]


def _tiny(**kwargs):
    return timm.create_model('rednet26', num_classes=5, small_input=True, involution_backend='native', **kwargs)


def test_drop_path_rate_rises_linearly_over_the_blocks():
    model = _tiny(drop_path_rate=0.1)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert len(blocks) == 8  # RedNet-26: 1 + 2 + 4 + 1
    for i, block in enumerate(blocks):  # timm's ResNet rule: rate * block index / (blocks - 1)
        want = 0.1 * i / 7
        got = block.drop_path.drop_prob if want > 0 else None
        assert (got == pytest.approx(want)) if want > 0 else isinstance(block.drop_path, torch.nn.Identity)


@pytest.mark.parametrize('kwargs', [dict(drop_path_rate=0.5), dict(drop_rate=0.5)])
def test_dropout_and_stochastic_depth_are_random_in_training_only(kwargs):
    torch.manual_seed(0)
    model = _tiny(zero_init_last=False, **kwargs)  # zero-initialised branches would make dropping them a no-op
    plain = _tiny(zero_init_last=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        model.eval()
        plain.eval()
        assert torch.equal(model(x), plain(x))  # eval: nothing dropped
        model.train()
        plain.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
        assert not torch.allclose(a, b)  # a different set of branches / features dropped
        assert torch.equal(plain(x), plain(x))  # without them training mode is deterministic


def test_forward_intermediates_agree_with_features_only():
    torch.manual_seed(0)
    model = _tiny().eval()
    features = timm.create_model('rednet26', small_input=True, involution_backend='native', features_only=True)
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')})
    features.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = features(x)
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(want) == 5
        for a, b in zip(inter, want):
            assert torch.equal(a, b)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [64, 256, 512, 1024, 2048]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, want[3:])] == [True, True]
        early = model.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], want[0]) and torch.equal(early[1], want[2])
        kept = model.prune_intermediate_layers([1, 2])
        assert list(kept) == [1, 2] and len(model.layer3) == 0 and len(model.layer4) == 0
        assert model.num_features == 512 and model.num_classes == 0
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert torch.equal(pruned[0], want[1]) and torch.equal(pruned[1], want[2])


def test_timm_scripts_see_the_models(tmp_path):
    """``python -m rednet.timm_scripts SCRIPT.py ARGS`` runs a timm-style script with the RedNets registered."""
    script = tmp_path / 'script.py'
    script.write_text('import sys, timm\n'
                      'model = timm.create_model(sys.argv[1], drop_rate=0.0, drop_path_rate=0.1)\n'
                      'print(sum(p.numel() for p in model.parameters()))\n')
    r = subprocess.run([sys.executable, '-m', 'rednet.timm_scripts', str(script), 'rednet26'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '9233166'  # the official RedNet-26 count
