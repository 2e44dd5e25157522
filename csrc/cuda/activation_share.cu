// CUDA kernels of activation_share and activation_share_backward.
// Tensors are viewed as (B, C, P) with P = H*W (or 1 for (B, C)); each pixel (b, p) reduces over C.
// With P >= 32 one thread handles a pixel (neighbouring threads read neighbouring addresses);
// with small P a warp handles a pixel, its lanes striding over the channels.
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace srd_ext {
namespace cuda {
namespace {

template <int LANES, typename T>
__device__ __forceinline__ T lanes_sum(T v) {
  if constexpr (LANES == 32) return warp_sum(v);
  return v;
}

template <typename scalar_t, int LANES>
__global__ void activation_share_kernel(const scalar_t* __restrict__ a,
                                        const scalar_t* __restrict__ grad,
                                        const scalar_t* __restrict__ z,
                                        const scalar_t* __restrict__ extra,  // may be null
                                        scalar_t* __restrict__ relevance, scalar_t* __restrict__ g,
                                        int64_t C, int64_t P, int64_t npix) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t items = npix * LANES;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of 32
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += stride) {
    const int64_t pix = item / LANES;
    const int lane = static_cast<int>(item % LANES);
    const int64_t base = (pix / P) * C * P + pix % P;
    acc_t r = 0, n2 = 0;
    for (int64_t c = lane; c < C; c += LANES) {
      const int64_t k = base + c * P;
      const acc_t zv = static_cast<acc_t>(z[k]);
      r += static_cast<acc_t>(a[k]) * static_cast<acc_t>(grad[k]);
      n2 += zv * zv;
    }
    r = lanes_sum<LANES>(r);
    n2 = lanes_sum<LANES>(n2);
    if (extra != nullptr) r += static_cast<acc_t>(extra[pix]);
    if (lane == 0) relevance[pix] = static_cast<scalar_t>(r);
    const acc_t s = n2 > acc_t(0) ? r / n2 : acc_t(0);
    for (int64_t c = lane; c < C; c += LANES) {
      const int64_t k = base + c * P;
      g[k] = static_cast<scalar_t>(static_cast<acc_t>(z[k]) * s);
    }
  }
}

template <typename scalar_t, int LANES>
__global__ void activation_share_backward_kernel(
    const scalar_t* __restrict__ d_rel, const scalar_t* __restrict__ d_g,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ relevance,
    scalar_t* __restrict__ grad_a, scalar_t* __restrict__ grad_grad, scalar_t* __restrict__ grad_z,
    scalar_t* __restrict__ grad_extra, int64_t C, int64_t P, int64_t npix) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t items = npix * LANES;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += stride) {
    const int64_t pix = item / LANES;
    const int lane = static_cast<int>(item % LANES);
    const int64_t base = (pix / P) * C * P + pix % P;
    acc_t n2 = 0, q = 0;
    for (int64_t c = lane; c < C; c += LANES) {
      const int64_t k = base + c * P;
      const acc_t zv = static_cast<acc_t>(z[k]);
      n2 += zv * zv;
      q += static_cast<acc_t>(d_g[k]) * zv;
    }
    n2 = lanes_sum<LANES>(n2);
    q = lanes_sum<LANES>(q);
    const bool pos = n2 > acc_t(0);
    const acc_t s = pos ? static_cast<acc_t>(relevance[pix]) / n2 : acc_t(0);
    const acc_t d_rt = static_cast<acc_t>(d_rel[pix]) + (pos ? q / n2 : acc_t(0));
    // grad_z = dg * s - (2 q s / n2) * z
    const acc_t kz = pos ? acc_t(2) * q * s / n2 : acc_t(0);
    if (lane == 0) grad_extra[pix] = static_cast<scalar_t>(d_rt);
    for (int64_t c = lane; c < C; c += LANES) {
      const int64_t k = base + c * P;
      grad_a[k] = static_cast<scalar_t>(d_rt * static_cast<acc_t>(grad[k]));
      grad_grad[k] = static_cast<scalar_t>(d_rt * static_cast<acc_t>(a[k]));
      grad_z[k] = static_cast<scalar_t>(
          pos ? static_cast<acc_t>(d_g[k]) * s - kz * static_cast<acc_t>(z[k]) : acc_t(0));
    }
  }
}

