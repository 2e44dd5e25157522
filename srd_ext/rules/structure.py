"""Ops that move, select, pool or resize pixels and channels, with no bias of their own.

Their VJPs only route the field: a reshape or permute moves it back, a concatenation splits it
by channel ranges, a split or slice puts it back in its range (zeros elsewhere), a max-pool
scatters it to the recorded winners (overlapping windows accumulate), average pools, means and
upsampling spread it like their gradients. Dropout and stochastic depth are the identity (the
model is captured in eval mode).
"""

from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch

from ..nodes import Ref
from .base import Rule, is_tokens, nchw_layout, register, same_grid, sum_to, unsupported


def _ref_index(a):
    return a.index if isinstance(a, Ref) else None


def _data_first(node, graph):
    i = _ref_index(node.args[0])
    return [i] if i is not None and graph.nodes[i].data else []


class Routing(Rule):
    """A linear op without bias whose field input is its first argument."""

    group = "structure"
    decomposable = True

    def parse(self, node, graph):
        node.field_inputs = _data_first(node, graph)

    def grad(self, node, g, run):
        return self.vjp(node, g, run)


@register
class Identity(Routing):
    ops = (
        "aten.dropout",
        "aten.feature_dropout",
        "aten.alpha_dropout",
        "aten.feature_alpha_dropout",
        "aten.native_dropout",
        "aten.clone",
        "aten.contiguous",
        "aten.alias",
        "aten.detach",
        "aten.lift_fresh_copy",
        "aten._to_copy",
        "aten.to",
        "aten.type_as",
    )
    title = "Dropout, stochastic depth (identity), clone, contiguous, dtype casts"
    identity_like = True

    def forward(self, node, args, kwargs, ctx):
        if node.op_name in ("aten.dropout", "aten.feature_dropout", "aten.alpha_dropout", "aten.feature_alpha_dropout"):
            return args[0]
        return node.target(*args, **kwargs)

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        if g.dtype != run.dtype(x):
            g = g.to(run.dtype(x))
        return [(x, g)]


def _align_layout(in_shape, in_layout, out_shape) -> Optional[Tuple[int, ...]]:
    """Follow the batch/height/width (or batch/token) dims through a reshape by matching prefix
    products. Height and width merged, in this order, into one dim become a token dim (a
    feature map flattened into a token sequence, row-major)."""
    labels = ["C"] * len(in_shape)
    for name, d in zip("BHW" if len(in_layout) == 3 else "BT", in_layout):
        labels[d] = name
    out_labels: List[str] = ["?"] * len(out_shape)
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        gi, gj = [], []
        pi = pj = 1
        if i < n_in:
            gi.append(i)
            pi *= in_shape[i]
            i += 1
        if j < n_out:
            gj.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < n_in:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < n_out:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                return None
        big_in = [k for k in gi if in_shape[k] != 1]
        big_out = [k for k in gj if out_shape[k] != 1]
        names = {labels[k] for k in big_in}
        if len(big_in) == 1 and len(big_out) == 1 and labels[big_in[0]] in "BHWT":
            for k in gj:
                out_labels[k] = "C"
            out_labels[big_out[0]] = labels[big_in[0]]
        elif [labels[k] for k in big_in] == ["H", "W"] and len(big_out) == 1:
            for k in gj:
                out_labels[k] = "C"
            out_labels[big_out[0]] = "T"
        elif names <= {"C"}:
            for k in gj:
                out_labels[k] = "C"
        else:
            return None
    try:
        if "T" in out_labels:
            return (out_labels.index("B"), out_labels.index("T"))
        return (out_labels.index("B"), out_labels.index("H"), out_labels.index("W"))
    except ValueError:
        return None


@register
class Reshape(Routing):
    ops = (
        "aten.view",
        "aten.reshape",
        "aten._unsafe_view",
        "aten.flatten",
        "aten.unflatten",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.view_as",
        "aten.reshape_as",
    )
    title = "view / reshape / flatten / squeeze / unsqueeze"
    view_like = True

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None or node.shape is None:
            return None
        return _align_layout(src.shape, src.layout, node.shape)

    def grid(self, node, graph):
        src = graph.nodes[node.field_inputs[0]]
        if len(src.layout) == 3:  # a feature map flattened into tokens: all of them patches
            return (0, src.shape[src.layout[1]], src.shape[src.layout[2]])
        return same_grid(node, graph)

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        return [(x, g.reshape(run.shape(x)))]


