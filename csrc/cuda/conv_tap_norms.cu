// CUDA kernels of conv_tap_norms and conv_tap_norms_backward.
//
// Forward: the three forms of the CPU kernel (csrc/cpu/conv_tap_norms.cpp), chosen per call by
// cost or by SRD_EXT_TAP_NORMS_PATH:
// - product and Gram forms: the products are computed by the library the forward conv uses, as
//   a 1x1 convolution (cuDNN; TF32, float16 or bfloat16 tensor cores as torch's settings allow)
//   of one phase of the stride lattice, x[:, :, py::sh, px::sw], with the phase's stacked tap
//   matrices W_t (product form) or Gram matrices G_t = W_t^T W_t (Gram form, fewer input than
//   output channels per group). One kernel then squares and sums the products over the output
//   channels (or takes their dot product with x) for every (pixel, tap) pair and writes the
//   norm. The products are bounded per chunk of pixels (kChunkBytes), never (B, T, C_out, H, W).
// - direct form (at most 16 input channels per group: an RGB stem, depthwise and narrow grouped
//   convs): one thread per (pixel, tap) evaluates sum_g x_g^T G_tg x_g with x in registers.
// There are no atomics: every output element is written by one thread, so the results do not
// depend on scheduling (torch.use_deterministic_algorithms needs nothing more here; the 1x1
// convolutions follow torch's own deterministic settings). NaN in x reaches the norms of its
// pixel. float16/bfloat16 inputs accumulate in float32.
//
// Backward: per tap, the valid input pixels form a strided sub-grid of x, so the pass is written
// as batched matrix products over strided views, in the accumulation dtype, over chunks of the
// batch that bound every temporary (a tap's coefficients dn/n included) to kBackwardChunkElems.
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda/cuda_common.cuh"
#include "env.h"

