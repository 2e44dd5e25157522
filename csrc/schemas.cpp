// Operator schemas of srd_ext. Every op is declared here once; each backend registers its
// kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu. The Python side (srd_ext/ops.py) adds the
// fake (meta) kernels and the autograd formulas. Kept free of Python so that the C++ tests can
// link it; the Python module stub lives in csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(srd_ext, m) {
  // Sharing-ratio computation at one activation layer.
  //   a, grad, pre_activation: (B, C, H, W) or (B, C); extra: (B, H, W) or (B,)
  //   relevance = sum_c a * grad (+ extra);  g = pre_activation * relevance / ||pre_activation||^2
  m.def(
      "activation_share(Tensor a, Tensor grad, Tensor pre_activation, Tensor? extra) -> (Tensor "
      "relevance, Tensor g)");
  m.def(
      "activation_share_backward(Tensor grad_relevance, Tensor grad_g, Tensor a, Tensor grad, "
      "Tensor pre_activation, Tensor relevance) -> (Tensor grad_a, Tensor grad_grad, Tensor "
      "grad_pre_activation, Tensor grad_extra)");

  // PFV decomposition norms: tap_norms[b, t, i] = || W[:, :, t] x[b, :, i] ||_2 for every input
  // pixel i and kernel tap t that reaches an output pixel (0 elsewhere). (B, kh*kw, H_in, W_in).
  m.def(
      "conv_tap_norms(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int "
      "groups) -> Tensor");
  m.def(
      "conv_tap_norms_backward(Tensor grad_tap_norms, Tensor x, Tensor weight, Tensor tap_norms, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor grad_x, Tensor "
      "grad_weight)");

  // Relevance scatter of a conv bias: S_j = sum_t n_t(i(j,t)), c_j = bias_dot_j / S_j,
  // relevance_i = sum_t n_t(i) c_{j(i,t)}.  tap_norms (B, kh*kw, H_in, W_in), bias_dot (B, H_out,
  // W_out).
  m.def(
      "bias_share_scatter(Tensor tap_norms, Tensor bias_dot, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "bias_share_scatter_backward(Tensor grad_relevance, Tensor tap_norms, Tensor bias_dot, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor "
      "grad_tap_norms, Tensor grad_bias_dot)");

  // Explicit decomposition of chosen output PFVs of a conv into the contributions of the input
  // PFVs under each kernel tap, with the bias shared ("none" | "contribution" | "input").
  //   positions (N, 3) int64 rows (b, y, x) of output pixels -> v_hat (N, kh*kw, C_out), mu (N,
  //   kh*kw)
  m.def(
      "pfv_decompose(Tensor x, Tensor weight, Tensor? bias, Tensor positions, int[2] stride, "
      "int[2] padding, int[2] dilation, str bias_share) -> (Tensor v_hat, Tensor mu)");
}
