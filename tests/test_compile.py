"""The involution as a registered operator (torch.ops.rednet.involution) inside torch.compile and torch.export,
its autocast and autograd registrations, and the safe GPU fallback logic (simulated on the CPU)."""
import copy
import warnings

import pytest
import torch

from rednet.model import RedNet
from rednet.ops import INDUCTOR_OPTIONS, involution, output_size, resolve_backend
from rednet.ops import _common, native, triton_kernels
from rednet.ops.library import involution_op


def _inputs(n=2, c=8, h=9, w=7, g=2, k=3, s=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = (k - 1) // 2
    ho, wo = output_size(h, k, s, p, 1), output_size(w, k, s, p, 1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(n, g, k, k, ho, wo, generator=gen, dtype=dtype)
    return x, wt, dict(stride=s, padding=p, dilation=1)


def _tiny_rednet(backend):
    torch.manual_seed(0)
    # zero_init_last=False: every involution contributes to the output, so every parameter gets a gradient
    return RedNet((1, 1, 1, 1), num_classes=10, small_input=True, involution_backend=backend, zero_init_last=False)


def _grads(model, x):
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n.removeprefix('_orig_mod.'): p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def _assert_grads_close(got, want, rtol):
    for name, g in want.items():
        scale = g.abs().max()
        if scale == 0:
            continue
        err = float((got[name] - g).abs().max() / scale)
        assert err <= rtol, f'{name}: relative error {err:.3g} > {rtol}'


def test_opcheck_fake_autograd_and_schema():
    # torch.library.opcheck tests the fake implementation against the real one, the autograd registration and
    # the schema (no aliasing, no mutation)
    x, wt, kw = _inputs()
    x.requires_grad_(True)
    wt.requires_grad_(True)
    torch.library.opcheck(involution_op, (x, wt, kw['stride'], kw['padding'], kw['dilation'], 'cpp'))


def test_op_matches_reference_forward_and_backward_float64():
    x, wt, kw = _inputs(dtype=torch.float64)
    go = torch.randn(x.shape[0], x.shape[1], *wt.shape[-2:], dtype=torch.float64)
    want_x, want_w = x.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    ref = involution(want_x, want_w, backend='reference', **kw)
    rgx, rgw = torch.autograd.grad(ref, (want_x, want_w), go)
    xi, wi = x.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    out = torch.ops.rednet.involution(xi, wi, kw['stride'], kw['padding'], kw['dilation'], 'cpp')
    gx, gw = torch.autograd.grad(out, (xi, wi), go)
    for a, b in ((out, ref), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_op_autocast_casts_to_the_autocast_dtype():
    x, wt, kw = _inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = torch.ops.rednet.involution(x, wt, kw['stride'], kw['padding'], kw['dilation'], 'cpp')
    assert out.dtype == torch.bfloat16
    want = involution(x.bfloat16().double(), wt.bfloat16().double(), backend='reference', **kw)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_double_backward_raises_clearly():
    x, wt, kw = _inputs(dtype=torch.float64)
    x.requires_grad_(True)
    wt.requires_grad_(True)
    out = involution(x, wt, backend='cpp', **kw)
    gx, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='double backward is not supported'):
        gx.sum().backward()


def test_compiled_cpp_rednet_keeps_the_op_no_graph_breaks_and_matches_eager():
    # the whole model in one graph (fullgraph=True), with the C++ kernels as rednet::involution nodes in it
    model = _tiny_rednet('cpp')
    x = torch.randn(2, 3, 16, 16)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    seen = set()

    def record(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=_record_aot(seen), bw_compiler=_record_aot(seen))(gm, example_inputs)

    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    out, grads = _grads(torch.compile(compiled_model, fullgraph=True, backend=record), x)
    assert any(s.startswith('rednet.involution') for s in seen), sorted(seen)
    assert any('rednet.involution_backward' in s for s in seen), 'backward kernel not in the backward graph'
    want_out, want_grads = _grads(copy.deepcopy(model), x)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(want_grads)
    _assert_grads_close(grads, want_grads, 1e-4)


def _record_aot(seen):
    def compiler(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return gm.forward
    return compiler


def test_torch_export_keeps_the_op():
    model = _tiny_rednet('cpp').eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == 'call_function'}
    assert 'rednet.involution.default' in targets, sorted(targets)
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_auto_under_compile_follows_the_measured_choice(monkeypatch):
    import rednet.ops as ops
    x, wt, kw = _inputs()
    picked = []

    def probe(a, b):
        picked.append(resolve_backend('auto', a))
        return involution(a, b, **kw)

    for choice, want in (('functional', 'functional'), ('kernels', 'cpp')):
        monkeypatch.setitem(ops.COMPILE_AUTO, 'cpu', choice)
        torch._dynamo.reset()
        out = torch.compile(probe, fullgraph=True, backend='eager')(x, wt)
        assert picked[-1] == want
        torch.testing.assert_close(out, involution(x, wt, backend='reference', **kw), rtol=1e-5, atol=1e-5)
    assert resolve_backend('auto', x) == 'cpp'  # eager: the C++ kernels


# --- safe GPU fallback, simulated on the CPU -------------------------------------------------------------


@pytest.fixture
def fake_triton(monkeypatch):
    """The Triton backend 'runs' CPU tensors with native's kernels (a working GPU), with fresh verdicts."""
    monkeypatch.setattr(triton_kernels, 'supports', lambda x: (True, ''))
    monkeypatch.setattr(triton_kernels, '_verdicts', {})
    monkeypatch.setattr(triton_kernels, 'forward', native.forward)
    monkeypatch.setattr(triton_kernels, 'backward', native.backward)
    return monkeypatch


def _safe_involution(x, wt, kw):
    impl = triton_kernels.safe_kernels(x, wt.shape[2], kw['stride'], kw['dilation'])
    return impl, impl.forward(x, wt, kw['stride'], kw['padding'], kw['dilation'])


def test_fallback_on_launch_error_warns_once_and_uses_native(fake_triton):
    def broken(*args):
        raise RuntimeError('triton.runtime.errors.OutOfResources: out of resource: shared memory')

    fake_triton.setattr(triton_kernels, 'forward', broken)
    x, wt, kw = _inputs()
    with pytest.warns(RuntimeWarning, match='OutOfResources.*falling back to the native backend'):
        impl, out = _safe_involution(x, wt, kw)
    assert impl is native
    torch.testing.assert_close(out, involution(x, wt, backend='reference', **kw), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the second call for the same key neither checks nor warns again
        impl, _ = _safe_involution(x, wt, kw)
    assert impl is native
    # another (K, stride) is checked separately
    x2, wt2, kw2 = _inputs(k=5, s=1)
    with pytest.warns(RuntimeWarning, match='K=5 stride=1'):
        _safe_involution(x2, wt2, kw2)


def test_fallback_on_mismatch(fake_triton):
    fake_triton.setattr(triton_kernels, 'forward', lambda x, w, s, p, d: native.forward(x, w, s, p, d) * 1.01)
    x, wt, kw = _inputs()
    with pytest.warns(RuntimeWarning, match='forward differs from native'):
        impl, _ = _safe_involution(x, wt, kw)
    assert impl is native


def test_passing_self_check_uses_triton_then_falls_back_on_a_later_error(fake_triton):
    x, wt, kw = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        impl, out = _safe_involution(x, wt, kw)
    assert impl is not native  # the (checked) Triton kernels
    calls = []

    def fails_later(*args):
        calls.append(1)
        raise RuntimeError('CUDA error: an illegal memory access')

    fake_triton.setattr(triton_kernels, 'forward', fails_later)
    with pytest.warns(RuntimeWarning, match='illegal memory access'):
        out2 = impl.forward(x, wt, kw['stride'], kw['padding'], kw['dilation'])
    torch.testing.assert_close(out2, out)
    impl.forward(x, wt, kw['stride'], kw['padding'], kw['dilation'])
    assert len(calls) == 1  # not retried after the failure


def test_explicit_triton_backend_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(triton_kernels, 'supports', lambda x: (True, ''))

    def broken(*args):
        raise RuntimeError('triton compile error')

    monkeypatch.setattr(triton_kernels, 'forward', broken)
    x, wt, kw = _inputs()
    with pytest.raises(RuntimeError, match='triton compile error'):
        involution(x, wt, backend='triton', **kw)


def test_cuda_without_triton_warns_once(monkeypatch):
    import rednet.ops as ops
    monkeypatch.setattr(triton_kernels, 'available', lambda: False)
    monkeypatch.setattr(ops, '_warned_no_triton', False)
    x, _, _ = _inputs()
    with pytest.warns(RuntimeWarning, match='Triton is not installed'):
        assert ops._cuda_kernels(x) == 'native'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert ops._cuda_kernels(x) == 'native'


def test_native_launch_count_does_not_grow_with_the_batch_off_cpu():
    # on a non-CPU device (meta stands in for CUDA) the native kernels run the whole batch in one chunk
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 64):
        x, wt, kw = _inputs(n=n, c=64, h=28, w=28, g=4, k=7, s=1)
        x, wt = x.to('meta'), wt.to('meta')
        go = torch.empty(n, 64, 28, 28, device='meta')
        with Count() as c:
            native.forward(x, wt, kw['stride'], kw['padding'], kw['dilation'])
            native.backward(x, wt, go, kw['stride'], kw['padding'], kw['dilation'], True, True)
        counts.append(c.calls)
    assert counts[0] == counts[1], counts
    # on the CPU the same shapes are chunked for the cache (more calls for the bigger batch)
    assert len(_common.chunk_plan(64, 4, 64 * 16 * 34 * 34, torch.empty(64, 64, 28, 28), torch.float32)) > 1


@pytest.mark.slow
def test_compiled_training_gradients_match_eager_float32(backend='auto'):
    # inductor (the default compiler) on a whole tiny RedNet: every parameter's gradient as eager's in float32
    # (the default zero-initialised last BNs: a well-conditioned gradient, eager float32 is within 5e-6 of float64)
    torch.manual_seed(0)
    model = RedNet((1, 1, 1, 1), num_classes=10, small_input=True, involution_backend=backend)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    out, grads = _grads(torch.compile(copy.deepcopy(model), fullgraph=True), x)
    want_out, want_grads = _grads(copy.deepcopy(model), x)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(want_grads)
    _assert_grads_close(grads, want_grads, 1e-4)


@pytest.mark.slow
def test_compiled_functional_training_matches_eager_float32_with_the_inductor_options():
    # inductor on the functional backend (the compiler fuses the taps with their neighbours) with
    # rednet.ops.INDUCTOR_OPTIONS['cpu']: the forward stays as close to float64 as eager's, and every parameter's
    # float32 gradient equals eager's within 1e-4 relative. The stem and one bottleneck at 32x32, batch 2: 2048 values
    # per batch-norm channel. With inductor's default channels_last activations (options={}) this model's output is
    # 9.4e-7 from float64 (eager: 7.9e-8) and stem.conv2.bn.bias's gradient 1.9e-4 from eager's (docs/gpu.md)
    torch.manual_seed(0)
    model = RedNet((1, 0, 0, 0), num_classes=10, small_input=True, kernel_size=3, involution_backend='functional')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_out = copy.deepcopy(model).double()(x.double())
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, options=INDUCTOR_OPTIONS['cpu'])
    out, grads = _grads(compiled, x)
    want_out, want_grads = _grads(copy.deepcopy(model), x)
    scale = ref_out.abs().max()
    eager_err = float((want_out.double() - ref_out).abs().max() / scale)
    compiled_err = float((out.double() - ref_out).abs().max() / scale)
    assert compiled_err <= 5 * max(eager_err, 1e-7), (compiled_err, eager_err)
    assert set(grads) == set(want_grads)
    _assert_grads_close(grads, want_grads, 1e-4)
