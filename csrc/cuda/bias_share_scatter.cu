// CUDA kernels of bias_share_scatter and bias_share_scatter_backward.
// Gather formulation in two passes, so no atomics are needed: one thread per output pixel j
// computes the per-output coefficients (c_j = d_j / S_j, ...), then one thread per input pixel i
// sums over the taps t whose output j(i,t) exists.
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace srd_ext {
namespace cuda {
namespace {

// Per output pixel: S_j = sum of the valid taps' norms; coef_j = S_j > 0 ? d_j / S_j : 0 (NaN
// when S_j is NaN).
// With dR given (backward) also w_j = S_j > 0 ? u_j / S_j : 0, u_j = sum_t n * dR[i(j,t)],
// written to both w (acc) and grad_d.
template <typename scalar_t, typename acc_t>
__global__ void per_output_kernel(const scalar_t* __restrict__ n, const scalar_t* __restrict__ d,
                                  const scalar_t* __restrict__ d_rel,  // null in the forward
                                  acc_t* __restrict__ coef, acc_t* __restrict__ w,
                                  scalar_t* __restrict__ grad_d, ConvGeometry g, int64_t total) {
  const int64_t T = g.taps(), plane_in = g.in_pixels(), plane_out = g.out_pixels();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / plane_out, rem = idx % plane_out;
    const int64_t oy = rem / g.x.out, ox = rem % g.x.out;
    const scalar_t* nb = n + b * T * plane_in;
    const scalar_t* drb = d_rel != nullptr ? d_rel + b * plane_in : nullptr;
    acc_t S = 0, u = 0;
    for (int64_t ty = 0; ty < g.kh(); ++ty) {
      const int64_t iy = g.y.in_coord(oy, ty);
      if (iy < 0 || iy >= g.y.in) continue;
      for (int64_t tx = 0; tx < g.kw(); ++tx) {
        const int64_t ix = g.x.in_coord(ox, tx);
        if (ix < 0 || ix >= g.x.in) continue;
        const int64_t i = iy * g.x.in + ix;
        const acc_t nv = static_cast<acc_t>(nb[(ty * g.kw() + tx) * plane_in + i]);
        S += nv;
        if (drb != nullptr) u += nv * static_cast<acc_t>(drb[i]);
      }
    }
    const bool pos = positive_or_nan(S);  // NaN norms give NaN shares
    coef[idx] = pos ? static_cast<acc_t>(d[idx]) / S : acc_t(0);
    if (drb != nullptr) {
      const acc_t wv = pos ? u / S : acc_t(0);
      w[idx] = wv;
      grad_d[idx] = static_cast<scalar_t>(wv);
    }
  }
}

// R_i = sum_t n[t, i] * coef_{j(i,t)}.
template <typename scalar_t, typename acc_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ n, const acc_t* __restrict__ coef,
                               scalar_t* __restrict__ rel, ConvGeometry g, int64_t total) {
  const int64_t T = g.taps(), plane_in = g.in_pixels(), plane_out = g.out_pixels();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / plane_in, i = idx % plane_in;
    const int64_t iy = i / g.x.in, ix = i % g.x.in;
    const scalar_t* nb = n + b * T * plane_in + i;
    const acc_t* cb = coef + b * plane_out;
    acc_t r = 0;
    for (int64_t ty = 0; ty < g.kh(); ++ty) {
      const int64_t oy = g.y.out_coord(iy, ty);
      if (oy < 0) continue;
      for (int64_t tx = 0; tx < g.kw(); ++tx) {
        const int64_t ox = g.x.out_coord(ix, tx);
        if (ox < 0) continue;
        r += static_cast<acc_t>(nb[(ty * g.kw() + tx) * plane_in]) * cb[oy * g.x.out + ox];
      }
    }
    rel[idx] = static_cast<scalar_t>(r);
  }
}

// grad_n[t, i] = j = j(i,t) exists ? (dR_i - w_j) * coef_j : 0   (coef_j = w_j = 0 when S_j = 0).
template <typename scalar_t, typename acc_t>
__global__ void scatter_backward_kernel(const scalar_t* __restrict__ d_rel,
                                        const acc_t* __restrict__ coef, const acc_t* __restrict__ w,
                                        scalar_t* __restrict__ grad_n, ConvGeometry g,
                                        int64_t total) {
  const int64_t T = g.taps(), plane_in = g.in_pixels(), plane_out = g.out_pixels();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / plane_in, i = idx % plane_in;
    const int64_t iy = i / g.x.in, ix = i % g.x.in;
    const acc_t dr = static_cast<acc_t>(d_rel[idx]);
    const acc_t* cb = coef + b * plane_out;
    const acc_t* wb = w + b * plane_out;
    scalar_t* gb = grad_n + b * T * plane_in + i;
    for (int64_t ty = 0; ty < g.kh(); ++ty) {
      const int64_t oy = g.y.out_coord(iy, ty);
      for (int64_t tx = 0; tx < g.kw(); ++tx) {
        const int64_t ox = oy < 0 ? -1 : g.x.out_coord(ix, tx);
        acc_t v = 0;
        if (ox >= 0) {
          const int64_t j = oy * g.x.out + ox;
          if (cb[j] != acc_t(0)) v = (dr - wb[j]) * cb[j];
        }
        gb[(ty * g.kw() + tx) * plane_in] = static_cast<scalar_t>(v);
      }
    }
  }
}