@register
class Expand(Routing):
    ops = ("aten.expand", "aten.expand_as")
    title = "expand"
    view_like = True

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        return [(x, sum_to(g, run.shape(x)))]


@register
class Permute(Routing):
    ops = ("aten.permute", "aten.transpose", "aten.t", "aten.movedim", "aten.swapaxes")
    title = "permute / transpose (channels-last blocks, channel shuffles)"
    view_like = True

    def _perm(self, node, ndim):
        name = node.op_name
        if name == "aten.permute":
            return [d % ndim for d in node.args[1]]
        if name in ("aten.transpose", "aten.swapaxes"):
            d0, d1 = node.args[1] % ndim, node.args[2] % ndim
            p = list(range(ndim))
            p[d0], p[d1] = p[d1], p[d0]
            return p
        if name == "aten.t":
            return list(range(ndim))[::-1]
        src = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dst = node.args[2] if isinstance(node.args[2], (list, tuple)) else [node.args[2]]
        src, dst = [d % ndim for d in src], [d % ndim for d in dst]
        rest = [d for d in range(ndim) if d not in src]
        p = [None] * ndim
        for s_, d_ in zip(src, dst):
            p[d_] = s_
        it = iter(rest)
        return [v if v is not None else next(it) for v in p]

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None:
            return None
        perm = self._perm(node, len(src.shape))
        where = {d: k for k, d in enumerate(perm)}
        return tuple(where[d] for d in src.layout)

    def vjp(self, node, g, run):
        perm = self._perm(node, g.dim())
        inv = [0] * len(perm)
        for k, d in enumerate(perm):
            inv[d] = k
        return [(node.field_inputs[0], g.permute(*inv))]


@register
class Slice(Routing):
    ops = ("aten.slice", "aten.narrow", "aten.select")
    title = "slice / narrow / select"
    view_like = True

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None:
            return None
        dim = node.args[1] % len(src.shape)
        if node.op_name == "aten.select":
            if dim in src.layout:
                return None
            return tuple(d - (d > dim) for d in src.layout)
        return src.layout

    def grid(self, node, graph):
        """A slice along the tokens that keeps every patch token (``x[:, 1:]``) moves the grid."""
        src = graph.nodes[node.field_inputs[0]]
        if src.grid is None:
            return None
        n = src.shape[src.layout[1]]
        if node.args[1] % len(src.shape) != src.layout[1]:
            return src.grid
        if node.op_name == "aten.narrow":
            start, end, step = node.args[2], node.args[2] + node.args[3], 1
        else:
            a = list(node.args) + [None] * 5
            start, end, step = a[2] or 0, (a[3] if a[3] is not None else n), a[4] or 1
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(start, min(n, end + n if end < 0 else end))
        off, h, w = src.grid
        if step == 1 and start <= off and off + h * w <= end:
            return (off - start, h, w)
        return None

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        shape = list(run.shape(x))
        dim = node.args[1] % len(shape)
        name = node.op_name
        if name == "aten.select":
            return [(x, torch.ops.aten.select_backward(g, shape, dim, node.args[2]))]
        if name == "aten.narrow":
            start, length = node.args[2], node.args[3]
            end, step = start + length, 1
        else:
            a = list(node.args) + [None] * 5
            start = a[2] if a[2] is not None else 0
            end = a[3] if a[3] is not None else shape[dim]
            step = a[4] if a[4] is not None else 1
        start = max(0, min(shape[dim], start + shape[dim] if start < 0 else start))
        end = max(start, min(shape[dim], end + shape[dim] if end < 0 else end))
        return [(x, torch.ops.aten.slice_backward(g, shape, dim, start, end, step))]


class _Join(Rule):
    """Ops that join a list of tensors along ``dim``."""

    group = "structure"
    decomposable = True

    def parse(self, node, graph):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        node.params = {"items": [_ref_index(t) for t in tensors], "dim": dim}
        node.field_inputs = [i for i in node.params["items"] if i is not None and graph.nodes[i].data]

    def grad(self, node, g, run):
        return self.vjp(node, g, run)


