"""The involution as a registered PyTorch operator: ``torch.ops.rednet.involution``.

Registered with :mod:`torch.library` in the ``rednet`` namespace, so that ``torch.compile`` (no graph break: the
op stays one node of the graph, the hand-written kernel runs inside the compiled model) and ``torch.export`` see
it as an opaque operator with

- a fake implementation (output shape, dtype and memory format without computing anything);
- a registered autograd formula whose backward is a second operator, ``torch.ops.rednet.involution_backward``
  (not differentiable itself: double backward raises);
- autocast kernels for CPU and CUDA: inputs are cast to the autocast dtype, like a convolution.

``kernel`` names the implementation: ``'cpp'`` (the C++ CPU kernels, :mod:`rednet.ops.cpp`), ``'triton'`` (the
Triton kernels, errors raise) or ``'auto'`` (per device: ``cpp`` on CPU, Triton on CUDA with the self-checked
fallback to ``native`` of :func:`rednet.ops.triton_kernels.safe_kernels`, ``native`` elsewhere).

This is the one module that knows every kernel: :func:`involution_cpp` and :func:`involution_triton`, the entry
points of the ``cpp`` and ``triton`` backends, live here, so the kernel modules never import it back.
"""
from typing import Tuple

import torch
from torch import Tensor

from . import cpp, native, triton_kernels
from ._common import memory_format_of, not_eager

__all__ = ['involution_op', 'involution_cpp', 'involution_triton', 'KERNELS']

KERNELS = ('cpp', 'triton', 'auto')

_lib = torch.library.Library('rednet', 'FRAGMENT')  # noqa: the autocast kernels below are registered on it


def _kernels(kernel: str, x: Tensor, weight: Tensor, stride: int, dilation: int):
    """The module whose ``forward``/``backward`` compute ``kernel`` on these inputs."""
    if kernel == 'cpp':
        cpp.require(x)
        return cpp
    if kernel == 'triton':
        return triton_kernels
    if kernel != 'auto':
        raise ValueError(f'rednet::involution: kernel must be one of {KERNELS}, got {kernel!r}')
    if x.device.type == 'cpu' and cpp.available():
        return cpp
    if x.device.type == 'cuda':
        return triton_kernels.safe_kernels(x, weight.shape[2], stride, dilation)
    return native


@torch.library.custom_op('rednet::involution', mutates_args=())
def involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, kernel: str) -> Tensor:
    """Involution aggregation (arguments as for :func:`rednet.ops.involution`, already checked)."""
    return _kernels(kernel, x, weight, stride, dilation).forward(x, weight, stride, padding, dilation)


@involution_op.register_fake
def _involution_fake(x, weight, stride, padding, dilation, kernel):
    n, c = x.shape[:2]
    return torch.empty((n, c) + tuple(weight.shape[-2:]), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


@torch.library.custom_op('rednet::involution_backward', mutates_args=())
def involution_backward_op(x: Tensor, weight: Tensor, grad_out: Tensor, stride: int, padding: int, dilation: int,
                           kernel: str, need_x: bool, need_w: bool) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_weight); an empty tensor in place of one that is not needed."""
    impl = _kernels(kernel, x, weight, stride, dilation)
    gx, gw = impl.backward(x, weight, grad_out, stride, padding, dilation, need_x, need_w)
    return (gx if need_x else x.new_empty(0)), (gw if need_w else weight.new_empty(0))


@involution_backward_op.register_fake
def _involution_backward_fake(x, weight, grad_out, stride, padding, dilation, kernel, need_x, need_w):
    gx = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, kernel = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, kernel)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = involution_backward_op(x, weight, grad_out, *ctx.args, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None, None, None


involution_op.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, grad_gx, grad_gw):
    raise RuntimeError('rednet::involution: double backward is not supported by the cpp/triton kernels; use '
                       "backend='native' or 'reference' for higher-order gradients")


def _no_setup(ctx, inputs, output):
    pass


involution_backward_op.register_autograd(_double_backward, setup_context=_no_setup)


_AUTOCAST_KEYS = {'cpu': 'AutocastCPU', 'cuda': 'AutocastCUDA'}


def _autocast_kernel(device_type: str):
    key = getattr(torch._C.DispatchKey, _AUTOCAST_KEYS[device_type])

    def run(x, weight, stride, padding, dilation, kernel):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return involution_op(x.to(dtype), weight.to(dtype), stride, padding, dilation, kernel)
    return run


for _device, _key in _AUTOCAST_KEYS.items():
    _lib.impl('involution', _autocast_kernel(_device), _key)


def involution_cpp(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    """Involution with the ``cpp`` backend (arguments already checked by :func:`rednet.ops.involution`): the
    registered operator ``torch.ops.rednet.involution``, which ``torch.compile`` and ``torch.export`` keep."""
    if not_eager():
        return native.involution_functional(x, weight, stride, padding, dilation)
    cpp.require(x)
    return involution_op(x, weight, stride, padding, dilation, 'cpp')


def involution_triton(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    """Involution with the Triton kernels (arguments already checked by :func:`rednet.ops.involution`), as the
    registered operator ``torch.ops.rednet.involution`` (kept by ``torch.compile`` and ``torch.export``)."""
    ok, why = triton_kernels.supports(x)
    if not ok:
        raise ValueError(f'involution: the triton backend cannot run this input: {why}')
    return involution_op(x, weight, stride, padding, dilation, 'triton')
