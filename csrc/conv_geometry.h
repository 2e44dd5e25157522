// The conv geometry of srd_ext, written once for the CPU and the CUDA kernels (host and device
// code). Along one axis, kernel offset t maps output coordinate o to input coordinate
// i = o*s - p + t*d; every op works with that map, its inverse and the runs of outputs whose
// input lies inside the image. Checked construction (with the op's error messages) is in
// common.h; this header has no ATen dependency so that device code can include it.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace srd_ext {

// Along one axis, the outputs whose input under one kernel offset lies in [0, in) form the
// contiguous run [o0, o0 + count), reading the inputs i0, i0 + s, ..., i0 + (count - 1) * s.
struct TapRun {
  int64_t o0 = 0, i0 = 0, count = 0;
};

// Output size of a conv along one axis, or -1 when the dilated kernel does not fit in the padded
// input (what F.conv2d rejects). Plain truncating division would accept some such inputs, e.g.
// in = 2, k = 3, s = 2, p = 0, where (2 - 2 - 1) / 2 + 1 = 1.
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p,
                                             int64_t d) {
  const int64_t room = in + 2 * p - d * (k - 1) - 1;
  return room < 0 ? -1 : room / s + 1;
}

struct ConvAxis {
  int64_t k, s, p, d;  // kernel size, stride, padding, dilation
  int64_t in, out;     // input and output sizes

  // Input coordinate read by output o under kernel offset t (may lie outside [0, in)).
  C10_HOST_DEVICE int64_t in_coord(int64_t o, int64_t t) const { return o * s - p + t * d; }

  C10_HOST_DEVICE bool inside(int64_t i) const { return i >= 0 && i < in; }

  // Output coordinate whose kernel offset t reads input i, or -1 when there is none.
  C10_HOST_DEVICE int64_t out_coord(int64_t i, int64_t t) const {
    const int64_t v = i + p - t * d;
    if (v < 0 || v % s != 0) return -1;
    const int64_t o = v / s;
    return o < out ? o : -1;
  }

  // The run of outputs whose input under kernel offset t lies inside the input.
  C10_HOST_DEVICE TapRun run(int64_t t) const {
    TapRun r;
    const int64_t off = t * d - p;  // i = o * s + off
    // Smallest o >= 0 with o*s + off >= 0, and one past the largest o with o*s + off <= in - 1.
    const int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
    const int64_t top = in - 1 - off;
    int64_t hi = top < 0 ? 0 : top / s + 1;
    if (hi > out) hi = out;
    if (hi > lo) {
      r.o0 = lo;
      r.i0 = lo * s + off;
      r.count = hi - lo;
    }
    return r;
  }
};

// A 2-d conv: rows (y) and columns (x). Tap t = ty * kw + tx.
struct ConvGeometry {
  ConvAxis y, x;

  C10_HOST_DEVICE int64_t kh() const { return y.k; }
  C10_HOST_DEVICE int64_t kw() const { return x.k; }
  C10_HOST_DEVICE int64_t taps() const { return y.k * x.k; }
  C10_HOST_DEVICE int64_t in_pixels() const { return y.in * x.in; }
  C10_HOST_DEVICE int64_t out_pixels() const { return y.out * x.out; }
};

}  // namespace srd_ext
