// Involution on the CPU: forward, grad-input and grad-weight kernels (backend "cpp", rednet/ops/cpp.py).
//
// out[n, g*Cg + c, i, j] = sum_t w[n, g, t, i, j] * x_pad[n, g*Cg + c, i*s + a*d, j*s + b*d],  t = a*K + b
//
// One task per (sample, group), run in parallel with at::parallel_for. A task lays its data out on the "phase
// grid" of rednet/ops/native.py: the s*s stride phases of the zero-padded input are plain Hq x Wq images, and
// the output, grad_out and the kernel maps are put on rows of the same width Wq (the Wq - W_out extra columns
// are zero / discarded). Then tap t of output position q (= i*Wq + j) reads phase plane ph_t at q + off_t,
// whatever the stride or dilation, and all three kernels are one primitive, a sum of products of shifted
// contiguous rows, out[q] = sum_k a_k[q] * b_k[q], computed a vector of positions at a time with the
// accumulator in registers across the K*K taps (or the channels): each value is loaded once per vector
// instead of once per tap pass as the native backend's PyTorch ops must.
//   forward: out_c[q]  = sum_t x_c[ph_t][q + off_t] * w_t[q]
//   grad_w:  gw_t[q]   = sum_c x_c[ph_t][q + off_t] * go_c[q]
//   grad_x:  gx_c[ph][u] = sum_{t in phase ph} go_c[u - off_t] * w_t[u - off_t]   (gather form: no atomics,
//            no scatter; go and w carry a zero margin in front so that u - off_t never leaves the buffer)
// The span_* entry points fuse the span conv in: each task computes its kernel map w = bias + W_span @ r on the
// grid in cache (BLAS) instead of reading it, and its backward turns the grad kernel map into the grads of r,
// W_span and the bias.
// Inputs: contiguous x (N, C, H, W), w (N, G, K*K, Ho, Wo), grad_out (N, C, Ho, Wo); float32 or float64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Geometry {
  int64_t h, w, ho, wo, k, s, p, d;
  int64_t hq, wq, flat, phases, len, lenv, margin, padded;
  std::vector<int64_t> tap_ph, tap_off;  // per tap: phase plane and flat offset of its row segment

  // vec: elements per vector; loops run over whole vectors (no scalar tails), so the lengths they cover are
  // rounded up to it and every buffer they read has the slack for that
  Geometry(int64_t h_, int64_t w_, int64_t ho_, int64_t wo_, int64_t k_, int64_t s_, int64_t p_, int64_t d_,
           int64_t vec)
      : h(h_), w(w_), ho(ho_), wo(wo_), k(k_), s(s_), p(p_), d(d_) {
    const int64_t max_shift = ((k - 1) * d) / s;
    auto round_up = [vec](int64_t v) { return (v + vec - 1) / vec * vec; };
    hq = ho + max_shift;
    wq = wo + max_shift;
    phases = s * s;
    len = ho * wq;                   // the output grid
    lenv = round_up(len);            // ... as computed, in whole vectors (the extra positions are discarded)
    margin = max_shift * wq + max_shift;  // largest tap offset: zero margin in front of grid rows (grad_x)
    flat = round_up(std::max(hq * wq + max_shift, margin + lenv));  // a phase plane and the slack its taps read
    padded = margin + flat;          // a grid row with its margin, long enough for every grad_x read
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = 0; b < k; ++b) {
        const int64_t qa = (a * d) / s, ra = (a * d) % s, qb = (b * d) / s, rb = (b * d) % s;
        tap_ph.push_back(ra * s + rb);
        tap_off.push_back(qa * wq + qb);
      }
    }
  }
};

// one 512-bit vector (GCC/Clang vector extension: a zmm register, or two ymm / four xmm where that is all the
// machine has), loaded and stored unaligned
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t size = 64 / static_cast<int64_t>(sizeof(T));
  static type load(const T* p) { type v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
  static void store(T* p, const type& v) { __builtin_memcpy(p, &v, sizeof(v)); }
};

