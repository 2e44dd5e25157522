// SRD_EXT_TAP_NORMS_PATH, which the CPU and the CUDA kernels of conv_tap_norms both read.
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <optional>
#include <string>

namespace srd_ext {

// The forms in which conv_tap_norms evaluates the tap norms (csrc/cpu/conv_tap_norms.cpp).
enum class TapNormsForm { kProduct, kGram, kDirect };

// The form SRD_EXT_TAP_NORMS_PATH forces (product | gram | direct; for tests and benchmarks), or
// none where it is unset, empty or "auto" (each backend then chooses by cost). Any other value is
// an error of `op`; `where` (" on the CPU" or "") follows the list of accepted values.
inline std::optional<TapNormsForm> forced_tap_norms_form(const char* op, const char* where) {
  const char* env = std::getenv("SRD_EXT_TAP_NORMS_PATH");
  const std::string forced = env == nullptr ? "" : env;
  if (forced == "product") return TapNormsForm::kProduct;
  if (forced == "gram") return TapNormsForm::kGram;
  if (forced == "direct") return TapNormsForm::kDirect;
  TORCH_CHECK(forced.empty() || forced == "auto", "srd_ext::", op,
              ": SRD_EXT_TAP_NORMS_PATH must be auto, product, gram or direct", where, ", got \"",
              forced, "\"");
  return std::nullopt;
}

}  // namespace srd_ext
