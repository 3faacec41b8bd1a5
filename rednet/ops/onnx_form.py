"""The involution as ONNX Runtime's CPU provider runs it fastest: one ``Gather`` and one ``MatMul``.

:func:`rednet.ops.involution` calls :func:`involution_onnx` while ``torch.onnx.export`` traces a model (either
exporter), whatever the backend. Per output pixel ``p`` and group ``g`` the aggregation is a (1 x K*K) @ (K*K x Cg)
product of the pixel's kernel with its K*K input taps, so the graph is:

1. ``Pad`` x, ``Reshape`` to (N, G, Cg, Hp*Wp) and ``Transpose`` to (N, G, Hp*Wp, Cg) (channels of a group last,
   so every gathered tap is a contiguous run of Cg values);
2. one ``Gather`` along the flattened padded plane with a constant index of (H_out*W_out*K*K) positions
   (stride and dilation live in the index) -> (N, G, P, K*K, Cg);
3. the kernel map (N, G, K*K, P) ``Transpose``\\ d to (N, G, P, 1, K*K) and one batched ``MatMul`` -> (N, G, P, 1, Cg);
4. ``Reshape``/``Transpose`` back to (N, C, H_out, W_out).

That is at most :data:`NODES_PER_INVOLUTION` nodes per involution, against ~150 (49 x Slice/Mul/Add) for the
shift-and-add form. The gathered taps are K*K times the input, like the official unfold, but ONNX Runtime then
reads them once in a GEMM instead of running 3 full-size element-wise passes per tap. The alternatives measured
(``docs/deploy.md``): 49 taps (Slice/Mul/Add), taps grouped by kernel row (7 x Gather + MatMul), one Gather +
Mul + ReduceSum (planar or channels-last), Einsum, and an im2col ``Conv`` with one-hot weights + Mul + ReduceSum.
"""
import torch
import torch.nn.functional as F

__all__ = ['involution_onnx', 'tap_index', 'NODES_PER_INVOLUTION']

# upper bound on the ONNX nodes one involution aggregation exports to (either exporter, static or dynamic batch;
# counted in tests/test_onnx.py): Pad, 3 Reshape, 3 Transpose, Gather, MatMul, plus the exporters' Constant /
# shape nodes
NODES_PER_INVOLUTION = 16


def tap_index(h_pad: int, w_pad: int, k: int, stride: int, dilation: int, h_out: int, w_out: int) -> torch.Tensor:
    """Flat positions in the (h_pad x w_pad) padded plane of the K*K taps of every output pixel, (H_out*W_out*K*K,)
    ordered pixel-major, tap-minor: ``index[(i*W_out + j)*K*K + a*K + b] = (i*s + a*d) * w_pad + j*s + b*d``."""
    i = torch.arange(h_out) * stride
    j = torch.arange(w_out) * stride
    a = torch.arange(k) * dilation
    rows = (i[:, None, None, None] + a[None, None, :, None]) * w_pad
    cols = j[None, :, None, None] + a[None, None, None, :]
    return (rows + cols).reshape(-1)


def involution_onnx(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                    dilation: int = 1) -> torch.Tensor:
    """Involution aggregation (same arguments and result as :func:`rednet.ops.involution`) in ops that export to
    Pad/Reshape/Transpose/Gather/MatMul; the batch dimension stays symbolic (dynamic-batch exports)."""
    _, c, h, w = x.shape
    _, g, k, _, h_out, w_out = weight.shape
    cg, kk, pixels = c // g, k * k, h_out * w_out
    h_pad, w_pad = h + 2 * padding, w + 2 * padding
    index = tap_index(h_pad, w_pad, k, stride, dilation, h_out, w_out).to(x.device)
    planes = F.pad(x, (padding, padding, padding, padding)).reshape(-1, g, cg, h_pad * w_pad).transpose(2, 3)
    taps = planes.index_select(2, index).reshape(-1, g, pixels, kk, cg)  # (N, G, P, KK, Cg)
    kernels = weight.reshape(-1, g, kk, pixels).transpose(2, 3).reshape(-1, g, pixels, 1, kk)
    out = torch.matmul(kernels, taps)  # (N, G, P, 1, Cg)
    return out.reshape(-1, g, pixels, cg).transpose(2, 3).reshape(-1, c, h_out, w_out)