// out[i][q .. q + B*V) = sum_k a[i*m + k][q ..] * b[k][q ..] for the C outputs i, which share the b rows: each
// b vector is loaded once for C outputs, and the C*B accumulators are independent, so consecutive FMAs do not
// wait on each other's result (one accumulator would run at the FMA latency, not at its throughput)
template <typename T, int C, int B>
inline void sum_products_block(T* const* out, const T* const* a, const T* const* b, int64_t m, int64_t q) {
  using V = Vec<T>;
  typename V::type acc[C][B] = {};
  for (int64_t k = 0; k < m; ++k) {
    typename V::type bv[B];
    for (int u = 0; u < B; ++u) bv[u] = V::load(b[k] + q + u * V::size);
    for (int i = 0; i < C; ++i) {
      const T* ai = a[i * m + k] + q;
      for (int u = 0; u < B; ++u) acc[i][u] += V::load(ai + u * V::size) * bv[u];
    }
  }
  for (int i = 0; i < C; ++i)
    for (int u = 0; u < B; ++u) V::store(out[i] + q + u * V::size, acc[i][u]);
}

template <typename T, int C>
inline void sum_products_rows(T* const* out, const T* const* a, const T* const* b, int64_t m, int64_t n) {
  constexpr int B = C == 1 ? 4 : 2;
  const int64_t step = B * Vec<T>::size;
  int64_t q = 0;
  for (; q + step <= n; q += step) sum_products_block<T, C, B>(out, a, b, m, q);
  for (; q < n; q += Vec<T>::size) sum_products_block<T, C, 1>(out, a, b, m, q);
}

// out[i][q] = sum_k a[i*m + k][q] * b[k][q] for the c outputs i < c, q in [0, n), n a multiple of the vector size
template <typename T>
void sum_products(T* const* out, const T* const* a, const T* const* b, int64_t c, int64_t m, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= c; i += 4) sum_products_rows<T, 4>(out + i, a + i * m, b, m, n);
  for (; i < c; ++i) sum_products_rows<T, 1>(out + i, a + i * m, b, m, n);
}

// columns v of a phase plane with input column z = v*s + q - p inside [0, W): [v0, v1)
inline void col_span(int64_t q, const int64_t s, const int64_t p, const int64_t w, const int64_t wq, int64_t& v0,
                     int64_t& v1) {
  v0 = std::max<int64_t>(0, (p - q + s - 1) / s);
  v1 = std::min<int64_t>(wq, (w - 1 + p - q) / s + 1);
}

// Copy between image channels (Cg, H, W) and the phase planes (Cg, P, flat) of their zero padding. ToPhases:
// planes <- image (padding and slack zero); else image <- the planes' inside (pixels no tap reads get 0).
template <bool ToPhases, typename PlaneT, typename ImageT>
void copy_phases(PlaneT* __restrict__ buf, ImageT* __restrict__ image, int64_t cg, const Geometry& g) {
  if constexpr (ToPhases) std::fill(buf, buf + cg * g.phases * g.flat, PlaneT(0));
  else std::fill(image, image + cg * g.h * g.w, ImageT(0));
  for (int64_t r = 0; r < g.s; ++r) {
    for (int64_t q = 0; q < g.s; ++q) {
      int64_t v0, v1;
      col_span(q, g.s, g.p, g.w, g.wq, v0, v1);
      if (v1 <= v0) continue;
      for (int64_t c = 0; c < cg; ++c) {
        PlaneT* plane = buf + (c * g.phases + r * g.s + q) * g.flat;
        for (int64_t u = 0; u < g.hq; ++u) {
          const int64_t y = u * g.s + r - g.p;
          if (y < 0 || y >= g.h) continue;
          ImageT* row = image + (c * g.h + y) * g.w + (v0 * g.s + q - g.p);
          PlaneT* prow = plane + u * g.wq;
          for (int64_t v = v0; v < v1; ++v) {
            if constexpr (ToPhases) prow[v] = row[(v - v0) * g.s];
            else row[(v - v0) * g.s] = prow[v];
          }
        }
      }
    }
  }
}

template <typename T>
void fill_phases(T* buf, const T* x, int64_t cg, const Geometry& g) { copy_phases<true>(buf, x, cg, g); }

template <typename T>
void unfill_phases(T* gx, const T* buf, int64_t cg, const Geometry& g) { copy_phases<false>(buf, gx, cg, g); }

