"""``cpp`` involution backend: hand-written C++ CPU kernels (``csrc/involution_cpu.cpp``), compiled on first use.

The kernels work on one (sample, group) at a time, in cache, on the ``native`` backend's phase layout, and sum the
K*K taps of a vector of output pixels in registers instead of making one pass over memory per tap as the
``native`` backend's PyTorch ops must (see the .cpp file). A second pair of kernels fuses the span conv in (the
kernel map of each (sample, group) is computed in cache and never stored; :func:`rednet.ops.involution_fused`
with ``backend='cpp'``). They are
compiled with :func:`torch.utils.cpp_extension.load` the first time they are needed (about 20 s; needs a C++
compiler, which PyTorch's CPU extensions need anyway) and cached in PyTorch's extension directory
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), keyed by the source, the compiler flags
and this CPU's instruction set (the code is built for the machine it runs on). If the build fails, ``auto``
falls back to ``native`` with a warning and an explicit ``backend='cpp'`` raises the compiler's message.

Float32 and float64 run natively; float16/bfloat16 inputs are computed in float32 and cast back. Any memory
format is accepted (inputs are made contiguous; the output keeps a channels_last input's layout). The kernels run as
the registered operator ``torch.ops.rednet.involution`` (:mod:`rednet.ops.library`, whose
:func:`~rednet.ops.library.involution_cpp` is this backend's entry point), also inside ``torch.compile`` and
``torch.export``; ONNX export takes the ``native`` functional path instead.
"""
import hashlib
import os
import platform
import sys
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import Geometry, accumulation_dtype, memory_format_of, r_on_grid

__all__ = ['available', 'load_error', 'require', 'forward', 'backward', 'span_function']

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'involution_cpu.cpp')
_CFLAGS = ['-O3', '-march=native', '-ffp-contract=fast']
_lock = threading.Lock()
_ext = None
_error: Optional[str] = None


def _cpu_key() -> str:
    """A short hash of this CPU's instruction-set flags: a -march=native build is only reused on a like CPU."""
    flags = platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _built(name: str) -> bool:
    """Whether a build of the extension is in PyTorch's cache (only decides whether to announce a build)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return os.path.exists(os.path.join(_get_build_directory(name, False), f'{name}.so'))
    except Exception:  # a private helper of PyTorch's: if it moves, just announce the (maybe cached) build
        return False


def _load():
    global _ext, _error
    if _ext is not None:  # built: no lock on this path (resolve_backend asks on every involution call)
        return _ext
    with _lock:
        if _ext is None and _error is None:
            name = f'rednet_involution_cpu_{_cpu_key()}'
            if not _built(name):
                print('rednet: building the C++ involution kernels for this machine (once, about 20 s)',
                      file=sys.stderr, flush=True)
            try:
                from torch.utils.cpp_extension import load
                _ext = load(name=name, sources=[_SOURCE], extra_cflags=_CFLAGS, verbose=False)
            except Exception as e:  # no compiler, no ninja, a build error: say why, fall back in `auto`
                _error = f'{type(e).__name__}: {str(e).strip()[-2000:]}'
                warnings.warn(f"rednet: the C++ involution kernels could not be built, so backend='auto' uses "
                              f"'native' on the CPU ({_error})")
    return _ext


def available() -> bool:
    """Whether the C++ kernels are built (building them now if they were not tried yet)."""
    return _load() is not None


def load_error() -> Optional[str]:
    """Why the C++ kernels could not be built (None if they were, or were not tried yet)."""
    return _error


def _for_kernel(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels take it: contiguous, in the accumulation dtype."""
    return t.to(accumulation_dtype(t.dtype)).contiguous()


