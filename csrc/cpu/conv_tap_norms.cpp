// CPU kernels of srd_ext::conv_tap_norms and its backward. Three forms of evaluation; each call
// takes the cheapest by an estimate of its multiply-adds (choose_form), or the one named in the
// environment variable SRD_EXT_TAP_NORMS_PATH (product | gram | direct; for tests and
// benchmarks).
//
// Product form: n_t(i) = ||W_t x_i||_2 from the products. Polyphase layout: the input pixels a
// tap reaches all lie on one of the sh*sw sub-lattices (phases) x[:, :, py::sh, px::sw], and
// inside its phase they form a rectangle. Work items are runs of pixels of one phase (in
// (b, y, x) order across the batch). Each input pixel is multiplied by the taps of its phase, as
// in the conv itself (only the pairs cut off at the image border are computed in excess).
//
// Float32 without groups, on x86-64 CPUs with AVX2+FMA or AVX-512 (the common case), runs on the
// fused kernel of fused_tap_sums.h: a chunk's pixels are packed into panels, and a register-blocked
// kernel multiplies them by a tap's matrix and squares and sums the products while they are still
// in registers, so no product reaches memory; the work is split evenly over the threads in
// (chunk, tap, panel) units. Elsewhere (float64, groups, other CPUs, or
// SRD_EXT_TAP_NORMS_FUSED=0) the run is gathered pixel-major, (len, C_in), one GEMM against the
// phase's stacked tap matrices ((group, tap, o) rows x C_in/groups) gives the products of every tap
// of the phase, which are reduced to norms at once and dropped; only one tile of inputs and
// products is alive per thread. Those float32 GEMMs run as 1x1 oneDNN convolutions when available
// (about twice as fast as the BLAS sgemm on some CPUs), everything else through at::mm.
//
// Gram form: n_t(i)^2 = <G_t x_i, x_i> per group, with G_t = W_t^T W_t (Cg x Cg), computed in
// double and rounded once. Same layout; the GEMM path stacks the Gram matrices in place of the tap
// matrices and then takes a row-wise dot with the gathered inputs (Cg instead of C_out/groups
// multiply-adds per pixel, tap and input channel); the fused kernel reads only the upper triangle
// of G_t (off-diagonal entries doubled), about Cg^2/2. So the Gram form wins where a group has
// fewer input than output channels (1x1 expansions, the first conv of a VGG stage) and, on the
// fused kernel, also for square layers with enough pixels to pay for G_t. Its backward needs no
// product at all: grad x_i = sum_t c G_t x_i and grad W_t = W_t sum_i c x_i x_i^T with c = dn / n.
// Accuracy: the terms of <G_t x, x> may cancel, so its absolute error is about
// eps ||W_t||^2 ||x_i||^2 (times a slowly growing factor of Cg for the float32 sums), against
// eps ||W_t|| ||x_i|| on the norm for the product form. For a tall W_t (more rows than columns),
// n >= sigma_min(W_t) ||x_i|| and n^2 keeps a relative error of about eps cond(W_t)^2. For a square
// or wide W_t a norm far below ||W_t|| ||x_i|| (x_i close to a direction W_t nearly annihilates)
// can be off by about sqrt(eps) ||W_t|| ||x_i||; a negative rounding of n^2 is clamped to 0. The
// norms only split a conv's bias among the pixels under the kernel (the shares of a pixel still sum
// to one), so such a pair moves a share of about sqrt(eps) of that bias.
//
// Direct form (a handful of input channels per group: an RGB stem, depthwise convs, where a
// GEMM with an inner dimension of 1 to 4 runs far below its peak): the Gram form with plain
// loops, in double; see direct_forward below.
//
// NaN in the inputs gives NaN in the norms (and gradients) of the pixels it reaches.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common.h"
#include "../env.h"
#include "fused_tap_sums.h"