// rows (m, padded) <- maps (m, Ho, Wo) on the grid, at offset margin, zero elsewhere
template <typename T>
void to_grid(T* __restrict__ rows, const T* __restrict__ maps, int64_t m, const Geometry& g) {
  std::fill(rows, rows + m * g.padded, T(0));
  for (int64_t k = 0; k < m; ++k)
    for (int64_t i = 0; i < g.ho; ++i)
      std::copy(maps + (k * g.ho + i) * g.wo, maps + (k * g.ho + i + 1) * g.wo,
                rows + k * g.padded + g.margin + i * g.wq);
}

// maps (Ho, Wo) <- one grid row (Ho * Wq)
template <typename T>
void from_grid(T* __restrict__ map, const T* __restrict__ grid, const Geometry& g) {
  for (int64_t i = 0; i < g.ho; ++i) std::copy(grid + i * g.wq, grid + i * g.wq + g.wo, map + i * g.wo);
}

// per-thread scratch of a task
template <typename T>
struct Buffer {  // scratch memory from PyTorch's allocator (so that memory profilers count it), zero-filled
  at::Tensor t;
  void resize(int64_t n, const at::TensorOptions& opts) { t = at::zeros({n}, opts); }
  T* data() { return t.data_ptr<T>(); }
};

template <typename T>
struct Scratch {
  Buffer<T> xq, wg, gg, row, gk;
  std::vector<const T*> a, b;
  std::vector<T*> o;
};

// out (Cg, Ho, Wo) = sum_t x_c[ph_t][q + off_t] * w_t[q], from the input's phase planes (sc.xq) and the kernel
// map on the grid (sc.wg)
template <typename T>
void aggregate(T* out, Scratch<T>& sc, int64_t cg, int64_t kk, const Geometry& g) {
  for (int64_t t = 0; t < kk; ++t) sc.b[t] = sc.wg.data() + t * g.padded + g.margin;
  for (int64_t c = 0; c < cg; ++c) {
    sc.o[c] = sc.row.data() + c * g.lenv;
    for (int64_t t = 0; t < kk; ++t)
      sc.a[c * kk + t] = sc.xq.data() + (c * g.phases + g.tap_ph[t]) * g.flat + g.tap_off[t];
  }
  sum_products(sc.o.data(), sc.a.data(), sc.b.data(), cg, kk, g.lenv);
  for (int64_t c = 0; c < cg; ++c) from_grid(out + c * g.ho * g.wo, sc.o[c], g);
}

template <typename T>
void forward_task(const T* x, const T* w, T* out, Scratch<T>& sc, int64_t cg, int64_t kk, const Geometry& g) {
  fill_phases(sc.xq.data(), x, cg, g);
  to_grid(sc.wg.data(), w, kk, g);
  aggregate(out, sc, cg, kk, g);
}

// tap t's grad kernel map on the grid, row t of rows (row stride ld): sum_c x_c[ph_t][q + off_t] * go_c[q]
// (needs the input's phase planes in sc.xq and grad_out on the grid in sc.gg)
template <typename T>
void grad_kernel_map(T* rows, int64_t ld, Scratch<T>& sc, int64_t cg, int64_t kk, const Geometry& g) {
  for (int64_t c = 0; c < cg; ++c) sc.b[c] = sc.gg.data() + c * g.padded + g.margin;
  for (int64_t t = 0; t < kk; ++t) {
    sc.o[t] = rows + t * ld;
    for (int64_t c = 0; c < cg; ++c)
      sc.a[t * cg + c] = sc.xq.data() + (c * g.phases + g.tap_ph[t]) * g.flat + g.tap_off[t];
  }
  sum_products(sc.o.data(), sc.a.data(), sc.b.data(), kk, cg, g.lenv);
}