@register
class Cat(_Join):
    """Concatenation over channels; or along the tokens of one token sequence with constant
    tokens (a class, distillation or register token): the constants are no pixel's, so the
    relevance that reaches them is unassigned (``bias``)."""

    ops = ("aten.cat", "aten.concat", "aten.concatenate")
    title = "cat (over channels; a token sequence with constant class or register tokens)"

    def _token_dim(self, node, graph) -> bool:
        """Whether this joins one token sequence with constants along its tokens."""
        lay = graph.nodes[node.field_inputs[0]].layout if len(node.field_inputs) == 1 else None
        return is_tokens(lay) and (node.params["dim"] % len(node.shape)) == lay[1]

    def layout(self, node, graph):
        lays = {graph.nodes[i].layout for i in node.field_inputs}
        if len(lays) == 1:
            lay = lays.pop()
            if lay is not None and (node.params["dim"] % len(node.shape)) not in lay:
                return lay
            if self._token_dim(node, graph):
                return lay
        return None

    def grid(self, node, graph):
        if not self._token_dim(node, graph):
            return same_grid(node, graph)
        x = node.field_inputs[0]
        src = graph.nodes[x]
        if src.grid is None:
            return None
        dim = node.params["dim"] % len(node.shape)
        before = 0
        for i in node.params["items"]:
            if i == x:
                break
            before += graph.nodes[i].shape[dim]
        off, h, w = src.grid
        return (off + before, h, w)

    def vjp(self, node, g, run):
        dim = node.params["dim"] % g.dim()
        out, start = [], 0
        data = set(node.field_inputs)
        for i in node.params["items"]:
            n = run.shape(i)[dim] if i is not None else 0
            if i in data:
                out.append((i, g.narrow(dim, start, n)))
            start += n
        return out

    def bias(self, node, g, run):
        """The relevance content ``<t, g>`` of the constant tokens: unassigned."""
        if run.lost is None or node.layout is None or len(node.field_inputs) == len(node.params["items"]):
            return []
        dim = node.params["dim"] % g.dim()
        data = set(node.field_inputs)
        b = node.layout[0]
        start = 0
        for i in node.params["items"]:
            n = run.shape(i)[dim]
            if i not in data:
                part = (g.narrow(dim, start, n) * run.value(i)).movedim(b, 0)
                run.note_lost(part.reshape(part.shape[0], -1).sum(1))
            start += n
        return []


@register
class Split(Routing):
    """Ops that return several tensors; ``getitem`` picks one. The field of such a node holds one
    entry per output used."""

    ops = ("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.tensor_split")
    title = "split / chunk / unbind (+ getitem)"

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None:
            return None
        return src.layout

    def _dim(self, node, ndim):
        name = node.op_name
        if name == "aten.unbind":
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        else:
            d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return d % ndim

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        shapes = run.shape(node.index)
        shape = run.shape(x)
        dim = self._dim(node, len(shape))
        ref = next(iter(g.values()))
        parts = [g.get(k) if g.get(k) is not None else ref.new_zeros(s) for k, s in enumerate(shapes)]
        if node.op_name == "aten.unbind":
            return [(x, torch.stack(parts, dim))]
        return [(x, torch.cat(parts, dim))]


@register
class GetItem(Rule):
    ops = ("getitem",)
    title = "getitem"
    group = "structure"
    decomposable = True
    view_like = True

    def parse(self, node, graph):
        node.field_inputs = _data_first(node, graph)

    def forward(self, node, args, kwargs, ctx):
        return operator.getitem(args[0], args[1])

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None:
            return None
        if src.kind == "call" and src.op_name == "aten.unbind" and src.layout is not None:
            d = src.rule._dim(src, len(graph.nodes[src.field_inputs[0]].shape))
            return None if d in src.layout else tuple(x - (x > d) for x in src.layout)
        return src.layout

    def vjp(self, node, g, run):
        return [(node.field_inputs[0], {node.args[1]: g})]

    grad = vjp


# --------------------------------------------------------------------------------------------
# Pooling, means, resizing, padding
# --------------------------------------------------------------------------------------------
def _pool_args(node, names, defaults):
    a = list(node.args)
    return [a[i] if i < len(a) else node.kwargs.get(names[i], defaults[i]) for i in range(len(names))]


