"""What each captured op does to relevance (the rules), apart from how the model is walked.

One rule object per op kind, in one registry (:data:`REGISTRY`, keyed by ATen op name). The
capture gives every node its rule (:func:`rule_for`); the forward, the SRD walk
(:mod:`srd_ext.explain`) and APOP (:mod:`srd_ext.apop`) loop over the nodes and call their rules.
The list of supported ops in errors and in the README is generated from the registry
(:func:`supported_table`). Adding an op is one rule class here and one reference case in the
tests.

:func:`analyse` runs once per capture: it decides which nodes depend on the input, parses each
rule, folds every BatchNorm into the conv before it, follows pixel layouts, and finds the nodes
every path passes through.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch

from . import activations, affine, attention, structure  # noqa: F401  (register the rules)
from .activations import Activation
from .affine import BatchNorm, Conv2d
from .base import (
    BIAS_SHARES,
    REGISTRY,
    Rule,
    from_nchw,
    pixel_sum,
    relevance_to_field,
    supported_summary,
    supported_table,
    to_nchw,
    unsupported,
)

__all__ = [
    "REGISTRY",
    "Rule",
    "BIAS_SHARES",
    "rule_for",
    "analyse",
    "supported_table",
    "supported_summary",
    "relevance_to_field",
    "to_nchw",
    "from_nchw",
    "pixel_sum",
    "unsupported",
    "Activation",
]


class _Opaque(Rule):
    """An op with no SRD rule: it runs forward, and in the head its gradient comes from
    autograd; on the relevance path it is refused with the node named."""


class _Meta(Rule):
    """Python arithmetic on sizes (``sym_size``, ``operator.mul``, ...): never data."""

    def forward(self, node, args, kwargs, ctx):
        return node.target(*args, **kwargs)


_OPAQUE = _Opaque()
_META = _Meta()


def rule_for(node) -> Rule:
    name = node.op_name
    if name in REGISTRY:
        return REGISTRY[name]
    if not isinstance(node.target, torch._ops.OpOverload) or name in (
        "aten.sym_size",
        "aten.sym_numel",
        "aten.sym_stride",
    ):
        if (
            node.target.__module__ in ("_operator", "operator")
            or name.startswith("sym_")
            or getattr(node.target, "__module__", "").startswith("torch")
        ):
            return _META
    return _OPAQUE


def _is_tensorish(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) or t is None for t in v):
        return any(isinstance(t, torch.Tensor) for t in v)
    return False


def analyse(graph) -> None:
    nodes = graph.nodes
    for n in nodes:
        if n.kind == "input":
            n.data = True
            n.layout = (0, 2, 3) if n.shape is not None and len(n.shape) == 4 else None
        elif n.kind == "call":
            mv = n.example
            n.data = any(nodes[i].data for i in n.inputs) and _is_tensorish(mv)
            n.is_tuple = isinstance(mv, (tuple, list))
            if n.data:
                n.rule.parse(n, graph)
        elif n.kind == "output":
            n.data = True
            n.field_inputs = list(n.inputs)
    _fold_batchnorms(graph)
    for n in nodes:
        if n.kind == "call" and n.data:
            n.layout = n.rule.layout(n, graph)
            n.grid = n.rule.grid(n, graph) if n.layout is not None and len(n.layout) == 2 else None
            n.pooled = n.rule.global_pool(n) or any(nodes[i].pooled for i in n.field_inputs)
            n.site = n.z_input is not None
        elif n.kind == "output":
            n.layout = None
    # An op that reads (B, C, H, W) certifies its input's layout, e.g. after a space-to-depth
    # reshape whose pixels cannot be followed from the image's.
    for n in nodes:
        if n.kind == "call" and n.data and n.rule.reads_nchw and n.field_inputs:
            src = nodes[n.field_inputs[0]]
            if src.layout is None and src.shape is not None and len(src.shape) == 4 and not src.pooled:
                src.layout = (0, 2, 3)
    graph.cuts = _cuts(graph)


def _fold_batchnorms(graph) -> None:
    """A BatchNorm whose input is a conv read by nothing else is folded into that conv: the pair
    is one affine map, whose bias (the BN shift plus the scaled conv bias) is shared by the
    folded conv's taps."""
    for n in graph.nodes:
        if not (n.kind == "call" and n.data and isinstance(n.rule, BatchNorm)):
            continue
        src = graph.nodes[n.params["x"]]
        if (
            src.kind == "call"
            and isinstance(src.rule, Conv2d)
            and src.data
            and graph.users[src.index] == [n.index]
            and src.params.get("dims") == 2
            and not src.params.get("transposed")
        ):
            n.fused = src.index
            n.field_inputs = list(src.field_inputs)


def _cuts(graph) -> Set[int]:
    """Nodes every path from the input to the output passes through (the output's dominators in
    the graph of input-dependent values)."""
    nodes = graph.nodes
    idom: Dict[int, Optional[int]] = {graph.input_index: None}
    depth = {graph.input_index: 0}

    def lca(a, b):
        while a != b:
            if depth[a] < depth[b]:
                a, b = b, a
            a = idom[a]
        return a

    for n in nodes:
        if not n.data or n.index == graph.input_index:
            continue
        preds = [i for i in n.inputs if nodes[i].data and i in idom]
        if not preds:
            continue
        d = preds[0]
        for p in preds[1:]:
            d = lca(d, p)
        idom[n.index] = d
        depth[n.index] = depth[d] + 1
    out, i = set(), graph.output_index
    while i is not None and i in idom:
        out.add(i)
        i = idom[i]
    return out
