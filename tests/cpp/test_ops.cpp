// Tests of the srd_ext CPU kernels, called through the dispatcher and compared with direct loops
// written from the op specification, with finite differences, and with invariants of the ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "conv_geometry.h"
#include "cpu/fused_tap_sums.h"

#ifdef SRD_CATCH2_V3
#include <catch2/catch_test_macros.hpp>
#else
#include <catch2/catch.hpp>
#endif

#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::IntArrayRef;
using at::Tensor;
using Opt = c10::optional<Tensor>;
using T2 = std::tuple<Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

T2 activation_share(const Tensor& a, const Tensor& g, const Tensor& z, const Opt& e) {
  static auto h =
      op<T2(const Tensor&, const Tensor&, const Tensor&, const Opt&)>("srd_ext::activation_share");
  return h.call(a, g, z, e);
}
T4 activation_share_backward(const Tensor& dR, const Tensor& dg, const Tensor& a, const Tensor& g,
                             const Tensor& z, const Tensor& R) {
  static auto h = op<T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&)>("srd_ext::activation_share_backward");
  return h.call(dR, dg, a, g, z, R);
}

// Conv geometry of a test case.
struct Geo {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  std::vector<int64_t> stride() const { return {sh, sw}; }
  std::vector<int64_t> padding() const { return {ph, pw}; }
  std::vector<int64_t> dilation() const { return {dh, dw}; }
  std::vector<int64_t> kernel() const { return {kh, kw}; }
  int64_t T() const { return kh * kw; }
  int64_t Ho(int64_t H) const { return (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
  int64_t Wo(int64_t W) const { return (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
  // Input pixel of output (oy, ox) under tap t; false when outside the input.
  bool in_pixel(int64_t oy, int64_t ox, int64_t t, int64_t H, int64_t W, int64_t& iy,
                int64_t& ix) const {
    iy = oy * sh - ph + (t / kw) * dh;
    ix = ox * sw - pw + (t % kw) * dw;
    return iy >= 0 && iy < H && ix >= 0 && ix < W;
  }
};

Tensor conv_tap_norms(const Tensor& x, const Tensor& w, const Geo& g, int64_t groups) {
  static auto h =
      op<Tensor(const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, int64_t)>(
          "srd_ext::conv_tap_norms");
  return h.call(x, w, g.stride(), g.padding(), g.dilation(), groups);
}
T2 conv_tap_norms_backward(const Tensor& dn, const Tensor& x, const Tensor& w, const Tensor& n,
                           const Geo& g, int64_t groups) {
  static auto h = op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, IntArrayRef,
                        IntArrayRef, IntArrayRef, int64_t)>("srd_ext::conv_tap_norms_backward");
  return h.call(dn, x, w, n, g.stride(), g.padding(), g.dilation(), groups);
}
Tensor bias_share_scatter(const Tensor& n, const Tensor& d, const Geo& g) {
  static auto h =
      op<Tensor(const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef)>(
          "srd_ext::bias_share_scatter");
  return h.call(n, d, g.kernel(), g.stride(), g.padding(), g.dilation());
}
T2 bias_share_scatter_backward(const Tensor& dR, const Tensor& n, const Tensor& d, const Geo& g) {
  static auto h = op<T2(const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef,
                        IntArrayRef, IntArrayRef)>("srd_ext::bias_share_scatter_backward");
  return h.call(dR, n, d, g.kernel(), g.stride(), g.padding(), g.dilation());
}
T2 pfv_decompose(const Tensor& x, const Tensor& w, const Opt& bias, const Tensor& pos, const Geo& g,
                 const std::string& mode) {
  static auto h = op<T2(const Tensor&, const Tensor&, const Opt&, const Tensor&, IntArrayRef,
                        IntArrayRef, IntArrayRef, c10::string_view)>("srd_ext::pfv_decompose");
  return h.call(x, w, bias, pos, g.stride(), g.padding(), g.dilation(), mode);
}

const auto kD = at::TensorOptions().dtype(at::kDouble);

Tensor randn(at::IntArrayRef shape, at::ScalarType dt = at::kDouble) {
  return at::randn(shape, at::TensorOptions().dtype(dt));
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// |a - b| <= atol + rtol * |b| elementwise, with the worst difference reported on failure.
void check_close(const Tensor& a, const Tensor& b, double rtol = 1e-10, double atol = 1e-10) {
  REQUIRE(a.sizes() == b.sizes());
  const auto da = a.to(at::kDouble), db = b.to(at::kDouble);
  INFO("max |a - b| = " << max_abs_diff(a, b));
  CHECK(at::allclose(da, db, rtol, atol));
}

bool all_finite(const Tensor& t) { return t.numel() == 0 || at::isfinite(t).all().item<bool>(); }

// Central differences of f with respect to up to `points` evenly spread elements of `x`
// (modified in place, restored), compared with the same elements of `analytic`.
void check_numeric_grad(const Tensor& analytic, const std::function<double()>& f, Tensor& x,
                        double rtol, double atol, int64_t points = 48, double eps = 1e-6) {
  REQUIRE(analytic.sizes() == x.sizes());
  auto flat = x.view(-1);
  const auto an = analytic.reshape(-1);
  const int64_t N = flat.numel(), step = std::max<int64_t>(1, N / points);
  for (int64_t k = 0; k < N; k += step) {
    const double v = flat[k].item<double>();
    flat[k] = v + eps;
    const double fp = f();
    flat[k] = v - eps;
    const double fm = f();
    flat[k] = v;
    const double num = (fp - fm) / (2 * eps), ana = an[k].item<double>();
    INFO("element " << k << ": analytic " << ana << ", numeric " << num);
    CHECK(std::abs(ana - num) <= atol + rtol * std::abs(num));
  }
}

double sum_product(const Tensor& a, const Tensor& b) { return (a * b).sum().item<double>(); }

// Message of the c10::Error thrown by f ("" when nothing is thrown).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

bool throws(const std::function<void()>& f) { return !error_of(f).empty(); }

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// Reference implementations (direct loops from the specification, double).

T2 ref_activation_share(const Tensor& a, const Tensor& g, const Tensor& z, const Opt& e) {
  // (B, C, P) views; R is (B, P).
  const int64_t B = a.size(0), C = a.size(1), P = a.numel() / std::max<int64_t>(1, B * C);
  auto a3 = a.reshape({B, C, P}), g3 = g.reshape({B, C, P}), z3 = z.reshape({B, C, P});
  auto R = at::zeros({B, P}, kD), out = at::zeros({B, C, P}, kD);
  auto ea = e.has_value() ? e->reshape({B, P}) : Tensor();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      double r = ea.defined() ? ea[b][p].item<double>() : 0.0, n2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        r += a3[b][c][p].item<double>() * g3[b][c][p].item<double>();
        n2 += std::pow(z3[b][c][p].item<double>(), 2);
      }
      R[b][p] = r;
      for (int64_t c = 0; c < C; ++c)
        out[b][c][p] = n2 > 0 ? z3[b][c][p].item<double>() * r / n2 : 0.0;
    }
  std::vector<int64_t> rs{B};
  if (a.dim() == 4) {
    rs.push_back(a.size(2));
    rs.push_back(a.size(3));
  }
  return {R.view(rs), out.view(a.sizes())};
}

Tensor ref_tap_norms(const Tensor& x, const Tensor& w, const Geo& g, int64_t groups) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), Co = w.size(0), Cg = w.size(1);
  const int64_t Cog = Co / groups;
  auto n = at::zeros({B, g.T(), H, W}, kD);
  auto xa = x.accessor<double, 4>(), wa = w.accessor<double, 4>();
  auto na = n.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < g.T(); ++t)
      for (int64_t oy = 0; oy < g.Ho(H); ++oy)
        for (int64_t ox = 0; ox < g.Wo(W); ++ox) {
          int64_t iy, ix;
          if (!g.in_pixel(oy, ox, t, H, W, iy, ix)) continue;
          double s2 = 0;
          for (int64_t o = 0; o < Co; ++o) {
            const int64_t grp = o / Cog;
            double y = 0;
            for (int64_t c = 0; c < Cg; ++c)
              y += wa[o][c][t / g.kw][t % g.kw] * xa[b][grp * Cg + c][iy][ix];
            s2 += y * y;
          }
          na[b][t][iy][ix] = std::sqrt(s2);
        }
  return n;
}