@register
class MaxPool(Routing):
    ops = ("aten.max_pool2d", "aten.max_pool2d_with_indices")
    title = "MaxPool2d (the field goes to the recorded winners)"
    reads_nchw = True

    def parse(self, node, graph):
        super().parse(node, graph)
        x, k, s, p, d, ceil = _pool_args(
            node, ["x", "kernel_size", "stride", "padding", "dilation", "ceil_mode"], [None, None, [], 0, 1, False]
        )
        node.params = {
            "k": k,
            "s": s if s else k,
            "p": p,
            "d": d,
            "ceil": bool(ceil),
            "tuple": node.op_name == "aten.max_pool2d_with_indices",
        }

    def layout(self, node, graph):
        return (0, 2, 3) if node.params["tuple"] or len(node.shape or ()) == 4 else None

    def forward(self, node, args, kwargs, ctx):
        p = node.params

        def fn(x):
            return torch.ops.aten.max_pool2d_with_indices(x, p["k"], p["s"], p["p"], p["d"], p["ceil"])

        out = ctx.instrument.maxpool(node, args[0], fn)
        if p["tuple"]:
            return out, None
        return out

    def vjp(self, node, g, run):
        if isinstance(g, dict):
            g = g[0]
        x = node.field_inputs[0]
        shape = run.shape(x)
        idx = run.indices[node.index]
        b, c = g.shape[0], g.shape[1]
        out = g.new_zeros((b, c, shape[2] * shape[3]))
        out = out.scatter_add(2, idx.reshape(b, c, -1), g.reshape(b, c, -1))
        return [(x, out.view(shape))]


@register
class AdaptiveMaxPool(MaxPool):
    ops = ("aten.adaptive_max_pool2d",)
    title = "AdaptiveMaxPool2d"

    def parse(self, node, graph):
        node.field_inputs = _data_first(node, graph)
        node.params = {
            "out": list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else [node.args[1]] * 2,
            "tuple": True,
        }

    def global_pool(self, node):
        return tuple(node.params["out"]) == (1, 1)

    def forward(self, node, args, kwargs, ctx):
        size = node.params["out"]
        out = ctx.instrument.maxpool(node, args[0], lambda x: torch.ops.aten.adaptive_max_pool2d(x, size))
        return out, None


@register
class AvgPool(Routing):
    ops = ("aten.avg_pool2d",)
    title = "AvgPool2d"
    reads_nchw = True

    def parse(self, node, graph):
        super().parse(node, graph)
        x, k, s, p, ceil, cip, div = _pool_args(
            node,
            ["x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
            [None, None, [], 0, False, True, None],
        )
        node.params = {"args": (k, s if s else k, p, bool(ceil), bool(cip), div)}

    def layout(self, node, graph):
        return nchw_layout(node, graph)

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        like = g.new_empty(run.shape(x))
        return [(x, torch.ops.aten.avg_pool2d_backward(g, like, *node.params["args"]))]


@register
class AdaptiveAvgPool(Routing):
    ops = ("aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d")
    title = "AdaptiveAvgPool2d"
    reads_nchw = True

    def layout(self, node, graph):
        return nchw_layout(node, graph)

    def global_pool(self, node):
        size = node.args[1]
        size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        return size == [1, 1]

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        like = g.new_empty(run.shape(x))
        return [(x, torch.ops.aten._adaptive_avg_pool2d_backward(g, like))]


@register
class Mean(Routing):
    ops = ("aten.mean", "aten.sum")
    title = "mean / sum over dims (global average pooling)"

    def parse(self, node, graph):
        super().parse(node, graph)
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        ndim = len(src.shape) if src is not None and src.shape is not None else 0
        a = list(node.args)
        dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(ndim))
        dims = [dims] if isinstance(dims, int) else list(dims)
        keep = a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)
        node.params = {
            "dims": sorted(d % ndim for d in dims) if ndim else [],
            "keep": bool(keep),
            "mean": node.op_name == "aten.mean",
        }

    def global_pool(self, node):
        return bool(node.params.get("spatial"))

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None:
            return None
        dims = node.params["dims"]
        node.params["spatial"] = all(d in dims for d in src.layout[1:])
        if any(d in dims for d in src.layout):
            return None
        if node.params["keep"]:
            return src.layout
        return tuple(d - sum(1 for k in dims if k < d) for d in src.layout)

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        shape = run.shape(x)
        p = node.params
        if not p["keep"]:
            for d in p["dims"]:
                g = g.unsqueeze(d)
        g = g.expand(shape)
        if p["mean"]:
            n = 1
            for d in p["dims"]:
                n *= shape[d]
            g = g / n
        return [(x, g)]


