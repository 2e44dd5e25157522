"""Typed wrappers over the ``torch.ops.srd_ext`` operators, with their fake kernels (for
``torch.compile`` / ``torch.export``) and their autograd formulas.

Shapes follow the op schemas in ``csrc/schemas.cpp``:

- ``activation_share(a, grad, pre_activation, extra=None) -> (relevance, g)``
  ``a, grad, pre_activation``: (B, C, H, W) or (B, C); ``extra``: (B, H, W) or (B,).
- ``conv_tap_norms(x, weight, stride, padding, dilation, groups) -> (B, kh*kw, H, W)``
- ``bias_share_scatter(tap_norms, bias_dot, kernel_size, stride, padding, dilation) -> (B, H, W)``
- ``pfv_decompose(x, weight, bias, positions, stride, padding, dilation, bias_share) -> (v_hat, mu)``
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backend, composite

try:
    from . import _C  # loads the library: registers the schemas and kernels
except ImportError:  # no compiled extension: the schemas are defined below, the composite path runs
    _C = None

__all__ = [
    "activation_share",
    "conv_tap_norms",
    "bias_share_scatter",
    "pfv_decompose",
    "cuda_kernels_built",
    "cpu_kernels_built",
    "tap_norms_cpu_kernel",
    "SCHEMAS",
]

# The operator schemas of csrc/schemas.cpp (tests/test_composite.py checks that they agree). They
# define the srd_ext operators where the compiled extension is missing, and always the
# srd_ext_composite operators: the same operators, implemented by srd_ext.composite only, which
# the wrappers below call where the composite path is chosen (srd_ext.backend).
SCHEMAS = {
    "activation_share": "(Tensor a, Tensor grad, Tensor pre_activation, Tensor? extra) -> (Tensor relevance, Tensor g)",
    "activation_share_backward": "(Tensor grad_relevance, Tensor grad_g, Tensor a, Tensor grad, "
    "Tensor pre_activation, Tensor relevance) -> (Tensor grad_a, Tensor grad_grad, Tensor grad_pre_activation, "
    "Tensor grad_extra)",
    "conv_tap_norms": "(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor",
    "conv_tap_norms_backward": "(Tensor grad_tap_norms, Tensor x, Tensor weight, Tensor tap_norms, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor grad_x, Tensor grad_weight)",
    "bias_share_scatter": "(Tensor tap_norms, Tensor bias_dot, int[2] kernel_size, int[2] stride, "
    "int[2] padding, int[2] dilation) -> Tensor",
    "bias_share_scatter_backward": "(Tensor grad_relevance, Tensor tap_norms, Tensor bias_dot, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor grad_tap_norms, "
    "Tensor grad_bias_dot)",
    "pfv_decompose": "(Tensor x, Tensor weight, Tensor? bias, Tensor positions, int[2] stride, "
    "int[2] padding, int[2] dilation, str bias_share) -> (Tensor v_hat, Tensor mu)",
}

_LIBS = []  # keeps the torch.library registrations alive
if _C is None:
    _LIBS.append(torch.library.Library("srd_ext", "DEF"))
    for _name, _schema in SCHEMAS.items():
        _LIBS[-1].define(_name + _schema)
_LIBS.append(torch.library.Library("srd_ext_composite", "DEF"))
for _name, _schema in SCHEMAS.items():
    _LIBS[-1].define(_name + _schema)

_ops = torch.ops.srd_ext
_cops = torch.ops.srd_ext_composite
NAMESPACES = ("srd_ext", "srd_ext_composite")


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("srd_ext::activation_share", key)


_CPU_KERNELS, _CUDA_KERNELS = _has_kernel("CPU"), _has_kernel("CUDA")
backend._init(_CPU_KERNELS, _CUDA_KERNELS)

# The composite path serves every device without a compiled kernel (CompositeExplicitAutograd is
# overridden by a backend's own kernel where one was registered), and is the whole of the
# srd_ext_composite operators.
for _ns in NAMESPACES:
    _LIBS.append(torch.library.Library(_ns, "IMPL"))
    for _name in SCHEMAS:
        _LIBS[-1].impl(_name, getattr(composite, _name), "CompositeExplicitAutograd")


def _ns(t: Tensor):
    """The operators to call for tensors like ``t``: the compiled ones or the composite ones."""
    return _ops if backend.uses_kernels(t.device) else _cops


def cuda_kernels_built() -> bool:
    """Whether this build of the extension has CUDA kernels."""
    return _CUDA_KERNELS


def cpu_kernels_built() -> bool:
    """Whether the compiled extension (with its CPU kernels) was loaded."""
    return _CPU_KERNELS


def tap_norms_cpu_kernel() -> str:
    """The CPU kernel behind float32 ``conv_tap_norms`` without groups in this process: the
    instruction set and register tile of the fused kernel (``"avx512f 8x48"``, ``"avx2 6x16"``), or
    ``"none"`` where the CPU has neither or ``SRD_EXT_TAP_NORMS_FUSED=0`` turns it off (the GEMM
    forms then run)."""
    return _C.tap_norms_cpu_kernel() if _C is not None else "none"


def _pair(v, name: str) -> list:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(e, int) for e in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------
def activation_share(
    a: Tensor, grad: Tensor, pre_activation: Tensor, extra: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Sharing-ratio computation at one activation layer.

    ``relevance = sum_c a * grad (+ extra)`` per pixel, ``g = pre_activation * relevance /
    ||pre_activation||^2`` (0 where the pre-activation PFV is zero).
    """
    return _ns(a).activation_share(a, grad, pre_activation, extra)


