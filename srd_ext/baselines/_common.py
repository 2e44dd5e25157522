"""What the baseline modules share: the notes on adapted copies and the optional imports."""

from __future__ import annotations

import importlib
from typing import Dict, Sequence

import torch.nn as nn
from torch import Tensor

#: Adaptations made for the last model each method ran on: method name -> description.
NOTES: Dict[str, str] = {}

INSTALL_HINT = "pip install srd_ext[bench]"


def require(module: str):
    """Import an optional library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this baseline needs {module.split('.')[0]!r}: {INSTALL_HINT}") from e


def note(method: str, model: nn.Module, what: str, changes: Sequence[str]) -> None:
    NOTES[method] = f"{type(model).__name__}: {what}" + (f" ({'; '.join(changes)})" if changes else "")


def captum_input(x: Tensor) -> Tensor:
    """A fresh leaf that requires grad: captum then leaves the caller's tensor alone (and quiet)."""
    return x.detach().clone().requires_grad_(True)
