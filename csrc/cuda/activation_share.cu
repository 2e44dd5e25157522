// CUDA kernels of activation_share and activation_share_backward.
//
// Tensors are viewed as (B, C, P) with P = H*W (1 for (B, C)). Each pixel (b, p) reduces two sums
// over its C channels, then writes every channel. A block of 256 threads is a TX x TY grid:
// TX = min(32, P rounded up to a power of 2) consecutive pixels of one sample (adjacent in
// memory, so a warp's loads coalesce) times TY = 256 / TX lanes that split the channels; the
// lanes' partial sums meet in shared memory. When there are too few pixels to fill the GPU that
// way (batch 1, a 7x7 map, or (B, C) inputs), the channels are also split across blocks: a first
// pass writes one partial sum per (pixel, channel slice), a second adds them up in a fixed order
// and writes the outputs. No atomics: the results do not depend on scheduling. Sums accumulate in
// float32 for float16/bfloat16 inputs; NaN inputs reach the outputs of their pixel.
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace srd_ext {
namespace cuda {
namespace {

// Forward: s0 = sum_c a*grad, s1 = ||z||^2; relevance = s0 + extra, g = z * relevance / s1.
template <typename scalar_t>
struct ForwardOp {
  using acc_t = at::acc_type<scalar_t, true>;
  struct Pixel {
    acc_t scale;
  };
  const scalar_t* a;
  const scalar_t* grad;
  const scalar_t* z;
  const scalar_t* extra;  // may be null
  scalar_t* relevance;
  scalar_t* g;

  __device__ __forceinline__ void add(int64_t k, acc_t& s0, acc_t& s1) const {
    const acc_t zv = static_cast<acc_t>(z[k]);
    s0 += static_cast<acc_t>(a[k]) * static_cast<acc_t>(grad[k]);
    s1 += zv * zv;
  }
  __device__ __forceinline__ Pixel pixel(int64_t pix, acc_t s0, acc_t s1, bool store) const {
    const acc_t r = s0 + (extra != nullptr ? static_cast<acc_t>(extra[pix]) : acc_t(0));
    if (store) relevance[pix] = static_cast<scalar_t>(r);
    return Pixel{positive_or_nan(s1) ? r / s1 : acc_t(0)};
  }
  __device__ __forceinline__ void write(int64_t k, const Pixel& px) const {
    g[k] = static_cast<scalar_t>(static_cast<acc_t>(z[k]) * px.scale);
  }
};

// Backward: s0 = ||z||^2, s1 = q = sum_c d_g*z; with s = R/n2, dRt = d_rel + q/n2:
// grad_a = dRt*grad, grad_grad = dRt*a, grad_z = d_g*s - (2 q s / n2) z, grad_extra = dRt.
template <typename scalar_t>
struct BackwardOp {
  using acc_t = at::acc_type<scalar_t, true>;
  struct Pixel {
    acc_t s, d_rt, kz;
    bool pos;
  };
  const scalar_t* d_rel;
  const scalar_t* d_g;
  const scalar_t* a;
  const scalar_t* grad;
  const scalar_t* z;
  const scalar_t* relevance;
  scalar_t* grad_a;
  scalar_t* grad_grad;
  scalar_t* grad_z;
  scalar_t* grad_extra;

  __device__ __forceinline__ void add(int64_t k, acc_t& s0, acc_t& s1) const {
    const acc_t zv = static_cast<acc_t>(z[k]);
    s0 += zv * zv;
    s1 += static_cast<acc_t>(d_g[k]) * zv;
  }
  __device__ __forceinline__ Pixel pixel(int64_t pix, acc_t n2, acc_t q, bool store) const {
    const bool pos = positive_or_nan(n2);
    const acc_t s = pos ? static_cast<acc_t>(relevance[pix]) / n2 : acc_t(0);
    const acc_t d_rt = static_cast<acc_t>(d_rel[pix]) + (pos ? q / n2 : acc_t(0));
    if (store) grad_extra[pix] = static_cast<scalar_t>(d_rt);
    return Pixel{s, d_rt, pos ? acc_t(2) * q * s / n2 : acc_t(0), pos};
  }
  __device__ __forceinline__ void write(int64_t k, const Pixel& px) const {
    grad_a[k] = static_cast<scalar_t>(px.d_rt * static_cast<acc_t>(grad[k]));
    grad_grad[k] = static_cast<scalar_t>(px.d_rt * static_cast<acc_t>(a[k]));
    grad_z[k] = static_cast<scalar_t>(
        px.pos ? static_cast<acc_t>(d_g[k]) * px.s - px.kz * static_cast<acc_t>(z[k]) : acc_t(0));
  }
};

// Work split: tiles of TX pixels (B * ntile of them) times nsplit slices of `chunk` channels.
struct Split {
  int64_t C, P, ntile, nsplit, chunk;
  int TX;
};

// Per-thread position in a tile: pixel p of sample b (valid when p < P), channel lane ty.
struct Lane {
  int64_t b, p, pix, base;
  int tx, ty, TY;
  bool valid;
};

__device__ __forceinline__ Lane lane_of(const Split& S, int64_t tile) {
  Lane l;
  l.tx = threadIdx.x % S.TX;
  l.ty = threadIdx.x / S.TX;
  l.TY = blockDim.x / S.TX;
  l.b = tile / S.ntile;
  l.p = (tile % S.ntile) * S.TX + l.tx;
  l.valid = l.p < S.P;
  l.pix = l.b * S.P + l.p;
  l.base = l.b * S.C * S.P + l.p;
  return l;
}

// Sums of the lanes of each pixel column, in a fixed order; every thread of the column gets
// them. `sh` holds 2 * blockDim.x values; all threads of the block must call this.
template <typename acc_t>
__device__ __forceinline__ void column_sums(const Lane& l, int TX, acc_t* sh, acc_t& s0,
                                            acc_t& s1) {
  __syncthreads();  // sh may still be read by the previous tile
  sh[threadIdx.x] = s0;
  sh[blockDim.x + threadIdx.x] = s1;
  __syncthreads();
  if (l.ty == 0) {
    acc_t t0 = 0, t1 = 0;
    for (int y = 0; y < l.TY; ++y) {
      t0 += sh[y * TX + l.tx];
      t1 += sh[blockDim.x + y * TX + l.tx];
    }
    sh[l.tx] = t0;  // row 0 of the column: only this thread reads or writes it now
    sh[blockDim.x + l.tx] = t1;
  }
  __syncthreads();
  s0 = sh[l.tx];
  s1 = sh[blockDim.x + l.tx];
}

// One pass: reduce over all channels, then write them (nsplit == 1).
template <typename Op>
__global__ void __launch_bounds__(kThreads) fused_kernel(Op op, Split S, int64_t tiles) {
  using acc_t = typename Op::acc_t;
  __shared__ acc_t sh[2 * kThreads];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Lane l = lane_of(S, tile);
    acc_t s0 = 0, s1 = 0;
    if (l.valid)
      for (int64_t c = l.ty; c < S.C; c += l.TY) op.add(l.base + c * S.P, s0, s1);
    column_sums(l, S.TX, sh, s0, s1);
    if (l.valid) {
      const auto px = op.pixel(l.pix, s0, s1, /*store=*/l.ty == 0);
      for (int64_t c = l.ty; c < S.C; c += l.TY) op.write(l.base + c * S.P, px);
    }
  }
}

// First of two passes: partial sums of channel slice blockIdx.y -> part (nsplit, npix, 2).
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(Op op, Split S, int64_t tiles, typename Op::acc_t* __restrict__ part) {
  using acc_t = typename Op::acc_t;
  __shared__ acc_t sh[2 * kThreads];
  const int64_t split = blockIdx.y, npix = tiles / S.ntile * S.P;
  const int64_t c0 = split * S.chunk, c1 = std::min(S.C, c0 + S.chunk);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Lane l = lane_of(S, tile);
    acc_t s0 = 0, s1 = 0;
    if (l.valid)
      for (int64_t c = c0 + l.ty; c < c1; c += l.TY) op.add(l.base + c * S.P, s0, s1);
    column_sums(l, S.TX, sh, s0, s1);
    if (l.valid && l.ty == 0) {
      part[(split * npix + l.pix) * 2] = s0;
      part[(split * npix + l.pix) * 2 + 1] = s1;
    }
  }
}

// Second pass: add the partial sums of every slice (in slice order), write channel slice
// blockIdx.y.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(Op op, Split S, int64_t tiles, const typename Op::acc_t* __restrict__ part) {
  using acc_t = typename Op::acc_t;
  __shared__ acc_t sh[2 * kThreads];
  const int64_t split = blockIdx.y, npix = tiles / S.ntile * S.P;
  const int64_t c0 = split * S.chunk, c1 = std::min(S.C, c0 + S.chunk);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Lane l = lane_of(S, tile);
    acc_t s0 = 0, s1 = 0;
    if (l.valid && l.ty == 0)
      for (int64_t k = 0; k < S.nsplit; ++k) {
        s0 += part[(k * npix + l.pix) * 2];
        s1 += part[(k * npix + l.pix) * 2 + 1];
      }
    column_sums(l, S.TX, sh, s0, s1);  // the other lanes add zeros
    if (l.valid) {
      const auto px = op.pixel(l.pix, s0, s1, /*store=*/l.ty == 0 && split == 0);
      for (int64_t c = c0 + l.ty; c < c1; c += l.TY) op.write(l.base + c * S.P, px);
    }
  }
}

