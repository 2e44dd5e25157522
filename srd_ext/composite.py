"""The srd_ext operators written with ATen ops only: the composite path.

Every function here computes what the compiled kernel of the same name computes (csrc/cpu/*.cpp,
the semantics in docs/math.md), from ATen ops that every device has: 1x1 convolutions, products,
reductions and strided slices. ``srd_ext.ops`` registers them under ``CompositeExplicitAutograd``,
so they serve every device without a compiled kernel (MPS, XPU, CUDA when the extension was built
without nvcc), and as the ``srd_ext_composite`` operators, which ``SRD_EXT_BACKEND=composite``
(or ``auto`` on a GPU whose kernels no GPU run has passed yet) routes the wrappers to.

Memory. The tap-wise ops loop over the kernel taps; one tap's work covers only the pixels that
tap reaches, which lie on one sub-lattice (stride) of the input and number at most H_out * W_out.
So every temporary of ``conv_tap_norms`` and of its backward holds at most (B, max(C_in, C_out),
H_out, W_out) values: at most the conv's output when C_in <= C_out, and C_in / C_out times it
otherwise (the 1x1 reductions that halve the channels of a bottleneck). ``bias_share_scatter``
works on one (B, H_out, W_out) plane per tap. Nothing is unfolded: no temporary grows with the
number of taps.

No host synchronisation: the loops run over taps and geometry, known from shapes alone; only
``pfv_decompose`` reads its ``positions`` on the host to check their range (off the hot path of
an explanation, which never calls it).

Float16 and bfloat16 (accepted where the device is not the CPU) are computed in float32 and
rounded once, like the CUDA kernels.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "activation_share",
    "activation_share_backward",
    "conv_tap_norms",
    "conv_tap_norms_backward",
    "bias_share_scatter",
    "bias_share_scatter_backward",
    "pfv_decompose",
    "device_dtypes",
]

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Checks (the messages of csrc/common.h)
# --------------------------------------------------------------------------------------------
def _fail(op: str, msg: str):
    raise RuntimeError(f"srd_ext::{op}: {msg}")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def device_dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    """The floating dtypes the composite path accepts on ``device``: float32 everywhere, float64
    where the device has it (not MPS), float16 and bfloat16 on accelerators."""
    if device.type == "cpu":
        return (torch.float32, torch.float64)
    if device.type == "mps":
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _check_float(op: str, name: str, t: Tensor) -> None:
    ok = device_dtypes(t.device)
    if t.dtype not in ok:
        if t.is_floating_point() and t.dtype == torch.float64:
            _fail(
                op,
                f"{name} is float64 (Double), which {t.device.type.upper()} cannot compute; "
                f"use float32 (x.float()) on this device. Accepted here: {_names(ok)}",
            )
        _fail(
            op,
            f"{name} must be {_names(ok)} on {t.device.type}, got {str(t.dtype).replace('torch.', '')} "
            f"({_scalar_name(t.dtype)})",
        )


def _scalar_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "Float",
        torch.float64: "Double",
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
        torch.int64: "Long",
        torch.int32: "Int",
        torch.int16: "Short",
        torch.int8: "Char",
        torch.uint8: "Byte",
        torch.bool: "Bool",
    }.get(dtype, str(dtype))


def _check_same(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")
    if t.dtype != ref.dtype:
        _fail(op, f"{name} has dtype {_scalar_name(t.dtype)} but {ref_name} has dtype {_scalar_name(ref.dtype)}")


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    room = n + 2 * p - d * (k - 1) - 1
    return -1 if room < 0 else room // s + 1


def _geometry(op, kh, kw, stride, padding, dilation, H, W, input_desc, kernel_desc):
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        _fail(op, "stride, padding and dilation must each have 2 entries")
    if stride[0] <= 0 or stride[1] <= 0:
        _fail(op, f"stride must be positive, got ({stride[0]}, {stride[1]})")
    if dilation[0] <= 0 or dilation[1] <= 0:
        _fail(op, f"dilation must be positive, got ({dilation[0]}, {dilation[1]})")
    if padding[0] < 0 or padding[1] < 0:
        _fail(op, f"padding must be non-negative, got ({padding[0]}, {padding[1]})")
    if kh <= 0 or kw <= 0:
        _fail(op, f"kernel size must be positive, got ({kh}, {kw})")
    ho = _out_size(H, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(W, kw, stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        _fail(
            op,
            f"{input_desc} is too small for {kernel_desc}: the padded input is ({H + 2 * padding[0]}, "
            f"{W + 2 * padding[1]}) but the dilated kernel is ({dilation[0] * (kh - 1) + 1}, "
            f"{dilation[1] * (kw - 1) + 1})",
        )
    return ho, wo


def _check_tap_norms(op, x, weight, stride, padding, dilation, groups):
    if x.dim() != 4:
        _fail(op, f"x must be (B, C_in, H, W), got shape {_shape(x)}")
    if weight.dim() != 4:
        _fail(op, f"weight must be (C_out, C_in/groups, kh, kw), got shape {_shape(weight)}")
    _check_float(op, "x", x)
    _check_same(op, "weight", weight, x, "x")
    if groups < 1:
        _fail(op, f"groups must be >= 1, got {groups}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups != 0:
        _fail(op, f"x {_shape(x)} does not fit weight {_shape(weight)} with groups={groups}")
    return _geometry(
        op,
        weight.shape[2],
        weight.shape[3],
        stride,
        padding,
        dilation,
        x.shape[2],
        x.shape[3],
        f"input x {_shape(x)}",
        f"weight {_shape(weight)}",
    )


def _check_scatter(op, n, d, kernel_size, stride, padding, dilation):
    if len(kernel_size) != 2:
        _fail(op, "kernel_size must have 2 entries")
    if n.dim() != 4:
        _fail(op, f"tap_norms must be (B, kh*kw, H_in, W_in), got shape {_shape(n)}")
    if d.dim() != 3:
        _fail(op, f"bias_dot must be (B, H_out, W_out), got shape {_shape(d)}")
    _check_float(op, "tap_norms", n)
    _check_same(op, "bias_dot", d, n, "tap_norms")
    kh, kw = kernel_size
    ho, wo = _geometry(
        op,
        kh,
        kw,
        stride,
        padding,
        dilation,
        n.shape[2],
        n.shape[3],
        f"tap_norms {_shape(n)}",
        f"kernel_size ({kh}, {kw})",
    )
    if n.shape[1] != kh * kw:
        _fail(op, f"tap_norms {_shape(n)} has {n.shape[1]} taps but kernel_size is ({kh}, {kw})")
    if d.shape[0] != n.shape[0] or d.shape[1] != ho or d.shape[2] != wo:
        _fail(
            op,
            f"bias_dot {_shape(d)} does not match tap_norms {_shape(n)} (expected ({n.shape[0]}, {ho}, {wo}) "
            "for this geometry)",
        )
    return ho, wo


def _check_activation(op, a, grad, z, extra):
    if a.dim() not in (2, 4):
        _fail(op, f"a must be (B, C, H, W) or (B, C), got shape {_shape(a)}")
    _check_float(op, "a", a)
    if grad.shape != a.shape or z.shape != a.shape:
        _fail(op, f"a, grad and pre_activation must have one shape, got {_shape(a)}, {_shape(grad)} and {_shape(z)}")
    _check_same(op, "grad", grad, a, "a")
    _check_same(op, "pre_activation", z, a, "a")
    if extra is not None:
        want = (a.shape[0],) + tuple(a.shape[2:])
        if tuple(extra.shape) != want:
            _fail(
                op,
                f"extra must have shape {'(B, H, W)' if a.dim() == 4 else '(B,)'} matching a {_shape(a)}, "
                f"got {_shape(extra)}",
            )
        _check_same(op, "extra", extra, a, "a")


def _work(*ts: Optional[Tensor]) -> List[Optional[Tensor]]:
    """Float16/bfloat16 inputs in float32 (the computation type), others as they are."""
    return [t.float() if t is not None and t.dtype in _HALF else t for t in ts]


# --------------------------------------------------------------------------------------------
# activation_share
# --------------------------------------------------------------------------------------------
def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0 or NaN (positive_or_nan in csrc/numerics.h), 0 elsewhere."""
    empty = den <= 0
    return torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))


