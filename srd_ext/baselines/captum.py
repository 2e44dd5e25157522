"""The captum baselines: Saliency, GuidedBackprop, GradInput, IntegratedGradients, LRP z+ and
SmoothGrad, reduced over channels as in each method's paper (see :mod:`srd_ext.baselines`)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ._common import NOTES, captum_input, note, require
from .adapt import fx_adapt, has_functional_relu, lrp_copy
from .cache import cached

__all__ = [
    "IG_STEPS",
    "SMOOTHGRAD_SAMPLES",
    "SMOOTHGRAD_NOISE",
    "saliency",
    "grad_input",
    "integrated_gradients",
    "smoothgrad",
    "guided_backprop",
    "lrp",
]

# Defaults sized for a CPU evaluation budget (benchmarks/eval_table.py); override with get(...).
IG_STEPS = 32  # captum's default is 50 (Gauss-Legendre points)
SMOOTHGRAD_SAMPLES = 16  # Smilkov et al. use up to 50, with diminishing returns
SMOOTHGRAD_NOISE = 0.15  # std as a fraction of each image's (max - min), Smilkov et al. 10-20%


def saliency(model, x, target, **_):
    attr = require("captum.attr")
    with torch.enable_grad():
        a = attr.Saliency(model).attribute(captum_input(x), target=target, abs=True)
    return a.amax(1)


def grad_input(model, x, target, **_):
    attr = require("captum.attr")
    with torch.enable_grad():
        a = attr.InputXGradient(model).attribute(captum_input(x), target=target)
    return a.sum(1)


def integrated_gradients(model, x, target, n_steps: int = IG_STEPS, **_):
    attr = require("captum.attr")
    with torch.enable_grad():
        a = attr.IntegratedGradients(model).attribute(
            captum_input(x), baselines=0.0, target=target, n_steps=n_steps, internal_batch_size=max(n_steps, 1) * 4
        )
    return a.sum(1)


def smoothgrad(model, x, target, n_samples: int = SMOOTHGRAD_SAMPLES, noise: float = SMOOTHGRAD_NOISE, **_):
    attr = require("captum.attr")
    nt = attr.NoiseTunnel(attr.Saliency(model))
    out = []
    # Per image: the noise level is a fraction of that image's value range.
    with torch.enable_grad():
        for i in range(x.shape[0]):
            xi = captum_input(x[i : i + 1])
            std = float(noise * (x[i].max() - x[i].min()))
            a = nt.attribute(
                xi,
                nt_type="smoothgrad",
                nt_samples=n_samples,
                nt_samples_batch_size=n_samples,
                stdevs=std,
                target=target[i : i + 1],
                abs=True,
            )
            out.append(a.amax(1))
    return torch.cat(out) if out else x.new_zeros((0,) + tuple(x.shape[-2:]))


def guided_backprop(model, x, target, **_):
    attr = require("captum.attr")

    def build():
        if not has_functional_relu(model):
            return None
        return fx_adapt(model)

    adapted = cached(model, "guided", build)
    if adapted is None:
        net = model
        NOTES.pop("guided-backprop", None)
    else:
        net, changes = adapted
        note("guided-backprop", model, "ran on an fx deep copy", changes)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        a = attr.GuidedBackprop(net).attribute(captum_input(x), target=target)
    return a.sum(1)


def lrp(model, x, target, **_):
    attr = require("captum.attr")
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    net, changes = cached(model, "lrp", lambda: lrp_copy(model))
    note(
        "lrp-z+", model, "ran on an fx deep copy; Alpha1_Beta0 (z+, bias 0) on Conv2d, Epsilon 1e-9 elsewhere", changes
    )
    # captum deletes the rules after every call.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
    with torch.enable_grad():
        a = attr.LRP(net).attribute(captum_input(x), target=target)
    return a.sum(1)
