"""The involution operator: one functional entry point over several backends.

``out[n, g*Cg + c, i, j] = sum_{a,b} weight[n, g, a, b, i, j] * x_pad[n, g*Cg + c, i*s + a*d, j*s + b*d]``
with ``Cg = C // G`` channels per group and zero padding ``padding`` on every side
(Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021).

Backends:

- ``reference``: the unfold math of the official code (K*K copies of the input); ground truth for tests.
- ``native``: pure PyTorch shift-and-add with a recomputing backward (:mod:`rednet.ops.native`); any device
  and dtype, autocast, channels_last, ``torch.compile`` and ONNX export.
- ``functional``: the shift-and-add as plain tensor ops with plain autograd; under ``torch.compile`` the compiler
  fuses the taps with their neighbours; ONNX export of every backend takes this form.
- ``cpp``: hand-written C++ CPU kernels (:mod:`rednet.ops.cpp`), compiled on first use (about 20 s, cached);
  the K*K taps are summed in registers instead of one pass over memory each. CPU tensors, any float dtype.
- ``triton``: fused Triton kernels (:mod:`rednet.ops.triton_kernels`) for CUDA tensors in float32/16/bf16
  (float64 too); runs on CPU tensors only under ``TRITON_INTERPRET=1`` (slow, for tests).
- ``auto``: ``cpp`` for CPU tensors when the C++ kernels build, else ``native``; for CUDA tensors the Triton kernels
  behind a self-check that falls back to ``native`` with a warning (:func:`rednet.ops.triton_kernels.safe_kernels`);
  under ``torch.compile`` whatever :data:`COMPILE_AUTO` names for the device type. Never ``reference``.

``cpp`` and ``triton`` (and ``auto``'s kernels) run as the registered operator ``torch.ops.rednet.involution``
(:mod:`rednet.ops.library`), which ``torch.compile`` keeps as one node of its graph and ``torch.export`` exports.

``involution_fused(x, r, span_weight, span_bias, k, stride, padding, dilation, backend)`` computes
``involution(x, conv1x1(r, span_weight, span_bias).view(N, G, K, K, H_out, W_out))`` with the native or cpp
backend without materialising the kernel map (eager; falls back to the unfused math under compile/export).

Under autocast (any device type) both inputs are cast to the autocast dtype first, like a convolution; the
fast backends accumulate half-precision inputs in float32.
"""
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpp, fused, triton_kernels
from ._common import not_eager, output_size
from .library import involution_cpp, involution_op, involution_triton
from .native import involution_functional, involution_native
from .onnx_form import involution_onnx
from .reference import involution_reference

__all__ = ['involution', 'involution_reference', 'involution_native', 'involution_functional', 'involution_cpp',
           'involution_fused',
           'involution_span_unfused', 'output_size', 'not_eager', 'BACKENDS', 'resolve_backend',
           'INDUCTOR_OPTIONS']

BACKENDS = ('auto', 'reference', 'native', 'functional', 'cpp', 'triton')


def _check_args(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> None:
    if x.dim() != 4:
        raise ValueError(f'involution: x must be (N, C, H, W), got shape {tuple(x.shape)}')
    if weight.dim() != 6:
        raise ValueError(f'involution: weight must be (N, G, K, K, H_out, W_out), got shape {tuple(weight.shape)}')
    n, c, h, w = x.shape
    wn, g, k, k2, h_out, w_out = weight.shape
    if k != k2:
        raise ValueError(f'involution: kernel must be square, got {k}x{k2}')
    if wn != n:
        raise ValueError(f'involution: batch of x ({n}) and weight ({wn}) differ')
    if g < 1 or c % g:
        raise ValueError(f'involution: channels ({c}) must be divisible by the number of groups ({g})')
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(f'involution: need stride >= 1, dilation >= 1, padding >= 0; '
                         f'got stride={stride}, dilation={dilation}, padding={padding}')
    expected = (output_size(h, k, stride, padding, dilation), output_size(w, k, stride, padding, dilation))
    if (h_out, w_out) != expected:
        raise ValueError(
            f'involution: weight spatial size {(h_out, w_out)} does not match the output size {expected} of '
            f'a {h}x{w} input with kernel {k}, stride {stride}, padding {padding}, dilation {dilation}')
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f'involution: x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) '
                         f'must share dtype and device')


