"""Layers: which nodes of a captured graph users can name, and what each name means.

"input", "low" (the encoder output), "high" (the last layer every path passes through at 1/8 of
the input resolution; a plain ViT's patch embedding), a module path ("layer2", "features.22": its
output), ``path@k`` for the k-th call of a reused module (also ``path_k``), or an ATen node name
(``relu_3``). A layer has pixels (:func:`has_pixels`): a tensor whose batch, height and width dims
are known, or a token sequence whose patch tokens lie on a known grid; the maps of a token layer
are given on that grid (:func:`to_map`).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from .capture import Graph
from .nodes import Node, UnsupportedModelError
from .rules.structure import Cat, GetItem
from .walk import Plan, reach

__all__ = [
    "has_pixels",
    "hw",
    "to_map",
    "from_map",
    "is_token_node",
    "default_encoder",
    "encoder_node",
    "layer_names",
    "layer_indices",
    "resolve",
    "high",
    "passes_through",
    "next_below",
    "one_hot",
]


def has_pixels(node: Node) -> bool:
    """Whether ``node`` is an input-dependent image-like value: one tensor with batch, height and
    width dims, or a token sequence whose patch tokens lie on a known grid, before any global
    pooling."""
    return (
        node.data
        and node.layout is not None
        and (len(node.layout) == 3 or node.grid is not None)
        and not node.pooled
        and not node.is_tuple
    )


def is_token_node(node: Node) -> bool:
    return node.layout is not None and len(node.layout) == 2


def hw(node: Node) -> tuple:
    """(H, W) of a node with pixels; the patch grid (h, w) of a token sequence."""
    if is_token_node(node):
        return node.grid[1:]
    _, h, w = node.layout
    return (node.shape[h], node.shape[w])


def to_map(node: Node, r: Tensor) -> Tensor:
    """A relevance (B, N, 1) of a token sequence as a map (B, h, w) of its patch tokens (the
    class and other constant tokens left out); other relevance maps as they are."""
    if not is_token_node(node):
        return r
    off, h, w = node.grid
    return r[:, off : off + h * w, 0].reshape(r.shape[0], h, w)


def from_map(node: Node, m: Tensor, n_tokens: int) -> Tensor:
    """Inverse of :func:`to_map`: a map (B, h, w) as a relevance (B, N, 1), zero at the tokens
    that are not patches."""
    if not is_token_node(node):
        return m
    off, h, w = node.grid
    r = m.new_zeros((m.shape[0], n_tokens, 1))
    r[:, off : off + h * w, 0] = m.reshape(m.shape[0], h * w)
    return r


def _spatial_call(node: Node) -> bool:
    return node.kind == "call" and has_pixels(node)


def _post_activation(graph: Graph, i: int, memo: Dict[int, bool]) -> bool:
    """A site, or a concatenation / routing of post-activation values only."""
    if i in memo:
        return memo[i]
    n = graph.nodes[i]
    memo[i] = False
    if n.site:
        memo[i] = True
    elif n.kind == "call" and (isinstance(n.rule, (Cat, GetItem)) or n.rule.identity_like) and n.field_inputs:
        memo[i] = all(_post_activation(graph, j, memo) for j in n.field_inputs)
    return memo[i]


def default_encoder(graph: Graph) -> int:
    """The encoder output: the last activation (or concatenation of activations) with pixels that
    every path to the logits passes through, when no decomposition site lies after it; otherwise
    (e.g. ConvNeXt, whose residual stream has no activation) the last node with pixels every path
    passes through, decomposed as an identity activation."""
    if graph.default_encoder is not None:
        return graph.default_encoder
    nodes = graph.nodes
    reached = reach(graph, [graph.output_index])
    spatial = [i for i in sorted(graph.cuts) if i in reached and _spatial_call(nodes[i])]
    memo: Dict[int, bool] = {}
    post = [i for i in spatial if _post_activation(graph, i, memo)]
    choice = None
    if post:
        p = post[-1]
        later_sites = [
            j for j in reached if j > p and nodes[j].site and nodes[j].layout is not None and not nodes[j].pooled
        ]
        if not later_sites:
            choice = p
    if choice is None and spatial:
        choice = spatial[-1]
        # A token sequence: the layer's output itself, not a slice or view of it (the patch
        # tokens before a mean pool, a feature map flattened into tokens).
        while is_token_node(nodes[choice]) and nodes[choice].rule.view_like:
            src = nodes[choice].field_inputs
            if len(src) != 1 or src[0] not in spatial:
                break
            choice = src[0]
    if choice is None:
        raise ValueError(
            "no node with pixels (batch, channels, height, width) separates the encoder "
            "from the head; pass encoder=<module path>"
        )
    mixing = _token_mixing_after(graph, choice, reached)
    if mixing is not None:
        m = nodes[mixing]
        raise UnsupportedModelError(
            f"srd_ext cannot explain this model through its blocks: it mixes tokens ({m.where()}) after "
            f"the last layer with pixels it can decompose ('{graph.display_name(choice)}'), so a map would "
            "decompose only the layers before that one and credit the rest to the gradient. Pass "
            f"encoder='{graph.display_name(choice)}' to explain up to that layer knowingly."
        )
    graph.default_encoder = choice
    return choice


# Ops that mix the tokens (or pixels) of one image with weights computed from the input itself:
# attention. After the encoder they mean the head holds the model's real work.
_ATTENTION_OPS = (
    "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten.softmax",
    "aten._softmax",
)
_PRODUCT_OPS = ("aten.matmul", "aten.bmm", "aten.baddbmm", "aten.einsum")


def _token_mixing_after(graph: Graph, encoder: int, reached) -> "int | None":
    """The first attention-like node after ``encoder`` on the way to the logits (a softmax or
    attention before any global pooling, or a product of two input-dependent tensors), if any."""
    for j in sorted(reached):
        n = graph.nodes[j]
        if j <= encoder or n.kind != "call" or not n.data or n.pooled:
            continue
        if n.op_name in _ATTENTION_OPS:
            return j
        if n.op_name in _PRODUCT_OPS and sum(graph.nodes[i].data for i in n.inputs) >= 2:
            return j
    return None


def encoder_node(g: Graph, name: str) -> int:
    """The node a user's ``encoder=name`` names; it must have pixels."""
    try:
        i = g.resolve(name)
    except KeyError:
        names = [g.display_name(i) for i in sorted(g.cuts) if _spatial_call(g.nodes[i])]
        raise ValueError(f"unknown encoder layer {name!r}; layers every path passes through: {names}") from None
    n = g.nodes[i]
    if not has_pixels(n):
        raise ValueError(
            f"encoder {name!r} ('{n.name}') has no pixels (batch, channels, height, "
            "width): choose a layer before the global pooling"
        )
    return i