def forward(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Forward kernel (the ``cpp`` kernel of ``torch.ops.rednet.involution``, :mod:`rednet.ops.library`)."""
    out = _load().forward(_for_kernel(x), _for_kernel(weight), stride, padding, dilation)
    return out.to(dtype=x.dtype, memory_format=memory_format_of(x))


def backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, stride: int, padding: int, dilation: int,
             need_x: bool, need_w: bool):
    """(grad_x or None, grad_weight or None)."""
    gx, gw = _load().backward(_for_kernel(x), _for_kernel(weight), _for_kernel(grad_out), stride, padding,
                              dilation, need_x, need_w)
    gx = gx.to(dtype=x.dtype, memory_format=memory_format_of(x)) if need_x else None
    gw = gw.to(weight.dtype) if need_w else None
    return gx, gw


def require(x: torch.Tensor) -> None:
    """Raise a clear error unless the C++ kernels can run ``x``."""
    if x.device.type != 'cpu':
        raise ValueError(f"involution: the cpp backend runs on CPU tensors, not {x.device.type}; use "
                         f"backend='auto'")
    if not available():
        raise RuntimeError(f"involution: the cpp backend could not be built ({_error}); use backend='native' "
                           f"(or 'auto', which falls back to it)")


def span_function(x: torch.Tensor):
    """The autograd Function of the fused span conv + involution (used by :func:`rednet.ops.involution_fused`)."""
    require(x)
    return _CppSpanInvolution


def _span_grid_args(x: torch.Tensor, r: torch.Tensor, span_weight: torch.Tensor, span_bias: Optional[torch.Tensor],
                    k: int, stride: int, padding: int, dilation: int):
    """The phase-layout geometry; r on its grid (N, Cr, L), zero in the junk columns and at the end (L = H_out * Wq
    rounded up to whole 64-byte vectors, as the kernels compute); span weight (G*KK, Cr) and bias (G*KK)."""
    geo = Geometry(x.shape[2], x.shape[3], k, stride, padding, dilation, r.shape[2], r.shape[3])
    acc = accumulation_dtype(r.dtype)
    vec = 64 // acc.itemsize
    r_grid = F.pad(r_on_grid(r, geo, acc), (0, -geo.length % vec))
    span_w = _for_kernel(span_weight.reshape(span_weight.shape[0], -1))
    bias = _for_kernel(span_bias) if span_bias is not None else span_w.new_zeros(span_w.shape[0])
    return geo, r_grid, span_w, bias


class _CppSpanInvolution(torch.autograd.Function):
    """``involution(x, span(r))`` with the span conv fused into the C++ kernels: the kernel map is computed per
    (sample, group) in cache and never stored; backward recomputes it. Saves x, r and the span parameters."""

    @staticmethod
    def forward(ctx, x, r, span_weight, span_bias, k: int, stride: int, padding: int, dilation: int):
        geo, r_grid, span_w, bias = _span_grid_args(x, r, span_weight, span_bias, k, stride, padding, dilation)
        ctx.save_for_backward(x, r, span_weight, span_bias)
        ctx.args = (k, stride, padding, dilation)
        out = _ext.span_forward(_for_kernel(x), r_grid, span_w, bias, k, geo.h_out, geo.w_out, stride, padding,
                                dilation)
        return out.to(dtype=x.dtype, memory_format=memory_format_of(x))

    @staticmethod
    def backward(ctx, grad_out):
        x, r, span_weight, span_bias = ctx.saved_tensors
        k, stride, padding, dilation = ctx.args
        geo, r_grid, span_w, bias = _span_grid_args(x, r, span_weight, span_bias, k, stride, padding, dilation)
        need = ctx.needs_input_grad
        gx, gr, gw, gb = _ext.span_backward(_for_kernel(x), r_grid, span_w, bias, _for_kernel(grad_out), k, stride,
                                            padding, dilation, need[0], need[1], need[2],
                                            need[3] and span_bias is not None)
        gx = gx.to(dtype=x.dtype, memory_format=memory_format_of(x)) if need[0] else None
        gr = gr[..., :geo.length].unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out] \
            .to(dtype=r.dtype, memory_format=memory_format_of(r)) if need[1] else None
        gw = gw.sum(0).view(span_weight.shape).to(span_weight.dtype) if need[2] else None
        gb = gb.sum(0).to(span_bias.dtype) if need[3] and span_bias is not None else None
        return gx, gr, gw, gb, None, None, None, None