def involution(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        backend: str = 'auto',
) -> torch.Tensor:
    """Involution aggregation.

    Args:
        x: input (N, C, H, W).
        weight: per-pixel kernels (N, G, K, K, H_out, W_out), shared by the C // G channels of a group.
        stride: spatial stride.
        padding: zero padding on every side; ``None`` means ``dilation * (K - 1) // 2`` ("same").
        dilation: spacing of the kernel taps.
        backend: ``'auto'`` or one of ``BACKENDS``.

    Returns:
        (N, C, H_out, W_out)
    """
    if backend not in BACKENDS:
        raise ValueError(f'involution: unknown backend {backend!r}; choose one of {", ".join(BACKENDS)}')
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError('involution: x and weight must be tensors')
    k = weight.shape[2] if weight.dim() == 6 else 0
    if padding is None:
        padding = dilation * (k - 1) // 2
    x, weight = _autocast_inputs(x, weight)
    _check_args(x, weight, stride, padding, dilation)
    if torch.onnx.is_in_onnx_export():  # ONNX export, any backend: the graph ONNX Runtime runs fastest
        return involution_onnx(x, weight, stride, padding, dilation)
    backend = resolve_backend(backend, x)
    if backend == 'native':
        return involution_native(x, weight, stride, padding, dilation)
    if backend == 'functional':
        return involution_functional(x, weight, stride, padding, dilation)
    if backend == 'cpp':
        return involution_cpp(x, weight, stride, padding, dilation)
    if backend == 'triton':
        return involution_triton(x, weight, stride, padding, dilation)
    if backend == 'kernels':  # auto on CUDA: Triton with the self-checked fallback to native
        if not_eager():  # tracing or scripting (ONNX export returned above)
            return involution_functional(x, weight, stride, padding, dilation)
        return involution_op(x, weight, stride, padding, dilation, 'auto')
    return involution_reference(x, weight, stride, padding, dilation)


def _autocast_inputs(x: torch.Tensor, weight: torch.Tensor):
    """Under autocast, run in the autocast dtype (like a convolution) whatever the inputs' dtypes."""
    device_type = x.device.type
    if not (x.is_floating_point() and weight.is_floating_point()):
        return x, weight
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # device type without autocast support
        return x, weight
    if not enabled:
        return x, weight
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype)


def involution_span_unfused(x, r, span_weight, span_bias, k: int, stride: int = 1, padding: Optional[int] = None,
                            dilation: int = 1, backend: str = 'auto') -> torch.Tensor:
    """The same math unfused: span conv, then :func:`involution` (any backend, compile, export)."""
    if padding is None:
        padding = dilation * (k - 1) // 2
    weight = F.conv2d(r, span_weight.reshape(span_weight.shape[0], -1, 1, 1), span_bias)
    n, _, h, w = weight.shape
    weight = weight.view(n, -1, k, k, h, w)
    return involution(x, weight, stride=stride, padding=padding, dilation=dilation, backend=backend)


def involution_fused(x: torch.Tensor, r: torch.Tensor, span_weight: torch.Tensor, span_bias: Optional[torch.Tensor],
                     k: int, stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                     backend: str = 'native') -> torch.Tensor:
    """``involution(x, span(r).view(N, G, K, K, H_out, W_out))`` without materialising the kernel map
    (:mod:`rednet.ops.fused`).

    Args:
        x: input (N, C, H, W).
        r: reduced features (N, Cr, H_out, W_out) the kernel map is generated from.
        span_weight: 1x1 conv weight (K*K*G, Cr, 1, 1) or (K*K*G, Cr); row ``(g*K + a)*K + b`` is tap (a, b)
            of group g (the layout of ``weight.view(N, G, K, K, H_out, W_out)``).
        span_bias: (K*K*G,) or None.
        k, stride, padding (``None``: "same"), dilation: as for :func:`involution`.
        backend: ``'native'`` (chunked PyTorch ops, any device) or ``'cpp'`` (the C++ CPU kernels of
            :mod:`rednet.ops.cpp`, which compute each (sample, group)'s kernel map in cache).

    Eager only; under ``torch.compile``, tracing or ONNX export it falls back to the unfused math with
    the ``native`` backend. Under autocast the inputs are cast to the autocast dtype first.
    """
    if padding is None:
        padding = dilation * (k - 1) // 2
    if not_eager(compiling=True):
        return involution_span_unfused(x, r, span_weight, span_bias, k, stride, padding, dilation, 'native')
    return fused.span_involution(x, r, span_weight, span_bias, k, stride, padding, dilation, backend)


