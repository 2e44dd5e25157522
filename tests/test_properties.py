"""SRD's properties on small random models drawn by hypothesis from the registry's ops.

Each example is a random architecture (a stem conv and a list of blocks: convs with random
stride, padding, dilation and groups, BatchNorm folded and stand-alone, every activation of the
registry, max and average pooling, residual adds, concatenation and splits over channels, a
squeeze-excitation gate, a layer scale, LayerNorm over channels (with a channels-last MLP) and
GroupNorm, upsampling, padding; a global-average-pool + linear head) with randomised weights,
biases, norm parameters and BatchNorm statistics, explained in float64 on a tiny image. For each:

(a) conservation: with a constant initial relevance, ``encoder = input + unassigned``;
(b) batch invariance: a batch is explained as each of its samples alone;
(c) the fast path equals the literal reference (tests/reference.py) at every site, for every
    bias share;
(d) the model (parameters, buffers, modes) is left as it was.

Seeded (``derandomize``) and bounded: a failure is reproduced by running the test again, and
hypothesis prints the architecture that fails.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import srd_ext  # noqa: E402
from srd_ext.capture import graph_for  # noqa: E402
from srd_ext.rules import BIAS_SHARES  # noqa: E402
from srd_ext.rules.base import REGISTRY  # noqa: E402

from models_for_tests import randomize  # noqa: E402
from reference import check_every_site  # noqa: E402

MAX_SIZE = 16  # no feature map grows beyond this
MAX_CHANNELS = 12


# --------------------------------------------------------------------------------------------
# The catalogue: activations and blocks
# --------------------------------------------------------------------------------------------
class Clamp(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return x.clamp(self.lo, self.hi)


ACTIVATIONS = {
    "relu": lambda c: nn.ReLU(),
    "relu6": lambda c: nn.ReLU6(),
    "hardtanh": lambda c: nn.Hardtanh(-0.5, 1.5),
    "leaky_relu": lambda c: nn.LeakyReLU(0.1),
    "prelu": lambda c: nn.PReLU(c, 0.3),
    "hardsigmoid": lambda c: nn.Hardsigmoid(),
    "clamp": lambda c: Clamp(-0.2, 0.9),
    "elu": lambda c: nn.ELU(0.7),
    "selu": lambda c: nn.SELU(),
    "celu": lambda c: nn.CELU(0.5),
    "silu": lambda c: nn.SiLU(),
    "gelu": lambda c: nn.GELU(),
    "gelu_tanh": lambda c: nn.GELU(approximate="tanh"),
    "hardswish": lambda c: nn.Hardswish(),
    "mish": lambda c: nn.Mish(),
    "sigmoid": lambda c: nn.Sigmoid(),
    "tanh": lambda c: nn.Tanh(),
    "softplus": lambda c: nn.Softplus(beta=2, threshold=4),
}


def _act(name, c):
    return ACTIVATIONS[name](c) if name else nn.Identity()


class ConvBlock(nn.Module):
    """conv2d (any stride, padding, dilation, groups), an optional BatchNorm (folded), an
    optional activation."""

    def __init__(self, c, p):
        super().__init__()
        self.conv = nn.Conv2d(c, p["out"], p["k"], p["stride"], p["padding"], p["dilation"], p["groups"], p["bias"])
        self.bn = nn.BatchNorm2d(p["out"]) if p["bn"] else nn.Identity()
        self.act = _act(p["act"], p["out"])

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """x + scale * bn(conv(act(conv(x)))), an optional activation after the add."""

    def __init__(self, c, p):
        super().__init__()
        k = p["k"]
        self.c1 = nn.Conv2d(c, c, k, padding=k // 2)
        self.a1 = _act(p["act"], c)
        self.c2 = nn.Conv2d(c, c, k, padding=k // 2, bias=not p["bn"])
        self.bn = nn.BatchNorm2d(c) if p["bn"] else nn.Identity()
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5)) if p["scale"] else None
        self.a2 = _act(p["post"], c)

    def forward(self, x):
        y = self.bn(self.c2(self.a1(self.c1(x))))
        if self.gamma is not None:
            y = y * self.gamma
        return self.a2(x + y)


class Concat(nn.Module):
    """cat over channels of x and a branch act(conv(x))."""

    def __init__(self, c, p):
        super().__init__()
        self.conv = nn.Conv2d(c, p["extra"], p["k"], padding=p["k"] // 2)
        self.act = _act(p["act"], p["extra"])
        self.first = p["first"]

    def forward(self, x):
        y = self.act(self.conv(x))
        return torch.cat([x, y] if self.first else [y, x], 1)


class Split(nn.Module):
    """A channel split (split or chunk), one part through act(conv), the parts concatenated in
    the other order."""

    def __init__(self, c, p):
        super().__init__()
        self.sizes = [p["at"], c - p["at"]]
        self.chunk = p["chunk"]
        self.conv = nn.Conv2d(self.sizes[1], self.sizes[1], 3, padding=1)
        self.act = _act(p["act"], self.sizes[1])

    def forward(self, x):
        a, b = x.chunk(2, 1) if self.chunk else torch.split(x, self.sizes, 1)
        return torch.cat([self.act(self.conv(b)), a], 1)


class SqueezeExcite(nn.Module):
    """x * gate(fc2(relu(fc1(pool(x))))): the gate is held fixed, its branch gets no relevance."""

    def __init__(self, c, p):
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // 2, 1), 1)
        self.fc2 = nn.Conv2d(max(c // 2, 1), c, 1)
        self.gate = nn.Hardsigmoid() if p["hard"] else nn.Sigmoid()
        self.mean = p["mean"]

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.mean else F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class LayerScale(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        return x * self.gamma


class Norm(nn.Module):
    """A stand-alone BatchNorm, a GroupNorm, or a LayerNorm over channels (channels-last), then an
    optional activation."""

    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        if self.kind == "bn":
            self.norm = nn.BatchNorm2d(c)
        elif self.kind == "gn":
            self.norm = nn.GroupNorm(p["groups"], c)
        else:
            self.norm = nn.LayerNorm(c, eps=1e-6)
        self.act = _act(p["act"], c)

    def forward(self, x):
        if self.kind == "ln":
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.norm(x)
        return self.act(x)


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: x + (fc2(act(fc1(LayerNorm(x))))) over channels of a channels-last view."""

    def __init__(self, c, p):
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = _act(p["act"], 0)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(self.ln(x.permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class Pool(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        k, s, pad, ceil = p["k"], p["stride"], p["padding"], p["ceil"]
        if p["max"]:
            self.pool = nn.MaxPool2d(k, s, pad, ceil_mode=ceil)
        else:
            self.pool = nn.AvgPool2d(k, s, pad, ceil_mode=ceil, count_include_pad=p["count_pad"])

    def forward(self, x):
        return self.pool(x)


class Upsample(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.mode = p["mode"]

    def forward(self, x):
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)


class Pad(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.pads, self.mode = p["pads"], p["mode"]

    def forward(self, x):
        return F.pad(x, self.pads, mode=self.mode)


class Act(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.act = _act(p["act"], c)

    def forward(self, x):
        return self.act(x)


BLOCKS = {
    "conv": ConvBlock,
    "residual": Residual,
    "concat": Concat,
    "split": Split,
    "se": SqueezeExcite,
    "scale": LayerScale,
    "norm": Norm,
    "mlp": ChannelsLastMLP,
    "pool": Pool,
    "upsample": Upsample,
    "pad": Pad,
    "act": Act,
}


class RandomNet(nn.Module):
    """The blocks in sequence, then a global-average-pool + linear head."""

    def __init__(self, blocks, classes: int = 5):
        super().__init__()
        c = 3
        layers = []
        for kind, p in blocks:
            layers.append(BLOCKS[kind](c, p))
            c = _channels_after(kind, p, c)
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def _channels_after(kind, p, c):
    if kind == "conv":
        return p["out"]
    if kind == "concat":
        return c + p["extra"]
    return c


# --------------------------------------------------------------------------------------------
# Strategies: an architecture is a list of (kind, params) blocks, drawn with the feature map's
# shape tracked so that every block is valid where it stands
# --------------------------------------------------------------------------------------------
_ACT_NAMES = sorted(ACTIVATIONS)
_act_st = st.sampled_from(_ACT_NAMES)
_maybe_act = st.one_of(st.just(None), _act_st)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_params(draw, c, size, first=False):
    out = draw(st.sampled_from([4, 6, 8]))
    k = draw(st.integers(1, 3))
    dilation = draw(st.sampled_from([1, 2])) if k > 1 else 1
    span = dilation * (k - 1)
    stride = draw(st.sampled_from([1, 2])) if size >= 6 else 1
    if stride == 1 and k > 1 and draw(st.booleans()):
        padding = "same"  # asymmetric for an even span
    else:  # up to one pixel more than half the kernel's span (a 1x1 conv padded too)
        padding = draw(st.integers(0, span // 2 + 1))
    groups = 1 if first else draw(st.sampled_from(_divisors(_gcd(c, out))))
    return {
        "out": out,
        "k": k,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()) if not first else True,
        "bn": draw(st.booleans()),
        "act": draw(_act_st) if first else draw(_maybe_act),
    }


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@st.composite
def block(draw, c, size):
    kinds = ["conv", "residual", "se", "scale", "norm", "mlp", "act", "pad"]
    if c < MAX_CHANNELS - 2:
        kinds.append("concat")
    if c >= 2:
        kinds.append("split")
    if size >= 4:
        kinds.append("pool")
    if 2 * size <= MAX_SIZE:
        kinds.append("upsample")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        p = draw(conv_params(c, size))
    elif kind == "residual":
        p = {
            "k": draw(st.sampled_from([1, 3])),
            "act": draw(_act_st),
            "bn": draw(st.booleans()),
            "scale": draw(st.booleans()),
            "post": draw(_maybe_act),
        }
    elif kind == "concat":
        p = {"extra": draw(st.sampled_from([2, 4])), "k": draw(st.sampled_from([1, 3])), "act": draw(_act_st)}
        p["first"] = draw(st.booleans())
    elif kind == "split":
        chunk = c % 2 == 0 and draw(st.booleans())
        p = {"chunk": chunk, "at": c // 2 if chunk else draw(st.integers(1, c - 1)), "act": draw(_act_st)}
    elif kind == "se":
        p = {"hard": draw(st.booleans()), "mean": draw(st.booleans())}
    elif kind == "scale":
        p = {}
    elif kind == "norm":
        norm = draw(st.sampled_from(["bn", "gn", "ln"]))
        p = {"kind": norm, "act": draw(_maybe_act)}
        if norm == "gn":
            p["groups"] = draw(st.sampled_from(_divisors(c)))
    elif kind == "mlp":
        p = {"act": draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"]))}
    elif kind == "pool":
        k = draw(st.sampled_from([2, 3]))
        stride = draw(st.sampled_from([1, 2]))
        p = {
            "max": draw(st.booleans()),
            "k": k,
            "stride": stride,
            "padding": draw(st.integers(0, k // 2)),
            "ceil": draw(st.booleans()),
        }
        p["count_pad"] = draw(st.booleans())
    elif kind == "upsample":
        p = {"mode": draw(st.sampled_from(["nearest", "bilinear", "bicubic"]))}
    elif kind == "pad":
        mode = draw(st.sampled_from(["constant", "reflect", "replicate"]))
        most = min(2, size - 1) if mode == "reflect" else 2  # reflect: less than the size
        pads = tuple(draw(st.integers(0, most)) for _ in range(4))
        p = {"mode": mode, "pads": pads}
    else:
        p = {"act": draw(_act_st)}
    return kind, p


def _shape_after(blocks, size) -> Tuple[int, int, int]:
    with torch.no_grad():
        y = RandomNet(blocks).blocks(torch.zeros(1, 3, size, size))
    return tuple(y.shape[1:])


@st.composite
def architectures(draw, max_blocks=4):
    """(blocks, image size): a stem conv with an activation and up to max_blocks blocks; a block
    that would not fit where it is drawn (a map under 2x2 or over MAX_SIZE pixels) is left out."""
    size = draw(st.sampled_from([8, 10, 12]))
    blocks = [("conv", draw(conv_params(3, size, first=True)))]
    c, h, w = _shape_after(blocks, size)
    for _ in range(draw(st.integers(1, max_blocks))):
        nxt = draw(block(c, min(h, w)))
        try:
            c2, h2, w2 = _shape_after(blocks + [nxt], size)
        except RuntimeError:  # a kernel larger than the padded map: the block is left out
            continue
        if min(h2, w2) < 2 or max(h2, w2) > MAX_SIZE:
            continue
        blocks.append(nxt)
        c, h, w = c2, h2, w2
    return blocks, size


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_same_state(before, after):
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), f"{k} changed"
    assert before[1:] == after[1:]


def check_conservation(model, x):
    for share in ("contribution", "input"):
        budget = srd_ext.Explainer(model, init="constant", bias_share=share).relevance_budget(x)
        torch.testing.assert_close(
            budget["input"] + budget["unassigned"],
            budget["encoder"],
            rtol=1e-9,
            atol=1e-12,
            msg=lambda m: f"bias_share={share}: {m}",
        )


def check_batch_invariance(model, x, target):
    ex = srd_ext.Explainer(model)
    batch = ex.relevance_at_all_layers(x, target)
    assert "input" in batch and len(batch) >= 2
    for i in range(x.shape[0]):
        one = ex.relevance_at_all_layers(x[i : i + 1], int(target[i]))
        assert one.keys() == batch.keys()
        for k in batch:
            torch.testing.assert_close(batch[k][i : i + 1], one[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def check_reference(model, x, bias_share):
    assert check_every_site(model, x, bias_share) >= 2


_BUILT: Dict[str, nn.Module] = {}


def build(blocks, seed, bias_scale=1.0):
    """The model of ``blocks`` with weights from ``seed`` (randomize: biases ~ 0.1 N(0, 1)), its
    biases scaled by ``bias_scale`` (large biases make the bias shares weigh). Kept: an
    architecture drawn again, or checked by the catalogue tests, is not captured again."""
    key = repr((blocks, seed, bias_scale))
    if key not in _BUILT:
        model = randomize(RandomNet(blocks), seed).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.mul_(bias_scale)
        _BUILT[key] = model
    return _BUILT[key]


# Two architectures every run explains besides the drawn ones: every activation of the catalogue
# in sequence, and every block kind (the catalogue tests below check that together they reach
# every activation rule of the registry and the structural and affine rules named above).
_STEM = dict(out=4, k=1, stride=1, padding=0, dilation=1, groups=1, bias=True, bn=False, act="relu")
EVERY_ACTIVATION = ([("conv", _STEM)] + [("act", {"act": a}) for a in sorted(ACTIVATIONS)], 4)
_CONV = dict(out=6, k=3, stride=1, padding=1, dilation=1, groups=2, bias=True, bn=True, act="leaky_relu")
EVERY_BLOCK = (
    [
        ("conv", dict(_CONV, groups=1, stride=2, dilation=2, padding=2)),
        ("residual", dict(k=3, act="relu", bn=True, scale=True, post="relu6")),
        ("concat", dict(extra=2, k=1, act="silu", first=True)),
        ("split", dict(chunk=False, at=3, act="gelu")),
        ("split", dict(chunk=True, at=4, act="mish")),
        ("se", dict(hard=False, mean=True)),
        ("scale", {}),
        ("norm", dict(kind="bn", act="hardswish")),
        ("norm", dict(kind="gn", groups=2, act=None)),
        ("norm", dict(kind="ln", act="tanh")),
        ("mlp", dict(act="gelu")),
        ("pool", dict(max=True, k=3, stride=1, padding=1, ceil=False, count_pad=False)),
        ("upsample", dict(mode="bilinear")),
        ("pad", dict(mode="reflect", pads=(1, 0, 0, 1))),
        ("pool", dict(max=False, k=2, stride=2, padding=0, ceil=True, count_pad=True)),
        ("conv", dict(_CONV, padding="same", k=2)),
    ],
    8,
)


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    # no shrinking: each example captures and explains a model, and shrinking a failure to a
    # minimal one takes minutes; the failing architecture is printed as drawn
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(arch=architectures(), seed=st.integers(0, 2**16), bias_scale=st.sampled_from([1.0, 4.0]))
@example(arch=EVERY_ACTIVATION, seed=1, bias_scale=4.0)
@example(arch=EVERY_BLOCK, seed=2, bias_scale=4.0)
def test_random_models(arch, seed, bias_scale):
    blocks, size = arch
    model = build(blocks, seed, bias_scale)
    before = _state(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 5, (3,), generator=gen)
    check_conservation(model, x)
    check_batch_invariance(model, x, target)
    for share in BIAS_SHARES:
        check_reference(model, x[:1], share)
    _assert_same_state(before, _state(model))


# --------------------------------------------------------------------------------------------
# The catalogue covers the registry
# --------------------------------------------------------------------------------------------
def _rule_classes(arch):
    blocks, size = arch
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    seed = 1 if arch is EVERY_ACTIVATION else 2  # as in test_random_models' examples
    return {type(n.rule) for n in graph_for(build(blocks, seed, 4.0), x).nodes if n.kind == "call"}


def test_catalogue_has_every_activation_of_the_registry():
    """A new activation rule must be added to ACTIVATIONS above: together they are captured as
    every activation rule of the registry."""
    registered = {type(r) for r in REGISTRY.values() if r.is_activation and r.decomposable}
    found = _rule_classes(EVERY_ACTIVATION) & registered
    assert found == registered, f"not built by the strategy: {sorted(c.__name__ for c in registered - found)}"


def test_catalogue_reaches_the_structural_rules():
    """Every block kind builds, and together they exercise the structural and affine rules."""
    from srd_ext.rules import affine as A
    from srd_ext.rules import structure as S

    wanted = {
        A.Conv2d,
        A.BatchNorm,
        A.LayerNorm,
        A.GroupNorm,
        A.Linear,
        A.AddSub,
        A.MulDiv,
        S.Cat,
        S.Split,
        S.GetItem,
        S.Permute,
        S.MaxPool,
        S.AvgPool,
        S.AdaptiveAvgPool,
        S.Mean,
        S.Upsample,
        S.Pad,
    }
    found = _rule_classes(EVERY_BLOCK)
    assert wanted <= found, sorted(c.__name__ for c in wanted - found)
    assert {kind for kind, _ in EVERY_BLOCK[0] + EVERY_ACTIVATION[0]} == set(BLOCKS)
