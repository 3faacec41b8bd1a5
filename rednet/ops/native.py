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

__all__ = ['involution_native', 'involution_functional']

# most bytes of buffers a chunk may use (measured sweet spot on a 2-core CPU with 2 MB L2 / 32 MB L3)
_CHUNK_BYTES = 16 << 20
_MIN_CHUNK_BYTES = 1 << 20
# chunk buffers are capped at this multiple of the input's size (the budget is 2x)
_WORKSPACE_RATIO = 1.5


class _Geometry:
    """Index bookkeeping of the phase layout, shared by forward and backward."""

    def __init__(self, h: int, w: int, k: int, stride: int, padding: int, dilation: int, h_out: int, w_out: int):
        s, d, p = stride, dilation, padding
        self.h, self.w, self.k, self.s, self.p, self.d = h, w, k, s, p, d
        self.h_out, self.w_out = h_out, w_out
        max_shift = ((k - 1) * d) // s
        self.hq = h_out + max_shift  # rows of each phase plane
        self.wq = w_out + max_shift  # columns of each phase plane (= width of the working output grid)
        self.flat = self.hq * self.wq + max_shift  # flat length (+ slack so the last tap's slice stays inside)
        self.length = h_out * self.wq  # flat length of the working output grid
        self.phases = s * s
        # tap t = (a, b): phase plane index and flat offset of its slice
        self.taps: List[Tuple[int, int]] = []
        for a in range(k):
            for b in range(k):
                qa, ra = divmod(a * d, s)
                qb, rb = divmod(b * d, s)
                self.taps.append((ra * s + rb, qa * self.wq + qb))
        # per phase (r, q): (rows of the phase plane, matching rows of x) and the same for columns,
        # as python slices; phase-plane element (u, v) is x_pad[u*s + r, v*s + q] = x[u*s + r - p, v*s + q - p]
        self.fill: List[Optional[Tuple[slice, slice, slice, slice]]] = []
        covered_rows = sum(sp[1] - sp[0] for sp in (self._span(r, h, self.hq) for r in range(s)) if sp)
        covered_cols = sum(sp[1] - sp[0] for sp in (self._span(q, w, self.wq) for q in range(s)) if sp)
        # False when some input rows/columns are never read (e.g. padding 0 with a stride that skips the edge)
        self.covers_input = covered_rows == h and covered_cols == w
        for r in range(s):
            rows = self._span(r, h, self.hq)
            for q in range(s):
                cols = self._span(q, w, self.wq)
                if rows is None or cols is None:
                    self.fill.append(None)
                else:
                    self.fill.append((slice(rows[0], rows[1]), slice(rows[2], rows[3], s),
                                      slice(cols[0], cols[1]), slice(cols[2], cols[3], s)))

    def _span(self, r: int, size: int, n_plane: int):
        s, p = self.s, self.p
        u0 = max(0, -((r - p) // s))  # first u with u*s + r - p >= 0
        u1 = min(n_plane, (size - 1 + p - r) // s + 1)  # one past the last u with u*s + r - p <= size - 1
        if u1 <= u0:
            return None
        return u0, u1, u0 * s + r - p, (u1 - 1) * s + r - p + 1


def _chunks(n: int, g: int, unit_elems: int, x: torch.Tensor, acc: torch.dtype) -> List[Tuple[int, int, int, int]]:
    """Split the (sample, group) grid into blocks: (n0, n1, g0, g1).

    ``unit_elems`` is the buffer size one (sample, group) unit needs. On the CPU: bigger chunks mean fewer, longer kernel
    calls: fewer Python dispatches and parallel regions (each one a thread barrier, costly when the cores are
    shared), while the chunk still lives in L3. The total is capped at ``_WORKSPACE_RATIO`` times the input's
    size and at ``_CHUNK_BYTES``, but never below one unit. On other devices (CUDA) the whole (N, G) grid is one
    chunk: the number of kernel launches per call is then K*K plus a few, whatever the batch.
    """
    if x.device.type != 'cpu':  # accelerators: one chunk, so the launches per call do not grow with the batch
        return [(0, n, 0, g)]
    esize = torch.empty((), dtype=acc).element_size()
    budget = min(_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, int(_WORKSPACE_RATIO * x.numel() * esize)))
    units = max(1, budget // max(1, unit_elems * esize))
    if units >= g:
        nb = max(1, units // g)
        return [(n0, min(n, n0 + nb), 0, g) for n0 in range(0, n, nb)]
    return [(n0, n0 + 1, g0, min(g, g0 + units)) for n0 in range(n) for g0 in range(0, g, units)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fill_phases(buf: torch.Tensor, x: torch.Tensor, geo: _Geometry) -> None:
    """buf (nb, gb, Cg, P, flat) <- phase planes of the zero-padded x (nb, gb, Cg, H, W)."""
    buf.zero_()
    planes = buf[..., :geo.hq * geo.wq].unflatten(-1, (geo.hq, geo.wq))
    for ph, f in enumerate(geo.fill):
        if f is not None:
            planes[:, :, :, ph, f[0], f[2]].copy_(x[..., f[1], f[3]])


def _unfill_phases(gx: torch.Tensor, buf: torch.Tensor, geo: _Geometry) -> None:
    """gx (nb, gb, Cg, H, W) <- the inside (non-padding) part of the phase planes in buf."""
    planes = buf[..., :geo.hq * geo.wq].unflatten(-1, (geo.hq, geo.wq))
    for ph, f in enumerate(geo.fill):
        if f is not None:
            gx[..., f[1], f[3]].copy_(planes[:, :, :, ph, f[0], f[2]])


def _to_grid(buf: torch.Tensor, t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """buf (..., H_out * Wq) <- t (..., H_out, W_out) with zero junk columns; returns buf."""
    grid = buf.unflatten(-1, (geo.h_out, geo.wq))
    grid[..., geo.w_out:].zero_()
    grid[..., :geo.w_out].copy_(t)
    return buf


def _x_tap_views(xq: torch.Tensor, geo: _Geometry) -> List[torch.Tensor]:
    """Per tap, the (nb, gb, Cg, L) slice of the phase-plane buffer xq (nb, gb, Cg, P, flat) it reads."""
    nb, gb, cg = xq.shape[:3]
    st, base = xq.stride(), xq.storage_offset()
    size, stride = (nb, gb, cg, geo.length), (st[0], st[1], st[2], 1)
    return [xq.as_strided(size, stride, base + ph * st[3] + off) for ph, off in geo.taps]


def _w_tap_views(wq: torch.Tensor, broadcast: bool) -> List[torch.Tensor]:
    """Per tap, the slice of a kernel-map grid buffer wq (nb, gb, KK, L): (nb, gb, 1, L) or (nb, gb, L)."""
    nb, gb, kk, length = wq.shape
    st, base = wq.stride(), wq.storage_offset()
    if broadcast:
        size, stride = (nb, gb, 1, length), (st[0], st[1], 0, 1)
    else:
        size, stride = (nb, gb, length), (st[0], st[1], 1)
    return [wq.as_strided(size, stride, base + t * st[2]) for t in range(kk)]


class _ViewCache:
    """Tap views of the chunk buffers, built once per chunk shape (all chunks but the last share one)."""

    def __init__(self, build):
        self.build, self.cache = build, {}

    def __call__(self, key):
        if key not in self.cache:
            self.cache[key] = self.build(*key)
        return self.cache[key]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for (strictly) channels_last inputs, so outputs and gradients keep the input's layout."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _grad_x_chunk(gxq: torch.Tensor, gxc: torch.Tensor, xv, wv, goq: torch.Tensor, geo: _Geometry) -> None:
    """grad_x of one chunk: scatter grad_out x w_t of every tap onto the phase planes ``gxq`` (whose tap
    views are ``xv``), then unpack their inside into ``gxc``."""
    gxq.zero_()
    if not geo.covers_input:
        gxc.zero_()
    for t in range(len(xv)):
        xv[t].addcmul_(goq, wv[t])
    _unfill_phases(gxc, gxq, geo)


def _forward_eager(x: torch.Tensor, weight: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    n, c, _, _ = x.shape
    g, k = weight.shape[1], weight.shape[2]
    cg, kk = c // g, k * k
    acc = _acc_dtype(x.dtype)
    fmt = _memory_format(x)
    out = torch.empty((n, c, geo.h_out, geo.w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    xg = x.unflatten(1, (g, cg))
    og = out.unflatten(1, (g, cg))
    wg = weight.flatten(2, 3)  # (N, G, KK, H_out, W_out)
    plan = _chunks(n, g, (cg * (geo.phases * geo.flat + geo.length) + kk * geo.length), x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    w_buf = torch.empty((nb, gb, kk, geo.length), **opts)
    o_buf = torch.empty((nb, gb, cg, geo.length), **opts)
    views = _ViewCache(lambda a, b: (_x_tap_views(xq_buf[:a, :b], geo), _w_tap_views(w_buf[:a, :b], True)))
    for n0, n1, g0, g1 in plan:
        xq, wq, oq = xq_buf[:n1 - n0, :g1 - g0], w_buf[:n1 - n0, :g1 - g0], o_buf[:n1 - n0, :g1 - g0]
        _fill_phases(xq, xg[n0:n1, g0:g1], geo)
        _to_grid(wq, wg[n0:n1, g0:g1], geo)
        xv, wv = views((n1 - n0, g1 - g0))
        torch.mul(xv[0], wv[0], out=oq)
        for t in range(1, kk):
            oq.addcmul_(xv[t], wv[t])
        og[n0:n1, g0:g1].copy_(oq.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out])
    return out


def _backward_eager(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, geo: _Geometry,
                    need_x: bool, need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    n, c, _, _ = x.shape
    g, k = weight.shape[1], weight.shape[2]
    cg, kk = c // g, k * k
    acc = _acc_dtype(x.dtype)
    fmt = _memory_format(x)
    gx = torch.empty_like(x, memory_format=fmt) if need_x else None
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    xg = x.unflatten(1, (g, cg))
    gog = grad_out.unflatten(1, (g, cg))
    wg = weight.flatten(2, 3)
    # buffers are shared between the two passes: (grad_x phase planes, input phase planes) and
    # (kernel map on the grid, grad kernel map on the grid)
    plan = _chunks(n, g, cg * (geo.phases * geo.flat + 2 * geo.length) + kk * geo.length, x, acc)
    nb, gb = max(b[1] - b[0] for b in plan), max(b[3] - b[2] for b in plan)
    opts = dict(dtype=acc, device=x.device)
    go_buf = torch.empty((nb, gb, cg, geo.length), **opts)
    w_buf = gwq_buf = torch.empty((nb, gb, kk, geo.length), **opts)
    gxq_buf = xq_buf = torch.empty((nb, gb, cg, geo.phases, geo.flat), **opts)
    tmp_buf = torch.empty((nb, gb, cg, geo.length), **opts) if need_w else None
    # phase-plane views serve grad_x (scatter target) and grad_w (input taps); grid views serve the kernel map
    # (broadcast over channels) and the grad kernel map (reduction target)
    views = _ViewCache(lambda a, b: (_x_tap_views(xq_buf[:a, :b], geo), _w_tap_views(w_buf[:a, :b], True),
                                     _w_tap_views(w_buf[:a, :b], False)))
    for n0, n1, g0, g1 in plan:
        sl = (slice(None, n1 - n0), slice(None, g1 - g0))
        xv, wv, gwv = views((n1 - n0, g1 - g0))
        goq = _to_grid(go_buf[sl], gog[n0:n1, g0:g1], geo)  # junk columns are zero: they scatter nothing
        if need_x:
            _to_grid(w_buf[sl], wg[n0:n1, g0:g1], geo)
            _grad_x_chunk(gxq_buf[sl], gx.unflatten(1, (g, cg))[n0:n1, g0:g1], xv, wv, goq, geo)
        if need_w:
            xq, tmp, gwq = xq_buf[sl], tmp_buf[sl], gwq_buf[sl]
            _fill_phases(xq, xg[n0:n1, g0:g1], geo)
            for t in range(kk):
                torch.sum(torch.mul(xv[t], goq, out=tmp), dim=2, out=gwv[t])
            gw[n0:n1, g0:g1].copy_(gwq.unflatten(-1, (geo.h_out, geo.wq))[..., :geo.w_out]
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


def _backward_functional(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, geo: _Geometry,
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
        # interleave the phases back into the padded grid: (.., hq, s, wq, s) -> (.., hq*s, wq*s)
        full = torch.stack(planes, dim=-1).unflatten(-1, (s, s))  # (N, G, Cg, hq, wq, s, s)
        full = full.permute(0, 1, 2, 3, 5, 4, 6).flatten(5, 6).flatten(3, 4)  # (N, G, Cg, hq*s, wq*s)
        hp, wp = full.shape[-2], full.shape[-1]
        if hp < p + h or wp < p + w:  # taps never reach the bottom/right rows: they get zero gradient
            full = F.pad(full, (0, max(0, p + w - wp), 0, max(0, p + h - hp)))
        gx = full[..., p:p + h, p:p + w].flatten(1, 2)
    if need_w:
        xp = F.pad(x, (p, p, p, p)).unflatten(1, (g, cg))
        taps = [(view * go).sum(2) for _, view in _tap_views(xp, k, s, d, geo.h_out, geo.w_out)]
        gw = torch.stack(taps, dim=2).unflatten(2, (k, k))
    return gx, gw


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> _Geometry:
    _, _, h, w = x.shape
    _, _, k, _, ho, wo = weight.shape
    return _Geometry(h, w, k, stride, padding, dilation, ho, wo)


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
        geo = _Geometry(h, w, k, stride, padding, dilation, ho, wo)
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
        geo = _Geometry(h, w, k, stride, padding, dilation, ho, wo)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.compiler.is_compiling():
            gx, gw = _backward_functional(x, weight, grad_out, geo, need_x, need_w)
        else:
            gx, gw = _backward_eager(x, weight, grad_out, geo, need_x, need_w)
        return gx, gw, None, None, None


def involution_native(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                      dilation: int = 1) -> torch.Tensor:
    """Involution with the ``native`` backend (arguments already checked by :func:`rednet.ops.involution`)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return involution_functional(x, weight, stride, padding, dilation)
    return _InvolutionFunction.apply(x, weight, stride, padding, dilation)