int64_t pixels_per_sample(const at::Tensor& a) { return a.dim() == 4 ? a.size(2) * a.size(3) : 1; }

std::tuple<at::Tensor, at::Tensor> activation_share_cuda(const at::Tensor& a,
                                                         const at::Tensor& grad,
                                                         const at::Tensor& pre_activation,
                                                         const c10::optional<at::Tensor>& extra) {
  // Nested ATen calls must not record autograd history (inputs may require grad).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const char* op = "activation_share";
  check_activation_share_args(op, a, grad, pre_activation, extra, /*allow_half=*/true);
  check_cuda(op, "a", a);  // the other tensors were checked to share a's device
  const c10::cuda::CUDAGuard guard(a.device());

  const auto ac = a.contiguous(), gc = grad.contiguous(), zc = pre_activation.contiguous();
  at::Tensor ec;
  if (extra.has_value()) ec = extra->contiguous();
  auto relevance = at::empty(pixel_shape(a), a.options());
  auto g = at::empty_like(zc);
  const int64_t C = a.size(1), P = pixels_per_sample(a), npix = a.size(0) * P;
  if (npix == 0) return {relevance, g};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "activation_share_cuda", [&] {
    const scalar_t* e = ec.defined() ? ec.const_data_ptr<scalar_t>() : nullptr;
    const int lanes = P >= 32 ? 1 : 32;
    auto kernel = lanes == 1 ? activation_share_kernel<scalar_t, 1> : activation_share_kernel<scalar_t, 32>;
    kernel<<<grid_for(npix * lanes), kThreads, 0, stream>>>(
        ac.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(), e,
        relevance.mutable_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(), C, P, npix);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {relevance, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> activation_share_backward_cuda(
    const at::Tensor& grad_relevance, const at::Tensor& grad_g, const at::Tensor& a,
    const at::Tensor& grad, const at::Tensor& pre_activation, const at::Tensor& relevance) {
  // Nested ATen calls must not record autograd history (inputs may require grad).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const char* op = "activation_share_backward";
  check_activation_share_backward_args(op, grad_relevance, grad_g, a, grad, pre_activation,
                                       relevance, /*allow_half=*/true);
  const auto pshape = pixel_shape(a);
  check_cuda(op, "a", a);  // the other tensors were checked to share a's device
  const c10::cuda::CUDAGuard guard(a.device());

  const auto drc = grad_relevance.contiguous(), dgc = grad_g.contiguous(), ac = a.contiguous(),
             gc = grad.contiguous(), zc = pre_activation.contiguous(), rc = relevance.contiguous();
  auto grad_a = at::empty_like(ac), grad_grad = at::empty_like(ac), grad_z = at::empty_like(ac);
  auto grad_extra = at::empty(pshape, a.options());
  const int64_t C = a.size(1), P = pixels_per_sample(a), npix = a.size(0) * P;
  if (npix == 0) return {grad_a, grad_grad, grad_z, grad_extra};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "activation_share_backward_cuda", [&] {
    const int lanes = P >= 32 ? 1 : 32;
    auto kernel = lanes == 1 ? activation_share_backward_kernel<scalar_t, 1>
                             : activation_share_backward_kernel<scalar_t, 32>;
    kernel<<<grid_for(npix * lanes), kThreads, 0, stream>>>(
        drc.const_data_ptr<scalar_t>(), dgc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(),
        gc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
        grad_a.mutable_data_ptr<scalar_t>(), grad_grad.mutable_data_ptr<scalar_t>(),
        grad_z.mutable_data_ptr<scalar_t>(), grad_extra.mutable_data_ptr<scalar_t>(), C, P, npix);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_grad, grad_z, grad_extra};
}

}  // namespace
}  // namespace cuda
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CUDA, m) {
  m.impl("activation_share", &srd_ext::cuda::activation_share_cuda);
  m.impl("activation_share_backward", &srd_ext::cuda::activation_share_backward_cuda);
}
