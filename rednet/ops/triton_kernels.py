"""``triton`` involution backend: fused Triton kernels for forward, grad-input and grad-weight.

The kernels live in :mod:`rednet.ops._triton_impl`, imported on first use so that this package imports
without Triton. They run on CUDA tensors; on CPU tensors only when ``TRITON_INTERPRET=1`` was set before
Triton was imported (the interpreter: slow, used by the tests). Supported dtypes: float32, float16,
bfloat16 (accumulated in float32) and float64. :func:`supports` says whether an input can run here; the
``auto`` backend uses it to fall back to ``native``.

Safe fallback (``auto`` on CUDA, :func:`safe_kernels`): the first call for each (device, dtype, K, stride,
dilation) runs the kernels forward and backward on a tiny input and compares them with ``native``; a compile,
resource or launch error or a mismatch warns once, naming the error, and that key uses ``native`` from then on
(as does any later error of a launch). An explicit ``backend='triton'`` skips all this and raises.
"""
import contextlib
import functools
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import native
from ._common import memory_format_of

__all__ = ['supports', 'available', 'safe_kernels', 'forward', 'backward']

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# self-check tolerance (relative to the largest magnitude) against native in float64, per dtype
_CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (device, dtype, K, stride, dilation) -> None when the kernels passed their self-check, else why they failed
_verdicts: Dict[tuple, Optional[str]] = {}


@functools.lru_cache(maxsize=None)
def _impl():
    try:
        from . import _triton_impl
    except Exception:  # triton missing or broken
        return None
    return _triton_impl


def available() -> bool:
    """Whether Triton can be imported."""
    return _impl() is not None


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def supports(x: torch.Tensor) -> Tuple[bool, str]:
    """(can the triton backend run ``x``, reason if not)."""
    if x.device.type == 'cuda':
        pass
    elif x.device.type == 'cpu':
        if not _interpreting():
            return False, 'CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)'
    else:
        return False, f'device {x.device.type!r} is not supported (CUDA only)'
    if x.dtype not in _DTYPES:
        return False, f'dtype {x.dtype} is not supported (float32, float16, bfloat16, float64)'
    if not available():
        return False, 'triton is not installed'
    return True, ''


def _triton_accumulator(x: torch.Tensor):
    """The ``tl`` dtype the kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    tl = _impl().tl
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _weight_strides(weight: torch.Tensor):
    # weight (N, G, K, K, Ho, Wo) addressed as (N, G, K*K, Ho, Wo): tap t = a*K + b -> a*s2 + b*s3 must equal
    # t*s3, which holds when s2 == K*s3; otherwise make it so with a copy
    s = weight.stride()
    k = weight.shape[2]
    if s[2] != k * s[3]:
        weight = weight.contiguous()
        s = weight.stride()
    return weight, (s[0], s[1], s[3], s[4], s[5])


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU, not the current one (a model on cuda:1 without ``torch.cuda.set_device``)."""
    return torch.cuda.device(x.device) if x.device.type == 'cuda' else contextlib.nullcontext()


def forward(x, weight, stride, padding, dilation):
    """The forward kernel: out (N, C, H_out, W_out) in x's dtype and memory format."""
    impl = _impl()
    n, c, h, w = x.shape
    _, g, k, _, ho, wo = weight.shape
    cg, bc = c // g, impl.block_c(c // g)
    weight, ws = _weight_strides(weight)
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    with _on_device(x):
        impl._fwd_kernel[impl.grid(n * g, ho, wo, cg, bc)](
            x, weight, out, h, w, ho, wo, g, cg, *x.stride(), *ws, *out.stride(),
            K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=bc, ACC=_triton_accumulator(x))
    return out


