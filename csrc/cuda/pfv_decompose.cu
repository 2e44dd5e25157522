// CUDA kernel of pfv_decompose (groups = 1).
// The positions are checked on the device (a host check would copy them back and synchronize,
// which CUDA graphs cannot capture): a row outside the output raises a device-side assertion
// that names the row, like an out-of-range index in torch's own CUDA kernels.
// Three passes over the requested output pixels (rows):
//   1. one block per (row, tap): Y_t = W_t x_i (into an accumulation-dtype buffer) and n_t;
//   2. one block per row: z = sum_t Y_t + bias, ||z||^2 and S = sum_t n_t;
//   3. one block per (row, tap): v_hat_t = Y_t + bias * n_t / S and mu_t = <v_hat_t, z> / ||z||^2.
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace srd_ext {
namespace cuda {
namespace {

enum BiasShare : int { kNone = 0, kContribution = 1, kInput = 2 };

// x: (B, C_in, H, W); wp: weight as (T, C_in, C_out); pos: (N, 3).
// y: (N, T, C_out) and tap_norm: (N, T), both in the accumulation dtype.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    tap_outputs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp,
                       const int64_t* __restrict__ pos, acc_t* __restrict__ y,
                       acc_t* __restrict__ tap_norm, ConvGeometry g, int64_t batch, int64_t c_in,
                       int64_t c_out, int mode) {
  __shared__ acc_t xs[kThreads];
  __shared__ acc_t scratch[32];
  const int64_t T = g.taps();
  const int64_t rt = blockIdx.x, r = rt / T, t = rt % T;
  const int tid = threadIdx.x;
  const int64_t b = pos[r * 3], oy = pos[r * 3 + 1], ox = pos[r * 3 + 2];
  const bool valid = b >= 0 && b < batch && oy >= 0 && oy < g.y.out && ox >= 0 && ox < g.x.out;
  // One report per row (its first tap's block, thread 0); every thread leaves the row alone.
  CUDA_KERNEL_ASSERT_PRINTF(
      valid || t != 0 || tid != 0,
      "srd_ext::pfv_decompose: positions row %lld is (b, y, x) = (%lld, %lld, %lld) but the valid "
      "ranges are b in [0, %lld), y in [0, %lld), x in [0, %lld)",
      static_cast<long long>(r), static_cast<long long>(b), static_cast<long long>(oy),
      static_cast<long long>(ox), static_cast<long long>(batch), static_cast<long long>(g.y.out),
      static_cast<long long>(g.x.out));
  const int64_t iy = g.y.in_coord(oy, t / g.kw());
  const int64_t ix = g.x.in_coord(ox, t % g.kw());
  acc_t* yr = y + rt * c_out;
  if (!valid || !g.y.inside(iy) || !g.x.inside(ix)) {  // whole block
    for (int64_t o = tid; o < c_out; o += blockDim.x) yr[o] = acc_t(0);
    if (tid == 0) tap_norm[rt] = acc_t(0);
    return;
  }
  const int64_t plane = g.in_pixels();
  const scalar_t* xp = x + b * c_in * plane + iy * g.x.in + ix;
  const scalar_t* wt = wp + t * c_in * c_out;

  acc_t x2 = 0, y2 = 0;
  for (int64_t o0 = 0; o0 < c_out; o0 += blockDim.x) {
    const int64_t o = o0 + tid;
    acc_t acc = 0;
    for (int64_t c0 = 0; c0 < c_in; c0 += kThreads) {
      __syncthreads();  // xs still read by the previous chunk
      if (c0 + tid < c_in) {
        const acc_t v = static_cast<acc_t>(xp[(c0 + tid) * plane]);
        xs[tid] = v;
        if (o0 == 0) x2 += v * v;
      }
      __syncthreads();
      if (o < c_out) {
        const int64_t nc = c_in - c0 < kThreads ? c_in - c0 : kThreads;
        const scalar_t* wc = wt + c0 * c_out + o;
        for (int64_t c = 0; c < nc; ++c) acc += static_cast<acc_t>(wc[c * c_out]) * xs[c];
      }
    }
    if (o < c_out) {
      yr[o] = acc;
      y2 += acc * acc;
    }
  }
  if (mode == kContribution) {
    y2 = block_sum(y2, scratch);
    if (tid == 0) tap_norm[rt] = dev_sqrt(y2);
  } else if (mode == kInput) {
    x2 = block_sum(x2, scratch);
    if (tid == 0) tap_norm[rt] = dev_sqrt(x2);
  } else if (tid == 0) {
    tap_norm[rt] = acc_t(0);
  }
}

// One block per row: z = sum_t Y_t + bias (stored), row_sums[r] = (S, ||z||^2).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_sums_kernel(const acc_t* __restrict__ y, const acc_t* __restrict__ tap_norm,
                    const scalar_t* __restrict__ bias,  // may be null
                    acc_t* __restrict__ z, acc_t* __restrict__ row_sums, int64_t T, int64_t c_out) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  acc_t s = 0;
  for (int64_t t = tid; t < T; t += blockDim.x) s += tap_norm[r * T + t];
  s = block_sum(s, scratch);
  acc_t z2 = 0;
  for (int64_t o = tid; o < c_out; o += blockDim.x) {
    acc_t v = bias != nullptr ? static_cast<acc_t>(bias[o]) : acc_t(0);
    for (int64_t t = 0; t < T; ++t) v += y[(r * T + t) * c_out + o];
    z[r * c_out + o] = v;
    z2 += v * v;
  }
  z2 = block_sum(z2, scratch);
  if (tid == 0) {
    row_sums[2 * r] = s;
    row_sums[2 * r + 1] = z2;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    share_kernel(const acc_t* __restrict__ y, const acc_t* __restrict__ tap_norm,
                 const scalar_t* __restrict__ bias,  // may be null
                 const acc_t* __restrict__ z, const acc_t* __restrict__ row_sums,
                 scalar_t* __restrict__ v_hat, scalar_t* __restrict__ mu, int64_t T,
                 int64_t c_out) {
  __shared__ acc_t scratch[32];
  const int64_t rt = blockIdx.x, r = rt / T;
  const int tid = threadIdx.x;
  const acc_t S = row_sums[2 * r], z2 = row_sums[2 * r + 1];
  const acc_t share = positive_or_nan(S) ? tap_norm[rt] / S : acc_t(0);
  acc_t dot = 0;
  for (int64_t o = tid; o < c_out; o += blockDim.x) {
    acc_t v = y[rt * c_out + o];
    if (bias != nullptr) v += static_cast<acc_t>(bias[o]) * share;
    v_hat[rt * c_out + o] = static_cast<scalar_t>(v);
    dot += v * z[r * c_out + o];
  }
  dot = block_sum(dot, scratch);
  if (tid == 0) mu[rt] = static_cast<scalar_t>(positive_or_nan(z2) ? dot / z2 : acc_t(0));
}

std::tuple<at::Tensor, at::Tensor> pfv_decompose_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& positions, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view bias_share) {
  const NestedCallGuard nested;
  const char* op = "pfv_decompose";
  const ConvGeometry g = check_tap_norms_args(op, x, weight, stride, padding, dilation,
                                              /*groups=*/1, /*allow_half=*/true);
  const int mode = static_cast<int>(bias_share_mode(op, bias_share));
  check_cuda(op, "x", x);
  const int64_t B = x.size(0), c_in = x.size(1), c_out = weight.size(0), T = g.taps();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "srd_ext::", op,
                ": bias must have shape (", c_out, ",), got ", shape_str(*bias));
    check_same(op, "bias", *bias, x, "x");
  }
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, "srd_ext::", op,
              ": positions must be (N, 3) rows (b, y, x), got shape ", shape_str(positions));
  TORCH_CHECK(positions.scalar_type() == at::kLong, "srd_ext::", op,
              ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.device() == x.device(), "srd_ext::", op, ": positions is on ",
              positions.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = positions.size(0);
  auto v_hat = at::empty({N, T, c_out}, x.options());
  auto mu = at::empty({N, T}, x.options());
  if (N == 0) return {v_hat, mu};
  TORCH_CHECK(N * T <= std::numeric_limits<int32_t>::max(), "srd_ext::", op,
              ": too many positions (", N, ") for a kernel with ", T, " taps");

  const auto xc = x.contiguous();
  const auto wp = weight.permute({2, 3, 1, 0}).contiguous();  // (kh, kw, C_in, C_out)
  const auto pos = positions.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->contiguous();
  const auto acc_opts = x.options().dtype(at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true));
  auto y = at::empty({N, T, c_out}, acc_opts);
  auto tap_norm = at::empty({N, T}, acc_opts);
  auto z = at::empty({N, c_out}, acc_opts);
  auto row_sums = at::empty({N, 2}, acc_opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks_rt = static_cast<unsigned int>(N * T);
  const auto blocks_r = static_cast<unsigned int>(N);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pfv_decompose_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
        tap_outputs_kernel<scalar_t, acc_t><<<blocks_rt, kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), wp.const_data_ptr<scalar_t>(),
            pos.const_data_ptr<int64_t>(), y.mutable_data_ptr<acc_t>(),
            tap_norm.mutable_data_ptr<acc_t>(), g, B, c_in, c_out, mode);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        row_sums_kernel<scalar_t, acc_t><<<blocks_r, kThreads, 0, stream>>>(
            y.const_data_ptr<acc_t>(), tap_norm.const_data_ptr<acc_t>(), bp,
            z.mutable_data_ptr<acc_t>(), row_sums.mutable_data_ptr<acc_t>(), T, c_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        share_kernel<scalar_t, acc_t><<<blocks_rt, kThreads, 0, stream>>>(
            y.const_data_ptr<acc_t>(), tap_norm.const_data_ptr<acc_t>(), bp,
            z.const_data_ptr<acc_t>(), row_sums.const_data_ptr<acc_t>(),
            v_hat.mutable_data_ptr<scalar_t>(), mu.mutable_data_ptr<scalar_t>(), T, c_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {v_hat, mu};
}

}  // namespace
}  // namespace cuda
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CUDA, m) {
  m.impl("pfv_decompose", &srd_ext::cuda::pfv_decompose_cuda);
}