def activation_share(a: Tensor, grad: Tensor, z: Tensor, extra: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _check_activation("activation_share", a, grad, z, extra)
    dtype = a.dtype
    a, grad, z, extra = _work(a, grad, z, extra)
    r = (a * grad).sum(1)
    if extra is not None:
        r = extra + r
    n2 = (z * z).sum(1)
    g = z * _safe_div(r, n2).unsqueeze(1)
    return r.to(dtype), g.to(dtype).contiguous()


def activation_share_backward(dR: Tensor, dg: Tensor, a: Tensor, grad: Tensor, z: Tensor, R: Tensor):
    op = "activation_share_backward"
    _check_activation(op, a, grad, z, None)
    want = (a.shape[0],) + tuple(a.shape[2:])
    if tuple(dR.shape) != want or tuple(R.shape) != want:
        _fail(
            op,
            f"grad_relevance and relevance must have shape {'(B, H, W)' if a.dim() == 4 else '(B,)'} matching "
            f"a {_shape(a)}, got {_shape(dR)} and {_shape(R)}",
        )
    if dg.shape != a.shape:
        _fail(op, f"grad_g must have the shape of a {_shape(a)}, got {_shape(dg)}")
    for name, t in (("grad_relevance", dR), ("grad_g", dg), ("relevance", R)):
        _check_same(op, name, t, a, "a")
    dtype = a.dtype
    dR, dg, a, grad, z, R = _work(dR, dg, a, grad, z, R)
    n2 = (z * z).sum(1)
    q = (dg * z).sum(1)
    s = _safe_div(R, n2)
    dRt = dR + _safe_div(q, n2)
    k = _safe_div(2 * q * s, n2)
    ga = dRt.unsqueeze(1) * grad
    gg = dRt.unsqueeze(1) * a
    gz = dg * s.unsqueeze(1) - k.unsqueeze(1) * z
    return tuple(t.to(dtype).contiguous() for t in (ga, gg, gz, dRt))


# --------------------------------------------------------------------------------------------
# The taps' runs (csrc/conv_geometry.h)
# --------------------------------------------------------------------------------------------
def _run(t: int, k_in: int, k_out: int, s: int, p: int, d: int) -> Tuple[int, int, int]:
    """Along one axis, tap offset t maps the outputs [o0, o0 + count) to the inputs i0, i0 + s, ...
    inside [0, k_in): (o0, i0, count), count 0 where none."""
    off = t * d - p
    lo = 0 if off >= 0 else (-off + s - 1) // s
    top = k_in - 1 - off
    hi = 0 if top < 0 else top // s + 1
    hi = min(hi, k_out)
    if hi <= lo:
        return 0, 0, 0
    return lo, lo * s + off, hi - lo


def _tap_slices(kh, kw, H, W, Ho, Wo, stride, padding, dilation):
    """Per tap t = ty*kw + tx that reaches an output: (t, ty, tx, input slices, output slices)."""
    rows = [_run(ty, H, Ho, stride[0], padding[0], dilation[0]) for ty in range(kh)]
    cols = [_run(tx, W, Wo, stride[1], padding[1], dilation[1]) for tx in range(kw)]
    out = []
    for ty, (oy, iy, cy) in enumerate(rows):
        if cy == 0:
            continue
        for tx, (ox, ix, cx) in enumerate(cols):
            if cx == 0:
                continue
            ins = (
                slice(iy, iy + (cy - 1) * stride[0] + 1, stride[0]),
                slice(ix, ix + (cx - 1) * stride[1] + 1, stride[1]),
            )
            outs = (slice(oy, oy + cy), slice(ox, ox + cx))
            out.append((ty * kw + tx, ty, tx, ins, outs))
    return out


# --------------------------------------------------------------------------------------------
# conv_tap_norms
# --------------------------------------------------------------------------------------------
def _conv1x1(x: Tensor, w: Tensor, groups: int) -> Tensor:
    """A 1x1 grouped conv of x (B, groups*Cg, h, w) by w (groups*Co, Cg), as a batched matrix
    product: on the CPU faster than F.conv2d for these shapes (oneDNN sets up a primitive per call,
    and float64 has no fast conv), and on CUDA it stays in full float32 (cuBLAS does not take TF32
    unless torch.backends.cuda.matmul.allow_tf32 asks for it; cuDNN convs do by default)."""
    B, C, h, wd = x.shape
    Co = w.shape[0] // groups
    if C == groups and Co == 1:  # depthwise
        return x * w.view(1, groups, 1, 1)
    wg = w.view(groups, Co, C // groups)
    y = torch.matmul(wg, x.reshape(B, groups, C // groups, h * wd))  # (B, groups, Co, h*w)
    return y.view(B, groups * Co, h, wd)


def _conv1x1_t(y: Tensor, w: Tensor, groups: int) -> Tensor:
    """The transpose of :func:`_conv1x1`: y (B, groups*Co, h, w) by w^T per group."""
    B, O, h, wd = y.shape
    Cg = w.shape[1]
    if O == groups and Cg == 1:
        return y * w.view(1, groups, 1, 1)
    wg = w.view(groups, O // groups, Cg).transpose(1, 2)
    x = torch.matmul(wg, y.reshape(B, groups, O // groups, h * wd))
    return x.view(B, groups * Cg, h, wd)


def conv_tap_norms(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int
) -> Tensor:
    """n_t(i) = ||W_t x_i|| per tap. Per tap, over the pixels it reaches: the product form (a 1x1
    conv by W_t and the norm of the products) where a group has at least as many input as output
    channels, else the Gram form n^2 = <G_t x, x> with G_t = W_t^T W_t (in float64, rounded once),
    whose 1x1 conv has C_in outputs instead of C_out. Either way one tap's temporaries hold at most
    (B, min(C_in, C_out), H_out, W_out) values."""
    op = "conv_tap_norms"
    Ho, Wo = _check_tap_norms(op, x, weight, stride, padding, dilation, groups)
    dtype = x.dtype
    x, weight = _work(x, weight)
    B, C_in, H, W = x.shape
    C_out, Cg, kh, kw = weight.shape
    out = x.new_zeros((B, kh * kw, H, W))
    if out.numel() == 0 or C_out == 0 or Cg == 0:
        return out.to(dtype)
    gram = Cg < C_out // groups
    if gram:
        w64 = weight.double().permute(2, 3, 0, 1).reshape(kh * kw, groups, C_out // groups, Cg)
        G = (w64.transpose(2, 3) @ w64).to(x.dtype).reshape(kh * kw, C_in, Cg)  # (T, groups*Cg, Cg)
    for t, ty, tx, (sy, sx), _ in _tap_slices(kh, kw, H, W, Ho, Wo, stride, padding, dilation):
        xs = x[:, :, sy, sx]
        if gram:
            y = _conv1x1(xs, G[t], groups)
            n = y.mul_(xs).sum(1).clamp_min_(0).sqrt_()
        else:
            n = torch.linalg.vector_norm(_conv1x1(xs, weight[:, :, ty, tx], groups), dim=1)
        out[:, t, sy, sx] = n
    return out.to(dtype)


def conv_tap_norms_backward(
    dn: Tensor,
    x: Tensor,
    weight: Tensor,
    n: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """grad x_i = sum_t W_t^T (c W_t x_i), grad W_t = sum_i (c W_t x_i) x_i^T with c = dn / n
    (0 where n = 0), per tap over the pixels it reaches."""
    op = "conv_tap_norms_backward"
    Ho, Wo = _check_tap_norms(op, x, weight, stride, padding, dilation, groups)
    want = (x.shape[0], weight.shape[2] * weight.shape[3], x.shape[2], x.shape[3])
    if tuple(dn.shape) != want or tuple(n.shape) != want:
        _fail(
            op,
            f"grad_tap_norms and tap_norms must have shape (B, kh*kw, H, W) = ({want[0]}, {want[1]}, {want[2]}, "
            f"{want[3]}) for x {_shape(x)} and weight {_shape(weight)}, got {_shape(dn)} and {_shape(n)}",
        )
    _check_same(op, "grad_tap_norms", dn, x, "x")
    _check_same(op, "tap_norms", n, x, "x")
    dtype = x.dtype
    dn, x, weight, n = _work(dn, x, weight, n)
    B, C_in, H, W = x.shape
    C_out, Cg, kh, kw = weight.shape
    Cog = C_out // groups if groups else 0
    gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
    gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if gx.numel() == 0 or C_out == 0 or Cg == 0:
        return gx.to(dtype), gw.to(dtype)
    for t, ty, tx, (sy, sx), _ in _tap_slices(kh, kw, H, W, Ho, Wo, stride, padding, dilation):
        c = _safe_div(dn[:, t, sy, sx], n[:, t, sy, sx]).unsqueeze(1)  # (B, 1, h, w)
        used = c != 0
        xs = x[:, :, sy, sx]
        wt = weight[:, :, ty, tx]
        # Pairs without a share drop out (a NaN product there would otherwise reach every weight).
        cy = torch.where(used, _conv1x1(xs, wt, groups) * c, 0.0)
        gx[:, :, sy, sx] += _conv1x1_t(cy, wt, groups)
        xm = torch.where(used, xs, 0.0)
        h, w = xs.shape[2], xs.shape[3]
        gw[:, :, ty, tx] = torch.einsum(
            "bgop,bgcp->goc", cy.reshape(B, groups, Cog, h * w), xm.reshape(B, groups, Cg, h * w)
        ).reshape(C_out, Cg)
    return gx.to(dtype), gw.to(dtype)


# --------------------------------------------------------------------------------------------
# bias_share_scatter
# --------------------------------------------------------------------------------------------
def bias_share_scatter(
    n: Tensor,
    d: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """S_j = sum_t n_t(i(j,t)), c_j = d_j / S_j, relevance_i = sum_t n_t(i) c_{j(i,t)}: one
    (B, H_out, W_out) plane per tap, gathered and scattered through strided slices."""
    op = "bias_share_scatter"
    Ho, Wo = _check_scatter(op, n, d, kernel_size, stride, padding, dilation)
    dtype = n.dtype
    n, d = _work(n, d)
    B, T, H, W = n.shape
    taps = _tap_slices(kernel_size[0], kernel_size[1], H, W, Ho, Wo, stride, padding, dilation)
    S = d.new_zeros((B, Ho, Wo))
    for t, _, _, (sy, sx), (oy, ox) in taps:
        S[:, oy, ox] += n[:, t, sy, sx]
    c = _safe_div(d, S)
    R = n.new_zeros((B, H, W))
    for t, _, _, (sy, sx), (oy, ox) in taps:
        R[:, sy, sx] += n[:, t, sy, sx] * c[:, oy, ox]
    return R.to(dtype)


def bias_share_scatter_backward(
    g: Tensor,
    n: Tensor,
    d: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[Tensor, Tensor]:
    """grad d_j = a_j = u_j / S_j with u_j = sum_t n_t g_i; grad n_t(i) = (g_i - a_j) c_j on the
    valid pairs whose S_j > 0, 0 elsewhere."""
    op = "bias_share_scatter_backward"
    Ho, Wo = _check_scatter(op, n, d, kernel_size, stride, padding, dilation)
    if g.dim() != 3 or g.shape[0] != n.shape[0] or g.shape[1] != n.shape[2] or g.shape[2] != n.shape[3]:
        _fail(
            op,
            f"grad_relevance must have shape (B, H_in, W_in) = ({n.shape[0]}, {n.shape[2]}, {n.shape[3]}) "
            f"for tap_norms {_shape(n)}, got {_shape(g)}",
        )
    _check_same(op, "grad_relevance", g, n, "tap_norms")
    dtype = n.dtype
    g, n, d = _work(g, n, d)
    B, T, H, W = n.shape
    taps = _tap_slices(kernel_size[0], kernel_size[1], H, W, Ho, Wo, stride, padding, dilation)
    S = d.new_zeros((B, Ho, Wo))
    u = d.new_zeros((B, Ho, Wo))
    for t, _, _, (sy, sx), (oy, ox) in taps:
        nt = n[:, t, sy, sx]
        S[:, oy, ox] += nt
        u[:, oy, ox] += nt * g[:, sy, sx]
    pos = ~(S <= 0)
    a = _safe_div(u, S)
    c = _safe_div(d, S)
    gn = torch.zeros_like(n, memory_format=torch.contiguous_format)
    for t, _, _, (sy, sx), (oy, ox) in taps:
        gn[:, t, sy, sx] = torch.where(pos[:, oy, ox], (g[:, sy, sx] - a[:, oy, ox]) * c[:, oy, ox], 0.0)
    return gn.to(dtype), a.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# pfv_decompose
# --------------------------------------------------------------------------------------------
_MODES = {"none": 0, "contribution": 1, "input": 2}


def pfv_decompose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    bias_share: str,
) -> Tuple[Tensor, Tensor]:
    """The explicit decomposition of the chosen output PFVs: the input PFVs under each tap gathered
    (N, T, C_in), one batched product per tap, the bias shared by the contribution norms
    ("contribution"), the input norms in float64 ("input") or not at all ("none")."""
    op = "pfv_decompose"
    Ho, Wo = _check_tap_norms(op, x, weight, stride, padding, dilation, 1)
    if bias_share not in _MODES:
        _fail(op, f'bias_share must be "none", "contribution" or "input", got "{bias_share}"')
    mode = _MODES[bias_share]
    B, C_in, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    T = kh * kw
    if positions.dtype != torch.int64:
        _fail(op, f"positions must be int64, got {_scalar_name(positions.dtype)}")
    if positions.dim() != 2 or positions.shape[1] != 3:
        _fail(op, f"positions must be (N, 3) rows (b, y, x), got shape {_shape(positions)}")
    if positions.device != x.device:
        _fail(op, f"positions is on {positions.device} but x is on {x.device}; all tensors must be on one device")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != C_out:
            _fail(op, f"bias must be (C_out,) = ({C_out},) for weight {_shape(weight)}, got shape {_shape(bias)}")
        _check_same(op, "bias", bias, x, "x")
    N = positions.shape[0]
    if N:
        hi = torch.tensor([B, Ho, Wo], device=positions.device)
        bad = ((positions < 0) | (positions >= hi)).any(1)
        if bool(bad.any()):  # reads the positions on the host; pfv_decompose is off the hot path
            r = int(bad.nonzero()[0, 0])
            b, oy, ox = (int(v) for v in positions[r].tolist())
            _fail(
                op,
                f"positions row {r} is (b, y, x) = ({b}, {oy}, {ox}) but the valid ranges are b in [0, {B}), "
                f"y in [0, {Ho}), x in [0, {Wo}) for x {_shape(x)} and weight {_shape(weight)}",
            )
    dtype = x.dtype
    x, weight, bias = _work(x, weight, bias)
    if N == 0:
        return x.new_empty((0, T, C_out)).to(dtype), x.new_empty((0, T)).to(dtype)
    b, oy, ox = positions.unbind(1)
    ty = torch.arange(kh, device=x.device).repeat_interleave(kw)
    tx = torch.arange(kw, device=x.device).repeat(kh)
    iy = oy[:, None] * stride[0] - padding[0] + ty[None] * dilation[0]
    ix = ox[:, None] * stride[1] - padding[1] + tx[None] * dilation[1]
    valid = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    cols = x.permute(0, 2, 3, 1)[b[:, None], iy.clamp(0, H - 1), ix.clamp(0, W - 1)]  # (N, T, C_in)
    cols = torch.where(valid[..., None], cols, 0.0)
    w_taps = weight.permute(2, 3, 1, 0).reshape(T, C_in, C_out)
    Y = torch.bmm(cols.transpose(0, 1), w_taps).transpose(0, 1)  # (N, T, C_out)
    z = Y.sum(1)
    if bias is not None:
        z = z + bias
        if mode == 1:
            nt = torch.linalg.vector_norm(Y, dim=-1)
        elif mode == 2:
            nt = torch.linalg.vector_norm(cols.double(), dim=-1).to(x.dtype)
        else:
            nt = torch.zeros_like(Y[..., 0])
        share = _safe_div(nt, nt.sum(1, keepdim=True))
        v = Y + share[..., None] * bias
    else:
        v = Y
    zn = (z * z).sum(-1, keepdim=True)
    mu = _safe_div((v * z[:, None, :]).sum(-1), zn)
    return v.to(dtype).contiguous(), mu.to(dtype).contiguous()