// Threads per channel slice at least this many channels each, when splitting across blocks.
constexpr int64_t kMinChannelsPerLane = 4;
constexpr int64_t kMaxGridX = int64_t{1} << 20;

Split plan_split(int64_t B, int64_t C, int64_t P, c10::DeviceIndex device) {
  Split S;
  S.C = C;
  S.P = P;
  int tx = 1;
  while (tx < P && tx < 32) tx *= 2;
  S.TX = tx;
  const int64_t TY = kThreads / tx;
  S.ntile = (P + tx - 1) / tx;
  // Enough blocks for a few waves on every multiprocessor, without slicing the channels finer
  // than kMinChannelsPerLane per lane.
  const int64_t tiles = B * S.ntile, target = 4 * multiprocessors(device);
  int64_t nsplit = 1;
  if (tiles < target) {
    const int64_t per_slice = TY * kMinChannelsPerLane;
    nsplit = std::min((target + tiles - 1) / tiles, (C + per_slice - 1) / per_slice);
    nsplit = std::max<int64_t>(1, std::min<int64_t>(nsplit, 65535));
  }
  S.chunk = (C + nsplit - 1) / std::max<int64_t>(1, nsplit);
  S.nsplit = S.chunk > 0 ? (C + S.chunk - 1) / S.chunk : 1;
  return S;
}

