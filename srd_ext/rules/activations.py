"""Elementwise activations: the decomposition sites.

On the relevance path every activation node is a site: the incoming field ``G`` (shape of the
output ``a``) becomes one relevance per pixel ``R_i = sum_c a_i G_i (+ bias shares)``, and the
field handed to the pre-activation is ``g_i = z_i R_i / ||z_i||^2`` (``srd_ext.ops.activation_share``).
Only ``z`` and ``a`` enter the rule, so every activation works the same way; each one here adds
its forward, its derivative (for the head's gradient) and, where it is piecewise linear, its
pieces (for APOP). The output ``a`` is recomputed from ``z`` when the walk needs it, so the
forward keeps one tensor per site.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nodes import Ref
from .base import Rule, register, same_layout, unsupported

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


class Activation(Rule):
    """An elementwise activation ``a = f(z)`` of its first argument."""

    is_activation = True
    decomposable = True
    group = "activations"
    piecewise_linear = False

    def parse(self, node, graph):
        z = node.args[0]
        node.field_inputs = [z.index] if graph.nodes[z.index].data else []
        node.z_input = z.index

    def check_main(self, node, graph):
        if node.layout is None:
            raise unsupported(
                node, f"an activation on a tensor of shape {node.shape} with no pixel layout (batch, height, width)"
            )

    def layout(self, node, graph):
        return same_layout(node, graph)

    def forward(self, node, args, kwargs, ctx):
        extra = tuple(args[1:])
        return ctx.instrument.activation(node, args[0], lambda z: node.target(z, *extra, **kwargs), args)

    def derivative(self, node, z: Tensor, a: Tensor, run=None) -> Tensor:
        raise NotImplementedError

    def grad(self, node, g, run):
        z = run.value(node.z_input)
        a = run.value(node.index)
        return [(node.z_input, g * self.derivative(node, z, a, run))]

    # APOP: piecewise-linear activations have a pattern: which piece each entry is on.
    def piece(self, node, z: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_piece(self, node, z: Tensor, piece: Tensor, args=()) -> Tensor:
        raise NotImplementedError

    def output_range(self, node) -> Tuple[Optional[float], Optional[float]]:
        """The activation's range; APOP's "apop+relu" replay clips to it (ReLU: [0, inf))."""
        return None, None

    def arg(self, node, k: int, name: str, default):
        if len(node.args) > k:
            return node.args[k]
        return node.kwargs.get(name, default)


def _ones(z):
    return torch.ones_like(z)


@register
class ReLU(Activation):
    ops = ("aten.relu", "aten.relu_")
    title = "ReLU"
    piecewise_linear = True

    def derivative(self, node, z, a, run=None):
        return (z > 0).to(z.dtype)

    def piece(self, node, z):
        return z > 0

    def apply_piece(self, node, z, piece, args=()):
        return z * piece.to(z.dtype)

    def output_range(self, node):
        return 0.0, None


@register
class Hardtanh(Activation):
    ops = ("aten.hardtanh", "aten.hardtanh_", "aten.relu6")
    title = "ReLU6 / Hardtanh"
    piecewise_linear = True

    def bounds(self, node):
        if node.op_name == "aten.relu6":
            return 0.0, 6.0
        return float(self.arg(node, 1, "min_val", -1.0)), float(self.arg(node, 2, "max_val", 1.0))

    def derivative(self, node, z, a, run=None):
        lo, hi = self.bounds(node)
        return ((z > lo) & (z < hi)).to(z.dtype)

    def piece(self, node, z):
        lo, hi = self.bounds(node)
        return (z > lo).to(torch.uint8) + (z >= hi).to(torch.uint8)  # 0: low, 1: linear, 2: high

    def apply_piece(self, node, z, piece, args=()):
        lo, hi = self.bounds(node)
        return torch.where(piece == 1, z, torch.where(piece == 0, torch.full_like(z, lo), torch.full_like(z, hi)))

    def output_range(self, node):
        return self.bounds(node)


@register
class LeakyReLU(Activation):
    ops = ("aten.leaky_relu", "aten.leaky_relu_")
    title = "LeakyReLU"
    piecewise_linear = True

    def slope(self, node):
        return float(self.arg(node, 1, "negative_slope", 0.01))

    def derivative(self, node, z, a, run=None):
        return torch.where(z > 0, _ones(z), torch.full_like(z, self.slope(node)))

    def piece(self, node, z):
        return z > 0

    def apply_piece(self, node, z, piece, args=()):
        return torch.where(piece, z, z * self.slope(node))


@register
class PReLU(Activation):
    ops = ("aten.prelu", "aten._prelu_kernel")
    title = "PReLU"
    piecewise_linear = True

    def _weight(self, node, z, w):
        if w.numel() == 1:
            return w.reshape(())
        shape = [1] * z.dim()
        shape[1 if z.dim() > 1 else 0] = -1
        return w.reshape(shape)

    def forward(self, node, args, kwargs, ctx):
        w = args[1]
        return ctx.instrument.activation(node, args[0], lambda z: node.target(z, w), args)

    def derivative(self, node, z, a, run=None):
        w = self._weight(node, z, run.value(node.args[1].index))
        return torch.where(z > 0, _ones(z), w.expand_as(z).to(z.dtype))

    def piece(self, node, z):
        return z > 0

    def apply_piece(self, node, z, piece, args=()):
        return torch.where(piece, z, z * self._weight(node, z, args[1]))


@register
class Hardsigmoid(Activation):
    ops = ("aten.hardsigmoid", "aten.hardsigmoid_")
    title = "Hardsigmoid"
    piecewise_linear = True

    def derivative(self, node, z, a, run=None):
        return torch.where((z > -3) & (z < 3), torch.full_like(z, 1.0 / 6.0), torch.zeros_like(z))

    def piece(self, node, z):
        return (z > -3).to(torch.uint8) + (z >= 3).to(torch.uint8)

    def apply_piece(self, node, z, piece, args=()):
        return torch.where(piece == 1, z / 6.0 + 0.5, torch.where(piece == 0, torch.zeros_like(z), _ones(z)))

    def output_range(self, node):
        return 0.0, 1.0


@register
class Clamp(Activation):
    ops = ("aten.clamp", "aten.clamp_", "aten.clamp_min", "aten.clamp_min_", "aten.clamp_max", "aten.clamp_max_")
    title = "clamp with constant bounds"
    piecewise_linear = True

    def bounds(self, node):
        name = node.op_name
        if name.startswith("aten.clamp_min"):
            return float(node.args[1]), None
        if name.startswith("aten.clamp_max"):
            return None, float(node.args[1])
        lo = self.arg(node, 1, "min", None)
        hi = self.arg(node, 2, "max", None)
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))

    def parse(self, node, graph):
        super().parse(node, graph)
        for a in node.args[1:]:
            if isinstance(a, Ref):
                node.params["tensor_bounds"] = True

    def check_main(self, node, graph):
        if node.params.get("tensor_bounds"):
            raise unsupported(node, "clamp with tensor bounds")
        super().check_main(node, graph)

    def derivative(self, node, z, a, run=None):
        lo, hi = self.bounds(node)
        m = torch.ones_like(z, dtype=torch.bool)
        if lo is not None:
            m = m & (z >= lo)
        if hi is not None:
            m = m & (z <= hi)
        return m.to(z.dtype)

    def piece(self, node, z):
        lo, hi = self.bounds(node)
        p = torch.ones_like(z, dtype=torch.uint8)
        if lo is not None:
            p = torch.where(z < lo, torch.zeros_like(p), p)
        if hi is not None:
            p = torch.where(z > hi, torch.full_like(p, 2), p)
        return p

    def apply_piece(self, node, z, piece, args=()):
        lo, hi = self.bounds(node)
        out = z
        if lo is not None:
            out = torch.where(piece == 0, torch.full_like(z, lo), out)
        if hi is not None:
            out = torch.where(piece == 2, torch.full_like(z, hi), out)
        return out

    def output_range(self, node):
        return self.bounds(node)


@register
class ELU(Activation):
    ops = ("aten.elu", "aten.elu_")
    title = "ELU"

    def derivative(self, node, z, a, run=None):
        alpha = float(self.arg(node, 1, "alpha", 1.0))
        scale = float(self.arg(node, 2, "scale", 1.0))
        input_scale = float(self.arg(node, 3, "input_scale", 1.0))
        return torch.where(z > 0, torch.full_like(z, scale), input_scale * (a + alpha * scale))


@register
class SELU(Activation):
    ops = ("aten.selu", "aten.selu_")
    title = "SELU"

    def derivative(self, node, z, a, run=None):
        return torch.where(z > 0, torch.full_like(z, _SELU_SCALE), a + _SELU_ALPHA * _SELU_SCALE)


@register
class CELU(Activation):
    ops = ("aten.celu", "aten.celu_")
    title = "CELU"

    def derivative(self, node, z, a, run=None):
        alpha = float(self.arg(node, 1, "alpha", 1.0))
        return torch.where(z > 0, _ones(z), a / alpha + 1)


@register
class SiLU(Activation):
    ops = ("aten.silu", "aten.silu_")
    title = "SiLU / Swish"

    def derivative(self, node, z, a, run=None):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))


@register
class GELU(Activation):
    ops = ("aten.gelu", "aten.gelu_")
    title = "GELU (exact and tanh)"

    def derivative(self, node, z, a, run=None):
        approximate = self.arg(node, 1, "approximate", "none")
        if approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            u = k * (z + 0.044715 * z**3)
            t = torch.tanh(u)
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
        return 0.5 * (1 + torch.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


@register
class Hardswish(Activation):
    ops = ("aten.hardswish", "aten.hardswish_")
    title = "Hardswish"

    def derivative(self, node, z, a, run=None):
        return torch.where(z < -3, torch.zeros_like(z), torch.where(z <= 3, z / 3 + 0.5, _ones(z)))


@register
class Mish(Activation):
    ops = ("aten.mish", "aten.mish_")
    title = "Mish"

    def derivative(self, node, z, a, run=None):
        sp = F.softplus(z)
        t = torch.tanh(sp)
        return t + z * (1 - t * t) * torch.sigmoid(z)


@register
class Sigmoid(Activation):
    ops = ("aten.sigmoid", "aten.sigmoid_")
    title = "Sigmoid"

    def derivative(self, node, z, a, run=None):
        return a * (1 - a)


@register
class Tanh(Activation):
    ops = ("aten.tanh", "aten.tanh_")
    title = "Tanh"

    def derivative(self, node, z, a, run=None):
        return 1 - a * a


@register
class Softplus(Activation):
    ops = ("aten.softplus",)
    title = "Softplus"

    def derivative(self, node, z, a, run=None):
        beta = float(self.arg(node, 1, "beta", 1.0))
        threshold = float(self.arg(node, 2, "threshold", 20.0))
        return torch.where(z * beta > threshold, _ones(z), torch.sigmoid(z * beta))
