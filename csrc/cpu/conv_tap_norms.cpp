// CPU kernels of srd_ext::conv_tap_norms and its backward.
//
// Polyphase layout: the input pixels a tap reaches all lie on one of the sh*sw sub-lattices
// (phases) x[:, :, py::sh, px::sw], and inside its phase image they form a rectangle. For stride 1
// the single phase is x itself; otherwise x is split into its phases once (one copy of x). Work
// items are (sample, phase, block of phase rows); for every tap of the phase, the block's rows
// in the tap's rectangle are a contiguous run of the phase image, so W_t (C_out x C_in/groups,
// per group) multiplies it in place as a strided GEMM operand, with no per-tap gather. Only
// the block's pixels left or right of the tap's rectangle are computed in excess (edge columns);
// the multiply-adds match the conv's, and only one tile of per-tap products is alive per thread.
// Items cover disjoint input pixels, so the backward writes grad_x without races.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"
#include "tap_range.h"

namespace srd_ext {
namespace cpu {
namespace {

// Bytes of phase-image columns (C_in x pixels) per work item: about a quarter of a typical L2,
// so that the GEMM operand stays cached while every tap of the phase reuses it.
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kMinTilePixels = 256, kMaxTilePixels = 4096;

struct TapRect {
  int64_t phase = -1;  // -1: the tap reaches no output
  int64_t y0 = 0, ny = 0, x0 = 0, nx = 0;  // rectangle in phase coordinates
};

struct Phase {
  int64_t py, px, Hp, Wp, block_rows;
  at::Tensor img;  // (B, C_in, Hp, Wp), contiguous
  std::vector<int64_t> taps;
};

struct Item {
  int64_t b, phase, r0, r1;  // phase rows [r0, r1)
};

struct Plan {
  int64_t B, C_in, H, W, C_out, groups, Cg, Cog, T, cap = 0;
  Geometry geo;
  std::vector<TapRect> taps;
  std::vector<Phase> phases;
  std::vector<Item> items;
};

Plan make_plan(const at::Tensor& x, const at::Tensor& weight, const Geometry& geo,
               int64_t groups) {
  Plan P;
  P.B = x.size(0);
  P.C_in = x.size(1);
  P.H = x.size(2);
  P.W = x.size(3);
  P.C_out = weight.size(0);
  P.groups = groups;
  P.Cg = P.C_in / groups;
  P.Cog = P.C_out / groups;
  P.T = geo.kh * geo.kw;
  P.geo = geo;
  const int64_t Ho = geo.out_size(P.H, 0), Wo = geo.out_size(P.W, 1);

  std::vector<int64_t> phase_of(geo.sh * geo.sw, -1);
  P.taps.resize(P.T);
  for (int64_t t = 0; t < P.T; ++t) {
    const TapRange ry = tap_range(P.H, Ho, geo.sh, geo.ph, geo.dh, t / geo.kw);
    const TapRange rx = tap_range(P.W, Wo, geo.sw, geo.pw, geo.dw, t % geo.kw);
    if (ry.count == 0 || rx.count == 0) continue;
    const int64_t py = ry.i0 % geo.sh, px = rx.i0 % geo.sw, key = py * geo.sw + px;
    if (phase_of[key] < 0) {
      phase_of[key] = static_cast<int64_t>(P.phases.size());
      Phase ph;
      ph.py = py;
      ph.px = px;
      ph.Hp = (P.H - py + geo.sh - 1) / geo.sh;
      ph.Wp = (P.W - px + geo.sw - 1) / geo.sw;
      ph.img = (geo.sh == 1 && geo.sw == 1)
                   ? x
                   : x.slice(2, py, P.H, geo.sh).slice(3, px, P.W, geo.sw).contiguous();
      P.phases.push_back(std::move(ph));
    }
    TapRect& r = P.taps[t];
    r.phase = phase_of[key];
    r.y0 = ry.i0 / geo.sh;
    r.ny = ry.count;
    r.x0 = rx.i0 / geo.sw;
    r.nx = rx.count;
    P.phases[r.phase].taps.push_back(t);
  }
  if (P.phases.empty() || P.B == 0) return P;

  const int64_t elem = x.element_size();
  const int64_t tile = std::min(
      kMaxTilePixels, std::max(kMinTilePixels, kTileBytes / (elem * std::max<int64_t>(1, P.C_in))));
  // Enough items to give every thread a couple even when the batch is small.
  const int64_t per_sample = static_cast<int64_t>(P.phases.size());
  const int64_t want = (2 * at::get_num_threads() + P.B * per_sample - 1) / (P.B * per_sample);
  for (auto& ph : P.phases) {
    int64_t rows = std::max<int64_t>(1, tile / ph.Wp);
    rows = std::min(rows, std::max<int64_t>(1, (ph.Hp + want - 1) / want));
    ph.block_rows = rows;
    P.cap = std::max(P.cap, rows * ph.Wp);
  }
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t p = 0; p < per_sample; ++p) {
      const Phase& ph = P.phases[p];
      for (int64_t r0 = 0; r0 < ph.Hp; r0 += ph.block_rows)
        P.items.push_back(Item{b, p, r0, std::min(ph.Hp, r0 + ph.block_rows)});
    }
  return P;
}

// Rows [k0, k1) of tap `r` inside phase rows [r0, r1); empty when k1 <= k0.
inline void tap_rows(const TapRect& r, int64_t r0, int64_t r1, int64_t& k0, int64_t& k1) {
  k0 = std::max(r0, r.y0);
  k1 = std::min(r1, r.y0 + r.ny);
}

// Strided (rows, cols) matrix over raw memory with row stride ld, for the GEMM calls.
template <typename scalar_t>
at::Tensor mat(const scalar_t* data, int64_t rows, int64_t cols, int64_t ld,
               const at::TensorOptions& opt) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {ld, 1}, opt);
}

