"""Attribution baselines of the paper's comparison (Sec. 4.2, Table 2) behind one interface.

Every method is called as ``method(model, x, target) -> Tensor (B, H, W)``: float32, on ``x``'s
device, detached. ``target`` is an int, a per-sample sequence / LongTensor, or ``None`` (the
predicted class). Maps come at the method's native resolution: the input size for pixel-space
methods, the target layer's size for CAM methods and SRD-low/-high (``Method.resolution``);
the evaluation (``benchmarks/eval_table.py``) divides them by their max and upsamples them
bilinearly, as the paper does. Pass a model in eval mode.

Libraries: captum (Saliency, GuidedBackprop, GradInput, IntegratedGradients, LRP z+, SmoothGrad),
pytorch-grad-cam (FullGrad and the CAM family) and srd_ext itself (SRD). captum and
pytorch-grad-cam are the ``bench`` extra (``pip install srd_ext[bench]``) and are imported only
when a method that needs them runs.

Channel reduction of captum's (B, C, H, W) attributions, as in each method's paper:

- Saliency, SmoothGrad: ``max_c |grad|`` (Simonyan et al. 2014, Sec. 3.1; SmoothGrad averages
  ``|grad|`` over noisy copies and is displayed like the map it smooths).
- GuidedBackprop, GradInput, IntegratedGradients, LRP z+: signed sum over channels (for the
  last three the per-pixel sum keeps completeness / conservation).

The model is never modified. Where a library would change it or give a wrong result on a model
as users have it, the method runs on an adapted deep copy (cached per model and rebuilt when its
parameters or modules change); :data:`NOTES` records what was adapted.

- LRP z+: captum's LRP leaves attributes on the modules it visits and needs every addition to be
  a module and every layer to be used once. The copy is re-traced with torch.fx: BatchNorm folded
  into the preceding conv (canonization), each ReLU use given its own non-inplace module,
  functional ``+`` replaced by captum's ``Addition_Module``. Rules: ``Alpha1_Beta0_Rule``
  (the z+ rule, biases set to zero) on every Conv2d, captum's default ``EpsilonRule`` (1e-9)
  on Linear, pooling and additions.
- GuidedBackprop: captum hooks ``nn.ReLU`` modules only (reused and in-place ones work);
  functional ``F.relu`` calls would not be guided, so such models run on an fx copy with one
  ReLU module per call.
- CAM methods, FullGrad: pytorch-grad-cam calls ``model.eval()``, registers hooks, fills
  parameter gradients, and AblationCAM swaps the target layer out while it runs; they run on a
  deep copy (parameters frozen: the input carries the graph).

CAM target layers are SRD's: "low" is the encoder output (the last spatial activation every
path passes through: ResNet's ``layer4``, VGG's last ReLU before the final max-pool) and "high"
the last activation at 1/8 of the input size (ResNet's ``layer2``); each is hooked on the
outermost module whose output that activation is (:func:`cam_layers`). GradCAM, GradCAM++,
ScoreCAM, AblationCAM and XGradCAM use "low"; LayerCAM both. CAM maps are the library's
weighted activation sums with its ReLU, before its min-max scaling and resize. FullGrad is the
library's full output (input resolution, its own per-layer post-processing, scaled to [0, 1]).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Method", "METHODS", "NOTES", "get", "names", "cam_layers"]

Target = Union[None, int, Sequence[int], Tensor]

#: Adaptations made for the last model each method ran on: method name -> description.
NOTES: Dict[str, str] = {}

INSTALL_HINT = "pip install srd_ext[bench]"

# Defaults sized for a CPU evaluation budget (benchmarks/eval_table.py); override with get(...).
IG_STEPS = 32            # captum's default is 50 (Gauss-Legendre points)
SMOOTHGRAD_SAMPLES = 16  # Smilkov et al. use up to 50, with diminishing returns
SMOOTHGRAD_NOISE = 0.15  # std as a fraction of each image's (max - min), Smilkov et al. 10-20%
CAM_BATCH = 64           # masked / ablated images per forward in ScoreCAM and AblationCAM


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this baseline needs {module.split('.')[0]!r}: {INSTALL_HINT}") from e


# --------------------------------------------------------------------------------------------
# per-model cache of adapted copies
# --------------------------------------------------------------------------------------------
def _fingerprint(model: nn.Module) -> tuple:
    # In-place updates bump a tensor's _version; replaced tensors or modules change ids.
    tensors = tuple((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))
    return tensors, tuple((id(m), m.training) for m in model.modules())


_CACHE: "OrderedDict[int, Tuple[weakref.ref, tuple, Dict[str, object]]]" = OrderedDict()
_CACHE_MODELS = 4


def _cached(model: nn.Module, key: str, build: Callable[[], object]):
    fp = _fingerprint(model)
    entry = _CACHE.get(id(model))
    if entry is None or entry[0]() is not model or entry[1] != fp:
        entry = (weakref.ref(model), fp, {})
        _CACHE[id(model)] = entry
    _CACHE.move_to_end(id(model))
    while len(_CACHE) > _CACHE_MODELS:
        _CACHE.popitem(last=False)
    store = entry[2]
    if key not in store:
        store[key] = build()
    return store[key]


def _explainer(model: nn.Module):
    from .explain import Explainer

    return _cached(model, "srd", lambda: Explainer(model))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _targets(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    b = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    t = torch.as_tensor(target, device=x.device)
    if t.dim() == 0:
        t = t.expand(b)
    if t.dim() != 1 or t.shape[0] != b or t.is_floating_point():
        raise ValueError(f"target: expected an int or {b} integer class indices, got {tuple(t.shape)} {t.dtype}")
    return t.long()


def _out(maps, x: Tensor) -> Tensor:
    if not isinstance(maps, Tensor):
        maps = torch.from_numpy(np.asarray(maps))
    return maps.detach().to(device=x.device, dtype=torch.float32)


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _is_relu(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_tensor_add(node: torch.fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"))
    return (is_add and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, torch.fx.Node) for a in node.args))


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    k, name = 1, f"{base}_use1"
    while name in taken:
        k += 1
        name = f"{base}_use{k}"
    return name


def _fx_adapt(model: nn.Module, *, fold_bn: bool = False, add_modules: bool = False
              ) -> Tuple[torch.fx.GraphModule, List[str]]:
    """Deep copy of ``model`` traced by torch.fx with one non-inplace ``nn.ReLU`` per ReLU call
    (optionally BatchNorm folded into convs and tensor additions as captum ``Addition_Module``s).
    Returns the copy and a list of what changed."""
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    done: List[str] = []
    if fold_bn:
        from torch.fx.experimental.optimization import fuse

        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        gm = fuse(gm, inplace=True, no_trace=True)
        left = sum(1 for n in gm.graph.nodes if n.op == "call_module"
                   and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d))
        if n_bn:
            done.append(f"{n_bn - left} BatchNorm2d folded into convs" + (f", {left} left" if left else ""))
    modules = dict(gm.named_modules())
    seen: Dict[str, int] = {}
    n_inplace = n_split = n_func = n_add = 0
    for node in list(gm.graph.nodes):
        if _is_relu(node, modules):
            if node.op == "call_module":
                mod = modules[node.target]
                if mod.inplace:
                    n_inplace += 1
                    mod.inplace = False
                seen[node.target] = seen.get(node.target, 0) + 1
                if seen[node.target] == 1:
                    continue
                n_split += 1
                name = _free_name(gm, node.target)
            else:
                n_func += 1
                name = _free_name(gm, node.name)
            gm.add_submodule(name, nn.ReLU())
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
        elif add_modules and _is_tensor_add(node):
            from captum.attr._utils.custom_modules import Addition_Module

            n_add += 1
            name = _free_name(gm, node.name)
            gm.add_submodule(name, Addition_Module())
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, tuple(node.args))
        else:
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    if n_inplace:
        done.append(f"{n_inplace} in-place ReLU made non-inplace")
    if n_split:
        done.append(f"{n_split} extra uses of reused ReLU modules given their own module")
    if n_func:
        done.append(f"{n_func} functional relu calls replaced by nn.ReLU modules")
    if n_add:
        done.append(f"{n_add} functional additions replaced by captum Addition_Module")
    return gm, done


def _note(method: str, model: nn.Module, what: str, changes: Sequence[str]) -> None:
    NOTES[method] = f"{type(model).__name__}: {what}" + (f" ({'; '.join(changes)})" if changes else "")


# --------------------------------------------------------------------------------------------
# captum
# --------------------------------------------------------------------------------------------
def _captum_input(x: Tensor) -> Tensor:
    # A fresh leaf that requires grad: captum then leaves the caller's tensor alone (and quiet).
    return x.detach().clone().requires_grad_(True)


def _saliency(model, x, target, **_):
    attr = _require("captum.attr")
    with torch.enable_grad():
        a = attr.Saliency(model).attribute(_captum_input(x), target=target, abs=True)
    return a.amax(1)


def _grad_input(model, x, target, **_):
    attr = _require("captum.attr")
    with torch.enable_grad():
        a = attr.InputXGradient(model).attribute(_captum_input(x), target=target)
    return a.sum(1)


def _integrated_gradients(model, x, target, n_steps: int = IG_STEPS, **_):
    attr = _require("captum.attr")
    with torch.enable_grad():
        a = attr.IntegratedGradients(model).attribute(
            _captum_input(x), baselines=0.0, target=target, n_steps=n_steps,
            internal_batch_size=max(n_steps, 1) * 4)
    return a.sum(1)


def _smoothgrad(model, x, target, n_samples: int = SMOOTHGRAD_SAMPLES,
                noise: float = SMOOTHGRAD_NOISE, **_):
    attr = _require("captum.attr")
    nt = attr.NoiseTunnel(attr.Saliency(model))
    out = []
    # Per image: the noise level is a fraction of that image's value range.
    with torch.enable_grad():
        for i in range(x.shape[0]):
            xi = _captum_input(x[i:i + 1])
            std = float(noise * (x[i].max() - x[i].min()))
            a = nt.attribute(xi, nt_type="smoothgrad", nt_samples=n_samples,
                             nt_samples_batch_size=n_samples, stdevs=std, target=target[i:i + 1],
                             abs=True)
            out.append(a.amax(1))
    return torch.cat(out) if out else x.new_zeros((0,) + tuple(x.shape[-2:]))


def _has_functional_relu(model: nn.Module) -> bool:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return False  # untraceable: run as it is
    modules = dict(gm.named_modules())
    return any(_is_relu(n, modules) and n.op != "call_module" for n in gm.graph.nodes)


def _guided_backprop(model, x, target, **_):
    attr = _require("captum.attr")

    def build():
        if not _has_functional_relu(model):
            return None
        return _fx_adapt(model)

    adapted = _cached(model, "guided", build)
    if adapted is None:
        net = model
        NOTES.pop("guided-backprop", None)
    else:
        net, changes = adapted
        _note("guided-backprop", model, "ran on an fx deep copy", changes)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        a = attr.GuidedBackprop(net).attribute(_captum_input(x), target=target)
    return a.sum(1)


def _lrp_model(model):
    _require("captum.attr")
    gm, changes = _fx_adapt(model, fold_bn=True, add_modules=True)
    return gm.eval(), changes


def _lrp(model, x, target, **_):
    attr = _require("captum.attr")
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    net, changes = _cached(model, "lrp", lambda: _lrp_model(model))
    _note("lrp-z+", model, "ran on an fx deep copy; Alpha1_Beta0 (z+, bias 0) on Conv2d, "
          "Epsilon 1e-9 elsewhere", changes)
    # captum deletes the rules after every call.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
    with torch.enable_grad():
        a = attr.LRP(net).attribute(_captum_input(x), target=target)
    return a.sum(1)


# --------------------------------------------------------------------------------------------
# pytorch-grad-cam
# --------------------------------------------------------------------------------------------
def _module_of_node(ex, x: Tensor, index: int) -> str:
    """Path of the outermost module whose (single) call outputs node ``index``."""
    g = ex.graph(x)
    path = g.module_of(index)
    if path is None:
        raise ValueError(f"no module of {type(ex.model).__name__} outputs the layer "
                         f"'{g.display_name(index)}' alone; CAM methods need one to hook")
    return path


def cam_layers(model: nn.Module, x: Tensor) -> Dict[str, str]:
    """Module paths hooked by the CAM methods: {"low": ..., "high": ...}, the modules that output
    SRD's "low" (encoder output) and "high" (1/8 input resolution) layers for inputs shaped
    like ``x``."""
    ex = _explainer(model)

    def build():
        g = ex.graph(x[:1].detach())
        plan = ex._plan(g)
        return {"low": _module_of_node(ex, x[:1], plan.encoder),
                "high": _module_of_node(ex, x[:1], ex._resolve(g, plan, "high"))}

    h, w = x.shape[-2:]
    return _cached(model, f"cam_layers_{h}x{w}", build)


def _cam_copy(model):
    net = copy.deepcopy(model)
    # The CAM methods need gradients of activations only: the input carries the graph instead.
    net.requires_grad_(False)
    return net, []


def _run_cam(cam, x: Tensor, target: Tensor):
    targets_mod = _require("pytorch_grad_cam.utils.model_targets")
    targets = [targets_mod.ClassifierOutputTarget(int(t)) for t in target]
    # Not ``with cam``: its __exit__ swallows IndexError.
    try:
        with _quiet_cam_loops(), torch.enable_grad():
            return cam(x.detach().clone().requires_grad_(True), targets=targets)
    finally:
        cam.activations_and_grads.release()


@contextlib.contextmanager
def _quiet_cam_loops() -> Iterator[None]:
    # ScoreCAM / AblationCAM draw a tqdm bar per image; the evaluation has its own.
    import types

    mods = [_require(f"pytorch_grad_cam.{m}") for m in ("score_cam", "ablation_cam")]
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
        base = getattr(_require("pytorch_grad_cam"), name)

        class Native(base):
            def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
                ag = self.activations_and_grads
                acts = [a.cpu().data.numpy() for a in ag.activations]
                grads = [g.cpu().data.numpy() for g in ag.gradients]
                cam = self.get_cam_image(input_tensor, self.target_layers[0], targets,
                                         acts[0] if acts else None, grads[0] if grads else None,
                                         eigen_smooth)
                return [np.maximum(cam, 0)]

            def aggregate_multi_layers(self, cam_per_target_layer):
                return cam_per_target_layer[0]

        Native.__name__ = Native.__qualname__ = f"Native{name}"
        _NATIVE_CLASSES[name] = Native
    return _NATIVE_CLASSES[name]


def _cam(model, x, target, cls: str, layer: str, method: str, **_):
    net, changes = _cached(model, "cam", lambda: _cam_copy(model))
    path = cam_layers(model, x)[layer]
    _note(method, model, f"ran on a deep copy, target layer '{path}'", changes)
    kwargs = {}
    if cls == "AblationCAM":
        # A fresh ablation layer: the library's default instance is shared and stateful.
        kwargs["ablation_layer"] = _require("pytorch_grad_cam").AblationLayer()
        kwargs["batch_size"] = CAM_BATCH
    cam = _native_cam_class(cls)(net, [net.get_submodule(path)], **kwargs)
    if cls == "ScoreCAM":
        cam.batch_size = CAM_BATCH
    return _run_cam(cam, x, target)


def _fullgrad(model, x, target, **_):
    pgc = _require("pytorch_grad_cam")
    net, changes = _cached(model, "cam", lambda: _cam_copy(model))
    _note("fullgrad", model, "ran on a deep copy", changes)
    return _run_cam(pgc.FullGrad(net, []), x, target)


# --------------------------------------------------------------------------------------------
# SRD
# --------------------------------------------------------------------------------------------
def _srd(model, x, target, layer: str, **_):
    with torch.no_grad():
        return _explainer(model).explain(x.detach(), target, layer=layer)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
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
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x: expected a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        t = _targets(model, x, target)
        if x.shape[0] == 0:
            return x.new_zeros((0,) + tuple(x.shape[-2:]), dtype=torch.float32)
        return _out(self.fn(model, x, t, **self.options), x)

    def with_options(self, **options) -> "Method":
        return dataclasses.replace(self, options={**self.options, **options})


def _m(name, label, resolution, library, fn, **options) -> Method:
    return Method(name, label, resolution, library, fn, options)


_ALL = [
    _m("saliency", "Saliency", "input", "captum", _saliency),
    _m("guided-backprop", "GuidedBackprop", "input", "captum", _guided_backprop),
    _m("grad-input", "GradInput", "input", "captum", _grad_input),
    _m("integrated-gradients", "InteGrad", "input", "captum", _integrated_gradients),
    _m("lrp-z+", "LRP z+", "input", "captum", _lrp),
    _m("smoothgrad", "Smoothgrad", "input", "captum", _smoothgrad),
    _m("fullgrad", "Fullgrad", "input", "pytorch-grad-cam", _fullgrad),
    _m("gradcam", "GradCAM†", "low", "pytorch-grad-cam", _cam, cls="GradCAM", layer="low", method="gradcam"),
    _m("gradcam++", "GradCAM++†", "low", "pytorch-grad-cam", _cam, cls="GradCAMPlusPlus", layer="low",
       method="gradcam++"),
    _m("scorecam", "ScoreCAM†", "low", "pytorch-grad-cam", _cam, cls="ScoreCAM", layer="low", method="scorecam"),
    _m("ablationcam", "AblationCAM†", "low", "pytorch-grad-cam", _cam, cls="AblationCAM", layer="low",
       method="ablationcam"),
    _m("xgradcam", "XGradCAM†", "low", "pytorch-grad-cam", _cam, cls="XGradCAM", layer="low", method="xgradcam"),
    _m("layercam-low", "LayerCAM-low†", "low", "pytorch-grad-cam", _cam, cls="LayerCAM", layer="low",
       method="layercam-low"),
    _m("layercam-high", "LayerCAM-high‡", "high", "pytorch-grad-cam", _cam, cls="LayerCAM", layer="high",
       method="layercam-high"),
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
