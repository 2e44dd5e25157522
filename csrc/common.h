// Shared argument checks of the CPU and CUDA kernels of srd_ext, and the checked conv geometry.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>

#include <string>
#include <vector>

#include "conv_geometry.h"
#include "numerics.h"

namespace srd_ext {

// Scope of a kernel's nested ATen calls: they record no autograd history (the inputs may require
// grad) and are not autocast (under torch.autocast they would otherwise run in reduced precision
// in the middle of an op that promises float32 or float64 results).
struct NestedCallGuard {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + ")";
}

// Floating dtypes every backend accepts; CUDA also takes half and bfloat16.
inline void check_float(const char* op, const char* name, const at::Tensor& t, bool allow_half) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble ||
                  (allow_half && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK(ok, "srd_ext::", op, ": ", name, " must be float32 or float64",
              allow_half ? " (or float16/bfloat16 on CUDA)" : "", ", got ", t.scalar_type());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "srd_ext::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "srd_ext::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// The conv geometry of a call, checked: positive kernel size, stride and dilation, non-negative
// padding, and a padded input at least as large as the dilated kernel (what F.conv2d checks).
// `input` and `kernel` describe the tensors in the error messages.
inline ConvGeometry make_geometry(const char* op, int64_t kh, int64_t kw, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t H,
                                  int64_t W, const std::string& input, const std::string& kernel) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "srd_ext::", op,
              ": stride, padding and dilation must each have 2 entries");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "srd_ext::", op, ": stride must be positive, got (",
              stride[0], ", ", stride[1], ")");
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "srd_ext::", op,
              ": dilation must be positive, got (", dilation[0], ", ", dilation[1], ")");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "srd_ext::", op,
              ": padding must be non-negative, got (", padding[0], ", ", padding[1], ")");
  TORCH_CHECK(kh > 0 && kw > 0, "srd_ext::", op, ": kernel size must be positive, got (", kh, ", ",
              kw, ")");
  const int64_t ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0]);
  const int64_t wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(ho > 0 && wo > 0, "srd_ext::", op, ": ", input, " is too small for ", kernel,
              ": the padded input is (", H + 2 * padding[0], ", ", W + 2 * padding[1],
              ") but the dilated kernel is (", dilation[0] * (kh - 1) + 1, ", ",
              dilation[1] * (kw - 1) + 1, ")");
  return ConvGeometry{ConvAxis{kh, stride[0], padding[0], dilation[0], H, ho},
                      ConvAxis{kw, stride[1], padding[1], dilation[1], W, wo}};
}