T2 ref_tap_norms_backward(const Tensor& dn, const Tensor& x, const Tensor& w, const Tensor& n,
                          const Geo& g, int64_t groups) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), Co = w.size(0), Cg = w.size(1);
  const int64_t Cog = Co / groups;
  auto gx = at::zeros_like(x), gw = at::zeros_like(w);
  auto xa = x.accessor<double, 4>(), wa = w.accessor<double, 4>();
  auto na = n.accessor<double, 4>(), dna = dn.accessor<double, 4>();
  auto gxa = gx.accessor<double, 4>(), gwa = gw.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < g.T(); ++t)
      for (int64_t oy = 0; oy < g.Ho(H); ++oy)
        for (int64_t ox = 0; ox < g.Wo(W); ++ox) {
          int64_t iy, ix;
          if (!g.in_pixel(oy, ox, t, H, W, iy, ix) || !(na[b][t][iy][ix] > 0)) continue;
          const int64_t ty = t / g.kw, tx = t % g.kw;
          for (int64_t o = 0; o < Co; ++o) {
            const int64_t grp = o / Cog;
            double y = 0;
            for (int64_t c = 0; c < Cg; ++c) y += wa[o][c][ty][tx] * xa[b][grp * Cg + c][iy][ix];
            const double dy = dna[b][t][iy][ix] * y / na[b][t][iy][ix];
            for (int64_t c = 0; c < Cg; ++c) {
              gxa[b][grp * Cg + c][iy][ix] += wa[o][c][ty][tx] * dy;
              gwa[o][c][ty][tx] += dy * xa[b][grp * Cg + c][iy][ix];
            }
          }
        }
  return {gx, gw};
}

// S (B, Ho, Wo) of bias_share_scatter.
Tensor ref_S(const Tensor& n, const Geo& g) {
  const int64_t B = n.size(0), H = n.size(2), W = n.size(3);
  auto S = at::zeros({B, g.Ho(H), g.Wo(W)}, kD);
  auto na = n.accessor<double, 4>();
  auto Sa = S.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t oy = 0; oy < g.Ho(H); ++oy)
      for (int64_t ox = 0; ox < g.Wo(W); ++ox)
        for (int64_t t = 0; t < g.T(); ++t) {
          int64_t iy, ix;
          if (g.in_pixel(oy, ox, t, H, W, iy, ix)) Sa[b][oy][ox] += na[b][t][iy][ix];
        }
  return S;
}

Tensor ref_bias_share_scatter(const Tensor& n, const Tensor& d, const Geo& g) {
  const int64_t B = n.size(0), H = n.size(2), W = n.size(3);
  auto S = ref_S(n, g);
  auto R = at::zeros({B, H, W}, kD);
  auto na = n.accessor<double, 4>();
  auto Sa = S.accessor<double, 3>(), da = d.accessor<double, 3>();
  auto Ra = R.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t oy = 0; oy < g.Ho(H); ++oy)
      for (int64_t ox = 0; ox < g.Wo(W); ++ox) {
        if (!(Sa[b][oy][ox] > 0)) continue;
        const double c = da[b][oy][ox] / Sa[b][oy][ox];
        for (int64_t t = 0; t < g.T(); ++t) {
          int64_t iy, ix;
          if (g.in_pixel(oy, ox, t, H, W, iy, ix)) Ra[b][iy][ix] += na[b][t][iy][ix] * c;
        }
      }
  return R;
}

T2 ref_bias_share_scatter_backward(const Tensor& dR, const Tensor& n, const Tensor& d,
                                   const Geo& g) {
  const int64_t B = n.size(0), H = n.size(2), W = n.size(3);
  auto S = ref_S(n, g);
  auto gn = at::zeros_like(n), gd = at::zeros_like(d);
  auto na = n.accessor<double, 4>(), gna = gn.accessor<double, 4>();
  auto Sa = S.accessor<double, 3>(), da = d.accessor<double, 3>(), gda = gd.accessor<double, 3>();
  auto dRa = dR.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t oy = 0; oy < g.Ho(H); ++oy)
      for (int64_t ox = 0; ox < g.Wo(W); ++ox) {
        const double S_j = Sa[b][oy][ox];
        if (!(S_j > 0)) continue;
        double u = 0;
        for (int64_t t = 0; t < g.T(); ++t) {
          int64_t iy, ix;
          if (g.in_pixel(oy, ox, t, H, W, iy, ix)) u += na[b][t][iy][ix] * dRa[b][iy][ix];
        }
        gda[b][oy][ox] = u / S_j;
        for (int64_t t = 0; t < g.T(); ++t) {
          int64_t iy, ix;
          if (g.in_pixel(oy, ox, t, H, W, iy, ix))
            gna[b][t][iy][ix] = (dRa[b][iy][ix] - u / S_j) * da[b][oy][ox] / S_j;
        }
      }
  return {gn, gd};
}

