"""Involution backends against the unfold reference: forward, both gradients, layouts, autocast, compile, errors.

The Triton kernels are tested under the Triton interpreter in ``test_ops_triton.py``.
"""
import pytest
import torch

import rednet  # noqa: F401  (registers the models with timm)
from rednet.ops import (BACKENDS, involution, involution_fused, involution_span_unfused,
                        output_size, resolve_backend)
from rednet.ops import _common as common_mod
from rednet.ops import native as native_mod

# (N, C, H, W, G, K, stride, dilation, padding or None for "same")
CASES = [
    (2, 8, 7, 9, 2, 3, 1, 1, None),
    (2, 8, 7, 9, 2, 5, 2, 1, None),
    (2, 8, 13, 11, 4, 7, 2, 1, None),  # odd sizes with stride 2
    (2, 16, 13, 11, 1, 7, 2, 1, None),
    (1, 12, 12, 12, 3, 7, 2, 1, None),  # even sizes with stride 2 (the RedNet case)
    (2, 6, 10, 8, 3, 5, 1, 2, None),  # dilation 2
    (1, 8, 11, 9, 2, 3, 2, 2, None),  # dilation 2 with stride 2
    (1, 4, 8, 8, 1, 3, 2, 1, 0),  # no padding: the last row/column of x is never read
    (1, 4, 10, 7, 2, 3, 3, 1, 1),  # stride 3
    (3, 32, 6, 5, 2, 7, 1, 1, None),  # kernel larger than the image
    (1, 4, 9, 9, 4, 5, 2, 1, 0),
    (1, 4, 7, 7, 1, 3, 3, 1, 0),  # the last row/column is never read (7x7, K=3, stride 3, no padding)
    (2, 4, 9, 11, 2, 3, 4, 1, 0),  # stride beyond the kernel's reach: rows/columns between windows never read,
    (1, 6, 12, 10, 3, 3, 5, 1, 1),  # and phase planes that no tap uses
]


# the fast backends, each checked against the reference
FAST = ('native', 'cpp')


def _ids(case):
    n, c, h, w, g, k, s, d, p = case
    return f'n{n}c{c}_{h}x{w}_g{g}_k{k}_s{s}_d{d}' + ('' if p is None else f'_p{p}')


def _make(case, dtype=torch.float64, seed=0):
    n, c, h, w, g, k, s, d, p = case
    p = d * (k - 1) // 2 if p is None else p
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, s, p, d), output_size(w, k, s, p, d)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(n, g, k, k, ho, wo, generator=gen, dtype=dtype)
    grad_out = torch.randn(n, c, ho, wo, generator=gen, dtype=dtype)
    return x, weight, grad_out, dict(stride=s, padding=p, dilation=d)


def _run(x, weight, grad_out, kw, backend, x_transform=None, w_transform=None):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    xin = x_transform(x) if x_transform else x
    win = w_transform(weight) if w_transform else weight
    out = involution(xin, win, backend=backend, **kw)
    gx, gw = torch.autograd.grad(out, (x, weight), grad_out)
    return out, gx, gw


