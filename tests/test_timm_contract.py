"""timm's model contract on every RedNet: create, forward, backward, default cfg, features_only,
forward_intermediates, FX symbolic tracing (forward and backward), create_feature_extractor, TorchScript and
reset_classifier, each compared with eager."""
import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import rednet  # noqa: F401  (registers the models with timm)

VARIANTS = timm.list_models('rednet*')


def test_every_depth_is_registered():
    assert VARIANTS == ['rednet26', 'rednet38', 'rednet50', 'rednet101', 'rednet152']


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize('name', VARIANTS)
def test_model_contract(name):
    torch.manual_seed(0)
    # training mode: BatchNorm normalises with batch statistics (with non-zero branches, the initial running
    # statistics would let activations overflow in the deep nets); every run below sees the same batch
    model = timm.create_model(name, num_classes=7, zero_init_last=False).train()
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['classifier'] == 'fc' and cfg['first_conv'] == 'stem.conv1.conv'
    x = torch.randn(2, 3, 40, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    want_grads = _grads(model)
    assert len(want_grads) == len(list(model.parameters()))

    traced = torch.fx.symbolic_trace(model)  # the involutions are leaves (rednet.model.involution_layer)
    assert any(n.op == 'call_function' and n.target is rednet.model.involution_layer for n in traced.graph.nodes)
    model.zero_grad()
    fx_out = traced(x)
    torch.testing.assert_close(fx_out, out, rtol=0, atol=0)
    fx_out.square().mean().backward()
    for k, g in _grads(model).items():  # the graph may accumulate branch gradients in another order
        torch.testing.assert_close(g, want_grads[k], rtol=1e-5, atol=1e-6, msg=k)

    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), out, rtol=0, atol=0)

    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        nodes = {'stem': 's', 'layer1': 'l1', 'layer2': 'l2', 'layer3': 'l3', 'layer4': 'l4'}
        extracted = create_feature_extractor(model, return_nodes=nodes)(x)
        for a, b in zip(inter, extracted.values()):
            assert torch.equal(a, b)
        features = timm.create_model(name, features_only=True, zero_init_last=False)
        features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')})
        for a, b in zip(inter, features.train()(x)):
            assert torch.equal(a, b)
    assert [f['num_chs'] for f in features.feature_info] == [64, 256, 512, 1024, 2048]

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 2048)