def layer_indices(g: Graph, plan: Plan) -> List[int]:
    """Every site and every node all paths pass through, up to the encoder output (not the
    input)."""
    return [i for i in sorted(plan.main) if _spatial_call(g.nodes[i]) and (g.nodes[i].site or i in g.cuts)]


def layer_names(g: Graph, plan: Plan) -> List[str]:
    """The names ``layer`` accepts: "input", "low", "high", then :func:`layer_indices`."""
    return ["input", "low", "high"] + [g.display_name(i) for i in layer_indices(g, plan)]


def resolve(g: Graph, plan: Plan, layer) -> int:
    """The node a layer name stands for; it must lie on the relevance path, at or before the
    encoder output, and have pixels."""
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a str, got {type(layer).__name__}")
    if layer == "input":
        return g.input_index
    if layer == "low":
        return plan.encoder
    if layer == "high":
        return high(g, plan)
    try:
        i = g.resolve(layer)
    except KeyError:
        raise ValueError(f"unknown layer {layer!r}; choose one of {layer_names(g, plan)}") from None
    n = g.nodes[i]
    if i > plan.encoder:
        raise ValueError(
            f"layer {layer!r} lies in the head (after the encoder output "
            f"'{g.display_name(plan.encoder)}'); SRD does not decompose the head"
        )
    if i not in plan.main:
        why = (
            "its conv is folded with the BatchNorm after it; name that layer or the activation"
            if any(m.fused == i for m in g.nodes if m.kind == "call")
            else "no relevance passes through it (a gate branch or a constant)"
        )
        raise ValueError(f"layer {layer!r} ('{n.name}', {n.op_name}): {why}. Layers: {layer_names(g, plan)}")
    if not has_pixels(n):
        raise ValueError(f"layer {layer!r} ('{n.name}') has no pixel layout (batch, height, width)")
    return i