# what `auto` runs under torch.compile, per device type: 'kernels' keeps the hand-written kernels as one opaque
# operator (cpp on CPU, Triton on CUDA), the same kernels as eager; 'functional' lets the compiler fuse the
# taps with their neighbours: compiled RedNet-26 on the CPU, it infers 1.42x faster than the kernels but trains no
# faster (4.18 vs 4.24 img/s) and compiles 3x longer (docs/performance.md), so 'kernels' everywhere. (The compiled
# float32 gradient errors once blamed on 'functional' come from inductor's batch norms; see INDUCTOR_OPTIONS.)
COMPILE_AUTO = {'cpu': 'kernels', 'cuda': 'kernels'}
_warned_no_triton = False

# torch.compile(model, options=INDUCTOR_OPTIONS.get(device_type, {})) for training: with mkldnn, inductor stores the
# convolutions' activations channels_last on the CPU (layout_optimization), and then sums each channel's batch-norm
# statistics serially in float32 along the strided N*H*W axis, where eager NCHW accumulates them in double: about 3x
# (up to 12x) eager's forward rounding error, enough to flip ReLU masks, each flip an O(1) change of one gradient
# element and up to 1e-3 .. 1e-1 relative error in bias gradients whose terms cancel (docs/gpu.md, "Compiled training
# precision"; pure-torch repro: scripts/inductor_bn_precision.py). NCHW keeps the compiled error at eager's.
INDUCTOR_OPTIONS = {'cpu': {'layout_optimization': False}}


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend ``backend`` means for input ``x``: ``'auto'`` becomes ``'cpp'`` on CPU (where the C++
    kernels build), ``'kernels'`` on CUDA (the Triton kernels behind their self-check, with ``native`` as the
    fallback), ``'native'`` elsewhere; under ``torch.compile`` whichever :data:`COMPILE_AUTO` names for the device.

    An explicitly requested ``triton`` on an input it cannot run raises ``ValueError`` (never a wrong result).
    """
    if backend == 'auto':
        return _resolve_auto(x)
    if backend == 'triton':
        ok, why = triton_kernels.supports(x)
        if not ok:
            raise ValueError(f'involution: the triton backend cannot run this input: {why}; '
                             f"use backend='native' (or 'auto', which falls back to it)")
    return backend


def _resolve_auto(x: torch.Tensor) -> str:
    dev = x.device.type
    cpu_kernels = dev == 'cpu' and x.is_floating_point() and cpp.available()
    if torch.compiler.is_compiling() and dev in COMPILE_AUTO:
        choice = COMPILE_AUTO[dev]
        if choice == 'functional' or (dev == 'cpu' and not cpu_kernels):
            return 'functional'
        return 'cpp' if dev == 'cpu' else _cuda_kernels(x)
    if dev == 'cuda':
        return _cuda_kernels(x)
    return 'cpp' if cpu_kernels else 'native'


def _cuda_kernels(x: torch.Tensor) -> str:
    global _warned_no_triton
    if not triton_kernels.available():
        if not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn("rednet: Triton is not installed, so the involution runs with the 'native' backend on "
                          "CUDA (slower); pip install triton", RuntimeWarning, stacklevel=4)
        return 'native'
    return 'kernels' if triton_kernels.supports(x)[0] else 'native'