// grad x (Cg, H, W), gathered from grad_out (sc.gg) and the kernel map (sc.wg), both on the grid with zero
// margins; sc.xq holds the grad's phase planes
template <typename T>
void grad_input(T* gx, Scratch<T>& sc, int64_t cg, int64_t kk, const Geometry& g) {
  T* gxq = sc.xq.data();
  for (int64_t ph = 0; ph < g.phases; ++ph) {
    int64_t m = 0;  // the taps that read phase plane ph
    for (int64_t t = 0; t < kk; ++t)
      if (g.tap_ph[t] == ph) sc.b[m++] = sc.wg.data() + t * g.padded + g.margin - g.tap_off[t];
    for (int64_t c = 0; c < cg; ++c) {
      sc.o[c] = gxq + (c * g.phases + ph) * g.flat;
      if (m == 0) std::fill(sc.o[c], sc.o[c] + g.flat, T(0));
      for (int64_t t = 0, j = 0; t < kk; ++t)
        if (g.tap_ph[t] == ph) sc.a[c * m + j++] = sc.gg.data() + c * g.padded + g.margin - g.tap_off[t];
    }
    if (m > 0) sum_products(sc.o.data(), sc.a.data(), sc.b.data(), cg, m, g.flat);
  }
  unfill_phases(gx, gxq, cg, g);
}

template <typename T>
void backward_task(const T* x, const T* w, const T* go, T* gx, T* gw, Scratch<T>& sc, int64_t cg, int64_t kk,
                   const Geometry& g) {
  to_grid(sc.gg.data(), go, cg, g);
  if (gx) {
    to_grid(sc.wg.data(), w, kk, g);
    grad_input(gx, sc, cg, kk, g);
  }
  if (gw) {
    fill_phases(sc.xq.data(), x, cg, g);
    grad_kernel_map(sc.gk.data(), g.lenv, sc, cg, kk, g);
    for (int64_t t = 0; t < kk; ++t) from_grid(gw + t * g.ho * g.wo, sc.gk.data() + t * g.lenv, g);
  }
}

// --- span conv fused in: the task's kernel map w_t = span_bias + span_weight @ r is computed in its scratch and
// never stored; r (N, Cr, L) is given on the grid (zero in the junk columns, where w is the bias alone,
// which grad_out's zero junk columns cancel in every product)

struct Span {
  at::Tensor r;     // (N, Cr, L)
  at::Tensor ws;    // (G * KK, Cr)
  at::Tensor bias;  // (G * KK, 1)
};

// a (rows, cols) matrix view of scratch memory with row stride ld
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols, int64_t ld, const at::Tensor& like) {
  return at::from_blob(data, {rows, cols}, {ld, 1}, like.options());
}

// the task's kernel map on the grid rows of sc.wg (BLAS, single-threaded inside the parallel region)
template <typename T>
void span_kernel_map(Scratch<T>& sc, const Span& sp, int64_t ni, int64_t gi, int64_t kk, const Geometry& g) {
  auto rows = matrix(sc.wg.data() + g.margin, kk, g.lenv, g.padded, sp.r);
  at::addmm_out(rows, sp.bias.narrow(0, gi * kk, kk), sp.ws.narrow(0, gi * kk, kk), sp.r[ni]);
}

template <typename T>
void fused_forward_task(const T* x, const Span& sp, T* out, Scratch<T>& sc, int64_t ni, int64_t gi, int64_t cg,
                        int64_t kk, const Geometry& g) {
  fill_phases(sc.xq.data(), x, cg, g);
  span_kernel_map(sc, sp, ni, gi, kk, g);
  aggregate(out, sc, cg, kk, g);
}

// backward of one sample, all groups (grad_r of the sample sums over its groups, so one task owns it):
// gx (C, H, W), gr (Cr, L) (accumulated), gws (G*KK, Cr) and gb (G*KK) of this sample; undefined = not needed
template <typename T>
void fused_backward_sample(const T* x, const Span& sp, const T* go, T* gx, at::Tensor gr, at::Tensor gws,
                           at::Tensor gb, Scratch<T>& sc, int64_t ni, int64_t groups, int64_t cg, int64_t kk,
                           const Geometry& g) {
  const bool kmap_grad = gr.defined() || gws.defined() || gb.defined();
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t ch = gi * cg;
    span_kernel_map(sc, sp, ni, gi, kk, g);
    to_grid(sc.gg.data(), go + ch * g.ho * g.wo, cg, g);
    if (gx) grad_input(gx + ch * g.h * g.w, sc, cg, kk, g);
    if (!kmap_grad) continue;
    fill_phases(sc.xq.data(), x + ch * g.h * g.w, cg, g);
    grad_kernel_map(sc.gk.data(), g.lenv, sc, cg, kk, g);  // zero in the junk columns (grad_out is)
    auto gk = matrix(sc.gk.data(), kk, g.lenv, g.lenv, sp.r);
    if (gr.defined()) gr.addmm_(sp.ws.narrow(0, gi * kk, kk).t(), gk);
    if (gws.defined()) {
      auto rows = gws.narrow(0, gi * kk, kk);
      at::mm_out(rows, gk, sp.r[ni].t());
    }
    if (gb.defined()) {
      auto rows = gb.narrow(0, gi * kk, kk);
      at::sum_out(rows, gk, {1});
    }
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "involution cpp: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "involution cpp: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, "involution cpp: ", name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "involution cpp: ", name, " must be float32 or float64");
}