def high(g: Graph, plan: Plan) -> int:
    """The last layer every path passes through at 1/8 of the input resolution (a site or a
    routing of sites where one exists); for a transformer without one (a plain ViT), the patch
    embedding's feature map."""
    h, w = g.nodes[g.input_index].shape[2:]
    want = (-(-h // 8), -(-w // 8))
    if want in plan.high:
        return plan.high[want]
    memo: Dict[int, bool] = {}
    cands = [
        i
        for i in sorted(g.cuts)
        if i in plan.main
        and i <= plan.encoder
        and _spatial_call(g.nodes[i])
        and not is_token_node(g.nodes[i])
        and hw(g.nodes[i]) == want
    ]
    if not cands and is_token_node(g.nodes[plan.encoder]):
        # A transformer keeps one resolution: "high" is its patch embedding, the last feature
        # map every path passes through before the tokens (the patch tokens before any block).
        cands = [
            i
            for i in sorted(g.cuts)
            if i in plan.main and i < plan.encoder and _spatial_call(g.nodes[i]) and len(g.nodes[i].layout) == 3
        ]
    if not cands:
        raise ValueError(
            f"no layer every path passes through has 1/8 of the input resolution {want} "
            "for layer='high'; name a layer instead"
        )
    post = [i for i in cands if _post_activation(g, i, memo)]
    best = post[-1] if post else cands[-1]
    plan.high[want] = best
    return best


def passes_through(g: Graph, upper: int, lower: int) -> bool:
    """Whether every path of the relevance field from node ``upper`` down to the input passes
    through node ``lower`` (then all of ``upper``'s relevance that is not lost reaches
    ``lower``)."""
    if lower == g.input_index:
        return True
    seen, stack = set(), [upper]
    while stack:
        i = stack.pop()
        if i in seen or i == lower:
            continue
        seen.add(i)
        n = g.nodes[i]
        if n.kind == "input" or i < lower:
            return False
        stack.extend(j for j in n.field_inputs if g.nodes[j].data)
    return True


def next_below(g: Graph, plan: Plan, upper: int) -> int:
    """The next decomposition site below node ``upper`` that all its relevance passes through
    (else the next such layer of :func:`layer_indices`, else the input)."""
    below = [i for i in reversed(layer_indices(g, plan)) if i < upper and passes_through(g, upper, i)]
    sites = [i for i in below if g.nodes[i].site]
    if sites:
        return sites[0]
    return below[0] if below else g.input_index


def one_hot(run, i: int, positions: Tensor, relevance: Tensor) -> Tensor:
    """Seeds for :func:`srd_ext.walk.walk_seeds` at node ``i``: seed n is ``relevance[n]`` at
    ``positions[n]`` (y, x) of the layer's map (its patch grid for a token sequence), in the form
    the walk carries relevance there."""
    node = run.graph.nodes[i]
    n = positions.shape[0]
    m = relevance.new_zeros((n,) + tuple(hw(node)))
    if n:
        m[torch.arange(n, device=m.device), positions[:, 0], positions[:, 1]] = relevance
    return from_map(node, m, run.shape(i)[node.layout[1]]) if is_token_node(node) else m