namespace srd_ext {
namespace cpu {
namespace {

// The output holds kh*kw values per input pixel, so with large kernels it is big next to the
// work, and the page faults of its first touch can cost as much as the norms themselves. For
// large outputs, ask for transparent huge pages before that touch (what torch's allocator does
// under THP_MEM_ALLOC_ENABLE=1); the advice is best effort.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t data = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (data + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (data + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// ---------------------------------------------------------------------------------------------
// Choice of the form.

using Form = TapNormsForm;

// Estimated cost of each form for one call, per group, in units of a float32 GEMM multiply-add
// at full speed: `pairs` (pixel, tap) pairs times the form's work per pair, plus, for the Gram
// and direct forms, the Gram matrices (T x C_out/groups x Cg^2 multiply-adds in double). A GEMM
// whose inner dimension (Cg) is short runs below its peak; the direct form runs scalar double
// loops. With these constants the choice was the fastest form, or within the timing noise of it,
// on every ResNet-50, VGG16, ResNeXt-50 and MobileNetV2 layer shape timed with
// benchmarks/bench_ops.py --paths product,gram,direct (CPU, float32, batch 4, 1 and 2 threads).
constexpr double kShortInner = 16;  // inner dimension below which a GEMM slows down in proportion
constexpr double kDirectCost = 4;   // one multiply-add of the direct form
constexpr double kReduceCost = 1;   // one element of the square-sum or the row-wise dot
constexpr double kSetupCost = 3;    // one multiply-add of the Gram matrices (double, batched)
// The fused float32 kernel (fused_tap_sums.h) keeps the products in registers: no reduction pass,
// and its Gram form reads only the upper triangle of G_t. Against its multiply-adds the double
// Gram matrices cost a little more (3.2-3.5 of them on the VGG16 layer shapes).
constexpr double kFusedSetupCost = 3.5;

double form_cost(Form f, double Cg, double Cog, double T, double pairs, bool fused) {
  const double slow = std::max(1.0, kShortInner / std::max(1.0, Cg));
  const double setup = (fused ? kFusedSetupCost : kSetupCost) * T * Cog * Cg * Cg;
  switch (f) {
    case Form::kProduct:
      return fused ? pairs * Cog * Cg * slow : pairs * (Cog * Cg * slow + kReduceCost * Cog);
    case Form::kGram:
      return fused ? pairs * Cg * (Cg + 1) / 2 * slow + setup
                   : pairs * (Cg * Cg * slow + 2 * kReduceCost * Cg) + setup;
    case Form::kDirect:
      return pairs * kDirectCost * Cg * (Cg + 1) / 2 + setup;
  }
  return 0;
}

// The fused kernel takes float32 forward calls without groups, on CPUs where it runs.
fused::Tile fused_tile(const at::Tensor& x, int64_t groups) {
  if (x.scalar_type() != at::kFloat || groups != 1) return fused::Tile{};
  return fused::tile();
}

// `fused`: the forward will run on the fused kernel (see fused_tile).
Form choose_form(const char* op, const at::Tensor& x, const at::Tensor& weight,
                 const ConvGeometry& geo, int64_t groups, bool fused = false) {
  if (const auto forced = forced_tap_norms_form(op, " on the CPU")) return *forced;
  const double Cg = static_cast<double>(weight.size(1));
  const double Cog = static_cast<double>(weight.size(0) / groups);
  const double T = static_cast<double>(geo.taps());
  const double pairs = static_cast<double>(x.size(0)) * static_cast<double>(geo.out_pixels()) * T;
  Form best = Form::kProduct;
  for (Form f : {Form::kGram, Form::kDirect})
    if (form_cost(f, Cg, Cog, T, pairs, fused) < form_cost(best, Cg, Cog, T, pairs, fused))
      best = f;
  return best;
}

// ---------------------------------------------------------------------------------------------
// Product and Gram forms.

// Bytes of gathered inputs, and of tap products, per work item (one item per thread is alive).
constexpr int64_t kTileBytes = 1 << 20;
constexpr int64_t kMinTilePixels = 32, kReuseTilePixels = 256, kMaxTilePixels = 4096;

struct TapRect {
  int64_t phase = -1;                      // -1: the tap reaches no output
  int64_t y0 = 0, ny = 0, x0 = 0, nx = 0;  // rectangle in phase coordinates
};

struct Phase {
  int64_t py, px, Hp, Wp;
  std::vector<int64_t> taps;
  // (groups*ntaps*R, Cg): rows ordered (group, tap of the phase, r). Product form: the tap
  // matrices W_t (R = C_out/groups rows each); Gram form: the Gram matrices G_t (R = Cg).
  // Not built for the fused kernel, which takes `wf`: the same matrices in its packed layout,
  // (ntaps, ceil(R / mr), Cg, mr).
  at::Tensor w, wf;
  int64_t rows = 0;  // rows of `w`
  int64_t row0 = 0;  // first row of `w` in the stacked (all phases) layout
  int64_t M() const { return rows; }
};

struct Chunk {
  int64_t phase, q0, q1;  // phase pixels [q0, q1), flat over (b, yp, xp)
};

struct Plan {
  int64_t B, C_in, H, W, C_out, groups, Cg, Cog, T, R, rows = 0, max_len = 0, max_M = 0;
  ConvGeometry geo;
  Form form;
  bool mkldnn = false;
  fused::Tile tile;  // nonzero: the fused kernel evaluates the chunks
  at::Tensor wt;     // (T, groups, Cog, Cg): the tap-major weight
  std::vector<TapRect> taps;
  std::vector<Phase> phases;
  std::vector<Chunk> chunks;
};

// Bytes of packed inputs per chunk of the fused kernel (they are swept once per row block).
constexpr int64_t kFusedPackBytes = 512 << 10;

// The fused kernel's packed matrices of a phase (groups == 1), (ntaps, nob, Cg, mr) with nob =
// ceil(R / mr), rows past R zero, from src(t, r, c) = src[t * st + r * sr + c * sc]; `upper`
// (Gram form): only the upper triangle, off-diagonal entries doubled. One task per row block: it
// reads those rows of every tap and writes one contiguous block per tap.
at::Tensor pack_fused_weights(const float* src, int64_t st, int64_t sr, int64_t sc,
                              const std::vector<int64_t>& taps, int64_t R, int64_t Cg, int64_t mr,
                              bool upper) {
  const int64_t nt = static_cast<int64_t>(taps.size()), nob = (R + mr - 1) / mr;
  auto wf = at::empty({nt, nob, Cg, mr}, at::TensorOptions().dtype(at::kFloat));
  float* dst = wf.data_ptr<float>();
  at::parallel_for(0, nob, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ob = begin; ob < end; ++ob)
      for (int64_t i = 0; i < mr; ++i) {
        const int64_t r = ob * mr + i;
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t k = 0; k < nt; ++k)
            dst[((k * nob + ob) * Cg + c) * mr + i] =
                r >= R || (upper && c < r)
                    ? 0.0f
                    : (upper && c > r ? 2.0f : 1.0f) * src[taps[k] * st + r * sr + c * sc];
      }
  });
  return wf;
}