def backward(x, weight, grad_out, stride, padding, dilation, need_x, need_w):
    """(grad_x or None, grad_weight or None)."""
    impl = _impl()
    n, c, h, w = x.shape
    _, g, k, _, ho, wo = weight.shape
    cg, bc = c // g, impl.block_c(c // g)
    weight, ws = _weight_strides(weight)
    acc = _triton_accumulator(x)
    gx = gw = None
    with _on_device(x):
        if need_x:
            gx = torch.empty_like(x)
            impl._bwd_x_kernel[impl.grid(n * g, h, w, cg, bc)](
                grad_out, weight, gx, h, w, ho, wo, g, cg, *grad_out.stride(), *ws, *gx.stride(),
                K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=bc, ACC=acc)
        if need_w:
            gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            _, gws = _weight_strides(gw)
            # one channel block per (sample, group): the program loops over the group's channels itself
            impl._bwd_w_kernel[impl.grid(n * g, ho, wo, bc, bc)](
                x, grad_out, gw, h, w, ho, wo, g, cg, *x.stride(), *grad_out.stride(), *gws,
                K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=bc, ACC=acc)
    return gx, gw


def _self_check(x: torch.Tensor, k: int, stride: int, dilation: int) -> Optional[str]:
    """Run forward and backward on a tiny input like ``x``'s; None if they match native (float64), else why not."""
    gen = torch.Generator().manual_seed(0)
    n, g, cg, size = 2, 2, 3, 2 * k + 3  # odd sizes, a group width that is not a power of two
    padding = dilation * (k - 1) // 2
    ho = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x64 = torch.randn(n, g * cg, size, size, generator=gen, dtype=torch.float64)
    w64 = torch.randn(n, g, k, k, ho, ho, generator=gen, dtype=torch.float64)
    go64 = torch.randn(n, g * cg, ho, ho, generator=gen, dtype=torch.float64)
    xd, wd, god = (t.to(device=x.device, dtype=x.dtype) for t in (x64, w64, go64))
    try:
        got = (forward(xd, wd, stride, padding, dilation),) + backward(xd, wd, god, stride, padding, dilation,
                                                                        True, True)
        xr, wr, gor = (t.double() for t in (xd, wd, god))  # the rounded inputs, in float64
        want = (native.forward(xr, wr, stride, padding, dilation),) + native.backward(
            xr, wr, gor, stride, padding, dilation, True, True)
        for name, a, b in zip(('forward', 'grad_x', 'grad_weight'), got, want):
            err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
            if not err <= _CHECK_TOL[x.dtype]:
                return f'{name} differs from native by {err:.3g} (relative; tolerance {_CHECK_TOL[x.dtype]:g})'
    except Exception as e:  # compile, resource or launch error
        return f'{type(e).__name__}: {str(e).strip()[:500]}'
    return None


def _fail(key: tuple, why: str) -> None:
    _verdicts[key] = why
    warnings.warn(f'rednet: the Triton involution kernels failed for {key[1]} K={key[2]} stride={key[3]} '
                  f'dilation={key[4]} on {key[0]} ({why}); falling back to the native backend for them. '
                  f"backend='triton' raises instead.", RuntimeWarning, stacklevel=3)


class _Safe:
    """Triton kernels that fall back to ``native`` (warning once) on any error of a later launch."""

    def __init__(self, key: tuple):
        self.key = key

    def forward(self, *args):
        return self._call('forward', *args)

    def backward(self, *args):
        return self._call('backward', *args)

    def _call(self, name, *args):
        if _verdicts.get(self.key) is None:
            try:
                return globals()[name](*args)
            except Exception as e:
                _fail(self.key, f'{type(e).__name__}: {str(e).strip()[:500]}')
        return getattr(native, name)(*args)


def safe_kernels(x: torch.Tensor, k: int, stride: int, dilation: int):
    """Triton kernels that checked themselves for this (device, dtype, K, stride, dilation), else ``native``'s.

    Without Triton (or for a dtype it does not run) this is ``native`` (a CUDA tensor without Triton warns once,
    in :func:`rednet.ops.resolve_backend`).
    """
    if not supports(x)[0]:
        return native
    key = (str(x.device), x.dtype, k, stride, dilation)
    if key not in _verdicts:
        why = _self_check(x, k, stride, dilation)
        if why is None:
            _verdicts[key] = None
        else:
            _fail(key, why)
    return native if _verdicts[key] else _Safe(key)

