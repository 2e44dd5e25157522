// Register-blocked float32 kernel behind the product and Gram forms of conv_tap_norms on x86-64
// CPUs with AVX2+FMA or AVX-512: the per-tap products stay in registers and are squared (or dotted
// with the inputs) and summed there, so they are never written to memory.
//
// Operands, packed by the caller:
// - the tap's matrix A (R rows x K), in blocks of `mr` rows: (ceil(R / mr), K, mr) floats, rows
//   past R zero;
// - the inputs, in panels of `nr` pixels: (npanels, K, nr) floats, pixels past the end zero.
// For every pixel p the kernel writes
//   product form: s[p] = sum_r (A x_p)_r^2                  (A = W_t)
//   Gram form:    s[p] = sum_r (A x_p)_r x_{p,r} = x_p^T G_t x_p
// In the Gram form A is the upper triangle of G_t = W_t^T W_t with its off-diagonal entries
// doubled (R = K): the kernel skips the blocks left of the diagonal, so a pixel costs about K^2/2
// multiply-adds instead of the product form's C_out * K. Each sum runs over the rows in blocks of
// mr, in order, in float32 with FMA.
#pragma once

#include <cstdint>
#include <string>

namespace srd_ext {
namespace cpu {
namespace fused {

struct Tile {
  int64_t mr = 0, nr = 0;  // 0: no fused kernel on this CPU (or disabled), use the GEMM forms
  int kernel = -1;         // which of the CPU's kernels (for tap_sums)
};

// The register tile of the kernel to use: by default the widest instruction set this CPU
// supports. The environment variable SRD_EXT_TAP_NORMS_FUSED picks one (for tests and
// benchmarks): 0 (none: the GEMM forms), 1 or auto (the default), avx512f or avx2 (an error where
// the CPU lacks it). A build for another architecture or compiler has none.
Tile tile();

// "avx512f 8x48", "avx2 6x16" (instruction set, rows x pixels of the register tile), or "none":
// what tile() picks.
std::string describe();

// s (npanels * t.nr floats) <- the sums above, for the rows [0, R) of A, on the kernel of `t`.
void tap_sums(const Tile& t, const float* a, int64_t R, const float* x, int64_t npanels, int64_t K,
              bool gram, float* s);

}  // namespace fused
}  // namespace cpu
}  // namespace srd_ext
