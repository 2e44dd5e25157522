"""Attention with its weights held as gates, and products with a held gate matrix.

Per head, ``out_i = sum_j A_ij v_j`` with ``A = softmax(q k^T * scale + mask)``. SRD holds ``A`` at
its recorded value, as it holds a sigmoid gate (docs/math.md, "Tokens and attention"): the op is
then linear in the values, the field goes ``g_v = A^T g`` to the values and from there through
the value projection, and nothing goes through the queries and keys, whose branch holds no
decomposition site. The value bias of the projection before is a per-token bias of that linear
layer, which the field ``A^T g`` spreads over the tokens j by the weights ``A_ij``.

- :class:`Attention`: ``aten.scaled_dot_product_attention`` (mask, ``is_causal``, ``scale``,
  ``enable_gqa``); its forward records ``A``.
- :class:`MatMul`: ``matmul`` / ``bmm`` where one factor comes from a sigmoid-like function (the
  explicit form ``softmax(q k^T) @ v``) or is a constant: the other factor gets the field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..nodes import Ref
from .base import Rule, register, same_layout, sum_to, unsupported

__all__ = ["Attention", "MatMul", "attention_weights"]


def _is_data(graph, v) -> bool:
    return isinstance(v, Ref) and graph.nodes[v.index].data


def attention_weights(
    q: Tensor, k: Tensor, mask=None, is_causal: bool = False, scale=None, gqa: bool = False
) -> Tensor:
    """``softmax(q k^T * scale + mask)`` as ``scaled_dot_product_attention`` computes it
    (boolean masks: True attends; fully masked rows weigh nothing). (..., H, L, S)."""
    L, S = q.shape[-2], k.shape[-2]
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if gqa and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    logits = (q @ k.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
    a = torch.softmax(logits, -1)
    return torch.nan_to_num(a, nan=0.0)


def _sdpa_args(args, kw):
    a = list(args)
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    dflt = [None, None, None, None, 0.0, False, None, False]
    return [a[i] if i < len(a) else kw.get(names[i], dflt[i]) for i in range(len(names))]


@register
class Attention(Rule):
    """``scaled_dot_product_attention`` with the attention weights held at their recorded value:
    linear in the values (``g_v = A^T g``, summed over the query heads sharing a key/value head
    under grouped-query attention); nothing to the queries, keys and mask."""

    ops = ("aten.scaled_dot_product_attention",)
    title = "scaled dot-product attention (weights held as gates: the field goes to the values)"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        q, k, v, mask, dropout, causal, scale, gqa = _sdpa_args(node.args, node.kwargs)
        node.params = {
            "q": q,
            "k": k,
            "v": v.index if isinstance(v, Ref) else None,
            "mask": mask,
            "dropout": float(dropout or 0.0),
            "causal": bool(causal),
            "scale": None if scale is None else float(scale),
            "gqa": bool(gqa),
        }
        node.field_inputs = [v.index] if _is_data(graph, v) else []

    def check_main(self, node, graph):
        if node.params["dropout"] > 0:
            raise unsupported(node, "attention with dropout (a random op: call model.eval())")

    def layout(self, node, graph):
        return same_layout(node, graph)

    def weights(self, node, args, kwargs) -> Tensor:
        q, k, _v, mask, _d, causal, scale, gqa = _sdpa_args(args, kwargs)
        return attention_weights(q, k, mask, bool(causal), scale, bool(gqa))

    def forward(self, node, args, kwargs, ctx):
        out = node.target(*args, **kwargs)
        if ctx.records is not None:
            ctx.records[node.index] = self.weights(node, args, kwargs).to(out.dtype)
        return out

    def vjp(self, node, g, run):
        a = run.records[node.index]
        gv = a.transpose(-2, -1) @ g
        v = node.params["v"]
        shape = run.shape(v)
        if node.params["gqa"] and gv.dim() >= 3 and gv.shape[-3] != shape[-3]:
            hv = shape[-3]
            gv = gv.unflatten(-3, (hv, gv.shape[-3] // hv)).sum(-3)
        return [(v, sum_to(gv, shape))]


@register
class MatMul(Rule):
    """``a @ b`` where one factor is a gate (from a sigmoid-like function: the attention weights
    ``softmax(q k^T)`` of an explicit attention) or a constant: the other factor gets the field,
    ``A^T g`` (``g B^T`` when the gate is on the right). A product of two input-dependent factors
    where neither is a gate (``q @ k^T``) is refused on the relevance path."""

    ops = ("aten.matmul", "aten.bmm")
    title = "matmul / bmm with a gate (attention weights held fixed) or a constant factor"
    group = "affine"
    decomposable = True

    def parse(self, node, graph):
        from .affine import _sigmoid_like

        a, b = node.args[0], node.args[1]
        da, db = _is_data(graph, a), _is_data(graph, b)
        p = {"a": a, "b": b}
        if da and db:
            ga, gb = _sigmoid_like(graph, a.index), _sigmoid_like(graph, b.index)
            if ga and not gb:
                p.update(mode="gate", x="b")
            elif gb and not ga:
                p.update(mode="gate", x="a")
            else:
                p.update(mode="product")
        elif da or db:
            p.update(mode="const", x="a" if da else "b")
        else:
            p.update(mode="none")
        node.params = p
        if p["mode"] in ("gate", "const"):
            node.field_inputs = [p[p["x"]].index]
        else:
            node.field_inputs = [i.index for i in (a, b) if _is_data(graph, i)]

    def check_main(self, node, graph):
        p = node.params
        if p["mode"] == "product":
            raise unsupported(
                node, "a matrix product of two input-dependent tensors where neither is a gate (a softmax)"
            )
        if len(node.shape) < 2 or any(
            len(graph.nodes[v.index].shape) < 2 for v in (p["a"], p["b"]) if isinstance(v, Ref)
        ):
            raise unsupported(node, "a matrix product with a vector operand")

    def layout(self, node, graph):
        return same_layout(node, graph)

    def needs(self, node, graph):
        p = node.params
        if "x" not in p:
            return []
        other = p["b"] if p["x"] == "a" else p["a"]
        return [other.index] if isinstance(other, Ref) else []

    def vjp(self, node, g, run):
        p = node.params
        x = p[p["x"]].index
        if p["x"] == "b":  # out = A @ x: g_x = A^T g
            a = run.value(p["a"].index) if isinstance(p["a"], Ref) else p["a"]
            gx = a.transpose(-2, -1) @ g
        else:  # out = x @ B: g_x = g B^T
            b = run.value(p["b"].index) if isinstance(p["b"], Ref) else p["b"]
            gx = g @ b.transpose(-2, -1)
        return [(x, sum_to(gx, run.shape(x)))]
