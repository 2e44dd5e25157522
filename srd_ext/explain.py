"""SRD explanations of whole CNNs: :func:`explain`, :class:`Explainer` and :func:`erf`.

An explanation is one forward pass over the captured graph (recording what the rules need:
max-pool indices, pre-activations, a layer norm's sigma) and one backward walk in which
relevance travels as a vector field through the rules' VJPs and is turned into one relevance per
pixel at every decomposition site (docs/math.md). The head (after the encoder output) is not
decomposed: its gradient gives the Grad-CAM weights of the initial relevance.

By default an explanation returns detached maps and records nothing for autograd, like
``torch.autograd.grad``: pass ``create_graph=True`` for maps that can be differentiated (an SRD
penalty in a training loop, attacks on explanations, gradcheck).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .capture import Graph, Recorder, check_eval, graph_for, signature_of, unwrap
from .rules import BIAS_SHARES, from_nchw, pixel_sum, relevance_to_field, to_nchw
from .rules.activations import Activation
from .rules.structure import Cat, GetItem

__all__ = ["Explainer", "explain", "erf", "INITS"]

INITS = ("gradcam-contrast", "gradcam", "cam", "constant")
Target = Union[None, int, Sequence[int], Tensor]
Init = Union[str, Tensor]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _own_precision(method):
    """Run ``method(self, x, ...)`` with autocast switched off for ``x``'s device.

    Under ``torch.autocast`` the model's ops would run in float16/bfloat16 while the relevance
    walk reads their weights in the model's dtype; the explanation is computed in the model's own
    dtype instead (a half-precision explanation: convert the model and the input)."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        dev = x.device.type if isinstance(x, Tensor) else None
        ctx = contextlib.nullcontext()
        if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            ctx = torch.autocast(dev, enabled=False)
        with ctx:
            return method(self, x, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Per-graph analysis: encoder output, the relevance path, what the forward keeps
# --------------------------------------------------------------------------------------------
class _Plan:
    """What one (graph, encoder) pair needs: the encoder node, the nodes the relevance reaches,
    and the values the forward keeps for the walk."""

    def __init__(self, graph: Graph, encoder: int):
        self.graph = graph
        self.encoder = encoder
        nodes = graph.nodes
        self.main = _reach(graph, [encoder])
        for i in sorted(self.main):
            n = nodes[i]
            if n.kind == "call":
                n.rule.check_main(n, graph)
        # Nodes whose forward records a contribution norm for their bias share (1x1 convs,
        # BatchNorms folding one, linear layers over channels).
        self.record_norms = sorted(
            i
            for i in self.main
            if nodes[i].kind == "call"
            and (
                nodes[i].params.get("pointwise")
                or nodes[i].op_name == "aten.linear"
                or (nodes[i].fused is not None and nodes[nodes[i].fused].params.get("pointwise"))
            )
        )
        keep: Set[int] = {graph.input_index, encoder, graph.output_index}
        enc = nodes[encoder]
        if enc.site:
            keep.add(enc.z_input)
        for n in nodes:
            if n.kind == "param" or (n.kind == "call" and not n.data):
                keep.add(n.index)
            elif n.data and n.index > encoder:
                keep.add(n.index)  # the head: its gradient reads every value
        dropped_sites = set()
        for i in self.main:
            n = nodes[i]
            if n.kind != "call":
                continue
            keep.update(n.rule.needs(n, graph, "contribution"))
            if n.site:
                keep.add(n.z_input)
                if isinstance(n.rule, Activation) and i != encoder:
                    dropped_sites.add(i)
                else:
                    keep.add(i)
        self.recompute = dropped_sites
        self.keep = keep - (dropped_sites - {encoder})
        # Pre-activations read only by their site: freed once the site has used them.
        own = set()
        for i in self.main:
            n = nodes[i]
            if n.kind == "call":
                own.update(j for j in n.rule.needs(n, graph, "contribution") if j == i)
        self.free_z = {
            nodes[i].z_input
            for i in self.main
            if nodes[i].site and nodes[i].z_input not in own and graph.users[nodes[i].z_input] == [i]
        }
        self.high: Dict[tuple, int] = {}

    def keep_for(self, wanted: Iterable[int]) -> Set[int]:
        return self.keep | set(wanted)


def _reach(graph: Graph, starts: Iterable[int]) -> Set[int]:
    """Nodes the relevance field reaches walking back from ``starts``."""
    seen, stack = set(), list(starts)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = graph.nodes[i]
        if n.kind == "input":
            continue
        stack.extend(j for j in n.field_inputs if graph.nodes[j].data)
    return seen


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
    cached = getattr(graph, "_default_encoder", None)
    if cached is not None:
        return cached
    nodes = graph.nodes
    reach = _reach(graph, [graph.output_index])
    spatial = [
        i
        for i in sorted(graph.cuts)
        if i in reach
        and nodes[i].kind == "call"
        and nodes[i].data
        and nodes[i].layout is not None
        and not nodes[i].pooled
        and not nodes[i].is_tuple
    ]
    memo: Dict[int, bool] = {}
    post = [i for i in spatial if _post_activation(graph, i, memo)]
    choice = None
    if post:
        p = post[-1]
        later_sites = [
            j for j in reach if j > p and nodes[j].site and nodes[j].layout is not None and not nodes[j].pooled
        ]
        if not later_sites:
            choice = p
    if choice is None and spatial:
        choice = spatial[-1]
    if choice is None:
        raise ValueError(
            "no node with pixels (batch, channels, height, width) separates the encoder "
            "from the head; pass encoder=<module path>"
        )
    graph._default_encoder = choice
    return choice


# --------------------------------------------------------------------------------------------
# One explanation's state
# --------------------------------------------------------------------------------------------
class _Run:
    """Forward values, records and settings of one explanation, as the rules read them."""

    def __init__(
        self,
        graph: Graph,
        values: List[Any],
        records: Dict[int, Any],
        indices: Dict[int, Tensor],
        shapes: List[Any],
        bias_share: str,
        create_graph: bool,
    ):
        self.graph = graph
        self.values = values
        self.records = records
        self.indices = indices
        self.shapes = shapes
        self.bias_share = bias_share
        self.create_graph = create_graph
        self._check_zero = not _is_compiling() and not create_graph
        self.lost: Optional[Tensor] = None  # per sample: relevance no pixel could carry

    def note_lost(self, t: Tensor) -> None:
        self.lost = self.lost + t.detach()

    def value(self, i: int):
        v = self.values[i]
        if v is None:
            n = self.graph.nodes[i]
            if n.kind == "call" and n.site and isinstance(n.rule, Activation):
                v = n.target(*self.load(n.args), **self.load(n.kwargs))
                self.values[i] = v
            else:
                raise RuntimeError(f"srd_ext: the value of {n.where()} was not kept for the walk")
        return v

    def shape(self, i: int):
        return self.shapes[i]

    def dtype(self, i: int):
        v = self.values[i]
        return v.dtype if isinstance(v, Tensor) else self.graph.nodes[i].dtype

    def load(self, template, override: Optional[Dict[int, Any]] = None):
        from .capture import Ref

        if isinstance(template, Ref):
            if override is not None and template.index in override:
                return override[template.index]
            return self.value(template.index)
        if isinstance(template, tuple):
            return tuple(self.load(t, override) for t in template)
        if isinstance(template, list):
            return [self.load(t, override) for t in template]
        if isinstance(template, dict):
            return {k: self.load(v, override) for k, v in template.items()}
        return template

    def skip_zero_bias(self, b) -> bool:
        """A zero bias shares nothing: skip its work (checked outside compiled code only)."""
        if not self._check_zero or not isinstance(b, Tensor) or b.device.type != "cpu":
            return False
        return not bool(b.any())


def _add(store: Dict[int, Any], i: int, t) -> None:
    if isinstance(t, dict):
        cur = store.get(i)
        if cur is None:
            store[i] = dict(t)
        else:
            for k, v in t.items():
                cur[k] = v if k not in cur else cur[k] + v
        return
    store[i] = t if i not in store else store[i] + t


# --------------------------------------------------------------------------------------------
# Explainer
# --------------------------------------------------------------------------------------------
class Explainer:
    """SRD explainer of one model; the model is captured once per input signature and reused.

    Args:
        model: a CNN classifier (torchvision, timm or your own; also inside ``torch.compile``,
            DataParallel or DistributedDataParallel); never modified, and its live parameters are
            read at every call.
        init: initial relevance at the encoder output: "gradcam-contrast" (Eq. 4, default),
            "gradcam", "cam" (per-position logit of a global-average-pool + linear head),
            "constant" (all ones, Sec. 4.3) or a tensor (B, H_L, W_L) / (H_L, W_L).
        bias_share: "contribution" (default: a bias is shared by ``||W_t x_i||``), "input"
            (Eq. 11: by ``||x_i||``) or "none" (biases dropped; relevance not conserved).
        encoder: layer name of the encoder output (default: see :func:`default_encoder`; e.g.
            ``layer4`` of a ResNet, ``features.29`` of VGG16).

    Layers are named by "input", "low" (the encoder output), "high" (the last layer every path
    passes through at 1/8 of the input resolution: 28x28 for a 224 input), a module path
    ("layer2", "features.22": its output), ``path@k`` for the k-th call of a reused module (also
    ``path_k`` with underscores, as torch.fx names it), or an ATen node name (``relu_3``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        init: Init = "gradcam-contrast",
        bias_share: str = "contribution",
        encoder: Optional[str] = None,
    ):
        if bias_share not in BIAS_SHARES:
            raise ValueError(f"bias_share must be one of {BIAS_SHARES}, got {bias_share!r}")
        if isinstance(init, str) and init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a tensor, got {init!r}")
        if encoder is not None and not isinstance(encoder, str):
            raise TypeError(f"encoder must be a layer name (str), got {type(encoder).__name__}")
        self.model = unwrap(model)
        self.init = init
        self.bias_share = bias_share
        self.encoder_name = encoder
        self._graphs: Dict[tuple, Graph] = {}
        self._last: Optional[Graph] = None

    # -- capture ----------------------------------------------------------------------------
    def graph(self, x: Tensor) -> Graph:
        """The capture for inputs shaped like ``x`` (cached)."""
        sig = signature_of(x)
        if _is_compiling():
            g = self._graphs.get(sig)
            if g is None:
                raise RuntimeError(
                    "srd_ext captures a model with torch.export, which cannot run inside torch.compile: "
                    "call explainer.prepare(x) (or the explainer once eagerly) on an input of this shape "
                    "before compiling"
                )
            return g
        g = graph_for(self.model, x)
        self._graphs[sig] = g
        self._last = g
        return g

    def prepare(self, x: Tensor) -> "Explainer":
        """Capture the model for inputs shaped like ``x`` now. ``torch.export`` cannot run
        inside ``torch.compile``: call this (or explain once eagerly) before compiling code that
        calls the explainer."""
        self._check_input(x)
        g = self.graph(x)
        self._plan(g)
        return self

    def _plan(self, g: Graph) -> _Plan:
        """The plan for this explainer's encoder on graph ``g`` (kept on the graph, shared by
        every explainer of the model)."""
        p = g.plans.get(self.encoder_name)
        if p is None:
            enc = default_encoder(g) if self.encoder_name is None else self._encoder_node(g, self.encoder_name)
            p = g.plans[self.encoder_name] = _Plan(g, enc)
        return p

    def _encoder_node(self, g: Graph, name: str) -> int:
        try:
            i = g.resolve(name)
        except KeyError:
            names = [
                g.display_name(i)
                for i in sorted(g.cuts)
                if g.nodes[i].kind == "call"
                and g.nodes[i].layout is not None
                and not g.nodes[i].pooled
                and not g.nodes[i].is_tuple
            ]
            raise ValueError(f"unknown encoder layer {name!r}; layers every path passes through: {names}") from None
        n = g.nodes[i]
        if not n.data or n.layout is None or n.pooled:
            raise ValueError(
                f"encoder {name!r} ('{n.name}') has no pixels (batch, channels, height, "
                "width): choose a layer before the global pooling"
            )
        return i

    # -- layer names ------------------------------------------------------------------------
    def _names(self, g: Graph) -> List[str]:
        plan = self._plan(g)
        names = ["input", "low", "high"]
        for i in sorted(plan.main):
            n = g.nodes[i]
            if n.kind == "call" and n.layout is not None and not n.is_tuple and (n.site or i in g.cuts):
                names.append(g.display_name(i))
        return names

    def layer_names(self, x: Optional[Tensor] = None) -> List[str]:
        """Names accepted by ``layer`` for inputs shaped like ``x`` (default: the last input
        explained): "input", "low", "high", then every decomposition site and every node all
        paths pass through, by module path where one outputs it."""
        g = self.graph(x) if x is not None else self._last
        if g is None:
            raise ValueError(
                "layer_names needs an input shape: pass an example x (the model is captured per input shape)"
            )
        return self._names(g)

    def encoder_layer(self, x: Tensor) -> str:
        """Name of the encoder output for inputs shaped like ``x``."""
        g = self.graph(x)
        return g.display_name(self._plan(g).encoder)

    def _resolve(self, g: Graph, plan: _Plan, layer) -> int:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, got {type(layer).__name__}")
        if layer == "input":
            return g.input_index
        if layer == "low":
            return plan.encoder
        if layer == "high":
            return self._high(g, plan)
        try:
            i = g.resolve(layer)
        except KeyError:
            raise ValueError(f"unknown layer {layer!r}; choose one of {self._names(g)}") from None
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
            raise ValueError(f"layer {layer!r} ('{n.name}', {n.op_name}): {why}. Layers: {self._names(g)}")
        if n.layout is None or n.is_tuple:
            raise ValueError(f"layer {layer!r} ('{n.name}') has no pixel layout (batch, height, width)")
        return i

    def _high(self, g: Graph, plan: _Plan) -> int:
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
            and g.nodes[i].kind == "call"
            and g.nodes[i].layout is not None
            and not g.nodes[i].is_tuple
            and _hw(g.nodes[i]) == want
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

    # -- checks -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64) and not (
            x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        ):
            raise TypeError(f"x must be float32 or float64 (float16 and bfloat16 on CUDA), got {x.dtype} on {x.device}")
        p = next(self.model.parameters(), None)
        if p is not None and (p.device != x.device or p.dtype != x.dtype):
            raise ValueError(f"x is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}; move one of them")
        if not _is_compiling():
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError("x contains NaN or Inf")
            check_eval(self.model)

    def _targets(self, target: Target, logits: Tensor) -> Tensor:
        b, k = logits.shape[0], logits.shape[-1]
        if target is None:
            return logits.argmax(-1)
        if isinstance(target, bool):
            raise TypeError("target must be an int, a sequence of ints or an integer tensor, got a bool")
        if isinstance(target, int):
            t = torch.full((b,), target, dtype=torch.long, device=logits.device)
        else:
            t = torch.as_tensor(target, device=logits.device)
            if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"target must hold integers, got {t.dtype}")
            t = t.long().reshape(-1)
            if t.numel() == 1 and b != 1:
                t = t.expand(b)
            if t.numel() != b:
                raise ValueError(f"target has {t.numel()} entries for a batch of {b}")
        if not _is_compiling() and t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ValueError(f"target out of range: classes are 0..{k - 1}, got {t.tolist()}")
        return t

    # -- passes -------------------------------------------------------------------------------
    def _forward(self, g: Graph, plan: _Plan, x: Tensor, wanted: Iterable[int], create_graph: bool) -> _Run:
        wanted = list(wanted)
        rec = Recorder()
        records: Dict[int, Any] = {}
        shapes: List[Any] = []
        lowest = min(wanted)
        record = set() if self.bias_share != "contribution" else {i for i in plan.record_norms if i >= lowest}
        values = g.forward(
            x, rec, keep=plan.keep_for(wanted), records=records, shapes=shapes, model=self.model, record=record
        )
        run = _Run(g, values, records, rec.indices, shapes, self.bias_share, create_graph)
        run.free_z = plan.free_z
        for i in plan.recompute:
            if i not in wanted:
                values[i] = None
        return run

    def _walk(
        self, run: _Run, seeds: Dict[int, Tensor], wanted: Iterable[int], free: bool = False
    ) -> Dict[int, Tensor]:
        """Relevance walk from ``seeds`` (relevance (B, H, W) at nodes) down to the lowest wanted
        node; returns the relevance (B, H, W) at every wanted node."""
        g = run.graph
        nodes = g.nodes
        wanted = set(wanted)
        lowest = min(wanted)
        field: Dict[int, Any] = {}
        extra: Dict[int, Tensor] = dict(seeds)
        out: Dict[int, Tensor] = {}
        with_bias = run.bias_share != "none"
        for i in range(max(seeds), lowest - 1, -1):
            g_i = field.pop(i, None)
            e = extra.pop(i, None)
            if g_i is None and e is None:
                continue
            n = nodes[i]
            if n.kind == "input":
                x = run.value(i)
                r = pixel_sum(x * g_i, n.layout) if g_i is not None else torch.zeros_like(e)
                out[i] = r + e if e is not None else r
                break
            if n.site:
                a = run.value(i)
                z = run.value(n.z_input)
                lay = n.layout
                a4, z4 = to_nchw(a, lay), to_nchw(z, lay)
                G4 = to_nchw(g_i, lay) if g_i is not None else torch.zeros_like(a4)
                relevance, gz = ops.activation_share(a4, G4, z4, e)
                if i in wanted:
                    out[i] = relevance
                if run.lost is not None:
                    run.note_lost(torch.where((z4 * z4).sum(1) > 0, 0, relevance).sum((1, 2)))
                del a4, z4, G4, g_i
                if free:
                    run.values[i] = None
                    if n.z_input in run.free_z and n.z_input not in wanted:
                        run.values[n.z_input] = None
                _add(field, n.z_input, from_nchw(gz, lay, z.shape))
                del z, a, gz
            else:
                if e is not None:
                    v = run.value(i)
                    f = relevance_to_field(e, v, n.layout)
                    g_i = f if g_i is None else g_i + f
                    if run.lost is not None:
                        v4 = to_nchw(v, n.layout)
                        run.note_lost(torch.where((v4 * v4).sum(1) > 0, 0, e).sum((1, 2)))
                if i in wanted:
                    out[i] = pixel_sum(run.value(i) * g_i, n.layout)
                for j, f in n.rule.vjp(n, g_i, run):
                    _add(field, j, f)
                if with_bias:
                    for j, r in n.rule.bias(n, g_i, run):
                        _add(extra, j, r)
            if free:
                run.values[i] = None
            if i == lowest:
                break
        return out

    def _head_grad(self, run: _Run, weights: Tensor, stop: int) -> Tensor:
        """Gradient of ``sum(weights * logits)`` at node ``stop`` (the encoder output)."""
        g = run.graph
        field: Dict[int, Any] = {g.output_index: weights}
        for i in range(g.output_index, stop - 1, -1):
            gi = field.pop(i, None)
            if gi is None:
                continue
            if i == stop:
                return gi
            n = g.nodes[i]
            if n.kind == "output":
                _add(field, n.inputs[0], gi)
                continue
            for j, gr in n.rule.grad(n, gi, run):
                if g.nodes[j].data and j >= stop:
                    _add(field, j, gr)
        return torch.zeros_like(run.value(stop))

    def initial_relevance(self, run: _Run, plan: _Plan, target: Tensor, init: Init) -> Tensor:
        """Relevance (B, H_L, W_L) at the encoder output (Eq. 4 and the alternatives)."""
        g = run.graph
        L = plan.encoder
        A = to_nchw(run.value(L), g.nodes[L].layout)
        b, _, h, w = A.shape
        if isinstance(init, Tensor):
            r = init.to(device=A.device, dtype=A.dtype)
            if r.dim() == 2:
                r = r.expand(b, -1, -1)
            if tuple(r.shape) != (b, h, w):
                raise ValueError(
                    f"init tensor must have shape ({b}, {h}, {w}) or ({h}, {w}) "
                    f"(the encoder output '{g.display_name(L)}'), got {tuple(init.shape)}"
                )
            return r
        if init == "constant":
            return A.new_ones((b, h, w))
        if init == "cam":
            return self._cam(run, plan, target, A)
        logits = run.value(g.output_index)
        k = logits.shape[-1]
        weights = F.one_hot(target, k).to(A.dtype)
        if init == "gradcam-contrast":
            weights = weights - 1.0 / k
        grad = to_nchw(self._head_grad(run, weights, L), g.nodes[L].layout)
        alpha = grad.mean((2, 3))
        return F.relu(torch.einsum("bc,bchw->bhw", alpha, A))

    def _cam(self, run: _Run, plan: _Plan, target: Tensor, A: Tensor) -> Tensor:
        g = run.graph
        chain, i = [], g.nodes[g.output_index].inputs[0]
        while i != plan.encoder:
            n = g.nodes[i]
            if n.kind != "call" or len(n.field_inputs) != 1:
                break
            chain.append(n)
            i = n.field_inputs[0]
        kinds = [
            type(n.rule).__name__
            for n in reversed(chain)
            if not (n.rule.identity_like or getattr(n.rule, "view_like", False))
        ]
        pool = next((n for n in chain if n.rule.global_pool(n)), None)
        lin = next((n for n in chain if n.op_name == "aten.linear"), None)
        if i != plan.encoder or pool is None or lin is None or len(kinds) != 2:
            raise ValueError(
                "init='cam' needs a global-average-pool + linear head right after the "
                f"encoder output; this model's head is {kinds}. Use 'gradcam-contrast'."
            )
        h, w = A.shape[-2:]
        wt = run.value(lin.params["w"])[target]  # (B, C)
        cam = torch.einsum("bc,bchw->bhw", wt, A)
        if lin.params["b"] is not None:
            cam = cam + run.value(lin.params["b"])[target].view(-1, 1, 1)
        return cam / (h * w)

    # -- public -----------------------------------------------------------------------------
    @_own_precision
    def explain(
        self,
        x: Tensor,
        target: Target = None,
        *,
        layer: Union[str, Sequence[str]] = "input",
        upsample: bool = False,
        init: Optional[Init] = None,
        return_logits: bool = False,
        create_graph: bool = False,
    ):
        """SRD relevance maps of ``x`` (B, C, H, W) for ``target``.

        Returns (B, H_l, W_l) for one layer, or a dict name -> map for a list of layers (all from
        one pass); with ``upsample=True`` every map is bilinearly resized to (H, W). With
        ``return_logits=True`` also the model's logits. ``create_graph=True`` records the
        computation for autograd (the maps and logits can then be differentiated with respect to
        the input and the parameters); otherwise they are detached and nothing is saved for
        backward.
        """
        self._check_input(x)
        names = [layer] if isinstance(layer, str) else list(layer)
        if not names:
            raise ValueError("layer list is empty")
        with torch.set_grad_enabled(bool(create_graph)):
            g = self.graph(x)
            plan = self._plan(g)
            idx = [self._resolve(g, plan, n) for n in names]
            run = self._forward(g, plan, x, idx, create_graph)
            logits = run.value(g.output_index)
            t = self._targets(target, logits)
            if x.shape[0] == 0:  # an empty batch: empty maps of each layer's size
                maps = {i: x.new_zeros((0,) + _hw(g.nodes[i])) for i in idx}
            else:
                r0 = self.initial_relevance(run, plan, t, self.init if init is None else init)
                maps = self._walk(run, {plan.encoder: r0}, idx, free=True)
                for i in idx:
                    if i not in maps:  # no relevance reached it
                        maps[i] = x.new_zeros((x.shape[0],) + _hw(g.nodes[i]))
            result = {}
            for n, i in zip(names, idx):
                m = maps[i]
                if upsample and tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
                    m = F.interpolate(m.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(
                        1
                    )
                result[n] = m
        out = result[names[0]] if isinstance(layer, str) else result
        if return_logits:
            return out, logits
        return out

    __call__ = explain

    @_own_precision
    def relevance_at_all_layers(
        self, x: Tensor, target: Target = None, init: Optional[Init] = None, create_graph: bool = False
    ) -> Dict[str, Tensor]:
        """Relevance at the input and at every decomposition site and every node all paths pass
        through, up to the encoder output, keyed by layer name (one pass)."""
        self._check_input(x)
        with torch.set_grad_enabled(bool(create_graph)):
            g = self.graph(x)
            plan = self._plan(g)
            idx = self.layer_indices(x)
            run = self._forward(g, plan, x, idx, create_graph)
            t = self._targets(target, run.value(g.output_index))
            r0 = self.initial_relevance(run, plan, t, self.init if init is None else init)
            maps = self._walk(run, {plan.encoder: r0}, idx)
            maps[plan.encoder] = r0
        return {g.display_name(i): maps[i] for i in idx if i in maps}

    @_own_precision
    def relevance_budget(self, x: Tensor, target: Target = None, init: Optional[Init] = None) -> Dict[str, Tensor]:
        """Where the relevance went, per sample (B,): ``"encoder"`` (the initial relevance),
        ``"input"`` (the map at the image) and ``"unassigned"`` (bias shares of output pixels
        none of whose inputs contributes, and relevance at pixels whose vector is zero: no pixel
        can carry it). ``encoder = input + unassigned`` up to rounding: SRD conserves relevance."""
        self._check_input(x)
        with torch.no_grad():
            g = self.graph(x)
            plan = self._plan(g)
            run = self._forward(g, plan, x, [g.input_index], False)
            t = self._targets(target, run.value(g.output_index))
            r0 = self.initial_relevance(run, plan, t, self.init if init is None else init)
            run.lost = r0.new_zeros(r0.shape[0])
            r = self._walk(run, {plan.encoder: r0}, [g.input_index])[g.input_index]
        return {"encoder": r0.sum((1, 2)), "input": r.sum((1, 2)), "unassigned": run.lost}

    def layer_indices(self, x: Tensor) -> List[int]:
        """Node indices of the input, every site and every node all paths pass through, up to the
        encoder output (the layers of :meth:`relevance_at_all_layers`)."""
        g = self.graph(x)
        plan = self._plan(g)
        return [g.input_index] + [
            i
            for i in sorted(plan.main)
            if g.nodes[i].kind == "call"
            and g.nodes[i].layout is not None
            and not g.nodes[i].is_tuple
            and (g.nodes[i].site or i in g.cuts)
        ]

    @_own_precision
    def erf(self, x: Tensor, layer: str, position) -> Tensor:
        """Effective receptive field of the PFV at ``position`` (y, x) of ``layer``: the input map
        (B, H, W) reached by a unit relevance there (Eq. 1-2; the backward form of Appendix C)."""
        self._check_input(x)
        with torch.no_grad():
            g = self.graph(x)
            plan = self._plan(g)
            i = self._resolve(g, plan, layer)
            run = self._forward(g, plan, x, [i, g.input_index], False)
            h, w = _hw(g.nodes[i])
            py, px = position
            if not (0 <= py < h and 0 <= px < w):
                raise ValueError(f"position {tuple(position)} outside layer {layer!r} of size ({h}, {w})")
            seed = x.new_zeros((x.shape[0], h, w))
            seed[:, py, px] = 1.0
            return self._walk(run, {i: seed}, [g.input_index])[g.input_index]


def _hw(node) -> tuple:
    b, h, w = node.layout
    return (node.shape[h], node.shape[w])


def explain(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    layer: Union[str, Sequence[str]] = "input",
    init: Init = "gradcam-contrast",
    bias_share: str = "contribution",
    upsample: bool = False,
    encoder: Optional[str] = None,
    create_graph: bool = False,
):
    """SRD explanation of ``x`` (B, C, H, W) by ``model``: (B, H_l, W_l) relevance maps.

    ``target``: int, per-sample LongTensor, or None (predicted class). See :class:`Explainer`
    for ``layer``, ``init``, ``bias_share`` and ``encoder``. The model's capture is cached per
    model and input shape, so repeated calls do not trace it again.
    """
    return Explainer(model, init=init, bias_share=bias_share, encoder=encoder).explain(
        x, target, layer=layer, upsample=upsample, create_graph=create_graph
    )


def erf(model: nn.Module, x: Tensor, layer: str, position, *, bias_share: str = "contribution") -> Tensor:
    """Effective receptive field (B, H, W) of the PFV at ``position`` of ``layer`` (Eq. 1-2)."""
    return Explainer(model, bias_share=bias_share).erf(x, layer, position)
