// Conv geometry usable in device code: the input pixel read by (output pixel, tap) and back.
#pragma once
#include <cstdint>

#include "common.h"

namespace srd_ext {
namespace cuda {

struct ConvGeom {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t hin, win, hout, wout;

  // Input coordinate read by output coordinate o under kernel offset k along one axis.
  __host__ __device__ static int64_t in_coord(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d) {
    return o * s - p + k * d;
  }

  // Output coordinate reached from input coordinate i by kernel offset k along one axis, or -1.
  __host__ __device__ static int64_t out_coord(int64_t i, int64_t k, int64_t s, int64_t p, int64_t d,
                                               int64_t out) {
    const int64_t v = i + p - k * d;
    if (v < 0 || v % s != 0) return -1;
    const int64_t o = v / s;
    return o < out ? o : -1;
  }

  // Range [lo, hi) of output coordinates whose input coordinate under offset k lies in [0, in).
  __host__ __device__ static void valid_range(int64_t k, int64_t s, int64_t p, int64_t d, int64_t in,
                                              int64_t out, int64_t& lo, int64_t& hi) {
    const int64_t a = p - k * d;  // in_coord = o * s - a
    // o * s >= a  and  o * s <= in - 1 + a
    lo = a <= 0 ? 0 : (a + s - 1) / s;
    const int64_t top = in - 1 + a;
    hi = top < 0 ? 0 : top / s + 1;
    if (hi > out) hi = out;
    if (lo > hi) lo = hi;
  }
};

inline ConvGeom make_conv_geom(const Geometry& g, int64_t hin, int64_t win) {
  return ConvGeom{g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                  hin, win, g.out_size(hin, 0), g.out_size(win, 1)};
}

}  // namespace cuda
}  // namespace srd_ext
