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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import layers
from .capture import Graph, graph_for, signature_of, unwrap
from .checks import Target, check_input, class_targets
from .initial import INITS, Init, ZeroRelevanceWarning, initial_relevance, warn_if_zero
from .rules import BIAS_SHARES
from .walk import Plan, Run, forward, walk, walk_seeds

__all__ = ["Explainer", "Decomposition", "explain", "erf", "INITS", "ZeroRelevanceWarning"]


class Decomposition(NamedTuple):
    """One PFV's relevance decomposed into the PFVs of a lower layer
    (:meth:`Explainer.decompose`): ``contributions`` (B, H, W) at that layer, ``unassigned`` (B,)
    the bias shares no PFV there carries, ``relevance`` (B,) the PFV's relevance;
    ``contributions.sum((1, 2)) + unassigned == relevance``."""

    contributions: Tensor
    unassigned: Tensor
    relevance: Tensor


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
# Explainer
# --------------------------------------------------------------------------------------------
class Explainer:
    """SRD explainer of one model; the model is captured once per input signature and reused.

    Args:
        model: a CNN or vision transformer classifier (torchvision, timm or your own; also
            inside ``torch.compile``, DataParallel or DistributedDataParallel); never modified,
            and its live parameters are read at every call.
        init: initial relevance at the encoder output: "gradcam-contrast" (Eq. 4, default),
            "gradcam", "cam" (per-position logit of a global-average-pool + linear head),
            "constant" (all ones, Sec. 4.3) or a tensor (B, H_L, W_L) / (H_L, W_L).
        bias_share: "contribution" (default: a bias is shared by ``||W_t x_i||``), "input"
            (Eq. 11: by ``||x_i||``) or "none" (biases dropped; relevance not conserved).
        encoder: layer name of the encoder output (default: see :func:`default_encoder`; e.g.
            ``layer4`` of a ResNet, ``features.29`` of VGG16, ``norm`` of a timm ViT). Maps of a
            token layer are on its patch grid (B, h, w); the class token's relevance is
            unassigned (docs/math.md, "Tokens and attention").

    Layers are named by "input", "low" (the encoder output), "high" (the last layer every path
    passes through at 1/8 of the input resolution: 28x28 for a 224 input; a plain vision
    transformer's patch embedding), a module path
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
        if torch.compiler.is_compiling():
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

    def _plan(self, g: Graph) -> Plan:
        """The plan for this explainer's encoder on graph ``g`` (kept on the graph, shared by
        every explainer of the model)."""
        p = g.plans.get(self.encoder_name)
        if p is None:
            name = self.encoder_name
            enc = layers.default_encoder(g) if name is None else layers.encoder_node(g, name)
            p = g.plans[self.encoder_name] = Plan(g, enc)
        return p

    # -- layer names ------------------------------------------------------------------------
    def layer_names(self, x: Optional[Tensor] = None) -> List[str]:
        """Names accepted by ``layer`` for inputs shaped like ``x`` (default: the last input
        explained): "input", "low", "high", then every decomposition site and every node all
        paths pass through, by module path where one outputs it."""
        g = self.graph(x) if x is not None else self._last
        if g is None:
            raise ValueError(
                "layer_names needs an input shape: pass an example x (the model is captured per input shape)"
            )
        return layers.layer_names(g, self._plan(g))

    def encoder_layer(self, x: Tensor) -> str:
        """Name of the encoder output for inputs shaped like ``x``."""
        g = self.graph(x)
        return g.display_name(self._plan(g).encoder)

    def _resolve(self, g: Graph, plan: Plan, layer) -> int:
        return layers.resolve(g, plan, layer)

    def layer_indices(self, x: Tensor) -> List[int]:
        """Node indices of the input, every site and every node all paths pass through, up to the
        encoder output (the layers of :meth:`relevance_at_all_layers`)."""
        g = self.graph(x)
        return [g.input_index] + layers.layer_indices(g, self._plan(g))

    # -- passes -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        check_input(self.model, x)

    def _forward(self, g: Graph, plan: Plan, x: Tensor, wanted, create_graph: bool) -> Run:
        return forward(g, plan, x, wanted, model=self.model, bias_share=self.bias_share, create_graph=create_graph)

    def _start(self, x: Tensor, wanted_layers, target: Target, create_graph: bool):
        """Capture (cached), forward and targets: what every explanation begins with. Returns
        the graph, its plan, the wanted node indices (``wanted_layers(graph, plan)``), the run and
        the targets (B,)."""
        g = self.graph(x)
        plan = self._plan(g)
        idx = wanted_layers(g, plan)
        run = self._forward(g, plan, x, idx, create_graph)
        logits = run.value(g.output_index)
        t = class_targets(target, logits.shape[0], logits.device, logits.shape[-1])
        return g, plan, idx, run, logits.argmax(-1) if t is None else t

    def _initial(self, run: Run, plan: Plan, target: Tensor, init: Optional[Init]) -> Tensor:
        init = self.init if init is None else init
        r0 = initial_relevance(run, plan, target, init)
        warn_if_zero(r0, init)  # such samples get all-zero maps, named in a ZeroRelevanceWarning
        return r0

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

            def wanted(g, plan):
                return [layers.resolve(g, plan, n) for n in names]

            g, plan, idx, run, t = self._start(x, wanted, target, create_graph)
            maps = {}
            if x.shape[0]:  # an empty batch gets empty maps of each layer's size
                maps = walk(run, {plan.encoder: self._initial(run, plan, t, init)}, idx, free=True)
            result = {}
            for n, i in zip(names, idx):
                m = maps.get(i)
                if m is not None:
                    m = layers.to_map(g.nodes[i], m)
                if m is None:  # an empty batch, or no relevance reached the layer
                    m = x.new_zeros((x.shape[0],) + layers.hw(g.nodes[i]))
                if upsample and tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
                    m = F.interpolate(m.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
                    m = m.squeeze(1)
                result[n] = m
            logits = run.value(g.output_index)
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
        g, maps = self._all_layers(x, target, init, create_graph)
        return {g.display_name(i): layers.to_map(g.nodes[i], r) for i, r in maps.items()}

    def _all_layers(self, x, target, init, create_graph):
        """The graph and the relevance at every layer by node index, as the walk holds it (a
        token sequence's (B, N, 1), its class token included)."""
        self._check_input(x)
        with torch.set_grad_enabled(bool(create_graph)):

            def wanted(g, plan):
                return [g.input_index] + layers.layer_indices(g, plan)

            g, plan, idx, run, t = self._start(x, wanted, target, create_graph)
            r0 = self._initial(run, plan, t, init)
            maps = walk(run, {plan.encoder: r0}, idx)
            maps[plan.encoder] = r0
        return g, {i: maps[i] for i in idx if i in maps}

    @_own_precision
    def relevance_budget(self, x: Tensor, target: Target = None, init: Optional[Init] = None) -> Dict[str, Tensor]:
        """Where the relevance went, per sample (B,): ``"encoder"`` (the initial relevance),
        ``"input"`` (the map at the image) and ``"unassigned"`` (bias shares of output pixels
        none of whose inputs contributes, and relevance at pixels whose vector is zero: no pixel
        can carry it). ``encoder = input + unassigned`` up to rounding: SRD conserves relevance."""
        self._check_input(x)
        with torch.no_grad():
            g, plan, _, run, t = self._start(x, lambda g, plan: [g.input_index], target, False)
            r0 = self._initial(run, plan, t, init)
            run.lost = r0.new_zeros(r0.shape[0])
            r = walk(run, {plan.encoder: r0}, [g.input_index])[g.input_index]
        return {"encoder": r0.sum((1, 2)), "input": r.sum((1, 2)), "unassigned": run.lost}

    @_own_precision
    def erf(self, x: Tensor, layer: str, position) -> Tensor:
        """Effective receptive field of the PFV at ``position`` (y, x) of ``layer``: the input map
        (B, H, W) reached by a unit relevance there (Eq. 1-2; the backward form of Appendix C).
        It is :meth:`decompose` into the input from a unit start."""
        return self.decompose(x, layer, position, into="input", relevance=1.0).contributions

    @_own_precision
    def decompose(
        self,
        x: Tensor,
        layer: str,
        position: Tuple[int, int],
        *,
        into: Optional[str] = None,
        target: Target = None,
        relevance: Union[None, float, Tensor] = None,
        init: Optional[Init] = None,
    ) -> Decomposition:
        """The relevance of the PFV at ``position`` (y, x) of ``layer`` decomposed into the PFVs of
        the lower layer ``into`` (default: the next decomposition site down that all its relevance
        passes through): the relevance each of them shares with it (``mu[i -> j] R_j`` summed over
        every path from i to j), and the unassigned bias share. ``relevance``: the PFV's relevance
        (a number or (B,)); by default its relevance in the explanation of ``target`` (the map of
        ``explain(x, target, layer=layer)`` at ``position``). Returns a :class:`Decomposition`."""
        self._check_input(x)
        with torch.no_grad():
            g = self.graph(x)
            plan = self._plan(g)
            i = layers.resolve(g, plan, layer)
            k = self._into(g, plan, i, layer, into)
            pos = _position(g, i, layer, position)
            if relevance is None:
                _, _, _, run, t = self._start(x, lambda g, plan: [i, k], target, False)
                r0 = self._initial(run, plan, t, init)
                r_layer = r0 if i == plan.encoder else walk(run, {plan.encoder: r0}, [i])[i]
                r = layers.to_map(g.nodes[i], r_layer)[:, pos[0], pos[1]]
            else:
                run = self._forward(g, plan, x, [i, k], False)
                r = torch.as_tensor(relevance, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
            positions = torch.tensor([pos], device=x.device).expand(x.shape[0], 2)
            maps, lost = walk_seeds(run, i, layers.one_hot(run, i, positions, r), [k])
            raw = maps.get(k)
            m = (
                layers.to_map(g.nodes[k], raw)
                if raw is not None
                else x.new_zeros((x.shape[0],) + layers.hw(g.nodes[k]))
            )
            off = raw.flatten(1).sum(1) - m.sum((1, 2)) if raw is not None else r * 0  # at a class token
            unassigned = lost.get(k, r * 0) + off if self.bias_share != "none" else r - m.sum((1, 2))
        return Decomposition(m, unassigned, r)

    def _into(self, g: Graph, plan: Plan, i: int, layer: str, into: Optional[str]) -> int:
        if i == g.input_index:  # an image pixel decomposes only into itself
            if into is None or layers.resolve(g, plan, into) == i:
                return i
            raise ValueError("layer='input' has no lower layer to decompose into")
        if into is None:
            return layers.next_below(g, plan, i)
        k = layers.resolve(g, plan, into)
        if k >= i or not layers.passes_through(g, i, k):
            ok = [g.display_name(j) for j in layers.layer_indices(g, plan) if j < i and layers.passes_through(g, i, j)]
            raise ValueError(
                f"into={into!r} is not below layer {layer!r} on every path of its relevance; "
                f"layers it can be decomposed into: {ok + ['input']}"
            )
        return k


def _position(g: Graph, i: int, layer: str, position) -> Tuple[int, int]:
    h, w = layers.hw(g.nodes[i])
    py, px = (int(p) for p in position)
    if not (0 <= py < h and 0 <= px < w):
        raise ValueError(f"position {tuple(position)} outside layer {layer!r} of size ({h}, {w})")
    return py, px


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