int64_t vec_size(const torch::Tensor& t) { return 64 / static_cast<int64_t>(t.element_size()); }

template <typename T>
Scratch<T> make_scratch(int64_t cg, int64_t kk, const Geometry& g, const at::TensorOptions& opts) {
  Scratch<T> sc;  // zero-filled: the kernel map rows' margins must stay zero (span_kernel_map writes inside only)
  sc.xq.resize(cg * g.phases * g.flat, opts);
  sc.wg.resize(kk * g.padded, opts);
  sc.gg.resize(cg * g.padded, opts);
  sc.row.resize(cg * g.lenv, opts);
  sc.gk.resize(kk * g.lenv, opts);
  sc.a.resize(cg * kk);
  sc.b.resize(std::max(cg, kk));
  sc.o.resize(std::max(cg, kk));
  return sc;
}

// Run fn(n, grp, scratch) for every (sample, group) in parallel, each thread with private scratch buffers.
template <typename T, typename F>
void for_each_task(int64_t n, int64_t groups, int64_t cg, int64_t kk, const Geometry& g,
                   const at::TensorOptions& opts, const F& fn) {
  at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc = make_scratch<T>(cg, kk, g, opts);
    for (int64_t task = begin; task < end; ++task) fn(task / groups, task % groups, sc);
  });
}

}  // namespace

// x (N, C, H, W), w (N, G, K, K, Ho, Wo) -> out (N, C, Ho, Wo)
torch::Tensor involution_forward(torch::Tensor x, torch::Tensor w, int64_t stride, int64_t padding,
                                 int64_t dilation) {
  check(x, "x", 4);
  check(w, "weight", 6);
  const int64_t n = x.size(0), c = x.size(1), groups = w.size(1), k = w.size(2), cg = c / groups;
  Geometry g(x.size(2), x.size(3), w.size(4), w.size(5), k, stride, padding, dilation, vec_size(x));
  auto out = torch::empty({n, c, g.ho, g.wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto opts = x.options();
    for_each_task<scalar_t>(n, groups, cg, k * k, g, opts, [&](int64_t ni, int64_t gi, Scratch<scalar_t>& sc) {
      const int64_t ch = ni * c + gi * cg;
      forward_task(xp + ch * g.h * g.w, wp + (ni * groups + gi) * k * k * g.ho * g.wo, op + ch * g.ho * g.wo, sc,
                   cg, k * k, g);
    });
  });
  return out;
}

// -> (grad_x or an empty tensor, grad_w or an empty tensor)
std::vector<torch::Tensor> involution_backward(torch::Tensor x, torch::Tensor w, torch::Tensor grad_out,
                                               int64_t stride, int64_t padding, int64_t dilation, bool need_x,
                                               bool need_w) {
  check(x, "x", 4);
  check(w, "weight", 6);
  check(grad_out, "grad_out", 4);
  const int64_t n = x.size(0), c = x.size(1), groups = w.size(1), k = w.size(2), cg = c / groups;
  Geometry g(x.size(2), x.size(3), w.size(4), w.size(5), k, stride, padding, dilation, vec_size(x));
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto gw = need_w ? torch::empty_like(w) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = need_w ? gw.data_ptr<scalar_t>() : nullptr;
    const auto opts = x.options();
    for_each_task<scalar_t>(n, groups, cg, k * k, g, opts, [&](int64_t ni, int64_t gi, Scratch<scalar_t>& sc) {
      const int64_t ch = ni * c + gi * cg, wofs = (ni * groups + gi) * k * k * g.ho * g.wo;
      backward_task(xp + ch * g.h * g.w, wp + wofs, gop + ch * g.ho * g.wo, need_x ? gxp + ch * g.h * g.w : nullptr,
                    need_w ? gwp + wofs : nullptr, sc, cg, k * k, g);
    });
  });
  return {gx, gw};
}