Plan make_plan(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& geo,
               int64_t groups, Form form, fused::Tile tile = fused::Tile{}) {
  Plan P;
  P.B = x.size(0);
  P.C_in = x.size(1);
  P.H = x.size(2);
  P.W = x.size(3);
  P.C_out = weight.size(0);
  P.groups = groups;
  P.Cg = P.C_in / groups;
  P.Cog = P.C_out / groups;
  P.T = geo.taps();
  P.geo = geo;
  P.form = form;
  P.R = form == Form::kGram ? P.Cg : P.Cog;
  P.mkldnn =
      x.scalar_type() == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
  P.tile = tile;
  const int64_t sh = geo.y.s, sw = geo.x.s;

  std::vector<int64_t> phase_of(sh * sw, -1);
  P.taps.resize(P.T);
  for (int64_t t = 0; t < P.T; ++t) {
    const TapRun ry = geo.y.run(t / geo.kw()), rx = geo.x.run(t % geo.kw());
    if (ry.count == 0 || rx.count == 0) continue;
    const int64_t py = ry.i0 % sh, px = rx.i0 % sw, key = py * sw + px;
    if (phase_of[key] < 0) {
      phase_of[key] = static_cast<int64_t>(P.phases.size());
      Phase ph;
      ph.py = py;
      ph.px = px;
      ph.Hp = (P.H - py + sh - 1) / sh;
      ph.Wp = (P.W - px + sw - 1) / sw;
      P.phases.push_back(std::move(ph));
    }
    TapRect& r = P.taps[t];
    r.phase = phase_of[key];
    r.y0 = ry.i0 / sh;
    r.ny = ry.count;
    r.x0 = rx.i0 / sw;
    r.nx = rx.count;
    P.phases[r.phase].taps.push_back(t);
  }
  if (P.B == 0 || P.C_in == 0 || P.C_out == 0) P.phases.clear();  // all norms are 0

  const bool fused = P.tile.mr > 0 && !P.phases.empty();
  if (!fused || form == Form::kGram)
    P.wt = weight.permute({2, 3, 0, 1}).contiguous().view({P.T, groups, P.Cog, P.Cg});
  at::Tensor mats = P.wt;  // (T, groups, R, Cg)
  if (form == Form::kGram && !P.phases.empty()) {
    const auto wd = P.wt.to(at::kDouble);  // Gram matrices rounded once, from exact products
    mats = at::matmul(wd.transpose(2, 3), wd).to(x.scalar_type());
  }
  const auto wc = fused && form != Form::kGram ? weight.contiguous() : at::Tensor();
  int64_t total = 0;
  for (auto& ph : P.phases) {
    ph.rows = P.groups * static_cast<int64_t>(ph.taps.size()) * P.R;
    if (!fused) {
      const auto idx = at::tensor(ph.taps, at::TensorOptions().dtype(at::kLong));
      ph.w = mats.index_select(0, idx).transpose(0, 1).contiguous().view({-1, P.Cg});
    } else if (form == Form::kGram) {  // mats (T, 1, Cg, Cg)
      ph.wf = pack_fused_weights(mats.data_ptr<float>(), P.R * P.Cg, P.Cg, 1, ph.taps, P.R, P.Cg,
                                 P.tile.mr, /*upper=*/true);
    } else {  // weight (C_out, Cg, kh, kw)
      ph.wf = pack_fused_weights(wc.data_ptr<float>(), 1, P.Cg * P.T, P.T, ph.taps, P.R, P.Cg,
                                 P.tile.mr, /*upper=*/false);
    }
    ph.row0 = P.rows;
    P.rows += ph.M();
    P.max_M = std::max(P.max_M, ph.M());
    total += P.B * ph.Hp * ph.Wp;
  }
  // Pixels per item: bounded tiles of inputs and products, and a few items per thread; but not
  // so few pixels that re-reading the tap matrices for every item dominates (large C_in*C_out).
  const int64_t elem = x.element_size(), threads = at::get_num_threads();
  for (int64_t p = 0; p < static_cast<int64_t>(P.phases.size()); ++p) {
    const Phase& ph = P.phases[p];
    const int64_t n = P.B * ph.Hp * ph.Wp;
    int64_t tile;
    if (P.tile.nr > 0) {
      // Whole panels, as many in every chunk of the phase as can be, and a bounded pack. The
      // work items are (chunk, tap) pairs, so the threads are balanced even with few chunks.
      const int64_t nr = P.tile.nr, panels = (n + nr - 1) / nr;
      const int64_t most = std::max<int64_t>(1, kFusedPackBytes / (elem * P.C_in * nr));
      const int64_t nchunks = (panels + most - 1) / most;
      tile = (panels + nchunks - 1) / nchunks * nr;
    } else {
      tile = kTileBytes / (elem * std::max(ph.M(), P.C_in));
      tile = std::min(tile, (total + 4 * threads - 1) / (4 * threads));
      tile = std::max(tile, std::min(kReuseTilePixels, (total + threads - 1) / threads));
      tile = std::min(kMaxTilePixels, std::max(kMinTilePixels, tile));
    }
    for (int64_t q0 = 0; q0 < n; q0 += tile) {
      P.chunks.push_back(Chunk{p, q0, std::min(n, q0 + tile)});
      P.max_len = std::max(P.max_len, P.chunks.back().q1 - q0);
    }
  }
  return P;
}

// A run of a chunk's pixels inside one row of x: phase pixels [q, q + n) from phase position
// (yp, xp); the first sits at offset `base` of an (H, W) plane of sample b, the others follow
// with column step sw.
struct Run {
  int64_t b, base, q, n, yp, xp;
};

template <typename F>
void for_row_runs(const Plan& P, const Phase& ph, int64_t q0, int64_t q1, const F& f) {
  const int64_t HWp = ph.Hp * ph.Wp;
  for (int64_t q = q0; q < q1;) {
    const int64_t b = q / HWp, r = q % HWp, yp = r / ph.Wp, xp = r % ph.Wp;
    const int64_t n = std::min(q1 - q, ph.Wp - xp);
    f(Run{b, (yp * P.geo.y.s + ph.py) * P.W + xp * P.geo.x.s + ph.px, q, n, yp, xp});
    q += n;
  }
}

// Channel block of the transposing copies below: each pixel's block fills whole cache lines of
// the pixel-major side while the channel-major side is read or written as kBlock streams.
constexpr int64_t kBlock = 16;

// dst (len, C_in) <- the chunk's pixels of x, pixel-major.
template <typename scalar_t>
void gather_pixels(const Plan& P, const Phase& ph, const Chunk& ch, const scalar_t* x,
                   scalar_t* dst) {
  const int64_t HW = P.H * P.W, sw = P.geo.x.s, C = P.C_in;
  for_row_runs(P, ph, ch.q0, ch.q1, [&](const Run& run) {
    scalar_t* d = dst + (run.q - ch.q0) * C;
    const scalar_t* s = x + run.b * C * HW + run.base;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t cb = std::min(kBlock, C - c0);
      for (int64_t l = 0; l < run.n; ++l)
        for (int64_t c = c0; c < c0 + cb; ++c) d[l * C + c] = s[c * HW + l * sw];
    }
  });
}

// dst (ceil(len / nr), C_in, nr) <- the chunk's pixels of x in panels of nr pixels, channel-major
// inside a panel; the pixels past len are zero.
void pack_panels(const Plan& P, const Phase& ph, const Chunk& ch, const float* x, float* dst) {
  const int64_t HW = P.H * P.W, sw = P.geo.x.s, C = P.C_in, nr = P.tile.nr;
  const int64_t len = ch.q1 - ch.q0, npanels = (len + nr - 1) / nr;
  if (len < npanels * nr) {
    float* last = dst + (npanels - 1) * C * nr;
    std::fill(last, last + C * nr, 0.0f);
  }
  for_row_runs(P, ph, ch.q0, ch.q1, [&](const Run& run) {
    const float* s = x + run.b * C * HW + run.base;
    for (int64_t l0 = 0; l0 < run.n;) {
      // The part of the run inside one panel.
      const int64_t q = run.q - ch.q0 + l0, lane = q % nr, n = std::min(run.n - l0, nr - lane);
      float* d = dst + (q / nr) * C * nr + lane;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t l = 0; l < n; ++l) d[c * nr + l] = s[c * HW + (l0 + l) * sw];
      l0 += n;
    }
  });
}

