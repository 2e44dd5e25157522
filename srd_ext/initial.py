"""The initial relevance at the encoder output (Eq. 4 of the paper, and the alternatives).

"gradcam-contrast" (default): Grad-CAM of the target class minus the mean over classes, clamped
at zero; "gradcam": plain Grad-CAM; "cam": the per-position logit of a global-average-pool +
linear head; "constant": all ones; or a user tensor (B, H_L, W_L) / (H_L, W_L).
"""

from __future__ import annotations

import warnings
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import to_nchw
from .walk import Plan, Run, head_grad

__all__ = ["INITS", "Init", "initial_relevance", "cam", "ZeroRelevanceWarning", "warn_if_zero"]

INITS = ("gradcam-contrast", "gradcam", "cam", "constant")
Init = Union[str, Tensor]


def initial_relevance(run: Run, plan: Plan, target: Tensor, init: Init) -> Tensor:
    """Relevance (B, H_L, W_L) at the encoder output (Eq. 4 and the alternatives)."""
    g = run.graph
    L = plan.encoder
    A = to_nchw(run.value(L), g.nodes[L].layout)
    b, _, h, w = A.shape
    if isinstance(init, Tensor):
        r = init.to(device=A.device, dtype=A.dtype)
        if r.dim() == 2:
            r = r.expand(b, -1, -1)
        node = g.nodes[L]
        if node.layout is not None and len(node.layout) == 2:  # tokens: a map of the patch grid
            gh, gw = node.grid[1:]
            if tuple(r.shape) != (b, gh, gw):
                raise ValueError(
                    f"init tensor must have shape ({b}, {gh}, {gw}) or ({gh}, {gw}) "
                    f"(the patch grid of the encoder output '{g.display_name(L)}'), got {tuple(init.shape)}"
                )
            off = node.grid[0]
            full = A.new_zeros((b, h, w))
            full[:, off : off + gh * gw, 0] = r.reshape(b, gh * gw)
            return full
        if tuple(r.shape) != (b, h, w):
            raise ValueError(
                f"init tensor must have shape ({b}, {h}, {w}) or ({h}, {w}) "
                f"(the encoder output '{g.display_name(L)}'), got {tuple(init.shape)}"
            )
        return r
    if init == "constant":
        return A.new_ones((b, h, w))
    if init == "cam":
        return cam(run, plan, target, A)
    logits = run.value(g.output_index)
    k = logits.shape[-1]
    weights = F.one_hot(target, k).to(A.dtype)
    if init == "gradcam-contrast":
        weights = weights - 1.0 / k
    grad = to_nchw(head_grad(run, weights, L), g.nodes[L].layout)
    alpha = grad.mean((2, 3))
    return F.relu(torch.einsum("bc,bchw->bhw", alpha, A))


class ZeroRelevanceWarning(UserWarning):
    """Some samples' initial relevance is zero everywhere: their maps are all zero."""


_WHY_ZERO = {
    "gradcam-contrast": "the target's Grad-CAM does not exceed the mean over classes anywhere",
    "gradcam": "the target's Grad-CAM is nowhere positive",
    "cam": "the target's class activation map is zero",
}


def warn_if_zero(r0: Tensor, init: Init) -> None:
    """Warn, naming the samples (batch indices), when the initial relevance ``r0`` (B, H_L, W_L)
    of a sample is zero everywhere. SRD decomposes that relevance, so those maps are all zero:
    the model shows no positive evidence for the class at the encoder. They are returned as they
    are (zeros), not replaced by another initial relevance, which would explain something else
    under the same name. Skipped while compiling (it reads tensor values)."""
    if r0.shape[0] == 0 or torch.compiler.is_compiling():
        return
    zero = (r0.detach() == 0).flatten(1).all(1)
    if not bool(zero.any()):
        return
    idx = zero.nonzero().flatten().tolist()
    why = _WHY_ZERO.get(init, "the given tensor is zero there") if isinstance(init, str) else "the given tensor is zero"
    warnings.warn(
        ZeroRelevanceWarning(
            f"srd_ext: the initial relevance (init={init if isinstance(init, str) else 'tensor'!r}) of sample(s) "
            f"{idx} of {r0.shape[0]} is zero everywhere ({why}); their maps are all zero"
        ),
        stacklevel=5,
    )


def cam(run: Run, plan: Plan, target: Tensor, A: Tensor) -> Tensor:
    """Per-position logit of a global-average-pool + linear head: ``(w_c . A_i + b_c) / HW``."""
    g = run.graph
    chain, i = [], g.nodes[g.output_index].inputs[0]
    while i != plan.encoder:
        n = g.nodes[i]
        if n.kind != "call" or len(n.field_inputs) != 1:
            break
        chain.append(n)
        i = n.field_inputs[0]
    kinds = [type(n.rule).__name__ for n in reversed(chain) if not (n.rule.identity_like or n.rule.view_like)]
    pool = next((n for n in chain if n.rule.global_pool(n)), None)
    lin = next((n for n in chain if n.op_name == "aten.linear"), None)
    if i != plan.encoder or pool is None or lin is None or len(kinds) != 2:
        raise ValueError(
            "init='cam' needs a global-average-pool + linear head right after the "
            f"encoder output; this model's head is {kinds}. Use 'gradcam-contrast'."
        )
    h, w = A.shape[-2:]
    wt = run.value(lin.params["w"])[target]  # (B, C)
    out = torch.einsum("bc,bchw->bhw", wt, A)
    if lin.params["b"] is not None:
        out = out + run.value(lin.params["b"])[target].view(-1, 1, 1)
    return out / (h * w)
