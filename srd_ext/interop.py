"""SRD in the conventions of Quantus and captum.

- :func:`explain_func`: Quantus' ``explain_func(model, inputs, targets, **kwargs)``. Quantus metrics
  call it with numpy batches and expect numpy attributions; pass SRD's options in
  ``explain_func_kwargs``::

      metric = quantus.Sparseness()
      scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
                      explain_func=srd_ext.explain_func, explain_func_kwargs={"layer": "high"})

- :class:`SRD`: a captum-style attribution object. ``SRD(model).attribute(inputs, target=...)``
  returns a tensor shaped like ``inputs``, so ``captum.metrics.infidelity`` and
  ``captum.metrics.sensitivity_max`` take it like any captum method::

      srd = srd_ext.SRD(model)
      attr = srd.attribute(x, target=y)
      captum.metrics.sensitivity_max(srd.attribute, x, target=y)

Neither needs Quantus or captum to be installed.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .explain import Explainer

__all__ = ["explain_func", "SRD", "EXPLAIN_FUNC_OPTIONS"]

#: Keyword arguments :func:`explain_func` accepts, with their defaults.
EXPLAIN_FUNC_OPTIONS = {
    "layer": "input",
    "init": "gradcam-contrast",
    "bias_share": "contribution",
    "encoder": None,
    "upsample": True,
    "device": None,
}


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def explain_func(model: nn.Module, inputs, targets, **kwargs) -> np.ndarray:
    """SRD maps in Quantus' ``explain_func`` convention.

    Args:
        model: the PyTorch classifier, in eval mode (Quantus passes the ``nn.Module`` it was given).
        inputs: images (B, C, H, W), a numpy array or a tensor.
        targets: the classes to explain: (B,) integers (numpy, list or tensor), one int, or None
            for the predicted classes.
        **kwargs: ``layer`` ("input"; any name :meth:`Explainer.explain` accepts), ``init``
            ("gradcam-contrast"), ``bias_share`` ("contribution"), ``encoder`` (None),
            ``upsample`` (True: maps of other layers are resized bilinearly to (H, W), which
            Quantus needs to compare a map with its image) and ``device`` (Quantus passes the
            metric's device; default: the model's). Anything else is refused.

    Returns:
        float32 numpy array (B, 1, H, W) (``upsample=False``: the layer's (B, 1, h, w)), the
        channel-first layout of Quantus' own ``explain``.
    """
    unknown = sorted(set(kwargs) - set(EXPLAIN_FUNC_OPTIONS))
    if unknown:
        raise TypeError(
            f"srd_ext.explain_func got unknown keyword argument(s) {unknown}; it accepts {sorted(EXPLAIN_FUNC_OPTIONS)}"
        )
    opts = {**EXPLAIN_FUNC_OPTIONS, **kwargs}
    if not isinstance(opts["layer"], str):
        raise TypeError(f"explain_func: layer must be one layer name (str), got {type(opts['layer']).__name__}")
    m_device, m_dtype = _model_device_dtype(model)
    device = torch.device(opts["device"]) if opts["device"] is not None else m_device
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs)
    if x.dim() != 4:
        raise ValueError(f"explain_func: inputs must be images (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"explain_func: inputs must be floating point images, got {x.dtype}")
    x = x.to(device=device, dtype=m_dtype)
    if targets is not None and not isinstance(targets, (int, Tensor)):
        targets = torch.as_tensor(np.asarray(targets))
    explainer = Explainer(model, init=opts["init"], bias_share=opts["bias_share"], encoder=opts["encoder"])
    maps = explainer.explain(x, targets, layer=opts["layer"], upsample=bool(opts["upsample"]))
    return maps.detach().unsqueeze(1).to(torch.float32).cpu().numpy()


Inputs = Union[Tensor, Sequence[Tensor]]


class SRD:
    """SRD as a captum attribution method: ``SRD(model).attribute(inputs, target=...)``.

    Args:
        model: the classifier (eval mode). ``forward_func`` is the model, as in captum.
        init, bias_share, encoder: as for :class:`srd_ext.Explainer`.

    ``attribute`` follows captum's primary-attribution convention: the result has the shape of
    ``inputs`` (a tensor, or a one-tensor tuple when a tuple was given). SRD assigns one relevance
    per pixel; each of the C channels of a pixel gets 1/C of it, so the channel sum is SRD's map
    (as :mod:`srd_ext.baselines` reduces captum's maps) and the sum over a perturbed pixel's
    channels is its relevance (what ``captum.metrics.infidelity`` compares with the change of the
    output). ``per_pixel=True`` returns the map itself, (B, 1, h, w), like captum's layer methods.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        init: Any = "gradcam-contrast",
        bias_share: str = "contribution",
        encoder: Optional[str] = None,
    ):
        self.forward_func = model
        self.explainer = Explainer(model, init=init, bias_share=bias_share, encoder=encoder)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def attribute(
        self,
        inputs: Inputs,
        target=None,
        additional_forward_args: Any = None,
        *,
        layer: str = "input",
        upsample: bool = True,
        per_pixel: bool = False,
    ):
        """SRD attributions of ``inputs`` (B, C, H, W) for ``target`` (an int, (B,) integers, or
        None for the predicted classes).

        ``layer``: one layer name ("input", "high", "low", a module path, ...). The result is
        shaped like ``inputs``, with the map resized to (H, W) (``upsample``, needed for layers
        other than the input), or (B, 1, h, w) with ``per_pixel=True``. Returns a tuple when
        ``inputs`` is a tuple. ``additional_forward_args`` must be None: SRD explains
        ``model(x)`` of one input tensor.
        """
        is_tuple = isinstance(inputs, (tuple, list))
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError(f"SRD.attribute explains models of one input tensor; got {len(inputs)} inputs")
            x = inputs[0]
        else:
            x = inputs
        if additional_forward_args is not None:
            raise ValueError(
                "SRD.attribute: additional_forward_args must be None (SRD explains model(x) of one input tensor)"
            )
        if isinstance(target, tuple) or (isinstance(target, list) and any(isinstance(t, tuple) for t in target)):
            raise ValueError(
                "SRD.attribute: target must be an int, (B,) integers or None; tuple targets "
                "(multi-dimensional outputs) are not supported"
            )
        if not isinstance(layer, str):
            raise TypeError(f"SRD.attribute: layer must be one layer name (str), got {type(layer).__name__}")
        maps = self.explainer.explain(x, target, layer=layer, upsample=upsample)
        if per_pixel:
            out = maps.unsqueeze(1)
        else:
            if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
                raise ValueError(
                    f"SRD.attribute: the map of layer {layer!r} is {tuple(maps.shape[-2:])}, not the input's "
                    f"{tuple(x.shape[-2:])}; pass upsample=True for input-shaped attributions or per_pixel=True "
                    "for the map at the layer's resolution"
                )
            c = x.shape[1]
            out = (maps.unsqueeze(1) / c).expand(-1, c, -1, -1).contiguous()
        out = out.to(x.dtype)
        return (out,) if is_tuple else out
