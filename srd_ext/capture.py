"""Graph capture: how a model is walked.

A model is traced once with ``torch.fx`` into a :class:`Plan`: a topologically ordered list of
:class:`Step` objects (conv, batch norm, activation, pooling, add, reshape, linear, ...). The plan
runs the model's forward itself (:meth:`Plan.forward`), which is where activation and max-pool
layers are instrumented: both the SRD explainer (pre-activations, max-pool indices) and APOP
(activation patterns) record and replay through the same :class:`Instrument` hooks, so module
and functional forms, in-place ReLUs and modules reused several times are all handled in one
place. Tracing does not change the model: the plan only holds references to its submodules.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Step", "Plan", "Instrument", "Recorder", "capture", "UnsupportedModelError", "SUPPORTED"]


class UnsupportedModelError(TypeError):
    """The model contains a layer SRD cannot decompose."""


SUPPORTED = (
    "Conv2d (zero padding), BatchNorm2d (eval), ReLU, LeakyReLU, ELU, SiLU, GELU, Tanh, Softplus, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, residual add, Flatten/flatten/view/reshape, Dropout, Identity, "
    "Linear"
)

# --------------------------------------------------------------------------------------------
# Activations: forward function and derivative (the derivative is only used in the head, where
# the gradient of the logit is taken for the initial relevance).
# --------------------------------------------------------------------------------------------
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass
class Activation:
    kind: str
    negative_slope: float = 0.01
    alpha: float = 1.0
    approximate: str = "none"
    beta: float = 1.0
    threshold: float = 20.0

    def __call__(self, z: Tensor) -> Tensor:
        if self.kind == "relu":
            return F.relu(z)
        if self.kind == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        if self.kind == "elu":
            return F.elu(z, self.alpha)
        if self.kind == "silu":
            return F.silu(z)
        if self.kind == "gelu":
            return F.gelu(z, approximate=self.approximate)
        if self.kind == "tanh":
            return torch.tanh(z)
        if self.kind == "softplus":
            return F.softplus(z, self.beta, self.threshold)
        raise AssertionError(self.kind)

    def derivative(self, z: Tensor, a: Tensor) -> Tensor:
        if self.kind == "relu":
            return (z > 0).to(z.dtype)
        if self.kind == "leaky_relu":
            return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, self.negative_slope))
        if self.kind == "elu":
            return torch.where(z > 0, torch.ones_like(z), a + self.alpha)
        if self.kind == "silu":
            s = torch.sigmoid(z)
            return s * (1 + z * (1 - s))
        if self.kind == "gelu":
            if self.approximate == "tanh":
                k = math.sqrt(2.0 / math.pi)
                u = k * (z + 0.044715 * z ** 3)
                t = torch.tanh(u)
                return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
            return 0.5 * (1 + torch.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        if self.kind == "tanh":
            return 1 - a * a
        if self.kind == "softplus":  # linear above the threshold, as F.softplus
            return torch.where(z * self.beta > self.threshold, torch.ones_like(z), torch.sigmoid(z * self.beta))
        raise AssertionError(self.kind)


def _module_activation(m: nn.Module) -> Optional[Activation]:
    if isinstance(m, nn.ReLU):
        return Activation("relu")
    if isinstance(m, nn.LeakyReLU):
        return Activation("leaky_relu", negative_slope=m.negative_slope)
    if isinstance(m, nn.ELU):
        return Activation("elu", alpha=m.alpha)
    if isinstance(m, nn.SiLU):
        return Activation("silu")
    if isinstance(m, nn.GELU):
        return Activation("gelu", approximate=m.approximate)
    if isinstance(m, nn.Tanh):
        return Activation("tanh")
    if isinstance(m, nn.Softplus):
        return Activation("softplus", beta=m.beta, threshold=m.threshold)
    return None


_FUNCTION_ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", F.silu: "silu", F.gelu: "gelu",
    torch.tanh: "tanh", F.tanh: "tanh",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_META_METHODS = {"size", "dim"}


def _function_activation(node: torch.fx.Node) -> Optional[Activation]:
    kind = _FUNCTION_ACTIVATIONS.get(node.target) if node.op == "call_function" else (
        _METHOD_ACTIVATIONS.get(node.target) if node.op == "call_method" else None)
    if kind is None:
        return None
    kw = dict(node.kwargs)
    extra = list(node.args[1:])
    if kind == "leaky_relu":
        return Activation(kind, negative_slope=kw.get("negative_slope", extra[0] if extra else 0.01))
    if kind == "elu":
        return Activation(kind, alpha=kw.get("alpha", extra[0] if extra else 1.0))
    if kind == "gelu":
        return Activation(kind, approximate=kw.get("approximate", "none"))
    return Activation(kind)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One node of the captured graph.

    kind: "input", "conv", "bn", "act", "maxpool", "avgpool", "adaptive_avgpool", "add",
    "reshape", "identity", "linear", "meta" (non-tensor helpers such as ``x.size(0)``), "output".
    inputs: indices of the tensor steps this one reads (in argument order).
    """

    index: int
    kind: str
    name: str                       # fx node name (unique)
    path: str                       # module path for call_module nodes, else the node name
    inputs: List[int]
    module: Optional[nn.Module] = None
    activation: Optional[Activation] = None
    bn: Optional[nn.BatchNorm2d] = None   # a BatchNorm folded into this conv
    node: Optional[torch.fx.Node] = None
    params: Dict[str, Any] = field(default_factory=dict)


