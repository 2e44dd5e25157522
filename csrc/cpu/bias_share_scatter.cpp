// CPU kernels of srd_ext::bias_share_scatter and its backward.
//
// Two passes over rows: per output row, gather S_j (and the derived per-output maps); per input
// row, scatter back through every tap. Inner loops run along the contiguous output or input row;
// nothing per tap is materialized.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"

namespace srd_ext {
namespace cpu {
namespace {

struct Dims {
  int64_t B, T, H, W, Ho, Wo;
  std::vector<TapRun> rx;  // per tap column tx
};

Dims make_dims(const at::Tensor& n, const ConvGeometry& geo) {
  Dims D{n.size(0), n.size(1), n.size(2), n.size(3), geo.y.out, geo.x.out, {}};
  for (int64_t tx = 0; tx < geo.kw(); ++tx) D.rx.push_back(geo.x.run(tx));
  return D;
}

// Calls f(t, iy, rx) for every tap whose row ty maps output row oy inside the input.
template <typename F>
void for_taps_of_output_row(const ConvGeometry& geo, const Dims& D, int64_t oy, const F& f) {
  for (int64_t ty = 0; ty < geo.kh(); ++ty) {
    const int64_t iy = geo.y.in_coord(oy, ty);
    if (!geo.y.inside(iy)) continue;
    for (int64_t tx = 0; tx < geo.kw(); ++tx)
      if (D.rx[tx].count > 0) f(ty * geo.kw() + tx, iy, D.rx[tx]);
  }
}

// Calls f(t, oy, rx) for every tap that maps input row iy to an output row.
template <typename F>
void for_taps_of_input_row(const ConvGeometry& geo, const Dims& D, int64_t iy, const F& f) {
  for (int64_t ty = 0; ty < geo.kh(); ++ty) {
    const int64_t oy = geo.y.out_coord(iy, ty);
    if (oy < 0) continue;
    for (int64_t tx = 0; tx < geo.kw(); ++tx)
      if (D.rx[tx].count > 0) f(ty * geo.kw() + tx, oy, D.rx[tx]);
  }
}

at::Tensor bias_share_scatter_cpu(const at::Tensor& n_in, const at::Tensor& d_in,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const NestedCallGuard nested;
  const char* op = "bias_share_scatter";
  const ConvGeometry geo =
      check_scatter_args(op, n_in, d_in, kernel_size, stride, padding, dilation,
                         /*allow_half=*/false);
  const auto n = n_in.contiguous(), d = d_in.contiguous();
  const Dims D = make_dims(n, geo);
  auto R = at::empty({D.B, D.H, D.W}, n.options());
  if (R.numel() == 0) return R;

  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "bias_share_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pn = n.data_ptr<scalar_t>();
    const scalar_t* pd = d.data_ptr<scalar_t>();
    scalar_t* pR = R.data_ptr<scalar_t>();
    const int64_t HW = D.H * D.W, sw = geo.x.s;
    std::vector<acc_t> cmap(D.B * D.Ho * D.Wo);  // c_j = d_j / S_j

    at::parallel_for(0, D.B * D.Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> S(D.Wo);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / D.Ho, oy = row % D.Ho;
        std::fill(S.begin(), S.end(), acc_t(0));
        for_taps_of_output_row(geo, D, oy, [&](int64_t t, int64_t iy, const TapRun& rx) {
          const scalar_t* src = pn + (b * D.T + t) * HW + iy * D.W + rx.i0;
          acc_t* s = S.data() + rx.o0;
          for (int64_t l = 0; l < rx.count; ++l) s[l] += src[l * sw];
        });
        const scalar_t* drow = pd + row * D.Wo;
        acc_t* crow = cmap.data() + row * D.Wo;
        for (int64_t ox = 0; ox < D.Wo; ++ox)
          crow[ox] = positive_or_nan(S[ox]) ? static_cast<acc_t>(drow[ox]) / S[ox] : acc_t(0);
      }
    });

