"""``native`` involution backend: pure PyTorch shift-and-add with a recomputing custom backward.

Forward: ``out = sum_t x_shift_t * w_t`` over the K*K taps, where ``x_shift_t`` is a (strided) view of the
zero-padded input and ``w_t`` the tap's kernel map, broadcast over the channels of a group. No unfold buffer.

Backward (custom ``torch.autograd.Function``, saves only ``x`` and ``weight``):
``grad_x_pad[view_t] += grad_out * w_t`` (scatter of each tap back onto the input) and
``grad_w_t = sum_{c in group} x_shift_t * grad_out``.

Eager execution is blocked for the CPU cache ("phase layout"): the work is cut into chunks of
(samples, groups) small enough to stay in cache and to bound the workspace. Within a chunk the padded input is
split into its ``stride x stride`` phase planes (each a plain stride-1 image), laid out row-major with ``Wq``
columns, and the output is computed on the same ``Wq``-wide grid (the ``Wq - W_out`` extra columns are junk
and cropped at the end). Every tap is then one contiguous 1-D slice of a phase plane at offset
``row_shift * Wq + col_shift``, so each of the K*K ``addcmul_``/``mul``+``sum`` calls runs a long vectorised
inner loop, whatever the stride, dilation or memory format of the inputs. Workspace is a few chunk-sized
buffers (at most 1.5x the input); half-precision inputs are accumulated in float32. The tap views of the
chunk buffers are built once per call, so the Python cost is one ATen call per tap and chunk.

Under ``torch.compile`` (and ONNX export) the same math is expressed with purely functional ops on whole
tensors, which the compiler fuses into one loop and the exporter maps to Slice/Mul/Add nodes.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._common import (Geometry, ViewCache, accumulation_dtype, chunk_plan, fill_phases, grad_x_chunk, kmap_tap_views,
                      memory_format_of, not_eager, to_grid, x_tap_views)

__all__ = ['involution_native', 'involution_functional']


def _forward_eager(x: torch.Tensor, weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    n, c, _, _ = x.shape
    g, k = weight.shape[1], weight.shape[2]
    cg, kk = c // g, k * k
    acc = accumulation_dtype(x.dtype)
    fmt = memory_format_of(x)
    out = torch.empty((n, c, geo.h_out, geo.w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    xg = x.unflatten(1, (g, cg))
    og = out.unflatten(1, (g, cg))
    wg = weight.flatten(2, 3)  # (N, G, KK, H_out, W_out)
    plan = chunk_plan(n, g, (cg * (geo.phases * geo.flat + geo.length) + kk * geo.length), x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    w_buf = torch.empty((nb, gb, kk, geo.length), **opts)
    o_buf = torch.empty((nb, gb, cg, geo.length), **opts)
    views = ViewCache(lambda a, b: (x_tap_views(xq_buf[:a, :b], geo), kmap_tap_views(w_buf[:a, :b], True)))
    for n0, n1, g0, g1 in plan:
        xq, kmap_grid, oq = xq_buf[:n1 - n0, :g1 - g0], w_buf[:n1 - n0, :g1 - g0], o_buf[:n1 - n0, :g1 - g0]
        fill_phases(xq, xg[n0:n1, g0:g1], geo)
        to_grid(kmap_grid, wg[n0:n1, g0:g1], geo)
        xv, wv = views((n1 - n0, g1 - g0))
        torch.mul(xv[0], wv[0], out=oq)
        for t in range(1, kk):
            oq.addcmul_(xv[t], wv[t])
        og[n0:n1, g0:g1].copy_(oq.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out])
    return out


def _backward_eager(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, geo: Geometry,
                    need_x: bool, need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    n, c, _, _ = x.shape
    g, k = weight.shape[1], weight.shape[2]
    cg, kk = c // g, k * k
    acc = accumulation_dtype(x.dtype)
    fmt = memory_format_of(x)
    gx = torch.empty_like(x, memory_format=fmt) if need_x else None
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    xg = x.unflatten(1, (g, cg))
    gog = grad_out.unflatten(1, (g, cg))
    wg = weight.flatten(2, 3)
    # buffers are shared between the two passes: (grad_x phase planes, input phase planes) and
    # (kernel map on the grid, grad kernel map on the grid)
    plan = chunk_plan(n, g, cg * (geo.phases * geo.flat + 2 * geo.length) + kk * geo.length, x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    go_buf = torch.empty((nb, gb, cg, geo.length), **opts)
    w_buf = grad_kmap_buf = torch.empty((nb, gb, kk, geo.length), **opts)
    gxq_buf = xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    tmp_buf = torch.empty((nb, gb, cg, geo.length), **opts) if need_w else None
    # phase-plane views serve grad_x (scatter target) and grad_w (input taps); grid views serve the kernel map
    # (broadcast over channels) and the grad kernel map (reduction target)
    views = ViewCache(lambda a, b: (x_tap_views(xq_buf[:a, :b], geo), kmap_tap_views(w_buf[:a, :b], True),
                                     kmap_tap_views(w_buf[:a, :b], False)))
    for n0, n1, g0, g1 in plan:
        sl = (slice(None, n1 - n0), slice(None, g1 - g0))
        xv, wv, grad_kmap_views = views((n1 - n0, g1 - g0))
        grad_out_grid = to_grid(go_buf[sl], gog[n0:n1, g0:g1], geo)  # junk columns are zero: they scatter nothing
        if need_x:
            to_grid(w_buf[sl], wg[n0:n1, g0:g1], geo)
            grad_x_chunk(gxq_buf[sl], gx.unflatten(1, (g, cg))[n0:n1, g0:g1], xv, wv, grad_out_grid, geo)
        if need_w:
            xq, tmp, grad_kmap_grid = xq_buf[sl], tmp_buf[sl], grad_kmap_buf[sl]
            fill_phases(xq, xg[n0:n1, g0:g1], geo)
            for t in range(kk):
                torch.sum(torch.mul(xv[t], grad_out_grid, out=tmp), dim=2, out=grad_kmap_views[t])
            gw[n0:n1, g0:g1].copy_(grad_kmap_grid.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out]
                                   .unflatten(2, (k, k)))
    return gx, gw


# ---------------------------------------------------------------------------------------------------------
# functional formulation (torch.compile, ONNX export): whole-tensor ops, no in-place writes
# ---------------------------------------------------------------------------------------------------------

def _tap_views(xp: torch.Tensor, k: int, s: int, d: int, ho: int, wo: int):
    """Yield (t, strided view of the padded input for tap t) with shape (..., H_out, W_out)."""
    for a in range(k):
        for b in range(k):
            yield a * k + b, xp[..., a * d:a * d + s * (ho - 1) + 1:s, b * d:b * d + s * (wo - 1) + 1:s]


def involution_functional(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                          dilation: int) -> torch.Tensor:
    """Forward as a plain sum of products of views (exportable, compiler-friendly)."""
    c = x.shape[1]
    _, g, k, _, ho, wo = weight.shape
    xp = F.pad(x, (padding, padding, padding, padding)).unflatten(1, (g, c // g))
    wt = weight.flatten(2, 3).unsqueeze(2)  # (N, G, 1, KK, H_out, W_out)
    out = None
    for t, view in _tap_views(xp, k, stride, dilation, ho, wo):
        term = view * wt[:, :, :, t]
        out = term if out is None else out + term
    return out.flatten(1, 2)


def _backward_functional(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, geo: Geometry,
                         need_x: bool, need_w: bool):
    n, c, h, w = x.shape
    g, k = weight.shape[1], weight.shape[2]
    cg, p, s, d = c // g, geo.p, geo.s, geo.d
    go = grad_out.unflatten(1, (g, cg))
    wt = weight.flatten(2, 3).unsqueeze(2)
    gx = gw = None
    if need_x:
        # every tap adds grad_out * w_t onto a strided window of the padded input; in the stride x stride
        # phase planes each window is a stride-1 shift, expressed with F.pad and summed per phase
        planes: List[Optional[torch.Tensor]] = [None] * geo.phases
        for t, (ph, off) in enumerate(geo.taps):
            qa, qb = divmod(off, geo.wq)
            term = F.pad(go * wt[:, :, :, t], (qb, geo.wq - geo.w_out - qb, qa, geo.hq - geo.h_out - qa))
            planes[ph] = term if planes[ph] is None else planes[ph] + term
        zeros = None
        for i, pl in enumerate(planes):
            if pl is None:
                if zeros is None:
                    zeros = go.new_zeros(go.shape[:3] + (geo.hq, geo.wq))
                planes[i] = zeros
        # interleave the phases back into the padded grid: (.., hq, s, kmap_grid, s) -> (.., hq*s, kmap_grid*s)
        full = torch.stack(planes, dim=-1).unflatten(-1, (s, s))  # (N, G, Cg, hq, kmap_grid, s, s)
        full = full.permute(0, 1, 2, 3, 5, 4, 6).flatten(5, 6).flatten(3, 4)  # (N, G, Cg, hq*s, kmap_grid*s)
        hp, wp = full.shape[-2], full.shape[-1]
        if hp < p + h or wp < p + w:  # taps never reach the bottom/right rows: they get zero gradient
            full = F.pad(full, (0, max(0, p + w - wp), 0, max(0, p + h - hp)))
        gx = full[..., p:p + h, p:p + w].flatten(1, 2)
    if need_w:
        xp = F.pad(x, (p, p, p, p)).unflatten(1, (g, cg))
        taps = [(view * go).sum(2) for _, view in _tap_views(xp, k, s, d, geo.h_out, geo.w_out)]
        gw = torch.stack(taps, dim=2).unflatten(2, (k, k))
    return gx, gw


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> Geometry:
    _, _, h, w = x.shape
    _, _, k, _, ho, wo = weight.shape
    return Geometry(h, w, k, stride, padding, dilation, ho, wo)


def forward(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Eager forward (also the fallback kernel of ``torch.ops.rednet.involution`` on CUDA)."""
    return _forward_eager(x, weight, _geometry(x, weight, stride, padding, dilation))


def backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, stride: int, padding: int, dilation: int,
             need_x: bool, need_w: bool):
    """Eager (grad_x or None, grad_weight or None)."""
    return _backward_eager(x, weight, grad_out, _geometry(x, weight, stride, padding, dilation), need_x, need_w)


class _InvolutionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int):
        n, c, h, w = x.shape
        _, g, k, _, ho, wo = weight.shape
        geo = Geometry(h, w, k, stride, padding, dilation, ho, wo)
        ctx.save_for_backward(x, weight)
        ctx.geo_args = (stride, padding, dilation)
        if torch.compiler.is_compiling():
            return involution_functional(x, weight, stride, padding, dilation)
        return _forward_eager(x, weight, geo)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geo_args
        n, c, h, w = x.shape
        _, g, k, _, ho, wo = weight.shape
        geo = Geometry(h, w, k, stride, padding, dilation, ho, wo)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.compiler.is_compiling():
            gx, gw = _backward_functional(x, weight, grad_out, geo, need_x, need_w)
        else:
            gx, gw = _backward_eager(x, weight, grad_out, geo, need_x, need_w)
        return gx, gw, None, None, None


def involution_native(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                      dilation: int = 1) -> torch.Tensor:
    """Involution with the ``native`` backend (arguments already checked by :func:`rednet.ops.involution`)."""
    if not_eager():
        return involution_functional(x, weight, stride, padding, dilation)
    return _InvolutionFunction.apply(x, weight, stride, padding, dilation)
