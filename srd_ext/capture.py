"""Graph capture: how a model is walked.

A model is exported once per input signature with ``torch.export`` into a graph of ATen ops
(:class:`Graph`), whatever modules wrote them: torchvision and timm blocks, functional code,
modules reused several times, in-place ops. Every node of the graph gets the rule of its op from
the registry in :mod:`srd_ext.rules`; the graph runs the model's forward itself
(:meth:`Graph.forward`), reading the model's live parameters by name at every call, so a training
loop's updates are seen. Activation and max-pool nodes call an :class:`Instrument`, through which
the SRD explainer (max-pool indices) and APOP (activation patterns) record and replay.

The capture never changes the model. While it exports, every module's ``training`` flag reads
False (Dropout and stochastic depth are traced as the identity); the flags are restored when the
export returns, also on error. A BatchNorm in training mode is refused before that: SRD needs
the fixed affine map of eval mode.

What the graph knows beyond the forward (all computed once per capture):

- ``data``: nodes that depend on the input (the rest reads only parameters and constants and is
  evaluated as a constant of the forward pass, e.g. NFNet's standardised conv weights);
- the relevance field's edges (a gate's side branch receives none), the decomposition sites
  (activation nodes on the field's path) and the nodes every path from the input to the output
  passes through (cuts, from the dominator tree);
- each tensor's pixel layout (which dims are batch, height and width; the rest are channels),
  followed through permutes and reshapes, so that channels-last blocks work like NCHW ones;
- the names users know: module paths (``layer2``, ``features.22``), ``path@k`` for the k-th call
  of a reused module (also written ``path_with_underscores_k``), and ATen node names.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import rules
from .nodes import Node, Ref, UnsupportedModelError, collect_refs, load, plain

__all__ = [
    "Graph",
    "Node",
    "Instrument",
    "Recorder",
    "capture",
    "graph_for",
    "unwrap",
    "UnsupportedModelError",
    "Ref",
]


class Instrument:
    """Hooks called by :meth:`Graph.forward` at every activation and max-pool node.

    The default runs the op and records nothing; subclasses record (SRD, APOP) or replace (APOP
    replay, binarization) what the node outputs. ``fn`` computes the node's normal output.
    """

    def activation(self, node: Node, z: Tensor, fn: Callable[[Tensor], Tensor], args: tuple = ()) -> Tensor:
        """``args``: the node's evaluated arguments (``args[0]`` is ``z``)."""
        return fn(z)

    def maxpool(self, node: Node, x: Tensor, fn: Callable[[Tensor], Tuple[Tensor, Tensor]]) -> Tensor:
        return fn(x)[0]


