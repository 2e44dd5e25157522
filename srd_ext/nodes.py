"""The captured graph's data types: nodes, references between them, and the error a model SRD
cannot decompose raises.

A leaf module: it imports nothing from srd_ext, so that both the capture (:mod:`srd_ext.capture`)
and the rules (:mod:`srd_ext.rules`) can build on it without importing each other upwards.

A node's arguments are stored as a *template*: the op's arguments with every tensor that another
node computes replaced by a :class:`Ref` to that node. :func:`load` fills a template in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["UnsupportedModelError", "Ref", "Node", "load", "collect_refs", "plain"]


class UnsupportedModelError(TypeError):
    """The model contains an op SRD cannot decompose, or cannot be captured."""


@dataclass(frozen=True)
class Ref:
    """Stands for the value of node ``index`` inside a node's stored arguments."""

    index: int


@dataclass(eq=False)
class Node:
    """One node of the captured graph.

    kind: "input", "param" (a parameter, buffer or constant of the model), "call" (an op or a
    Python function on values), "output".
    """

    index: int
    name: str
    kind: str
    target: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: List[int] = field(default_factory=list)  # nodes read, in argument order, no repeats
    rule: Any = None
    module: str = ""  # innermost module path ("" for the model's own forward)
    module_type: str = ""
    scopes: Tuple[Tuple[str, int], ...] = ()  # (module path, call number), outer to inner
    shape: Optional[Tuple[int, ...]] = None  # example shape (batch dim as in the example)
    dtype: Optional[torch.dtype] = None
    example: Any = None  # the export's example value (a fake tensor, a tuple of them, a number)
    data: bool = False  # depends on the input
    field_inputs: List[int] = field(default_factory=list)  # data inputs the relevance field reaches
    site: bool = False  # a decomposition site (activation on the field's path)
    z_input: Optional[int] = None  # a site's pre-activation node
    layout: Optional[Tuple[int, ...]] = None  # (batch, height, width) dims, or (batch, token)
    grid: Optional[Tuple[int, int, int]] = None  # token layout: (first patch token, h, w)
    pooled: bool = False  # downstream of a global pooling (the head)
    is_tuple: bool = False  # the op returns several tensors (split, ...): read with getitem
    fused: Optional[int] = None  # a conv folded into the BatchNorm node with this index
    params: dict = field(default_factory=dict)  # the rule's parsed arguments
    binder: Optional[Callable[[nn.Module], Tensor]] = None  # "param": reads the live tensor

    op_name: str = ""  # "aten.conv2d", "getitem", ...: what the registry keys rules by

    def where(self) -> str:
        """How errors name the node: its op, module path and module type."""
        mod = (
            f"module '{self.module}' ({self.module_type.rsplit('.', 1)[-1]})"
            if self.module
            else "the model's own forward"
        )
        return f"node '{self.name}' ({self.op_name}, {mod})"


def load(template, value: Callable[[int], Any]):
    """``template`` with every :class:`Ref` replaced by ``value(ref.index)``."""
    if isinstance(template, Ref):
        return value(template.index)
    if isinstance(template, tuple):
        return tuple(load(t, value) for t in template)
    if isinstance(template, list):
        return [load(t, value) for t in template]
    if isinstance(template, dict):
        return {k: load(v, value) for k, v in template.items()}
    return template


def collect_refs(template, out: List[int]) -> None:
    """Appends to ``out`` the index of every :class:`Ref` in ``template`` not already there."""
    if isinstance(template, Ref):
        if template.index not in out:
            out.append(template.index)
    elif isinstance(template, (list, tuple)):
        for t in template:
            collect_refs(t, out)
    elif isinstance(template, dict):
        for t in template.values():
            collect_refs(t, out)


def plain(template):
    """fx's immutable containers as plain tuples, lists and dicts."""
    if isinstance(template, tuple) and not isinstance(template, Ref):
        return tuple(plain(t) for t in template)
    if isinstance(template, list):
        return [plain(t) for t in template]
    if isinstance(template, dict):
        return {k: plain(v) for k, v in template.items()}
    return template