T2 ref_pfv_decompose(const Tensor& x, const Tensor& w, const Opt& bias, const Tensor& pos,
                     const Geo& g, const std::string& mode) {
  const int64_t H = x.size(2), W = x.size(3), Ci = x.size(1), Co = w.size(0), N = pos.size(0);
  auto v = at::zeros({N, g.T(), Co}, kD), mu = at::zeros({N, g.T()}, kD);
  auto xa = x.accessor<double, 4>(), wa = w.accessor<double, 4>();
  auto pa = pos.accessor<int64_t, 2>();
  for (int64_t r = 0; r < N; ++r) {
    const int64_t b = pa[r][0], oy = pa[r][1], ox = pa[r][2];
    std::vector<std::vector<double>> Y(g.T(), std::vector<double>(Co, 0.0));
    std::vector<double> nt(g.T(), 0.0), z(Co, 0.0);
    double S = 0;
    for (int64_t t = 0; t < g.T(); ++t) {
      int64_t iy, ix;
      if (!g.in_pixel(oy, ox, t, H, W, iy, ix)) continue;
      double yn = 0, xn = 0;
      for (int64_t c = 0; c < Ci; ++c) xn += xa[b][c][iy][ix] * xa[b][c][iy][ix];
      for (int64_t o = 0; o < Co; ++o) {
        for (int64_t c = 0; c < Ci; ++c) Y[t][o] += wa[o][c][t / g.kw][t % g.kw] * xa[b][c][iy][ix];
        yn += Y[t][o] * Y[t][o];
        z[o] += Y[t][o];
      }
      nt[t] = mode == "contribution" ? std::sqrt(yn) : mode == "input" ? std::sqrt(xn) : 0.0;
      S += nt[t];
    }
    if (bias)
      for (int64_t o = 0; o < Co; ++o) z[o] += (*bias)[o].item<double>();
    double zn = 0;
    for (int64_t o = 0; o < Co; ++o) zn += z[o] * z[o];
    for (int64_t t = 0; t < g.T(); ++t) {
      const double share = S > 0 ? nt[t] / S : 0.0;
      double dz = 0;
      for (int64_t o = 0; o < Co; ++o) {
        const double vo = Y[t][o] + (bias ? (*bias)[o].item<double>() * share : 0.0);
        v[r][t][o] = vo;
        dz += vo * z[o];
      }
      mu[r][t] = zn > 0 ? dz / zn : 0.0;
    }
  }
  return {v, mu};
}

// Conv test cases: channels, groups and geometry.
struct ConvCase {
  const char* name;
  int64_t B, Ci, Co, groups, H, W;
  Geo g;
};

const std::vector<ConvCase>& conv_cases() {
  // Few input channels per group take the direct path, more the product or Gram path; the path
  // tests below force each path on every case.
  static const std::vector<ConvCase> cases = {
      {"1x1", 2, 3, 4, 1, 5, 6, {1, 1, 1, 1, 0, 0, 1, 1}},
      {"1x1 stride 2, 6 channels", 2, 6, 4, 1, 5, 6, {1, 1, 2, 2, 0, 0, 1, 1}},
      {"3x3 pad 1", 2, 3, 5, 1, 6, 7, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"3x3 pad 1, 8 channels", 2, 8, 5, 1, 6, 7, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"3x3 no padding", 1, 2, 3, 1, 5, 6, {3, 3, 1, 1, 0, 0, 1, 1}},
      {"3x3 stride 2", 2, 4, 6, 1, 7, 8, {3, 3, 2, 2, 1, 1, 1, 1}},
      {"3x3 stride 2, 6 channels", 2, 6, 7, 1, 7, 8, {3, 3, 2, 2, 1, 1, 1, 1}},
      {"3x3 dilation 2", 1, 3, 4, 1, 7, 7, {3, 3, 1, 1, 2, 2, 2, 2}},
      {"3x3 dilation 2, 5 channels", 1, 5, 4, 1, 7, 8, {3, 3, 1, 1, 2, 2, 2, 2}},
      {"7x7 stride 2 pad 3", 1, 3, 8, 1, 11, 10, {7, 7, 2, 2, 3, 3, 1, 1}},
      {"7x7 stride 2 pad 3, 6 channels", 1, 6, 4, 1, 11, 10, {7, 7, 2, 2, 3, 3, 1, 1}},
      {"3x3 groups 2", 2, 4, 6, 2, 5, 5, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"3x3 groups 2, 12 channels", 1, 12, 4, 2, 5, 6, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"2x3 mixed geometry groups 2", 1, 4, 2, 2, 6, 9, {2, 3, 2, 1, 0, 1, 1, 2}},
      {"2x3 mixed geometry groups 2, 10 channels", 1, 10, 4, 2, 6, 9, {2, 3, 2, 1, 0, 1, 1, 2}},
      {"depthwise 3x3", 1, 4, 8, 4, 6, 6, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"wide rows", 1, 2, 3, 1, 3, 1100, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"wide rows, 6 channels", 1, 6, 3, 1, 3, 700, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"tall image", 2, 3, 3, 1, 90, 30, {3, 3, 2, 1, 1, 1, 1, 1}},
      {"tall image, 7 channels", 2, 7, 5, 1, 90, 30, {3, 3, 2, 1, 1, 1, 1, 1}},
  };
  return cases;
}