template <typename Op>
void launch(const Op& op, const Split& S, int64_t B, const at::Tensor& like, cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  const int64_t tiles = B * S.ntile;
  const auto gx = static_cast<unsigned int>(std::min(tiles, kMaxGridX));
  if (S.nsplit <= 1) {
    fused_kernel<Op><<<gx, kThreads, 0, stream>>>(op, S, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto part = at::empty({S.nsplit, B * S.P, 2},
                        like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const dim3 grid(gx, static_cast<unsigned int>(S.nsplit));
  auto* pp = static_cast<acc_t*>(part.data_ptr());
  partial_kernel<Op><<<grid, kThreads, 0, stream>>>(op, S, tiles, pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<Op><<<grid, kThreads, 0, stream>>>(op, S, tiles, pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t pixels_per_sample(const at::Tensor& a) { return a.dim() == 4 ? a.size(2) * a.size(3) : 1; }

std::tuple<at::Tensor, at::Tensor> activation_share_cuda(const at::Tensor& a,
                                                         const at::Tensor& grad,
                                                         const at::Tensor& pre_activation,
                                                         const c10::optional<at::Tensor>& extra) {
  const NestedCallGuard nested;
  const char* op = "activation_share";
  check_activation_share_args(op, a, grad, pre_activation, extra, /*allow_half=*/true);
  check_cuda(op, "a", a);  // the other tensors were checked to share a's device
  const c10::cuda::CUDAGuard guard(a.device());

  const auto ac = a.contiguous(), gc = grad.contiguous(), zc = pre_activation.contiguous();
  at::Tensor ec;
  if (extra.has_value()) ec = extra->contiguous();
  auto relevance = at::empty(pixel_shape(a), a.options());
  auto g = at::empty_like(zc);
  const int64_t B = a.size(0), C = a.size(1), P = pixels_per_sample(a);
  if (B * P == 0) return {relevance, g};
  if (C == 0) {  // empty sums: relevance = extra (or 0), g has no elements
    if (ec.defined())
      relevance.copy_(ec);
    else
      relevance.zero_();
    return {relevance, g};
  }

  const Split S = plan_split(B, C, P, a.device().index());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "activation_share_cuda", [&] {
        const ForwardOp<scalar_t> fop{ac.const_data_ptr<scalar_t>(),
                                      gc.const_data_ptr<scalar_t>(),
                                      zc.const_data_ptr<scalar_t>(),
                                      ec.defined() ? ec.const_data_ptr<scalar_t>() : nullptr,
                                      relevance.mutable_data_ptr<scalar_t>(),
                                      g.mutable_data_ptr<scalar_t>()};
        launch(fop, S, B, a, stream);
      });
  return {relevance, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> activation_share_backward_cuda(
    const at::Tensor& grad_relevance, const at::Tensor& grad_g, const at::Tensor& a,
    const at::Tensor& grad, const at::Tensor& pre_activation, const at::Tensor& relevance) {
  const NestedCallGuard nested;
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
  const int64_t B = a.size(0), C = a.size(1), P = pixels_per_sample(a);
  if (B * P == 0) return {grad_a, grad_grad, grad_z, grad_extra};
  if (C == 0) {  // n2 = q = 0: grad_extra = grad_relevance
    grad_extra.copy_(drc);
    return {grad_a, grad_grad, grad_z, grad_extra};
  }

  const Split S = plan_split(B, C, P, a.device().index());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "activation_share_backward_cuda", [&] {
        const BackwardOp<scalar_t> bop{
            drc.const_data_ptr<scalar_t>(),      dgc.const_data_ptr<scalar_t>(),
            ac.const_data_ptr<scalar_t>(),       gc.const_data_ptr<scalar_t>(),
            zc.const_data_ptr<scalar_t>(),       rc.const_data_ptr<scalar_t>(),
            grad_a.mutable_data_ptr<scalar_t>(), grad_grad.mutable_data_ptr<scalar_t>(),
            grad_z.mutable_data_ptr<scalar_t>(), grad_extra.mutable_data_ptr<scalar_t>()};
        launch(bop, S, B, a, stream);
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
