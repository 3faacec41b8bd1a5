"""Involution with the kernel-generating span conv fused in (``native`` backend, eager only; the public entry point
is :func:`rednet.ops.involution_fused`, which falls back to the unfused math under compile and export).

RedNet's kernel map ``weight = span(r)`` (a 1x1 conv C/4 -> K*K*G with bias) has K*K*G = 49*C/16, about 3x the
channels of the feature map it is applied to. Unfused, it is written by the conv, read by the aggregation and
saved for backward. Here it never exists as a whole: :func:`involution_fused` takes the reduced features
``r`` (N, C/4, H_out, W_out) and the span conv's weight/bias, and per chunk of (samples, groups) of the
``native`` phase layout (:mod:`rednet.ops.native`) computes that chunk's kernel map with one batched matmul
straight into the chunk's grid buffer, then aggregates. Saved for backward: ``x``, ``r``, span weight and bias.
The backward recomputes each chunk's kernel map, scatters grad_x, reduces the chunk's grad kernel map and turns
it into grad_r (``W^T @ grad_kmap``), grad span weight (``grad_kmap @ r^T``) and grad span bias (a sum).

On large images the kernel map is computed straight on the phase layout's ``Wq``-wide grid, from ``r``
zero-padded to ``Wq`` columns: its junk columns hold the bias only, which is harmless (they are cropped from the
output, and ``grad_out`` is zero there, so they scatter nothing and get zero grad kernel map, hence contribute
nothing to grad_r/weight). On small images, where the junk columns are a large fraction of the grid, the
matmuls run on the compact H_out x W_out layout and a chunk-sized copy moves the result onto the grid.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from . import cpp
from ._common import (Geometry, ViewCache, accumulation_dtype, chunk_plan, fill_phases, grad_x_chunk, kmap_tap_views,
                      memory_format_of, output_size, r_on_grid, to_grid, x_tap_views)

__all__ = ['span_involution']

# matmuls on the grid while its junk columns add at most this fraction of work (see _use_grid)
_GRID_JUNK_RATIO = 0.15


class _SpanMatrices(NamedTuple):
    """The span conv as matrices in the accumulation dtype: weight (G*KK, Cr), bias (G*KK, 1), and r (N, Cr, L)
    on the grid (L = H_out * Wq) or compact (L = H_out * W_out)."""
    weight: torch.Tensor
    bias: torch.Tensor
    r: torch.Tensor


def _flat_view(storage: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return storage[:numel].view(shape)


def _use_grid(geo: Geometry) -> bool:
    """Run the span matmuls on the ``Wq``-wide grid (no crop/expand copies) or on the compact H_out x W_out?

    The grid's junk columns cost ``(Wq - W_out) / W_out`` extra matmul work (K=7: +10% at 56x56, +86% at 7x7);
    a compact matmul costs a copy of the chunk's kernel map (in cache) instead.
    """
    return geo.wq - geo.w_out <= _GRID_JUNK_RATIO * geo.w_out


def _span_matrices(span_weight: torch.Tensor, span_bias: Optional[torch.Tensor], r: torch.Tensor, geo: Geometry,
                   acc: torch.dtype) -> _SpanMatrices:
    weight = span_weight.reshape(span_weight.shape[0], -1).to(acc)  # (G*KK, Cr)
    bias = (span_bias.to(acc) if span_bias is not None
            else span_weight.new_zeros(span_weight.shape[0], dtype=acc)).unsqueeze(1)  # (G*KK, 1)
    r_flat = r_on_grid(r, geo, acc) if _use_grid(geo) else r.to(acc).contiguous().flatten(2)
    return _SpanMatrices(weight, bias, r_flat)


def _kmap_chunk(out: torch.Tensor, span: _SpanMatrices, block: Tuple[int, int, int, int], kk: int) -> None:
    """out (nb, gb*KK, L) <- span bias + span weight rows of groups g0:g1 @ r (nb, Cr, L) of samples n0:n1, for
    ``block`` = (n0, n1, g0, g1)."""
    n0, n1, g0, g1 = block
    nb = n1 - n0
    wc = span.weight[g0 * kk:g1 * kk]  # (gb*KK, Cr)
    bc = span.bias[g0 * kk:g1 * kk]  # (gb*KK, 1)
    torch.baddbmm(bc.unsqueeze(0).expand(nb, -1, out.shape[-1]), wc.unsqueeze(0).expand(nb, -1, -1),
                  span.r[n0:n1], out=out)


def _kmap_chunk_to_grid(kmap_grid: torch.Tensor, kmap_compact: Optional[torch.Tensor], span: _SpanMatrices,
                        block: Tuple[int, int, int, int], geo: Geometry) -> None:
    """kmap_grid (nb, gb, KK, H_out * Wq) <- the chunk's kernel map on the grid (directly, or through the compact
    buffer ``kmap_compact``)."""
    kk = geo.k * geo.k
    if kmap_compact is None:
        _kmap_chunk(kmap_grid.flatten(1, 2), span, block, kk)
    else:
        _kmap_chunk(kmap_compact, span, block, kk)
        to_grid(kmap_grid, kmap_compact.unflatten(1, kmap_grid.shape[1:3]).unflatten(-1, (geo.h_out, geo.w_out)),
                geo)


def _forward_eager(x: torch.Tensor, span: _SpanMatrices, geo: Geometry, g: int) -> torch.Tensor:
    n, c, _, _ = x.shape
    k = geo.k
    cg, kk = c // g, k * k
    acc = accumulation_dtype(x.dtype)
    out = torch.empty((n, c, geo.h_out, geo.w_out), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    xg = x.unflatten(1, (g, cg))
    og = out.unflatten(1, (g, cg))
    grid = _use_grid(geo)
    hw = geo.h_out * geo.w_out
    plan = chunk_plan(n, g, (cg * (geo.phases * geo.flat + geo.length) + kk * geo.length), x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    w_store = torch.empty(nb * gb * kk * geo.length, **opts)  # each chunk's kernel map, contiguous
    t_store = None if grid else torch.empty(nb * gb * kk * hw, **opts)  # compact kernel map
    o_buf = torch.empty((nb, gb, cg, geo.length), **opts)

    def build(a, b):
        kmap_grid = _flat_view(w_store, (a, b, kk, geo.length))
        kmap_compact = None if grid else _flat_view(t_store, (a, b * kk, hw))
        return kmap_grid, kmap_compact, x_tap_views(xq_buf[:a, :b], geo), kmap_tap_views(kmap_grid, True)

    views = ViewCache(build)
    for n0, n1, g0, g1 in plan:
        xq, oq = xq_buf[:n1 - n0, :g1 - g0], o_buf[:n1 - n0, :g1 - g0]
        kmap_grid, kmap_compact, xv, wv = views((n1 - n0, g1 - g0))
        fill_phases(xq, xg[n0:n1, g0:g1], geo)
        _kmap_chunk_to_grid(kmap_grid, kmap_compact, span, (n0, n1, g0, g1), geo)
        torch.mul(xv[0], wv[0], out=oq)
        for t in range(1, kk):
            oq.addcmul_(xv[t], wv[t])
        og[n0:n1, g0:g1].copy_(oq.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out])
    return out


def _backward_eager(x: torch.Tensor, r: torch.Tensor, span: _SpanMatrices, grad_out: torch.Tensor, geo: Geometry,
                    g: int, need: Tuple[bool, bool, bool, bool]):
    """(grad x, grad r, grad span weight (G*KK, Cr), grad span bias (G*KK,)), each None where ``need`` (x, r,
    span weight, span bias) says it is not needed; the span gradients in the accumulation dtype."""
    need_x, need_r, need_w, need_b = need
    n, c, _, _ = x.shape
    k = geo.k
    cg, kk = c // g, k * k
    acc = accumulation_dtype(x.dtype)
    need_kmap_grad = need_r or need_w or need_b
    gx = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else None
    grid = _use_grid(geo)
    hw = geo.h_out * geo.w_out
    grad_r_flat = torch.zeros_like(span.r) if need_r else None  # grad r (on the grid or compact, like span.r)
    grad_span_w = torch.zeros(span.weight.shape, dtype=acc, device=x.device) if need_w else None
    grad_span_b = torch.zeros(span.bias.shape[0], dtype=acc, device=x.device) if need_b else None
    xg = x.unflatten(1, (g, cg))
    gog = grad_out.unflatten(1, (g, cg))
    plan = chunk_plan(n, g, cg * (geo.phases * geo.flat + 2 * geo.length) + kk * geo.length, x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    go_buf = torch.empty((nb, gb, cg, geo.length), **opts)
    # one buffer for the chunk's kernel map, then its grad; one for the grad_x phase planes, then the input's
    w_store = torch.empty(nb * gb * kk * geo.length, **opts)
    gxq_buf = xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    tmp_buf = torch.empty((nb, gb, cg, geo.length), **opts) if need_kmap_grad else None
    t_store = None if grid else torch.empty(nb * gb * kk * hw, **opts)  # compact kernel map / its grad

    def build(a, b):
        kmap_grid = _flat_view(w_store, (a, b, kk, geo.length))
        kmap_compact = None if grid else _flat_view(t_store, (a, b * kk, hw))
        return (kmap_grid, kmap_compact, x_tap_views(xq_buf[:a, :b], geo), kmap_tap_views(kmap_grid, True),
                kmap_tap_views(kmap_grid, False))

    views = ViewCache(build)
    for n0, n1, g0, g1 in plan:
        sl = (slice(None, n1 - n0), slice(None, g1 - g0))
        kmap_grid, kmap_compact, xv, wv, grad_kmap_views = views((n1 - n0, g1 - g0))
        grad_out_grid = to_grid(go_buf[sl], gog[n0:n1, g0:g1], geo)  # junk columns are zero: they scatter nothing
        if need_x:
            _kmap_chunk_to_grid(kmap_grid, kmap_compact, span, (n0, n1, g0, g1), geo)
            grad_x_chunk(gxq_buf[sl], gx.unflatten(1, (g, cg))[n0:n1, g0:g1], xv, wv, grad_out_grid, geo)
        if need_kmap_grad:
            xq, tmp = xq_buf[sl], tmp_buf[sl]
            fill_phases(xq, xg[n0:n1, g0:g1], geo)
            for t in range(kk):
                torch.sum(torch.mul(xv[t], grad_out_grid, out=tmp), dim=2, out=grad_kmap_views[t])
            gk = kmap_grid.flatten(1, 2)  # (nb, gb*KK, L): grad kernel map on the grid, zero in the junk columns
            if not grid:  # compact copy (nb, gb*KK, H_out*W_out)
                kmap_compact.unflatten(-1, (geo.h_out, geo.w_out)).copy_(
                    gk.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out])
                gk = kmap_compact
            rows = slice(g0 * kk, g1 * kk)
            if need_r:
                wc = span.weight[rows].t().unsqueeze(0).expand(n1 - n0, -1, -1)  # (nb, Cr, gb*KK)
                grad_r_flat[n0:n1].baddbmm_(wc, gk)
            if need_w and x.device.type != 'cpu':  # one launch for the whole chunk (= batch on CUDA)
                grad_span_w[rows] += torch.bmm(gk, span.r[n0:n1].transpose(1, 2)).sum(0)
            elif need_w:  # CPU: no (nb, gb*KK, Cr) temporary
                for i in range(n1 - n0):
                    grad_span_w[rows].addmm_(gk[i], span.r[n0 + i].t())
            if need_b:
                grad_span_b[rows] += gk.sum(dim=(0, 2))
    gr = None
    if need_r:
        gr = grad_r_flat.unflatten(-1, (geo.h_out, geo.wq if grid else geo.w_out))[..., :geo.w_out].to(r.dtype)
        gr = gr.contiguous(memory_format=memory_format_of(r))
    return gx, gr, grad_span_w, grad_span_b


class _InvolutionSpanFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, r, span_weight, span_bias, k: int, stride: int, padding: int, dilation: int):
        n, c, h, w = x.shape
        ho, wo = r.shape[-2:]
        g = span_weight.shape[0] // (k * k)
        geo = Geometry(h, w, k, stride, padding, dilation, ho, wo)
        span = _span_matrices(span_weight, span_bias, r, geo, accumulation_dtype(x.dtype))
        ctx.save_for_backward(x, r, span_weight, span_bias)
        ctx.args = (k, stride, padding, dilation, g, span_bias is not None)
        return _forward_eager(x, span, geo, g)

    @staticmethod
    def backward(ctx, grad_out):
        x, r, span_weight, span_bias = ctx.saved_tensors
        k, stride, padding, dilation, g, has_bias = ctx.args
        n, c, h, w = x.shape
        ho, wo = r.shape[-2:]
        geo = Geometry(h, w, k, stride, padding, dilation, ho, wo)
        span = _span_matrices(span_weight, span_bias if has_bias else None, r, geo, accumulation_dtype(x.dtype))
        need = ctx.needs_input_grad
        gx, gr, grad_span_w, grad_span_b = _backward_eager(x, r, span, grad_out, geo, g,
                                                           (need[0], need[1], need[2], need[3] and has_bias))
        gw = grad_span_w.view(span_weight.shape).to(span_weight.dtype) if grad_span_w is not None else None
        gb = grad_span_b.to(span_bias.dtype) if grad_span_b is not None else None
        return gx, gr, gw, gb, None, None, None, None


def _check(x, r, span_weight, span_bias, k, stride, padding, dilation) -> None:
    if x.dim() != 4 or r.dim() != 4:
        raise ValueError(f'involution_fused: x and r must be 4-D, got {tuple(x.shape)} and {tuple(r.shape)}')
    n, c, h, w = x.shape
    if span_weight.dim() not in (2, 4) or span_weight.shape[1] != r.shape[1] or \
            (span_weight.dim() == 4 and span_weight.shape[2:] != (1, 1)):
        raise ValueError(f'involution_fused: span weight must be (K*K*G, Cr[, 1, 1]) with Cr = r channels '
                         f'({r.shape[1]}), got {tuple(span_weight.shape)}')
    kk = k * k
    if span_weight.shape[0] % kk:
        raise ValueError(f'involution_fused: span weight rows ({span_weight.shape[0]}) not a multiple of K*K={kk}')
    g = span_weight.shape[0] // kk
    if c % g:
        raise ValueError(f'involution_fused: channels ({c}) must be divisible by the number of groups ({g})')
    if span_bias is not None and span_bias.shape != (span_weight.shape[0],):
        raise ValueError(f'involution_fused: span bias must be ({span_weight.shape[0]},), got '
                         f'{tuple(span_bias.shape)}')
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError('involution_fused: need stride >= 1, dilation >= 1, padding >= 0')
    expected = (output_size(h, k, stride, padding, dilation), output_size(w, k, stride, padding, dilation))
    if r.shape[0] != n or tuple(r.shape[2:]) != expected:
        raise ValueError(f'involution_fused: r must be (N={n}, Cr, {expected[0]}, {expected[1]}), '
                         f'got {tuple(r.shape)}')
    ts = [x, r, span_weight] + ([span_bias] if span_bias is not None else [])
    if len({t.dtype for t in ts}) != 1 or len({t.device for t in ts}) != 1:
        raise ValueError('involution_fused: x, r, span weight and bias must share dtype and device')


def span_involution(x: torch.Tensor, r: torch.Tensor, span_weight: torch.Tensor, span_bias: Optional[torch.Tensor],
                    k: int, stride: int, padding: int, dilation: int, backend: str) -> torch.Tensor:
    """The eager fused span conv + involution of :func:`rednet.ops.involution_fused` (``backend`` ``'native'`` or
    ``'cpp'``): under autocast the inputs are cast to the autocast dtype first; the arguments are checked."""
    dev = x.device.type
    try:
        amp = torch.is_autocast_enabled(dev) and x.is_floating_point()
    except (RuntimeError, TypeError):
        amp = False
    if amp:
        dt = torch.get_autocast_dtype(dev)
        x, r, span_weight = x.to(dt), r.to(dt), span_weight.to(dt)
        span_bias = span_bias.to(dt) if span_bias is not None else None
    _check(x, r, span_weight, span_bias, k, stride, padding, dilation)
    if backend == 'cpp':
        fn = cpp.span_function(x)
    elif backend == 'native':
        fn = _InvolutionSpanFunction
    else:
        raise ValueError(f"involution_fused: backend must be 'native' or 'cpp', got {backend!r}")
    if amp:  # the matmuls inside run in float32 (half inputs) and must not be re-cast by autocast
        with torch.autocast(dev, enabled=False):
            return fn.apply(x, r, span_weight, span_bias, k, stride, padding, dilation)
    return fn.apply(x, r, span_weight, span_bias, k, stride, padding, dilation)