namespace srd_ext {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Choice of the form.

using Form = TapNormsForm;

// Largest Cg of the direct kernel (its x values live in registers).
constexpr int64_t kDirectMaxCg = 16;

// Gram form only where its matrices (T x C_out/groups x Cg^2 multiply-adds per group, in
// float32) cost at most this fraction of the product form's GEMM.
constexpr double kGramSetupShare = 0.25;

Form choose_form(const char* op, int64_t Cg, int64_t Cog, int64_t T, int64_t pairs) {
  if (const auto forced = forced_tap_norms_form(op, "")) {
    TORCH_CHECK(*forced != Form::kDirect || Cg <= kDirectMaxCg, "srd_ext::", op,
                ": the direct path takes at most ", kDirectMaxCg,
                " input channels per group on CUDA, got ", Cg);
    return *forced;
  }
  // The direct kernel costs Cg(Cg+1)/2 multiply-adds per (pixel, tap, group) on the CUDA cores
  // and reads only x; the GEMM forms run on tensor cores but write and read back C_out/groups
  // (product) or Cg (Gram) values per (pixel, tap, group). For a few channels the direct kernel
  // wins; beyond, the form with fewer values, if the Gram matrices are cheap next to the GEMM.
  // (Not yet fitted to measurements: benchmarks/bench_ops.py --paths times each form.)
  if (Cg <= kDirectMaxCg) return Form::kDirect;
  const double setup = static_cast<double>(T) * Cog * Cg * Cg;
  const double product_gemm = static_cast<double>(pairs) * Cog * Cg;
  return Cg < Cog && setup <= kGramSetupShare * product_gemm ? Form::kGram : Form::kProduct;
}

// (T, groups, R, Cg) matrices of the form: the tap matrices W_t (R = C_out/groups) or the Gram
// matrices G_t = W_t^T W_t (R = Cg), the latter computed in `gram_dtype` and rounded once.
at::Tensor form_matrices(const at::Tensor& weight, int64_t T, int64_t groups, Form form,
                         at::ScalarType dtype, at::ScalarType gram_dtype) {
  const int64_t Cog = weight.size(0) / groups, Cg = weight.size(1);
  const auto wt = weight.permute({2, 3, 0, 1}).reshape({T, groups, Cog, Cg});
  if (form == Form::kProduct) return wt.to(dtype);
  const auto wd = wt.to(gram_dtype);
  return at::matmul(wd.transpose(2, 3), wd).to(dtype);
}

// ---------------------------------------------------------------------------------------------
// Product and Gram forms.

// Bytes of products alive at once.
constexpr int64_t kChunkBytes = int64_t{32} << 20;
// Taps per product block (a kernel argument holds their rectangles).
constexpr int kMaxTaps = 64;

// The taps of one block of a phase: for each, its index and the rectangle of phase pixels it
// reaches (rows y0 .. y0+ny-1, columns x0 .. x0+nx-1, in phase coordinates).
struct PhaseTaps {
  int32_t n;
  int32_t t[kMaxTaps], y0[kMaxTaps], ny[kMaxTaps], x0[kMaxTaps], nx[kMaxTaps];
};

template <typename T>
struct View4 {  // a strided 4-d view (b, c, y, x)
  const T* p;
  int64_t sb, sc, sy, sx;
  __device__ __forceinline__ T at(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return p[b * sb + c * sc + y * sy + x * sx];
  }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return View4<T>{t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// One chunk of phase pixels: samples b0 .. b0+nb-1, phase rows yp0 .. yp0+nyc-1, all Wp columns.
struct Chunk {
  int64_t b0, nb, yp0, nyc, Wp;
  // Phase origin and stride: phase pixel (yp, xp) is pixel (py + yp*sh, px + xp*sw) of x.
  int64_t py, px, sh, sw;
  int64_t T, H, W;
};

// For every (pixel of the chunk, tap of the block): out = sqrt(sum_g sum_r y[g, k, r]^2) (product
// form) or sqrt(sum_g sum_r y[g, k, r] x[g, r]) (Gram form) where the tap reaches the pixel, else
// 0. y: (nb, groups*ntaps*R, nyc, Wp) products, channels ordered (group, tap, r); xv: (nb, C_in,
// nyc, Wp) the chunk's pixels of x (Gram form). LANES = 1: one thread per pair, looping over r (for
// products whose pixels are adjacent in memory); LANES = 32: one warp per pair, its lanes
// striding over r (for products whose channels are adjacent).
template <typename scalar_t, typename acc_t, bool GRAM, int LANES>
__global__ void reduce_kernel(View4<scalar_t> y, View4<scalar_t> xv, scalar_t* __restrict__ out,
                              PhaseTaps taps, Chunk ch, int64_t groups, int64_t R, int64_t cg) {
  const int64_t nt = taps.n;
  const int64_t items = nt * ch.nb * ch.nyc * ch.Wp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < items * LANES; idx += stride) {
    int64_t item = idx / LANES;
    const int lane = static_cast<int>(idx % LANES);
    const int64_t xp = item % ch.Wp;
    item /= ch.Wp;
    const int64_t yq = item % ch.nyc;
    item /= ch.nyc;
    const int64_t b = item % ch.nb, k = item / ch.nb;
    const int64_t yp = ch.yp0 + yq;
    const bool reached = yp >= taps.y0[k] && yp < taps.y0[k] + taps.ny[k] && xp >= taps.x0[k] &&
                         xp < taps.x0[k] + taps.nx[k];
    acc_t s = 0;
    if (reached) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = (g * nt + k) * R;
        for (int64_t r = lane; r < R; r += LANES) {
          const acc_t v = static_cast<acc_t>(y.at(b, c0 + r, yq, xp));
          s += GRAM ? v * static_cast<acc_t>(xv.at(b, g * cg + r, yq, xp)) : v * v;
        }
      }
    }
    if constexpr (LANES == 32) s = warp_sum(s);
    if (lane == 0) {
      const int64_t iy = ch.py + yp * ch.sh, ix = ch.px + xp * ch.sw;
      out[((ch.b0 + b) * ch.T + taps.t[k]) * ch.H * ch.W + iy * ch.W + ix] =
          static_cast<scalar_t>(s < acc_t(0) ? acc_t(0) : dev_sqrt(s));
    }
  }
}

