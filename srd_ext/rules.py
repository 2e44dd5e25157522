"""What each layer does to relevance (the rules), apart from how the model is walked.

SRD's backward pass (``../shared/notes/srd-math.md`` sections 2-3): between two activation layers
the network is affine, and the sharing ratios of every (input PFV, output PFV) pair sum, per input
pixel, to ``<a_i, [F^T g]_i>`` with ``g_j = z_j R_j / ||z_j||^2``. So relevance travels as a vector
field ``g`` through the ordinary vector-Jacobian products of the linear parts (conv transpose,
BN scale, max-pool scatter at the recorded indices, avg-pool backward, residual fan-out), and every
activation layer turns the field back into one relevance per pixel (``activation_share``). Biases
are shared among the input pixels of their conv by tap norms (``conv_tap_norms`` +
``bias_share_scatter``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .capture import Step

BIAS_SHARES = ("contribution", "input", "none")


def fold_batchnorm(step: Step) -> Tuple[Tensor, Optional[Tensor]]:
    """Weight and bias of a conv step with its BatchNorm folded in (computed, never written back).

    BN (eval): ``y = s * x + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - s * mean``.
    """
    m = step.module
    weight, bias = m.weight, m.bias
    bn = step.bn
    if bn is None:
        return weight, bias
    scale, shift = bn_affine(bn)
    weight = weight * scale.view(-1, 1, 1, 1)
    bias = shift if bias is None else shift + scale * bias
    return weight, bias


def bn_affine(bn) -> Tuple[Tensor, Tensor]:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def conv_vjp(g: Tensor, step: Step, weight: Tensor, in_shape) -> Tensor:
    """``F^T g`` of a conv: the transposed convolution back to the input's size."""
    m = step.module
    pad = step.params["padding"]
    out_pad = []
    for ax in range(2):
        k = weight.shape[2 + ax]
        full = (g.shape[2 + ax] - 1) * m.stride[ax] - 2 * pad[ax] + m.dilation[ax] * (k - 1) + 1
        out_pad.append(in_shape[2 + ax] - full)
    return F.conv_transpose2d(g, weight, None, m.stride, pad, tuple(out_pad), m.groups, m.dilation)


def conv_bias_relevance(g: Tensor, x: Tensor, step: Step, weight: Tensor, bias: Optional[Tensor],
                        mode: str) -> Optional[Tensor]:
    """The relevance a conv's bias hands to its input pixels: (B, H_in, W_in), or None.

    ``bias_dot_j = <b, g_j>`` is the bias' share of output pixel j's relevance; it is split among
    the input pixels under the kernel by ``||W_t x_i||`` ("contribution") or ``||x_i||`` ("input").
    """
    if bias is None or mode == "none":
        return None
    m = step.module
    pad = step.params["padding"]
    bias_dot = torch.einsum("bchw,c->bhw", g, bias)
    if mode == "contribution":
        norms = ops.conv_tap_norms(x, weight, m.stride, pad, m.dilation, m.groups)
    else:  # "input": Eq. 11 as printed, ||x_i|| for every tap that reads pixel i
        kh, kw = weight.shape[2], weight.shape[3]
        probe = x.new_ones((1, 1, x.shape[2], x.shape[3]))
        valid = ops.conv_tap_norms(probe, x.new_ones((1, 1, kh, kw)), m.stride, pad, m.dilation, 1)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True) * valid
    return ops.bias_share_scatter(norms, bias_dot, (weight.shape[2], weight.shape[3]), m.stride, pad,
                                  m.dilation)


def bn_bias_relevance(g: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mode: str) -> Optional[Tensor]:
    """A stand-alone BatchNorm is a 1x1 affine map: pixel j's bias share stays at pixel j (when
    the pixel contributes at all)."""
    if mode == "none":
        return None
    bias_dot = torch.einsum("bchw,c->bhw", g, shift)
    src = x * scale.view(1, -1, 1, 1) if mode == "contribution" else x
    alive = torch.linalg.vector_norm(src, dim=1) > 0
    return torch.where(alive, bias_dot, torch.zeros_like(bias_dot))


def maxpool_vjp(g: Tensor, indices: Tensor, in_shape) -> Tensor:
    """Scatter-add at the recorded argmax indices. Overlapping windows accumulate (a pixel that
    wins a channel in several windows receives all of them), unlike ``max_unpool2d``."""
    b, c = g.shape[0], g.shape[1]
    out = g.new_zeros((b, c, in_shape[2] * in_shape[3]))
    out = out.scatter_add(2, indices.reshape(b, c, -1), g.reshape(b, c, -1))
    return out.view(in_shape)


def avgpool_vjp(g: Tensor, x: Tensor, p) -> Tensor:
    return torch.ops.aten.avg_pool2d_backward(g, x, p["kernel_size"], p["stride"], p["padding"],
                                              p["ceil_mode"], p["count_include_pad"],
                                              p["divisor_override"])


def adaptive_avgpool_vjp(g: Tensor, x: Tensor) -> Tensor:
    return torch.ops.aten._adaptive_avg_pool2d_backward(g, x)


def relevance_to_field(relevance: Tensor, x: Tensor) -> Tensor:
    """A vector field that hands ``relevance`` (B, H, W) to the PFVs of ``x`` (B, C, H, W):
    ``x_i R_i / ||x_i||^2``. Passed back through a pooling VJP it splits a pooled pixel's
    relevance among the pixels it was made of by their sharing ratios."""
    n2 = (x * x).sum(1, keepdim=True)
    safe = torch.where(n2 > 0, n2, torch.ones_like(n2))
    return torch.where(n2 > 0, x * relevance.unsqueeze(1) / safe, torch.zeros_like(x))
