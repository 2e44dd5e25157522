// CPU kernels of srd_ext::activation_share and its backward.
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

// Pixels per task: the channel loop runs over a block of pixels so that every inner loop is
// contiguous in memory (channel stride is H*W).
constexpr int64_t kPixelBlock = 256;

// (B, C, H, W) or (B, C) viewed as (B, C, P).
struct Layout {
  int64_t B, C, P;
};

Layout layout_of(const at::Tensor& a) {
  return Layout{a.size(0), a.size(1), a.dim() == 4 ? a.size(2) * a.size(3) : 1};
}

// Runs f(b, p0, p1) over blocks of pixels of every sample, in parallel.
template <typename F>
void for_pixel_blocks(const Layout& L, const F& f) {
  const int64_t nblk = (L.P + kPixelBlock - 1) / kPixelBlock;
  at::parallel_for(0, L.B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / nblk, p0 = (k % nblk) * kPixelBlock;
      f(b, p0, std::min(L.P, p0 + kPixelBlock));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> activation_share_cpu(const at::Tensor& a_in,
                                                        const at::Tensor& grad_in,
                                                        const at::Tensor& z_in,
                                                        const c10::optional<at::Tensor>& extra_in) {
  const NestedCallGuard nested;
  const char* op = "activation_share";
  check_activation_share_args(op, a_in, grad_in, z_in, extra_in, /*allow_half=*/false);
  const auto a = a_in.contiguous(), grad = grad_in.contiguous(), z = z_in.contiguous();
  at::Tensor extra;
  if (extra_in.has_value()) extra = extra_in->contiguous();

  const Layout L = layout_of(a);
  auto R = at::empty(pixel_shape(a), a.options());
  auto g = at::empty_like(z);
  if (R.numel() == 0) return {R, g};

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "activation_share_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const scalar_t* pe = extra.defined() ? extra.data_ptr<scalar_t>() : nullptr;
    scalar_t* pR = R.data_ptr<scalar_t>();
    scalar_t* pout = g.data_ptr<scalar_t>();
    for_pixel_blocks(L, [&](int64_t b, int64_t p0, int64_t p1) {
      const int64_t n = p1 - p0;
      acc_t r[kPixelBlock], n2[kPixelBlock];
      for (int64_t p = 0; p < n; ++p) {
        r[p] = pe ? static_cast<acc_t>(pe[b * L.P + p0 + p]) : acc_t(0);
        n2[p] = 0;
      }
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t off = (b * L.C + c) * L.P + p0;
        for (int64_t p = 0; p < n; ++p) {
          const acc_t zz = pz[off + p];
          r[p] += static_cast<acc_t>(pa[off + p]) * static_cast<acc_t>(pg[off + p]);
          n2[p] += zz * zz;
        }
      }
      for (int64_t p = 0; p < n; ++p) {
        pR[b * L.P + p0 + p] = static_cast<scalar_t>(r[p]);
        r[p] = positive_or_nan(n2[p]) ? r[p] / n2[p] : acc_t(0);  // now the scale R / n2
      }
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t off = (b * L.C + c) * L.P + p0;
        for (int64_t p = 0; p < n; ++p)
          pout[off + p] = static_cast<scalar_t>(static_cast<acc_t>(pz[off + p]) * r[p]);
      }
    });
  });
  return {R, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> activation_share_backward_cpu(
    const at::Tensor& dR_in, const at::Tensor& dg_in, const at::Tensor& a_in,
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& R_in) {
  const NestedCallGuard nested;
  const char* op = "activation_share_backward";
  check_activation_share_backward_args(op, dR_in, dg_in, a_in, grad_in, z_in, R_in,
                                       /*allow_half=*/false);
  const auto want = pixel_shape(a_in);

  const auto dR = dR_in.contiguous(), dg = dg_in.contiguous(), a = a_in.contiguous(),
             grad = grad_in.contiguous(), z = z_in.contiguous(), R = R_in.contiguous();
  const Layout L = layout_of(a);
  auto grad_a = at::empty_like(a), grad_grad = at::empty_like(a), grad_z = at::empty_like(a);
  auto grad_extra = at::empty(want, a.options());
  if (grad_extra.numel() == 0) return {grad_a, grad_grad, grad_z, grad_extra};

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "activation_share_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdR = dR.data_ptr<scalar_t>();
    const scalar_t* pdg = dg.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const scalar_t* pR = R.data_ptr<scalar_t>();
    scalar_t* pga = grad_a.data_ptr<scalar_t>();
    scalar_t* pgg = grad_grad.data_ptr<scalar_t>();
    scalar_t* pgz = grad_z.data_ptr<scalar_t>();
    scalar_t* pge = grad_extra.data_ptr<scalar_t>();
    for_pixel_blocks(L, [&](int64_t b, int64_t p0, int64_t p1) {
      const int64_t n = p1 - p0;
      acc_t n2[kPixelBlock], q[kPixelBlock];
      for (int64_t p = 0; p < n; ++p) n2[p] = q[p] = 0;
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t off = (b * L.C + c) * L.P + p0;
        for (int64_t p = 0; p < n; ++p) {
          const acc_t zz = pz[off + p];
          n2[p] += zz * zz;
          q[p] += static_cast<acc_t>(pdg[off + p]) * zz;
        }
      }
      // Per pixel: dRt = dR + q/n2, s = R/n2, and the coefficient k = 2*q*s/n2 of z in grad_z.
      acc_t dRt[kPixelBlock], s[kPixelBlock], k[kPixelBlock];
      for (int64_t p = 0; p < n; ++p) {
        const int64_t i = b * L.P + p0 + p;
        const bool nz = positive_or_nan(n2[p]);
        s[p] = nz ? static_cast<acc_t>(pR[i]) / n2[p] : acc_t(0);
        dRt[p] = static_cast<acc_t>(pdR[i]) + (nz ? q[p] / n2[p] : acc_t(0));
        k[p] = nz ? 2 * q[p] * s[p] / n2[p] : acc_t(0);
        pge[i] = static_cast<scalar_t>(dRt[p]);
      }
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t off = (b * L.C + c) * L.P + p0;
        for (int64_t p = 0; p < n; ++p) {
          const int64_t e = off + p;
          pga[e] = static_cast<scalar_t>(dRt[p] * static_cast<acc_t>(pg[e]));
          pgg[e] = static_cast<scalar_t>(dRt[p] * static_cast<acc_t>(pa[e]));
          pgz[e] = static_cast<scalar_t>(static_cast<acc_t>(pdg[e]) * s[p] -
                                         k[p] * static_cast<acc_t>(pz[e]));
        }
      }
    });
  });
  return {grad_a, grad_grad, grad_z, grad_extra};
}

}  // namespace
}  // namespace cpu
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CPU, m) {
  m.impl("activation_share", &srd_ext::cpu::activation_share_cpu);
  m.impl("activation_share_backward", &srd_ext::cpu::activation_share_backward_cpu);
}
