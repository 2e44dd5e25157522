"""The rule interface, the registry, and the pixel helpers every rule shares.

A rule says what one kind of captured op does, in four parts:

- ``forward``: how the op runs (by default, the op itself); a rule may leave in ``ctx.records``
  what the SRD walk needs later (max-pool indices, a layer norm's 1/sigma, per-pixel norms);
- ``vjp``: the vector-Jacobian product of the op's linear part, which carries the relevance
  field ``g`` back to the inputs on the field's path (section "The walk" of docs/math.md);
- ``bias``: the relevance the op's bias hands to its input pixels (``<b, g_j>`` shared among
  the pixels that output pixel j reads), or nothing;
- ``grad``: the op's true gradient, used in the head (after the encoder output) for the
  Grad-CAM weights of the initial relevance.

``parse`` reads the op's arguments at capture time and decides which inputs the relevance
field reaches (a gate's side branch receives none); ``check_main`` refuses, with the node named,
what SRD cannot decompose on the field's path. Rules are registered by ATen op name; the list of
supported ops in errors and in the README comes from the registry.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..nodes import UnsupportedModelError

__all__ = [
    "Rule",
    "is_tokens",
    "register",
    "REGISTRY",
    "to_nchw",
    "from_nchw",
    "pixel_sum",
    "sum_to",
    "relevance_to_field",
    "BIAS_SHARES",
    "unsupported",
]

BIAS_SHARES = ("contribution", "input", "none")

REGISTRY: Dict[str, "Rule"] = {}


def register(rule_cls):
    """Class decorator: one instance of the rule serves every op name in ``rule_cls.ops``."""
    rule = rule_cls()
    for op in rule_cls.ops:
        if op in REGISTRY:
            raise RuntimeError(f"two rules for {op}")
        REGISTRY[op] = rule
    return rule_cls


def unsupported(node, what: str):
    return UnsupportedModelError(
        f"srd_ext cannot decompose {node.where()}: {what}. Supported on the relevance path: {supported_summary()}. "
        "To explain the rest of the model, pass an encoder after this node (encoder=<layer>); maps then "
        "start there."
    )


class Rule:
    """Base rule: an op SRD has no decomposition for. It runs forward and, in the head, takes
    its gradient by autograd; on the relevance path it is refused with the node named."""

    ops: Tuple[str, ...] = ()
    title: str = ""  # how the supported-op list names it
    group: str = "other"  # section of the supported-op list
    is_activation = False  # an elementwise activation (a decomposition site on the path)
    decomposable = False  # has a field VJP (may lie on the relevance path)
    identity_like = False  # passes its input through unchanged (dropout, clone, ...)
    view_like = False  # moves or regroups values without computing (view, permute, cat, ...)
    reads_nchw = False  # its first input is a (B, C, H, W) image tensor (conv, pooling)

    # -- capture ----------------------------------------------------------------------------
    def parse(self, node, graph) -> None:
        """Parse arguments into ``node.params`` and set ``node.field_inputs`` (default: every
        data input)."""
        node.field_inputs = [i for i in node.inputs if graph.nodes[i].data]

    def check_main(self, node, graph) -> None:
        if not self.decomposable:
            raise unsupported(node, f"no SRD rule for {node.op_name}")

    def layout(self, node, graph) -> Optional[Tuple[int, int, int]]:
        """Pixel layout of the output: by default that of the first field input, when the
        output keeps that input's batch, height and width dims."""
        return same_layout(node, graph)

    def grid(self, node, graph) -> Optional[Tuple[int, int, int]]:
        """Where the patch grid lies along the tokens of an output with a token layout:
        ``(first patch token, h, w)``, patches in row-major order. By default that of the first
        field input with the same number of tokens."""
        return same_grid(node, graph)

    def global_pool(self, node) -> bool:
        return False

    def needs(self, node, graph) -> List[int]:
        """Nodes whose forward values ``vjp``/``bias`` read."""
        return []

    # -- run --------------------------------------------------------------------------------
    def forward(self, node, args, kwargs, ctx):
        return node.target(*args, **kwargs)

    def vjp(self, node, g, run) -> List[Tuple[int, Any]]:
        raise NotImplementedError(node.op_name)

    def bias(self, node, g, run) -> List[Tuple[int, Tensor]]:
        return []

    def grad(self, node, g, run) -> List[Tuple[int, Any]]:
        """True gradient to every data input (by autograd, re-running the op on its inputs)."""
        ins = [i for i in node.inputs if run.graph.nodes[i].data]
        vals = {i: run.value(i) for i in ins}
        with torch.enable_grad():
            leaves = {}
            for i, v in vals.items():
                if isinstance(v, Tensor) and v.dtype.is_floating_point:
                    leaves[i] = v if (run.create_graph and v.requires_grad) else v.detach().requires_grad_(True)
            if not leaves:
                return []
            values = dict(vals)
            values.update(leaves)
            args = run.load(node.args, values)
            kwargs = run.load(node.kwargs, values) if node.kwargs else {}
            out = node.target(*args, **kwargs)
            idx = list(leaves)
            grads = torch.autograd.grad(
                out, [leaves[i] for i in idx], g, allow_unused=True, create_graph=run.create_graph
            )
        return [(i, gr) for i, gr in zip(idx, grads) if gr is not None]

    # -- docs -------------------------------------------------------------------------------
    def describe(self) -> str:
        return self.title or ", ".join(self.ops)