// The reverse: the chunk's pixels of x <- src (len, C_in). Chunks own disjoint pixels.
template <typename scalar_t>
void scatter_pixels(const Plan& P, const Phase& ph, const Chunk& ch, const scalar_t* src,
                    scalar_t* x) {
  const int64_t HW = P.H * P.W, sw = P.geo.x.s, C = P.C_in;
  for_row_runs(P, ph, ch.q0, ch.q1, [&](const Run& run) {
    const scalar_t* s = src + (run.q - ch.q0) * C;
    scalar_t* d = x + run.b * C * HW + run.base;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t cb = std::min(kBlock, C - c0);
      for (int64_t l = 0; l < run.n; ++l)
        for (int64_t c = c0; c < c0 + cb; ++c) d[c * HW + l * sw] = s[l * C + c];
    }
  });
}

// Calls f(b, k, t, q, i) for every pixel q of the chunk and every tap t of the phase (its k-th,
// k in [k0, k1); default: all) that reaches an output from it; i is the pixel's offset in an
// (H, W) plane of sample b.
template <typename F>
void for_valid_pairs(const Plan& P, const Phase& ph, const Chunk& ch, const F& f, int64_t k0 = 0,
                     int64_t k1 = -1) {
  const int64_t nt = k1 < 0 ? static_cast<int64_t>(ph.taps.size()) : k1, sw = P.geo.x.s;
  for_row_runs(P, ph, ch.q0, ch.q1, [&](const Run& run) {
    for (int64_t k = k0; k < nt; ++k) {
      const int64_t t = ph.taps[k];
      const TapRect& R = P.taps[t];
      if (run.yp < R.y0 || run.yp >= R.y0 + R.ny) continue;
      const int64_t l0 = std::max<int64_t>(0, R.x0 - run.xp);
      const int64_t l1 = std::min(run.n, R.x0 + R.nx - run.xp);
      for (int64_t l = l0; l < l1; ++l) f(run.b, k, t, run.q + l, run.base + l * sw);
    }
  });
}

// (len, K) pixel-major rows times a grouped 1x1 conv weight w (N, K/groups, 1, 1) as a oneDNN
// convolution of the (1, K, 1, len) channels-last view; its output is (len, N) in memory.
at::Tensor mkldnn_rows(const at::Tensor& rows, const at::Tensor& w, int64_t groups) {
  const int64_t len = rows.size(0), K = rows.size(1), N = w.size(0);
  const auto in = rows.view({1, 1, len, K}).permute({0, 3, 1, 2});
  const auto y = at::mkldnn_convolution(in, w, c10::nullopt, {0, 0}, {1, 1}, {1, 1}, groups);
  return y.permute({0, 2, 3, 1}).reshape({len, N}).contiguous();
}

// Y (len, M) = X (len, C_in) times the phase's tap matrices, block-diagonal over groups. The
// at::mm path writes into `ybuf`; the oneDNN path returns its own output.
at::Tensor tap_products(const Plan& P, const Phase& ph, const at::Tensor& X, void* ybuf) {
  const int64_t len = X.size(0), M = ph.M(), Mg = M / P.groups;
  if (P.mkldnn) return mkldnn_rows(X, ph.w.view({M, P.Cg, 1, 1}), P.groups);
  auto Y = at::from_blob(ybuf, {len, M}, X.options());
  for (int64_t g = 0; g < P.groups; ++g) {
    auto yg = Y.narrow(1, g * Mg, Mg);
    at::mm_out(yg, X.narrow(1, g * P.Cg, P.Cg), ph.w.narrow(0, g * Mg, Mg).t());
  }
  return Y;
}

