"""Deep copies of a model re-traced with torch.fx so that a library's rule applies to every layer:
one non-inplace ``nn.ReLU`` per ReLU call, optionally BatchNorm folded into the preceding conv and
tensor additions turned into captum's ``Addition_Module``. The model itself is never modified."""

from __future__ import annotations

import copy
import operator
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import require

__all__ = ["fx_adapt", "has_functional_relu", "lrp_copy", "is_relu"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def is_relu(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_tensor_add(node: torch.fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__")
    )
    return is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    k, name = 1, f"{base}_use1"
    while name in taken:
        k += 1
        name = f"{base}_use{k}"
    return name


def fx_adapt(
    model: nn.Module, *, fold_bn: bool = False, add_modules: bool = False
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
        left = sum(
            1
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
        )
        if n_bn:
            done.append(f"{n_bn - left} BatchNorm2d folded into convs" + (f", {left} left" if left else ""))
    modules = dict(gm.named_modules())
    seen: Dict[str, int] = {}
    n_inplace = n_split = n_func = n_add = 0
    for node in list(gm.graph.nodes):
        if is_relu(node, modules):
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


def has_functional_relu(model: nn.Module) -> bool:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return False  # untraceable: run as it is
    modules = dict(gm.named_modules())
    return any(is_relu(n, modules) and n.op != "call_module" for n in gm.graph.nodes)


def lrp_copy(model: nn.Module) -> Tuple[torch.fx.GraphModule, List[str]]:
    """The copy captum's LRP runs on: BatchNorm folded, one ReLU module per use, additions as
    ``Addition_Module`` (eval mode)."""
    require("captum.attr")
    gm, changes = fx_adapt(model, fold_bn=True, add_modules=True)
    return gm.eval(), changes