// (T, C_out, C_in/groups): one contiguous weight matrix per tap (and row block per group).
at::Tensor tap_major_weight(const at::Tensor& weight, const Plan& P) {
  return weight.permute({2, 3, 0, 1}).contiguous().view({P.T, P.C_out, P.Cg});
}

at::Tensor conv_tap_norms_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv_tap_norms";
  const Geometry geo = check_tap_norms_args(op, x_in, weight_in, stride, padding, dilation, groups,
                                            /*allow_half=*/false);
  const auto x = x_in.contiguous();
  const Plan P = make_plan(x, weight_in, geo, groups);
  auto out = at::zeros({P.B, P.T, P.H, P.W}, x.options());
  if (P.items.empty()) return out;
  const auto wt = tap_major_weight(weight_in, P);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* pout = out.data_ptr<scalar_t>();
    const auto opt = x.options();
    const int64_t HW = P.H * P.W, sh = geo.sh, sw = geo.sw;
    at::parallel_for(0, static_cast<int64_t>(P.items.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ybuf(P.Cog * P.cap);
      std::vector<acc_t> acc(P.cap);
      for (int64_t it = begin; it < end; ++it) {
        const Item& item = P.items[it];
        const Phase& ph = P.phases[item.phase];
        const int64_t HWp = ph.Hp * ph.Wp;
        const scalar_t* xb = ph.img.data_ptr<scalar_t>() + item.b * P.C_in * HWp;
        for (const int64_t t : ph.taps) {
          const TapRect& r = P.taps[t];
          int64_t k0, k1;
          tap_rows(r, item.r0, item.r1, k0, k1);
          if (k1 <= k0) continue;
          const int64_t len = (k1 - k0) * ph.Wp;
          std::fill(acc.begin(), acc.begin() + len, acc_t(0));
          auto y = mat(ybuf.data(), P.Cog, len, len, opt);
          for (int64_t g = 0; g < P.groups; ++g) {
            at::mm_out(y, wt[t].narrow(0, g * P.Cog, P.Cog),
                       mat(xb + g * P.Cg * HWp + k0 * ph.Wp, P.Cg, len, HWp, opt));
            for (int64_t o = 0; o < P.Cog; ++o) {
              const scalar_t* yo = ybuf.data() + o * len;
              for (int64_t p = 0; p < len; ++p) {
                const acc_t v = yo[p];
                acc[p] += v * v;
              }
            }
          }
          scalar_t* dst = pout + (item.b * P.T + t) * HW;
          for (int64_t k = k0; k < k1; ++k) {
            const acc_t* a = acc.data() + (k - k0) * ph.Wp;
            scalar_t* row = dst + (k * sh + ph.py) * P.W + ph.px;
            for (int64_t l = r.x0; l < r.x0 + r.nx; ++l)
              row[l * sw] = static_cast<scalar_t>(std::sqrt(a[l]));
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_tap_norms_backward_cpu(
    const at::Tensor& dn_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& n_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv_tap_norms_backward";
  const Geometry geo = check_tap_norms_args(op, x_in, weight_in, stride, padding, dilation, groups,
                                            /*allow_half=*/false);
  const std::vector<int64_t> n_shape{x_in.size(0), geo.kh * geo.kw, x_in.size(2), x_in.size(3)};
  TORCH_CHECK(n_in.sizes() == at::IntArrayRef(n_shape) && dn_in.sizes() == n_in.sizes(),
              "srd_ext::", op, ": tap_norms and grad_tap_norms must be (B, kh*kw, H, W) = (",
              n_shape[0], ", ", n_shape[1], ", ", n_shape[2], ", ", n_shape[3], ") for x ",
              shape_str(x_in), " and weight ", shape_str(weight_in), ", got ", shape_str(n_in),
              " and ", shape_str(dn_in));
  check_same(op, "tap_norms", n_in, x_in, "x");
  check_same(op, "grad_tap_norms", dn_in, x_in, "x");

  const auto x = x_in.contiguous(), dn = dn_in.contiguous(), n = n_in.contiguous();
  const Plan P = make_plan(x, weight_in, geo, groups);
  auto grad_x = at::zeros_like(x);
  const int64_t items = static_cast<int64_t>(P.items.size());
  // grad_weight is reduced per chunk of items into its own partial, summed in a fixed order.
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  auto gw_parts = at::zeros({nchunks, P.T, P.C_out, P.Cg}, x.options());

  if (items > 0 && P.C_in * P.C_out > 0) {
    const auto wt = tap_major_weight(weight_in, P);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_tap_norms_backward_cpu", [&] {
      const scalar_t* pdn = dn.data_ptr<scalar_t>();
      const scalar_t* pn = n.data_ptr<scalar_t>();
      scalar_t* pgx = grad_x.data_ptr<scalar_t>();
      const auto opt = x.options();
      const int64_t HW = P.H * P.W, sh = geo.sh, sw = geo.sw;
      at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
        std::vector<scalar_t> ybuf(P.Cog * P.cap), gxbuf(P.C_in * P.cap), coef(P.cap);
        for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
          auto gw = gw_parts[chunk];
          for (int64_t it = chunk * items / nchunks; it < (chunk + 1) * items / nchunks; ++it) {
            const Item& item = P.items[it];
            const Phase& ph = P.phases[item.phase];
            const int64_t HWp = ph.Hp * ph.Wp, block = (item.r1 - item.r0) * ph.Wp;
            const scalar_t* xb = ph.img.data_ptr<scalar_t>() + item.b * P.C_in * HWp;
            // grad of this block of the phase image, (C_in, block).
            auto gx = mat(gxbuf.data(), P.C_in, block, block, opt);
            bool touched = false;
            for (const int64_t t : ph.taps) {
              const TapRect& r = P.taps[t];
              int64_t k0, k1;
              tap_rows(r, item.r0, item.r1, k0, k1);
              if (k1 <= k0) continue;
              const int64_t len = (k1 - k0) * ph.Wp;
              // dY = Y * dn / n per pixel (0 off the tap's rectangle and where n = 0).
              const scalar_t* dnt = pdn + (item.b * P.T + t) * HW;
              const scalar_t* nt = pn + (item.b * P.T + t) * HW;
              std::fill(coef.begin(), coef.begin() + len, scalar_t(0));
              bool any = false;
              for (int64_t k = k0; k < k1; ++k) {
                const int64_t row = (k * sh + ph.py) * P.W + ph.px;
                scalar_t* c = coef.data() + (k - k0) * ph.Wp;
                for (int64_t l = r.x0; l < r.x0 + r.nx; ++l) {
                  const int64_t i = row + l * sw;
                  c[l] = nt[i] > 0 ? dnt[i] / nt[i] : scalar_t(0);
                  any = any || c[l] != 0;
                }
              }
              if (!any) continue;
              if (!touched) {
                gx.zero_();
                touched = true;
              }
              auto y = mat(ybuf.data(), P.Cog, len, len, opt);
              auto gwt = gw[t];
              for (int64_t g = 0; g < P.groups; ++g) {
                const auto w = wt[t].narrow(0, g * P.Cog, P.Cog);
                const auto xg = mat(xb + g * P.Cg * HWp + k0 * ph.Wp, P.Cg, len, HWp, opt);
                at::mm_out(y, w, xg);
                for (int64_t o = 0; o < P.Cog; ++o) {
                  scalar_t* yo = ybuf.data() + o * len;
                  for (int64_t p = 0; p < len; ++p) yo[p] *= coef[p];
                }
                gx.narrow(0, g * P.Cg, P.Cg)
                    .narrow(1, (k0 - item.r0) * ph.Wp, len)
                    .addmm_(w.t(), y);
                gwt.narrow(0, g * P.Cog, P.Cog).addmm_(y, xg.t());
              }
            }
            if (!touched) continue;
            // Every input pixel belongs to exactly one item, so plain stores suffice.
            for (int64_t c = 0; c < P.C_in; ++c) {
              const scalar_t* src = gxbuf.data() + c * block;
              scalar_t* dst = pgx + (item.b * P.C_in + c) * HW;
              for (int64_t k = item.r0; k < item.r1; ++k) {
                scalar_t* row = dst + (k * sh + ph.py) * P.W + ph.px;
                const scalar_t* s = src + (k - item.r0) * ph.Wp;
                for (int64_t l = 0; l < ph.Wp; ++l) row[l * sw] = s[l];
              }
            }
          }
        }
      });
    });
  }
  auto grad_weight = gw_parts.sum(0)
                         .view({geo.kh, geo.kw, P.C_out, P.Cg})
                         .permute({2, 3, 0, 1})
                         .contiguous();
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace cpu
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CPU, m) {
  m.impl("conv_tap_norms", &srd_ext::cpu::conv_tap_norms_cpu);
  m.impl("conv_tap_norms_backward", &srd_ext::cpu::conv_tap_norms_backward_cpu);
}
