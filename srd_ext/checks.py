"""Checks of what a user passes in: images and class targets.

Shared by the SRD explainer and the baselines, so that every method refuses the same inputs with
the same words.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .capture import check_eval
from .composite import device_dtypes

__all__ = ["Target", "check_images", "check_input", "class_targets"]

Target = Union[None, int, Sequence[int], Tensor]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_images(x) -> None:
    """``x`` is a batch of images (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")


def check_input(model: nn.Module, x) -> None:
    """``x`` is a batch of images the model can explain: a dtype its device computes
    (:func:`srd_ext.composite.device_dtypes`: float32 or float64 on the CPU, float16 and bfloat16
    too on accelerators, no float64 on MPS), on the model's device and in its dtype, finite; the
    model is in eval mode."""
    check_images(x)
    accepted = device_dtypes(x.device)
    if x.dtype not in accepted:
        if x.dtype == torch.float64:
            raise TypeError(
                f"x is float64 on {x.device}, which {x.device.type.upper()} cannot compute; explain in float32 "
                "there (model.float(), x.float())"
            )
        names = ", ".join(str(d).replace("torch.", "") for d in accepted)
        raise TypeError(
            f"x must be float32 or float64 (float16 and bfloat16 on accelerators); on {x.device.type}: {names}; "
            f"got {x.dtype} on {x.device}"
        )
    p = next(model.parameters(), None)
    if p is not None and (p.device != x.device or p.dtype != x.dtype):
        raise ValueError(f"x is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}; move one of them")
    if not torch.compiler.is_compiling():
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        check_eval(model)


def class_targets(target: Target, batch: int, device, classes: Optional[int] = None) -> Optional[Tensor]:
    """``target`` as a LongTensor (batch,): an int for every sample, or one per sample. None stays
    None (the caller takes the predicted class). ``classes``: the number of classes, when known,
    to check the range."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or an integer tensor, got a bool")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(target, device=device)
        if t.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"target must hold integers, got {t.dtype}")
        t = t.long().reshape(-1)
        if t.numel() == 1 and batch != 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"target has {t.numel()} entries for a batch of {batch}")
    if classes is not None and not torch.compiler.is_compiling() and t.numel():
        if int(t.min()) < 0 or int(t.max()) >= classes:
            raise ValueError(f"target out of range: classes are 0..{classes - 1}, got {t.tolist()}")
    return t
