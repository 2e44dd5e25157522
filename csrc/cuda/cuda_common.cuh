// Small helpers shared by the CUDA kernels of srd_ext.
#pragma once
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// The stream API of c10 (what at::cuda::getCurrentCUDAStream forwards to); ATen/cuda/CUDAContext.h
// is avoided because it needs the cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "common.h"

namespace srd_ext {
namespace cuda {

constexpr int kThreads = 256;

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "srd_ext::", op, ": ", name, " must be a CUDA tensor, got one on ",
              t.device());
}

// Blocks for a grid-stride loop over n items; capped so the grid size always fits.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20)));
}

// Streaming multiprocessors of a device (queried once per device).
inline int64_t multiprocessors(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const int d = static_cast<int>(device);
  int n = d >= 0 && d < 64 ? cache[d].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
    if (d >= 0 && d < 64) cache[d].store(n, std::memory_order_relaxed);
  }
  return n;
}

__device__ __forceinline__ float dev_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double dev_sqrt(double v) { return sqrt(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block; every thread gets the result. `scratch` needs 32 entries; the
// block size must be a multiple of 32, and every thread of the block must call this.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(r);
}

}  // namespace cuda
}  // namespace srd_ext
