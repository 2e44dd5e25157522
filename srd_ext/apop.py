"""Activation-Pattern-Only Prediction (APOP, the paper's Sec. 1, Appendix D, Algorithm 1).

Record, during a normal forward, which linear piece every piecewise-linear activation is on
(ReLU's on/off mask; ReLU6/Hardtanh, Hardsigmoid and clamp have three pieces; LeakyReLU and
PReLU two) and every max-pool's argmax indices; then predict from the pattern alone by replaying
it on another input (zeros, ones, noise): each activation applies its recorded piece ("apop":
``x * mask`` for ReLU), or that clipped to the activation's range ("apop+relu":
``relu(x * mask)`` for ReLU, ``clamp(., 0, 6)`` for ReLU6), and each max-pool gathers at the
recorded indices. Recording and replay go
through the same capture as the SRD explainer (:mod:`srd_ext.capture`), so every model SRD
covers works, as long as its activations have a pattern: smooth activations (SiLU, GELU,
sigmoid gates, ...) have none, and are refused unless ``smooth="keep"`` computes them normally.

    with srd_ext.apop.record(model) as rec:
        logits = model(x)                      # a normal forward, patterns recorded
    out = srd_ext.apop.replay(model, rec.patterns, torch.zeros_like(x))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .capture import Graph, Instrument, graph_for, unwrap
from .nodes import Node

__all__ = [
    "ActivationPatterns",
    "record",
    "patterns_of",
    "replay",
    "binarize",
    "activation_layers",
    "REPLAY_MODES",
    "SMOOTH",
]

REPLAY_MODES = ("apop", "apop+relu")
SMOOTH = ("error", "keep")


def _pack_bits(mask: Tensor) -> Tensor:
    """bool tensor -> uint8 with 8 entries per byte (1/32 of the float32 bytes)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = 2 ** torch.arange(8, device=mask.device, dtype=torch.int16)
    return (flat.view(-1, 8).to(torch.int16) * weights).sum(1).to(torch.uint8)


def _unpack_bits(packed: Tensor, shape) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = (packed.to(torch.int16).unsqueeze(1) >> torch.arange(8, device=packed.device, dtype=torch.int16)) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


@dataclass
class ActivationPatterns:
    """The recorded pattern of one batch.

    ``pieces``: node index -> (bit-packed bool mask, shape) for two-piece activations or (uint8
    piece codes, shape) for three-piece ones; ``indices``: node index -> int32 argmax indices of
    each max-pool.
    """

    pieces: Dict[int, Tuple[Tensor, Tuple[int, ...], bool]]
    indices: Dict[int, Tensor]
    names: Dict[int, str]
    batch_shape: Tuple[int, ...]

    def piece(self, index: int) -> Tensor:
        data, shape, packed = self.pieces[index]
        return _unpack_bits(data, shape) if packed else data.view(shape)

    def mask(self, index: int) -> Tensor:
        """A two-piece activation's mask (True: the identity piece)."""
        return self.piece(index)

    @property
    def masks(self):
        return {i: v for i, v in self.pieces.items() if v[2]}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _, _ in self.pieces.values()) + sum(
            v.numel() * v.element_size() for v in self.indices.values()
        )


def _check_patterns(graph: Graph, smooth: str) -> None:
    if smooth not in SMOOTH:
        raise ValueError(f"smooth must be one of {SMOOTH}, got {smooth!r}")
    acts = graph.activation_nodes()
    pw = [n for n in acts if n.rule.piecewise_linear]
    pools = [
        n
        for n in graph.nodes
        if n.data and n.kind == "call" and n.op_name.startswith(("aten.max_pool2d", "aten.adaptive_max_pool2d"))
    ]
    if not pw and not pools:
        raise ValueError(
            f"{type(graph.model).__name__} has no piecewise-linear activation (ReLU, ReLU6, "
            "LeakyReLU, PReLU, Hardsigmoid, clamp) and no max-pool: there is no "
            "activation pattern to record"
        )
    smooth_nodes = [n for n in acts if not n.rule.piecewise_linear]
    if smooth_nodes and smooth == "error":
        listed = ", ".join(f"'{graph.display_name(n.index)}' ({n.rule.describe()})" for n in smooth_nodes[:5])
        more = f" and {len(smooth_nodes) - 5} more" if len(smooth_nodes) > 5 else ""
        raise ValueError(
            f"the activation pattern is not defined for smooth activations: {listed}{more}. APOP "
            "needs piecewise-linear activations (ReLU, ReLU6/Hardtanh, LeakyReLU, PReLU, Hardsigmoid, "
            "clamp) and max-pools; pass smooth='keep' to compute the smooth ones normally on the "
            "replayed input"
        )


class _Record(Instrument):
    def __init__(self):
        self.pieces: Dict[int, Tensor] = {}
        self.indices: Dict[int, Tensor] = {}

    def activation(self, node, z, fn, args=()):
        if node.rule.piecewise_linear:
            self.pieces[node.index] = node.rule.piece(node, z)
        return fn(z)

    def maxpool(self, node, x, fn):
        out, idx = fn(x)
        self.indices[node.index] = idx
        return out