def _assert_close(got, want, **tol):
    for a, b, name in zip(got, want, ('out', 'grad_x', 'grad_weight')):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, msg=lambda m: f'{name}: {m}', **tol)


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` returns NaN-filled memory (deterministic mode), so an output element a kernel forgets to
    write shows up as NaN instead of whatever zeros the allocator happened to hand out."""
    import torch.utils.deterministic
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.utils.deterministic.fill_uninitialized_memory = state[2]


@pytest.mark.parametrize('backend', FAST)
@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_fast_matches_reference_float64(case, backend, nan_filled_empty):
    x, weight, grad_out, kw = _make(case)
    want = _run(x, weight, grad_out, kw, 'reference')
    got = _run(x, weight, grad_out, kw, backend)
    _assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', CASES[:6], ids=_ids)
def test_functional_path_matches_reference(case):
    # the compile/export formulation, forward and backward, called directly
    x, weight, grad_out, kw = _make(case)
    want = _run(x, weight, grad_out, kw, 'reference')
    out = native_mod.involution_functional(x, weight, kw['stride'], kw['padding'], kw['dilation'])
    n, c, h, w = x.shape
    _, g, k, _, ho, wo = weight.shape
    geo = common_mod.Geometry(h, w, k, kw['stride'], kw['padding'], kw['dilation'], ho, wo)
    gx, gw = native_mod._backward_functional(x, weight, grad_out, geo, True, True)
    _assert_close((out, gx, gw), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('backend', FAST)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [(5, 6), (7, 7)])
def test_fast_gradcheck(stride, size, backend):
    x, weight, _, kw = _make((2, 4, size[0], size[1], 2, 3, stride, 1, None))
    x.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, backend=backend, **kw), (x, weight))


@pytest.mark.parametrize('backend', FAST)
def test_fast_stride2_gradients_hard(backend):
    # stride-2 gradients for every parity of size and many shapes: where hand-written kernels broke
    for h in range(5, 12):
        for w in (6, 9):
            for k in (3, 7):
                case = (1, 4, h, w, 2, k, 2, 1, None)
                x, weight, grad_out, kw = _make(case, seed=h * 100 + w + k)
                want = _run(x, weight, grad_out, kw, 'reference')
                got = _run(x, weight, grad_out, kw, backend)
                _assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('backend', FAST)
def test_fast_channels_last_and_noncontiguous(backend):
    case = (2, 16, 13, 11, 4, 7, 2, 1, None)
    x, weight, grad_out, kw = _make(case)
    want = _run(x, weight, grad_out, kw, 'reference')
    # channels_last input
    got = _run(x, weight, grad_out, kw, backend, x_transform=lambda t: t.to(memory_format=torch.channels_last))
    _assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    # non-contiguous (transposed-storage) views for x, weight and grad_out: same values, odd strides
    got = _run(x, weight, grad_out.transpose(2, 3).contiguous().transpose(2, 3), kw, backend,
               x_transform=lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
               w_transform=lambda t: t.permute(0, 1, 3, 2, 4, 5).contiguous().permute(0, 1, 3, 2, 4, 5))
    _assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a sliced (strided) input: every other channel
    xs = torch.randn(2, 32, 13, 11, dtype=torch.float64)[:, ::2]
    assert not xs.is_contiguous()
    torch.testing.assert_close(involution(xs, weight, backend=backend, **kw),
                               involution(xs.contiguous(), weight, backend='reference', **kw))


@pytest.mark.parametrize('backend', FAST)
def test_fast_only_one_input_requires_grad(backend):
    x, weight, grad_out, kw = _make(CASES[2])
    want = _run(x, weight, grad_out, kw, 'reference')
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(involution(xg, weight, backend=backend, **kw), (xg,), grad_out)
    torch.testing.assert_close(gx, want[1])
    wg = weight.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(involution(x, wg, backend=backend, **kw), (wg,), grad_out)
    torch.testing.assert_close(gw, want[2])


def test_native_small_chunks(monkeypatch):
    # force many (sample, group) chunks, including splits inside a sample
    monkeypatch.setattr(common_mod, 'CHUNK_BYTES', 1)
    monkeypatch.setattr(common_mod, 'MIN_CHUNK_BYTES', 1)
    for case in (CASES[2], CASES[7], (3, 12, 9, 8, 3, 3, 1, 1, None)):
        x, weight, grad_out, kw = _make(case)
        want = _run(x, weight, grad_out, kw, 'reference')
        _assert_close(_run(x, weight, grad_out, kw, 'native'), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('backend', FAST)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_fast_low_precision(dtype, backend):
    """Against the exact (float64) result for the same rounded inputs, each output element may carry one rounding
    to ``dtype`` (relative error at most the unit roundoff u, 2^-8 for bf16, 2^-11 for fp16) and nothing more:
    the 49-term sums are accumulated in float32. Accumulating in ``dtype`` itself costs 100-1000x that."""
    x, weight, grad_out, kw = _make((2, 32, 14, 13, 2, 7, 2, 1, None))
    x, weight, grad_out = x.to(dtype), weight.to(dtype), grad_out.to(dtype)
    want = _run(x.double(), weight.double(), grad_out.double(), kw, 'reference')
    got = _run(x, weight, grad_out, kw, backend)
    assert all(t.dtype == dtype for t in got)
    # (rtol, atol as a fraction of the largest value); float32 itself carries its 49-term summation error
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.1 * 2 ** -8, 2 ** -18),
                  torch.float16: (1.1 * 2 ** -11, 2 ** -21)}[dtype]
    for a, b, name in zip(got, want, ('out', 'grad_x', 'grad_weight')):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * float(b.abs().max()),
                                   msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('backend', FAST)
def test_fast_autocast_bf16_cpu(backend):
    x, weight, grad_out, kw = _make((2, 32, 14, 14, 2, 7, 1, 1, None), dtype=torch.float32)
    want = _run(x.double(), weight.double(), grad_out.double(), kw, 'reference')
    x32 = x.clone().requires_grad_(True)
    w32 = weight.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = involution(x32, w32, backend=backend, **kw)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.to(torch.bfloat16))
    assert x32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32
    for a, b in zip((out, x32.grad, w32.grad), want):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 4e-2
    # mixed input dtypes are fine under autocast (cast like a convolution)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out2 = involution(x, weight.to(torch.bfloat16), backend=backend, **kw)
    torch.testing.assert_close(out2, out.detach())


def test_auto_backend_on_cpu_is_cpp_when_built(monkeypatch):
    from rednet.ops import cpp
    x, weight, grad_out, kw = _make(CASES[0])
    assert resolve_backend('auto', x) == 'cpp'
    assert set(BACKENDS) >= {'auto', 'reference', 'native', 'cpp', 'triton'}
    want = _run(x, weight, grad_out, kw, 'cpp')
    _assert_close(_run(x, weight, grad_out, kw, 'auto'), want, rtol=0, atol=0)
    # kernels that failed to build: auto falls back to native, an explicit cpp says why
    monkeypatch.setattr(cpp, '_ext', None)
    monkeypatch.setattr(cpp, '_error', 'CalledProcessError: no compiler')
    assert resolve_backend('auto', x) == 'native'
    with pytest.raises(RuntimeError, match="could not be built.*no compiler.*backend='native'"):
        involution(x, weight, backend='cpp', **kw)


def test_cpp_backend_refuses_other_devices():
    x, weight, _, kw = _make(CASES[0])
    with pytest.raises(ValueError, match='cpp backend runs on CPU tensors, not meta'):
        involution(x.to('meta'), weight.to('meta'), backend='cpp', **kw)
    assert resolve_backend('auto', x.to('meta')) == 'native'  # auto only picks cpp for CPU tensors


def test_compile_fullgraph_no_graph_breaks():
    x, weight, grad_out, kw = _make((2, 8, 9, 7, 2, 3, 2, 1, None), dtype=torch.float32)
    want = _run(x, weight, grad_out, kw, 'reference')
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: involution(a, b, backend='native', **kw), fullgraph=True, backend='aot_eager')
    got = _run(x, weight, grad_out, kw, 'native')  # warm eager result for comparison
    xc = x.clone().requires_grad_(True)
    wc = weight.clone().requires_grad_(True)
    out = fn(xc, wc)
    gx, gw = torch.autograd.grad(out, (xc, wc), grad_out)
    _assert_close((out, gx, gw), want, rtol=1e-4, atol=1e-4)
    _assert_close((out, gx, gw), got, rtol=1e-4, atol=1e-4)
    # the auto backend compiles too
    fn_auto = torch.compile(lambda a, b: involution(a, b, **kw), fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(fn_auto(x, weight), want[0], rtol=1e-4, atol=1e-4)


def test_whole_model_native_matches_reference(monkeypatch):
    import timm
    import rednet.model as model_mod
    monkeypatch.setattr(model_mod, 'FUSE_MIN_BYTES', {'native': 1 << 20, 'cpp': 1 << 20})
    torch.manual_seed(0)
    ref = timm.create_model('rednet26', involution_backend='reference', num_classes=10).double()
    nat = timm.create_model('rednet26', involution_backend='native', num_classes=10, fuse_span=False).double()
    for mod in ref.modules():  # non-zero last BN so that every involution contributes to the output
        if isinstance(mod, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
    nat.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 72, 88, dtype=torch.float64)  # stride-2 stages see odd and even sizes
    # a third model runs the fused span conv + aggregation (rednet.ops.fused) in every involution, a fourth
    # (the default, fuse_span=None) only where the kernel map takes >= FUSE_MIN_BYTES (lowered here to 1 MB:
    # stage 1's 2 x 196 x 18 x 22 float64 kernel map, 1.2 MB, is fused; the stem's and the others' are smaller)
    fus = timm.create_model('rednet26', involution_backend='native', num_classes=10, fuse_span=True).double()
    auto = timm.create_model('rednet26', involution_backend='native', num_classes=10).double()
    # and the C++ kernels, fused on the large maps (the default on the CPU)
    cpp_model = timm.create_model('rednet26', num_classes=10).double()
    for m in (fus, auto, cpp_model):
        m.load_state_dict(ref.state_dict())
    assert {resolve_backend(m.backend, x) for m in cpp_model.modules() if hasattr(m, 'fuse_span')} == {'cpp'}
    invs = [m for m in fus.modules() if hasattr(m, 'fuse_span')]
    assert len(invs) == 9 and all(
        m.fuse_span and model_mod._fuse_with(x, x, 1, m.backend, m.fuse_span) == 'native' for m in invs)
    assert not any(m.fuse_span for m in nat.modules() if hasattr(m, 'fuse_span'))
    fused_calls = []
    real_fused = model_mod.involution_fused
    outs, grads = [], []
    for m in (ref, nat, fus, auto, cpp_model):
        m.train()
        fused_calls.clear()
        model_mod.involution_fused = lambda *a, **k: fused_calls.append(a[1].shape[-2:]) or real_fused(*a, **k)
        try:
            out = m(x)
        finally:
            model_mod.involution_fused = real_fused
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert [tuple(s) for s in fused_calls] == [(18, 22)]
    for i in (1, 2, 3, 4):
        torch.testing.assert_close(outs[i], outs[0], rtol=1e-9, atol=1e-9)
        assert grads[0].keys() == grads[i].keys()
        for k in grads[0]:
            torch.testing.assert_close(grads[i][k], grads[0][k], rtol=1e-7, atol=1e-9, msg=lambda m: f'{k}: {m}')
    # set_involution_backend switches the whole model
    nat.set_involution_backend('reference')
    nat.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(nat(x), ref(x))


# ---------------------------------------------------------------------------------------------------------
# span conv fused into the native aggregation (rednet.ops.fused)
# ---------------------------------------------------------------------------------------------------------

# (N, C, H, W, G, K, stride, Cr)
FUSED_CASES = [
    (2, 8, 7, 9, 2, 3, 1, 2),
    (2, 16, 13, 11, 4, 7, 2, 4),  # odd sizes, stride 2
    (1, 12, 12, 12, 3, 7, 2, 3),  # even sizes, stride 2 (the RedNet case)
    (3, 16, 9, 8, 1, 7, 1, 4),  # kernel larger than the image, one group
    (2, 32, 10, 11, 2, 3, 2, 8),
    (1, 4, 5, 6, 4, 3, 1, 1),  # one channel per group, Cr = 1
]


def _fused_ids(case):
    n, c, h, w, g, k, s, cr = case
    return f'n{n}c{c}_{h}x{w}_g{g}_k{k}_s{s}_cr{cr}'


def _make_fused(case, dtype=torch.float64, seed=0):
    n, c, h, w, g, k, s, cr = case
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, s, (k - 1) // 2, 1), output_size(w, k, s, (k - 1) // 2, 1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    r = torch.randn(n, cr, ho, wo, generator=gen, dtype=dtype)
    sw = torch.randn(k * k * g, cr, 1, 1, generator=gen, dtype=dtype) / cr ** 0.5
    sb = torch.randn(k * k * g, generator=gen, dtype=dtype)
    go = torch.randn(n, c, ho, wo, generator=gen, dtype=dtype)
    return (x, r, sw, sb), go, dict(k=k, stride=s)


def _run_fused(inputs, go, kw, fused=True, transforms=(None,) * 4, backend='reference', fused_backend='native'):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    args = [f(t) if f else t for f, t in zip(transforms, leaves)]
    out = involution_fused(*args, **kw, backend=fused_backend) if fused \
        else involution_span_unfused(*args, **kw, backend=backend)
    return (out,) + torch.autograd.grad(out, leaves, go)


def _assert_fused_close(got, want, **tol):
    for a, b, name in zip(got, want, ('out', 'grad_x', 'grad_r', 'grad_span_weight', 'grad_span_bias')):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, msg=lambda m: f'{name}: {m}', **tol)


@pytest.mark.parametrize('layout', ['grid', 'compact'])
@pytest.mark.parametrize('case', FUSED_CASES, ids=_fused_ids)
def test_fused_span_matches_reference_float64(case, layout, monkeypatch):
    # span matmuls straight on the phase layout's grid (junk columns) or on the compact layout plus a copy
    from rednet.ops import fused as fused_mod
    monkeypatch.setattr(fused_mod, '_GRID_JUNK_RATIO', 1e9 if layout == 'grid' else -1.0)
    inputs, go, kw = _make_fused(case)
    want = _run_fused(inputs, go, kw, fused=False)
    _assert_fused_close(_run_fused(inputs, go, kw), want, rtol=1e-10, atol=1e-10)


def test_fused_span_layouts_and_partial_grads(monkeypatch):
    inputs, go, kw = _make_fused(FUSED_CASES[1])
    want = _run_fused(inputs, go, kw, fused=False)
    cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tr = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    got = _run_fused(inputs, go, kw, transforms=(cl, cl, cl, None))
    _assert_fused_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    _assert_fused_close(_run_fused(inputs, tr(go), kw, transforms=(tr, tr, None, None)), want,
                        rtol=1e-10, atol=1e-10)
    # 2-D span weight and a sliced (every other channel) x
    x, r, sw, sb = inputs
    xs = torch.stack([x, torch.zeros_like(x)], 2).flatten(1, 2)[:, ::2]  # == x, channel stride 2
    assert not xs.is_contiguous()
    torch.testing.assert_close(involution_fused(xs, r, sw.flatten(1), sb, **kw), want[0])
    # only some inputs need gradients
    for i in range(4):
        leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        (g,) = torch.autograd.grad(involution_fused(*leaves, **kw), (leaves[i],), go)
        torch.testing.assert_close(g, want[i + 1])
    # no bias
    got = involution_fused(x, r, sw, None, **kw)
    torch.testing.assert_close(got, involution_span_unfused(x, r, sw, None, **kw, backend='reference'))
    # many small chunks, including splits inside a sample
    monkeypatch.setattr(common_mod, 'CHUNK_BYTES', 1)
    monkeypatch.setattr(common_mod, 'MIN_CHUNK_BYTES', 1)
    for case in (FUSED_CASES[1], FUSED_CASES[4]):
        inputs, go, kw = _make_fused(case)
        _assert_fused_close(_run_fused(inputs, go, kw), _run_fused(inputs, go, kw, fused=False),
                            rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', FUSED_CASES, ids=_fused_ids)
def test_fused_span_cpp_matches_reference_float64(case):
    inputs, go, kw = _make_fused(case)
    want = _run_fused(inputs, go, kw, fused=False)
    _assert_fused_close(_run_fused(inputs, go, kw, fused_backend='cpp'), want, rtol=1e-10, atol=1e-10)


def test_fused_span_cpp_layouts_partial_grads_and_precision():
    inputs, go, kw = _make_fused(FUSED_CASES[1])
    want = _run_fused(inputs, go, kw, fused=False)
    cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tr = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    got = _run_fused(inputs, go, kw, transforms=(cl, cl, cl, None), fused_backend='cpp')
    _assert_fused_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    _assert_fused_close(_run_fused(inputs, tr(go), kw, transforms=(tr, tr, None, None), fused_backend='cpp'),
                        want, rtol=1e-10, atol=1e-10)
    for i in range(4):  # only one input needs a gradient
        leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        (g,) = torch.autograd.grad(involution_fused(*leaves, **kw, backend='cpp'), (leaves[i],), go)
        torch.testing.assert_close(g, want[i + 1])
    x, r, sw, _ = inputs
    torch.testing.assert_close(involution_fused(x, r, sw, None, **kw, backend='cpp'),
                               involution_span_unfused(x, r, sw, None, **kw, backend='reference'))
    small = [t.detach().clone().requires_grad_(True) for t in _make_fused((1, 4, 5, 4, 2, 3, 2, 2))[0]]
    assert torch.autograd.gradcheck(lambda *a: involution_fused(*a, k=3, stride=2, backend='cpp'), small)
    got = _run_fused([t.float() for t in inputs], go.float(), kw, fused_backend='cpp')
    bf = _run_fused([t.bfloat16() for t in inputs], go.bfloat16(), kw, fused_backend='cpp')
    for a, b, c in zip(got, bf, want):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
        assert (a.double() - c).abs().max() / c.abs().max() < 1e-5
        assert (b.double() - c).abs().max() / c.abs().max() < 4e-2
    with pytest.raises(ValueError, match="'native' or 'cpp'"):
        involution_fused(x, r, sw, None, **kw, backend='reference')


@pytest.mark.parametrize('stride', [1, 2])
def test_fused_span_gradcheck(stride):
    inputs, _, kw = _make_fused((1, 4, 5, 4, 2, 3, stride, 2))
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: involution_fused(*a, **kw), inputs)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_span_low_precision_and_autocast(dtype):
    inputs, go, kw = _make_fused((2, 32, 14, 13, 2, 7, 2, 8))
    want = _run_fused(inputs, go, kw, fused=False)
    got = _run_fused([t.to(dtype) for t in inputs], go.to(dtype), kw)
    assert all(t.dtype == dtype for t in got)
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2}[dtype]
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() / b.abs().max() < tol
    if dtype == torch.bfloat16:  # float32 leaves under autocast: bf16 output, float32 gradients
        leaves = [t.float().requires_grad_(True) for t in inputs]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = involution_fused(*leaves, **kw)
        assert out.dtype == torch.bfloat16
        out.backward(go.to(torch.bfloat16))
        for leaf, b in zip(leaves, want[1:]):
            assert leaf.grad.dtype == torch.float32
            assert (leaf.grad.double() - b).abs().max() / b.abs().max() < tol


def test_fused_span_errors_and_compile_fallback():
    (x, r, sw, sb), _, kw = _make_fused(FUSED_CASES[0])
    with pytest.raises(ValueError, match='r must be'):
        involution_fused(x, r[..., :-1], sw, sb, **kw)
    with pytest.raises(ValueError, match='multiple of K'):
        involution_fused(x, r, sw[:-1], sb[:-1], **kw)
    with pytest.raises(ValueError, match='share dtype'):
        involution_fused(x.float(), r, sw, sb, **kw)
    fn = torch.compile(lambda *a: involution_fused(*a, **kw), fullgraph=True, backend='eager')
    torch.testing.assert_close(fn(x, r, sw, sb), involution_fused(x, r, sw, sb, **kw))


def test_involution_module_fuses_native_only(monkeypatch):
    from rednet.model import Involution
    import rednet.model as model_mod
    calls = []
    real = model_mod.involution_fused
    monkeypatch.setattr(model_mod, 'involution_fused', lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    mods = {b: Involution(32, 7, 2, backend=b, fuse_span=True).double() for b in ('reference', 'native', 'auto')}
    mods['unfused'] = Involution(32, 7, 2, backend='native', fuse_span=False).double()
    assert Involution(32, 7).fuse_span is None  # by default: where the feature map is large enough
    keys = set(mods['reference'].state_dict())
    assert keys == {'reduce.conv.weight', 'reduce.bn.weight', 'reduce.bn.bias', 'reduce.bn.running_mean',
                    'reduce.bn.running_var', 'reduce.bn.num_batches_tracked', 'span.weight', 'span.bias'}
    for m in mods.values():
        assert set(m.state_dict()) == keys
        m.load_state_dict(mods['reference'].state_dict())
    x = torch.randn(2, 32, 11, 10, dtype=torch.float64)
    outs = {}
    for b, m in mods.items():
        n_before = len(calls)
        xin = x.clone().requires_grad_(True)
        out = m(xin)
        out.square().sum().backward()
        outs[b] = [out, xin.grad] + [p.grad for p in m.parameters()]
        assert (len(calls) > n_before) == (b in ('native', 'auto')), b
    for b in ('native', 'auto', 'unfused'):
        for a, want in zip(outs[b], outs['reference']):
            torch.testing.assert_close(a, want, rtol=1e-9, atol=1e-10)


def test_errors_are_clear():
    x, weight, _, kw = _make(CASES[0])
    with pytest.raises(ValueError, match='unknown backend'):
        involution(x, weight, backend='cuda_magic', **kw)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        involution(x[0], weight, backend='native', **kw)
    with pytest.raises(ValueError, match='weight must be'):
        involution(x, weight[0], backend='native', **kw)
    with pytest.raises(ValueError, match='does not match the output size'):
        involution(x, weight, backend='native', stride=2)
    with pytest.raises(ValueError, match='divisible'):
        involution(x[:, :7], weight, backend='native', **kw)
    with pytest.raises(ValueError, match='batch'):
        involution(x[:1], weight, backend='native', **kw)
    with pytest.raises(ValueError, match='dtype'):
        involution(x, weight.float(), backend='native', **kw)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, weight, _, kw = _make(CASES[0], dtype=torch.float32)
    with pytest.raises(ValueError, match='triton backend cannot run'):
        involution(x, weight, backend='triton', **kw)
    from rednet.ops import triton_kernels
    ok, why = triton_kernels.supports(x)
    assert not ok and 'TRITON_INTERPRET' in why
    ok, why = triton_kernels.supports(x.to(torch.int32))
    assert not ok
