"""GPU tests, ready for the first GPU: skipped without CUDA (none of them has run on a GPU yet, see docs/gpu.md).

- the Triton kernels against the float64 reference, forward and both gradients: float32/bfloat16, odd sizes,
  stride 2, channels_last, on cuda:1 where present (launches must go to the input's device);
- the safe ``auto`` path (self-check, then Triton) equals the reference;
- 20 training steps of RedNet-26 with bf16 autocast + channels_last + torch.compile stay finite and learn;
- a one-process NCCL DDP step; eval on CUDA.
"""
import socket

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

from rednet.ops import involution, output_size  # noqa: E402

# (N, C, H, W, G, K, stride)
SHAPES = [(2, 32, 13, 11, 2, 7, 1), (2, 32, 13, 11, 2, 7, 2), (3, 48, 9, 17, 3, 3, 1), (1, 64, 28, 28, 1, 7, 2)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _case(shape, dtype, device, channels_last=False):
    n, c, h, w, g, k, s = shape
    p = (k - 1) // 2
    ho, wo = output_size(h, k, s, p, 1), output_size(w, k, s, p, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    wt = torch.randn(n, g, k, k, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
    go = torch.randn(n, c, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
    xr, wr = x.double().requires_grad_(True), wt.double().requires_grad_(True)
    ref = involution(xr, wr, s, p, backend='reference')
    want = (ref,) + torch.autograd.grad(ref, (xr, wr), go.double())
    xd, wd, god = x.to(device), wt.to(device), go.to(device)
    if channels_last:
        xd, god = xd.to(memory_format=torch.channels_last), god.to(memory_format=torch.channels_last)
    return xd.requires_grad_(True), wd.requires_grad_(True), god, (s, p), want


def _check(backend, shape, dtype, device, channels_last=False):
    x, wt, go, (s, p), want = _case(shape, dtype, device, channels_last)
    out = involution(x, wt, s, p, backend=backend)
    got = (out,) + torch.autograd.grad(out, (x, wt), go)
    assert got[0].device == x.device and got[0].dtype == dtype
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip(('out', 'grad_x', 'grad_weight'), got, want):
        err = float((a.double().cpu() - b).abs().max() / b.abs().max())
        assert err < TOL[dtype], f'{name}: relative error {err:.3g}'


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(shape, dtype):
    pytest.importorskip('triton')
    _check('triton', shape, dtype, 'cuda')


def test_triton_channels_last():
    pytest.importorskip('triton')
    _check('triton', SHAPES[1], torch.float32, 'cuda', channels_last=True)


def test_auto_and_native_match_reference_on_cuda():
    for backend in ('auto', 'native', 'functional'):
        _check(backend, SHAPES[1], torch.float32, 'cuda')


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_triton_on_the_second_gpu_without_set_device():
    pytest.importorskip('triton')
    assert torch.cuda.current_device() == 0
    _check('triton', SHAPES[1], torch.float32, 'cuda:1')


def test_rednet26_bf16_channels_last_compiled_training_steps():
    import timm
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=10, small_input=True).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = torch.compile(model)
    x = torch.randn(16, 3, 32, 32, device='cuda').to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device='cuda')
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = F.cross_entropy(step(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).float().cpu()
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean()  # it learns the fixed batch


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_step(monkeypatch):
    import torch.distributed as dist
    import timm
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(_free_port()))
    dist.init_process_group('nccl', rank=0, world_size=1)
    try:
        model = timm.create_model('rednet26', num_classes=10, small_input=True).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        x = torch.randn(4, 3, 32, 32, device='cuda')
        loss = F.cross_entropy(ddp(x), torch.zeros(4, dtype=torch.long, device='cuda'))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_eval_on_cuda_matches_cpu():
    import timm
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