class Instrument:
    """Hooks called by :meth:`Plan.forward` at every activation and max-pool step.

    The default runs the layer and records nothing; subclasses record (SRD, APOP) or replace
    (APOP replay, binarization) what the layer outputs.
    """

    def activation(self, step: Step, z: Tensor) -> Tensor:
        return step.activation(z)

    def maxpool(self, step: Step, x: Tensor) -> Tensor:
        p = step.params
        return F.max_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                            ceil_mode=p["ceil_mode"])


class Recorder(Instrument):
    """Runs the model unchanged, recording each max-pool's argmax indices (which SRD's max-pool
    rule needs) and, with ``masks=True``, each ReLU's on/off pattern ``z > 0`` (APOP)."""

    def __init__(self, masks: bool = False):
        self.record_masks = masks
        self.indices: Dict[int, Tensor] = {}
        self.masks: Dict[int, Tensor] = {}

    def activation(self, step: Step, z: Tensor) -> Tensor:
        if self.record_masks and step.activation.kind == "relu":
            self.masks[step.index] = z > 0
        return step.activation(z)

    def maxpool(self, step: Step, x: Tensor) -> Tensor:
        p = step.params
        out, idx = F.max_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                                ceil_mode=p["ceil_mode"], return_indices=True)
        self.indices[step.index] = idx
        return out


def _maxpool_params(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False) -> Dict[str, Any]:
    if return_indices:
        raise UnsupportedModelError("max_pool2d(return_indices=True) is not supported")
    pair = torch.nn.modules.utils._pair
    return {"kernel_size": pair(kernel_size), "stride": pair(stride if stride else kernel_size),
            "padding": pair(padding), "dilation": pair(dilation), "ceil_mode": bool(ceil_mode)}


def _avgpool_params(kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                    divisor_override=None) -> Dict[str, Any]:
    pair = torch.nn.modules.utils._pair
    return {"kernel_size": pair(kernel_size), "stride": pair(stride if stride else kernel_size),
            "padding": pair(padding), "ceil_mode": bool(ceil_mode),
            "count_include_pad": bool(count_include_pad), "divisor_override": divisor_override}


class Plan:
    """A captured model: steps in topological order and the forward that runs them."""

    def __init__(self, model: nn.Module, steps: List[Step]):
        self.model = model
        self.steps = steps
        self.input_index = next(s.index for s in steps if s.kind == "input")
        self.output_index = next(s.index for s in steps if s.kind == "output")
        users: List[List[int]] = [[] for _ in steps]
        for s in steps:
            for i in s.inputs:
                users[i].append(s.index)
        self.users = users

    # -- lookup ---------------------------------------------------------------------------
    def activations(self) -> List[Step]:
        return [s for s in self.steps if s.kind == "act"]

    def check_eval(self) -> None:
        for s in self.steps:
            bn = s.bn if s.kind == "conv" else (s.module if s.kind == "bn" else None)
            if bn is not None and bn.training:
                raise ValueError(
                    f"BatchNorm at '{bn_path(self, s)}' is in training mode: SRD needs the fixed "
                    "affine map of eval mode; call model.eval() first")

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor, instrument: Optional[Instrument] = None,
                keep: Optional[Sequence[int]] = None, stop: Optional[int] = None) -> List[Optional[Tensor]]:
        """Run the steps; returns the list of step outputs (values not in ``keep`` are dropped
        once no later step needs them, to bound memory). ``stop``: last step to run."""
        instrument = instrument or Instrument()
        values: List[Any] = [None] * len(self.steps)
        last_use = [-1] * len(self.steps)
        for s in self.steps:
            for i in s.inputs:
                last_use[i] = max(last_use[i], s.index)
        keep_set = set(keep) if keep is not None else None
        for s in self.steps:
            values[s.index] = self._run(s, values, x, instrument)
            if keep_set is not None:
                for i in s.inputs:
                    if last_use[i] == s.index and i not in keep_set:
                        values[i] = None
            if stop is not None and s.index == stop:
                break
        return values

    def _run(self, s: Step, values: List[Any], x: Tensor, instrument: Instrument):
        ins = [values[i] for i in s.inputs]
        k = s.kind
        if k == "input":
            return x
        if k == "conv":
            m = s.module
            y = F.conv2d(ins[0], m.weight, m.bias, m.stride, s.params["padding"], m.dilation, m.groups)
            if s.bn is not None:
                y = _batch_norm(y, s.bn)
            return y
        if k == "bn":
            return _batch_norm(ins[0], s.module)
        if k == "act":
            return instrument.activation(s, ins[0])
        if k == "maxpool":
            return instrument.maxpool(s, ins[0])
        if k == "avgpool":
            p = s.params
            return F.avg_pool2d(ins[0], p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                                p["count_include_pad"], p["divisor_override"])
        if k == "adaptive_avgpool":
            return F.adaptive_avg_pool2d(ins[0], s.params["output_size"])
        if k == "add":
            return ins[0] + ins[1]
        if k in ("reshape", "meta"):
            return _eval_call(s.params["call"], values)
        if k == "identity":
            return ins[0]
        if k == "linear":
            return F.linear(ins[0], s.module.weight, s.module.bias)
        if k == "output":
            return ins[0]
        raise AssertionError(k)