// Random tap norms with zeros (and so S = 0 outputs) sprinkled in.
Tensor random_norms(int64_t B, const Geo& g, int64_t H, int64_t W) {
  auto n = at::rand({B, g.T(), H, W}, kD);
  return n * (at::rand_like(n) > 0.2).to(at::kDouble);
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("activation_share matches the reference", "[activation_share]") {
  at::manual_seed(1);
  for (bool spatial : {true, false})
    for (bool with_extra : {true, false}) {
      std::vector<int64_t> shape =
          spatial ? std::vector<int64_t>{2, 5, 4, 3} : std::vector<int64_t>{3, 7};
      auto a = randn(shape), g = randn(shape), z = randn(shape);
      z.select(1, 0).zero_();
      if (spatial) z.select(2, 1).zero_();  // pixels with n2 = 0
      std::vector<int64_t> rs{shape[0]};
      if (spatial) rs.insert(rs.end(), {shape[2], shape[3]});
      Opt e = with_extra ? Opt(randn(rs)) : Opt();
      auto [R, out] = activation_share(a, g, z, e);
      auto [R_ref, out_ref] = ref_activation_share(a, g, z, e);
      check_close(R, R_ref);
      check_close(out, out_ref);
      CHECK(all_finite(out));

      auto [Rf, outf] = activation_share(a.to(at::kFloat), g.to(at::kFloat), z.to(at::kFloat),
                                         e ? Opt(e->to(at::kFloat)) : Opt());
      CHECK(Rf.scalar_type() == at::kFloat);
      check_close(Rf, R_ref, 1e-4, 1e-4);
      check_close(outf, out_ref, 1e-4, 1e-4);
    }
}

TEST_CASE("activation_share accepts non-contiguous inputs", "[activation_share]") {
  at::manual_seed(2);
  auto a = randn({3, 4, 5, 2}).permute({3, 1, 2, 0});  // (2, 4, 5, 3)
  auto g = randn({2, 4, 3, 5}).transpose(2, 3);
  auto z = randn({2, 4, 5, 3});
  auto e = randn({2, 3, 5}).transpose(1, 2);
  auto [R, out] = activation_share(a, g, z, e);
  auto [R_ref, out_ref] =
      ref_activation_share(a.contiguous(), g.contiguous(), z, Opt(e.contiguous()));
  check_close(R, R_ref);
  check_close(out, out_ref);
}

TEST_CASE("activation_share_backward matches finite differences", "[activation_share]") {
  at::manual_seed(3);
  for (bool spatial : {true, false}) {
    std::vector<int64_t> shape =
        spatial ? std::vector<int64_t>{2, 3, 2, 2} : std::vector<int64_t>{2, 4};
    std::vector<int64_t> rs{shape[0]};
    if (spatial) rs.insert(rs.end(), {shape[2], shape[3]});
    auto a = randn(shape), g = randn(shape), z = randn(shape), e = randn(rs);
    auto dR = randn(rs), dg = randn(shape);
    auto [R, out] = activation_share(a, g, z, e);
    auto [ga, gg, gz, ge] = activation_share_backward(dR, dg, a, g, z, R);
    auto loss = [&] {
      auto [R2, out2] = activation_share(a, g, z, e);
      return sum_product(R2, dR) + sum_product(out2, dg);
    };
    check_numeric_grad(ga, loss, a, 1e-6, 1e-7);
    check_numeric_grad(gg, loss, g, 1e-6, 1e-7);
    check_numeric_grad(gz, loss, z, 1e-6, 1e-7);
    check_numeric_grad(ge, loss, e, 1e-6, 1e-7);
  }
}

TEST_CASE("activation_share: zero pre-activation and empty batch", "[activation_share]") {
  auto a = randn({2, 3, 2, 2}), g = randn({2, 3, 2, 2}), z = at::zeros({2, 3, 2, 2}, kD);
  auto [R, out] = activation_share(a, g, z, Opt());
  CHECK(at::equal(out, at::zeros_like(out)));
  auto [ga, gg, gz, ge] =
      activation_share_backward(randn({2, 2, 2}), randn({2, 3, 2, 2}), a, g, z, R);
  CHECK(at::equal(gz, at::zeros_like(gz)));
  CHECK((all_finite(ga) && all_finite(gg) && all_finite(ge)));

  auto e0 = at::empty({0, 3, 4, 4}, kD);
  auto [R0, out0] = activation_share(e0, e0, e0, Opt(at::empty({0, 4, 4}, kD)));
  CHECK(R0.sizes() == IntArrayRef({0, 4, 4}));
  CHECK(out0.sizes() == IntArrayRef({0, 3, 4, 4}));
  auto [a0, g0, z0, x0] = activation_share_backward(R0, out0, e0, e0, e0, R0);
  CHECK(a0.sizes() == e0.sizes());
  CHECK(x0.sizes() == IntArrayRef({0, 4, 4}));
}

TEST_CASE("activation_share rejects bad inputs", "[activation_share][errors]") {
  auto a = randn({2, 3, 4, 4});
  CHECK(contains(error_of([&] { activation_share(a, a, randn({2, 3, 4, 5}), Opt()); }),
                 "activation_share"));
  CHECK(throws([&] { activation_share(a, a, a, Opt(randn({2, 4}))); }));
  CHECK(throws([&] { activation_share(a, a.to(at::kFloat), a, Opt()); }));
  auto ai = at::ones({2, 3}, at::kInt);
  CHECK(throws([&] { activation_share(ai, ai, ai, Opt()); }));
  const auto a3 = randn({2, 3, 4});
  CHECK(throws([&] { activation_share(a3, a3, a3, Opt()); }));
  CHECK(throws([&] { activation_share_backward(randn({2, 4}), a, a, a, a, randn({2, 4, 4})); }));
}

TEST_CASE("conv_tap_norms matches the reference", "[conv_tap_norms]") {
  at::manual_seed(4);
  for (const auto& cc : conv_cases()) {
    SECTION(cc.name) {
      auto x = randn({cc.B, cc.Ci, cc.H, cc.W});
      auto w = randn({cc.Co, cc.Ci / cc.groups, cc.g.kh, cc.g.kw});
      auto n = conv_tap_norms(x, w, cc.g, cc.groups);
      check_close(n, ref_tap_norms(x, w, cc.g, cc.groups));

      auto nf = conv_tap_norms(x.to(at::kFloat), w.to(at::kFloat), cc.g, cc.groups);
      CHECK(nf.scalar_type() == at::kFloat);
      check_close(nf, n, 1e-4, 1e-4);
    }
  }
}

// Forces conv_tap_norms onto one evaluation path while alive ("" = the choice by cost).
struct TapPath {
  explicit TapPath(const char* path) {
    if (*path)
      setenv("SRD_EXT_TAP_NORMS_PATH", path, 1);
    else
      unsetenv("SRD_EXT_TAP_NORMS_PATH");
  }
  ~TapPath() { unsetenv("SRD_EXT_TAP_NORMS_PATH"); }
};

TEST_CASE("every conv_tap_norms path matches the reference", "[conv_tap_norms][paths]") {
  for (const char* path : {"product", "gram", "direct"}) {
    for (const auto& cc : conv_cases()) {
      SECTION(std::string(path) + ": " + cc.name) {
        at::manual_seed(14);
        const TapPath forced(path);
        auto x = randn({cc.B, cc.Ci, cc.H, cc.W});
        auto w = randn({cc.Co, cc.Ci / cc.groups, cc.g.kh, cc.g.kw});
        auto n = conv_tap_norms(x, w, cc.g, cc.groups);
        check_close(n, ref_tap_norms(x, w, cc.g, cc.groups));
        auto dn = randn(n.sizes());
        auto [gx, gw] = conv_tap_norms_backward(dn, x, w, n, cc.g, cc.groups);
        auto [gx_ref, gw_ref] = ref_tap_norms_backward(dn, x, w, n, cc.g, cc.groups);
        check_close(gx, gx_ref);
        check_close(gw, gw_ref, 1e-10, 1e-9);
      }
    }
  }
}

// Sets SRD_EXT_TAP_NORMS_FUSED while alive: "0" turns the fused float32 kernel off, "avx512f" or
// "avx2" picks one.
struct FusedKernel {
  explicit FusedKernel(const char* value) { setenv("SRD_EXT_TAP_NORMS_FUSED", value, 1); }
  ~FusedKernel() { unsetenv("SRD_EXT_TAP_NORMS_FUSED"); }
};

TEST_CASE("the fused float32 kernels match the reference and the GEMM forms",
          "[conv_tap_norms][fused]") {
  // Shapes that cut the kernel's register tiles (rows, pixels) and its chunks unevenly: output
  // channels and Gram rows that are no multiple of the tile, pixel counts that are no multiple
  // of a panel, several phases (stride 2), dilation, an inner dimension of 1, many chunks.
  const std::vector<ConvCase> cases = {
      {"13 outputs", 3, 70, 13, 1, 9, 11, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"stride 2", 2, 19, 37, 1, 12, 10, {3, 3, 2, 2, 1, 1, 1, 1}},
      {"dilation 2, square", 1, 33, 33, 1, 15, 15, {5, 5, 1, 1, 4, 4, 2, 2}},
      {"one input channel", 2, 1, 9, 1, 8, 8, {3, 3, 1, 1, 1, 1, 1, 1}},
      {"many chunks", 2, 256, 16, 1, 40, 40, {3, 3, 1, 1, 1, 1, 1, 1}},
  };
  int ran = 0;
  for (const char* kernel : {"avx512f", "avx2"}) {
    {
      const FusedKernel pick(kernel);
      try {
        srd_ext::cpu::fused::describe();
      } catch (const c10::Error&) {
        continue;  // this CPU does not run that kernel
      }
    }
    ++ran;
    for (const char* path : {"product", "gram"}) {
      for (const auto& cc : cases) {
        SECTION(std::string(kernel) + ", " + path + ": " + cc.name) {
          at::manual_seed(31);
          const TapPath forced(path);
          auto x = randn({cc.B, cc.Ci, cc.H, cc.W});
          auto w = randn({cc.Co, cc.Ci / cc.groups, cc.g.kh, cc.g.kw});
          const auto ref = ref_tap_norms(x, w, cc.g, cc.groups);
          const auto xf = x.to(at::kFloat), wf = w.to(at::kFloat);
          Tensor fused, gemm;
          {
            const FusedKernel pick(kernel);
            fused = conv_tap_norms(xf, wf, cc.g, cc.groups);
          }
          {
            const FusedKernel off("0");
            gemm = conv_tap_norms(xf, wf, cc.g, cc.groups);
          }
          const double scale = ref.abs().max().item<double>();
          check_close(fused, ref, 1e-5, 1e-6 * scale);
          check_close(fused, gemm, 1e-5, 1e-6 * scale);
          // Unreached (pixel, tap) pairs stay exactly 0.
          CHECK(at::equal(fused == 0, ref == 0));
        }
      }
    }
  }
  if (ran == 0) WARN("no fused kernel on this CPU: nothing to check");
}

TEST_CASE("conv_tap_norms accepts non-contiguous inputs", "[conv_tap_norms]") {
  at::manual_seed(5);
  const Geo g{3, 3, 2, 1, 1, 0, 1, 2};
  auto x = randn({6, 5, 4, 2}).permute({3, 2, 1, 0});  // (2, 4, 5, 6)
  auto w = randn({3, 3, 4, 5}).permute({3, 2, 0, 1});  // (5, 4, 3, 3)
  check_close(conv_tap_norms(x, w, g, 1), ref_tap_norms(x.contiguous(), w.contiguous(), g, 1));
}

TEST_CASE("conv_tap_norms_backward matches the reference and finite differences",
          "[conv_tap_norms]") {
  at::manual_seed(6);
  for (const auto& cc : conv_cases()) {
    SECTION(cc.name) {
      auto x = randn({cc.B, cc.Ci, cc.H, cc.W});
      auto w = randn({cc.Co, cc.Ci / cc.groups, cc.g.kh, cc.g.kw});
      auto n = conv_tap_norms(x, w, cc.g, cc.groups);
      auto dn = randn(n.sizes());
      auto [gx, gw] = conv_tap_norms_backward(dn, x, w, n, cc.g, cc.groups);
      auto [gx_ref, gw_ref] = ref_tap_norms_backward(dn, x, w, n, cc.g, cc.groups);
      check_close(gx, gx_ref);
      check_close(gw, gw_ref, 1e-10, 1e-9);

      auto [gxf, gwf] = conv_tap_norms_backward(
          dn.to(at::kFloat), x.to(at::kFloat), w.to(at::kFloat), n.to(at::kFloat), cc.g, cc.groups);
      check_close(gxf, gx_ref, 1e-3, 1e-3);
      check_close(gwf, gw_ref, 1e-3, 1e-2);

      if (x.numel() <= 1000) {
        auto loss = [&] { return sum_product(conv_tap_norms(x, w, cc.g, cc.groups), dn); };
        check_numeric_grad(gx, loss, x, 1e-5, 1e-6);
        check_numeric_grad(gw, loss, w, 1e-5, 1e-6);
      }
    }
  }
}

TEST_CASE("conv_tap_norms: zero input and empty batch", "[conv_tap_norms]") {
  const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
  auto x = at::zeros({2, 4, 5, 5}, kD), w = randn({6, 2, 3, 3});
  auto n = conv_tap_norms(x, w, g, 2);
  CHECK(at::equal(n, at::zeros_like(n)));
  auto [gx, gw] = conv_tap_norms_backward(randn(n.sizes()), x, w, n, g, 2);
  CHECK(at::equal(gx, at::zeros_like(gx)));
  CHECK(at::equal(gw, at::zeros_like(gw)));

  auto x0 = at::empty({0, 4, 5, 5}, kD);
  auto n0 = conv_tap_norms(x0, w, g, 2);
  CHECK(n0.sizes() == IntArrayRef({0, 9, 5, 5}));
  auto [gx0, gw0] = conv_tap_norms_backward(n0, x0, w, n0, g, 2);
  CHECK(gx0.sizes() == x0.sizes());
  CHECK(at::equal(gw0, at::zeros_like(w)));
}

TEST_CASE("conv_tap_norms rejects bad inputs", "[conv_tap_norms][errors]") {
  const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
  auto x = randn({1, 4, 5, 5});
  CHECK(contains(error_of([&] { conv_tap_norms(randn({4, 5, 5}), randn({2, 4, 3, 3}), g, 1); }),
                 "conv_tap_norms"));
  CHECK(throws([&] { conv_tap_norms(x, randn({2, 3, 3, 3}), g, 1); }));
  CHECK(throws([&] { conv_tap_norms(x, randn({3, 2, 3, 3}), g, 2); }));
  CHECK(throws([&] { conv_tap_norms(x, randn({2, 4, 3, 3}, at::kFloat), g, 1); }));
  CHECK(throws([&] { conv_tap_norms(x, randn({2, 4, 7, 7}), Geo{7, 7, 1, 1, 0, 0, 1, 1}, 1); }));
  CHECK(throws([&] { conv_tap_norms(x, randn({2, 4, 3, 3}), Geo{3, 3, 0, 1, 1, 1, 1, 1}, 1); }));
  auto w = randn({2, 4, 3, 3});
  auto n = conv_tap_norms(x, w, g, 1);
  CHECK(contains(error_of([&] { conv_tap_norms_backward(n.narrow(1, 0, 4), x, w, n, g, 1); }),
                 "conv_tap_norms_backward"));
}

TEST_CASE("bias_share_scatter matches the reference and conserves relevance",
          "[bias_share_scatter]") {
  at::manual_seed(7);
  for (const auto& cc : conv_cases()) {
    SECTION(cc.name) {
      auto n = random_norms(cc.B, cc.g, cc.H, cc.W);
      auto d = randn({cc.B, cc.g.Ho(cc.H), cc.g.Wo(cc.W)});
      auto R = bias_share_scatter(n, d, cc.g);
      check_close(R, ref_bias_share_scatter(n, d, cc.g));
      auto S = ref_S(n, cc.g);
      const double kept = (d * (S > 0).to(at::kDouble)).sum().item<double>();
      CHECK(std::abs(R.sum().item<double>() - kept) <= 1e-9 * (1 + std::abs(kept)));

      auto Rf = bias_share_scatter(n.to(at::kFloat), d.to(at::kFloat), cc.g);
      check_close(Rf, R, 1e-4, 1e-4);
    }
  }
}

TEST_CASE("bias_share_scatter_backward matches the reference and finite differences",
          "[bias_share_scatter]") {
  at::manual_seed(8);
  for (const auto& cc : conv_cases()) {
    SECTION(cc.name) {
      auto n = random_norms(cc.B, cc.g, cc.H, cc.W);
      auto d = randn({cc.B, cc.g.Ho(cc.H), cc.g.Wo(cc.W)});
      auto dR = randn({cc.B, cc.H, cc.W});
      auto [gn, gd] = bias_share_scatter_backward(dR, n, d, cc.g);
      auto [gn_ref, gd_ref] = ref_bias_share_scatter_backward(dR, n, d, cc.g);
      check_close(gn, gn_ref);
      check_close(gd, gd_ref);

      auto [gnf, gdf] =
          bias_share_scatter_backward(dR.to(at::kFloat), n.to(at::kFloat), d.to(at::kFloat), cc.g);
      check_close(gnf, gn_ref, 1e-3, 1e-3);
      check_close(gdf, gd_ref, 1e-3, 1e-3);

      if (n.numel() <= 2000) {
        // Strictly positive norms keep every S_j > 0 under the perturbation.
        auto np = n + 0.1;
        auto [gnp, gdp] = bias_share_scatter_backward(dR, np, d, cc.g);
        auto loss = [&] { return sum_product(bias_share_scatter(np, d, cc.g), dR); };
        check_numeric_grad(gnp, loss, np, 1e-5, 1e-6);
        check_numeric_grad(gdp, loss, d, 1e-5, 1e-6);
      }
    }
  }
}

TEST_CASE("bias_share_scatter: zero norms, non-contiguous and empty inputs",
          "[bias_share_scatter]") {
  const Geo g{3, 3, 2, 2, 1, 1, 1, 1};
  auto n = at::zeros({2, 9, 7, 7}, kD), d = randn({2, 4, 4});
  auto R = bias_share_scatter(n, d, g);
  CHECK(at::equal(R, at::zeros_like(R)));
  auto [gn, gd] = bias_share_scatter_backward(randn({2, 7, 7}), n, d, g);
  CHECK(at::equal(gn, at::zeros_like(gn)));
  CHECK(at::equal(gd, at::zeros_like(gd)));

  auto nt = random_norms(2, g, 7, 7).transpose(2, 3);
  auto dt = randn({2, 4, 4}).transpose(1, 2);
  check_close(bias_share_scatter(nt, dt, g),
              ref_bias_share_scatter(nt.contiguous(), dt.contiguous(), g));

  auto n0 = at::empty({0, 9, 7, 7}, kD), d0 = at::empty({0, 4, 4}, kD);
  auto R0 = bias_share_scatter(n0, d0, g);
  CHECK(R0.sizes() == IntArrayRef({0, 7, 7}));
  auto [gn0, gd0] = bias_share_scatter_backward(R0, n0, d0, g);
  CHECK(gn0.sizes() == n0.sizes());
  CHECK(gd0.sizes() == d0.sizes());
}

TEST_CASE("bias_share_scatter rejects bad inputs", "[bias_share_scatter][errors]") {
  const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
  auto n = at::rand({1, 9, 5, 5}, kD);
  CHECK(contains(error_of([&] { bias_share_scatter(n, randn({1, 4, 4}), g); }),
                 "bias_share_scatter"));
  CHECK(throws([&] { bias_share_scatter(n.narrow(1, 0, 8), randn({1, 5, 5}), g); }));
  CHECK(throws([&] { bias_share_scatter(n, randn({1, 5, 5}, at::kFloat), g); }));
  CHECK(throws([&] { bias_share_scatter_backward(randn({1, 4, 5}), n, randn({1, 5, 5}), g); }));
}

TEST_CASE("pfv_decompose matches the reference and sums to the conv output", "[pfv_decompose]") {
  at::manual_seed(9);
  for (const auto& cc : conv_cases()) {
    if (cc.groups != 1) continue;
    SECTION(cc.name) {
      auto x = randn({cc.B, cc.Ci, cc.H, cc.W});
      auto w = randn({cc.Co, cc.Ci, cc.g.kh, cc.g.kw});
      auto bias = randn({cc.Co});
      const int64_t Ho = cc.g.Ho(cc.H), Wo = cc.g.Wo(cc.W);
      auto pos = at::stack({at::randint(cc.B, {12}, at::kLong), at::randint(Ho, {12}, at::kLong),
                            at::randint(Wo, {12}, at::kLong)},
                           1);
      pos[0][1] = 0;  // a corner, where padding leaves taps invalid
      pos[0][2] = 0;
      auto conv = at::conv2d(x, w, bias, cc.g.stride(), cc.g.padding(), cc.g.dilation());
      auto pa = pos.accessor<int64_t, 2>();
      std::vector<Tensor> rows;
      for (int64_t r = 0; r < pos.size(0); ++r)
        rows.push_back(conv[pa[r][0]].select(1, pa[r][1]).select(1, pa[r][2]));
      auto z = at::stack(rows);  // (N, C_out)

      for (std::string mode : {"none", "contribution", "input"})
        for (bool with_bias : {true, false}) {
          INFO("bias_share = " << mode << ", bias = " << with_bias);
          Opt b = with_bias ? Opt(bias) : Opt();
          auto [v, mu] = pfv_decompose(x, w, b, pos, cc.g, mode);
          auto [v_ref, mu_ref] = ref_pfv_decompose(x, w, b, pos, cc.g, mode);
          check_close(v, v_ref);
          check_close(mu, mu_ref);
          if (mode != "none" || !with_bias) {
            check_close(v.sum(1), with_bias ? z : z - bias, 1e-9, 1e-9);
            check_close(mu.sum(1), at::ones({pos.size(0)}, kD), 1e-9, 1e-9);
          }
          auto [vf, muf] = pfv_decompose(x.to(at::kFloat), w.to(at::kFloat),
                                         b ? Opt(b->to(at::kFloat)) : Opt(), pos, cc.g, mode);
          check_close(vf, v_ref, 1e-4, 1e-4);
          check_close(muf, mu_ref, 1e-3, 1e-3);
        }
    }
  }
}

TEST_CASE("pfv_decompose: zero input, non-contiguous and empty inputs", "[pfv_decompose]") {
  const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
  auto pos = at::tensor(std::vector<int64_t>{0, 0, 0, 1, 2, 3}, at::kLong).view({2, 3});
  auto x = at::zeros({2, 3, 4, 4}, kD), w = randn({5, 3, 3, 3});
  auto [v, mu] = pfv_decompose(x, w, Opt(), pos, g, "contribution");
  CHECK(at::equal(v, at::zeros_like(v)));
  CHECK(at::equal(mu, at::zeros_like(mu)));
  auto [vb, mub] = pfv_decompose(x, w, Opt(randn({5})), pos, g, "input");
  CHECK(all_finite(vb));
  CHECK(all_finite(mub));

  auto xt = randn({2, 3, 4, 4}).transpose(2, 3), wt = randn({5, 3, 3, 3}).transpose(2, 3);
  auto post = at::tensor(std::vector<int64_t>{0, 1, 0, 0, 2, 3}, at::kLong).view({3, 2}).t();
  auto [v1, mu1] = pfv_decompose(xt, wt, Opt(), post, g, "input");
  auto [v1_ref, mu1_ref] =
      ref_pfv_decompose(xt.contiguous(), wt.contiguous(), Opt(), post.contiguous(), g, "input");
  check_close(v1, v1_ref);
  check_close(mu1, mu1_ref);

  auto x0 = at::empty({0, 3, 4, 4}, kD);
  auto [v0, mu0] = pfv_decompose(x0, w, Opt(), at::empty({0, 3}, at::kLong), g, "input");
  CHECK(v0.sizes() == IntArrayRef({0, 9, 5}));
  CHECK(mu0.sizes() == IntArrayRef({0, 9}));
}

TEST_CASE("pfv_decompose rejects bad inputs", "[pfv_decompose][errors]") {
  const Geo g{3, 3, 2, 2, 1, 1, 1, 1};
  auto x = randn({2, 3, 6, 6}), w = randn({4, 3, 3, 3});
  auto pos = at::zeros({2, 3}, at::kLong);
  const auto bad_row = error_of([&] {
    auto p = pos.clone();
    p[1][2] = 3;  // W_out = 3
    pfv_decompose(x, w, Opt(), p, g, "input");
  });
  CHECK(contains(bad_row, "row 1"));
  CHECK(contains(bad_row, "x in [0, 3)"));
  CHECK(contains(bad_row, "b in [0, 2)"));
  CHECK(contains(error_of([&] {
                   auto p = pos.clone();
                   p[0][0] = -1;
                   pfv_decompose(x, w, Opt(), p, g, "input");
                 }),
                 "row 0"));
  CHECK(contains(error_of([&] { pfv_decompose(x, w, Opt(), pos.to(at::kInt), g, "input"); }),
                 "int64"));
  const auto no_rows = at::zeros({2, 2}, at::kLong);
  CHECK(contains(error_of([&] { pfv_decompose(x, w, Opt(), no_rows, g, "input"); }), "(N, 3)"));
  CHECK(throws([&] { pfv_decompose(x, w, Opt(), pos, g, "bogus"); }));
  CHECK(throws([&] { pfv_decompose(x, w, Opt(randn({3})), pos, g, "input"); }));
  CHECK(throws([&] { pfv_decompose(x, randn({4, 1, 3, 3}), Opt(), pos, g, "input"); }));
}

// ---------------------------------------------------------------------------------------------
// Conv geometry (csrc/conv_geometry.h) against brute force, and what the ops reject.

TEST_CASE("ConvAxis matches a brute-force enumeration", "[geometry]") {
  int64_t valid = 0, rejected = 0;
  for (int64_t in = 0; in <= 7; ++in)
    for (int64_t k = 1; k <= 4; ++k)
      for (int64_t s = 1; s <= 3; ++s)
        for (int64_t p = 0; p <= 3; ++p)
          for (int64_t d = 1; d <= 3; ++d) {
            INFO("in " << in << " k " << k << " s " << s << " p " << p << " d " << d);
            // Windows o*s .. o*s + d*(k-1) of the padded input [0, in + 2p).
            int64_t out = 0;
            while (out * s + d * (k - 1) <= in + 2 * p - 1) ++out;
            const int64_t got = srd_ext::conv_out_size(in, k, s, p, d);
            if (out == 0) {
              CHECK(got == -1);
              ++rejected;
              continue;
            }
            CHECK(got == out);
            ++valid;
            const srd_ext::ConvAxis ax{k, s, p, d, in, out};
            for (int64_t t = 0; t < k; ++t) {
              // Outputs whose input under offset t lies inside: one contiguous run.
              std::vector<int64_t> os;
              for (int64_t o = 0; o < out; ++o)
                if (ax.inside(o * s - p + t * d)) os.push_back(o);
              const auto run = ax.run(t);
              REQUIRE(run.count == static_cast<int64_t>(os.size()));
              for (int64_t j = 0; j < run.count; ++j) {
                CHECK(os[j] == run.o0 + j);
                CHECK(ax.in_coord(run.o0 + j, t) == run.i0 + j * s);
              }
              // out_coord inverts in_coord on the run, and is -1 for every other input.
              for (int64_t i = 0; i < in; ++i) {
                const int64_t o = ax.out_coord(i, t);
                const bool hit =
                    (i - run.i0) % s == 0 && i >= run.i0 && (i - run.i0) / s < run.count;
                CHECK(o == (hit ? run.o0 + (i - run.i0) / s : -1));
              }
            }
          }
  CHECK(valid > 0);
  CHECK(rejected > 0);
}

TEST_CASE("the ops reject an input smaller than the dilated kernel", "[geometry][errors]") {
  // 2 rows, kernel 3, stride 2, no padding: truncating division would give 1 output row.
  const Geo g{3, 3, 2, 1, 0, 1, 1, 1};
  auto x = randn({1, 2, 2, 6}), w = randn({3, 2, 3, 3});
  const auto msg = error_of([&] { conv_tap_norms(x, w, g, 1); });
  CHECK(contains(msg, "srd_ext::conv_tap_norms"));
  CHECK(contains(msg, "too small"));
  CHECK(contains(msg, "(1, 2, 2, 6)"));
  CHECK(contains(
      error_of([&] { bias_share_scatter(at::rand({1, 9, 2, 6}, kD), randn({1, 1, 6}), g); }),
      "too small"));
  CHECK(contains(
      error_of([&] { pfv_decompose(x, w, Opt(), at::zeros({1, 3}, at::kLong), g, "input"); }),
      "too small"));
  // Padding 1 makes it fit, as in F.conv2d.
  CHECK_FALSE(throws([&] { conv_tap_norms(x, w, Geo{3, 3, 2, 1, 1, 1, 1, 1}, 1); }));
  // Dilation 2 makes a 3-tap kernel span 5 pixels.
  CHECK(throws([&] { conv_tap_norms(randn({1, 2, 4, 6}), w, Geo{3, 3, 1, 1, 0, 1, 2, 1}, 1); }));
  CHECK_FALSE(
      throws([&] { conv_tap_norms(randn({1, 2, 5, 6}), w, Geo{3, 3, 1, 1, 0, 1, 2, 1}, 1); }));
}

// ---------------------------------------------------------------------------------------------
// NaN reaches the outputs of its pixel, and only those.

TEST_CASE("NaN passes through conv_tap_norms on every path", "[nan][conv_tap_norms]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Geo g{3, 3, 2, 2, 1, 1, 1, 1};
  for (const char* path : {"", "product", "gram", "direct"}) {
    SECTION(*path ? path : "auto") {
      const TapPath forced(path);
      at::manual_seed(21);
      auto x = randn({2, 6, 7, 8}), w = randn({8, 3, 3, 3});
      x[1][4][3][5] = nan;
      auto n = conv_tap_norms(x, w, g, 2);
      auto ref = ref_tap_norms(x, w, g, 2);
      // The reference has NaN exactly at the pixel's reached taps.
      CHECK(at::equal(at::isnan(n), at::isnan(ref)));
      CHECK(at::isnan(ref).any().item<bool>());
      CHECK(at::isnan(n.select(0, 1).select(1, 3).select(1, 5)).sum().item<int64_t>() ==
            at::isnan(ref.select(0, 1).select(1, 3).select(1, 5)).sum().item<int64_t>());
      const auto keep = at::logical_not(at::isnan(ref));
      check_close(n.masked_select(keep), ref.masked_select(keep));
    }
  }
}

TEST_CASE("NaN passes through activation_share, bias_share_scatter and pfv_decompose", "[nan]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::manual_seed(22);
  SECTION("activation_share: NaN pre-activation") {
    auto a = randn({2, 4, 3, 3}), gr = randn({2, 4, 3, 3}), z = randn({2, 4, 3, 3});
    z[1][2][0][1] = nan;
    auto [R, out] = activation_share(a, gr, z, Opt());
    CHECK(at::isnan(out.select(0, 1).select(1, 0).select(1, 1)).all().item<bool>());
    CHECK(at::isnan(out).sum().item<int64_t>() == 4);
    CHECK(at::isfinite(R).all().item<bool>());
  }
  SECTION("bias_share_scatter: NaN norm") {
    const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
    auto n = at::rand({1, 9, 5, 5}, kD), d = randn({1, 5, 5});
    n[0][4][2][2] = nan;  // the centre tap of output (2, 2)
    auto R = bias_share_scatter(n, d, g);
    // Output (2, 2) reads input rows and columns 1..3: those pixels get its NaN share.
    auto expect = at::zeros({1, 5, 5}, at::kBool);
    expect.slice(1, 1, 4).slice(2, 1, 4).fill_(true);
    CHECK(at::equal(at::isnan(R), expect));
  }
  SECTION("pfv_decompose: NaN input pixel") {
    const Geo g{3, 3, 1, 1, 1, 1, 1, 1};
    auto x = randn({1, 3, 6, 6}), w = randn({4, 3, 3, 3}), b = randn({4});
    x[0][1][2][2] = nan;
    auto pos = at::tensor({0, 2, 2, 0, 5, 5}, at::kLong).view({2, 3});  // reads it; does not
    auto [v, mu] = pfv_decompose(x, w, Opt(b), pos, g, "contribution");
    CHECK(at::isnan(mu[0]).all().item<bool>());
    CHECK(at::isfinite(mu[1]).all().item<bool>());
    CHECK(at::isfinite(v[1]).all().item<bool>());
  }
}
