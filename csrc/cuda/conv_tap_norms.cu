// CUDA kernels of conv_tap_norms and conv_tap_norms_backward.
//
// Forward: for each tap t and group, Y = W_t X_t is a (C_out/groups) x (valid pixels) matrix
// product whose columns are only needed through their squared norms. The tiled kernel computes a
// 64 x 64 tile of Y in registers, squares it, reduces it over its output channels and adds the
// partial sums into a (B, T, H, W) accumulator with atomicAdd (one add per pixel and tile of
// output channels); a last pass takes the square root. Y itself is never stored. When a group's
// weight block is tiny (depthwise or few input channels) a direct kernel, one thread per (pixel,
// tap), is faster than the tiles and needs no atomics.
//
// Backward: per tap, the valid input pixels form a strided sub-grid of x, so the pass is written
// as batched matrix products over strided views (no gather), in the accumulation dtype, over
// chunks of the batch to bound the temporary memory.
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "cuda/conv_geometry.cuh"
#include "cuda/cuda_common.cuh"

namespace srd_ext {
namespace cuda {
namespace {

constexpr int BM = 64;  // output channels per tile
constexpr int BN = 64;  // pixels per tile
constexpr int BK = 16;  // input channels per step
constexpr int kTileThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
static_assert(BM == 64 && BN == 64 && kTileThreads == 256, "the thread mapping assumes these");

// Weight block of a group above which the tiled kernel is used.
constexpr int64_t kDirectMaxWeights = 512;

// x: (B, C_in, H, W); wt: weight as (T, C_out, Cg); sq: (B, T, H, W) sums of squares (zeroed).
// grid.x = B * T * ntj (pixel tiles), grid.y = groups * nto (output-channel tiles).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads)
    tap_norms_tiled_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wt,
                           acc_t* __restrict__ sq, ConvGeom g, int64_t c_in, int64_t c_out,
                           int64_t cg, int64_t cog, int64_t ntj, int64_t nto) {
  __shared__ acc_t As[BK][BM + 1];  // padded: written column-wise
  __shared__ acc_t Bs[BK][BN];
  __shared__ acc_t red[kTileThreads / 16][BN];

  const int tid = threadIdx.x;
  const int64_t T = g.kh * g.kw;
  int64_t bx = blockIdx.x;
  const int64_t jt = bx % ntj;
  bx /= ntj;
  const int64_t t = bx % T, b = bx / T;
  const int64_t ot = blockIdx.y % nto, grp = blockIdx.y / nto;
  const int64_t ky = t / g.kw, kx = t % g.kw;

  // Output pixels whose tap t reads inside the input: a rectangle, enumerated row-major.
  int64_t oy_lo, oy_hi, ox_lo, ox_hi;
  ConvGeom::valid_range(ky, g.sh, g.ph, g.dh, g.hin, g.hout, oy_lo, oy_hi);
  ConvGeom::valid_range(kx, g.sw, g.pw, g.dw, g.win, g.wout, ox_lo, ox_hi);
  const int64_t nvx = ox_hi - ox_lo, nvalid = (oy_hi - oy_lo) * nvx;
  const int64_t j0 = jt * BN;
  if (j0 >= nvalid) return;  // whole block

  const int64_t plane = g.hin * g.win;
  // Pixel column loaded by this thread (also the one it finally writes when tid < BN).
  const int ln = tid % BN;
  int64_t pix = -1;
  if (j0 + ln < nvalid) {
    const int64_t j = j0 + ln;
    const int64_t iy = ConvGeom::in_coord(oy_lo + j / nvx, ky, g.sh, g.ph, g.dh);
    const int64_t ix = ConvGeom::in_coord(ox_lo + j % nvx, kx, g.sw, g.pw, g.dw);
    pix = iy * g.win + ix;
  }
  const int lk = tid / BN;
  const int wk = tid % BK, wm = tid / BK;
  const int tr = tid / 16, tc = tid % 16;

  const scalar_t* xb = x + (b * c_in + grp * cg) * plane;
  const int64_t o0 = ot * BM;
  const scalar_t* wb = wt + (t * c_out + grp * cog + o0) * cg;

  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[i][k] = acc_t(0);

  for (int64_t c0 = 0; c0 < cg; c0 += BK) {
#pragma unroll
    for (int r = 0; r < BK * BN / kTileThreads; ++r) {
      const int k = lk + r * (kTileThreads / BN);
      const int64_t c = c0 + k;
      Bs[k][ln] = (pix >= 0 && c < cg) ? static_cast<acc_t>(xb[c * plane + pix]) : acc_t(0);
    }
#pragma unroll
    for (int r = 0; r < BK * BM / kTileThreads; ++r) {
      const int m = wm + r * (kTileThreads / BK);
      const int64_t c = c0 + wk;
      As[wk][m] = (o0 + m < cog && c < cg) ? static_cast<acc_t>(wb[m * cg + c]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[k][tr + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = Bs[k][tc + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] += av[i] * bv[jj];
    }
    __syncthreads();
  }

  // Rows past C_out/groups and columns of invalid pixels are exactly 0.
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    acc_t s = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) s += acc[i][jj] * acc[i][jj];
    red[tr][tc + 16 * jj] = s;
  }
  __syncthreads();
  if (tid < BN && pix >= 0) {
    acc_t s = 0;
#pragma unroll
    for (int r = 0; r < kTileThreads / 16; ++r) s += red[r][tid];
    atomicAdd(sq + (b * T + t) * plane + pix, s);
  }
}

// One thread per (b, t, output pixel); writes the norm of the input pixel it reads (out zeroed).
template <typename scalar_t, typename acc_t>
__global__ void tap_norms_direct_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ wt,
                                        scalar_t* __restrict__ out, ConvGeom g, int64_t c_in,
                                        int64_t c_out, int64_t cg, int64_t cog, int64_t groups,
                                        int64_t total) {
  const int64_t T = g.kh * g.kw, plane = g.hin * g.win;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    int64_t r = idx;
    const int64_t ox = r % g.wout;
    r /= g.wout;
    const int64_t oy = r % g.hout;
    r /= g.hout;
    const int64_t t = r % T, b = r / T;
    const int64_t iy = ConvGeom::in_coord(oy, t / g.kw, g.sh, g.ph, g.dh);
    const int64_t ix = ConvGeom::in_coord(ox, t % g.kw, g.sw, g.pw, g.dw);
    if (iy < 0 || iy >= g.hin || ix < 0 || ix >= g.win) continue;
    const int64_t pix = iy * g.win + ix;
    acc_t n2 = 0;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const scalar_t* xg = x + (b * c_in + grp * cg) * plane + pix;
      const scalar_t* wg = wt + (t * c_out + grp * cog) * cg;
      for (int64_t o = 0; o < cog; ++o) {
        acc_t y = 0;
        for (int64_t c = 0; c < cg; ++c)
          y += static_cast<acc_t>(wg[o * cg + c]) * static_cast<acc_t>(xg[c * plane]);
        n2 += y * y;
      }
    }
    out[(b * T + t) * plane + pix] = static_cast<scalar_t>(dev_sqrt(n2));
  }
}