class _Replay(Instrument):
    def __init__(self, patterns: ActivationPatterns, mode: str):
        self.patterns, self.mode = patterns, mode

    def activation(self, node, z, fn, args=()):
        if node.index not in self.patterns.pieces:
            return fn(z)
        piece = self.patterns.piece(node.index)
        out = node.rule.apply_piece(node, z, piece, args)
        if self.mode == "apop+relu":
            lo, hi = node.rule.output_range(node)
            if lo is not None or hi is not None:
                out = out.clamp(lo, hi)
        return out

    def maxpool(self, node, x, fn):
        idx = self.patterns.indices[node.index].long()
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


class _Binarize(Instrument):
    def __init__(self, index: int):
        self.index = index

    def activation(self, node, z, fn, args=()):
        a = fn(z)
        return (a > 0).to(a.dtype) if node.index == self.index else a


def _graph(model: nn.Module, x: Tensor, smooth: str = "error") -> Graph:
    g = graph_for(model, x)
    _check_patterns(g, smooth)
    return g


def _patterns(rec: _Record, graph: Graph, batch_shape) -> ActivationPatterns:
    pieces = {}
    for i, p in rec.pieces.items():
        if p.dtype == torch.bool:
            pieces[i] = (_pack_bits(p), tuple(p.shape), True)
        else:
            pieces[i] = (p.to(torch.uint8).contiguous(), tuple(p.shape), False)
    return ActivationPatterns(
        pieces=pieces,
        indices={i: v.to(torch.int32) for i, v in rec.indices.items()},
        names={i: graph.display_name(i) for i in list(rec.pieces) + list(rec.indices)},
        batch_shape=tuple(batch_shape),
    )


class _Recording:
    def __init__(self):
        self.patterns: Optional[ActivationPatterns] = None


@contextlib.contextmanager
def record(model: nn.Module, smooth: str = "error") -> Iterator[_Recording]:
    """Patch ``model`` so that its forward records the activation pattern of every call.

    Inside the block ``model(x)`` returns its usual output and leaves the pattern of that batch
    in ``rec.patterns``. On exit (also on error) the model is restored exactly.
    """
    if smooth not in SMOOTH:
        raise ValueError(f"smooth must be one of {SMOOTH}, got {smooth!r}")
    target = unwrap(model)
    rec = _Recording()
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")

    def forward(x: Tensor) -> Tensor:
        # The capture runs the model's own forward: unpatch it while capturing.
        if had_own:
            model.forward = previous
        else:
            del model.forward
        try:
            g = _graph(target, x, smooth)
        finally:
            model.forward = forward
        r = _Record()
        out = g.forward(x, r)[g.output_index]
        rec.patterns = _patterns(r, g, x.shape)
        return out

    model.forward = forward
    try:
        yield rec
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward


def patterns_of(model: nn.Module, x: Tensor, smooth: str = "error") -> Tuple[Tensor, ActivationPatterns]:
    """One recorded forward: (logits, patterns)."""
    g = _graph(model, x, smooth)
    r = _Record()
    out = g.forward(x, r)[g.output_index]
    return out, _patterns(r, g, x.shape)


def replay(model: nn.Module, patterns: ActivationPatterns, x: Tensor, mode: str = "apop") -> Tensor:
    """Forward of ``x`` with the activation pattern frozen (Algorithm 1)."""
    if mode not in REPLAY_MODES:
        raise ValueError(f"mode must be one of {REPLAY_MODES}, got {mode!r}")
    if not isinstance(patterns, ActivationPatterns):
        raise TypeError("patterns must come from srd_ext.apop.record / patterns_of")
    if tuple(x.shape) != patterns.batch_shape:
        raise ValueError(
            f"patterns were recorded for input shape {patterns.batch_shape}, "
            f"but x has shape {tuple(x.shape)}; replay on a batch of the same shape"
        )
    g = graph_for(model, x)
    return g.forward(x, _Replay(patterns, mode))[g.output_index]


def activation_layers(model: nn.Module, x: Tensor) -> List[str]:
    """Names of the model's activation layers (for inputs shaped like ``x``), in forward order."""
    g = graph_for(model, x)
    return [g.display_name(n.index) for n in g.activation_nodes()]


def binarize(model: nn.Module, x: Tensor, layer: Union[int, str]) -> Tensor:
    """Forward in which one activation's output is replaced by ``(output > 0)`` as 0/1 (Fig. 6).

    ``layer``: the position among the model's activation layers (0-based) or a layer name.
    """
    g = graph_for(model, x)
    acts: List[Node] = g.activation_nodes()
    if isinstance(layer, int):
        if not 0 <= layer < len(acts):
            raise ValueError(f"layer index {layer} out of range: the model has {len(acts)} activation layers")
        node = acts[layer]
    else:
        names = [g.display_name(n.index) for n in acts]
        found = [n for n, name in zip(acts, names) if name == layer or n.name == layer]
        if len(found) != 1:
            raise ValueError(f"layer {layer!r} names {len(found)} activation layers; choose one of {names}")
        node = found[0]
    return g.forward(x, _Binarize(node.index))[g.output_index]
