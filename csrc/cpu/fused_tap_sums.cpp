// The fused kernel of fused_tap_sums.h. Each instruction set has one register block: an (mr x nr)
// tile of products, held in vector registers while it accumulates over K, then squared (or dotted
// with the inputs) and added to the per-pixel sums. The blocks are compiled for their instruction
// set with target attributes and picked at run time from what the CPU reports, so the extension
// itself is built for the baseline x86-64.
#include "fused_tap_sums.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SRD_EXT_FUSED_X86 1
#include <immintrin.h>
#else
#define SRD_EXT_FUSED_X86 0
#endif

namespace srd_ext {
namespace cpu {
namespace fused {
namespace {

// One register block: s[0, nr) += the sums of rows [0, rows) of the (K, mr) block `a` against the
// (K, nr) panel `x`; `xr` is the panel's rows of the same input channels (Gram form only).
using BlockFn = void (*)(const float* a, const float* x, int64_t K, int64_t rows, const float* xr,
                         float* s);

#if SRD_EXT_FUSED_X86

// AVX-512: 8 rows x 48 pixels (24 accumulators of the 32 registers).
constexpr int kMr512 = 8, kNv512 = 3;

template <bool kGram>
__attribute__((target("avx512f"))) void block_avx512(const float* a, const float* x, int64_t K,
                                                     int64_t rows, const float* xr, float* s) {
  constexpr int MR = kMr512, NV = kNv512, NR = 16 * NV;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* xk = x + k * NR;
    const float* ak = a + k * MR;
    __m512 xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xk + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 w = _mm512_set1_ps(ak[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(w, xv[v], acc[i][v]);
    }
  }
  __m512 sum[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) sum[v] = _mm512_loadu_ps(s + 16 * v);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 m = kGram ? _mm512_loadu_ps(xr + i * NR + 16 * v) : acc[i][v];
      sum[v] = _mm512_fmadd_ps(acc[i][v], m, sum[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + 16 * v, sum[v]);
}

// AVX2 with FMA: 6 rows x 16 pixels (12 accumulators of the 16 registers). The same steps as the
// AVX-512 block: intrinsics of an instruction set compile only inside a function built for it
// (GCC refuses to inline them into a template shared by both), so each set has its own block.
constexpr int kMr256 = 6, kNv256 = 2;

template <bool kGram>
__attribute__((target("avx2,fma"))) void block_avx2(const float* a, const float* x, int64_t K,
                                                    int64_t rows, const float* xr, float* s) {
  constexpr int MR = kMr256, NV = kNv256, NR = 8 * NV;
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* xk = x + k * NR;
    const float* ak = a + k * MR;
    __m256 xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(xk + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 w = _mm256_broadcast_ss(ak + i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(w, xv[v], acc[i][v]);
    }
  }
  __m256 sum[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) sum[v] = _mm256_loadu_ps(s + 8 * v);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256 m = kGram ? _mm256_loadu_ps(xr + i * NR + 8 * v) : acc[i][v];
      sum[v] = _mm256_fmadd_ps(acc[i][v], m, sum[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(s + 8 * v, sum[v]);
}

#endif  // SRD_EXT_FUSED_X86

struct Kernel {
  const char* isa;
  Tile tile;
  BlockFn product, gram;
};

// The kernels this CPU runs, widest first.
std::vector<Kernel> detect() {
  std::vector<Kernel> ks;
#if SRD_EXT_FUSED_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f"))
    ks.push_back(
        Kernel{"avx512f", Tile{kMr512, 16 * kNv512, 0}, &block_avx512<false>, &block_avx512<true>});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    ks.push_back(
        Kernel{"avx2", Tile{kMr256, 8 * kNv256, 0}, &block_avx2<false>, &block_avx2<true>});
  for (size_t i = 0; i < ks.size(); ++i) ks[i].tile.kernel = static_cast<int>(i);
#endif
  return ks;
}

const std::vector<Kernel>& kernels() {
  static const std::vector<Kernel> ks = detect();
  return ks;
}

}  // namespace

Tile tile() {
  const char* env = std::getenv("SRD_EXT_TAP_NORMS_FUSED");
  const std::string want = env == nullptr ? "" : env;
  const auto& ks = kernels();
  if (want == "0") return Tile{};
  if (want.empty() || want == "1" || want == "auto") return ks.empty() ? Tile{} : ks[0].tile;
  for (const Kernel& k : ks)
    if (want == k.isa) return k.tile;
  std::string have;
  for (const Kernel& k : ks) have += std::string(", ") + k.isa;
  TORCH_CHECK(want == "avx512f" || want == "avx2",
              "srd_ext: SRD_EXT_TAP_NORMS_FUSED must be 0, 1, auto, avx512f or avx2, got \"", want,
              "\"");
  TORCH_CHECK(false, "srd_ext: SRD_EXT_TAP_NORMS_FUSED=", want,
              " names a kernel this CPU does not run; it runs 0, 1, auto", have);
  return Tile{};
}

std::string describe() {
  const Tile t = tile();
  if (t.mr == 0) return "none";
  return std::string(kernels()[t.kernel].isa) + " " + std::to_string(t.mr) + "x" +
         std::to_string(t.nr);
}

void tap_sums(const Tile& t, const float* a, int64_t R, const float* x, int64_t npanels, int64_t K,
              bool gram, float* s) {
  TORCH_CHECK(t.kernel >= 0 && t.kernel < static_cast<int>(kernels().size()),
              "srd_ext: the fused tap-norm kernel does not run on this CPU");
  const Kernel& k = kernels()[t.kernel];
  const int64_t mr = k.tile.mr, nr = k.tile.nr;
  const BlockFn fn = gram ? k.gram : k.product;
  std::fill(s, s + npanels * nr, 0.0f);
  // Row blocks outside, panels inside: one block of A (K * mr floats) stays in L1 while the
  // panels stream from L2. In the Gram form the columns left of the block's first row are zero:
  // start there.
  for (int64_t r0 = 0; r0 < R; r0 += mr) {
    const int64_t k0 = gram ? r0 : 0;
    const float* ab = a + r0 * K + k0 * mr;
    for (int64_t j = 0; j < npanels; ++j) {
      const float* xp = x + j * K * nr;
      fn(ab, xp + k0 * nr, K - k0, std::min(mr, R - r0), xp + r0 * nr, s + j * nr);
    }
  }
}

}  // namespace fused
}  // namespace cpu
}  // namespace srd_ext
