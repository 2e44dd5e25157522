"""The pytorch-grad-cam baselines: FullGrad and the CAM family at SRD's "low" / "high" layers."""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..explain import Explainer
from ._common import note, require
from .cache import cached

__all__ = ["CAM_BATCH", "cam_layers", "cam", "fullgrad"]

CAM_BATCH = 64  # masked / ablated images per forward in ScoreCAM and AblationCAM


def _module_of_node(ex: Explainer, x: Tensor, index: int) -> str:
    """Path of the outermost module whose (single) call outputs node ``index``."""
    g = ex.graph(x)
    path = g.module_of(index)
    if path is None:
        raise ValueError(
            f"no module of {type(ex.model).__name__} outputs the layer "
            f"'{g.display_name(index)}' alone; CAM methods need one to hook"
        )
    return path


def cam_layers(model: nn.Module, x: Tensor) -> Dict[str, str]:
    """Module paths hooked by the CAM methods: {"low": ..., "high": ...}, the modules that output
    SRD's "low" (encoder output) and "high" (1/8 input resolution) layers for inputs shaped
    like ``x``. Uses the model's cached capture (:mod:`srd_ext.capture`)."""
    ex = Explainer(model)
    probe = x[:1].detach()
    g = ex.graph(probe)
    plan = ex._plan(g)
    return {
        "low": _module_of_node(ex, probe, plan.encoder),
        "high": _module_of_node(ex, probe, ex._resolve(g, plan, "high")),
    }


def _cam_copy(model):
    net = copy.deepcopy(model)
    # The CAM methods need gradients of activations only: the input carries the graph instead.
    net.requires_grad_(False)
    return net, []


def _run_cam(cam_obj, x: Tensor, target: Tensor):
    targets_mod = require("pytorch_grad_cam.utils.model_targets")
    targets = [targets_mod.ClassifierOutputTarget(int(t)) for t in target]
    # Not ``with cam``: its __exit__ swallows IndexError.
    try:
        with _quiet_cam_loops(), torch.enable_grad():
            return cam_obj(x.detach().clone().requires_grad_(True), targets=targets)
    finally:
        cam_obj.activations_and_grads.release()


@contextlib.contextmanager
def _quiet_cam_loops() -> Iterator[None]:
    # ScoreCAM / AblationCAM draw a tqdm bar per image; the evaluation has its own.
    import types

    mods = [require(f"pytorch_grad_cam.{m}") for m in ("score_cam", "ablation_cam")]
    shim = types.SimpleNamespace(tqdm=lambda it, *a, **k: it)
    saved = [m.tqdm for m in mods]
    for m in mods:
        m.tqdm = shim
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.tqdm = s


_NATIVE_CLASSES: Dict[str, type] = {}


def _native_cam_class(name: str) -> type:
    """pytorch-grad-cam's class ``name`` returning the layer-resolution map (its ReLU kept,
    its min-max scaling and resize skipped)."""
    if name not in _NATIVE_CLASSES:
        base = getattr(require("pytorch_grad_cam"), name)

        class Native(base):
            def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
                ag = self.activations_and_grads
                acts = [a.cpu().data.numpy() for a in ag.activations]
                grads = [g.cpu().data.numpy() for g in ag.gradients]
                cam = self.get_cam_image(
                    input_tensor,
                    self.target_layers[0],
                    targets,
                    acts[0] if acts else None,
                    grads[0] if grads else None,
                    eigen_smooth,
                )
                return [np.maximum(cam, 0)]

            def aggregate_multi_layers(self, cam_per_target_layer):
                return cam_per_target_layer[0]

        Native.__name__ = Native.__qualname__ = f"Native{name}"
        _NATIVE_CLASSES[name] = Native
    return _NATIVE_CLASSES[name]


def cam(model, x, target, cls: str, layer: str, method: str, **_):
    net, changes = cached(model, "cam", lambda: _cam_copy(model))
    path = cam_layers(model, x)[layer]
    note(method, model, f"ran on a deep copy, target layer '{path}'", changes)
    kwargs = {}
    if cls == "AblationCAM":
        # A fresh ablation layer: the library's default instance is shared and stateful.
        kwargs["ablation_layer"] = require("pytorch_grad_cam").AblationLayer()
        kwargs["batch_size"] = CAM_BATCH
    cam_obj = _native_cam_class(cls)(net, [net.get_submodule(path)], **kwargs)
    if cls == "ScoreCAM":
        cam_obj.batch_size = CAM_BATCH
    return _run_cam(cam_obj, x, target)


def fullgrad(model, x, target, **_):
    pgc = require("pytorch_grad_cam")
    net, changes = cached(model, "cam", lambda: _cam_copy(model))
    note("fullgrad", model, "ran on a deep copy", changes)
    return _run_cam(pgc.FullGrad(net, []), x, target)