def conv_tap_norms(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``||W_t x_i||`` for every input pixel ``i`` and kernel tap ``t`` that reaches an output.

    x: (B, C_in, H, W), weight: (C_out, C_in/groups, kh, kw) -> (B, kh*kw, H, W).
    """
    return _ns(x).conv_tap_norms(
        x, weight, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups
    )


def bias_share_scatter(tap_norms: Tensor, bias_dot: Tensor, kernel_size, stride=1, padding=0, dilation=1) -> Tensor:
    """Scatter each output pixel's bias relevance ``bias_dot`` (B, H_out, W_out) onto the input
    pixels in proportion to their tap norms (B, kh*kw, H_in, W_in) -> (B, H_in, W_in)."""
    return _ns(tap_norms).bias_share_scatter(
        tap_norms,
        bias_dot,
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )


def pfv_decompose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    bias_share: str = "contribution",
) -> Tuple[Tensor, Tensor]:
    """Explicit decomposition of chosen output PFVs of a conv (groups=1).

    positions: (N, 3) int64 rows ``(b, y, x)`` of output pixels. Returns ``v_hat`` (N, kh*kw, C_out),
    the contribution of the input PFV under each tap (bias share included), and ``mu`` (N, kh*kw),
    the sharing ratios ``<v_hat_t, z> / ||z||^2``. The input pixel of tap ``t = ty*kw + tx`` is
    ``(y*stride - padding + ty*dilation, x*stride - padding + tx*dilation)``; taps that fall
    outside the input have zero contribution.
    """
    return _ns(x).pfv_decompose(
        x,
        weight,
        bias,
        positions,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        bias_share,
    )


# --------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------
def _fake(name: str):
    """Registers the decorated function as the fake kernel of ``name`` in both namespaces."""

    def register(fn):
        for ns in NAMESPACES:
            torch.library.register_fake(f"{ns}::{name}", fn)
        return fn

    return register


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@_fake("activation_share")
def _(a, grad, pre_activation, extra):
    torch._check(
        a.dim() in (2, 4), lambda: f"srd_ext::activation_share: a must be (B, C, H, W) or (B, C), got {tuple(a.shape)}"
    )
    torch._check(
        grad.shape == a.shape and pre_activation.shape == a.shape,
        lambda: "srd_ext::activation_share: a, grad and pre_activation must have one shape",
    )
    rel_shape = (a.shape[0],) + tuple(a.shape[2:])
    return a.new_empty(rel_shape), torch.empty_like(pre_activation, memory_format=torch.contiguous_format)


@_fake("activation_share_backward")
def _(grad_relevance, grad_g, a, grad, pre_activation, relevance):
    cf = torch.contiguous_format
    return (
        torch.empty_like(a, memory_format=cf),
        torch.empty_like(a, memory_format=cf),
        torch.empty_like(a, memory_format=cf),
        torch.empty_like(relevance, memory_format=cf),
    )


@_fake("conv_tap_norms")
def _(x, weight, stride, padding, dilation, groups):
    torch._check(
        x.dim() == 4 and weight.dim() == 4,
        lambda: "srd_ext::conv_tap_norms: x must be (B, C_in, H, W) and weight (C_out, C_in/groups, kh, kw)",
    )
    return x.new_empty((x.shape[0], weight.shape[2] * weight.shape[3], x.shape[2], x.shape[3]))


@_fake("conv_tap_norms_backward")
def _(grad_tap_norms, x, weight, tap_norms, stride, padding, dilation, groups):
    cf = torch.contiguous_format
    return torch.empty_like(x, memory_format=cf), torch.empty_like(weight, memory_format=cf)


@_fake("bias_share_scatter")
def _(tap_norms, bias_dot, kernel_size, stride, padding, dilation):
    torch._check(
        tap_norms.dim() == 4 and bias_dot.dim() == 3,
        lambda: "srd_ext::bias_share_scatter: tap_norms must be (B, T, H, W) and bias_dot (B, H_out, W_out)",
    )
    return tap_norms.new_empty((tap_norms.shape[0], tap_norms.shape[2], tap_norms.shape[3]))


@_fake("bias_share_scatter_backward")
def _(grad_relevance, tap_norms, bias_dot, kernel_size, stride, padding, dilation):
    cf = torch.contiguous_format
    return torch.empty_like(tap_norms, memory_format=cf), torch.empty_like(bias_dot, memory_format=cf)


@_fake("pfv_decompose")
def _(x, weight, bias, positions, stride, padding, dilation, bias_share):
    n = positions.shape[0]
    taps = weight.shape[2] * weight.shape[3]
    return x.new_empty((n, taps, weight.shape[0])), x.new_empty((n, taps))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _activation_share_setup(ctx, inputs, output):
    a, grad, z, extra = inputs
    relevance, _ = output
    ctx.has_extra = extra is not None
    ctx.save_for_backward(a, grad, z, relevance)


def _activation_share_backward(ops):
    def backward(ctx, grad_relevance, grad_g):
        a, grad, z, relevance = ctx.saved_tensors
        if grad_relevance is None:
            grad_relevance = torch.zeros_like(relevance)
        if grad_g is None:
            grad_g = torch.zeros_like(z)
        ga, gg, gz, ge = ops.activation_share_backward(grad_relevance, grad_g, a, grad, z, relevance)
        return ga, gg, gz, (ge if ctx.has_extra else None)

    return backward


def _tap_norms_setup(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups = inputs
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.save_for_backward(x, weight, output)


def _tap_norms_backward(ops):
    def backward(ctx, grad_out):
        x, weight, norms = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        gx, gw = ops.conv_tap_norms_backward(grad_out, x, weight, norms, stride, padding, dilation, groups)
        return gx, gw, None, None, None, None

    return backward


def _scatter_setup(ctx, inputs, output):
    tap_norms, bias_dot, kernel_size, stride, padding, dilation = inputs
    ctx.geometry = (kernel_size, stride, padding, dilation)
    ctx.save_for_backward(tap_norms, bias_dot)


def _scatter_backward(ops):
    def backward(ctx, grad_out):
        tap_norms, bias_dot = ctx.saved_tensors
        gn, gd = ops.bias_share_scatter_backward(grad_out, tap_norms, bias_dot, *ctx.geometry)
        return gn, gd, None, None, None, None

    return backward


def _gather_taps(x: Tensor, positions: Tensor, kh: int, kw: int, stride, padding, dilation):
    """Input PFVs under every tap of the chosen output pixels: (N, T, C) and a validity mask (N, T)."""
    b, oy, ox = positions.unbind(1)
    ty = torch.arange(kh, device=x.device).repeat_interleave(kw)
    tx = torch.arange(kw, device=x.device).repeat(kh)
    iy = oy[:, None] * stride[0] - padding[0] + ty[None] * dilation[0]
    ix = ox[:, None] * stride[1] - padding[1] + tx[None] * dilation[1]
    valid = (iy >= 0) & (iy < x.shape[2]) & (ix >= 0) & (ix < x.shape[3])
    iy_c, ix_c = iy.clamp(0, x.shape[2] - 1), ix.clamp(0, x.shape[3] - 1)
    cols = x.permute(0, 2, 3, 1)[b[:, None], iy_c, ix_c]  # (N, T, C)
    return cols * valid[..., None].to(x.dtype), valid


def pfv_decompose_reference(x, weight, bias, positions, stride, padding, dilation, bias_share):
    """The same decomposition written with differentiable torch ops (used for its gradient)."""
    kh, kw = weight.shape[2], weight.shape[3]
    cols, valid = _gather_taps(x, positions, kh, kw, stride, padding, dilation)
    w_taps = weight.permute(2, 3, 0, 1).reshape(kh * kw, weight.shape[0], weight.shape[1])  # (T, O, C)
    contrib = torch.einsum("toc,ntc->nto", w_taps, cols)
    z = contrib.sum(1)
    if bias is not None:
        z = z + bias
        if bias_share == "none":
            norms = torch.zeros_like(contrib[..., 0])
        else:
            src = contrib if bias_share == "contribution" else cols
            norms = torch.linalg.vector_norm(src, dim=-1) * valid.to(x.dtype)
        total = norms.sum(1, keepdim=True)
        share = torch.where(
            total > 0, norms / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(norms)
        )
        v_hat = contrib + share[..., None] * bias
    else:
        v_hat = contrib
    z2 = (z * z).sum(-1, keepdim=True)
    mu = torch.where(
        z2 > 0,
        (v_hat * z[:, None, :]).sum(-1) / torch.where(z2 > 0, z2, torch.ones_like(z2)),
        torch.zeros_like(v_hat[..., 0]),
    )
    return v_hat, mu


def _pfv_setup(ctx, inputs, output):
    x, weight, bias, positions, stride, padding, dilation, bias_share = inputs
    ctx.args = (stride, padding, dilation, bias_share)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias if bias is not None else weight.new_empty(0), positions)


def _pfv_backward(ctx, grad_v_hat, grad_mu):
    x, weight, bias, positions = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (x, weight)]
        b = bias.detach().requires_grad_(True) if bias is not None else None
        v_hat, mu = pfv_decompose_reference(leaves[0], leaves[1], b, positions, *ctx.args)
        outs, grads = [], []
        for o, g in ((v_hat, grad_v_hat), (mu, grad_mu)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        inputs = leaves + ([b] if b is not None else [])
        res = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    gx, gw = res[0], res[1]
    gb = res[2] if b is not None else None
    return gx, gw, gb, None, None, None, None, None


for _ns_name in NAMESPACES:
    _o = getattr(torch.ops, _ns_name)
    torch.library.register_autograd(
        f"{_ns_name}::activation_share", _activation_share_backward(_o), setup_context=_activation_share_setup
    )
    torch.library.register_autograd(
        f"{_ns_name}::conv_tap_norms", _tap_norms_backward(_o), setup_context=_tap_norms_setup
    )
    torch.library.register_autograd(
        f"{_ns_name}::bias_share_scatter", _scatter_backward(_o), setup_context=_scatter_setup
    )
    torch.library.register_autograd(f"{_ns_name}::pfv_decompose", _pfv_backward, setup_context=_pfv_setup)