class _LinearByAutograd(Routing):
    """A linear op whose VJP is its gradient, taken on a zero input of the right shape."""

    def vjp(self, node, g, run):
        x = node.field_inputs[0]
        with torch.enable_grad():
            probe = g.new_zeros(run.shape(x)).requires_grad_(True)
            args = run.load(node.args, {x: probe})
            kwargs = run.load(node.kwargs, {x: probe}) if node.kwargs else {}
            y = node.target(*args, **kwargs)
            (gx,) = torch.autograd.grad(y, probe, g, create_graph=run.create_graph)
        return [(x, gx)]


@register
class Upsample(_LinearByAutograd):
    ops = (
        "aten.upsample_nearest2d",
        "aten.upsample_bilinear2d",
        "aten._upsample_nearest_exact2d",
        "aten.upsample_bicubic2d",
        "aten._upsample_bilinear2d_aa",
    )
    title = "upsample (nearest, bilinear, bicubic)"
    reads_nchw = True

    def layout(self, node, graph):
        return nchw_layout(node, graph)


@register
class Pad(_LinearByAutograd):
    ops = ("aten.pad", "aten.constant_pad_nd", "aten.reflection_pad2d", "aten.replication_pad2d")
    title = "pad (zero, reflect, replicate, circular; -inf before a max-pool)"

    def parse(self, node, graph):
        super().parse(node, graph)
        a = list(node.args)
        name = node.op_name
        value = 0.0
        mode = "constant" if name in ("aten.pad", "aten.constant_pad_nd") else name
        if name == "aten.pad":
            mode = a[2] if len(a) > 2 else node.kwargs.get("mode", "constant")
            if mode == "constant":
                v = a[3] if len(a) > 3 else node.kwargs.get("value")
                value = 0.0 if v is None else float(v)
        elif name == "aten.constant_pad_nd":
            value = float(a[2]) if len(a) > 2 else float(node.kwargs.get("value", 0.0))
        node.params = {"value": value, "mode": mode}

    def check_main(self, node, graph):
        v = node.params["value"]
        if v != 0.0 and v != float("-inf"):
            raise unsupported(node, f"padding with the constant {v} (a bias no pixel carries)")

    def layout(self, node, graph):
        src = graph.nodes[node.field_inputs[0]] if node.field_inputs else None
        if src is None or src.layout is None:
            return None
        return src.layout if len(node.shape) == len(src.shape) else None

    def vjp(self, node, g, run):
        if node.params["mode"] == "constant":
            x = node.field_inputs[0]
            shape = run.shape(x)
            pads = list(node.args[1])
            out = g
            for k in range(len(pads) // 2):
                dim = g.dim() - 1 - k
                lo, hi = pads[2 * k], pads[2 * k + 1]
                out = out.narrow(dim, lo, shape[dim]) if lo >= 0 else out
                if lo < 0 or hi < 0:  # a crop: the field's complement is zero
                    return super().vjp(node, g, run)
            return [(x, out)]
        return super().vjp(node, g, run)


@register
class Stack(_Join):
    ops = ("aten.stack",)
    title = "stack (a new channel dim)"

    def layout(self, node, graph):
        lays = {graph.nodes[i].layout for i in node.field_inputs}
        if len(lays) != 1:
            return None
        lay = lays.pop()
        if lay is None:
            return None
        dim = node.params["dim"] % len(node.shape)
        return tuple(d + (d >= dim) for d in lay)

    def vjp(self, node, g, run):
        dim = node.params["dim"] % g.dim()
        data = set(node.field_inputs)
        return [(i, g.select(dim, k)) for k, i in enumerate(node.params["items"]) if i in data]