at::Tensor bias_share_scatter_cuda(const at::Tensor& tap_norms, const at::Tensor& bias_dot,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  const NestedCallGuard nested;
  const char* op = "bias_share_scatter";
  const ConvGeometry g =
      check_scatter_args(op, tap_norms, bias_dot, kernel_size, stride, padding, dilation,
                         /*allow_half=*/true);
  check_cuda(op, "tap_norms", tap_norms);  // bias_dot was checked to share its device
  const c10::cuda::CUDAGuard guard(tap_norms.device());

  const auto nc = tap_norms.contiguous(), dc = bias_dot.contiguous();
  const int64_t B = tap_norms.size(0);
  auto rel = at::empty({B, g.y.in, g.x.in}, tap_norms.options());
  const int64_t n_in = B * g.in_pixels(), n_out = B * g.out_pixels();
  if (n_in == 0) return rel;
  if (n_out == 0) return rel.zero_();

  const auto st = tap_norms.scalar_type();
  const auto acc_dtype = at::toAccumulateType(st, /*is_cuda=*/true);
  auto coef = at::empty({n_out}, tap_norms.options().dtype(acc_dtype));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "bias_share_scatter_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    per_output_kernel<scalar_t, acc_t><<<grid_for(n_out), kThreads, 0, stream>>>(
        nc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(), nullptr,
        coef.mutable_data_ptr<acc_t>(), nullptr, nullptr, g, n_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_kernel<scalar_t, acc_t><<<grid_for(n_in), kThreads, 0, stream>>>(
        nc.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(),
        rel.mutable_data_ptr<scalar_t>(), g, n_in);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rel;
}

std::tuple<at::Tensor, at::Tensor> bias_share_scatter_backward_cuda(
    const at::Tensor& grad_relevance, const at::Tensor& tap_norms, const at::Tensor& bias_dot,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const NestedCallGuard nested;
  const char* op = "bias_share_scatter_backward";
  const ConvGeometry g =
      check_scatter_backward_args(op, grad_relevance, tap_norms, bias_dot, kernel_size, stride,
                                  padding, dilation, /*allow_half=*/true);
  check_cuda(op, "tap_norms", tap_norms);
  const c10::cuda::CUDAGuard guard(tap_norms.device());

  const auto drc = grad_relevance.contiguous(), nc = tap_norms.contiguous(),
             dc = bias_dot.contiguous();
  const int64_t B = tap_norms.size(0);
  auto grad_n = at::empty_like(nc);
  auto grad_d = at::empty_like(dc);
  const int64_t n_in = B * g.in_pixels(), n_out = B * g.out_pixels();
  if (n_in == 0) return {grad_n, grad_d.zero_()};  // no input pixel: every S_j is 0
  if (n_out == 0) return {grad_n.zero_(), grad_d};

  const auto st = tap_norms.scalar_type();
  const auto acc_dtype = at::toAccumulateType(st, /*is_cuda=*/true);
  auto coef = at::empty({n_out}, tap_norms.options().dtype(acc_dtype));
  auto w = at::empty({n_out}, tap_norms.options().dtype(acc_dtype));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, st, "bias_share_scatter_backward_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        per_output_kernel<scalar_t, acc_t><<<grid_for(n_out), kThreads, 0, stream>>>(
            nc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(),
            drc.const_data_ptr<scalar_t>(), coef.mutable_data_ptr<acc_t>(),
            w.mutable_data_ptr<acc_t>(), grad_d.mutable_data_ptr<scalar_t>(), g, n_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        scatter_backward_kernel<scalar_t, acc_t><<<grid_for(n_in), kThreads, 0, stream>>>(
            drc.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
            grad_n.mutable_data_ptr<scalar_t>(), g, n_in);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_n, grad_d};
}

}  // namespace
}  // namespace cuda
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CUDA, m) {
  m.impl("bias_share_scatter", &srd_ext::cuda::bias_share_scatter_cuda);
  m.impl("bias_share_scatter_backward", &srd_ext::cuda::bias_share_scatter_backward_cuda);
}
