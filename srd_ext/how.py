"""How a model reached its decision: a tree of PFVs, each decomposed into its largest contributors.

:func:`how` explains ``x`` once and decomposes the relevance layer by layer (the bottom of the
paper's Figure 5): the root is the class's relevance at the encoder output; its children are the
``top`` PFVs of the first tree layer that contribute most to it; each of those is decomposed into
the PFVs of the next tree layer (:meth:`srd_ext.Explainer.decompose`), and so on. Every node keeps
what its shown children do not: ``rest`` (the other contributors) and ``unassigned`` (bias shares
no PFV carries), so ``sum(children) + rest + unassigned = relevance`` at every decomposed node.

One forward pass serves the whole tree. All nodes of one level are walked together as one batch of
unit seeds (the walk is linear in its seeds given the recorded forward: a seed of relevance R gives
R times the unit seed's maps), on the run repeated along the batch dim, down to the next tree layer
and to the input at once; the input maps are the nodes' effective receptive fields, whose support
gives each node's box.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import layers as L
from .checks import Target
from .explain import Explainer
from .walk import walk, walk_seeds

__all__ = ["how", "HowNode", "HowTree", "default_tree_layers", "erf_box"]

Box = Tuple[int, int, int, int]


@dataclass
class HowNode:
    """One PFV of the tree (the root: the class at the encoder output, ``position=None``).

    ``relevance``: its relevance in the explanation; ``share``: ``relevance`` over its parent's
    (1 at the root); ``box``: (y0, x0, y1, x1), the bounding box in image pixels (y1, x1
    exclusive) of its effective receptive field's support (:func:`erf_box`), or None when the
    boxes were not asked for or its ERF is zero. ``rest`` and ``unassigned`` are set on decomposed
    nodes: the relevance of the contributors not shown, and the bias share no PFV carries; None on
    the leaves, which are not decomposed."""

    layer: str
    position: Optional[Tuple[int, int]]
    relevance: float
    share: float
    box: Optional[Box] = None
    rest: Optional[float] = None
    unassigned: Optional[float] = None
    children: List["HowNode"] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layer": self.layer,
            "position": list(self.position) if self.position is not None else None,
            "relevance": self.relevance,
            "share": self.share,
            "box": list(self.box) if self.box is not None else None,
            "rest": self.rest,
            "unassigned": self.unassigned,
            "children": [c.to_dict() for c in self.children],
        }

    def _label(self) -> str:
        where = f"{self.layer} {tuple(self.position)}" if self.position is not None else self.layer
        box = f"  box y {self.box[0]}:{self.box[2]} x {self.box[1]}:{self.box[3]}" if self.box else ""
        return f"{where}  relevance {self.relevance:.4g} ({100 * self.share:.1f}% of parent){box}"

    def _lines(self, prefix: str) -> List[str]:
        out = []
        items: List[Union[HowNode, str]] = list(self.children)
        if self.rest is not None:
            items.append(f"rest {self.rest:.4g}, unassigned {self.unassigned:.4g}")
        for k, c in enumerate(items):
            last = k == len(items) - 1
            out.append(prefix + ("└── " if last else "├── ") + (c if isinstance(c, str) else c._label()))
            if not isinstance(c, str):
                out.extend(c._lines(prefix + ("    " if last else "│   ")))
        return out


@dataclass
class HowTree:
    """The tree of one image: ``image`` (its index in the batch), ``target`` (the class
    explained), ``layers`` (the tree layers, top down) and ``root``."""

    image: int
    target: int
    layers: List[str]
    root: HowNode

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(tree.to_dict())``)."""
        return {"image": self.image, "target": self.target, "layers": list(self.layers), "root": self.root.to_dict()}

    def nodes(self) -> List[HowNode]:
        """Every node, depth first from the root."""
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(n.children))
        return out

    def __str__(self) -> str:
        head = f"image {self.image}, class {self.target}: relevance {self.root.relevance:.4g}"
        if self.root.box:
            b = self.root.box
            head += f"  box y {b[0]}:{b[2]} x {b[1]}:{b[3]}"
        return "\n".join([head] + self.root._lines(""))


