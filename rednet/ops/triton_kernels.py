"""``triton`` involution backend: fused Triton kernels for forward, grad-input and grad-weight.

The kernels live in :mod:`rednet.ops._triton_impl`, imported on first use so that this package imports
without Triton. They run on CUDA tensors; on CPU tensors only when ``TRITON_INTERPRET=1`` was set before
Triton was imported (the interpreter: slow, used by the tests). Supported dtypes: float32, float16,
bfloat16 (accumulated in float32) and float64. :func:`supports` says whether an input can run here; the
``auto`` backend uses it to fall back to ``native``.
"""
import functools
import os
from typing import Tuple

import torch

__all__ = ['involution_triton', 'supports', 'available']

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BLOCK_P = 64


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


def _acc_dtype(x: torch.Tensor):
    """The Triton accumulator dtype: float64 for float64 inputs, float32 otherwise."""
    tl = _impl().tl
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _launch_args(x: torch.Tensor, weight: torch.Tensor):
    n, c, h, w = x.shape
    _, g, k, _, ho, wo = weight.shape
    cg = c // g
    block_c = max(1, triton_next_pow2(cg))
    return n, c, h, w, g, k, ho, wo, cg, block_c


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length() if v > 1 else 1


def _weight_strides(weight: torch.Tensor):
    # weight (N, G, K, K, Ho, Wo) addressed as (N, G, K*K, Ho, Wo): tap t = a*K + b -> a*s2 + b*s3 must equal
    # t*s3, which holds when s2 == K*s3; otherwise make it so with a copy
    s = weight.stride()
    k = weight.shape[2]
    if s[2] != k * s[3]:
        weight = weight.contiguous()
        s = weight.stride()
    return weight, (s[0], s[1], s[3], s[4], s[5])


def _forward(x, weight, stride, padding, dilation):
    impl = _impl()
    n, c, h, w, g, k, ho, wo, cg, block_c = _launch_args(x, weight)
    weight, ws = _weight_strides(weight)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    grid = (triton_cdiv(ho * wo, _BLOCK_P), n * g)
    impl._fwd_kernel[grid](x, weight, out, h, w, ho, wo, g, cg, *_strides(x), *ws, *_strides(out),
                           K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=block_c, BLOCK_P=_BLOCK_P,
                           ACC=_acc_dtype(x))
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _backward(x, weight, grad_out, stride, padding, dilation, need_x, need_w):
    impl = _impl()
    n, c, h, w, g, k, ho, wo, cg, block_c = _launch_args(x, weight)
    weight, ws = _weight_strides(weight)
    acc = _acc_dtype(x)
    gx = gw = None
    if need_x:
        gx = torch.empty_like(x)
        grid = (triton_cdiv(h * w, _BLOCK_P), n * g)
        impl._bwd_x_kernel[grid](grad_out, weight, gx, h, w, ho, wo, g, cg, *_strides(grad_out), *ws,
                                 *_strides(gx), K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=block_c,
                                 BLOCK_P=_BLOCK_P, ACC=acc)
    if need_w:
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        _, gws = _weight_strides(gw)
        grid = (triton_cdiv(ho * wo, _BLOCK_P), n * g)
        impl._bwd_w_kernel[grid](x, grad_out, gw, h, w, ho, wo, g, cg, *_strides(x), *_strides(grad_out), *gws,
                                 K=k, STRIDE=stride, PAD=padding, DIL=dilation, BLOCK_C=block_c,
                                 BLOCK_P=_BLOCK_P, ACC=acc)
    return gx, gw


class _TritonInvolution(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation)
        return _forward(x, weight, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        gx, gw = _backward(x, weight, grad_out, *ctx.args, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None, None, None


def involution_triton(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                      dilation: int = 1) -> torch.Tensor:
    """Involution with the Triton kernels (arguments already checked by :func:`rednet.ops.involution`)."""
    ok, why = supports(x)
    if not ok:
        raise ValueError(f'involution: the triton backend cannot run this input: {why}')
    return _TritonInvolution.apply(x, weight, stride, padding, dilation)