def _batch_norm(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def bn_path(plan: Plan, s: Step) -> str:
    if s.kind == "bn":
        return s.path
    for name, m in plan.model.named_modules():
        if m is s.bn:
            return name
    return s.path


@dataclass(frozen=True)
class _Ref:
    """Stands for the value of step ``index`` inside a stored call's arguments."""
    index: int


def _load(template, values: List[Any]):
    if isinstance(template, _Ref):
        return values[template.index]
    if isinstance(template, (list, tuple)):
        return tuple(_load(t, values) for t in template)
    if isinstance(template, dict):
        return {k: _load(v, values) for k, v in template.items()}
    return template


def _plain(template):
    """fx's immutable containers as plain tuples and dicts."""
    if isinstance(template, (list, tuple)):
        return tuple(_plain(t) for t in template)
    if isinstance(template, dict):
        return {k: _plain(v) for k, v in template.items()}
    return template


def _eval_call(call, values: List[Any]):
    """Evaluate a stored reshape/meta call (function or method) on the current values."""
    kind, target, args, kwargs = call
    args, kwargs = _load(args, values), _load(kwargs, values)
    if kind == "function":
        return target(*args, **kwargs)
    return getattr(args[0], target)(*args[1:], **kwargs)


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def _unsupported(node: torch.fx.Node, what: str) -> UnsupportedModelError:
    path = node.target if node.op == "call_module" else "(functional)"
    return UnsupportedModelError(
        f"srd_ext cannot decompose node '{node.name}' (module path {path!r}, {what}). "
        f"Supported: {SUPPORTED}.")


def _conv_padding(node: torch.fx.Node, m: nn.Conv2d) -> Tuple[int, int]:
    if m.padding_mode != "zeros":
        raise _unsupported(node, f"Conv2d with padding_mode={m.padding_mode!r}; only 'zeros'")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d, s in zip(m.kernel_size, m.dilation, m.stride):
            total = d * (k - 1)
            if total % 2:
                raise _unsupported(node, "Conv2d with asymmetric 'same' padding")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(m.padding)


def capture(model: nn.Module) -> Plan:
    """Trace ``model`` with torch.fx and build its :class:`Plan`. The model is not modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {e}. SRD needs a model whose "
            "forward has no data-dependent control flow.") from e
    modules = dict(model.named_modules())
    steps: List[Step] = []
    index: Dict[str, int] = {}

    def tensor_inputs(node: torch.fx.Node) -> List[int]:
        out: List[int] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(index[n.name]) or n)
        return out

    for node in gm.graph.nodes:
        idx = len(steps)
        kind: Optional[str] = None
        step_kwargs: Dict[str, Any] = {}
        ins: List[int] = []
        path = node.name
        if node.op == "placeholder":
            if any(s.kind == "input" for s in steps):
                raise _unsupported(node, "a second forward argument; SRD explains single-input models")
            kind = "input"
        elif node.op == "output":
            kind = "output"
            ins = tensor_inputs(node)
            if len(ins) != 1:
                raise _unsupported(node, "an output that is not a single logits tensor")
        elif node.op == "get_attr":
            raise _unsupported(node, "a parameter or constant read inside forward")
        elif node.op == "call_module":
            m = modules[node.target]
            path = node.target
            ins = tensor_inputs(node)
            act = _module_activation(m)
            if isinstance(m, nn.Conv2d):
                kind = "conv"
                step_kwargs["params"] = {"padding": _conv_padding(node, m)}
            elif isinstance(m, nn.BatchNorm2d):
                if m.running_mean is None:
                    raise _unsupported(node, "BatchNorm2d without running statistics")
                kind = "bn"
            elif act is not None:
                kind, step_kwargs["activation"] = "act", act
            elif isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    raise _unsupported(node, "MaxPool2d(return_indices=True)")
                kind = "maxpool"
                step_kwargs["params"] = _maxpool_params(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.AvgPool2d):
                kind = "avgpool"
                step_kwargs["params"] = _avgpool_params(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                        m.count_include_pad, m.divisor_override)
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                kind = "adaptive_avgpool"
                step_kwargs["params"] = {"output_size": m.output_size}
            elif isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Identity)):
                kind = "identity"
            elif isinstance(m, nn.Flatten):
                kind = "reshape"
                step_kwargs["params"] = {"call": ("function", torch.flatten, (_Ref(ins[0]), m.start_dim, m.end_dim), {})}
            elif isinstance(m, nn.Linear):
                kind = "linear"
            else:
                raise _unsupported(node, f"module type {type(m).__name__}")
            step_kwargs["module"] = m
        elif node.op in ("call_function", "call_method"):
            ins = tensor_inputs(node)
            act = _function_activation(node)
            tgt = node.target
            if act is not None:
                kind, step_kwargs["activation"] = "act", act
                ins = ins[:1]
            elif node.op == "call_function" and tgt in _ADD_FUNCTIONS or (
                    node.op == "call_method" and tgt in ("add", "add_", "__add__", "__iadd__")):
                if len(ins) != 2 or any(not isinstance(a, torch.fx.Node) for a in node.args[:2]) \
                        or node.kwargs.get("alpha", 1) != 1:
                    raise _unsupported(node, "an add of a constant or with alpha (adds a bias SRD cannot share)")
                kind = "add"
            elif node.op == "call_function" and tgt in _RESHAPE_FUNCTIONS or (
                    node.op == "call_method" and tgt in _RESHAPE_METHODS):
                kind = "reshape"
            elif node.op == "call_method" and tgt in _META_METHODS or (
                    node.op == "call_function" and tgt is getattr):
                kind = "meta"
            elif node.op == "call_function" and tgt in (F.max_pool2d,):
                kind = "maxpool"
                step_kwargs["params"] = _maxpool_params(*node.args[1:], **node.kwargs)
                ins = ins[:1]
            elif node.op == "call_function" and tgt in (F.avg_pool2d,):
                kind = "avgpool"
                step_kwargs["params"] = _avgpool_params(*node.args[1:], **node.kwargs)
                ins = ins[:1]
            elif node.op == "call_function" and tgt in (F.adaptive_avg_pool2d,):
                kind = "adaptive_avgpool"
                osz = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
                step_kwargs["params"] = {"output_size": osz}
                ins = ins[:1]
            elif node.op == "call_function" and tgt in (F.dropout, F.dropout2d):
                kind = "identity"
                ins = ins[:1]
            else:
                raise _unsupported(node, f"function {getattr(tgt, '__name__', tgt)!r}")
        else:
            raise _unsupported(node, f"fx op {node.op}")
        if kind in ("reshape", "meta") and node.op != "call_module":
            to_ref = lambda n: _Ref(index[n.name])  # noqa: E731
            step_kwargs["params"] = {"call": (
                "function" if node.op == "call_function" else "method", node.target,
                _plain(torch.fx.node.map_arg(node.args, to_ref)),
                _plain(torch.fx.node.map_arg(node.kwargs, to_ref)))}
        index[node.name] = idx
        steps.append(Step(index=idx, kind=kind, name=node.name, path=path, inputs=ins, node=node,
                          **step_kwargs))

    plan = Plan(model, steps)
    _fold_batchnorms(plan)
    return plan


def _fold_batchnorms(plan: Plan) -> None:
    """Attach each BatchNorm that directly follows a conv (and is its only user) to that conv:
    for SRD the pair is one affine map (weights scaled, bias shared by the folded taps)."""
    for s in plan.steps:
        if s.kind != "bn":
            continue
        src = plan.steps[s.inputs[0]]
        if src.kind == "conv" and src.bn is None and plan.users[src.index] == [s.index]:
            src.bn = s.module
            # The conv step now computes conv + BN; the BN step passes its input through.
            s.kind = "identity"
            s.params["folded_into"] = src.index
