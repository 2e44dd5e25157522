"""A slow SRD that follows the paper literally (Eq. 5-13), for testing the fast path.

For every decomposition site k (an activation on the relevance path, or the encoder output) and
every pixel j of its pre-activation ``z_k``, the PFV ``z_kj`` is decomposed explicitly into the
contributions ``v_hat[(s, i) -> j]`` of every pixel i of every source s (the sites or the image
it is computed from). The decomposition is pushed forward op by op through the segment between
the sources and ``z_k``, one probe per source pixel (the source zero except at that pixel):

- the linear part of each op is applied to the probes, written out here for every op kind
  (:data:`LINEAR`), with the recorded forward held fixed where the rule says so (max-pool
  winners, a gate's value, a normalisation's sigma);
- each bias is split among the op's input pixels by explicit loops over output pixels and
  taps (:data:`BIASES`: Eq. 11 by ``||W_t x_m||`` or ``||x_m||``; per-pixel biases stay at their
  pixel), and each input pixel m's part is handed to the source pixels by their sharing ratio in
  ``x_m`` (Eq. 13 generalised: ``<v_hat[(s, i) -> m], x_m> / ||x_m||^2``); an output pixel none
  of whose inputs contributes keeps its bias unassigned.

Then ``mu[(s, i) -> j] = <v_hat, z_j> / ||z_j||^2`` and ``R_si = sum_j mu R_j``. Only the graph
structure (which node feeds which, the sites, the folded BatchNorms, pixel layouts) and the
model's own forward values come from ``srd_ext``; no rule, VJP or op of the fast path is used.
float64, one sample at a time. Adding an op to srd_ext means adding its case here.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import srd_ext
from srd_ext.nodes import Ref
from srd_ext.rules import affine as A
from srd_ext.rules import attention as T
from srd_ext.rules import structure as S

Decomp = Dict[int, torch.Tensor]  # source node -> (P_source, *shape of the node's value)


def _val(values, a):
    return values[a.index] if isinstance(a, Ref) else a


def _pixels(shape, layout):
    """Index tuples of every pixel (batch 0) of a tensor with ``layout``, in (h, w) order; of
    every token of a token layout (batch, token)."""
    if len(layout) == 2:
        b, t = layout
        for n in range(shape[t]):
            idx = [slice(None)] * len(shape)
            idx[b], idx[t] = 0, n
            yield n, tuple(idx)
        return
    b, h, w = layout
    for y, x in itertools.product(range(shape[h]), range(shape[w])):
        idx = [slice(None)] * len(shape)
        idx[b], idx[h], idx[w] = 0, y, x
        yield (y * shape[w] + x), tuple(idx)


def _pixel_vectors(t, layout):
    """(H*W, C) channel vectors of sample 0."""
    return _batched_pixel_vectors(t[:1], layout)[0]


def _batched_pixel_vectors(t, layout):
    """(N, H*W, C) channel vectors of every entry along the batch dim (dim 0); (N, tokens, C) for
    a token layout."""
    cd = [d for d in range(t.dim()) if d not in layout]
    b = layout[0]
    n_pix = _npix(t.shape, layout)
    return t.permute(*layout, *cd).reshape(t.shape[b], n_pix, -1)


class ReferenceSRD:
    def __init__(self, model, x: torch.Tensor, bias_share: str = "contribution", encoder=None):
        assert x.shape[0] == 1, "the reference explains one sample at a time"
        self.ex = srd_ext.Explainer(model, bias_share=bias_share, encoder=encoder)
        self.g = self.ex.graph(x)
        self.plan = self.ex._plan(self.g)
        self.mode = bias_share
        with torch.no_grad():
            vals = self.g.forward(x.double())
        self.values = [
            v.detach().double()
            if torch.is_tensor(v)
            else (tuple(t.detach().double() if torch.is_tensor(t) else t for t in v) if isinstance(v, tuple) else v)
            for v in vals
        ]
        self.mu: Dict[Tuple[int, int], torch.Tensor] = {}
        self.sources_of: Dict[int, List[int]] = {}
        self.residuals: Dict[int, float] = {}
        self._decomposed: Dict[int, tuple] = {}  # site -> its decomposition (fixed by the forward)

    # -- structure --------------------------------------------------------------------------
    def sites(self) -> List[int]:
        n = self.g.nodes
        s = [i for i in sorted(self.plan.main) if n[i].kind == "call" and n[i].site]
        if self.plan.encoder not in s:
            s.append(self.plan.encoder)
        return sorted(s)

    def _top(self, k: int) -> int:
        """The node whose value site k decomposes: its pre-activation, or itself (the encoder
        output taken as an identity activation)."""
        n = self.g.nodes[k]
        return n.z_input if n.site else k

    def _segment(self, k: int) -> Tuple[List[int], List[int]]:
        sites = set(self.sites()) | {self.g.input_index}
        top = self._top(k)
        seg, sources, stack = set(), set(), [top]
        while stack:
            i = stack.pop()
            if i in sites and i != k:
                sources.add(i)
                continue
            if i in seg:
                continue
            seg.add(i)
            stack.extend(self.g.nodes[i].field_inputs)
        return sorted(seg), sorted(sources)

    # -- the decomposition --------------------------------------------------------------------
    def decompose(self, k: int):
        """{source: (P_source, *shape of the decomposed value)} and the unassigned bias."""
        g, values = self.g, self.values
        seg, sources = self._segment(k)
        self.sources_of[k] = sources
        D: Dict[int, Decomp] = {}
        U: Dict[int, torch.Tensor] = {}
        for s in sources:
            v = values[s]
            lay = g.nodes[s].layout
            assert lay[0] == 0, "the reference expects the batch dim first"
            probes = torch.zeros((_npix(v, lay),) + tuple(v.shape[1:]), dtype=torch.float64)
            for p, idx in _pixels(v.shape, lay):
                probes[(p,) + idx[1:]] = v[idx]
            D[s] = {s: probes}
            U[s] = torch.zeros_like(v)
        for i in seg:
            n = g.nodes[i]
            kind = type(n.rule)
            if kind not in LINEAR:
                raise NotImplementedError(f"no reference case for {kind.__name__} ({n.op_name})")
            D[i], U[i] = LINEAR[kind](self, n, D, U)
            if self.mode != "none" and kind in BIASES:
                u, field, unassigned = BIASES[kind](self, n)
                if field is not None:
                    self._hand_bias(n, u, field, D, U, unassigned)
        return D[self._top(k)], U[self._top(k)]

    def _hand_bias(self, n, u: int, field: torch.Tensor, D, U, unassigned: torch.Tensor):
        """``field``: (M_u, *shape of n) the bias part assigned to each pixel m of input u; hand
        it to the source pixels by their sharing ratio in u_m (itself when u is a source)."""
        g, values = self.g, self.values
        xu = values[u]
        lay = g.nodes[u].layout
        xm = _pixel_vectors(xu, lay)  # (M, C)
        n2 = (xm * xm).sum(1)
        for src, dec in D[u].items():
            dm = _batched_pixel_vectors(dec, lay)  # (P, M, C)
            ratio = torch.where(n2 > 0, (dm * xm).sum(-1) / n2.clamp_min(1e-300), torch.zeros_like(n2))
            add = torch.einsum("pm,m...->p...", ratio, field.select(1, 0))  # field's batch dim is 1
            D[n.index][src] = D[n.index].get(src, torch.zeros_like(add)) + add
        lost = field[n2 == 0].sum(0) if bool((n2 == 0).any()) else 0
        # the part of u_m no source carries (its own unassigned bias) keeps its share of the bias
        covered = sum(_batched_pixel_vectors(dec, lay).sum(0) for dec in D[u].values())
        rest = torch.where(n2 > 0, ((xm - covered) * xm).sum(1) / n2.clamp_min(1e-300), torch.zeros_like(n2))
        U[n.index] = U[n.index] + unassigned.reshape(U[n.index].shape) + lost + torch.einsum("m,m...->...", rest, field)

    def run(self, r_init: torch.Tensor, start=None, stop=None) -> Dict[int, torch.Tensor]:
        """Relevance (H, W) at every site and the input, from ``r_init`` at the encoder output (or
        at site ``start``), down to node ``stop`` (default: the input)."""
        g = self.g
        enc = self.plan.encoder if start is None else start
        R = {enc: r_init.double().reshape(r_init.shape[-2:])}
        for k in reversed(self.sites()):
            if k not in R or (stop is not None and k <= stop):
                continue
            rk = R[k]
            z = self.values[self._top(k)]
            lay = g.nodes[self._top(k)].layout
            zm = _pixel_vectors(z, lay)  # (J, C)
            z2 = (zm * zm).sum(1)
            if k not in self._decomposed:
                self._decomposed[k] = self.decompose(k)
            dec, unassigned = self._decomposed[k]
            total = sum(d.sum(0) for d in dec.values()) + unassigned
            self.residuals[k] = float((total - z).abs().max() / z.abs().max().clamp_min(1e-300))
            for src, vh in dec.items():
                vm = _batched_pixel_vectors(vh, lay)  # (P, J, C)
                mu = torch.where(z2 > 0, (vm * zm).sum(-1) / z2.clamp_min(1e-300), torch.zeros_like(z2))
                self.mu[(src, k)] = mu
                sh, sw = _map_shape(self.values[src], g.nodes[src].layout)
                r_src = (mu * rk.reshape(1, -1)).sum(1).view(sh, sw)
                R[src] = R[src] + r_src if src in R else r_src
        return R


def _npix(v, layout):
    """Pixels (or tokens) of a tensor or shape ``v``."""
    shape = v.shape if torch.is_tensor(v) else v
    if len(layout) == 2:
        return shape[layout[1]]
    return shape[layout[1]] * shape[layout[2]]


def _map_shape(v, layout):
    """(H, W) of a relevance map of ``v``; (N, 1) for tokens."""
    if len(layout) == 2:
        return (v.shape[layout[1]], 1)
    return (v.shape[layout[1]], v.shape[layout[2]])


# --------------------------------------------------------------------------------------------
# Linear parts, op by op: (ref, node, D, U) -> (decomposition, unassigned bias) of the node
# --------------------------------------------------------------------------------------------
def _combine(ref, n, D, U, fn):
    """Apply a linear ``fn(list of input tensors) -> tensor`` to every source's probes (inputs
    that do not depend on a source are zero) and to the unassigned parts."""
    ins = n.field_inputs
    srcs = set()
    for i in ins:
        srcs.update(D[i])
    out = {}
    for s in srcs:
        P = next(D[i][s].shape[0] for i in ins if s in D[i])
        args = [
            D[i][s] if s in D[i] else torch.zeros((P,) + tuple(ref.values[i].shape[1:]), dtype=torch.float64)
            for i in ins
        ]
        out[s] = fn(args)
    return out, fn([U[i] for i in ins])


def _unary(f):
    return lambda ref, n, D, U: _combine(ref, n, D, U, lambda a: f(ref, n, a[0]))


def _conv_linear(ref, n, t):
    """conv2d without bias (with the BatchNorm folded when n is a folded BN node)."""
    values = ref.values
    conv = ref.g.nodes[n.fused] if n.fused is not None else n
    a = list(conv.args)
    if conv.op_name == "aten.convolution":
        w, stride, padding, dilation, groups = _val(values, a[1]), a[3], a[4], a[5], a[8]
    else:
        names = ["stride", "padding", "dilation", "groups"]
        dflt = [1, 0, 1, 1]
        w = _val(values, a[1])
        stride, padding, dilation, groups = (
            a[3 + k] if len(a) > 3 + k else conv.kwargs.get(names[k], dflt[k]) for k in range(4)
        )
    y = F.conv2d(t, w.double(), None, stride, padding, dilation, groups)
    if n.fused is not None:
        scale, _ = _bn_affine(ref, n)
        y = y * scale.view(1, -1, 1, 1)
    return y


def _bn_affine(ref, n):
    a = list(n.args)
    v = ref.values
    w, b, mean, var = (_val(v, a[k]) for k in (1, 2, 3, 4))
    eps = a[7] if n.op_name == "aten.batch_norm" else a[6]
    scale = 1.0 / torch.sqrt(var.double() + eps)
    if w is not None:
        scale = scale * w.double()
    shift = -mean.double() * scale + (b.double() if b is not None else 0)
    return scale, shift


def _bn_linear(ref, n, t):
    if n.fused is not None:
        return _conv_linear(ref, n, t)
    scale, _ = _bn_affine(ref, n)
    shape = [1] * t.dim()
    shape[1] = -1
    return t * scale.view(shape)


def _ln_stats(ref, n):
    a = list(n.args)
    x = ref.values[a[0].index]
    nd = len(a[1])
    dims = tuple(range(x.dim() - nd, x.dim()))
    eps = a[4] if len(a) > 4 else n.kwargs.get("eps", 1e-5)
    var = x.var(dims, unbiased=False, keepdim=True)
    return dims, 1.0 / torch.sqrt(var + eps)


def _ln_linear(ref, n, t):
    dims, rstd = _ln_stats(ref, n)
    w = _val(ref.values, n.args[2]) if len(n.args) > 2 else n.kwargs.get("weight")
    y = (t - t.mean(dims, keepdim=True)) * rstd
    return y * w if w is not None else y


def _gn_stats(ref, n):
    x = ref.values[n.args[0].index]
    G = n.args[1]
    eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
    xg = x.reshape(x.shape[0], G, -1)
    return G, 1.0 / torch.sqrt(xg.var(2, unbiased=False) + eps)  # (1, G)


def _gn_linear(ref, n, t):
    G, rstd = _gn_stats(ref, n)
    tg = t.reshape(t.shape[0], G, -1)
    y = ((tg - tg.mean(2, keepdim=True)) * rstd.view(1, G, 1)).reshape(t.shape)
    w = _val(ref.values, n.args[2]) if len(n.args) > 2 else n.kwargs.get("weight")
    return y * w.view(1, -1, 1, 1) if w is not None else y


def _linear_linear(ref, n, t):
    return t @ _val(ref.values, n.args[1]).double().T


def _addsub(ref, n, D, U):
    a = list(n.args)
    other = a[1]
    alpha = a[2] if len(a) > 2 else n.kwargs.get("alpha", 1)
    coefs = {}
    if n.op_name == "aten.rsub":
        pairs = [(a[0], -alpha), (other, 1)]
    else:
        pairs = [(a[0], 1), (other, -alpha if n.op_name == "aten.sub" else alpha)]
    for arg, c in pairs:
        if isinstance(arg, Ref) and arg.index in n.field_inputs:
            coefs[arg.index] = c

    def fn(ts):
        out = 0
        for i, t in zip(n.field_inputs, ts):
            out = out + coefs[i] * t
        return out.expand((out.shape[0],) + tuple(n.shape[1:])) if out.dim() == len(n.shape) else out

    return _combine(ref, n, D, U, fn)


def _muldiv(ref, n, D, U):
    a = list(n.args)
    if len(n.field_inputs) == 2:
        # a * b with both factors input-dependent: each is credited with half of the product,
        # the other factor held at its forward value
        va, vb = (_val(ref.values, t).double() for t in a[:2])
        return _combine(ref, n, D, U, lambda ts: 0.5 * (ts[0] * vb + va * ts[1]))
    x = n.field_inputs[0]
    other = a[1] if a[0] == Ref(x) else a[0]
    c = _val(ref.values, other)
    c = c.double() if torch.is_tensor(c) else float(c)
    is_div = n.op_name == "aten.div"
    factor = (1.0 / c) if is_div else c
    return _combine(ref, n, D, U, lambda ts: ts[0] * factor)


def _addcmul(ref, n, D, U):
    a = list(n.args)
    value = n.kwargs.get("value", a[3] if len(a) > 3 else 1.0)
    t1, t2 = a[1], a[2]
    xi = t1 if (isinstance(t1, Ref) and t1.index in n.field_inputs) else t2
    c = _val(ref.values, t2 if xi is t1 else t1)
    c = c.double() if torch.is_tensor(c) else float(c)
    self_data = isinstance(a[0], Ref) and a[0].index in n.field_inputs

    def fn(ts):
        if self_data:
            return ts[0] + value * c * ts[1]
        return value * c * ts[0]

    return _combine(ref, n, D, U, fn)


def _reshape(ref, n, t):
    return t.reshape((t.shape[0],) + tuple(ref.values[n.index].shape[1:]))


def _permute(ref, n, t):
    name = n.op_name
    if name == "aten.permute":
        return t.permute(*n.args[1])
    if name in ("aten.transpose", "aten.swapaxes"):
        return t.transpose(n.args[1], n.args[2])
    return t.movedim(n.args[1], n.args[2])


def _slice(ref, n, t):
    a = list(n.args)
    if n.op_name == "aten.select":
        return t.select(a[1], a[2])
    if n.op_name == "aten.narrow":
        return t.narrow(a[1], a[2], a[3])
    a = a + [None] * 5
    idx = [slice(None)] * t.dim()
    idx[a[1]] = slice(a[2], a[3], a[4] if a[4] is not None else 1)
    return t[tuple(idx)]


def _cat(ref, n, D, U):
    items = [i.index if isinstance(i, Ref) else None for i in n.args[0]]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)

    def fn_for(P, get):
        parts = []
        for i in items:
            t = get(i)
            if t is None:
                t = torch.zeros((P,) + tuple(ref.values[i].shape[1:]), dtype=torch.float64)
            parts.append(t)
        return torch.cat(parts, dim)

    srcs = set()
    for i in n.field_inputs:
        srcs.update(D[i])
    out = {}
    for s in srcs:
        P = next(D[i][s].shape[0] for i in n.field_inputs if s in D[i])
        out[s] = fn_for(P, lambda i: D[i].get(s) if i in n.field_inputs else None)
    # A constant item (a class token) is part of no source pixel: it is unassigned.
    return out, fn_for(1, lambda i: U[i] if i in n.field_inputs else ref.values[i].double())


def _stack(ref, n, D, U):
    items = [i.index if isinstance(i, Ref) else None for i in n.args[0]]
    dim = n.args[1] if len(n.args) > 1 else 0
    srcs = set()
    for i in n.field_inputs:
        srcs.update(D[i])

    def build(P, get):
        return torch.stack(
            [
                get(i)
                if get(i) is not None
                else torch.zeros((P,) + tuple(ref.values[i].shape[1:]), dtype=torch.float64)
                for i in items
            ],
            dim,
        )

    out = {
        s: build(
            next(D[i][s].shape[0] for i in n.field_inputs if s in D[i]),
            lambda i, s=s: D[i].get(s) if i in n.field_inputs else None,
        )
        for s in srcs
    }
    return out, build(1, lambda i: U[i] if i in n.field_inputs else None)


def _split(ref, n, t):
    name = n.op_name
    a = list(n.args)
    if name == "aten.unbind":
        return tuple(t.unbind(a[1] if len(a) > 1 else 0))
    dim = a[2] if len(a) > 2 else n.kwargs.get("dim", 0)
    if name == "aten.chunk":
        return tuple(t.chunk(a[1], dim))
    if name == "aten.tensor_split":
        return tuple(t.tensor_split(a[1], dim))
    return tuple(torch.split(t, a[1], dim))


def _getitem(ref, n, t):
    return t[n.args[1]]


def _maxpool(ref, n, t):
    x = ref.values[n.field_inputs[0]]
    if n.op_name == "aten.adaptive_max_pool2d":
        _, idx = F.adaptive_max_pool2d(x, n.args[1], return_indices=True)
    else:
        a = list(n.args) + [None] * 6
        k, s, p, d, c = a[1], a[2] or a[1], a[3] or 0, a[4] or 1, bool(a[5])
        _, idx = F.max_pool2d(x, k, s, p, d, ceil_mode=c, return_indices=True)
    P, _C = t.shape[0], t.shape[1]
    y = t.flatten(2).gather(2, idx.flatten(2).expand(P, -1, -1)).view((P,) + tuple(idx.shape[1:]))
    return (y, None) if n.op_name in ("aten.max_pool2d_with_indices", "aten.adaptive_max_pool2d") else y


def _same_op(ref, n, t):
    """Ops that are linear and bias-free as called (pooling, means, resizing, zero padding)."""
    args = [t] + [(_val(ref.values, a) if isinstance(a, Ref) else a) for a in n.args[1:]]
    if n.op_name == "aten.pad" and len(args) > 3 and args[3] is not None and args[3] == float("-inf"):
        args[3] = 0.0  # the -inf of a TF-style max-pool padding is never selected
    if n.op_name == "aten.constant_pad_nd" and len(args) > 2 and args[2] == float("-inf"):
        args[2] = 0.0
    return n.target(*args, **n.kwargs)


def _identity(ref, n, t):
    return t


def _expand(ref, n, t):
    return t.expand((t.shape[0],) + tuple(ref.values[n.index].shape[1:]))


def _tuple_combine(f):
    def go(ref, n, D, U):
        i = n.field_inputs[0]
        out = {s: f(ref, n, d) for s, d in D[i].items()}
        return out, f(ref, n, U[i])

    return go


def _attention_weights_literal(q, k, mask, is_causal, scale, gqa):
    """``softmax(q k^T * scale + mask)`` (batch 1, float64) from its definition: logits by an
    explicit sum over the head dim, masks applied, then exp / sum per query row."""
    q, k = q.double(), k.double()
    hq, L, d = q.shape[-3], q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    if gqa and k.shape[-3] != hq:
        k = torch.stack([k[..., h // (hq // k.shape[-3]), :, :] for h in range(hq)], -3)
    s = scale if scale is not None else 1.0 / d**0.5
    logits = torch.einsum("...ld,...sd->...ls", q, k) * s
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed = torch.tensor([[j <= i for j in range(S)] for i in range(L)])
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask.double()
    logits = logits.masked_fill(~allowed, float("-inf"))
    m = logits.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    tot = e.sum(-1, keepdim=True)
    return torch.where(tot > 0, e / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(e))


def _sdpa(ref, n, t):
    """out_i = sum_j A_ij v_j per head with A held at its forward value: the probes of v pushed
    through, pair by pair (i, j) of tokens."""
    a = list(n.args)
    kw = n.kwargs
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    dflt = [None, None, None, None, 0.0, False, None, False]
    q, k, _v, mask, _d, causal, scale, gqa = (a[i] if i < len(a) else kw.get(names[i], dflt[i]) for i in range(8))
    if isinstance(mask, Ref) and ref.g.nodes[mask.index].dtype == torch.bool:
        mask = ref.values[mask.index].bool()  # the reference holds every value as float64
    else:
        mask = _val(ref.values, mask)
    A = _attention_weights_literal(_val(ref.values, q), _val(ref.values, k), mask, bool(causal), scale, bool(gqa))
    hq = A.shape[-3]
    if t.shape[-3] != hq:  # grouped-query attention: each value head serves hq / hkv query heads
        t = torch.stack([t[..., h // (hq // t.shape[-3]), :, :] for h in range(hq)], -3)
    out = torch.zeros(t.shape[:-2] + (A.shape[-2], t.shape[-1]), dtype=torch.float64)
    for i in range(A.shape[-2]):
        for j in range(A.shape[-1]):
            out[..., i, :] += A[..., i, j].unsqueeze(-1) * t[..., j, :]
    return out


def _matmul(ref, n, D, U):
    """A product with a held gate (or constant) factor: that factor is a constant matrix."""
    a, b = n.args[0], n.args[1]
    x = n.field_inputs[0]
    if isinstance(b, Ref) and b.index == x:
        m = _val(ref.values, a).double()
        return _combine(ref, n, D, U, lambda ts: m @ ts[0])
    m = _val(ref.values, b).double()
    return _combine(ref, n, D, U, lambda ts: ts[0] @ m)


LINEAR = {
    A.Conv2d: _unary(_conv_linear),
    A.BatchNorm: _unary(_bn_linear),
    A.LayerNorm: _unary(_ln_linear),
    A.GroupNorm: _unary(_gn_linear),
    A.Linear: _unary(_linear_linear),
    A.AddSub: _addsub,
    A.MulDiv: _muldiv,
    A.Addcmul: _addcmul,
    S.Identity: _unary(_identity),
    S.Reshape: _unary(_reshape),
    S.Expand: _unary(_expand),
    S.Permute: _unary(_permute),
    S.Slice: _unary(_slice),
    S.Cat: _cat,
    S.Stack: _stack,
    S.Split: _tuple_combine(_split),
    S.GetItem: _tuple_combine(_getitem),
    S.MaxPool: _tuple_combine(_maxpool),
    S.AdaptiveMaxPool: _tuple_combine(_maxpool),
    S.AvgPool: _unary(_same_op),
    S.AdaptiveAvgPool: _unary(_same_op),
    S.Mean: _unary(_same_op),
    S.Upsample: _unary(_same_op),
    S.Pad: _unary(_same_op),
    T.Attention: _unary(_sdpa),
    T.MatMul: _matmul,
}


# --------------------------------------------------------------------------------------------
# Bias shares, op by op: (ref, node) -> (input u, field (M_u, *shape), unassigned (*shape))
# --------------------------------------------------------------------------------------------
def _conv_bias(ref, n):
    """Eq. 11 by explicit loops: output pixel p's bias split among the input pixels under the
    kernel by ||W_t x_m|| ("contribution") or ||x_m|| ("input")."""
    values = ref.values
    conv = ref.g.nodes[n.fused] if n.fused is not None else n
    a = list(conv.args)
    w = _val(values, a[1]).double()
    b = _val(values, a[2]) if len(a) > 2 else conv.kwargs.get("bias")
    b = b.double() if b is not None else None
    if n.fused is not None:
        scale, shift = _bn_affine(ref, n)
        w = w * scale.view(-1, 1, 1, 1)
        b = shift if b is None else shift + scale * b
    if b is None:
        return None, None, None
    p = conv.params
    kh, kw = p["k"]
    (sh, sw), (dh, dw) = p["stride"], p["dilation"]
    top, _, left, _ = p["pad"]
    G = p["groups"]
    x = values[p["x"]][0]
    C, H, W = x.shape
    out = values[n.index][0] if not isinstance(values[n.index], tuple) else values[n.index][0][0]
    O, Ho, Wo = out.shape
    field = torch.zeros((H * W, O, Ho, Wo), dtype=torch.float64)
    unassigned = torch.zeros((O, Ho, Wo), dtype=torch.float64)
    og, cg = O // G, C // G
    for oy in range(Ho):
        for ox in range(Wo):
            taps = []
            for ty in range(kh):
                for tx in range(kw):
                    iy, ix = oy * sh - top + ty * dh, ox * sw - left + tx * dw
                    if 0 <= iy < H and 0 <= ix < W:
                        v = x[:, iy, ix]
                        if ref.mode == "contribution":
                            prod = torch.cat(
                                [w[gi * og : (gi + 1) * og, :, ty, tx] @ v[gi * cg : (gi + 1) * cg] for gi in range(G)]
                            )
                            nrm = float(torch.linalg.vector_norm(prod))
                        else:
                            nrm = float(torch.linalg.vector_norm(v))
                        taps.append((iy * W + ix, nrm))
            total = sum(t for _, t in taps)
            if total > 0:
                for m, t in taps:
                    field[m, :, oy, ox] += b * (t / total)
            else:
                unassigned[:, oy, ox] = b
    return p["x"], field.unsqueeze(1).flatten(1, 1).view(H * W, 1, O, Ho, Wo), unassigned.unsqueeze(0)


def _per_pixel(ref, n, u, bias_full, lin):
    """A bias that stays at its pixel: pixel m keeps its own bias when its contribution
    (``lin``: the linear part's value, or u itself in "input" mode) is non-zero."""
    x = ref.values[u]
    lay = ref.g.nodes[u].layout
    src = lin if ref.mode == "contribution" else x
    M = _npix(x, lay)
    out_shape = tuple(ref.values[n.index].shape)
    field = torch.zeros((M,) + out_shape, dtype=torch.float64)
    unassigned = torch.zeros(out_shape, dtype=torch.float64)
    for m, idx in _pixels(out_shape, ref.g.nodes[n.index].layout):
        if float(torch.linalg.vector_norm(src[idx])) > 0:
            field[(m,) + idx] = bias_full[idx]
        else:
            unassigned[idx] = bias_full[idx]
    return u, field, unassigned


def _bn_bias(ref, n):
    if n.fused is not None:
        return _conv_bias(ref, n)
    scale, shift = _bn_affine(ref, n)
    u = n.field_inputs[0]
    x = ref.values[u]
    shape = [1] * x.dim()
    shape[1] = -1
    out = ref.values[n.index]
    out = out[0] if isinstance(out, tuple) else out
    return _per_pixel(ref, n, u, shift.view(shape).expand(out.shape), x * scale.view(shape))


def _param_bias(ref, n, k, shaped, linear):
    """The node's own bias (argument ``k``) at every pixel; ``linear`` its linear part."""
    b = _val(ref.values, n.args[k]) if len(n.args) > k else n.kwargs.get("bias")
    if b is None:
        return None, None, None
    u = n.field_inputs[0]
    out = ref.values[n.index]
    return _per_pixel(ref, n, u, shaped(b.double()).expand(out.shape), linear(ref, n, ref.values[u]))


def _ln_bias(ref, n):
    return _param_bias(ref, n, 3, lambda b: b, _ln_linear)


def _gn_bias(ref, n):
    return _param_bias(ref, n, 3, lambda b: b.view(1, -1, 1, 1), _gn_linear)


def _linear_bias(ref, n):
    return _param_bias(ref, n, 2, lambda b: b, _linear_linear)


def _addsub_bias(ref, n):
    if len(n.field_inputs) != 1:
        return None, None, None
    u = n.field_inputs[0]
    a = list(n.args)
    alpha = a[2] if len(a) > 2 else n.kwargs.get("alpha", 1)
    if n.op_name == "aten.rsub":
        const, coef = a[1], 1.0
    else:
        const = a[1] if a[0] == Ref(u) else a[0]
        coef = (-alpha if n.op_name == "aten.sub" else alpha) if a[0] == Ref(u) else 1.0
    c = _val(ref.values, const)
    c = c.double() if torch.is_tensor(c) else torch.tensor(float(c), dtype=torch.float64)
    out = ref.values[n.index]
    x = ref.values[u]
    return _per_pixel(ref, n, u, (coef * c).expand(out.shape), x)


def _addcmul_bias(ref, n):
    a = list(n.args)
    if isinstance(a[0], Ref) and a[0].index in n.field_inputs:
        return None, None, None
    u = n.field_inputs[0]
    value = n.kwargs.get("value", a[3] if len(a) > 3 else 1.0)
    c = _val(ref.values, a[2] if a[1] == Ref(u) else a[1])
    c = c.double() if torch.is_tensor(c) else float(c)
    s = _val(ref.values, a[0])
    s = s.double() if torch.is_tensor(s) else torch.tensor(float(s), dtype=torch.float64)
    out = ref.values[n.index]
    return _per_pixel(ref, n, u, s.expand(out.shape), value * c * ref.values[u])


def _cat_bias(ref, n):
    """Constant tokens concatenated to a sequence hand nothing to any pixel: ``_cat`` puts them in
    the unassigned part (the fast path's ``Cat.bias`` only counts them as unassigned)."""
    return None, None, None


BIASES = {
    A.Conv2d: _conv_bias,
    A.BatchNorm: _bn_bias,
    A.LayerNorm: _ln_bias,
    A.GroupNorm: _gn_bias,
    A.Linear: _linear_bias,
    A.AddSub: _addsub_bias,
    A.Addcmul: _addcmul_bias,
    S.Cat: _cat_bias,
}


def rel_err(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


def check_every_site(model, x, bias_share: str, tol: float = 1e-4) -> int:
    """The fast path (``relevance_at_all_layers``) against :class:`ReferenceSRD` at every site
    and the input, for the first sample of ``x``; returns how many layers were compared (all of
    the reference's sites and the input)."""
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    fast = ex.relevance_at_all_layers(x)
    g = ex.graph(x)
    ref = ReferenceSRD(model, x, bias_share=bias_share)
    r_ref = ref.run(fast[g.display_name(ref.plan.encoder)][0])
    if bias_share != "none":  # the explicit decomposition is exact: sum_i v_hat_{i->j} = v_j
        assert max(ref.residuals.values()) < 1e-10
    checked = 0
    for i, r in r_ref.items():
        name_i = g.display_name(i)
        assert name_i in fast, name_i
        assert rel_err(fast[name_i][0], r) < tol, (bias_share, name_i)
        checked += 1
    assert checked == len(ref.sites()) + 1
    return checked
