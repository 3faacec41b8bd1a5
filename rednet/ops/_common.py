"""Helpers shared by the involution backends (private): argument geometry, the "not eager" test, and the phase
layout, chunking and tap views that the ``native`` (:mod:`rednet.ops.native`), fused (:mod:`rednet.ops.fused`) and
``cpp`` (:mod:`rednet.ops.cpp`) backends have in common. Imports nothing of the package.

Phase layout (see :mod:`rednet.ops.native`): the zero-padded input is split into its ``stride x stride`` phase
planes, each ``Hq x Wq`` (``Geometry.hq``, ``Geometry.wq``), and the output is computed on a grid of ``Wq``
columns (the ``Wq - W_out`` junk columns are cropped at the end), so every tap is one contiguous 1-D slice.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """Spatial output size of the aggregation (the same formula as a convolution)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def not_eager(compiling: bool = False) -> bool:
    """Whether the involution is being exported to ONNX, traced or scripted by TorchScript (or, with ``compiling``,
    compiled by ``torch.compile``): then the eager kernels are not run and the functional math is recorded."""
    if compiling and torch.compiler.is_compiling():
        return True
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()


# most bytes of buffers a chunk may use (measured sweet spot on a 2-core CPU with 2 MB L2 / 32 MB L3)
CHUNK_BYTES = 16 << 20
MIN_CHUNK_BYTES = 1 << 20
# chunk buffers are capped at this multiple of the input's size (the budget is 2x)
WORKSPACE_RATIO = 1.5


class Geometry:
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


def chunk_plan(n: int, g: int, unit_elems: int, x: torch.Tensor, acc: torch.dtype) \
        -> List[Tuple[int, int, int, int]]:
    """Split the (sample, group) grid into blocks: (n0, n1, g0, g1).

    ``unit_elems`` is the buffer size one (sample, group) unit needs. On the CPU: bigger chunks mean fewer, longer
    kernel calls: fewer Python dispatches and parallel regions (each one a thread barrier, costly when the cores are
    shared), while the chunk still lives in L3. The total is capped at ``WORKSPACE_RATIO`` times the input's
    size and at ``CHUNK_BYTES``, but never below one unit. On other devices (CUDA) the whole (N, G) grid is one
    chunk: the number of kernel launches per call is then K*K plus a few, whatever the batch.
    """
    if x.device.type != 'cpu':  # accelerators: one chunk, so the launches per call do not grow with the batch
        return [(0, n, 0, g)]
    esize = torch.empty((), dtype=acc).element_size()
    budget = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, int(WORKSPACE_RATIO * x.numel() * esize)))
    units = max(1, budget // max(1, unit_elems * esize))
    if units >= g:
        nb = max(1, units // g)
        return [(n0, min(n, n0 + nb), 0, g) for n0 in range(0, n, nb)]
    return [(n0, n0 + 1, g0, min(g, g0 + units)) for n0 in range(n) for g0 in range(0, g, units)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the CPU kernels and the phase layout compute in: float32 for half-precision inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fill_phases(buf: torch.Tensor, x: torch.Tensor, geo: Geometry) -> None:
    """buf (nb, gb, Cg, P, flat) <- phase planes of the zero-padded x (nb, gb, Cg, H, W)."""
    buf.zero_()
    planes = buf[..., :geo.hq * geo.wq].unflatten(-1, (geo.hq, geo.wq))
    for ph, f in enumerate(geo.fill):
        if f is not None:
            planes[:, :, :, ph, f[0], f[2]].copy_(x[..., f[1], f[3]])


def unfill_phases(gx: torch.Tensor, buf: torch.Tensor, geo: Geometry) -> None:
    """gx (nb, gb, Cg, H, W) <- the inside (non-padding) part of the phase planes in buf."""
    planes = buf[..., :geo.hq * geo.wq].unflatten(-1, (geo.hq, geo.wq))
    for ph, f in enumerate(geo.fill):
        if f is not None:
            gx[..., f[1], f[3]].copy_(planes[:, :, :, ph, f[0], f[2]])


def to_grid(buf: torch.Tensor, t: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """buf (..., H_out * Wq) <- t (..., H_out, W_out) with zero junk columns; returns buf."""
    grid = buf.unflatten(-1, (geo.h_out, geo.wq))
    grid[..., geo.w_out:].zero_()
    grid[..., :geo.w_out].copy_(t)
    return buf


def x_tap_views(xq: torch.Tensor, geo: Geometry) -> List[torch.Tensor]:
    """Per tap, the (nb, gb, Cg, L) slice of the phase-plane buffer xq (nb, gb, Cg, P, flat) it reads."""
    nb, gb, cg = xq.shape[:3]
    st, base = xq.stride(), xq.storage_offset()
    size, stride = (nb, gb, cg, geo.length), (st[0], st[1], st[2], 1)
    return [xq.as_strided(size, stride, base + ph * st[3] + off) for ph, off in geo.taps]


def kmap_tap_views(kmap_grid: torch.Tensor, broadcast: bool) -> List[torch.Tensor]:
    """Per tap, the slice of a kernel-map grid buffer kmap_grid (nb, gb, KK, L): (nb, gb, 1, L) or (nb, gb, L)."""
    nb, gb, kk, length = kmap_grid.shape
    st, base = kmap_grid.stride(), kmap_grid.storage_offset()
    if broadcast:
        size, stride = (nb, gb, 1, length), (st[0], st[1], 0, 1)
    else:
        size, stride = (nb, gb, length), (st[0], st[1], 1)
    return [kmap_grid.as_strided(size, stride, base + t * st[2]) for t in range(kk)]


class ViewCache:
    """Tap views of the chunk buffers, built once per chunk shape (all chunks but the last share one)."""

    def __init__(self, build):
        self.build, self.cache = build, {}

    def __call__(self, key):
        if key not in self.cache:
            self.cache[key] = self.build(*key)
        return self.cache[key]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for (strictly) channels_last inputs, so outputs and gradients keep the input's layout."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def grad_x_chunk(gxq: torch.Tensor, gxc: torch.Tensor, xv, wv, grad_out_grid: torch.Tensor, geo: Geometry) -> None:
    """grad_x of one chunk: scatter grad_out x w_t of every tap onto the phase planes ``gxq`` (whose tap
    views are ``xv``), then unpack their inside into ``gxc``."""
    gxq.zero_()
    if not geo.covers_input:
        gxc.zero_()
    for t in range(len(xv)):
        xv[t].addcmul_(grad_out_grid, wv[t])
    unfill_phases(gxc, gxq, geo)


def r_on_grid(r: torch.Tensor, geo: Geometry, acc: torch.dtype) -> torch.Tensor:
    """r (N, Cr, H_out, W_out) -> (N, Cr, H_out * Wq), zero in the junk columns, contiguous, dtype acc."""
    return F.pad(r.to(acc), (0, geo.wq - geo.w_out)).contiguous().flatten(2)