template <typename scalar_t, typename acc_t>
inline acc_t sum_squares(const scalar_t* v, int64_t n) {
  // Independent partial sums let the compiler vectorize without reassociation flags.
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t o = 0;
  for (; o + 8 <= n; o += 8)
    for (int k = 0; k < 8; ++k) s[k] += static_cast<acc_t>(v[o + k]) * static_cast<acc_t>(v[o + k]);
  for (; o < n; ++o) s[0] += static_cast<acc_t>(v[o]) * static_cast<acc_t>(v[o]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t o = 0;
  for (; o + 8 <= n; o += 8)
    for (int k = 0; k < 8; ++k) s[k] += static_cast<acc_t>(a[o + k]) * static_cast<acc_t>(b[o + k]);
  for (; o < n; ++o) s[0] += static_cast<acc_t>(a[o]) * static_cast<acc_t>(b[o]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Square root of a sum of squares or of a Gram form (which may round below 0); NaN stays NaN.
template <typename acc_t>
inline acc_t root(acc_t s) {
  return s < acc_t(0) ? acc_t(0) : std::sqrt(s);
}

// The product and Gram forms by the fused kernel: per chunk, the pixels are packed into panels and
// every tap's sums come out of registers; only (pixel, tap) sums are stored.
void fused_forward(const Plan& P, const at::Tensor& x, at::Tensor& out) {
  const float* px = x.data_ptr<float>();
  float* pout = out.data_ptr<float>();
  const int64_t HW = P.H * P.W, nr = P.tile.nr, K = P.C_in;
  const bool gram = P.form == Form::kGram;
  // The work is (chunk, tap, panel) triples, chunk-major; each thread takes an equal, contiguous
  // share of them, so the threads are balanced however the chunks fall. first[c]: the triples
  // before chunk c.
  const int64_t nchunks = static_cast<int64_t>(P.chunks.size());
  std::vector<int64_t> first(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = P.chunks[c];
    const int64_t nt = static_cast<int64_t>(P.phases[ch.phase].taps.size());
    first[c + 1] = first[c] + nt * ((ch.q1 - ch.q0 + nr - 1) / nr);
  }
  const int64_t units = first[nchunks];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    const int64_t max_panels = (P.max_len + nr - 1) / nr;
    std::vector<float> xbuf(max_panels * nr * K), sbuf(max_panels * nr);
    for (int64_t part = pbegin; part < pend; ++part) {
      const int64_t u1 = (part + 1) * units / parts;
      int64_t u = part * units / parts;
      int64_t c = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
      Chunk packed{-1, 0, 0};
      while (u < u1) {
        const Chunk& ch = P.chunks[c];
        const Phase& ph = P.phases[ch.phase];
        const int64_t npanels = (ch.q1 - ch.q0 + nr - 1) / nr;
        // This chunk's tap k, panels [j0, j1).
        const int64_t k = (u - first[c]) / npanels, j0 = (u - first[c]) % npanels;
        const int64_t j1 = std::min(npanels, j0 + (u1 - u));
        const Chunk sub{ch.phase, ch.q0 + j0 * nr, std::min(ch.q1, ch.q0 + j1 * nr)};
        if (sub.phase != packed.phase || sub.q0 != packed.q0 || sub.q1 != packed.q1) {
          pack_panels(P, ph, sub, px, xbuf.data());
          packed = sub;
        }
        const int64_t per_tap = ph.wf.size(1) * ph.wf.size(2) * ph.wf.size(3);
        fused::tap_sums(P.tile, ph.wf.data_ptr<float>() + k * per_tap, P.R, xbuf.data(), j1 - j0, K,
                        gram, sbuf.data());
        for_valid_pairs(
            P, ph, sub,
            [&](int64_t b, int64_t, int64_t t, int64_t q, int64_t i) {
              pout[(b * P.T + t) * HW + i] = root(sbuf[q - sub.q0]);
            },
            k, k + 1);
        u += j1 - j0;
        if (j1 == npanels && k + 1 == static_cast<int64_t>(ph.taps.size())) ++c;
      }
    }
  });
}

// `tile`: the fused kernel's (fused_tile), or none for the GEMM path.
at::Tensor gemm_forward(const at::Tensor& x_in, const at::Tensor& weight, const ConvGeometry& geo,
                        int64_t groups, Form form, fused::Tile tile) {
  const auto x = x_in.contiguous();
  const Plan P = make_plan(x, weight, geo, groups, form, tile);
  auto out = empty_output({P.B, P.T, P.H, P.W}, x.options()).zero_();
  if (P.chunks.empty()) return out;

  if (P.tile.nr > 0) {
    fused_forward(P, x, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pout = out.data_ptr<scalar_t>();
    const int64_t HW = P.H * P.W;
    const bool gram = P.form == Form::kGram;
    at::parallel_for(0, static_cast<int64_t>(P.chunks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> xbuf(P.max_len * P.C_in), ybuf(P.mkldnn ? 0 : P.max_len * P.max_M);
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& ch = P.chunks[c];
        const Phase& ph = P.phases[ch.phase];
        const int64_t len = ch.q1 - ch.q0, M = ph.M(), Mg = M / P.groups;
        gather_pixels(P, ph, ch, px, xbuf.data());
        const auto Y = tap_products(P, ph, at::from_blob(xbuf.data(), {len, P.C_in}, x.options()),
                                    ybuf.data());
        const scalar_t* py = Y.data_ptr<scalar_t>();
        for_valid_pairs(P, ph, ch, [&](int64_t b, int64_t k, int64_t t, int64_t q, int64_t i) {
          const scalar_t* yq = py + (q - ch.q0) * M + k * P.R;
          acc_t s = 0;
          if (gram) {  // <G_t x, x> per group
            const scalar_t* xq = xbuf.data() + (q - ch.q0) * P.C_in;
            for (int64_t g = 0; g < P.groups; ++g)
              s += dot<scalar_t, acc_t>(yq + g * Mg, xq + g * P.Cg, P.Cg);
          } else {
            for (int64_t g = 0; g < P.groups; ++g)
              s += sum_squares<scalar_t, acc_t>(yq + g * Mg, P.Cog);
          }
          pout[(b * P.T + t) * HW + i] = static_cast<scalar_t>(root(s));
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gemm_backward(const at::Tensor& dn_in, const at::Tensor& x_in,
                                                 const at::Tensor& weight, const at::Tensor& n_in,
                                                 const ConvGeometry& geo, int64_t groups,
                                                 Form form) {
  const auto x = x_in.contiguous(), dn = dn_in.contiguous(), n = n_in.contiguous();
  const Plan P = make_plan(x, weight, geo, groups, form);
  const bool gram = P.form == Form::kGram;
  const auto opt = x.options();
  auto grad_x = at::zeros_like(x);
  auto grad_w = at::zeros({P.T, P.C_out, P.Cg}, opt);  // tap-major
  const int64_t nchunk = static_cast<int64_t>(P.chunks.size());
  // Stacked-layout weight grads (product form: of the tap matrices; Gram form: the matrices
  // M_t = sum_i c x_i x_i^T), one partial per part of the chunk list, summed in a fixed order.
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunk));
  auto gw_parts = at::zeros({nparts, P.rows, P.Cg}, opt);
  // Per phase, its stacked matrices transposed per group as a 1x1 conv weight (groups*Cg, Mg, 1,
  // 1).
  std::vector<at::Tensor> w_back;
  for (const Phase& ph : P.phases)
    w_back.push_back(ph.w.view({P.groups, ph.M() / P.groups, P.Cg})
                         .transpose(1, 2)
                         .contiguous()
                         .view({P.C_in, ph.M() / P.groups, 1, 1}));

  if (nchunk > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_backward_cpu", [&] {
      const scalar_t* px = x.data_ptr<scalar_t>();
      const scalar_t* pdn = dn.data_ptr<scalar_t>();
      const scalar_t* pn = n.data_ptr<scalar_t>();
      scalar_t* pgx = grad_x.data_ptr<scalar_t>();
      const int64_t HW = P.H * P.W;
      at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
        std::vector<scalar_t> xbuf(P.max_len * P.C_in), gxbuf(P.max_len * P.C_in),
            ybuf(P.mkldnn && !gram ? 0 : P.max_len * P.max_M), coef;
        for (int64_t part = pbegin; part < pend; ++part) {
          auto gw = gw_parts[part];
          for (int64_t c = part * nchunk / nparts; c < (part + 1) * nchunk / nparts; ++c) {
            const Chunk& ch = P.chunks[c];
            const Phase& ph = P.phases[ch.phase];
            const int64_t len = ch.q1 - ch.q0, M = ph.M(), Mg = M / P.groups;
            const int64_t nt = static_cast<int64_t>(ph.taps.size());
            // c = dn / n per (pixel, tap); 0 where the pair is invalid or n = 0.
            coef.assign(len * nt, scalar_t(0));
            bool any = false;
            for_valid_pairs(P, ph, ch, [&](int64_t b, int64_t k, int64_t t, int64_t q, int64_t i) {
              const int64_t e = (b * P.T + t) * HW + i;
              const scalar_t v = positive_or_nan(pn[e]) ? pdn[e] / pn[e] : scalar_t(0);
              coef[(q - ch.q0) * nt + k] = v;
              any = any || v != 0;
            });
            if (!any) continue;  // these pixels of grad_x stay zero
            gather_pixels(P, ph, ch, px, xbuf.data());
            const auto X = at::from_blob(xbuf.data(), {len, P.C_in}, opt);
            // dY (len, M). Product form: the products scaled by c; Gram form: c x, once per tap.
            at::Tensor Y;
            if (gram) {
              Y = at::from_blob(ybuf.data(), {len, M}, opt);
              scalar_t* py = ybuf.data();
              for (int64_t q = 0; q < len; ++q)
                for (int64_t g = 0; g < P.groups; ++g)
                  for (int64_t k = 0; k < nt; ++k) {
                    scalar_t* y = py + q * M + g * Mg + k * P.Cg;
                    const scalar_t* xq = xbuf.data() + q * P.C_in + g * P.Cg;
                    const scalar_t s = coef[q * nt + k];
                    for (int64_t o = 0; o < P.Cg; ++o) y[o] = s == 0 ? scalar_t(0) : s * xq[o];
                  }
            } else {
              Y = tap_products(P, ph, X, ybuf.data());
              scalar_t* py = Y.data_ptr<scalar_t>();
              for (int64_t q = 0; q < len; ++q)
                for (int64_t g = 0; g < P.groups; ++g)
                  for (int64_t k = 0; k < nt; ++k) {
                    scalar_t* y = py + q * M + g * Mg + k * P.Cog;
                    const scalar_t s = coef[q * nt + k];
                    if (s == 0)
                      std::fill(y, y + P.Cog, scalar_t(0));  // also where the product is NaN
                    else
                      for (int64_t o = 0; o < P.Cog; ++o) y[o] *= s;
                  }
            }
            // Pixels without a share in the gradient drop out of the weight grad (a NaN
            // there would otherwise reach every weight through 0 * NaN).
            for (int64_t q = 0; q < len; ++q) {
              bool used = false;
              for (int64_t k = 0; k < nt && !used; ++k) used = coef[q * nt + k] != 0;
              if (!used)
                std::fill(xbuf.data() + q * P.C_in, xbuf.data() + (q + 1) * P.C_in, scalar_t(0));
            }
            // grad of X = dY times the stacked matrices (transposed per group); grad of the
            // matrices = dY^T X.
            const scalar_t* pgxr = gxbuf.data();
            at::Tensor GX;
            if (P.mkldnn) {
              GX = mkldnn_rows(Y, w_back[ch.phase], P.groups);
              pgxr = GX.data_ptr<scalar_t>();
            } else {
              GX = at::from_blob(gxbuf.data(), {len, P.C_in}, opt);
              for (int64_t g = 0; g < P.groups; ++g) {
                auto gxg = GX.narrow(1, g * P.Cg, P.Cg);
                at::mm_out(gxg, Y.narrow(1, g * Mg, Mg), ph.w.narrow(0, g * Mg, Mg));
              }
            }
            for (int64_t g = 0; g < P.groups; ++g)
              gw.narrow(0, ph.row0 + g * Mg, Mg)
                  .addmm_(Y.narrow(1, g * Mg, Mg).t(), X.narrow(1, g * P.Cg, P.Cg));
            scatter_pixels(P, ph, ch, pgxr, pgx);
          }
        }
      });
    });
  }

  const auto gw_sum = gw_parts.sum(0);
  for (const Phase& ph : P.phases) {
    // Stacked rows (group, tap, r) back to tap-major (tap, group, r).
    const int64_t nt = static_cast<int64_t>(ph.taps.size());
    const auto idx = at::tensor(ph.taps, at::TensorOptions().dtype(at::kLong));
    auto rows = gw_sum.narrow(0, ph.row0, ph.M()).view({P.groups, nt, P.R, P.Cg}).transpose(0, 1);
    if (gram) rows = at::matmul(P.wt.index_select(0, idx), rows);  // W_t M_t
    grad_w.index_copy_(0, idx, rows.reshape({nt, P.C_out, P.Cg}));
  }
  return {grad_x,
          grad_w.view({geo.kh(), geo.kw(), P.C_out, P.Cg}).permute({2, 3, 0, 1}).contiguous()};
}

// ---------------------------------------------------------------------------------------------
// Direct form, for a handful of input channels per group (an RGB stem, depthwise convs). There a
// product W_t x_i holds many more values than x_i, and a GEMM with so short an inner dimension
// runs far below its peak, so n^2 = sum_g x_g^T (W_tg^T W_tg) x_g is evaluated with plain loops,
// in double: Cg(Cg+1)/2 multiply-adds per group and (pixel, tap) pair and, unlike a float GEMM,
// no loss of relative accuracy when the products nearly cancel.

constexpr int64_t kLanes = 8;

struct DirectGeo {
  int64_t B, C_in, H, W, groups, Cg, Cog, T;
  ConvGeometry geo;
  std::vector<TapRun> ry, rx;  // per tap row ty / column tx
  // Index of input row iy in the lattice of tap row ty, or -1.
  int64_t lattice_row(int64_t ty, int64_t iy) const {
    const TapRun& r = ry[ty];
    if (r.count == 0 || iy < r.i0 || (iy - r.i0) % geo.y.s != 0) return -1;
    const int64_t k = (iy - r.i0) / geo.y.s;
    return k < r.count ? k : -1;
  }
};

DirectGeo make_direct_geo(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& geo,
                          int64_t groups) {
  DirectGeo G{x.size(0),
              x.size(1),
              x.size(2),
              x.size(3),
              groups,
              x.size(1) / groups,
              weight.size(0) / groups,
              geo.taps(),
              geo,
              {},
              {}};
  for (int64_t ty = 0; ty < geo.kh(); ++ty) G.ry.push_back(geo.y.run(ty));
  for (int64_t tx = 0; tx < geo.kw(); ++tx) G.rx.push_back(geo.x.run(tx));
  return G;
}

// (T, groups, Cog, Cg) tap-major weight, in double.
at::Tensor tap_weight_double(const at::Tensor& weight, const DirectGeo& G) {
  return weight.permute({2, 3, 0, 1}).reshape({G.T, G.groups, G.Cog, G.Cg}).to(at::kDouble);
}

// One input row of every channel in double, split by column phase (ix mod sw) so that the
// pixels one tap reaches, ix = i0 + l*sw, are contiguous: row[(c*sw + ix % sw)*Wph + ix / sw].
template <typename scalar_t>
void split_row(const scalar_t* xrow, int64_t C, int64_t HW, int64_t W, int64_t sw, int64_t Wph,
               double* row) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t ph = 0; ph < sw; ++ph) {
      double* dst = row + (c * sw + ph) * Wph;
      const scalar_t* src = xrow + c * HW + ph;
      const int64_t n = (W - ph + sw - 1) / sw;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<double>(src[j * sw]);
    }
}

