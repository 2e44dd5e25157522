"""Activation-Pattern-Only Prediction (APOP, the paper's Sec. 1, Appendix D, Algorithm 1).

Record, during a normal forward, every ReLU's on/off mask and every max-pool's argmax indices;
then predict from the pattern alone by replaying it on another input (zeros, ones, noise):
ReLU becomes ``x * mask`` ("apop") or ``relu(x * mask)`` ("apop+relu"), MaxPool gathers at the
recorded indices. Recording and replay go through the same graph capture and instrumentation as
the SRD explainer (:mod:`srd_ext.capture`).

    with srd_ext.apop.record(model) as rec:
        logits = model(x)                      # a normal forward, patterns recorded
    out = srd_ext.apop.replay(model, rec.patterns, torch.zeros_like(x))
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .capture import Instrument, Plan, Recorder, Step, capture

__all__ = ["ActivationPatterns", "record", "patterns_of", "replay", "binarize", "REPLAY_MODES"]

REPLAY_MODES = ("apop", "apop+relu")


def _pack_bits(mask: Tensor) -> Tensor:
    """bool tensor -> uint8 with 8 entries per byte (1/32 of the float32 bytes)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, device=mask.device, dtype=torch.int16))
    return (flat.view(-1, 8).to(torch.int16) * weights).sum(1).to(torch.uint8)


def _unpack_bits(packed: Tensor, shape) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = (packed.to(torch.int16).unsqueeze(1) >> torch.arange(8, device=packed.device, dtype=torch.int16)) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


@dataclass
class ActivationPatterns:
    """The recorded pattern of one batch: bit-packed ReLU masks and int32 max-pool indices.

    ``masks``: step index -> (packed uint8, shape); ``indices``: step index -> int32 tensor.
    """

    masks: Dict[int, Tuple[Tensor, Tuple[int, ...]]]
    indices: Dict[int, Tensor]
    names: Dict[int, str]
    batch_shape: Tuple[int, ...]

    @classmethod
    def from_recorder(cls, rec: Recorder, plan: Plan, batch_shape) -> "ActivationPatterns":
        return cls(masks={i: (_pack_bits(m), tuple(m.shape)) for i, m in rec.masks.items()},
                   indices={i: v.to(torch.int32) for i, v in rec.indices.items()},
                   names={i: plan.steps[i].name for i in list(rec.masks) + list(rec.indices)},
                   batch_shape=tuple(batch_shape))

    def mask(self, index: int) -> Tensor:
        packed, shape = self.masks[index]
        return _unpack_bits(packed, shape)

    def nbytes(self) -> int:
        return sum(p.numel() for p, _ in self.masks.values()) + sum(
            v.numel() * v.element_size() for v in self.indices.values())


class _Replay(Instrument):
    def __init__(self, patterns: ActivationPatterns, mode: str):
        self.patterns, self.mode = patterns, mode

    def activation(self, step: Step, z: Tensor) -> Tensor:
        if step.index not in self.patterns.masks:
            return step.activation(z)
        out = z * self.patterns.mask(step.index).to(z.dtype)
        return torch.relu(out) if self.mode == "apop+relu" else out

    def maxpool(self, step: Step, x: Tensor) -> Tensor:
        idx = self.patterns.indices[step.index].long()
        b, c = x.shape[:2]
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


class _Binarize(Instrument):
    def __init__(self, index: int):
        self.index = index

    def activation(self, step: Step, z: Tensor) -> Tensor:
        a = step.activation(z)
        return (a > 0).to(a.dtype) if step.index == self.index else a


_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> Plan:
    """The model's capture (cached per model object, dropped with the model)."""
    plan = _PLANS.get(model)
    if plan is not None:
        plan.check_eval()
        return plan
    plan = capture(model)
    plan.check_eval()
    if not any((s.kind == "act" and s.activation.kind == "relu") or s.kind == "maxpool" for s in plan.steps):
        raise ValueError(f"{type(model).__name__} has no ReLU or MaxPool2d layer: there is no "
                         "activation pattern to record")
    _PLANS[model] = plan
    return plan


class _Recording:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.patterns: Optional[ActivationPatterns] = None


@contextlib.contextmanager
def record(model: nn.Module) -> Iterator[_Recording]:
    """Patch ``model`` so that its forward records the activation pattern of every call.

    Inside the block ``model(x)`` returns its usual output and leaves the pattern of that batch
    in ``rec.patterns``. On exit (also on error) the model is restored exactly.
    """
    plan = _plan(model)
    rec = _Recording(plan)
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")

    def forward(x: Tensor) -> Tensor:
        r = Recorder(masks=True)
        out = plan.forward(x, r)[plan.output_index]
        rec.patterns = ActivationPatterns.from_recorder(r, plan, x.shape)
        return out

    model.forward = forward
    try:
        yield rec
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward


def patterns_of(model: nn.Module, x: Tensor) -> Tuple[Tensor, ActivationPatterns]:
    """One recorded forward: (logits, patterns)."""
    with record(model) as rec:
        out = model(x)
    return out, rec.patterns


def replay(model: nn.Module, patterns: ActivationPatterns, x: Tensor, mode: str = "apop") -> Tensor:
    """Forward of ``x`` with the activation pattern frozen (Algorithm 1)."""
    if mode not in REPLAY_MODES:
        raise ValueError(f"mode must be one of {REPLAY_MODES}, got {mode!r}")
    if not isinstance(patterns, ActivationPatterns):
        raise TypeError("patterns must come from srd_ext.apop.record / patterns_of")
    if tuple(x.shape) != patterns.batch_shape:
        raise ValueError(f"patterns were recorded for input shape {patterns.batch_shape}, "
                         f"but x has shape {tuple(x.shape)}; replay on a batch of the same shape")
    plan = _plan(model)
    return plan.forward(x, _Replay(patterns, mode))[plan.output_index]


def binarize(model: nn.Module, x: Tensor, layer: Union[int, str]) -> Tensor:
    """Forward in which one activation's output is replaced by ``(output > 0)`` as 0/1 (Fig. 6).

    ``layer``: the position among the model's activation layers (0-based) or a node name.
    """
    plan = _plan(model)
    acts = [s for s in plan.steps if s.kind == "act"]
    if isinstance(layer, int):
        if not 0 <= layer < len(acts):
            raise ValueError(f"layer index {layer} out of range: the model has {len(acts)} activation layers")
        step = acts[layer]
    else:
        found = [s for s in acts if s.name == layer or s.path == layer]
        if len(found) != 1:
            raise ValueError(f"layer {layer!r} names {len(found)} activation layers; choose one of "
                             f"{[s.name for s in acts]}")
        step = found[0]
    return plan.forward(x, _Binarize(step.index))[plan.output_index]


def activation_layers(model: nn.Module):
    """Node names of the model's activation layers, in forward order."""
    return [s.name for s in _plan(model).steps if s.kind == "act"]