// span conv fused in: x (N, C, H, W), r (N, Cr, L) on the grid (zero in the junk columns and beyond Ho * Wq;
// L = Ho * Wq rounded up to whole 64-byte vectors), span weight (G * K * K, Cr), span bias (G * K * K)
// -> out (N, C, Ho, Wo)
torch::Tensor involution_span_forward(torch::Tensor x, torch::Tensor r, torch::Tensor ws, torch::Tensor bias,
                                      int64_t k, int64_t ho, int64_t wo, int64_t stride, int64_t padding,
                                      int64_t dilation) {
  check(x, "x", 4);
  check(r, "r", 3);
  check(ws, "span weight", 2);
  check(bias, "span bias", 1);
  const int64_t n = x.size(0), c = x.size(1), kk = k * k, groups = ws.size(0) / kk, cg = c / groups;
  Geometry g(x.size(2), x.size(3), ho, wo, k, stride, padding, dilation, vec_size(x));
  TORCH_CHECK(r.size(2) == g.lenv && ws.size(1) == r.size(1), "involution cpp: r / span weight shapes");
  auto out = torch::empty({n, c, g.ho, g.wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_span_forward", [&] {
    const Span sp{r, ws, bias.unsqueeze(1)};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto opts = x.options();
    for_each_task<scalar_t>(n, groups, cg, kk, g, opts, [&](int64_t ni, int64_t gi, Scratch<scalar_t>& sc) {
      const int64_t ch = ni * c + gi * cg;
      fused_forward_task(xp + ch * g.h * g.w, sp, op + ch * g.ho * g.wo, sc, ni, gi, cg, kk, g);
    });
  });
  return out;
}

// -> grad x (N, C, H, W), grad r (N, Cr, L) on the grid, per-sample grad span weight (N, G*KK, Cr) and
// bias (N, G*KK) (to be summed over N); empty tensors for the ones not needed
std::vector<torch::Tensor> involution_span_backward(torch::Tensor x, torch::Tensor r, torch::Tensor ws,
                                                    torch::Tensor bias, torch::Tensor grad_out, int64_t k,
                                                    int64_t stride, int64_t padding, int64_t dilation, bool need_x,
                                                    bool need_r, bool need_w, bool need_b) {
  check(x, "x", 4);
  check(r, "r", 3);
  check(ws, "span weight", 2);
  check(bias, "span bias", 1);
  check(grad_out, "grad_out", 4);
  const int64_t n = x.size(0), c = x.size(1), kk = k * k, groups = ws.size(0) / kk, cg = c / groups;
  Geometry g(x.size(2), x.size(3), grad_out.size(2), grad_out.size(3), k, stride, padding, dilation, vec_size(x));
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto gr = need_r ? torch::zeros_like(r) : torch::Tensor();
  auto gws = need_w ? torch::empty({n, ws.size(0), ws.size(1)}, ws.options()) : torch::Tensor();
  auto gb = need_b ? torch::empty({n, ws.size(0)}, ws.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_span_backward", [&] {
    const Span sp{r, ws, bias.unsqueeze(1)};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> sc = make_scratch<scalar_t>(cg, kk, g, x.options());
      for (int64_t ni = begin; ni < end; ++ni) {
        fused_backward_sample(xp + ni * c * g.h * g.w, sp, gop + ni * c * g.ho * g.wo,
                              need_x ? gx.data_ptr<scalar_t>() + ni * c * g.h * g.w : nullptr,
                              need_r ? gr[ni] : at::Tensor(), need_w ? gws[ni] : at::Tensor(),
                              need_b ? gb[ni] : at::Tensor(), sc, ni, groups, cg, kk, g);
      }
    });
  });
  return {gx, gr, gws, gb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &involution_forward, "involution forward (CPU)");
  m.def("backward", &involution_backward, "involution backward (CPU)");
  m.def("span_forward", &involution_span_forward, "involution with the span conv fused in, forward (CPU)");
  m.def("span_backward", &involution_span_backward, "involution with the span conv fused in, backward (CPU)");
}