void gemm_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& geo,
                  int64_t groups, Form form, at::Tensor& out) {
  const int64_t B = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3), T = geo.taps();
  const int64_t Cg = C_in / groups, Cog = weight.size(0) / groups;
  const int64_t R = form == Form::kGram ? Cg : Cog, sh = geo.y.s, sw = geo.x.s;
  const auto acc_dtype = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  // (T, groups, R, Cg)
  const auto mats = form_matrices(weight, T, groups, form, x.scalar_type(), acc_dtype);

  // Taps by phase of the stride lattice, with their rectangles in phase coordinates.
  std::vector<std::vector<int64_t>> phase_taps(sh * sw);
  for (int64_t t = 0; t < T; ++t) {
    const TapRun ry = geo.y.run(t / geo.kw()), rx = geo.x.run(t % geo.kw());
    if (ry.count > 0 && rx.count > 0) phase_taps[(ry.i0 % sh) * sw + rx.i0 % sw].push_back(t);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t elem = x.element_size();
  for (int64_t key = 0; key < sh * sw; ++key) {
    const int64_t py = key / sw, px = key % sw;
    const int64_t Hp = (H - py + sh - 1) / sh, Wp = (W - px + sw - 1) / sw;
    const auto& all = phase_taps[key];
    for (size_t first = 0; first < all.size(); first += kMaxTaps) {
      const int64_t nt = std::min<int64_t>(kMaxTaps, static_cast<int64_t>(all.size() - first));
      PhaseTaps taps{};
      taps.n = static_cast<int32_t>(nt);
      std::vector<int64_t> idx(all.begin() + first, all.begin() + first + nt);
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t t = idx[k];
        const TapRun ry = geo.y.run(t / geo.kw()), rx = geo.x.run(t % geo.kw());
        taps.t[k] = static_cast<int32_t>(t);
        taps.y0[k] = static_cast<int32_t>(ry.i0 / sh);
        taps.ny[k] = static_cast<int32_t>(ry.count);
        taps.x0[k] = static_cast<int32_t>(rx.i0 / sw);
        taps.nx[k] = static_cast<int32_t>(rx.count);
      }
      // 1x1 conv weight (groups * nt * R, Cg, 1, 1), output channels ordered (group, tap, r).
      // (Stacked from views: an index tensor would be a host-to-device copy.)
      std::vector<at::Tensor> sel;
      for (const int64_t t : idx) sel.push_back(mats.select(0, t));
      const auto w1 = at::stack(sel, 1).reshape({groups * nt * R, Cg, 1, 1});
      const int64_t M = groups * nt * R;
      // Chunks: as many samples as fit in kChunkBytes of products, or rows of one sample.
      const int64_t per_row = M * Wp * elem;
      const int64_t rows = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, per_row));
      const int64_t nb_step = rows >= Hp ? std::max<int64_t>(1, rows / Hp) : 1;
      const int64_t ny_step = rows >= Hp ? Hp : rows;
      for (int64_t b0 = 0; b0 < B; b0 += nb_step) {
        const int64_t nb = std::min(nb_step, B - b0);
        for (int64_t yp0 = 0; yp0 < Hp; yp0 += ny_step) {
          const int64_t nyc = std::min(ny_step, Hp - yp0);
          // x rows py + yp*sh for yp in [yp0, yp0 + nyc), columns px + xp*sw.
          const auto xin = x.narrow(0, b0, nb)
                               .slice(2, py + yp0 * sh, py + (yp0 + nyc - 1) * sh + 1)
                               .slice(3, px);
          const auto y = at::conv2d(xin, w1, c10::optional<at::Tensor>(), at::IntArrayRef{sh, sw},
                                    at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, groups);
          const auto xv = xin.slice(2, 0, c10::nullopt, sh).slice(3, 0, c10::nullopt, sw);
          const Chunk ch{b0, nb, yp0, nyc, Wp, py, px, sh, sw, T, H, W};
          const int64_t items = nt * nb * nyc * Wp;
          // Channels adjacent in memory (channels_last products): a warp per pair.
          const bool by_warp = y.stride(1) == 1 && M > 1;
          AT_DISPATCH_FLOATING_TYPES_AND2(
              at::kHalf, at::kBFloat16, x.scalar_type(), "conv_tap_norms_cuda", [&] {
                using acc_t = at::acc_type<scalar_t, true>;
                const auto yv = view4<scalar_t>(y), xvv = view4<scalar_t>(xv);
                scalar_t* po = out.mutable_data_ptr<scalar_t>();
                auto launch = [&](auto gram, auto lanes) {
                  constexpr int L = decltype(lanes)::value;
                  reduce_kernel<scalar_t, acc_t, decltype(gram)::value, L>
                      <<<grid_for(items * L), kThreads, 0, stream>>>(yv, xvv, po, taps, ch, groups,
                                                                     R, Cg);
                };
                using Warp = std::integral_constant<int, 32>;
                using Thread = std::integral_constant<int, 1>;
                if (form == Form::kGram) {
                  if (by_warp)
                    launch(std::true_type{}, Warp{});
                  else
                    launch(std::true_type{}, Thread{});
                } else {
                  if (by_warp)
                    launch(std::false_type{}, Warp{});
                  else
                    launch(std::false_type{}, Thread{});
                }
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Direct form.

// One thread per (b, t, input pixel): out = sqrt(sum_g x_g^T A_tg x_g) where tap t reaches the
// pixel, else 0. A: (T, groups, CG, CG), the Gram matrices' upper triangles with the off-diagonal
// terms doubled, zero-padded from Cg to CG.
template <typename scalar_t, typename acc_t, int CG>
__global__ void direct_kernel(View4<scalar_t> x, const acc_t* __restrict__ A,
                              scalar_t* __restrict__ out, ConvGeometry g, int64_t B, int64_t groups,
                              int64_t cg) {
  const int64_t T = g.taps(), plane = g.in_pixels(), total = B * T * plane;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t pix = idx % plane, bt = idx / plane, t = bt % T, b = bt / T;
    const int64_t iy = pix / g.x.in, ix = pix % g.x.in;
    const bool reached = g.y.out_coord(iy, t / g.kw()) >= 0 && g.x.out_coord(ix, t % g.kw()) >= 0;
    acc_t s = 0;
    if (reached) {
      for (int64_t grp = 0; grp < groups; ++grp) {
        acc_t v[CG];
#pragma unroll
        for (int c = 0; c < CG; ++c)
          v[c] = c < cg ? static_cast<acc_t>(x.at(b, grp * cg + c, iy, ix)) : acc_t(0);
        const acc_t* a = A + (t * groups + grp) * CG * CG;
#pragma unroll
        for (int c = 0; c < CG; ++c) {
          acc_t u = 0;
#pragma unroll
          for (int d = c; d < CG; ++d) u += a[c * CG + d] * v[d];
          s += v[c] * u;
        }
      }
    }
    out[idx] = static_cast<scalar_t>(s < acc_t(0) ? acc_t(0) : dev_sqrt(s));
  }
}

void direct_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& geo,
                    int64_t groups, at::Tensor& out) {
  const int64_t B = x.size(0), T = geo.taps(), Cg = weight.size(1);
  const auto acc_dtype = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  const int CG = Cg <= 1 ? 1 : Cg <= 2 ? 2 : Cg <= 4 ? 4 : Cg <= 8 ? 8 : 16;
  // Upper triangle of G with doubled off-diagonal terms, zero-padded to (CG, CG).
  const auto G = form_matrices(weight, T, groups, Form::kGram, at::kDouble, at::kDouble);
  const auto upper = at::ones({Cg, Cg}, G.options()).triu(1).mul_(2).add_(at::eye(Cg, G.options()));
  const auto A =
      at::constant_pad_nd(G * upper, {0, CG - Cg, 0, CG - Cg}).to(acc_dtype).contiguous();
  const int64_t total = B * T * geo.in_pixels();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "conv_tap_norms_cuda_direct", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        const auto xv = view4<scalar_t>(x);
        const acc_t* pa = A.const_data_ptr<acc_t>();
        scalar_t* po = out.mutable_data_ptr<scalar_t>();
        const auto grid = grid_for(total);
        auto launch = [&](auto cg) {
          direct_kernel<scalar_t, acc_t, decltype(cg)::value>
              <<<grid, kThreads, 0, stream>>>(xv, pa, po, geo, B, groups, Cg);
        };
        switch (CG) {
          case 1:
            launch(std::integral_constant<int, 1>{});
            break;
          case 2:
            launch(std::integral_constant<int, 2>{});
            break;
          case 4:
            launch(std::integral_constant<int, 4>{});
            break;
          case 8:
            launch(std::integral_constant<int, 8>{});
            break;
          default:
            launch(std::integral_constant<int, 16>{});
            break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor conv_tap_norms_cuda(const at::Tensor& x, const at::Tensor& weight,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  const NestedCallGuard nested;
  const char* op = "conv_tap_norms";
  const ConvGeometry geo = check_tap_norms_args(op, x, weight, stride, padding, dilation, groups,
                                                /*allow_half=*/true);
  check_cuda(op, "x", x);  // weight was checked to share its device
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), T = geo.taps();
  const int64_t Cg = weight.size(1), Cog = weight.size(0) / groups;
  if (B == 0 || H * W == 0 || Cg == 0 || Cog == 0) return at::zeros({B, T, H, W}, x.options());
  const Form form = choose_form(op, Cg, Cog, T, B * geo.out_pixels() * T);
  if (form == Form::kDirect) {
    auto out = at::empty({B, T, H, W}, x.options());  // every element is written
    direct_forward(x, weight, geo, groups, out);
    return out;
  }
  // With stride 1 one phase holds every tap, and the reduce kernel writes every element unless
  // some tap reaches no output at all.
  bool covered = geo.y.s == 1 && geo.x.s == 1;
  for (int64_t t = 0; t < T && covered; ++t)
    covered = geo.y.run(t / geo.kw()).count > 0 && geo.x.run(t % geo.kw()).count > 0;
  auto out = covered ? at::empty({B, T, H, W}, x.options()) : at::zeros({B, T, H, W}, x.options());
  gemm_forward(x, weight, geo, groups, form, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Bound on the elements of one temporary of the backward (per tap and batch chunk).
constexpr int64_t kBackwardChunkElems = int64_t{1} << 26;

std::tuple<at::Tensor, at::Tensor> conv_tap_norms_backward_cuda(
    const at::Tensor& grad_tap_norms, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& tap_norms, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const NestedCallGuard nested;
  const char* op = "conv_tap_norms_backward";
  const ConvGeometry g = check_tap_norms_backward_args(op, grad_tap_norms, x, weight, tap_norms,
                                                       stride, padding, dilation, groups,
                                                       /*allow_half=*/true);
  const int64_t B = x.size(0), c_in = x.size(1), c_out = weight.size(0), cg = weight.size(1);
  const int64_t cog = c_out / groups, T = g.taps();
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());

  const auto acc_dtype = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  const auto acc_opts = x.options().dtype(acc_dtype);
  auto grad_x = at::zeros(x.sizes(), acc_opts);
  auto grad_w = at::zeros(weight.sizes(), acc_opts);

  if (B > 0 && g.in_pixels() > 0 && cg > 0 && cog > 0) {
    // Product form: dY = c W_t X, grad X = W_t^T dY, grad W_t = dY X^T (three products of
    // C_out/groups x Cg per pixel). Gram form (fewer input than output channels): with Xc = c X,
    // grad X = G_t Xc and grad W_t = W_t (Xc X^T) (two of Cg x Cg).
    const bool gram = choose_form(op, cg, cog, T, B * g.out_pixels() * T) != Form::kProduct;
    const auto xa = x.to(acc_dtype);
    const auto wa = weight.to(acc_dtype);
    const auto mats =
        gram ? form_matrices(weight, T, groups, Form::kGram, acc_dtype, acc_dtype) : at::Tensor();

    for (int64_t t = 0; t < T; ++t) {
      const int64_t ky = t / g.kw(), kx = t % g.kw();
      const TapRun ry = g.y.run(ky), rx = g.x.run(kx);
      const int64_t ny = ry.count, nx = rx.count, P = ny * nx;
      if (P == 0) continue;
      // The valid input pixels of tap t: rows ry.i0 + sh * k, columns rx.i0 + sw * k.
      auto sub = [&](const at::Tensor& tsr, int64_t ydim) {
        return tsr.slice(ydim, ry.i0, ry.i0 + (ny - 1) * g.y.s + 1, g.y.s)
            .slice(ydim + 1, rx.i0, rx.i0 + (nx - 1) * g.x.s + 1, g.x.s);
      };
      const auto x_t = sub(xa, 2);                            // (B, C_in, ny, nx)
      const auto n_t = sub(tap_norms.select(1, t), 1);        // (B, ny, nx)
      const auto dn_t = sub(grad_tap_norms.select(1, t), 1);  // (B, ny, nx)
      auto gx_t = sub(grad_x, 2);                             // view into grad_x
      const auto w_t = wa.select(3, kx).select(2, ky).reshape({groups, cog, cg});

      const int64_t per_sample = P * std::max(c_in, gram ? c_in : c_out);
      const int64_t chunk =
          std::max<int64_t>(1, kBackwardChunkElems / std::max<int64_t>(1, per_sample));
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t nb = std::min(chunk, B - b0);
        // c = dn / n where n > 0 (or NaN), else 0; for this tap and chunk only.
        const auto n_c = n_t.narrow(0, b0, nb).to(acc_dtype);
        const auto pos = n_c.le(0).logical_not_();
        const auto cf =
            at::where(
                pos, dn_t.narrow(0, b0, nb).to(acc_dtype) / at::where(pos, n_c, at::ones_like(n_c)),
                at::zeros_like(n_c))
                .reshape({1, 1, nb * P});
        // (groups, Cg, nb * P): columns are the gathered input pixels.
        const auto X = x_t.narrow(0, b0, nb).transpose(0, 1).reshape({groups, cg, nb * P});
        at::Tensor gX, gW;
        if (gram) {
          const auto G_t = mats.select(0, t);  // (groups, Cg, Cg)
          const auto Xc = X * cf;
          if (cg == 1) {  // depthwise: 1 x 1 matrices, elementwise
            gX = G_t * Xc;
            gW = w_t * (Xc * X).sum(2, /*keepdim=*/true);
          } else {
            gX = at::bmm(G_t, Xc);
            gW = at::bmm(w_t, at::bmm(Xc, X.transpose(1, 2)));
          }
        } else {
          const auto dY = at::bmm(w_t, X).mul_(cf);  // (groups, Cog, nb * P)
          gX = at::bmm(w_t.transpose(1, 2), dY);     // (groups, Cg, nb * P)
          gW = at::bmm(dY, X.transpose(1, 2));       // (groups, Cog, Cg)
        }
        gx_t.narrow(0, b0, nb).add_(gX.view({c_in, nb, ny, nx}).transpose(0, 1));
        grad_w.select(3, kx).select(2, ky).add_(gW.reshape({c_out, cg}));
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