def erf_box(erf: Tensor, threshold: float = 0.01) -> List[Optional[Box]]:
    """Per map of ``erf`` (N, H, W): the bounding box (y0, x0, y1, x1), y1 and x1 exclusive, of
    the pixels whose ``|erf|`` exceeds ``threshold`` times the map's largest ``|erf|``; None for a
    zero map."""
    a = erf.detach().abs()
    peak = a.flatten(1).amax(1) if a.numel() else a.new_zeros(a.shape[0])
    mask = (a > threshold * peak.view(-1, 1, 1)) & (peak.view(-1, 1, 1) > 0)
    rows, cols = mask.any(2), mask.any(1)
    h, w = a.shape[1:]
    ar_h = torch.arange(h, device=a.device)
    ar_w = torch.arange(w, device=a.device)
    y0 = torch.where(rows, ar_h, h).amin(1).tolist()
    y1 = (torch.where(rows, ar_h, -1).amax(1) + 1).tolist()
    x0 = torch.where(cols, ar_w, w).amin(1).tolist()
    x1 = (torch.where(cols, ar_w, -1).amax(1) + 1).tolist()
    return [(a0, b0, a1, b1) if a1 > 0 else None for a0, b0, a1, b1 in zip(y0, x0, y1, x1)]


def default_tree_layers(g, plan, depth: int) -> List[int]:
    """The default tree layers, top down: the encoder output, then (where the input size has a
    "high" layer) one layer every path passes through halfway between the encoder and "high",
    then "high"; otherwise the next decomposition sites every path passes through. Cut short or
    continued down the sites every path passes through to give ``depth`` layers where it can."""
    enc = plan.encoder
    cuts = [i for i in reversed(L.layer_indices(g, plan)) if i < enc and i in g.cuts and g.nodes[i].site]
    try:
        high = L.high(g, plan)
    except ValueError:
        high = None
    chain = [enc]
    if high is not None and high < enc:
        between = [i for i in cuts if high < i]
        chain += ([between[len(between) // 2]] if between else []) + [high]
    chain += [i for i in cuts if i < chain[-1]]
    return chain[: max(depth, 1)]


def _tree_layers(g, plan, names: Optional[Sequence[str]], depth: int) -> List[int]:
    if names is None:
        return default_tree_layers(g, plan, depth)
    idx = [L.resolve(g, plan, n) for n in names][: max(depth, 1)]
    if not idx:
        raise ValueError("layers is empty")
    if g.input_index in idx:
        raise ValueError("the tree layers cannot include 'input' (its pixels are not PFVs)")
    for a, b, name in zip(idx, idx[1:], list(names)[1:]):
        if b >= a or not L.passes_through(g, a, b):
            raise ValueError(
                f"tree layer {name!r} is not below the layer before it on every path of the relevance: "
                "give layers top down, each one every path from the one above passes through"
            )
    return idx


def _no_autocast(x: Tensor):
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def how(
    model: Union[nn.Module, Explainer],
    x: Tensor,
    target: Target = None,
    *,
    depth: int = 3,
    top: int = 3,
    layers: Optional[Sequence[str]] = None,
    boxes: bool = True,
    threshold: float = 0.01,
    seeds_per_walk: int = 256,
    **explainer_options,
) -> List[HowTree]:
    """How-trees of ``x`` (B, C, H, W) for ``target`` (int, per-sample, or None: the predicted
    classes), one per image.

    ``layers``: the tree layers, top down (default: :func:`default_tree_layers`), each one that
    every path of the relevance from the layer above passes through; ``depth``: how many of them
    the tree goes down; ``top``: children per node (its largest contributors, by signed
    relevance; contributors of zero relevance are not shown). ``boxes``: give every node the box
    of its ERF's support above ``threshold`` times its peak (:func:`erf_box`); without boxes the
    walks stop at the deepest tree layer. ``seeds_per_walk``: at most this many nodes walk
    together (the walk's memory grows with it). ``model`` may be an :class:`Explainer`; otherwise
    ``explainer_options`` (``init``, ``bias_share``, ``encoder``) make one."""
    ex = model if isinstance(model, Explainer) else Explainer(model, **explainer_options)
    if isinstance(model, Explainer) and explainer_options:
        raise TypeError("pass the explainer's options to the Explainer, not to how()")
    if top < 1 or depth < 1:
        raise ValueError(f"top and depth must be >= 1, got top={top}, depth={depth}")
    ex._check_input(x)
    with torch.no_grad(), _no_autocast(x):
        g = ex.graph(x)
        plan = ex._plan(g)
        idx = _tree_layers(g, plan, layers, depth)
        extra = [g.input_index] if boxes else []
        _, _, _, run, t = ex._start(x, lambda g, plan: idx + extra, target, False)
        r0 = ex._initial(run, plan, t, None)
        b = x.shape[0]
        run.lost, run.lost_at = r0.new_zeros(b), {}
        maps = walk(run, {plan.encoder: r0}, [idx[0]] + extra)
        lost, run.lost, run.lost_at = dict(run.lost_at), None, {}
        total = r0.sum((1, 2))
        root_box = erf_box(maps[g.input_index], threshold) if boxes else [None] * b
        roots = [HowNode("class", None, float(total[n]), 1.0, root_box[n]) for n in range(b)]
        contrib, off = _map(maps, idx[0], g, b, x)
        unassigned = _unassigned(ex.bias_share, lost, idx[0], total, contrib) + off
        state = (torch.arange(b, device=x.device), contrib, unassigned)
        _grow(run, g, idx, roots, state, top, boxes, threshold, seeds_per_walk)
    names = [g.display_name(i) for i in idx]
    return [HowTree(n, int(t[n]), names, roots[n]) for n in range(b)]


def _map(maps: Dict[int, Tensor], i: int, g, n: int, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The map at layer ``i`` (its patch grid for a token sequence) and the relevance off it (at
    a class or other constant token, no PFV's: it counts as unassigned)."""
    m = maps.get(i)
    if m is None:
        return x.new_zeros((n,) + L.hw(g.nodes[i])), x.new_zeros(n)
    grid = L.to_map(g.nodes[i], m)
    return grid, m.flatten(1).sum(1) - grid.sum((1, 2))


def _unassigned(bias_share: str, lost: Dict[int, Tensor], i: int, relevance: Tensor, contrib: Tensor) -> Tensor:
    """The bias share no PFV of layer ``i`` carries: what the walk lost above it, or (biases not
    shared) whatever the contributions do not make up."""
    if bias_share == "none":
        return relevance - contrib.sum((1, 2))
    return lost.get(i, relevance * 0)


def _grow(run, g, idx, parents, state, top, boxes, threshold, per_walk) -> None:
    """Give every parent (N, one per row of ``contrib``, its contributions at tree layer
    ``idx[0]``) its children there, then do the same for the children one layer down: all the
    children of a level walk as one batch of unit seeds. ``state``: the parents' samples,
    contributions and unassigned shares."""
    sample, contrib, unassigned = state
    for level, i in enumerate(idx):
        name = g.display_name(i)
        n_par, h, w = contrib.shape
        vals, flat = contrib.flatten(1).topk(min(top, h * w), dim=1)
        keep = vals != 0
        rows = keep.nonzero()[:, 0]
        pos = torch.stack([flat[keep] // w, flat[keep] % w], 1)
        rel = vals[keep]
        rest = (contrib.sum((1, 2)) - torch.where(keep, vals, 0).sum(1)).tolist()
        un = unassigned.tolist()
        children = []
        for r, (y, xx), row in zip(rel.tolist(), pos.tolist(), rows.tolist()):
            par = parents[row]
            children.append(HowNode(name, (y, xx), r, r / par.relevance if par.relevance else 0.0))
            par.children.append(children[-1])
        for k, par in enumerate(parents):
            par.rest, par.unassigned = rest[k], un[k]
        child_sample = sample[rows]
        nxt = idx[level + 1] if level + 1 < len(idx) else None
        wanted = ([nxt] if nxt is not None else []) + ([g.input_index] if boxes else [])
        if not wanted or not children:
            return
        seeds = L.one_hot(run, i, pos, torch.ones_like(rel))
        maps, lost = walk_seeds(run, i, seeds, wanted, sample=child_sample, chunk=per_walk)
        if boxes:
            for c, box in zip(children, erf_box(maps[g.input_index], threshold)):
                c.box = box
        if nxt is None:
            return
        scale = rel.view(-1, 1, 1)
        unit, off = _map(maps, nxt, g, len(children), rel)
        contrib = scale * unit
        lost_n = {k: v * rel for k, v in lost.items()}
        unassigned = _unassigned(run.bias_share, lost_n, nxt, rel, contrib) + off * rel
        parents, sample = children, child_sample
