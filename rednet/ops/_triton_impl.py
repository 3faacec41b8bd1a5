"""Triton kernels of the involution (imported lazily by :mod:`rednet.ops.triton_kernels`, needs ``triton``).

Gather form everywhere (every output element is written by exactly one program: no atomics), fp32
accumulation (fp64 for fp64 inputs), arbitrary input strides (channels_last and non-contiguous inputs need no
copy). A program owns one (sample, group), a block of at most ``BLOCK_C`` of the group's channels and a tile of
``BLOCK_P`` pixels; per tap it loads the tile's kernel values once (``BLOCK_P`` numbers) and applies them to the
block's channels, so the input tile stays in L1/L2 across the K*K taps. All programs are on grid axis 0 (up to
2^31 - 1 programs; CUDA caps axes 1 and 2 at 65,535), pixel tiles fastest, so neighbouring programs share halos.

The taps run as runtime loops (``tl.range``) over rows and columns: fully unrolled K=7 taps (49) kept so many
addresses live that the forward and grad-input kernels used 255 registers and spilled at sm_90; with the columns
unrolled they used 146 (BLOCK_P=64) to 240 (BLOCK_P=128) registers, with both loops at runtime 96 to 170 and no
spill (``scripts/check_gpu_kernels.py`` shows each config's registers and spills).

- ``_fwd_kernel``:  out[n, c, i, j]  = sum_t w[n, g, t, i, j] * x[n, c, i*s + a*d - p, j*s + b*d - p]
- ``_bwd_x_kernel``: grad_x[n, c, y, z] = sum over taps whose window hits (y, z) of w * grad_out (gather: for
  tap (a, b) the output pixel is ((y + p - a*d) / s, (z + p - b*d) / s) when both divide exactly)
- ``_bwd_w_kernel``: grad_w[n, g, t, i, j] = sum_{c in g} grad_out[n, c, i, j] * x[n, c, ...]; a program owns all
  the group's channels (looped in blocks of ``BLOCK_C``) so the sum needs no atomics.

``CONFIGS`` are the autotuned (BLOCK_P, num_warps) pairs, keyed on the group width, the output size and the
dtypes; under the interpreter only the first runs.
"""
import triton
import triton.language as tl

# (BLOCK_P, num_warps): the autotune candidates (every one is compiled by scripts/check_gpu_kernels.py)
CONFIGS = ((32, 2), (64, 4), (128, 4), (256, 8))
# channels per program at most (wider groups take several channel blocks)
BLOCK_C_MAX = 16


def block_c(cg: int) -> int:
    """Channels per program (``BLOCK_C``) for groups of ``cg`` channels."""
    return min(triton.next_power_of_2(cg), BLOCK_C_MAX)


def grid(n_groups: int, rows: int, cols: int, channels: int, channels_per_block: int):
    """The launch grid, all programs on axis 0 (2^31 - 1 allowed): (sample, group) x channel blocks x pixel tiles
    of a ``rows x cols`` map."""
    blocks = triton.cdiv(channels, channels_per_block)
    return lambda meta: (n_groups * blocks * triton.cdiv(rows * cols, meta['BLOCK_P']),)


def _prune(configs, named_args, **kwargs):
    """Autotune every config on a GPU; under the interpreter (no timer) run the first."""
    from triton import knobs
    return configs[:1] if knobs.runtime.interpret else configs


def _autotune(fn):
    return triton.autotune(
        configs=[triton.Config({'BLOCK_P': p}, num_warps=w) for p, w in CONFIGS],
        key=['CG', 'HO', 'WO'], prune_configs_by={'early_config_prune': _prune})(fn)


