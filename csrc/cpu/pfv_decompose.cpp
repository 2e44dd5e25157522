// CPU kernel of srd_ext::pfv_decompose (groups = 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"

namespace srd_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> pfv_decompose_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& positions_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view bias_share) {
  const NestedCallGuard nested;
  const char* op = "pfv_decompose";
  const ConvGeometry geo = check_tap_norms_args(op, x_in, weight_in, stride, padding, dilation,
                                                /*groups=*/1, /*allow_half=*/false);
  const int64_t mode = bias_share_mode(op, bias_share);
  const int64_t B = x_in.size(0), C_in = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t C_out = weight_in.size(0), T = geo.taps();
  const int64_t Ho = geo.y.out, Wo = geo.x.out;

  TORCH_CHECK(positions_in.scalar_type() == at::kLong, "srd_ext::", op,
              ": positions must be int64, got ", positions_in.scalar_type());
  TORCH_CHECK(positions_in.dim() == 2 && positions_in.size(1) == 3, "srd_ext::", op,
              ": positions must be (N, 3) rows (b, y, x), got shape ", shape_str(positions_in));
  TORCH_CHECK(positions_in.device() == x_in.device(), "srd_ext::", op, ": positions is on ",
              positions_in.device(), " but x is on ", x_in.device(),
              "; all tensors must be on one device");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C_out, "srd_ext::", op,
                ": bias must be (C_out,) = (", C_out, ",) for weight ", shape_str(weight_in),
                ", got shape ", shape_str(bias));
    check_same(op, "bias", bias, x_in, "x");
  }

  const auto pos = positions_in.contiguous();
  const int64_t N = pos.size(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    const int64_t b = pp[3 * r], oy = pp[3 * r + 1], ox = pp[3 * r + 2];
    TORCH_CHECK(b >= 0 && b < B && oy >= 0 && oy < Ho && ox >= 0 && ox < Wo, "srd_ext::", op,
                ": positions row ", r, " is (b, y, x) = (", b, ", ", oy, ", ", ox,
                ") but the valid ranges are b in [0, ", B, "), y in [0, ", Ho, "), x in [0, ", Wo,
                ") for x ", shape_str(x_in), " and weight ", shape_str(weight_in));
  }

  const auto x = x_in.contiguous();
  auto v_hat = at::empty({N, T, C_out}, x.options());
  auto mu = at::empty({N, T}, x.options());
  if (N == 0) return {v_hat, mu};

  // Gather the input vector of every (tap, row), zero for invalid taps, so that all products
  // come from one batched GEMM: Y[t] (N, C_out) = X[t] (N, C_in) W_t^T.
  auto X = at::zeros({T, N, C_in}, x.options());
  auto xnorm = at::zeros({N, T}, x.options().dtype(at::kDouble));
  const auto wt = weight_in.permute({2, 3, 1, 0}).reshape({T, C_in, C_out});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pfv_decompose_cpu_gather", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pX = X.data_ptr<scalar_t>();
    double* pxn = xnorm.data_ptr<double>();
    const int64_t HW = H * W;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = pp[3 * r], oy = pp[3 * r + 1], ox = pp[3 * r + 2];
        for (int64_t t = 0; t < T; ++t) {
          const int64_t iy = geo.y.in_coord(oy, t / geo.kw());
          const int64_t ix = geo.x.in_coord(ox, t % geo.kw());
          if (!geo.y.inside(iy) || !geo.x.inside(ix)) continue;
          const scalar_t* xi = px + b * C_in * HW + iy * W + ix;
          scalar_t* dst = pX + (t * N + r) * C_in;
          double xn = 0;
          for (int64_t c = 0; c < C_in; ++c) {
            dst[c] = xi[c * HW];
            xn += static_cast<double>(dst[c]) * static_cast<double>(dst[c]);
          }
          pxn[r * T + t] = std::sqrt(xn);
        }
      }
    });
  });
  const auto Y = at::bmm(X, wt).contiguous();  // (T, N, C_out)

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pfv_decompose_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* py = Y.data_ptr<scalar_t>();
    const double* pxn = xnorm.data_ptr<double>();
    const scalar_t* pb = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* pv = v_hat.data_ptr<scalar_t>();
    scalar_t* pmu = mu.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(C_out), nt(T);
      for (int64_t r = begin; r < end; ++r) {
        // Invalid taps have Y = 0 and x = 0, hence n_t = 0 in every mode.
        std::fill(z.begin(), z.end(), acc_t(0));
        acc_t S = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* y = py + (t * N + r) * C_out;
          acc_t yn = 0;
          for (int64_t o = 0; o < C_out; ++o) {
            const acc_t v = y[o];
            yn += v * v;
            z[o] += v;
          }
          nt[t] = mode == 1   ? std::sqrt(yn)
                  : mode == 2 ? static_cast<acc_t>(pxn[r * T + t])
                              : acc_t(0);
          S += nt[t];
        }
        if (pb)
          for (int64_t o = 0; o < C_out; ++o) z[o] += static_cast<acc_t>(pb[o]);
        acc_t zn = 0;
        for (int64_t o = 0; o < C_out; ++o) zn += z[o] * z[o];
        for (int64_t t = 0; t < T; ++t) {
          const acc_t share = positive_or_nan(S) ? nt[t] / S : acc_t(0);
          const scalar_t* y = py + (t * N + r) * C_out;
          scalar_t* v = pv + (r * T + t) * C_out;
          acc_t dot = 0;
          for (int64_t o = 0; o < C_out; ++o) {
            const acc_t vo =
                static_cast<acc_t>(y[o]) + (pb ? static_cast<acc_t>(pb[o]) * share : acc_t(0));
            v[o] = static_cast<scalar_t>(vo);
            dot += vo * z[o];
          }
          pmu[r * T + t] = static_cast<scalar_t>(positive_or_nan(zn) ? dot / zn : acc_t(0));
        }
      }
    });
  });
  return {v_hat, mu};
}

}  // namespace
}  // namespace cpu
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CPU, m) { m.impl("pfv_decompose", &srd_ext::cpu::pfv_decompose_cpu); }
