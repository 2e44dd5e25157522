// Per-axis geometry of one kernel tap, shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>

namespace srd_ext {
namespace cpu {

// Along one axis, tap index k maps output o to input i = o*s - p + k*d. The outputs whose input
// is in range form the contiguous run [o0, o0 + count), hitting inputs i0, i0 + s, ... .
struct TapRange {
  int64_t o0 = 0, i0 = 0, count = 0;
};

inline TapRange tap_range(int64_t in, int64_t out, int64_t s, int64_t p, int64_t d, int64_t k) {
  TapRange r;
  const int64_t off = k * d - p;  // i = o*s + off
  // Smallest o >= 0 with o*s + off >= 0, and one past the largest o with o*s + off <= in - 1.
  const int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const int64_t top = in - 1 - off;
  const int64_t hi = top < 0 ? 0 : std::min(out, top / s + 1);
  if (hi > lo) {
    r.o0 = lo;
    r.i0 = lo * s + off;
    r.count = hi - lo;
  }
  return r;
}

// Sub-run of `r` whose inputs lie in [i_begin, i_end): returns [first, last) indices into the run.
inline void tap_sub_range(const TapRange& r, int64_t s, int64_t i_begin, int64_t i_end,
                          int64_t& first, int64_t& last) {
  first = i_begin <= r.i0 ? 0 : (i_begin - r.i0 + s - 1) / s;
  last = i_end <= r.i0 ? 0 : std::min(r.count, (i_end - r.i0 + s - 1) / s);
  if (last < first) last = first;
}

}  // namespace cpu
}  // namespace srd_ext