class Recorder(Instrument):
    """Runs the model unchanged, recording each max-pool's argmax indices (which SRD's max-pool
    rule needs)."""

    def __init__(self):
        self.indices: Dict[int, Tensor] = {}

    def maxpool(self, node, x, fn):
        out, idx = fn(x)
        self.indices[node.index] = idx
        return out


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------
class Graph:
    """A captured model for one input signature: nodes in topological order and the forward
    that runs them, with the analyses SRD needs."""

    def __init__(self, model: nn.Module, nodes: List[Node], signature):
        self.model_ref = weakref.ref(model)
        self.nodes = nodes
        self.signature = signature
        self.input_index = next(n.index for n in nodes if n.kind == "input")
        # the batch size may vary between calls (export kept the batch dim symbolic)
        self.dynamic_batch = bool(nodes[self.input_index].params.get("dynamic_batch"))
        self.output_index = next(n.index for n in nodes if n.kind == "output")
        self.users: List[List[int]] = [[] for _ in nodes]
        for n in nodes:
            for i in n.inputs:
                self.users[i].append(n.index)
        self.last_use = [-1] * len(nodes)
        for n in nodes:
            for i in n.inputs:
                self.last_use[i] = max(self.last_use[i], n.index)
        self.plans: Dict[Any, Any] = {}  # the explainer's per-encoder analyses
        self.cuts: set = set()  # nodes every path from the input to the output passes through
        self.default_encoder: Optional[int] = None  # chosen once, by the explainer
        self._names: Optional[Dict[str, int]] = None
        self._display: Optional[Dict[int, str]] = None
        self._ambiguous: Dict[str, List[str]] = {}

    @property
    def model(self) -> nn.Module:
        m = self.model_ref()
        if m is None:
            raise RuntimeError("the captured model no longer exists")
        return m

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        instrument: Optional[Instrument] = None,
        keep: Optional[Sequence[int]] = None,
        stop: Optional[int] = None,
        records: Optional[Dict[int, Any]] = None,
        shapes: Optional[List[Any]] = None,
        model: Optional[nn.Module] = None,
        record: Optional[set] = None,
    ) -> List[Any]:
        """Run the nodes on ``x``; returns every node's value (values not in ``keep`` are dropped
        once no later node reads them, to bound memory). ``stop``: last node to run.
        ``records``: where rules leave what the walk needs (e.g. a layer norm's 1/sigma);
        ``shapes``: a list that receives every value's shape; ``record``: the nodes whose
        optional records (a 1x1 conv's contribution norms) the walk will read."""
        instrument = instrument or Instrument()
        model = self.model if model is None else model
        values: List[Any] = [None] * len(self.nodes)
        keep_set = set(keep) if keep is not None else None
        ctx = _ForwardContext(instrument, records, self, values, record or ())
        last_use = self.last_use
        for n in self.nodes:
            k = n.kind
            if k == "param":
                values[n.index] = n.binder(model)
            elif k == "input":
                values[n.index] = x
            elif k == "output":
                values[n.index] = values[n.inputs[0]]
            else:
                args = load(n.args, values.__getitem__)
                kwargs = load(n.kwargs, values.__getitem__) if n.kwargs else {}
                values[n.index] = n.rule.forward(n, args, kwargs, ctx)
            if shapes is not None:
                shapes.append(_shape_of(values[n.index]))
            if keep_set is not None:
                for i in n.inputs:
                    if last_use[i] == n.index and i not in keep_set:
                        values[i] = None
            if stop is not None and n.index == stop:
                break
        return values

    # -- names ------------------------------------------------------------------------------
    def _build_names(self) -> None:
        names: Dict[str, int] = {}
        display: Dict[int, str] = {}
        groups: Dict[Tuple[str, int], List[int]] = {}
        calls: Dict[str, set] = {}
        for n in self.nodes:
            if not n.data or n.kind != "call":
                continue
            for scope in n.scopes:
                groups.setdefault(scope, []).append(n.index)
                calls.setdefault(scope[0], set()).add(scope[1])
        outputs: Dict[Tuple[str, int], int] = {}
        for scope, members in groups.items():
            inside = set(members)
            out = [i for i in members if any(u not in inside for u in self.users[i])]
            outputs[scope] = max(out) if out else max(members)
        for (path, call), idx in sorted(outputs.items(), key=lambda kv: kv[1]):
            reused = len(calls[path]) > 1
            canonical = f"{path}@{call}" if reused else path
            names[canonical] = idx
            if reused:
                names.setdefault(f"{path.replace('.', '_')}_{call}" if call else path.replace(".", "_"), idx)
                self._ambiguous.setdefault(path, []).append(canonical)
            display.setdefault(idx, canonical)  # the outermost module whose output it is
        for n in self.nodes:
            if n.data and n.kind == "call":
                names.setdefault(n.name, n.index)
                display.setdefault(n.index, n.name)
        self._names, self._display = names, display

    def resolve(self, name: str) -> int:
        """Node index of a module path, ``path@k``, ``path_k`` or ATen node name."""
        if self._names is None:
            self._build_names()
        if name in self._ambiguous:
            raise ValueError(
                f"module {name!r} is used {len(self._ambiguous[name])} times in the forward; name "
                f"one use: {self._ambiguous[name]}"
            )
        if name not in self._names:
            raise KeyError(name)
        return self._names[name]

    def display_name(self, index: int) -> str:
        if self._display is None:
            self._build_names()
        if index == self.input_index:
            return "input"
        return self._display.get(index, self.nodes[index].name)

    def module_of(self, index: int) -> Optional[str]:
        """The outermost module path whose (single) call outputs node ``index``, if any."""
        if self._names is None:
            self._build_names()
        best = None
        for name, i in self._names.items():
            if i == index and "@" not in name and name in _module_paths(self.model):
                if best is None or name.count(".") < best.count("."):
                    best = name
        return best

    # -- analyses ---------------------------------------------------------------------------
    def activation_nodes(self) -> List[Node]:
        """Every activation node that depends on the input (sites and gate branches)."""
        return [n for n in self.nodes if n.data and n.kind == "call" and n.rule.is_activation]


