// Numeric helpers shared by the CPU and CUDA kernels of srd_ext (host and device code).
#pragma once
#include <c10/macros/Macros.h>

namespace srd_ext {

// Guard of a division by a sum of norms or of squares (>= 0 by construction): true where the
// divisor is positive and also where it is NaN, so that a NaN input reaches the quotient instead
// of being replaced by the 0 that an empty share gets.
template <typename T>
C10_HOST_DEVICE inline bool positive_or_nan(T v) {
  return !(v <= T(0));
}

}  // namespace srd_ext