# --------------------------------------------------------------------------------------------
# Layouts and pixel helpers
# --------------------------------------------------------------------------------------------
def same_layout(node, graph):
    """The layout of the first input (field inputs first) whose batch, height and width dims the
    output keeps."""
    if node.shape is None:
        return None
    order = list(node.field_inputs) + [i for i in node.inputs if i not in node.field_inputs]
    for i in order:
        src = graph.nodes[i]
        if not src.data or src.layout is None or src.shape is None:
            continue
        if len(node.shape) == len(src.shape) and all(node.shape[d] == src.shape[d] for d in src.layout):
            return src.layout
    return None


def same_grid(node, graph):
    """The patch grid of the first field input with a token layout and as many tokens."""
    n_tok = node.shape[node.layout[1]] if node.shape is not None else None  # None: a tuple
    for i in node.field_inputs:
        src = graph.nodes[i]
        if src.shape is None:  # an item of a tuple (getitem): the tuple's source decides
            return src.grid
        if is_tokens(src.layout) and src.grid is not None and n_tok in (None, src.shape[src.layout[1]]):
            return src.grid
    return None


def nchw_layout(node, graph):
    return (0, 2, 3) if node.shape is not None and len(node.shape) == 4 else None


def _channel_dims(ndim: int, layout) -> List[int]:
    return [d for d in range(ndim) if d not in layout]


def is_tokens(layout) -> bool:
    """A token layout ``(batch, token)``: a sequence (B, N, C) of N PFVs, as a transformer holds
    them. Internally its relevance is (B, N, 1), a (B, H, W) map with H = N and W = 1."""
    return layout is not None and len(layout) == 2


def to_nchw(t: Tensor, layout) -> Tensor:
    """A tensor with pixel ``layout`` (batch, height, width dims; or batch, token dims) as
    (B, C, H, W), a token layout as (B, C, N, 1); channel dims flattened in order. A view when
    there is at most one channel dim."""
    if t.dim() == 4 and layout == (0, 2, 3):
        return t
    cd = _channel_dims(t.dim(), layout)
    p = t.permute(layout[0], *cd, *layout[1:])
    if len(layout) == 2:
        p = p.unsqueeze(-1)
    if len(cd) == 1:
        return p
    if not cd:
        return p.unsqueeze(1)
    return p.reshape(p.shape[0], -1, p.shape[-2], p.shape[-1])


def from_nchw(t4: Tensor, layout, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_nchw` for a tensor of ``shape``."""
    if len(shape) == 4 and layout == (0, 2, 3):
        return t4
    cd = _channel_dims(len(shape), layout)
    order = [layout[0], *cd, *layout[1:]]
    t = t4.reshape([shape[d] for d in order])
    inv = [0] * len(order)
    for pos, d in enumerate(order):
        inv[d] = pos
    return t.permute(*inv)


def pixel_sum(t: Tensor, layout) -> Tensor:
    """Sum over the channel dims: (B, H, W)."""
    return to_nchw(t, layout).sum(1)


def relevance_to_field(relevance: Tensor, x: Tensor, layout) -> Tensor:
    """A field that hands ``relevance`` (B, H, W) to the pixels of ``x``: ``x_i R_i / ||x_i||^2``
    (0 where ``x_i = 0``). Passed back through the linear parts before ``x`` it splits each
    pixel's relevance among the pixels it is made of by their sharing ratios."""
    x4 = to_nchw(x, layout)
    n2 = torch.linalg.vector_norm(x4, dim=1).square()
    scale = torch.where(n2 > 0, relevance / torch.where(n2 > 0, n2, torch.ones_like(n2)), torch.zeros_like(n2))
    return from_nchw(x4 * scale.unsqueeze(1), layout, x.shape)


def pixel_norm(t: Tensor, layout) -> Tensor:
    return torch.linalg.vector_norm(to_nchw(t, layout), dim=1)


def sum_to(g: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    if tuple(g.shape) == tuple(shape):
        return g
    return g.sum_to_size(shape)


# --------------------------------------------------------------------------------------------
# The supported-op list
# --------------------------------------------------------------------------------------------
_GROUPS = (
    ("activations", "Activations (decomposition sites)"),
    ("affine", "Affine ops (with their bias shares)"),
    ("structure", "Routing, pooling and resizing"),
)


def _unique_rules() -> List[Rule]:
    seen, out = set(), []
    for r in REGISTRY.values():
        if id(r) not in seen and r.decomposable:
            seen.add(id(r))
            out.append(r)
    return out


def supported_table() -> str:
    """Markdown list of the ops SRD decomposes, one line per rule, from the registry."""
    lines = []
    for key, title in _GROUPS:
        rules = [r for r in _unique_rules() if r.group == key]
        lines.append(
            f"- **{title}**: "
            + "; ".join(
                f"{r.describe()} (`{'`, `'.join(sorted({o.split('.', 1)[-1] for o in r.ops}))}`)" for r in rules
            )
        )
    return "\n".join(lines)


def supported_summary() -> str:
    """One line: the rules' titles without their notes."""
    return ", ".join(r.describe().split(" (")[0] for r in _unique_rules())
