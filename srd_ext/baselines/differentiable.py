"""Guided backprop and LRP z+ maps that can themselves be differentiated with respect to the input.

captum's guided backprop and LRP rescale gradients in hooks on detached activations, so their maps
have no derivative. An attack on explanations (Dombrowski et al. 2019; ``benchmarks/manipulation.py``)
needs one. Written as hooks or custom autograd Functions on the network, a modified backward rule
would also be what a second derivative uses for the forward pass itself, which is then wrong. So
the graph is run twice side by side (:func:`run_two_chains`): a "real" chain (the network's values,
plain autograd) and a "relevance" chain whose gradient is the modified backward. The relevance
chain reads the real chain's values where the rule needs them, so the second derivative flows
through real operations only.

On a ReLU network :class:`LRPZPlus` gives captum's LRP z+ map (``baselines.get("lrp-z+")``) and
:class:`GuidedBackprop` with a very sharp softplus captum's guided backprop. With ``beta > 0`` both
run on a copy whose ReLUs are Softplus(beta) (:func:`smooth_copy`): on a ReLU network the gradient
of a gradient map with respect to the input vanishes almost everywhere.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapt import fx_adapt, lrp_copy

__all__ = ["smooth_copy", "run_two_chains", "GuidedBackprop", "LRPZPlus"]


def smooth_copy(model: nn.Module, beta: float) -> torch.fx.GraphModule:
    """Deep copy of ``model`` (fx-traced, one module per ReLU call) with every ReLU replaced by
    Softplus(beta); parameters frozen, the model itself untouched."""
    return _softplus(fx_adapt(model)[0], beta)


def _softplus(gm: torch.fx.GraphModule, beta: float) -> torch.fx.GraphModule:
    for name, m in list(gm.named_modules()):
        if beta and type(m) is nn.ReLU:
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.Softplus(beta=beta))
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()


def run_two_chains(
    gm: torch.fx.GraphModule, x_real: torch.Tensor, x_rel: torch.Tensor, module_rule: Callable
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Evaluates ``gm`` on (real, relevance) pairs. ``module_rule(module, real_args, rel_args)``
    returns the pair for a module call, or None for the default (the module on both chains);
    functions and methods are applied to both chains."""
    from torch.fx.node import map_arg

    mods = dict(gm.named_modules())
    env: Dict[torch.fx.Node, Tuple] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = (x_real, x_rel)
            continue
        if n.op == "output":
            return map_arg(n.args[0], lambda a: env[a][0]), map_arg(n.args[0], lambda a: env[a][1])
        ra, rk = map_arg((n.args, n.kwargs), lambda a: env[a][0])
        la, lk = map_arg((n.args, n.kwargs), lambda a: env[a][1])
        if n.op == "call_module":
            m = mods[n.target]
            pair = module_rule(m, ra, la)
            env[n] = pair if pair is not None else (m(*ra, **rk), m(*la, **lk))
        elif n.op == "call_function":
            env[n] = (n.target(*ra, **rk), n.target(*la, **lk))
        elif n.op == "call_method":
            env[n] = (getattr(ra[0], n.target)(*ra[1:], **rk), getattr(la[0], n.target)(*la[1:], **lk))
        elif n.op == "get_attr":
            v = operator.attrgetter(n.target)(gm)
            env[n] = (v, v)
        else:
            raise NotImplementedError(f"run_two_chains: fx node kind {n.op!r} ({n.name})")
    raise RuntimeError("graph without output")


class _GuidedFn(torch.autograd.Function):
    """Relevance-chain activation of guided backprop: value softplus(z_real); backward passes
    only positive gradients, times the real derivative sigmoid(beta z_real), to the relevance
    input (none to the real chain)."""

    @staticmethod
    def forward(ctx, u, z, beta):
        ctx.save_for_backward(z)
        ctx.beta = beta
        return F.softplus(z, beta=beta)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g.clamp(min=0) * torch.sigmoid(ctx.beta * z), None, None


class GuidedBackprop:
    """Guided backprop (signed channel sum) of the softplus copy, differentiable w.r.t. x.
    ``GuidedBackprop(model, beta)(x, target) -> (map (B, H, W), logits)``."""

    def __init__(self, model: nn.Module, beta: float):
        self.gm, self.beta = smooth_copy(model, beta), beta

    def _rule(self, m, ra, la):
        if isinstance(m, nn.Softplus):
            return m(*ra), _GuidedFn.apply(la[0], ra[0], self.beta)
        return None

    def __call__(self, x, t, create_graph=False):
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            u = xr.detach().requires_grad_(True)  # same values, own graph
            out, rel = run_two_chains(self.gm, xr, u, self._rule)
            (g,) = torch.autograd.grad(rel.gather(1, t[:, None]).sum(), u, create_graph=create_graph)
        return g.sum(1), out


# LRP z+ (captum's rules, as ``baselines``). Each rule layer with inputs a maps the relevance
# chain u -> rho(a * u) / stab(rho(a)) (rho: the layer with the rule's weights). Its
# vector-Jacobian product is captum's rule a * J_rho^T (g / stab(rho(a))), the chain stays at
# u = 1, and activations pass u through (relevance is not gated).
_STAB = 1e-9  # captum's stabilizer for every rule


def _stab(z):
    return z + torch.where(z >= 0, _STAB, -_STAB)


class LRPZPlus:
    """LRP z+ map (signed channel sum) and logits, on the softplus copy when beta > 0. On a ReLU
    network (beta 0) it equals ``baselines.get("lrp-z+")``.
    ``LRPZPlus(model, beta)(x, target) -> (map (B, H, W), logits)``."""

    def __init__(self, model: nn.Module, beta: float = 0.0):
        from captum.attr._utils.custom_modules import Addition_Module

        self.gm = _softplus(lrp_copy(model)[0], beta)
        self.rules = (
            nn.Conv2d,
            nn.Linear,
            nn.MaxPool2d,
            nn.AvgPool2d,
            nn.AdaptiveAvgPool2d,
            nn.BatchNorm2d,
            Addition_Module,
        )

    @staticmethod
    def _rho(m):
        if isinstance(m, nn.Conv2d):  # z+: positive weights, zero bias
            w = m.weight.clamp(min=0)
            return lambda a: m._conv_forward(a, w, None)
        return m

    def _rule(self, m, ra, la):
        if isinstance(m, self.rules):
            rho = self._rho(m)
            return m(*ra), rho(*(a * u for a, u in zip(ra, la))) / _stab(rho(*ra))
        if isinstance(m, (nn.ReLU, nn.Softplus)):
            return m(*ra), la[0]
        return None

    def __call__(self, x, t, create_graph=False):
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            u = torch.ones_like(xr, requires_grad=True)
            out, rel = run_two_chains(self.gm, xr, u, self._rule)
            (g,) = torch.autograd.grad(rel.gather(1, t[:, None]).sum(), u, create_graph=create_graph)
        return (g * out.gather(1, t[:, None]).view(-1, 1, 1, 1)).sum(1), out
