"""SRD explanations of whole CNNs: :func:`explain`, :class:`Explainer` and :func:`erf`.

The explanation is one forward pass (recording pre-activations and max-pool indices) and one
backward pass in which relevance travels as a vector field through the linear parts and is turned
into one relevance per pixel at every activation layer (see :mod:`srd_ext.rules`).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops, rules
from .capture import Plan, Recorder, capture

__all__ = ["Explainer", "explain", "erf", "INITS"]

INITS = ("gradcam-contrast", "gradcam", "cam", "constant")
Target = Union[None, int, Sequence[int], Tensor]
Init = Union[str, Tensor]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class Explainer:
    """SRD explainer of one model, captured once and reusable.

    Args:
        model: a CNN (torchvision-style); traced with torch.fx, never modified.
        init: initial relevance at the encoder output: "gradcam-contrast" (Eq. 4, default),
            "gradcam", "cam" (per-position logit of a global-average-pool + linear head),
            "constant" (all ones, Sec. 4.3) or a tensor (B, H_L, W_L) / (H_L, W_L).
        bias_share: "contribution" (default: bias shared by ``||W_t x_i||``), "input"
            (Eq. 11: by ``||x_i||``) or "none" (biases dropped; relevance not conserved).
        encoder: module path or node name of the encoder output layer (default: the last
            activation with a spatial output, e.g. ``layer4`` of a ResNet, ``features.29`` of VGG16).

    Layers are named by "input", "low" (the encoder output), "high" (the last activation layer
    at 1/8 of the input resolution: 28x28 for a 224 input), a module path ("layer2",
    "features.22": its output node) or an fx node name (e.g. "layer1_0_relu_1" for the second
    use of a reused ReLU).
    """

    def __init__(self, model: nn.Module, *, init: Init = "gradcam-contrast",
                 bias_share: str = "contribution", encoder: Optional[str] = None):
        if bias_share not in rules.BIAS_SHARES:
            raise ValueError(f"bias_share must be one of {rules.BIAS_SHARES}, got {bias_share!r}")
        if isinstance(init, str) and init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a tensor, got {init!r}")
        self.model = model
        self.plan: Plan = capture(model)
        self.init = init
        self.bias_share = bias_share
        acts = [s for s in self.plan.steps if s.kind == "act"]
        if not acts:
            raise ValueError(f"{type(model).__name__} has no activation layer to decompose at")
        self.encoder_index = (self._resolve(encoder) if encoder is not None
                              else self._default_encoder())

    # -- layer names ------------------------------------------------------------------------
    def _default_encoder(self) -> int:
        # The last activation that every path to the logits passes through and whose output
        # is still spatial: found on a forward-free walk from the output.
        for s in reversed(self.plan.steps):
            if s.kind == "act" and self._is_cut(s.index) and self._spatial(s.index):
                return s.index
        raise ValueError("no spatial activation layer separates the encoder from the head; "
                         "pass encoder=<module path>")

    def _spatial(self, index: int) -> bool:
        # An activation is spatial when a conv or pooling step lies between it and the input.
        seen, stack = set(), [index]
        while stack:
            i = stack.pop()
            for j in self.plan.steps[i].inputs:
                if j in seen:
                    continue
                seen.add(j)
                k = self.plan.steps[j].kind
                if k in ("reshape", "linear"):
                    return False
                stack.append(j)
        # No reshape/linear upstream: the tensor still has its spatial layout.
        return True

    def _is_cut(self, index: int) -> bool:
        """Whether every path from the input to the output goes through step ``index``."""
        reach = {self.plan.input_index}
        for s in self.plan.steps:
            if s.index == index:
                continue
            if any(i in reach for i in s.inputs):
                reach.add(s.index)
        return self.plan.output_index not in reach

    def layer_names(self) -> List[str]:
        """Names accepted by ``layer``: activation layers by module path and node name."""
        names = ["input", "low", "high"]
        for s in self.plan.steps:
            if s.kind == "act":
                names.append(s.path if s.path == s.name else f"{s.path} ({s.name})")
        return names

    def _resolve(self, layer: str) -> int:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, got {type(layer).__name__}")
        steps = self.plan.steps
        if layer == "input":
            return self.plan.input_index
        if layer == "low":
            return self.encoder_index
        by_name = [s for s in steps if s.name == layer]
        if by_name:
            cand = by_name[0]
        else:
            exact = [s for s in steps if s.node is not None and s.node.op == "call_module" and s.path == layer]
            inside = [s for s in steps if s.node is not None and s.node.op == "call_module"
                      and s.path.startswith(layer + ".")]
            if len(exact) > 1:
                raise ValueError(
                    f"module {layer!r} is used {len(exact)} times in the forward; name one use by its "
                    f"node name: {[s.name for s in exact]}")
            pool = exact or inside
            if not pool:
                raise ValueError(f"unknown layer {layer!r}; choose one of {self.layer_names()}")
            # A container's output is its last step; skip pass-through steps (folded BN, dropout).
            cand = max(pool, key=lambda s: s.index)
        while cand.kind == "identity":
            cand = steps[cand.inputs[0]]
        if cand.kind not in ("act", "input"):
            raise ValueError(
                f"layer {layer!r} resolves to a {cand.kind} step ('{cand.name}'); relevance maps are "
                f"defined at activation layers and the input: {self.layer_names()}")
        if cand.kind == "act" and cand.index > self.encoder_index:
            raise ValueError(f"layer {layer!r} lies in the head (after the encoder output "
                             f"'{steps[self.encoder_index].path}'); SRD does not decompose the head")
        return cand.index

    def _resolve_high(self, values) -> int:
        h, w = values[self.plan.input_index].shape[-2:]
        want = (math.ceil(h / 8), math.ceil(w / 8))
        best = None
        for s in self.plan.steps[: self.encoder_index + 1]:
            if s.kind == "act" and tuple(values[s.inputs[0]].shape[-2:]) == want:  # z's shape = a's
                best = s.index
        if best is None:
            raise ValueError(f"no activation layer has 1/8 of the input resolution {want} "
                             "for layer='high'; name a layer instead")
        return best

    # -- checks -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        p = next(self.model.parameters(), None)
        if p is not None and (p.device != x.device or p.dtype != x.dtype):
            raise ValueError(f"x is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}; "
                             "move one of them")
        if not _is_compiling() and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        self.plan.check_eval()

    def _targets(self, target: Target, logits: Tensor) -> Tensor:
        b, k = logits.shape[0], logits.shape[-1]
        if target is None:
            return logits.argmax(-1)
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
    def _forward(self, x: Tensor):
        rec = Recorder()
        values = self.plan.forward(x, rec)
        # ReLU outputs inside the encoder are recomputed from their pre-activation when the
        # backward reaches them: the forward then holds one tensor per layer, not two.
        for s in self.plan.steps[: self.encoder_index]:
            if s.kind == "act" and s.activation.kind == "relu":
                values[s.index] = None
        return values, rec.indices

    def _value(self, values, i: int) -> Tensor:
        v = values[i]
        if v is None:  # a dropped ReLU output
            s = self.plan.steps[i]
            v = values[i] = s.activation(self._value(values, s.inputs[0]))
        return v

    def _backward(self, values, indices, seeds: Dict[int, Tensor], wanted: Iterable[int],
                  mode: str = "srd", free: bool = False) -> Dict[int, Tensor]:
        """Walk the steps in reverse from the seeds.

        mode "srd": seeds are relevance maps (B, H, W) at activation steps; returns the relevance
        at every ``wanted`` step. mode "grad": seeds are gradients at step outputs; returns the
        gradient at every ``wanted`` step's output (used for the head's Grad-CAM weights).
        """
        steps = self.plan.steps
        wanted = set(wanted)
        lowest = min(wanted)
        field: Dict[int, Tensor] = {}
        extra: Dict[int, Tensor] = {}
        out: Dict[int, Tensor] = {}

        def add(store, i, t):
            store[i] = t if i not in store else store[i] + t

        start = max(seeds)
        prev = None
        for i, t in seeds.items():
            (extra if mode == "srd" else field)[i] = t
        for s in reversed(steps[lowest:start + 1]):
            i = s.index
            if i not in field and i not in extra:
                continue
            if mode == "grad" and i in wanted:
                out[i] = field[i]
                if i == lowest:
                    break
            if free and prev is not None:
                values[prev] = None  # no lower step reads it: free it as a gradient pass would
            prev = i
            g = field.pop(i, None)
            k = s.kind
            if k == "act":
                a, z = self._value(values, i), self._value(values, s.inputs[0])
                if mode == "grad":
                    add(field, s.inputs[0], g * s.activation.derivative(z, a))
                    continue
                e = extra.pop(i, None)
                G = g if g is not None else torch.zeros_like(a)
                relevance, g_z = ops.activation_share(a, G, z, e)
                if i in wanted:
                    out[i] = relevance
                    if i == lowest:
                        break
                add(field, s.inputs[0], g_z)
            elif k == "input":
                if mode == "srd":
                    e = extra.pop(i, None)
                    r = (self._value(values, i) * g).sum(1) if g is not None else 0
                    out[i] = r + e if e is not None else r
                break
            elif k == "conv":
                weight, bias = rules.fold_batchnorm(s)
                x = self._value(values, s.inputs[0])
                add(field, s.inputs[0], rules.conv_vjp(g, s, weight, x.shape))
                if mode == "srd":
                    rb = rules.conv_bias_relevance(g, x, s, weight, bias, self.bias_share)
                    if rb is not None:
                        self._hand_bias(field, extra, s.inputs[0], rb, values, add)
            elif k == "bn":
                scale, shift = rules.bn_affine(s.module)
                x = self._value(values, s.inputs[0])
                add(field, s.inputs[0], g * scale.view(1, -1, 1, 1))
                if mode == "srd":
                    rb = rules.bn_bias_relevance(g, x, scale, shift, self.bias_share)
                    if rb is not None:
                        self._hand_bias(field, extra, s.inputs[0], rb, values, add)
            elif k == "maxpool":
                add(field, s.inputs[0], rules.maxpool_vjp(g, indices[i], self._value(values, s.inputs[0]).shape))
            elif k == "avgpool":
                add(field, s.inputs[0], rules.avgpool_vjp(g, self._value(values, s.inputs[0]), s.params))
            elif k == "adaptive_avgpool":
                add(field, s.inputs[0], rules.adaptive_avgpool_vjp(g, self._value(values, s.inputs[0])))
            elif k == "add":
                for j in s.inputs:
                    add(field, j, g)
            elif k == "reshape":
                add(field, s.inputs[0], g.reshape(self._value(values, s.inputs[0]).shape))
            elif k in ("identity", "output"):
                add(field, s.inputs[0], g)
            elif k == "linear":
                add(field, s.inputs[0], g @ s.module.weight)
            elif k == "meta":
                pass
            else:
                raise AssertionError(k)
        return out

    def _hand_bias(self, field, extra, j: int, rb: Tensor, values, add) -> None:
        """Bias relevance landing on the pixels of step j: kept as relevance at an activation or
        the input; elsewhere (a pooled map) turned into a field that the pooling VJP splits by
        sharing ratios."""
        if self.plan.steps[j].kind in ("act", "input"):
            add(extra, j, rb)
        else:
            add(field, j, rules.relevance_to_field(rb, self._value(values, j)))

    def initial_relevance(self, values, indices, target: Tensor, init: Init) -> Tensor:
        """Relevance (B, H_L, W_L) at the encoder output (Eq. 4 and the alternatives)."""
        L = self.encoder_index
        A = values[L]
        b, _, h, w = A.shape
        if isinstance(init, Tensor):
            r = init.to(device=A.device, dtype=A.dtype)
            if r.dim() == 2:
                r = r.expand(b, -1, -1)
            if tuple(r.shape) != (b, h, w):
                raise ValueError(f"init tensor must have shape ({b}, {h}, {w}) or ({h}, {w}) "
                                 f"(the encoder output '{self.plan.steps[L].path}'), got {tuple(init.shape)}")
            return r
        if init == "constant":
            return A.new_ones((b, h, w))
        logits = values[self.plan.output_index]
        k = logits.shape[-1]
        if init == "cam":
            return self._cam(values, target)
        weights = F.one_hot(target, k).to(A.dtype)
        if init == "gradcam-contrast":
            weights = weights - 1.0 / k
        grad = self._backward(values, indices, {self.plan.output_index: weights}, [L], mode="grad")[L]
        alpha = grad.mean((2, 3))
        return F.relu(torch.einsum("bc,bchw->bhw", alpha, A))

    def _cam(self, values, target: Tensor) -> Tensor:
        steps = self.plan.steps
        chain, i = [], self.plan.output_index
        while i != self.encoder_index:
            s = steps[i]
            if len(s.inputs) != 1:
                break
            chain.append(s)
            i = s.inputs[0]
        kinds = [s.kind for s in reversed(chain) if s.kind not in ("identity", "output", "meta")]
        pool = next((s for s in chain if s.kind == "adaptive_avgpool"), None)
        lin = next((s for s in chain if s.kind == "linear"), None)
        if i != self.encoder_index or kinds not in (["adaptive_avgpool", "reshape", "linear"],
                                                    ["adaptive_avgpool", "linear"]) \
                or pool.params["output_size"] not in (1, (1, 1), [1, 1]):
            raise ValueError("init='cam' needs a global-average-pool + linear head right after the "
                             f"encoder output; this model's head is {kinds}. Use 'gradcam-contrast'.")
        A = values[self.encoder_index]
        h, w = A.shape[-2:]
        wt = lin.module.weight[target]  # (B, C)
        cam = torch.einsum("bc,bchw->bhw", wt, A)
        if lin.module.bias is not None:
            cam = cam + lin.module.bias[target].view(-1, 1, 1)
        return cam / (h * w)

    # -- public -----------------------------------------------------------------------------
    def explain(self, x: Tensor, target: Target = None, *, layer: Union[str, Sequence[str]] = "input",
                upsample: bool = False, init: Optional[Init] = None,
                return_logits: bool = False):
        """SRD relevance maps of ``x`` (B, C, H, W) for ``target``.

        Returns (B, H_l, W_l) for one layer, or a dict name -> map for a list of layers (all from
        one pass); with ``upsample=True`` every map is bilinearly resized to (H, W).
        """
        self._check_input(x)
        names = [layer] if isinstance(layer, str) else list(layer)
        if not names:
            raise ValueError("layer list is empty")
        values, indices = self._forward(x)
        t = self._targets(target, values[self.plan.output_index])
        idx = [self._resolve_high(values) if n == "high" else self._resolve(n) for n in names]
        if x.shape[0] == 0:  # an empty batch: empty maps of each layer's size
            maps = {i: x.new_zeros((0,) + tuple(self._value(values, i).shape[-2:])) for i in idx}
        else:
            r0 = self.initial_relevance(values, indices, t, self.init if init is None else init)
            maps = self._backward(values, indices, {self.encoder_index: r0}, idx, free=True)
        result = {}
        for n, i in zip(names, idx):
            m = maps[i]
            if upsample and tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
                m = F.interpolate(m.unsqueeze(1), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False).squeeze(1)
            result[n] = m
        out = result[names[0]] if isinstance(layer, str) else result
        if return_logits:
            return out, values[self.plan.output_index]
        return out

    __call__ = explain

    def relevance_at_all_layers(self, x: Tensor, target: Target = None, init: Optional[Init] = None
                                ) -> Dict[str, Tensor]:
        """Relevance at the input and every activation layer up to the encoder output, keyed by
        node name (one pass)."""
        self._check_input(x)
        values, indices = self._forward(x)
        t = self._targets(target, values[self.plan.output_index])
        idx = [self.plan.input_index] + [s.index for s in self.plan.steps
                                         if s.kind == "act" and s.index <= self.encoder_index]
        r0 = self.initial_relevance(values, indices, t, self.init if init is None else init)
        maps = self._backward(values, indices, {self.encoder_index: r0}, idx)
        maps[self.encoder_index] = r0
        return {self.plan.steps[i].name: maps[i] for i in idx}

    def erf(self, x: Tensor, layer: str, position) -> Tensor:
        """Effective receptive field of the PFV at ``position`` (y, x) of ``layer``: the input map
        (B, H, W) reached by a unit relevance there (Eq. 1-2; the backward form of Appendix C)."""
        self._check_input(x)
        values, indices = self._forward(x)
        i = self._resolve_high(values) if layer == "high" else self._resolve(layer)
        if self.plan.steps[i].kind != "act":
            raise ValueError(f"erf needs an activation layer, got {layer!r}")
        a = self._value(values, i)
        h, w = a.shape[-2:]
        py, px = position
        if not (0 <= py < h and 0 <= px < w):
            raise ValueError(f"position {tuple(position)} outside layer {layer!r} of size ({h}, {w})")
        seed = a.new_zeros((a.shape[0], h, w))
        seed[:, py, px] = 1.0
        return self._backward(values, indices, {i: seed}, [self.plan.input_index])[self.plan.input_index]


def explain(model: nn.Module, x: Tensor, target: Target = None, *, layer: Union[str, Sequence[str]] = "input",
            init: Init = "gradcam-contrast", bias_share: str = "contribution", upsample: bool = False,
            encoder: Optional[str] = None):
    """SRD explanation of ``x`` (B, C, H, W) by ``model``: (B, H_l, W_l) relevance maps.

    ``target``: int, per-sample LongTensor, or None (predicted class). See :class:`Explainer`
    for ``layer``, ``init``, ``bias_share`` and ``encoder``.
    """
    return Explainer(model, init=init, bias_share=bias_share, encoder=encoder).explain(
        x, target, layer=layer, upsample=upsample)


def erf(model: nn.Module, x: Tensor, layer: str, position, *, bias_share: str = "contribution") -> Tensor:
    """Effective receptive field (B, H, W) of the PFV at ``position`` of ``layer`` (Eq. 1-2)."""
    return Explainer(model, bias_share=bias_share).erf(x, layer, position)
