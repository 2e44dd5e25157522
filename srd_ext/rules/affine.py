"""Affine ops: convolutions (with a following BatchNorm folded in), linear layers over channels,
normalisations, and the arithmetic of residual streams, layer scales and gates.

Each rule's ``vjp`` is the transpose of its linear part; each bias is shared among the input
pixels it reads (docs/math.md, "Bias shares"):

- conv: by ``||W_t x_i||`` over the taps ("contribution", the default) or ``||x_i||`` ("input"),
  with ``srd_ext.ops.conv_tap_norms`` + ``bias_share_scatter``; a 1x1 conv reads one pixel, which
  takes the whole share (no tap norms: the contribution norm is the conv output minus its bias);
- per-pixel biases (a stand-alone BatchNorm, LayerNorm/GroupNorm's beta, a linear layer over the
  channels of a channels-last tensor, an added constant): the share stays at its pixel;
- a pixel whose contribution is zero takes no share; an output pixel none of whose inputs
  contributes hands its bias to nobody.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..nodes import Ref
from .base import Rule, nchw_layout, pixel_norm, pixel_sum, register, same_layout, sum_to, unsupported


def _is_ref(a) -> bool:
    return isinstance(a, Ref)


def _pair(v, n=2):
    if isinstance(v, (list, tuple)):
        v = list(v)
        return tuple(v) if len(v) == n else tuple(v * n) if len(v) == 1 else tuple(v)
    return (v,) * n


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------
def _conv_args(node):
    """(x, weight, bias, stride, padding, dilation, groups, transposed) of a conv node."""
    a = list(node.args)
    kw = node.kwargs
    name = node.op_name
    if name == "aten.convolution":
        x, w, b, stride, padding, dilation, transposed, _out_pad, groups = a[:9]
        return x, w, b, stride, padding, dilation, groups, bool(transposed)
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = [None, None, None, 1, 0, 1, 1]
    vals = [a[i] if i < len(a) else kw.get(names[i], defaults[i]) for i in range(7)]
    return (*vals, False)


def conv_geometry(node, graph):
    x, w, b, stride, padding, dilation, groups, transposed = _conv_args(node)
    wshape = graph.nodes[w.index].shape if _is_ref(w) else tuple(w.shape)
    p = {
        "x": x.index,
        "w": w.index if _is_ref(w) else None,
        "b": b.index if _is_ref(b) else None,
        "transposed": transposed,
        "groups": int(groups),
        "dims": len(wshape) - 2,
        "weight_data": _is_ref(w) and graph.nodes[w.index].data,
    }
    if p["dims"] != 2:
        return p
    kh, kw = int(wshape[2]), int(wshape[3])
    sh, sw = (int(s) for s in _pair(stride))
    dh, dw = (int(d) for d in _pair(dilation))
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        else:  # "same": torch puts the odd pixel at the bottom/right
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = (int(v) for v in _pair(padding))
        pad = (ph, ph, pw, pw)
    p.update(
        k=(kh, kw),
        stride=(sh, sw),
        dilation=(dh, dw),
        pad=pad,
        symmetric=pad[0] == pad[1] and pad[2] == pad[3],
        pointwise=(kh, kw) == (1, 1),
    )
    return p


def conv_vjp(g: Tensor, weight: Tensor, p, in_shape) -> Tensor:
    """``F^T g`` of a conv: the transposed convolution back to the input's size."""
    top, bottom, left, right = p["pad"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    kh, kw = p["k"]
    geo = ((sh, dh, kh), (sw, dw, kw))

    def output_padding(sizes, pads):
        return tuple(
            n - ((g.shape[2 + ax] - 1) * s - 2 * q + d * (k - 1) + 1)
            for ax, (n, q, (s, d, k)) in enumerate(zip(sizes, pads, geo))
        )

    if p["symmetric"]:
        # The padding cropped by the transposed conv itself: a contiguous field of the input's
        # size, where the output padding it needs is one the op accepts (below stride or dilation).
        out_pad = output_padding(in_shape[2:], (top, left))
        if all(0 <= o < max(s, d) for o, (s, d, _) in zip(out_pad, geo)):
            return F.conv_transpose2d(g, weight, None, (sh, sw), (top, left), out_pad, p["groups"], (dh, dw))
    out_pad = output_padding((in_shape[2] + top + bottom, in_shape[3] + left + right), (0, 0))
    gx = F.conv_transpose2d(g, weight, None, (sh, sw), 0, out_pad, p["groups"], (dh, dw))
    if any(p["pad"]):
        gx = gx[:, :, top : top + in_shape[2], left : left + in_shape[3]]
    return gx


def channel_dot(g: Tensor, v: Tensor) -> Tensor:
    """``sum_c g[:, c] * v[c]``: (B, C, H, W) with (C,) -> (B, H, W), as one batched row-times-matrix
    product with ``v`` broadcast over the batch. (An einsum, or a matmul where ``v`` requires grad,
    would first copy ``g`` into a channel-last layout: 30x slower on a VGG16 stage-1 field.)"""
    B, C = g.shape[:2]
    return torch.bmm(v.view(1, 1, C).expand(B, 1, C), g.reshape(B, C, -1)).view(B, *g.shape[2:])


def conv_bias_relevance(
    bias_dot: Tensor, x: Tensor, weight: Tensor, p, mode: str, out_norm: Optional[Tensor] = None
) -> Tensor:
    """Relevance (B, H_in, W_in) a conv's bias hands to its input pixels.

    ``bias_dot_j = <b, g_j>`` (B, H_out, W_out; ``channel_dot``) is the bias' share of output
    pixel j; it is split among the input pixels under the kernel by ``||W_t x_i||``
    ("contribution") or ``||x_i||`` ("input").
    ``out_norm``: for a 1x1 conv, a per-pixel norm of the recorded conv output without its bias,
    zero exactly where ``W x_i`` is (the pixel then takes no share).
    """
    if p["pointwise"]:
        n = None
        if mode == "contribution":
            if out_norm is None:
                out_norm = torch.linalg.vector_norm(
                    F.conv2d(x, weight, None, p["stride"], (p["pad"][0], p["pad"][2]), 1, p["groups"]), dim=1
                )
            n = out_norm
        return _pointwise_share(bias_dot, x, n, p)
    top, bottom, left, right = p["pad"]
    if not p["symmetric"]:
        x = F.pad(x, (left, right, top, bottom))
        pad = (0, 0)
    else:
        pad = (top, left)
    if mode == "contribution":
        norms = ops.conv_tap_norms(x, weight, p["stride"], pad, p["dilation"], p["groups"])
    else:  # "input": Eq. 11 as printed, ||x_i|| for every tap that reads pixel i
        kh, kw = p["k"]
        probe = x.new_ones((1, 1, x.shape[2], x.shape[3]))
        valid = ops.conv_tap_norms(probe, x.new_ones((1, 1, kh, kw)), p["stride"], pad, p["dilation"], 1)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True) * valid
    r = ops.bias_share_scatter(norms, bias_dot, p["k"], p["stride"], pad, p["dilation"])
    if not p["symmetric"]:
        r = r[:, top : r.shape[1] - bottom, left : r.shape[2] - right]
    return r