at::Tensor direct_forward(const at::Tensor& x_in, const at::Tensor& weight, const ConvGeometry& geo,
                          int64_t groups) {
  const auto x = x_in.contiguous();
  const DirectGeo G = make_direct_geo(x, weight, geo, groups);
  if (G.B * G.H * G.W == 0 || G.Cog == 0 || G.Cg == 0)
    return at::zeros({G.B, G.T, G.H, G.W}, x.options());
  // Written once, element by element (zeros included): a separate zero fill of the output
  // would cost about as much as the norms.
  auto out = empty_output({G.B, G.T, G.H, G.W}, x.options());
  // n^2 = sum over channel pairs c <= d of A_cd x_c x_d: the Gram matrix's upper triangle with
  // off-diagonal terms doubled, packed per (tap, group) in the order of the pair loop below.
  const auto w = tap_weight_double(weight, G);
  const auto gram = at::matmul(w.transpose(2, 3), w).contiguous();  // (T, groups, Cg, Cg)
  const int64_t Cg = G.Cg, npair = Cg * (Cg + 1) / 2, HW = G.H * G.W, sw = geo.x.s;
  const int64_t Wph = (G.W + sw - 1) / sw;
  std::vector<double> A(G.T * G.groups * npair);
  {
    const double* pg = gram.data_ptr<double>();
    int64_t k = 0;
    for (int64_t tg = 0; tg < G.T * G.groups; ++tg)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t d = c; d < Cg; ++d) A[k++] = pg[(tg * Cg + c) * Cg + d] * (c == d ? 1 : 2);
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_cpu_direct", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pout = out.data_ptr<scalar_t>();
    at::parallel_for(0, G.B * G.H, 1, [&](int64_t begin, int64_t end) {
      // The product rows are padded so that a block of kLanes may read past a row's end.
      const int64_t K = G.groups * npair, stride_k = sw * Wph;
      std::vector<double> row(G.C_in * stride_k), prod(K * stride_k + kLanes);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / G.H, iy = r % G.H;
        bool used = false;
        for (int64_t ty = 0; ty < geo.kh() && !used; ++ty) used = G.lattice_row(ty, iy) >= 0;
        if (used) {
          // Channel-pair products of the row, shared by every tap that reaches it.
          split_row(px + b * G.C_in * HW + iy * G.W, G.C_in, HW, G.W, sw, Wph, row.data());
          for (int64_t g = 0, k = 0; g < G.groups; ++g)
            for (int64_t c = 0; c < Cg; ++c)
              for (int64_t d = c; d < Cg; ++d, ++k) {
                const double* xc = row.data() + (g * Cg + c) * stride_k;
                const double* xd = row.data() + (g * Cg + d) * stride_k;
                double* p = prod.data() + k * stride_k;
                for (int64_t j = 0; j < stride_k; ++j) p[j] = xc[j] * xd[j];
              }
        }
        for (int64_t ty = 0; ty < geo.kh(); ++ty) {
          const bool row_used = G.lattice_row(ty, iy) >= 0;
          for (int64_t tx = 0; tx < geo.kw(); ++tx) {
            const TapRun& rx = G.rx[tx];
            const int64_t t = ty * geo.kw() + tx, off = (rx.i0 % sw) * Wph + rx.i0 / sw;
            scalar_t* orow = pout + ((b * G.T + t) * G.H + iy) * G.W;
            std::fill(orow, orow + G.W, scalar_t(0));
            if (!row_used || rx.count == 0) continue;
            const double* a = A.data() + t * K;
            scalar_t* o = orow + rx.i0;
            // Blocks of kLanes pixels accumulate in registers over all channel pairs.
            for (int64_t l0 = 0; l0 < rx.count; l0 += kLanes) {
              double acc[kLanes] = {};
              for (int64_t k = 0; k < K; ++k) {
                const double ak = a[k];
                const double* p = prod.data() + k * stride_k + off + l0;
                for (int64_t j = 0; j < kLanes; ++j) acc[j] += ak * p[j];
              }
              const int64_t nb = std::min(kLanes, rx.count - l0);
              for (int64_t j = 0; j < nb; ++j)
                o[(l0 + j) * sw] = static_cast<scalar_t>(root(acc[j]));
            }
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> direct_backward(const at::Tensor& dn_in, const at::Tensor& x_in,
                                                   const at::Tensor& weight, const at::Tensor& n_in,
                                                   const ConvGeometry& geo, int64_t groups) {
  const auto x = x_in.contiguous(), dn = dn_in.contiguous(), n = n_in.contiguous();
  const DirectGeo G = make_direct_geo(x, weight, geo, groups);
  auto grad_x = at::zeros_like(x);
  const auto w = tap_weight_double(weight, G);
  const int64_t Cg = G.Cg, HW = G.H * G.W, sw = geo.x.s, rows = G.B * G.H;
  const int64_t Wph = (G.W + sw - 1) / sw, msize = G.T * G.groups * Cg * Cg;
  // Per input row, grad_x += c * G_t x with c = dn/n; per tap, M_t += c * x x^T, and in the end
  // grad_W_t = W_t M_t. Rows are owned by one task each; M is reduced per part in a fixed order.
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<double> m_parts(nparts * msize, 0.0);
  if (rows > 0 && G.Cog > 0 && Cg > 0) {
    const auto gram = at::matmul(w.transpose(2, 3), w).contiguous();  // (T, groups, Cg, Cg)
    const double* pg = gram.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_backward_cpu_direct", [&] {
      const scalar_t* px = x.data_ptr<scalar_t>();
      const scalar_t* pdn = dn.data_ptr<scalar_t>();
      const scalar_t* pn = n.data_ptr<scalar_t>();
      scalar_t* pgx = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
        std::vector<double> row(G.C_in * sw * Wph), grow(G.C_in * sw * Wph), coef(Wph), cx(Wph);
        for (int64_t part = pbegin; part < pend; ++part) {
          double* m = m_parts.data() + part * msize;
          for (int64_t r = part * rows / nparts; r < (part + 1) * rows / nparts; ++r) {
            const int64_t b = r / G.H, iy = r % G.H;
            bool loaded = false;
            for (int64_t ty = 0; ty < geo.kh(); ++ty) {
              if (G.lattice_row(ty, iy) < 0) continue;
              for (int64_t tx = 0; tx < geo.kw(); ++tx) {
                const TapRun& rx = G.rx[tx];
                const int64_t t = ty * geo.kw() + tx;
                const int64_t e0 = (b * G.T + t) * HW + iy * G.W + rx.i0;
                bool any = false;
                for (int64_t l = 0; l < rx.count; ++l) {
                  const scalar_t nv = pn[e0 + l * sw];
                  coef[l] = positive_or_nan(nv) ? static_cast<double>(pdn[e0 + l * sw]) / nv : 0.0;
                  any = any || coef[l] != 0;
                }
                if (!any) continue;
                if (!loaded) {
                  split_row(px + b * G.C_in * HW + iy * G.W, G.C_in, HW, G.W, sw, Wph, row.data());
                  std::fill(grow.begin(), grow.end(), 0.0);
                  loaded = true;
                }
                const int64_t off = (rx.i0 % sw) * Wph + rx.i0 / sw;
                for (int64_t g = 0; g < G.groups; ++g) {
                  const double* gm = pg + (t * G.groups + g) * Cg * Cg;
                  double* mt = m + (t * G.groups + g) * Cg * Cg;
                  for (int64_t d = 0; d < Cg; ++d) {
                    // cx = c * x_d on the tap's pixels; feeds both grad_x and M_t.
                    const double* xd = row.data() + (g * Cg + d) * sw * Wph + off;
                    for (int64_t l = 0; l < rx.count; ++l) cx[l] = coef[l] * xd[l];
                    for (int64_t c = 0; c < Cg; ++c) {
                      const double* xc = row.data() + (g * Cg + c) * sw * Wph + off;
                      double* gxc = grow.data() + (g * Cg + c) * sw * Wph + off;
                      const double a = gm[c * Cg + d];
                      double acc = 0;
                      for (int64_t l = 0; l < rx.count; ++l) {
                        gxc[l] += a * cx[l];
                        acc += cx[l] * xc[l];
                      }
                      mt[c * Cg + d] += acc;
                    }
                  }
                }
              }
            }
            if (!loaded) continue;
            for (int64_t c = 0; c < G.C_in; ++c)
              for (int64_t ph = 0; ph < sw; ++ph) {
                const double* src = grow.data() + (c * sw + ph) * Wph;
                scalar_t* dst = pgx + (b * G.C_in + c) * HW + iy * G.W + ph;
                for (int64_t j = 0; j < (G.W - ph + sw - 1) / sw; ++j)
                  dst[j * sw] = static_cast<scalar_t>(src[j]);
              }
          }
        }
      });
    });
  }
  auto msum = at::zeros({G.T, G.groups, Cg, Cg}, at::TensorOptions().dtype(at::kDouble));
  double* ps = msum.data_ptr<double>();
  for (int64_t part = 0; part < nparts; ++part)
    for (int64_t k = 0; k < msize; ++k) ps[k] += m_parts[part * msize + k];
  // (T, groups, Cog, Cg) -> (C_out, Cg, kh, kw)
  const auto gw = at::matmul(w, msum)
                      .view({geo.kh(), geo.kw(), G.groups * G.Cog, Cg})
                      .permute({2, 3, 0, 1})
                      .to(x.scalar_type())
                      .contiguous();
  return {grad_x, gw};
}

at::Tensor conv_tap_norms_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const NestedCallGuard nested;
  const char* op = "conv_tap_norms";
  const ConvGeometry geo = check_tap_norms_args(op, x, weight, stride, padding, dilation, groups,
                                                /*allow_half=*/false);
  const fused::Tile tile = fused_tile(x, groups);
  const Form form = choose_form(op, x, weight, geo, groups, tile.mr > 0);
  return form == Form::kDirect ? direct_forward(x, weight, geo, groups)
                               : gemm_forward(x, weight, geo, groups, form, tile);
}

std::tuple<at::Tensor, at::Tensor> conv_tap_norms_backward_cpu(
    const at::Tensor& dn, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& n,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const NestedCallGuard nested;
  const char* op = "conv_tap_norms_backward";
  const ConvGeometry geo = check_tap_norms_backward_args(op, dn, x, weight, n, stride, padding,
                                                         dilation, groups, /*allow_half=*/false);
  const Form form = choose_form(op, x, weight, geo, groups);
  return form == Form::kDirect ? direct_backward(dn, x, weight, n, geo, groups)
                               : gemm_backward(dn, x, weight, n, geo, groups, form);
}

}  // namespace
}  // namespace cpu
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CPU, m) {
  m.impl("conv_tap_norms", &srd_ext::cpu::conv_tap_norms_cpu);
  m.impl("conv_tap_norms_backward", &srd_ext::cpu::conv_tap_norms_backward_cpu);
}