@triton.jit
def _tile(pid, ROWS, COLS, G, CG, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program ``pid``'s (sample, group), its tile of BLOCK_P pixels of a ROWS x COLS map (row, column, mask) and
    its block of the group's channels (indices, mask)."""
    tiles = tl.cdiv(ROWS * COLS, BLOCK_P)
    cblocks = tl.cdiv(CG, BLOCK_C)
    tile = pid % tiles
    rest = pid // tiles
    cb = rest % cblocks
    ng = rest // cblocks
    g = ng % G
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return ng // G, g, p // COLS, p % COLS, p < ROWS * COLS, g * CG + c, c < CG


@triton.jit
def _tap_source(i, j, a, b, H, W, pmask, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr):
    """Input row and column that tap (a, b) of output pixels (i, j) reads, clamped to 0 where outside the image,
    and the mask of the pixels whose read is inside."""
    hi = i * STRIDE + a * DIL - PAD
    wi = j * STRIDE + b * DIL - PAD
    ok = pmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    return tl.where(ok, hi, 0), tl.where(ok, wi, 0), ok


@_autotune
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, out_ptr,
                H, W, HO, WO, G, CG,
                sxn, sxc, sxh, sxw,
                swn, swg, swt, swh, sww,
                son, soc, soh, sow,
                K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n, g, i, j, pmask, ch, cmask = _tile(pid, HO, WO, G, CG, BLOCK_C, BLOCK_P)
    x_base = x_ptr + n * sxn + ch[:, None] * sxc
    w_base = w_ptr + n * swn + g * swg + i * swh + j * sww
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for a in tl.range(K):
        for b in tl.range(K):
            hi, wi, ok = _tap_source(i, j, a, b, H, W, pmask, STRIDE, PAD, DIL)
            wv = tl.load(w_base + (a * K + b) * swt, mask=pmask, other=0.0).to(acc.dtype)
            xv = tl.load(x_base + hi[None, :] * sxh + wi[None, :] * sxw,
                         mask=cmask[:, None] & ok[None, :], other=0.0).to(acc.dtype)
            acc += xv * wv[None, :]
    out_ptrs = out_ptr + n * son + ch[:, None] * soc + i[None, :] * soh + j[None, :] * sow
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])


@_autotune
@triton.jit
def _bwd_x_kernel(go_ptr, w_ptr, gx_ptr,
                  H, W, HO, WO, G, CG,
                  sgn, sgc, sgh, sgw,
                  swn, swg, swt, swh, sww,
                  sxn, sxc, sxh, sxw,
                  K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n, g, y, z, pmask, ch, cmask = _tile(pid, H, W, G, CG, BLOCK_C, BLOCK_P)
    go_base = go_ptr + n * sgn + ch[:, None] * sgc
    w_base = w_ptr + n * swn + g * swg
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for a in tl.range(K):
        hn = y + PAD - a * DIL  # = i * STRIDE for the output row i this tap reads (y, z) into
        hn_pos = tl.where(hn >= 0, hn, 0)
        io = hn_pos // STRIDE
        hok = (hn >= 0) & (hn_pos - io * STRIDE == 0) & (io < HO)
        io = tl.where(hok, io, 0)
        for b in tl.range(K):
            wn = z + PAD - b * DIL
            wn_pos = tl.where(wn >= 0, wn, 0)
            jo = wn_pos // STRIDE
            ok = pmask & hok & (wn >= 0) & (wn_pos - jo * STRIDE == 0) & (jo < WO)
            jo = tl.where(ok, jo, 0)
            wv = tl.load(w_base + (a * K + b) * swt + io * swh + jo * sww, mask=ok, other=0.0).to(acc.dtype)
            gv = tl.load(go_base + io[None, :] * sgh + jo[None, :] * sgw,
                         mask=cmask[:, None] & ok[None, :], other=0.0).to(acc.dtype)
            acc += gv * wv[None, :]
    gx_ptrs = gx_ptr + n * sxn + ch[:, None] * sxc + y[None, :] * sxh + z[None, :] * sxw
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])


@_autotune
@triton.jit
def _bwd_w_kernel(x_ptr, go_ptr, gw_ptr,
                  H, W, HO, WO, G, CG,
                  sxn, sxc, sxh, sxw,
                  sgn, sgc, sgh, sgw,
                  swn, swg, swt, swh, sww,
                  K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    # _tile told that a group has BLOCK_C channels (one channel block per group): this program loops over all the
    # group's CG channels itself
    pid = tl.program_id(0).to(tl.int64)
    n, g, i, j, pmask, ch, cmask = _tile(pid, HO, WO, G, BLOCK_C, BLOCK_C, BLOCK_P)
    gw_base = gw_ptr + n * swn + g * swg + i * swh + j * sww
    for a in tl.range(K):
        for b in tl.range(K):
            hi, wi, ok = _tap_source(i, j, a, b, H, W, pmask, STRIDE, PAD, DIL)
            s = tl.zeros((BLOCK_P,), dtype=ACC)
            for c0 in tl.range(0, CG, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                chm = (c < CG)[:, None]
                cg = (g * CG + c)[:, None]
                gv = tl.load(go_ptr + n * sgn + cg * sgc + i[None, :] * sgh + j[None, :] * sgw,
                             mask=chm & pmask[None, :], other=0.0).to(ACC)
                xv = tl.load(x_ptr + n * sxn + cg * sxc + hi[None, :] * sxh + wi[None, :] * sxw,
                             mask=chm & ok[None, :], other=0.0).to(ACC)
                s += tl.sum(xv * gv, axis=0)
            tl.store(gw_base + (a * K + b) * swt, s.to(gw_ptr.dtype.element_ty), mask=pmask)