def _module_paths(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


class _ForwardContext:
    """What a rule's forward sees besides its arguments: the instrument, where to leave records
    for the walk (None outside an explanation), the graph and the values computed so far."""

    __slots__ = ("instrument", "records", "graph", "values", "record")

    def __init__(self, instrument, records, graph, values, record=()):
        self.instrument = instrument
        self.records = records
        self.graph = graph
        self.values = values
        self.record = record

    def wants_record(self, node) -> bool:
        """Whether the walk will read this node's optional record."""
        return self.records is not None and node.index in self.record


def _shape_of(v):
    if isinstance(v, Tensor):
        return v.shape
    if isinstance(v, (tuple, list)):
        return tuple(t.shape if isinstance(t, Tensor) else None for t in v)
    return None


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (OptimizedModule), DataParallel and
    DistributedDataParallel wrappers, which explain the same function."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


def check_eval(model: nn.Module) -> None:
    """SRD needs BatchNorm's fixed affine map of eval mode."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise ValueError(
                f"BatchNorm at '{name}' is in training mode: SRD needs the fixed affine map of "
                "eval mode; call model.eval() first"
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise UnsupportedModelError(
                f"BatchNorm at '{name}' has no running statistics (track_running_stats=False): its "
                "output depends on the whole batch, so no explanation of one image exists"
            )


@contextlib.contextmanager
def _all_eval(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, t in flags:
            m.training = t


def signature_of(x: Tensor) -> tuple:
    return (tuple(x.shape[1:]), x.dtype, x.device)


def structure_key(model: nn.Module) -> tuple:
    """Changes when modules are replaced, added or removed, or parameters change shape, dtype or
    device: the cached captures are then invalid."""
    mods = tuple((name, id(m)) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in model.state_dict(keep_vars=True).items())
    return mods, tensors


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def graph_for(model: nn.Module, x: Tensor) -> Graph:
    """The cached capture of ``model`` for inputs shaped like ``x`` (one per model, structure
    and input signature; dropped with the model). Under ``torch.compile`` the capture must exist
    already: call once eagerly first."""
    model = unwrap(model)
    entry = _CACHE.get(model)
    sig = signature_of(x)

    def cached(entry) -> Optional[Graph]:
        for (s, batch), g in entry["graphs"].items() if entry is not None else ():
            if s == sig and (batch is None or batch == x.shape[0]):
                return g
        return None

    if torch.compiler.is_compiling():
        g = cached(entry)
        if g is not None:
            return g
        raise RuntimeError(
            "srd_ext captures a model with torch.export, which cannot run inside torch.compile: "
            "call the explainer once eagerly on an input of this shape before compiling"
        )
    check_eval(model)
    skey = structure_key(model)
    if entry is None or entry["structure"] != skey:
        entry = {"structure": skey, "graphs": {}}
        _CACHE[model] = entry
    g = cached(entry)
    if g is not None:
        return g
    g = capture(model, x)
    static_batch = None if g.dynamic_batch else x.shape[0]
    entry["graphs"][(sig, static_batch)] = g
    return g


def capture(model: nn.Module, x: Tensor) -> Graph:
    """Export ``model`` for inputs shaped like ``x`` and build its :class:`Graph` (uncached; see
    :func:`graph_for`). The model is not modified."""
    model = unwrap(model)
    check_eval(model)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a batched tensor")
    example = torch.zeros((2,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _all_eval(model), _attention_as_sdpa(model), torch.no_grad(), _quiet_export():
        try:
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        except Exception as e:  # noqa: BLE001 - any failure of export is the user's to see
            raise UnsupportedModelError(
                f"torch.export could not capture {type(model).__name__} for inputs of shape "
                f"{tuple(x.shape)}: {type(e).__name__}: {_first_line(e)}"
            ) from e
        try:
            nodes = _build(model, ep)
        except _NeedsFunctionalGraph:
            nodes = _build(model, ep.run_decompositions({}))
    g = Graph(model, nodes, signature_of(x))
    rules.analyse(g)
    return g


def _mha_forward(
    m: nn.MultiheadAttention,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    """``nn.MultiheadAttention`` self-attention written batch first, as timm writes attention:
    one in-projection, heads split off the channels, ``scaled_dot_product_attention`` (or, where
    the weights are returned, ``softmax(q k^T * scale) @ v``), the out-projection. The same
    function as the module's own forward, whose graph merges the batch dim with the heads and the
    tokens, so that no token layout could be followed through it. Other uses run the module's
    own forward."""
    own = type(m).forward
    batched = isinstance(query, Tensor) and query.dim() == 3
    mask_ok = attn_mask is None or (attn_mask.dim() == 2 and not is_causal)
    if not (
        batched
        and query is key
        and key is value
        and key_padding_mask is None
        and mask_ok
        and m._qkv_same_embed_dim
        and m.in_proj_weight is not None
        and m.bias_k is None
        and not m.add_zero_attn
        and not (m.training and m.dropout > 0)
    ):
        return own(m, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    F = torch.nn.functional
    x = query if m.batch_first else query.transpose(0, 1)
    b, n, e = x.shape
    h = m.num_heads
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # the module's True masks out, scaled_dot_product_attention's True attends
    weights = None
    if need_weights:
        logits = (q * (e // h) ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        a = logits.softmax(-1)
        o = a @ v
        weights = a.mean(1) if average_attn_weights else a
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = F.linear(o.transpose(1, 2).reshape(b, n, e), m.out_proj.weight, m.out_proj.bias)
    return (o if m.batch_first else o.transpose(0, 1)), weights


@contextlib.contextmanager
def _attention_as_sdpa(model: nn.Module) -> Iterator[None]:
    """While exporting, every ``nn.MultiheadAttention`` runs :func:`_mha_forward` (an instance
    attribute, removed afterwards, also on error)."""
    mods = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and "forward" not in m.__dict__]
    try:
        for m in mods:
            m.forward = functools.partial(_mha_forward, m)
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


class _NeedsFunctionalGraph(Exception):
    """An in-place op whose effect on aliases the simple rewrite cannot follow."""


@contextlib.contextmanager
def _quiet_export():
    import logging
    import warnings

    logger = logging.getLogger("torch._export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def _functional_target(target):
    """``aten.relu_.default`` -> ``aten.relu.default`` (None if there is none)."""
    packet = target.overloadpacket
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    base = getattr(torch.ops.aten, name[:-1], None)
    if base is None:
        return None
    return getattr(base, target._overloadname, None)


def _mutated_arg(target) -> Optional[int]:
    if not isinstance(target, torch._ops.OpOverload):
        return None
    for i, a in enumerate(target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return i
    return None


def _aliases_input(target) -> bool:
    """Whether the op's output may alias its first argument (a view)."""
    if not isinstance(target, torch._ops.OpOverload):
        return target is operator.getitem
    rets = target._schema.returns
    return any(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _scopes(fx_node) -> Tuple[Tuple[Tuple[str, int], ...], str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    scopes = []
    module, mtype = "", ""
    for key, val in stack.items():
        if not isinstance(val, tuple) or len(val) < 2:
            continue
        path, typ = val[0], val[1]
        if not path or path.startswith("_empty"):
            continue
        call = 0
        if "@" in str(key):
            try:
                call = int(str(key).rsplit("@", 1)[1])
            except ValueError:
                call = 0
        scopes.append((path, call))
        module, mtype = path, typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return tuple(scopes), module, mtype


def _param_binder(fqn: str) -> Callable[[nn.Module], Tensor]:
    """Reads a parameter or buffer of the live model by its path (attribute by attribute, so
    that torch.compile sees where it comes from)."""
    path = tuple(fqn.split("."))

    def bind(m, path=path):
        for a in path:
            m = getattr(m, a)
        return m

    return bind


def _const_binder(value: Tensor) -> Callable[[nn.Module], Tensor]:
    return lambda _model, value=value: value


def _inplace_redirects(fx_nodes) -> Dict[str, str]:
    """Functionalise in-place ops: mutated tensor name -> the in-place op whose result later
    reads of it read. Raises :class:`_NeedsFunctionalGraph` where another alias of the mutated
    tensor is read later (the simple rewrite cannot follow that)."""
    position = {n.name: i for i, n in enumerate(fx_nodes)}
    redirect: Dict[str, str] = {}
    base_of: Dict[str, str] = {}
    for fx in fx_nodes:
        if fx.op == "call_function":
            first = fx.args[0] if fx.args and isinstance(fx.args[0], torch.fx.Node) else None
            if first is not None and _aliases_input(fx.target):
                base_of[fx.name] = base_of.get(first.name, first.name)
    for fx in fx_nodes:
        if fx.op != "call_function":
            continue
        m = _mutated_arg(fx.target)
        if m is None:
            continue
        tgt = fx.args[m] if m < len(fx.args) else None
        if not isinstance(tgt, torch.fx.Node) or tgt.op == "placeholder" or _functional_target(fx.target) is None:
            raise _NeedsFunctionalGraph(fx.name)
        root = base_of.get(tgt.name, tgt.name)
        for other in fx_nodes[position[fx.name] + 1 :]:
            for r in (a.name for a in other.all_input_nodes):
                if r in (fx.name, tgt.name):
                    continue
                if base_of.get(r, r) == root or r == root:
                    raise _NeedsFunctionalGraph(fx.name)  # another alias of the mutated tensor
        redirect[tgt.name] = fx.name
    return redirect


def _example_shape(meta) -> Tuple[Optional[Tuple[int, ...]], Optional[torch.dtype]]:
    if not isinstance(meta, Tensor):
        return None, None
    shape = tuple(int(d) if not isinstance(d, torch.SymInt) else int(d.node.hint or 2) for d in meta.shape)
    return shape, meta.dtype


def _placeholder_node(i: int, fx, spec, ep) -> Node:
    """The model's input, or a parameter, buffer or constant it reads."""
    meta = fx.meta.get("val")
    shape, dtype = _example_shape(meta)
    kind = spec.kind.name if spec is not None else "USER_INPUT"
    if kind == "USER_INPUT":
        node = Node(i, "x", "input", shape=shape, dtype=dtype)
        node.params = {"dynamic_batch": isinstance(meta, Tensor) and isinstance(meta.shape[0], torch.SymInt)}
        return node
    if kind in ("PARAMETER", "BUFFER"):
        return Node(
            i, fx.name, "param", binder=_param_binder(spec.target), shape=shape, dtype=dtype, module=spec.target
        )
    if kind == "CONSTANT_TENSOR":
        return Node(i, fx.name, "param", binder=_const_binder(ep.constants[spec.target]), shape=shape, dtype=dtype)
    raise UnsupportedModelError(f"the model's forward reads a {kind.lower()} ('{fx.name}'), which srd_ext cannot bind")


def _call_node(i: int, fx, ref_of: Callable[[torch.fx.Node], Ref]) -> Node:
    """An op, its arguments stored as a template of :class:`Ref` to the nodes it reads."""
    target = fx.target
    if _mutated_arg(target) is not None:
        target = _functional_target(target)
    args = torch.fx.node.map_arg(fx.args, ref_of)
    kwargs = dict(torch.fx.node.map_arg(fx.kwargs, ref_of))
    ins: List[int] = []
    collect_refs((args, kwargs), ins)
    scopes, module, mtype = _scopes(fx)
    meta = fx.meta.get("val")
    shape, dtype = _example_shape(meta)
    return Node(
        i,
        fx.name,
        "call",
        target=target,
        args=plain(args),
        kwargs=plain(kwargs),
        inputs=ins,
        scopes=scopes,
        module=module,
        module_type=mtype,
        shape=shape,
        dtype=dtype,
        example=meta,
    )


# Regions export wraps in a submodule to run them under another autocast or grad mode (e.g. an
# attention kept in float32 by ``torch.autocast(enabled=False)``). An explanation runs in the
# model's own dtype with autocast off (explain.py) and without grad mode for the model's ops, so
# a wrapped region computes what it computes inline.
_INLINED_WRAPPERS = ("wrap_with_autocast", "wrap_with_set_grad_enabled", "wrap")


def _wrapped_region(fx) -> Optional[Tuple[torch.fx.Node, tuple]]:
    """(the get_attr node of the submodule, its operands) when ``fx`` calls a wrapped region."""
    if fx.op != "call_function" or not isinstance(fx.target, torch._ops.HigherOrderOperator):
        return None
    if fx.target.name() not in _INLINED_WRAPPERS:
        return None
    for k, a in enumerate(fx.args):
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            return a, tuple(fx.args[k + 1 :])
    return None


def _inline_wrapped_regions(graph_module: torch.fx.GraphModule) -> None:
    """Replace every call of a wrapped region by the region's own nodes (in place, repeatedly,
    so that nested regions are inlined too). Any other higher-order op is left for the rules,
    which refuse it with the node named."""
    graph = graph_module.graph
    changed = True
    while changed:
        changed = False
        for fx in list(graph.nodes):
            region = _wrapped_region(fx)
            if region is None:
                continue
            attr, operands = region
            sub = getattr(graph_module, attr.target)
            env: Dict[torch.fx.Node, Any] = {}
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            env.update(zip(placeholders, operands))
            outputs = None
            with graph.inserting_before(fx):
                for sn in sub.graph.nodes:
                    if sn.op == "placeholder":
                        continue
                    if sn.op == "output":
                        outputs = torch.fx.node.map_arg(sn.args[0], lambda n: env[n])
                        break
                    if sn.op == "get_attr":  # a nested region's submodule
                        name = f"{attr.target}_{sn.target}"
                        setattr(graph_module, name, getattr(sub, sn.target))
                        env[sn] = graph.get_attr(name)
                        continue
                    env[sn] = graph.node_copy(sn, lambda n: env[n])
            outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
            for user in list(fx.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(outputs[user.args[1]])
                    graph.erase_node(user)
            if fx.users:
                raise UnsupportedModelError(
                    f"node '{fx.name}' ({fx.target.name()}) is read other than by index; srd_ext cannot "
                    "inline it. Rewrite the region without the autocast or grad-mode context if you can."
                )
            graph.erase_node(fx)
            if not attr.users:
                graph.erase_node(attr)
            changed = True
    graph.lint()


def _build(model: nn.Module, ep) -> List[Node]:
    """The nodes of an exported program, in order, each with the rule of its op."""
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    nodes: List[Node] = []
    index: Dict[str, int] = {}
    _inline_wrapped_regions(ep.graph_module)
    fx_nodes = list(ep.graph.nodes)
    position = {n.name: i for i, n in enumerate(fx_nodes)}
    redirect = _inplace_redirects(fx_nodes)

    def ref_of(n: torch.fx.Node, at: int) -> Ref:
        name = n.name
        # follow redirects made by in-place ops that ran before node ``at``
        while name in redirect and position[redirect[name]] < at:
            name = redirect[name]
        return Ref(index[name])

    for fx in fx_nodes:
        i, at = len(nodes), position[fx.name]
        if fx.op == "placeholder":
            node = _placeholder_node(i, fx, specs.get(fx.name), ep)
            if node.kind == "input" and any(n.kind == "input" for n in nodes):
                raise UnsupportedModelError(
                    "the model's forward takes more than one tensor; SRD explains single-input classifiers"
                )
        elif fx.op == "output":
            flat: List[torch.fx.Node] = []
            torch.fx.node.map_arg(fx.args, lambda n: flat.append(n) or n)
            if len(flat) != 1:
                raise UnsupportedModelError(
                    f"the model returns {len(flat)} tensors; SRD explains classifiers whose forward "
                    "returns one logits tensor (B, classes)"
                )
            node = Node(i, "output", "output", inputs=[ref_of(flat[0], at).index])
        elif fx.op == "call_function":
            node = _call_node(i, fx, lambda n, at=at: ref_of(n, at))
        else:
            raise UnsupportedModelError(
                f"srd_ext cannot capture {type(model).__name__}: its exported graph holds a "
                f"'{fx.op}' node ('{fx.name}', {fx.target}) that srd_ext does not know how to run. "
                "Please report the model; meanwhile, explain a part of the model that avoids it "
                "(encoder=<an earlier layer>) or rewrite that part without control-flow operators."
            )
        index[fx.name] = i
        nodes.append(node)
    for n in nodes:
        if n.kind == "call":
            n.op_name = _op_name(n.target)
            n.rule = rules.rule_for(n)
    return nodes


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket._qualified_op_name.replace("::", ".")
    return getattr(target, "__name__", str(target))
