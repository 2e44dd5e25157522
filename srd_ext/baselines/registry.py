"""The registry of the paper's comparison methods: ``get(name)(model, x, target) -> (B, H, W)``."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..checks import Target, check_images, class_targets
from ..explain import Explainer
from . import captum as _captum
from . import gradcam as _gradcam

__all__ = ["Method", "METHODS", "get", "names"]


def _targets(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    t = class_targets(target, x.shape[0], x.device)
    if t is None:
        with torch.no_grad():
            return model(x).argmax(1)
    return t


def _out(maps, x: Tensor) -> Tensor:
    if not isinstance(maps, Tensor):
        maps = torch.from_numpy(np.asarray(maps))
    return maps.detach().to(device=x.device, dtype=torch.float32)


def _srd(model, x, target, layer: str, **_):
    # Explainer(model) reuses the model's cached capture: nothing to keep here.
    with torch.no_grad():
        return Explainer(model).explain(x.detach(), target, layer=layer)


@dataclasses.dataclass(frozen=True)
class Method:
    """One attribution method: ``method(model, x, target) -> (B, H, W)``.

    name: registry key; label: the paper's row label († the encoder-output "low" layer, ‡ the
    1/8-resolution "high" layer); resolution: "input", "low" or "high"; library: what computes
    it; options: keyword arguments of the implementation (e.g. ``n_steps`` of IG)."""

    name: str
    label: str
    resolution: str
    library: str
    fn: Callable = dataclasses.field(repr=False)
    options: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __call__(self, model: nn.Module, x: Tensor, target: Target = None) -> Tensor:
        check_images(x)
        t = _targets(model, x, target)
        if x.shape[0] == 0:
            return x.new_zeros((0,) + tuple(x.shape[-2:]), dtype=torch.float32)
        return _out(self.fn(model, x, t, **self.options), x)

    def with_options(self, **options) -> "Method":
        return dataclasses.replace(self, options={**self.options, **options})


def _m(name, label, resolution, library, fn, **options) -> Method:
    return Method(name, label, resolution, library, fn, options)


def _cam(name, label, cls, layer) -> Method:
    resolution = "high" if layer == "high" else "low"
    return _m(name, label, resolution, "pytorch-grad-cam", _gradcam.cam, cls=cls, layer=layer, method=name)


_ALL = [
    _m("saliency", "Saliency", "input", "captum", _captum.saliency),
    _m("guided-backprop", "GuidedBackprop", "input", "captum", _captum.guided_backprop),
    _m("grad-input", "GradInput", "input", "captum", _captum.grad_input),
    _m("integrated-gradients", "InteGrad", "input", "captum", _captum.integrated_gradients),
    _m("lrp-z+", "LRP z+", "input", "captum", _captum.lrp),
    _m("smoothgrad", "Smoothgrad", "input", "captum", _captum.smoothgrad),
    _m("fullgrad", "Fullgrad", "input", "pytorch-grad-cam", _gradcam.fullgrad),
    _cam("gradcam", "GradCAM†", "GradCAM", "low"),
    _cam("gradcam++", "GradCAM++†", "GradCAMPlusPlus", "low"),
    _cam("scorecam", "ScoreCAM†", "ScoreCAM", "low"),
    _cam("ablationcam", "AblationCAM†", "AblationCAM", "low"),
    _cam("xgradcam", "XGradCAM†", "XGradCAM", "low"),
    _cam("layercam-low", "LayerCAM-low†", "LayerCAM", "low"),
    _cam("layercam-high", "LayerCAM-high‡", "LayerCAM", "high"),
    _m("srd-low", "SRD-low†", "low", "srd_ext", _srd, layer="low"),
    _m("srd-high", "SRD-high‡", "high", "srd_ext", _srd, layer="high"),
    _m("srd-input", "SRD-input", "input", "srd_ext", _srd, layer="input"),
]

#: Registry in the paper's row order: name -> :class:`Method`.
METHODS: "OrderedDict[str, Method]" = OrderedDict((m.name, m) for m in _ALL)


def names() -> List[str]:
    return list(METHODS)


def get(name: str, **options) -> Method:
    """Method by registry name or paper label (case-insensitive), optionally with options
    (``n_steps`` for integrated-gradients, ``n_samples`` / ``noise`` for smoothgrad)."""
    key = name.strip().lower()
    for m in METHODS.values():
        if key in (m.name, m.label.lower(), m.label.rstrip("†‡").lower()):
            return m.with_options(**options) if options else m
    raise KeyError(f"unknown method {name!r}; choose from {names()}")
