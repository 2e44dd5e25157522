"""Adapted deep copies of a user's model, kept per model.

The baselines that cannot run on the model as given (captum's LRP and, for functional ReLUs,
guided backprop; pytorch-grad-cam, which hooks and changes what it runs on) run on a deep copy.
A copy is built once per model and kept with it in a weak dictionary (dropped with the model, as
:mod:`srd_ext.capture` keeps its captures). Unlike a capture, which reads the live parameters at
every call, a copy holds its own: it is rebuilt when a parameter or buffer of the model changes
(in place or replaced), or a module is added, removed, replaced or switched between train and
eval. SRD itself needs no copy: ``Explainer(model)`` reuses the model's capture.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Tuple, TypeVar

import torch.nn as nn

__all__ = ["cached", "fingerprint", "clear"]

T = TypeVar("T")

_COPIES: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Dict[str, object]]]" = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module) -> tuple:
    """Changes with any in-place update (a tensor's ``_version``), replaced tensor or module, or
    train/eval switch."""
    tensors = tuple((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))
    return tensors, tuple((id(m), m.training) for m in model.modules())


def cached(model: nn.Module, key: str, build: Callable[[], T]) -> T:
    """``build()`` for ``model`` under ``key``, kept until the model changes or is dropped."""
    fp = fingerprint(model)
    entry = _COPIES.get(model)
    if entry is None or entry[0] != fp:
        entry = (fp, {})
        _COPIES[model] = entry
    store = entry[1]
    if key not in store:
        store[key] = build()
    return store[key]


def clear() -> None:
    """Drop every kept copy."""
    _COPIES.clear()