// out = sqrt(sq); out may alias sq.
template <typename scalar_t, typename acc_t>
__global__ void sqrt_kernel(const acc_t* sq, scalar_t* out, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    const acc_t v = sq[idx];
    out[idx] = static_cast<scalar_t>(v > acc_t(0) ? dev_sqrt(v) : acc_t(0));
  }
}

at::Tensor conv_tap_norms_cuda(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  // Nested ATen calls must not record autograd history (inputs may require grad).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const char* op = "conv_tap_norms";
  const auto geo = check_tap_norms_args(op, x, weight, stride, padding, dilation, groups,
                                        /*allow_half=*/true);
  check_cuda(op, "x", x);  // weight was checked to share its device
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t B = x.size(0), c_in = x.size(1), c_out = weight.size(0), cg = weight.size(1);
  const int64_t cog = c_out / groups, T = geo.kh * geo.kw;
  const ConvGeom g = make_conv_geom(geo, x.size(2), x.size(3));
  const int64_t plane = g.hin * g.win, nout = g.hout * g.wout;
  const auto st = x.scalar_type();
  const auto acc_dtype = at::toAccumulateType(st, /*is_cuda=*/true);
  if (B == 0 || plane == 0 || cog == 0 || cg == 0) return at::zeros({B, T, g.hin, g.win}, x.options());

  const auto xc = x.contiguous();
  const auto wt = weight.permute({2, 3, 0, 1}).contiguous();  // (kh, kw, C_out, Cg)
  const auto stream = c10::cuda::getCurrentCUDAStream();

  if (cg * cog <= kDirectMaxWeights) {
    auto out = at::zeros({B, T, g.hin, g.win}, x.options());
    const int64_t total = B * T * nout;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "conv_tap_norms_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      tap_norms_direct_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          g, c_in, c_out, cg, cog, groups, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  const int64_t ntj = (nout + BN - 1) / BN, nto = (cog + BM - 1) / BM;
  TORCH_CHECK(B * T * ntj <= std::numeric_limits<int32_t>::max() && groups * nto <= 65535,
              "srd_ext::", op, ": problem too large for the CUDA kernel (x ", shape_str(x),
              ", weight ", shape_str(weight), ")");
  auto sq = at::zeros({B, T, g.hin, g.win}, x.options().dtype(acc_dtype));
  auto out = acc_dtype == st ? sq : at::empty({B, T, g.hin, g.win}, x.options());
  const dim3 grid(static_cast<unsigned int>(B * T * ntj), static_cast<unsigned int>(groups * nto));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "conv_tap_norms_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    tap_norms_tiled_kernel<scalar_t, acc_t><<<grid, kTileThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), sq.mutable_data_ptr<acc_t>(), g,
        c_in, c_out, cg, cog, ntj, nto);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = sq.numel();
    sqrt_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        sq.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Bound on the elements of one temporary of the backward (per batch chunk).
constexpr int64_t kBackwardChunkElems = int64_t{1} << 26;

std::tuple<at::Tensor, at::Tensor> conv_tap_norms_backward_cuda(
    const at::Tensor& grad_tap_norms, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& tap_norms, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  // Nested ATen calls must not record autograd history (inputs may require grad).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const char* op = "conv_tap_norms_backward";
  const auto geo = check_tap_norms_backward_args(op, grad_tap_norms, x, weight, tap_norms, stride,
                                                 padding, dilation, groups, /*allow_half=*/true);
  const int64_t B = x.size(0), c_in = x.size(1), c_out = weight.size(0), cg = weight.size(1);
  const int64_t cog = c_out / groups, T = geo.kh * geo.kw;
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());

  const ConvGeom g = make_conv_geom(geo, x.size(2), x.size(3));
  const auto acc_dtype = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  const auto acc_opts = x.options().dtype(acc_dtype);
  auto grad_x = at::zeros(x.sizes(), acc_opts);
  auto grad_w = at::zeros(weight.sizes(), acc_opts);

  if (B > 0 && g.hin * g.win > 0 && cg > 0 && cog > 0) {
    const auto xa = x.to(acc_dtype);
    const auto wa = weight.to(acc_dtype);
    const auto na = tap_norms.to(acc_dtype);
    const auto pos = na > 0;
    // dn / n where n > 0, else 0 (the masked-out quotient is never used).
    const auto coef =
        at::where(pos, grad_tap_norms.to(acc_dtype) / at::where(pos, na, at::ones_like(na)),
                  at::zeros_like(na));

    for (int64_t t = 0; t < T; ++t) {
      const int64_t ky = t / g.kw, kx = t % g.kw;
      int64_t oy_lo, oy_hi, ox_lo, ox_hi;
      ConvGeom::valid_range(ky, g.sh, g.ph, g.dh, g.hin, g.hout, oy_lo, oy_hi);
      ConvGeom::valid_range(kx, g.sw, g.pw, g.dw, g.win, g.wout, ox_lo, ox_hi);
      const int64_t ny = oy_hi - oy_lo, nx = ox_hi - ox_lo, P = ny * nx;
      if (P == 0) continue;
      // The valid input pixels of tap t: rows iy0 + sh * k, columns ix0 + sw * k.
      const int64_t iy0 = ConvGeom::in_coord(oy_lo, ky, g.sh, g.ph, g.dh);
      const int64_t ix0 = ConvGeom::in_coord(ox_lo, kx, g.sw, g.pw, g.dw);
      auto sub = [&](const at::Tensor& tsr, int64_t ydim) {
        return tsr.slice(ydim, iy0, iy0 + (ny - 1) * g.sh + 1, g.sh)
            .slice(ydim + 1, ix0, ix0 + (nx - 1) * g.sw + 1, g.sw);
      };
      const auto x_t = sub(xa, 2);                     // (B, C_in, ny, nx)
      const auto coef_t = sub(coef.select(1, t), 1);   // (B, ny, nx)
      auto gx_t = sub(grad_x, 2);                      // view into grad_x
      const auto w_t = wa.select(3, kx).select(2, ky).reshape({groups, cog, cg});

      const int64_t per_sample = P * std::max(c_in, c_out);
      const int64_t chunk = std::max<int64_t>(1, kBackwardChunkElems / std::max<int64_t>(1, per_sample));
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t nb = std::min(chunk, B - b0);
        // (groups, Cg, nb * P): columns are the gathered input pixels.
        const auto X = x_t.narrow(0, b0, nb).transpose(0, 1).reshape({groups, cg, nb * P});
        const auto cf = coef_t.narrow(0, b0, nb).reshape({1, 1, nb * P});
        const auto dY = at::bmm(w_t, X).mul_(cf);                    // (groups, Cog, nb * P)
        const auto gX = at::bmm(w_t.transpose(1, 2), dY);            // (groups, Cg, nb * P)
        gx_t.narrow(0, b0, nb).add_(gX.view({c_in, nb, ny, nx}).transpose(0, 1));
        grad_w.select(3, kx).select(2, ky).add_(
            at::bmm(dY, X.transpose(1, 2)).view({c_out, cg}));      // (groups, Cog, Cg)
      }
    }
  }
  return {grad_x.to(x.scalar_type()), grad_w.to(weight.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace srd_ext

TORCH_LIBRARY_IMPL(srd_ext, CUDA, m) {
  m.impl("conv_tap_norms", &srd_ext::cuda::conv_tap_norms_cuda);
  m.impl("conv_tap_norms_backward", &srd_ext::cuda::conv_tap_norms_backward_cuda);
}