// Checks of conv_tap_norms' inputs; returns the geometry.
inline ConvGeometry check_tap_norms_args(const char* op, const at::Tensor& x,
                                         const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, bool allow_half) {
  TORCH_CHECK(x.dim() == 4, "srd_ext::", op, ": x must be (B, C_in, H, W), got shape ",
              shape_str(x));
  TORCH_CHECK(weight.dim() == 4, "srd_ext::", op,
              ": weight must be (C_out, C_in/groups, kh, kw), got shape ", shape_str(weight));
  check_float(op, "x", x, allow_half);
  check_same(op, "weight", weight, x, "x");
  TORCH_CHECK(groups >= 1, "srd_ext::", op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(x.size(1) == weight.size(1) * groups && weight.size(0) % groups == 0, "srd_ext::", op,
              ": x ", shape_str(x), " does not fit weight ", shape_str(weight),
              " with groups=", groups);
  return make_geometry(op, weight.size(2), weight.size(3), stride, padding, dilation, x.size(2),
                       x.size(3), "input x " + shape_str(x), "weight " + shape_str(weight));
}

inline ConvGeometry check_scatter_args(const char* op, const at::Tensor& tap_norms,
                                       const at::Tensor& bias_dot, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, bool allow_half) {
  TORCH_CHECK(kernel_size.size() == 2, "srd_ext::", op, ": kernel_size must have 2 entries");
  TORCH_CHECK(tap_norms.dim() == 4, "srd_ext::", op,
              ": tap_norms must be (B, kh*kw, H_in, W_in), got shape ", shape_str(tap_norms));
  TORCH_CHECK(bias_dot.dim() == 3, "srd_ext::", op,
              ": bias_dot must be (B, H_out, W_out), got shape ", shape_str(bias_dot));
  check_float(op, "tap_norms", tap_norms, allow_half);
  check_same(op, "bias_dot", bias_dot, tap_norms, "tap_norms");
  const auto g =
      make_geometry(op, kernel_size[0], kernel_size[1], stride, padding, dilation,
                    tap_norms.size(2), tap_norms.size(3), "tap_norms " + shape_str(tap_norms),
                    "kernel_size (" + std::to_string(kernel_size[0]) + ", " +
                        std::to_string(kernel_size[1]) + ")");
  TORCH_CHECK(tap_norms.size(1) == g.taps(), "srd_ext::", op, ": tap_norms ", shape_str(tap_norms),
              " has ", tap_norms.size(1), " taps but kernel_size is (", g.kh(), ", ", g.kw(), ")");
  const int64_t ho = g.y.out, wo = g.x.out;
  TORCH_CHECK(
      bias_dot.size(0) == tap_norms.size(0) && bias_dot.size(1) == ho && bias_dot.size(2) == wo,
      "srd_ext::", op, ": bias_dot ", shape_str(bias_dot), " does not match tap_norms ",
      shape_str(tap_norms), " (expected (", tap_norms.size(0), ", ", ho, ", ", wo,
      ") for this geometry)");
  return g;
}

// Shape of activation_share's per-pixel tensors (relevance, extra): (B, H, W) or (B,).
inline std::vector<int64_t> pixel_shape(const at::Tensor& a) {
  if (a.dim() == 4) return {a.size(0), a.size(2), a.size(3)};
  return {a.size(0)};
}

// Checks of activation_share's inputs (a, grad, pre_activation same shape; extra one per pixel).
inline void check_activation_share_args(const char* op, const at::Tensor& a, const at::Tensor& grad,
                                        const at::Tensor& z, const c10::optional<at::Tensor>& extra,
                                        bool allow_half) {
  TORCH_CHECK(a.dim() == 4 || a.dim() == 2, "srd_ext::", op,
              ": a must be (B, C, H, W) or (B, C), got shape ", shape_str(a));
  check_float(op, "a", a, allow_half);
  TORCH_CHECK(grad.sizes() == a.sizes() && z.sizes() == a.sizes(), "srd_ext::", op,
              ": a, grad and pre_activation must have one shape, got ", shape_str(a), ", ",
              shape_str(grad), " and ", shape_str(z));
  check_same(op, "grad", grad, a, "a");
  check_same(op, "pre_activation", z, a, "a");
  if (extra.has_value()) {
    const auto& e = *extra;
    const auto want = pixel_shape(a);
    TORCH_CHECK(e.sizes() == at::IntArrayRef(want), "srd_ext::", op, ": extra must have shape ",
                a.dim() == 4 ? "(B, H, W)" : "(B,)", " matching a ", shape_str(a), ", got ",
                shape_str(e));
    check_same(op, "extra", e, a, "a");
  }
}

// Checks of the backward ops' extra inputs (the forward inputs are checked as above).
inline void check_activation_share_backward_args(const char* op, const at::Tensor& grad_relevance,
                                                 const at::Tensor& grad_g, const at::Tensor& a,
                                                 const at::Tensor& grad, const at::Tensor& z,
                                                 const at::Tensor& relevance, bool allow_half) {
  check_activation_share_args(op, a, grad, z, c10::nullopt, allow_half);
  const auto want = pixel_shape(a);
  TORCH_CHECK(
      grad_relevance.sizes() == at::IntArrayRef(want) && relevance.sizes() == at::IntArrayRef(want),
      "srd_ext::", op, ": grad_relevance and relevance must have shape ",
      a.dim() == 4 ? "(B, H, W)" : "(B,)", " matching a ", shape_str(a), ", got ",
      shape_str(grad_relevance), " and ", shape_str(relevance));
  TORCH_CHECK(grad_g.sizes() == a.sizes(), "srd_ext::", op, ": grad_g must have the shape of a ",
              shape_str(a), ", got ", shape_str(grad_g));
  check_same(op, "grad_relevance", grad_relevance, a, "a");
  check_same(op, "grad_g", grad_g, a, "a");
  check_same(op, "relevance", relevance, a, "a");
}

inline ConvGeometry check_tap_norms_backward_args(const char* op, const at::Tensor& grad_tap_norms,
                                                  const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& tap_norms,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups,
                                                  bool allow_half) {
  const ConvGeometry geo =
      check_tap_norms_args(op, x, weight, stride, padding, dilation, groups, allow_half);
  const std::vector<int64_t> want{x.size(0), geo.taps(), x.size(2), x.size(3)};
  TORCH_CHECK(
      grad_tap_norms.sizes() == at::IntArrayRef(want) && tap_norms.sizes() == at::IntArrayRef(want),
      "srd_ext::", op, ": grad_tap_norms and tap_norms must have shape (B, kh*kw, H, W) = (",
      want[0], ", ", want[1], ", ", want[2], ", ", want[3], ") for x ", shape_str(x),
      " and weight ", shape_str(weight), ", got ", shape_str(grad_tap_norms), " and ",
      shape_str(tap_norms));
  check_same(op, "grad_tap_norms", grad_tap_norms, x, "x");
  check_same(op, "tap_norms", tap_norms, x, "x");
  return geo;
}

inline ConvGeometry check_scatter_backward_args(const char* op, const at::Tensor& grad_relevance,
                                                const at::Tensor& tap_norms,
                                                const at::Tensor& bias_dot,
                                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                bool allow_half) {
  const ConvGeometry geo = check_scatter_args(op, tap_norms, bias_dot, kernel_size, stride, padding,
                                              dilation, allow_half);
  TORCH_CHECK(grad_relevance.dim() == 3 && grad_relevance.size(0) == tap_norms.size(0) &&
                  grad_relevance.size(1) == tap_norms.size(2) &&
                  grad_relevance.size(2) == tap_norms.size(3),
              "srd_ext::", op, ": grad_relevance must have shape (B, H_in, W_in) = (",
              tap_norms.size(0), ", ", tap_norms.size(2), ", ", tap_norms.size(3),
              ") for tap_norms ", shape_str(tap_norms), ", got ", shape_str(grad_relevance));
  check_same(op, "grad_relevance", grad_relevance, tap_norms, "tap_norms");
  return geo;
}

inline int64_t bias_share_mode(const char* op, c10::string_view mode) {
  if (mode == "none") return 0;
  if (mode == "contribution") return 1;
  if (mode == "input") return 2;
  TORCH_CHECK(false, "srd_ext::", op,
              ": bias_share must be \"none\", \"contribution\" or \"input\", got \"",
              std::string(mode), "\"");
}

}  // namespace srd_ext
