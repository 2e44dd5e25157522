"""One explanation's passes: the forward that keeps what the walk reads, and the walk.

:class:`Plan` is what one (graph, encoder) pair needs, computed once and kept on the graph: the
nodes the relevance field reaches, and the forward values the walk reads. :func:`forward` runs
the captured model and returns a :class:`Run` (the values, the records the rules left, the
settings). :func:`walk` carries relevance down from seeds at any nodes, through the rules' VJPs
and bias shares, turning the field into one relevance per pixel at every decomposition site
(docs/math.md). :func:`head_grad` is the true gradient through the head, for the initial
relevance.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .capture import Graph, Recorder
from .nodes import load
from .rules import from_nchw, pixel_sum, relevance_to_field, to_nchw
from .rules.activations import Activation

__all__ = ["Plan", "Run", "reach", "forward", "walk", "walk_seeds", "head_grad"]


# --------------------------------------------------------------------------------------------
# Per-graph analysis: the relevance path and what the forward keeps
# --------------------------------------------------------------------------------------------
class Plan:
    """What one (graph, encoder) pair needs: the encoder node, the nodes the relevance reaches,
    and the values the forward keeps for the walk."""

    def __init__(self, graph: Graph, encoder: int):
        self.graph = graph
        self.encoder = encoder
        nodes = graph.nodes
        self.main = reach(graph, [encoder])
        for i in sorted(self.main):
            n = nodes[i]
            if n.kind == "call":
                n.rule.check_main(n, graph)
        # Nodes whose forward records a contribution norm for their bias share (1x1 convs,
        # BatchNorms folding one, linear layers over channels).
        self.record_norms = sorted(
            i
            for i in self.main
            if nodes[i].kind == "call"
            and (
                nodes[i].params.get("pointwise")
                or nodes[i].op_name == "aten.linear"
                or (nodes[i].fused is not None and nodes[nodes[i].fused].params.get("pointwise"))
            )
        )
        keep: Set[int] = {graph.input_index, encoder, graph.output_index}
        enc = nodes[encoder]
        if enc.site:
            keep.add(enc.z_input)
        for n in nodes:
            if n.kind == "param" or (n.kind == "call" and not n.data):
                keep.add(n.index)
            elif n.data and n.index > encoder:
                keep.add(n.index)  # the head: its gradient reads every value
        dropped_sites = set()
        for i in self.main:
            n = nodes[i]
            if n.kind != "call":
                continue
            keep.update(n.rule.needs(n, graph))
            if n.site:
                keep.add(n.z_input)
                if isinstance(n.rule, Activation) and i != encoder:
                    dropped_sites.add(i)
                else:
                    keep.add(i)
        self.recompute = dropped_sites
        self.keep = keep - (dropped_sites - {encoder})
        # Pre-activations read only by their site: freed once the site has used them.
        own = set()
        for i in self.main:
            n = nodes[i]
            if n.kind == "call":
                own.update(j for j in n.rule.needs(n, graph) if j == i)
        self.free_z = {
            nodes[i].z_input
            for i in self.main
            if nodes[i].site and nodes[i].z_input not in own and graph.users[nodes[i].z_input] == [i]
        }
        self.high: Dict[tuple, int] = {}

    def keep_for(self, wanted: Iterable[int]) -> Set[int]:
        return self.keep | set(wanted)


def reach(graph: Graph, starts: Iterable[int]) -> Set[int]:
    """Nodes the relevance field reaches walking back from ``starts``."""
    seen, stack = set(), list(starts)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = graph.nodes[i]
        if n.kind == "input":
            continue
        stack.extend(j for j in n.field_inputs if graph.nodes[j].data)
    return seen


# --------------------------------------------------------------------------------------------
# One explanation's state
# --------------------------------------------------------------------------------------------
class Run:
    """Forward values, records and settings of one explanation, as the rules read them."""

    def __init__(
        self,
        graph: Graph,
        values: List[Any],
        records: Dict[int, Any],
        indices: Dict[int, Tensor],
        shapes: List[Any],
        bias_share: str,
        create_graph: bool,
    ):
        self.graph = graph
        self.values = values
        self.records = records
        self.indices = indices
        self.shapes = shapes
        self.bias_share = bias_share
        self.create_graph = create_graph
        self._check_zero = not torch.compiler.is_compiling() and not create_graph
        self.lost: Optional[Tensor] = None  # per sample: relevance no pixel could carry
        self.lost_at: Dict[int, Tensor] = {}  # ``lost`` as the walk reached each wanted node
        self.free_z: Set[int] = set()  # pre-activations to free once their site has used them

    def note_lost(self, t: Tensor) -> None:
        self.lost = self.lost + t.detach()

    def take(self, index: Tensor, low: int, high: int) -> "Run":
        """A run whose sample n is this run's sample ``index[n]``, for walks between nodes
        ``low`` and ``high``: the walk is linear in its seeds given the recorded forward, so
        several seeds of one sample are walked at once by repeating that sample's values, records
        and shapes along the batch dim. Values of data nodes outside ``low..high`` are left out
        (reading one raises); parameters and constants are shared."""
        nodes = self.graph.nodes
        b = self.shapes[self.graph.input_index][0]

        def bdim(i):
            lay = nodes[i].layout
            return lay[0] if lay is not None else 0

        values: List[Any] = []
        for i, v in enumerate(self.values):
            if not nodes[i].data:
                values.append(v)
            else:
                values.append(_take(v, bdim(i), index, b) if low <= i <= high else None)
        records = {i: _take(v, bdim(i), index, b) for i, v in self.records.items() if low <= i <= high}
        indices = {i: _take(v, bdim(i), index, b) for i, v in self.indices.items() if low <= i <= high}
        shapes = [_take_shape(s, bdim(i), len(index), b) if nodes[i].data else s for i, s in enumerate(self.shapes)]
        run = Run(self.graph, values, records, indices, shapes, self.bias_share, self.create_graph)
        run.free_z = self.free_z
        return run

    def value(self, i: int):
        v = self.values[i]
        if v is None:
            n = self.graph.nodes[i]
            if n.kind == "call" and n.site and isinstance(n.rule, Activation):
                v = n.target(*self.load(n.args), **self.load(n.kwargs))
                self.values[i] = v
            else:
                raise RuntimeError(f"srd_ext: the value of {n.where()} was not kept for the walk")
        return v

    def shape(self, i: int):
        return self.shapes[i]

    def dtype(self, i: int):
        v = self.values[i]
        return v.dtype if isinstance(v, Tensor) else self.graph.nodes[i].dtype

    def load(self, template, override: Optional[Dict[int, Any]] = None):
        """``template`` filled in with forward values (``override`` first, where it has one)."""
        if not override:
            return load(template, self.value)
        return load(template, lambda i: override[i] if i in override else self.value(i))

    def skip_zero_bias(self, b) -> bool:
        """A zero bias shares nothing: skip its work (checked outside compiled code only)."""
        if not self._check_zero or not isinstance(b, Tensor) or b.device.type != "cpu":
            return False
        return not bool(b.any())


def _take(v, dim: int, index: Tensor, b: int):
    """``v`` (a tensor, or a tuple of them) with its batch dim ``dim`` (of size ``b``) indexed."""
    if isinstance(v, Tensor):
        return v.index_select(dim, index) if v.dim() > dim and v.shape[dim] == b else v
    if isinstance(v, tuple):
        return tuple(_take(t, dim, index, b) for t in v)
    return v


def _take_shape(s, dim: int, n: int, b: int):
    if isinstance(s, torch.Size):
        return torch.Size(n if d == dim and k == b else k for d, k in enumerate(s))
    if isinstance(s, tuple):
        return tuple(_take_shape(t, dim, n, b) for t in s)
    return s


def _add(store: Dict[int, Any], i: int, t) -> None:
    if isinstance(t, dict):
        cur = store.get(i)
        if cur is None:
            store[i] = dict(t)
        else:
            for k, v in t.items():
                cur[k] = v if k not in cur else cur[k] + v
        return
    store[i] = t if i not in store else store[i] + t


# --------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------
def forward(
    g: Graph,
    plan: Plan,
    x: Tensor,
    wanted: Iterable[int],
    *,
    model: nn.Module,
    bias_share: str,
    create_graph: bool,
) -> Run:
    """Run the model on ``x`` keeping what the walk down to the ``wanted`` nodes reads."""
    wanted = list(wanted)
    rec = Recorder()
    records: Dict[int, Any] = {}
    shapes: List[Any] = []
    lowest = min(wanted)
    record = set() if bias_share != "contribution" else {i for i in plan.record_norms if i >= lowest}
    values = g.forward(x, rec, keep=plan.keep_for(wanted), records=records, shapes=shapes, model=model, record=record)
    run = Run(g, values, records, rec.indices, shapes, bias_share, create_graph)
    run.free_z = plan.free_z
    for i in plan.recompute:
        if i not in wanted:
            values[i] = None
    return run


def walk(run: Run, seeds: Dict[int, Tensor], wanted: Iterable[int], free: bool = False) -> Dict[int, Tensor]:
    """Relevance walk from ``seeds`` (relevance (B, H, W) at nodes) down to the lowest wanted
    node; returns the relevance (B, H, W) at every wanted node."""
    g = run.graph
    nodes = g.nodes
    wanted = set(wanted)
    lowest = min(wanted)
    field: Dict[int, Any] = {}
    extra: Dict[int, Tensor] = dict(seeds)
    out: Dict[int, Tensor] = {}
    with_bias = run.bias_share != "none"
    for i in range(max(seeds), lowest - 1, -1):
        g_i = field.pop(i, None)
        e = extra.pop(i, None)
        if g_i is None and e is None:
            continue
        n = nodes[i]
        if n.kind == "input":
            x = run.value(i)
            r = pixel_sum(x * g_i, n.layout) if g_i is not None else torch.zeros_like(e)
            out[i] = r + e if e is not None else r
            if run.lost is not None:
                run.lost_at[i] = run.lost
            break
        if n.site:
            a = run.value(i)
            z = run.value(n.z_input)
            lay = n.layout
            a4, z4 = to_nchw(a, lay), to_nchw(z, lay)
            G4 = to_nchw(g_i, lay) if g_i is not None else torch.zeros_like(a4)
            relevance, gz = ops.activation_share(a4, G4, z4, e)
            if i in wanted:
                out[i] = relevance
                if run.lost is not None:
                    run.lost_at[i] = run.lost
            if run.lost is not None:
                run.note_lost(torch.where((z4 * z4).sum(1) > 0, 0, relevance).sum((1, 2)))
            del a4, z4, G4, g_i
            if free:
                run.values[i] = None
                if n.z_input in run.free_z and n.z_input not in wanted:
                    run.values[n.z_input] = None
            _add(field, n.z_input, from_nchw(gz, lay, z.shape))
            del z, a, gz
        else:
            if e is not None:
                v = run.value(i)
                f = relevance_to_field(e, v, n.layout)
                g_i = f if g_i is None else g_i + f
                if run.lost is not None:
                    v4 = to_nchw(v, n.layout)
                    run.note_lost(torch.where((v4 * v4).sum(1) > 0, 0, e).sum((1, 2)))
            if i in wanted:
                out[i] = pixel_sum(run.value(i) * g_i, n.layout)
                if run.lost is not None:
                    run.lost_at[i] = run.lost
            for j, f in n.rule.vjp(n, g_i, run):
                _add(field, j, f)
            if with_bias:
                for j, r in n.rule.bias(n, g_i, run):
                    _add(extra, j, r)
        if free:
            run.values[i] = None
        if i == lowest:
            break
    return out


def walk_seeds(
    run: Run,
    at: int,
    seeds: Tensor,
    wanted: Iterable[int],
    sample: Optional[Tensor] = None,
    chunk: Optional[int] = None,
):
    """Walk N seeds at node ``at`` (relevance in the walk's form there, N first: one-hot seeds
    from :func:`srd_ext.layers.one_hot`) down to the ``wanted`` nodes; seed n belongs to sample
    ``sample[n]`` (default: seed n to sample n). Returns the maps {node: (N, ...)} and the
    relevance left unassigned (N,) above each wanted node. Several seeds of one sample walk
    together on a run repeated along the batch dim (:meth:`Run.take`), at most ``chunk`` seeds
    per walk (memory grows with it)."""
    n_seeds = seeds.shape[0]
    if chunk is None or n_seeds <= chunk or sample is None:
        return _walk_seeds(run, at, seeds, wanted, sample)
    parts = [
        _walk_seeds(run, at, seeds[a : a + chunk], wanted, sample[a : a + chunk]) for a in range(0, n_seeds, chunk)
    ]
    maps = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    lost = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    return maps, lost


def _walk_seeds(run: Run, at: int, seeds: Tensor, wanted: Iterable[int], sample):
    g = run.graph
    wanted = sorted(set(wanted))
    nodes = g.nodes
    n_seeds = seeds.shape[0]
    b = run.shapes[g.input_index][0]
    if sample is not None and not (n_seeds == b and bool((sample == torch.arange(b, device=sample.device)).all())):
        if any(n.layout is not None and len(n.layout) != 3 for n in nodes):
            return _walk_rounds(run, at, seeds, wanted, sample)
        low = min(nodes[k].z_input if nodes[k].site else k for k in wanted)
        run = run.take(sample.to(seeds.device), low, at)
    run.lost, run.lost_at = seeds.new_zeros(n_seeds), {}
    try:
        maps = walk(run, {at: seeds}, wanted)
        lost = dict(run.lost_at)
    finally:
        run.lost, run.lost_at = None, {}
    return maps, lost


def _walk_rounds(run: Run, at: int, seeds: Tensor, wanted, sample: Tensor):
    """The seeds walked in rounds on the run as it is, round r holding the r-th seed of every
    sample (zero where a sample has fewer): for graphs whose values :meth:`Run.take` cannot
    repeat safely (token sequences, whose batch dim moves between the heads' tensors)."""
    b = run.shapes[run.graph.input_index][0]
    rank = torch.zeros_like(sample)
    for s in sample.unique().tolist():
        where = (sample == s).nonzero()[:, 0]
        rank[where] = torch.arange(where.numel(), device=sample.device)
    maps: Dict[int, Tensor] = {}
    lost: Dict[int, Tensor] = {}
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):
        pick = (rank == r).nonzero()[:, 0]
        batch = seeds.new_zeros((b,) + tuple(seeds.shape[1:]))
        batch[sample[pick]] = seeds[pick]
        m, l = _walk_seeds(run, at, batch, wanted, None)
        for k, v in m.items():
            maps.setdefault(k, v.new_zeros((seeds.shape[0],) + tuple(v.shape[1:])))[pick] = v[sample[pick]]
        for k, v in l.items():
            lost.setdefault(k, v.new_zeros(seeds.shape[0]))[pick] = v[sample[pick]]
    return maps, lost


def head_grad(run: Run, weights: Tensor, stop: int) -> Tensor:
    """Gradient of ``sum(weights * logits)`` at node ``stop`` (the encoder output)."""
    g = run.graph
    field: Dict[int, Any] = {g.output_index: weights}
    for i in range(g.output_index, stop - 1, -1):
        gi = field.pop(i, None)
        if gi is None:
            continue
        if i == stop:
            return gi
        n = g.nodes[i]
        if n.kind == "output":
            _add(field, n.inputs[0], gi)
            continue
        for j, gr in n.rule.grad(n, gi, run):
            if g.nodes[j].data and j >= stop:
                _add(field, j, gr)
    return torch.zeros_like(run.value(stop))