def _strided_window(n_in: int, n_out: int, s: int, pad: int):
    """Output positions j whose 1x1 tap reads an input pixel (i = j*s - pad), as slices."""
    j0 = max(0, -(-pad // s))  # first j with j*s - pad >= 0
    j1 = min(n_out, (n_in - 1 + pad) // s + 1)  # last j with j*s - pad <= n_in - 1, exclusive
    if j1 <= j0:
        return slice(0, 0), slice(0, 0)
    i0 = j0 * s - pad
    return slice(j0, j1), slice(i0, i0 + (j1 - j0 - 1) * s + 1, s)


def _pointwise_share(bias_dot: Tensor, x: Tensor, n_out: Optional[Tensor], p) -> Tensor:
    """A 1x1 conv: output pixel j reads input pixel i = j*stride - pad, which takes the whole
    share when it contributes (``n > 0``)."""
    b, hout, wout = bias_dot.shape
    hin, win = x.shape[2], x.shape[3]
    (sh, sw), (top, _, left, _) = p["stride"], p["pad"]
    oy, iy = _strided_window(hin, hout, sh, top)
    ox, ix = _strided_window(win, wout, sw, left)
    if n_out is None:
        n = torch.linalg.vector_norm(x[:, :, iy, ix], dim=1)
    else:
        n = n_out[:, oy, ox]
    share = torch.where(n > 0, bias_dot[:, oy, ox], torch.zeros_like(n))
    r = bias_dot.new_zeros((b, hin, win))
    if share.numel():
        r[:, iy, ix] = share
    return r


def conv_weights(node, run) -> Tuple[Tensor, Optional[Tensor]]:
    p = node.params
    return run.value(p["w"]), (run.value(p["b"]) if p["b"] is not None else None)


@register
class Conv2d(Rule):
    ops = ("aten.conv2d", "aten.convolution")
    title = "conv2d (any stride, padding incl. 'same', dilation, groups; depthwise)"
    group = "affine"
    decomposable = True
    reads_nchw = True

    def parse(self, node, graph):
        node.params = conv_geometry(node, graph)
        x = node.params["x"]
        node.field_inputs = [x] if graph.nodes[x].data else []

    def check_main(self, node, graph):
        p = node.params
        if p["transposed"]:
            raise unsupported(node, "a transposed convolution")
        if p["dims"] != 2:
            raise unsupported(node, f"a {p['dims']}-d convolution (only 2-d)")
        if p["weight_data"]:
            raise unsupported(node, "a convolution whose weight depends on the input")

    def layout(self, node, graph):
        return nchw_layout(node, graph)

    def needs(self, node, graph):
        return [node.params["x"]]

    def weights(self, node, run):
        return conv_weights(node, run)

    def forward(self, node, args, kwargs, ctx):
        y = node.target(*args, **kwargs)
        if ctx.wants_record(node):
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            lin = y if b is None else y - b.view(1, -1, 1, 1)
            ctx.records[node.index] = torch.linalg.vector_norm(lin, dim=1)
        return y

    def vjp(self, node, g, run):
        w, _ = self.weights(node, run)
        x = node.params["x"]
        return [(x, conv_vjp(g, w, node.params, run.shape(x)))]

    grad = vjp

    def bias(self, node, g, run):
        return _conv_bias(node, g, run)


def _conv_bias(node, g, run, bn=None, conv=None):
    """Bias relevance of a conv (``node``), or of a BatchNorm node folding ``conv`` with
    ``bn = (scale, shift)``. The folded weight is formed only where the tap norms need it."""
    conv = conv or node
    w, b = conv_weights(conv, run)
    if bn is not None:
        scale, shift = bn
        b = shift if b is None else shift + scale * b
    if b is None or run.bias_share == "none" or run.skip_zero_bias(b):
        return []
    p = conv.params
    x = run.value(p["x"])
    if bn is not None and not p["pointwise"] and run.bias_share == "contribution":
        w = w * bn[0].view(-1, 1, 1, 1)
    bias_dot = channel_dot(g, b)
    r = conv_bias_relevance(bias_dot, x, w, p, run.bias_share, run.records.get(node.index))
    if run.lost is not None:
        run.note_lost(bias_dot.sum((1, 2)) - r.sum((1, 2)))
    return [(p["x"], r)]


def _bn_args(node):
    a = list(node.args)
    if node.op_name == "aten.batch_norm":
        x, w, b, mean, var = a[:5]
        eps = a[7]
    else:  # _native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)
        x, w, b, mean, var = a[:5]
        eps = a[6]
    return x, w, b, mean, var, float(eps)


@register
class BatchNorm(Rule):
    """Eval BatchNorm ``y = s x + t`` per channel. Right after a conv (its only reader) it is
    folded into that conv (:class:`Conv2d`'s rule with the folded weight and bias)."""

    ops = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training")
    title = "BatchNorm (eval; folded into the conv before it)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        x, w, b, mean, var, eps = _bn_args(node)
        node.params = {
            "x": x.index,
            "w": w.index if _is_ref(w) else None,
            "b": b.index if _is_ref(b) else None,
            "mean": mean.index,
            "var": var.index,
            "eps": eps,
            "tuple": node.op_name != "aten.batch_norm",
        }
        node.field_inputs = [x.index] if graph.nodes[x.index].data else []

    def layout(self, node, graph):
        if node.params["tuple"]:
            return graph.nodes[node.params["x"]].layout
        return same_layout(node, graph)

    def affine(self, node, run) -> Tuple[Tensor, Tensor]:
        p = node.params
        scale = torch.rsqrt(run.value(p["var"]) + p["eps"])
        if p["w"] is not None:
            scale = scale * run.value(p["w"])
        shift = -run.value(p["mean"]) * scale
        if p["b"] is not None:
            shift = shift + run.value(p["b"])
        return scale, shift

    def needs(self, node, graph):
        if node.fused is not None:
            return [graph.nodes[node.fused].params["x"]]
        return [node.params["x"]]

    def forward(self, node, args, kwargs, ctx):
        y = node.target(*args, **kwargs)
        if ctx.wants_record(node):
            # ||W_folded x_i|| of the 1x1 conv before: its output without bias, scaled by the BN.
            # (Taken from the conv output, not from the BN output minus the folded bias, so that a
            # zero contribution reads as exactly zero.)
            # Only whether it is zero matters (a 1x1 conv's pixel takes all or nothing): channels
            # the BN scales by 0 are left out, the rest need no scaling.
            conv = ctx.graph.nodes[node.fused]
            lin = args[0]
            if conv.params["b"] is not None:
                lin = lin - ctx.values[conv.params["b"]].view(1, -1, 1, 1)
            if args[1] is not None and (torch.compiler.is_compiling() or not bool(args[1].ne(0).all())):
                lin = lin * args[1].ne(0).to(lin.dtype).view(1, -1, 1, 1)
            ctx.records[node.index] = torch.linalg.vector_norm(lin, dim=1)
        return y

    def _g(self, g):
        return g[0] if isinstance(g, dict) else g

    def vjp(self, node, g, run):
        g = self._g(g)
        scale, shift = self.affine(node, run)
        if node.fused is not None:  # F^T g of the folded conv: the conv's transpose of (s * g)
            conv = run.graph.nodes[node.fused]
            w, _ = conv_weights(conv, run)
            x = conv.params["x"]
            return [(x, conv_vjp(g * scale.view(1, -1, 1, 1), w, conv.params, run.shape(x)))]
        shape = [1] * g.dim()
        shape[1] = -1
        return [(node.params["x"], g * scale.view(shape))]

    grad = vjp

    def bias(self, node, g, run):
        g = self._g(g)
        if run.bias_share == "none":
            return []
        scale, shift = self.affine(node, run)
        if node.fused is not None:
            return _conv_bias(node, g, run, (scale, shift), run.graph.nodes[node.fused])
        if run.skip_zero_bias(shift):
            return []
        x = node.params["x"]
        xv = run.value(x)
        layout = run.graph.nodes[x].layout
        shape = [1] * g.dim()
        shape[1] = -1
        bias_dot = pixel_sum(g * shift.view(shape), layout)
        src = xv * scale.view(shape) if run.bias_share == "contribution" else xv
        return _pixel_bias(node, run, x, bias_dot, pixel_norm(src, layout))


def _pixel_bias(node, run, x: int, bias_dot: Tensor, contribution: Optional[Tensor]) -> list:
    """A bias that stays at its pixel: pixel j keeps ``bias_dot_j`` when it contributes."""
    if run.bias_share == "contribution" and contribution is not None:
        n = contribution
    else:
        n = pixel_norm(run.value(x), run.graph.nodes[x].layout)
    kept = torch.where(n > 0, bias_dot, torch.zeros_like(bias_dot))
    if run.lost is not None:
        run.note_lost((bias_dot - kept).sum((1, 2)))
    return [(x, kept)]


def _own_bias(node, g, run, shaped, contribution) -> list:
    """A layer's own bias parameter (``node.params["b"]``) that stays at its pixel; ``shaped``
    broadcasts it to the output, ``contribution(b, layout)`` gives each pixel's contribution
    norm (the output without the bias)."""
    p = node.params
    if p["b"] is None or run.bias_share == "none":
        return []
    b = shaped(run.value(p["b"]))
    if run.skip_zero_bias(b):
        return []
    layout = run.graph.nodes[node.index].layout
    lin = contribution(b, layout) if run.bias_share == "contribution" else None
    return _pixel_bias(node, run, p["x"], pixel_sum(g * b, layout), lin)


def _norm_args(node, graph, second: str, convert) -> None:
    """``(input, normalized_shape | num_groups, weight, bias, eps)`` of a layer/group norm."""
    a = list(node.args)
    kw = node.kwargs
    x = a[0]
    w = a[2] if len(a) > 2 else kw.get("weight")
    b = a[3] if len(a) > 3 else kw.get("bias")
    eps = a[4] if len(a) > 4 else kw.get("eps", 1e-5)
    node.params = {
        "x": x.index,
        second: convert(a[1]),
        "w": w.index if _is_ref(w) else None,
        "b": b.index if _is_ref(b) else None,
        "eps": float(eps),
    }
    node.field_inputs = [x.index] if graph.nodes[x.index].data else []


@register
class LayerNorm(Rule):
    """``y = gamma (x - mean_N x) / sigma + beta`` over the normalized dims N, with sigma a
    constant of the recorded forward pass (the centring is linear)."""

    ops = ("aten.layer_norm",)
    title = "LayerNorm (over channels, e.g. channels-last; sigma held at its forward value)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        _norm_args(node, graph, "shape", lambda v: [int(d) for d in v])

    def check_main(self, node, graph):
        x = graph.nodes[node.params["x"]]
        nd = len(node.params["shape"])
        if x.layout is None:
            raise unsupported(node, "a layer norm on a tensor without pixel layout")
        dims = set(range(len(x.shape) - nd, len(x.shape)))
        if dims & set(x.layout[:1]):
            raise unsupported(node, "a layer norm over the batch dim")

    def needs(self, node, graph):
        return [node.params["x"], node.index]

    def forward(self, node, args, kwargs, ctx):
        if ctx.records is None:
            return node.target(*args, **kwargs)
        p = node.params
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        out, mean, rstd = torch.ops.aten.native_layer_norm(args[0], p["shape"], w, b, p["eps"])
        ctx.records[node.index] = (mean, rstd)
        return out

    def _dims(self, node, g):
        nd = len(node.params["shape"])
        return tuple(range(g.dim() - nd, g.dim()))

    def vjp(self, node, g, run):
        p = node.params
        _, rstd = run.records[node.index]
        u = g * rstd
        if p["w"] is not None:
            u = u * run.value(p["w"])
        return [(p["x"], u - u.mean(self._dims(node, g), keepdim=True))]

    def grad(self, node, g, run):
        p = node.params
        mean, rstd = run.records[node.index]
        w = run.value(p["w"]) if p["w"] is not None else None
        b = run.value(p["b"]) if p["b"] is not None else None
        gx, _, _ = torch.ops.aten.native_layer_norm_backward(
            g, run.value(p["x"]), p["shape"], mean, rstd, w, b, [True, False, False]
        )
        return [(p["x"], gx)]

    def bias(self, node, g, run):
        return _own_bias(node, g, run, lambda b: b, lambda b, layout: pixel_norm(run.value(node.index) - b, layout))


@register
class GroupNorm(Rule):
    """GroupNorm ``y = gamma (x - mean_g x) / sigma_g + beta``: mean and sigma over each group's
    channels and all pixels; sigma is held at its forward value, the centring is linear."""

    ops = ("aten.group_norm",)
    title = "GroupNorm (sigma held at its forward value)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        _norm_args(node, graph, "groups", int)

    def check_main(self, node, graph):
        if graph.nodes[node.params["x"]].layout != (0, 2, 3):
            raise unsupported(node, "a group norm on a tensor that is not (B, C, H, W)")

    def needs(self, node, graph):
        return [node.params["x"], node.index]

    def _wb(self, node, args, kwargs):
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        return w, b

    def forward(self, node, args, kwargs, ctx):
        if ctx.records is None:
            return node.target(*args, **kwargs)
        x = args[0]
        w, b = self._wb(node, args, kwargs)
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // max(1, n * c)
        out, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, node.params["groups"], node.params["eps"])
        ctx.records[node.index] = (mean, rstd)
        return out

    def vjp(self, node, g, run):
        p = node.params
        _, rstd = run.records[node.index]
        bsz, _c = g.shape[0], g.shape[1]
        G = p["groups"]
        u = g
        if p["w"] is not None:
            u = u * run.value(p["w"]).view(1, -1, 1, 1)
        ug = u.reshape(bsz, G, -1) * rstd.view(bsz, G, 1)
        ug = ug - ug.mean(2, keepdim=True)
        return [(p["x"], ug.reshape(g.shape))]

    def grad(self, node, g, run):
        p = node.params
        mean, rstd = run.records[node.index]
        x = run.value(p["x"])
        w = run.value(p["w"]) if p["w"] is not None else None
        n, c = x.shape[0], x.shape[1]
        gx, _, _ = torch.ops.aten.native_group_norm_backward(
            g, x, mean, rstd, w, n, c, x.numel() // max(1, n * c), p["groups"], [True, False, False]
        )
        return [(p["x"], gx)]

    def bias(self, node, g, run):
        return _own_bias(
            node, g, run, lambda b: b.view(1, -1, 1, 1), lambda b, layout: pixel_norm(run.value(node.index) - b, layout)
        )


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
@register
class Linear(Rule):
    """``y = x W^T + b`` over the last dim. On the relevance path the last dim must be the
    channels of a channels-last tensor (a 1x1 conv: the bias share stays at its pixel); in the
    head, any linear layer."""

    ops = ("aten.linear",)
    title = "Linear (the head; over channels of a channels-last tensor or of tokens)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        a = list(node.args)
        x, w = a[0], a[1]
        b = a[2] if len(a) > 2 else node.kwargs.get("bias")
        node.params = {
            "x": x.index,
            "w": w.index if _is_ref(w) else None,
            "b": b.index if _is_ref(b) else None,
            "weight_data": _is_ref(w) and graph.nodes[w.index].data,
        }
        node.field_inputs = [x.index] if graph.nodes[x.index].data else []

    def check_main(self, node, graph):
        x = graph.nodes[node.params["x"]]
        if node.params["weight_data"]:
            raise unsupported(node, "a linear layer whose weight depends on the input")
        if x.layout is None or (len(x.shape) - 1) in x.layout:
            raise unsupported(
                node,
                "a linear layer on the relevance path whose input is not a channels-last image tensor (B, H, W, C) "
                "or a token sequence (B, N, C)",
            )

    def needs(self, node, graph):
        return [node.params["x"]]

    def forward(self, node, args, kwargs, ctx):
        y = node.target(*args, **kwargs)
        if ctx.wants_record(node):
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            layout = ctx.graph.nodes[node.index].layout
            ctx.records[node.index] = pixel_norm(y if b is None else y - b, layout)
        return y

    def vjp(self, node, g, run):
        return [(node.params["x"], g @ run.value(node.params["w"]))]

    grad = vjp

    def bias(self, node, g, run):
        return _own_bias(node, g, run, lambda b: b, lambda b, layout: run.records.get(node.index))


# --------------------------------------------------------------------------------------------
# Arithmetic: residual adds, added constants, layer scales, gates
# --------------------------------------------------------------------------------------------
def _operands(node):
    a = list(node.args)
    other = a[1] if len(a) > 1 else node.kwargs.get("other")
    alpha = a[2] if len(a) > 2 else node.kwargs.get("alpha", 1)
    return a[0], other, alpha


def _is_data(graph, v) -> bool:
    return _is_ref(v) and graph.nodes[v.index].data


@register
class AddSub(Rule):
    """``a + alpha b`` / ``a - alpha b``. Two input-dependent operands (a residual add): the
    field goes to both. One constant operand: a per-pixel bias, its share stays at its pixel."""

    ops = ("aten.add", "aten.sub", "aten.rsub")
    title = "add / sub (residual adds; an added constant is a per-pixel bias)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        a, b, alpha = _operands(node)
        name = node.op_name
        if name == "aten.rsub":  # other - alpha * self
            node.params = {"a": b, "b": a, "coef_a": 1.0, "coef_b": -float(alpha)}
        else:
            sign = -1.0 if name == "aten.sub" else 1.0
            node.params = {"a": a, "b": b, "coef_a": 1.0, "coef_b": sign * float(alpha)}
        a, b = node.params["a"], node.params["b"]
        da, db = _is_data(graph, a), _is_data(graph, b)
        node.params["data"] = [k for k, d in (("a", da), ("b", db)) if d]
        node.field_inputs = [node.params[k].index for k in node.params["data"]]

    def check_main(self, node, graph):
        p = node.params
        if len(p["data"]) == 1:
            x = graph.nodes[p[p["data"][0]].index]
            if tuple(x.shape) != tuple(node.shape):
                raise unsupported(node, "an added constant that broadcasts the input-dependent operand")
            if x.layout is None:
                raise unsupported(node, "an added constant on a tensor without pixel layout")

    def needs(self, node, graph):
        p = node.params
        return [p[p["data"][0]].index] if len(p["data"]) == 1 else []

    def _shape(self, run, v):
        return run.shape(v.index)

    def vjp(self, node, g, run):
        p = node.params
        out = []
        for k in p["data"]:
            c = p["coef_" + k]
            gk = g if c == 1.0 else g * c
            out.append((p[k].index, sum_to(gk, self._shape(run, p[k]))))
        return out

    grad = vjp

    def bias(self, node, g, run):
        p = node.params
        if len(p["data"]) != 1 or run.bias_share == "none":
            return []
        k = p["data"][0]
        const_key = "b" if k == "a" else "a"
        c = p[const_key]
        cval = run.value(c.index) if _is_ref(c) else c
        coef = p["coef_" + const_key]
        if not isinstance(cval, Tensor):
            cval = torch.tensor(float(cval), dtype=g.dtype, device=g.device)
        cval = cval * coef
        if run.skip_zero_bias(cval):
            return []
        x = p[k].index
        layout = run.graph.nodes[x].layout
        bias_dot = pixel_sum(g * cval, layout)
        return _pixel_bias(node, run, x, bias_dot, None)


def _producer_chain(graph, index: int, limit: int = 8):
    """Nodes reached from ``index`` upward through the first argument of each op."""
    out = [index]
    n = graph.nodes[index]
    for _ in range(limit):
        if n.kind != "call" or not n.args or not _is_data(graph, n.args[0]):
            break
        n = graph.nodes[n.args[0].index]
        out.append(n.index)
    return out


def _sigmoid_like(graph, index: int) -> bool:
    """Whether the value comes from a sigmoid-like function (sigmoid, hard sigmoid, tanh,
    softmax) through routing ops (views, expands, resizes) and scalar arithmetic."""
    from .activations import Hardsigmoid, Sigmoid, Tanh
    from .structure import Routing

    for i in _producer_chain(graph, index, 6):
        n = graph.nodes[i]
        if n.kind != "call":
            return False
        if isinstance(n.rule, (Sigmoid, Hardsigmoid, Tanh)) or n.op_name in ("aten.softmax", "aten._softmax"):
            return True
        scalar_op = (
            n.op_name in ("aten.div", "aten.mul", "aten.add", "aten.sub")
            and sum(1 for a in n.args[:2] if _is_data(graph, a)) == 1
        )
        relu6 = n.op_name in ("aten.hardtanh", "aten.relu6", "aten.clamp")  # relu6(x + 3) / 6
        if not (isinstance(n.rule, Routing) or scalar_op or relu6):
            return False
    return False


def _elementwise_of(graph, index: int, other: int) -> bool:
    """Whether node ``index`` is an elementwise function of node ``other`` (``x * f(x)``)."""
    chain = _producer_chain(graph, index, 6)
    if other not in chain[1:]:
        return False
    for i in chain[1:]:
        if i == other:
            return True
        n = graph.nodes[i]
        if n.shape != graph.nodes[other].shape:
            return False
    return False


@register
class MulDiv(Rule):
    """``a * b`` / ``a / b``. With one constant operand (a layer scale, a scalar): linear. With a
    gate (an operand that is spatially constant next to the other, or comes from a sigmoid-like
    function; squeeze-excitation, attention): the gate is a constant of the recorded forward
    pass, the field goes to the gated tensor only. ``x * f(x)`` (a Swish written out) is an
    activation. Any other product of two input-dependent maps of the same size (StarNet's
    ``act(f1 x) * f2 x``, MambaOut's and gated MLPs' gates) is split evenly: each factor is
    credited with half of the product, ``a * b / 2``, so the field goes ``g * b / 2`` to ``a``
    and ``g * a / 2`` to ``b`` (docs/math.md). A quotient of two such maps is refused."""

    ops = ("aten.mul", "aten.div")
    title = (
        "mul / div by a constant (layer scale) or by a gate (squeeze-excitation: the gate is held fixed); "
        "a product of two input-dependent maps split evenly between its factors"
    )
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        a, b, _ = _operands(node)
        is_div = node.op_name == "aten.div"
        da, db = _is_data(graph, a), _is_data(graph, b)
        p = {"a": a, "b": b, "div": is_div}
        if da and db:
            ia, ib = a.index, b.index
            if not is_div and _elementwise_of(graph, ib, ia):
                p.update(mode="activation", x=ia, s=ib)
            elif not is_div and _elementwise_of(graph, ia, ib):
                p.update(mode="activation", x=ib, s=ia)
            else:
                sa, sb = graph.nodes[ia].shape, graph.nodes[ib].shape
                na, nb = math.prod(sa), math.prod(sb)
                ga, gb = _sigmoid_like(graph, ia), _sigmoid_like(graph, ib)
                if is_div:
                    gate = "b" if (nb < na or gb) else None
                elif gb and not ga:
                    gate = "b"
                elif ga and not gb:
                    gate = "a"
                elif nb < na:
                    gate = "b"
                elif na < nb:
                    gate = "a"
                else:
                    gate = None
                if gate is None:
                    p.update(mode="product")
                else:
                    x = b if gate == "a" else a
                    s = a if gate == "a" else b
                    p.update(mode="gate", x=x.index, s=s.index)
        elif da or db:
            x = a if da else b
            p.update(mode="scale", x=x.index, c=b if da else a, c_is_divisor=is_div and da)
            if is_div and db:
                p.update(mode="product")  # constant / tensor is not linear
        else:
            p.update(mode="const")
        node.params = p
        if p["mode"] in ("scale", "gate", "activation"):
            node.field_inputs = [p["x"]]
        else:
            node.field_inputs = [i.index for i in (a, b) if _is_data(graph, i)]
        if p["mode"] == "activation":
            node.z_input = p["x"]

    def check_main(self, node, graph):
        if node.params["mode"] == "product" and node.params["div"]:
            raise unsupported(
                node,
                "a quotient of two input-dependent tensors where the divisor is not a gate "
                "(spatially constant, or from a sigmoid-like function)",
            )
        if node.params["mode"] == "activation" and node.layout is None:
            raise unsupported(node, "an activation on a tensor without pixel layout")

    def needs(self, node, graph):
        p = node.params
        if p["mode"] == "product":
            return [p["a"].index, p["b"].index]
        return [p["s"]] if p["mode"] == "gate" else []

    def _factor(self, node, run):
        p = node.params
        if p["mode"] == "gate":
            s = run.value(p["s"])
            return (1.0 / s) if p["div"] else s
        c = p["c"]
        cv = run.value(c.index) if _is_ref(c) else c
        return (1.0 / cv) if p.get("c_is_divisor") else cv

    def vjp(self, node, g, run):
        p = node.params
        if p["mode"] == "activation":
            raise AssertionError("an activation site has no vjp")
        if p["mode"] == "product":  # the even split: each factor is credited with a * b / 2
            a, b = p["a"].index, p["b"].index
            half = 0.5 * g
            return [(a, sum_to(half * run.value(b), run.shape(a))), (b, sum_to(half * run.value(a), run.shape(b)))]
        x = p["x"]
        return [(x, sum_to(g * self._factor(node, run), run.shape(x)))]

    def grad(self, node, g, run):
        p = node.params
        if p["mode"] in ("scale",):
            return self.vjp(node, g, run)
        a, b = p["a"], p["b"]
        va, vb = run.value(a.index), run.value(b.index)
        if p["div"]:
            ga = g / vb
            gb = -g * va / (vb * vb)
        else:
            ga, gb = g * vb, g * va
        return [(a.index, sum_to(ga, run.shape(a.index))), (b.index, sum_to(gb, run.shape(b.index)))]


@register
class Addcmul(Rule):
    """``self + value * t1 * t2`` where the product has one input-dependent factor (e.g. the
    global response norm of ConvNeXt V2: a bias plus a scaled, gated tensor). A constant
    ``self`` is a per-pixel bias."""

    ops = ("aten.addcmul",)
    title = "addcmul with one input-dependent factor"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        a = list(node.args)
        s, t1, t2 = a[0], a[1], a[2]
        value = float(node.kwargs.get("value", a[3] if len(a) > 3 else 1.0))
        d1, d2 = _is_data(graph, t1), _is_data(graph, t2)
        p = {"self": s, "value": value, "self_data": _is_data(graph, s)}
        if d1 and d2:
            p["mode"] = "product"
        elif d1 or d2:
            p.update(mode="linear", x=(t1 if d1 else t2).index, c=(t2 if d1 else t1))
        else:
            p["mode"] = "const"
        node.params = p
        node.field_inputs = ([s.index] if p["self_data"] else []) + ([p["x"]] if p["mode"] == "linear" else [])
        if p["mode"] == "product":
            node.field_inputs = [i for i in node.inputs if graph.nodes[i].data]

    def check_main(self, node, graph):
        p = node.params
        if p["mode"] == "product":
            raise unsupported(node, "addcmul of two input-dependent tensors")
        if not p["self_data"] and p["mode"] == "linear":
            x = graph.nodes[p["x"]]
            if tuple(x.shape) != tuple(node.shape) or x.layout is None:
                raise unsupported(node, "addcmul whose input-dependent factor is broadcast")

    def needs(self, node, graph):
        p = node.params
        return [p["x"]] if p["mode"] == "linear" else []

    def _factor(self, node, run):
        c = node.params["c"]
        return node.params["value"] * (run.value(c.index) if _is_ref(c) else c)

    def vjp(self, node, g, run):
        p = node.params
        out = []
        if p["self_data"]:
            out.append((p["self"].index, sum_to(g, run.shape(p["self"].index))))
        if p["mode"] == "linear":
            out.append((p["x"], sum_to(g * self._factor(node, run), run.shape(p["x"]))))
        return out

    grad = vjp

    def bias(self, node, g, run):
        p = node.params
        if p["self_data"] or p["mode"] != "linear" or run.bias_share == "none":
            return []
        s = p["self"]
        sval = run.value(s.index) if _is_ref(s) else torch.tensor(float(s), dtype=g.dtype, device=g.device)
        if run.skip_zero_bias(sval):
            return []
        x = p["x"]
        layout = run.graph.nodes[x].layout
        lin = None
        if run.bias_share == "contribution":
            lin = pixel_norm(run.value(x) * self._factor(node, run), layout)
        return _pixel_bias(node, run, x, pixel_sum(g * sval, layout), lin)