    at::parallel_for(0, D.B * D.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D.W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / D.H, iy = row % D.H;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for_taps_of_input_row(geo, D, iy, [&](int64_t t, int64_t oy, const TapRun& rx) {
          const scalar_t* src = pn + (b * D.T + t) * HW + iy * D.W + rx.i0;
          const acc_t* c = cmap.data() + (b * D.Ho + oy) * D.Wo + rx.o0;
          acc_t* r = acc.data() + rx.i0;
          for (int64_t l = 0; l < rx.count; ++l)
            r[l * sw] += static_cast<acc_t>(src[l * sw]) * c[l];
        });
        scalar_t* out = pR + row * D.W;
        for (int64_t ix = 0; ix < D.W; ++ix) out[ix] = static_cast<scalar_t>(acc[ix]);
      }
    });
  });
  return R;
}

std::tuple<at::Tensor, at::Tensor> bias_share_scatter_backward_cpu(
    const at::Tensor& dR_in, const at::Tensor& n_in, const at::Tensor& d_in,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const NestedCallGuard nested;
  const char* op = "bias_share_scatter_backward";
  const ConvGeometry geo = check_scatter_backward_args(op, dR_in, n_in, d_in, kernel_size, stride,
                                                       padding, dilation, /*allow_half=*/false);

  const auto dR = dR_in.contiguous(), n = n_in.contiguous(), d = d_in.contiguous();
  const Dims D = make_dims(n, geo);
  auto grad_n = at::zeros_like(n);
  auto grad_d = at::empty_like(d);
  if (grad_d.numel() == 0) return {grad_n, grad_d};

  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "bias_share_scatter_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdR = dR.data_ptr<scalar_t>();
    const scalar_t* pn = n.data_ptr<scalar_t>();
    const scalar_t* pd = d.data_ptr<scalar_t>();
    scalar_t* pgn = grad_n.data_ptr<scalar_t>();
    scalar_t* pgd = grad_d.data_ptr<scalar_t>();
    const int64_t HW = D.H * D.W, sw = geo.x.s;
    // Per output pixel: a_j = u_j / S_j and c_j = d_j / S_j (both 0 where S_j = 0), and S_j > 0.
    const int64_t nout = D.B * D.Ho * D.Wo;
    std::vector<acc_t> amap(nout), cmap(nout);
    std::vector<unsigned char> pos(nout);

    at::parallel_for(0, D.B * D.Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> S(D.Wo), u(D.Wo);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / D.Ho, oy = row % D.Ho;
        std::fill(S.begin(), S.end(), acc_t(0));
        std::fill(u.begin(), u.end(), acc_t(0));
        for_taps_of_output_row(geo, D, oy, [&](int64_t t, int64_t iy, const TapRun& rx) {
          const scalar_t* src = pn + (b * D.T + t) * HW + iy * D.W + rx.i0;
          const scalar_t* g = pdR + b * HW + iy * D.W + rx.i0;
          for (int64_t l = 0; l < rx.count; ++l) {
            const acc_t v = src[l * sw];
            S[rx.o0 + l] += v;
            u[rx.o0 + l] += v * static_cast<acc_t>(g[l * sw]);
          }
        });
        for (int64_t ox = 0; ox < D.Wo; ++ox) {
          const int64_t j = row * D.Wo + ox;
          const bool p = positive_or_nan(S[ox]);
          pos[j] = p;
          amap[j] = p ? u[ox] / S[ox] : acc_t(0);
          cmap[j] = p ? static_cast<acc_t>(pd[j]) / S[ox] : acc_t(0);
          pgd[j] = static_cast<scalar_t>(amap[j]);
        }
      }
    });

    at::parallel_for(0, D.B * D.H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / D.H, iy = row % D.H;
        const scalar_t* g = pdR + row * D.W;
        for_taps_of_input_row(geo, D, iy, [&](int64_t t, int64_t oy, const TapRun& rx) {
          const int64_t j0 = (b * D.Ho + oy) * D.Wo + rx.o0;
          scalar_t* out = pgn + (b * D.T + t) * HW + iy * D.W + rx.i0;
          for (int64_t l = 0; l < rx.count; ++l) {
            const int64_t j = j0 + l;
            if (pos[j])
              out[l * sw] = static_cast<scalar_t>(
                  (static_cast<acc_t>(g[rx.i0 + l * sw]) - amap[j]) * cmap[j]);
          }
        });
      }
    });
  });
  return {grad_n, grad_d};
}

}  // namespace
}  // namespace cpu
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CPU, m) {
  m.impl("bias_share_scatter", &srd_ext::cpu::bias_share_scatter_cpu);
  m.impl("bias_share_scatter_backward", &srd_ext::cpu::bias_share_scatter_backward_cpu);
}
