"""The srd_ext operators (CPU kernels, fake kernels, autograd) against pure-PyTorch references.

The references below work in float64 with explicit loops over kernel taps and index arithmetic
for the valid (output, tap) pairs, so they share no code or layout trick with the kernels.
CUDA is covered in depth by test_cuda_ops.py; here only the device-mismatch errors need it.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from srd_ext import ops

F64 = torch.float64
MODES = ["none", "contribution", "input"]
NAN = float("nan")
# conv_tap_norms' evaluation forms (csrc/cpu/conv_tap_norms.cpp), forced through the environment;
# "auto" is the choice by cost.
TAP_PATHS = ["auto", "product", "gram", "direct"]
cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_kernels_built()), reason="needs a CUDA device and the CUDA kernels"
)


@pytest.fixture(params=TAP_PATHS)
def tap_path(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", request.param)
    return request.param


# ------------------------------------------------------------------------------------------------
# Helpers and references
# ------------------------------------------------------------------------------------------------
def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def randn(*shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=F64, generator=g).to(dtype)


def tap_axis(n_in, n_out, s, p, d, k):
    """Along one axis, the outputs o whose input o*s - p + k*d is inside [0, n_in), and those inputs."""
    o = torch.arange(n_out)
    i = o * s - p + k * d
    keep = (i >= 0) & (i < n_in)
    return o[keep], i[keep]


def taps_of(kh, kw, H, W, Ho, Wo, stride, padding, dilation):
    """(t, oy, iy, ox, ix) for every tap that reaches at least one output."""
    out = []
    for ty in range(kh):
        oy, iy = tap_axis(H, Ho, stride[0], padding[0], dilation[0], ty)
        for tx in range(kw):
            ox, ix = tap_axis(W, Wo, stride[1], padding[1], dilation[1], tx)
            if len(oy) and len(ox):
                out.append((ty * kw + tx, oy, iy, ox, ix))
    return out


def safe_div(num, den):
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def ref_activation_share(a, grad, z, extra=None):
    rel = (a * grad).sum(1)
    if extra is not None:
        rel = rel + extra
    n2 = (z * z).sum(1, keepdim=True)
    return rel, safe_div(z * rel.unsqueeze(1), n2.expand_as(z))


def ref_tap_norms(x, w, stride, padding, dilation, groups):
    B, C_in, H, W = x.shape
    C_out, Cg, kh, kw = w.shape
    Og = C_out // groups
    Ho, Wo = (out_size(x.shape[2 + a], w.shape[2 + a], stride[a], padding[a], dilation[a]) for a in (0, 1))
    n = x.new_zeros(B, kh * kw, H, W)
    for t, _, iy, _, ix in taps_of(kh, kw, H, W, Ho, Wo, stride, padding, dilation):
        xs = x[:, :, iy][:, :, :, ix]
        w_t = w[:, :, t // kw, t % kw]
        y = torch.cat(
            [
                torch.einsum("oc,bcyx->boyx", w_t[g * Og : (g + 1) * Og], xs[:, g * Cg : (g + 1) * Cg])
                for g in range(groups)
            ],
            1,
        )
        n[:, t, iy[:, None], ix[None, :]] = torch.linalg.vector_norm(y, dim=1)
    return n


def ref_scatter(n, d, kernel_size, stride, padding, dilation):
    B, _, H, W = n.shape
    Ho, Wo = d.shape[1:]
    taps = taps_of(*kernel_size, H, W, Ho, Wo, stride, padding, dilation)
    S = d.new_zeros(B, Ho, Wo)
    for t, oy, iy, ox, ix in taps:
        S[:, oy[:, None], ox[None, :]] += n[:, t][:, iy[:, None], ix[None, :]]
    c = safe_div(d, S)
    R = n.new_zeros(B, H, W)
    for t, oy, iy, ox, ix in taps:
        R[:, iy[:, None], ix[None, :]] += n[:, t][:, iy[:, None], ix[None, :]] * c[:, oy[:, None], ox[None, :]]
    return R


def ref_pfv(x, w, bias, positions, stride, padding, dilation, mode):
    _, _, H, W = x.shape
    C_out, _, kh, kw = w.shape
    zero = x.new_zeros(())
    v_rows, mu_rows = [], []
    for b, oy, ox in positions.tolist():
        ys, ns = [], []
        for ty in range(kh):
            for tx in range(kw):
                iy = oy * stride[0] - padding[0] + ty * dilation[0]
                ix = ox * stride[1] - padding[1] + tx * dilation[1]
                if 0 <= iy < H and 0 <= ix < W:
                    xi = x[b, :, iy, ix]
                    y = w[:, :, ty, tx] @ xi
                    nt = {
                        "none": zero,
                        "contribution": torch.linalg.vector_norm(y),
                        "input": torch.linalg.vector_norm(xi),
                    }[mode]
                else:
                    y, nt = x.new_zeros(C_out), zero
                ys.append(y)
                ns.append(nt)
        Y, nt = torch.stack(ys), torch.stack(ns)
        z = Y.sum(0)
        v = Y
        if bias is not None:
            z = z + bias
            S = nt.sum()
            share = nt / S if S > 0 else torch.zeros_like(nt)
            v = Y + share[:, None] * bias
        z2 = z @ z
        v_rows.append(v)
        mu_rows.append((v @ z) / z2 if z2 > 0 else torch.zeros_like(nt))
    T = kh * kw
    if not v_rows:
        return x.new_zeros(0, T, C_out), x.new_zeros(0, T)
    return torch.stack(v_rows), torch.stack(mu_rows)


def assert_close(actual, expected, rtol=1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * scale)


def grads(outputs, inputs, upstream, retain=True):
    outs = [o for o, u in zip(outputs, upstream) if u is not None]
    ups = [u for u in upstream if u is not None]
    return torch.autograd.grad(outs, inputs, ups, allow_unused=True, retain_graph=retain)


def leaf(t):
    return None if t is None else t.detach().requires_grad_(True)


def channels_last_view(t):
    """t's values in a non-contiguous (B, C, H, W) view of (B, H, W, C) memory."""
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def strided_view(t):
    """t's values in a view with a step of 2 along the last axis."""
    u = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    u[..., ::2] = t
    return u[..., ::2]


# ------------------------------------------------------------------------------------------------
# Geometries: (B, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
# ------------------------------------------------------------------------------------------------
FIXED_GEOMS = [
    (2, 4, 8, 7, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # 3x3, same padding
    (2, 6, 9, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1), 2),  # stride 2, groups 2
    (1, 4, 10, 9, 5, 3, 3, (1, 1), (2, 2), (2, 2), 1),  # dilation 2
    (3, 8, 6, 5, 12, 1, 1, (1, 1), (0, 0), (1, 1), 1),  # 1x1
    (1, 6, 7, 7, 10, 1, 1, (2, 2), (0, 0), (1, 1), 2),  # 1x1 stride 2: pixels no tap reaches
    (2, 3, 13, 12, 4, 7, 7, (2, 2), (3, 3), (1, 1), 1),  # 7x7 stride 2 stem
    (1, 4, 9, 11, 6, 3, 2, (2, 1), (0, 1), (2, 1), 2),  # asymmetric everything
    (1, 3, 1, 4, 4, 3, 3, (1, 1), (2, 1), (2, 1), 1),  # taps that reach no output
    (1, 2, 3, 3, 2, 3, 3, (1, 1), (4, 4), (1, 1), 1),  # padding larger than the input
    (1, 64, 24, 26, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # several row blocks per image
]


def random_geoms(count, seed=1234):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        groups = rng.choice([1, 1, 2])
        k = rng.choice([1, 3, 5, 7])
        kh, kw = k, rng.choice([k, 1, 3])
        s = (rng.choice([1, 2, 3]), rng.choice([1, 2]))
        d = (rng.choice([1, 2]), rng.choice([1, 2]))
        p = (rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1))
        H, W = rng.randint(1, 14), rng.randint(1, 14)
        if out_size(H, kh, s[0], p[0], d[0]) < 1 or out_size(W, kw, s[1], p[1], d[1]) < 1:
            continue
        out.append(
            (rng.randint(1, 3), groups * rng.randint(1, 4), H, W, groups * rng.randint(1, 4), kh, kw, s, p, d, groups)
        )
    return out


GEOMS = FIXED_GEOMS + random_geoms(8)
GEOM_IDS = [f"g{i}" for i in range(len(FIXED_GEOMS))] + [f"rand{i}" for i in range(8)]
PFV = [(g, i) for g, i in zip(GEOMS, GEOM_IDS) if g[10] == 1]
PFV_GEOMS, PFV_IDS = [g for g, _ in PFV], [i for _, i in PFV]


def conv_inputs(geom, dtype=F64, seed=0):
    B, C_in, H, W, C_out, kh, kw, s, p, d, groups = geom
    x = randn(B, C_in, H, W, seed=seed + 1, dtype=dtype)
    w = (randn(C_out, C_in // groups, kh, kw, seed=seed + 2) / (C_in // groups * kh * kw) ** 0.5).to(dtype)
    return x, w, list(s), list(p), list(d), groups


def out_hw(geom):
    _, _, H, W, _, kh, kw, s, p, d, _ = geom
    return out_size(H, kh, s[0], p[0], d[0]), out_size(W, kw, s[1], p[1], d[1])


def scatter_inputs(geom, dtype=F64, seed=0):
    B, _, H, W, _, kh, kw, s, p, d, _ = geom
    Ho, Wo = out_hw(geom)
    g = torch.Generator().manual_seed(seed + 7)
    n = torch.rand(B, kh * kw, H, W, dtype=F64, generator=g)
    n[n < 0.25] = 0
    n[:, :, : min(H, 2), : min(W, 2)] = 0  # outputs that only read this corner have S = 0
    return n.to(dtype), randn(B, Ho, Wo, seed=seed + 8, dtype=dtype), [kh, kw], list(s), list(p), list(d)


def pfv_inputs(geom, with_bias, dtype=F64, n_rows=9, seed=0):
    x, w, s, p, d, _ = conv_inputs(geom, dtype, seed)
    B, C_out = geom[0], geom[4]
    Ho, Wo = out_hw(geom)
    bias = randn(C_out, seed=seed + 4, dtype=dtype) if with_bias else None
    g = torch.Generator().manual_seed(seed + 5)
    pos = torch.stack([torch.randint(0, m, (n_rows,), generator=g) for m in (B, Ho, Wo)], 1)
    pos[0] = torch.tensor([0, 0, 0])
    pos[1] = torch.tensor([B - 1, Ho - 1, Wo - 1])  # corners: the taps most often cut by padding
    pos[2] = torch.tensor([0, Ho // 2, Wo // 2])
    return x, w, bias, pos, s, p, d


# ------------------------------------------------------------------------------------------------
# activation_share
# ------------------------------------------------------------------------------------------------
ACT_SHAPES = [(2, 5, 6, 7), (1, 70, 3, 3), (4, 33), (3, 3, 1, 1)]


def act_inputs(shape, with_extra, dtype=F64, seed=0):
    a, grad, z = (randn(*shape, seed=seed + s, dtype=dtype) for s in (1, 2, 3))
    z[0, ..., 0] = 0  # pixels with a zero pre-activation PFV
    pix = (shape[0],) + tuple(shape[2:])
    extra = randn(*pix, seed=seed + 4, dtype=dtype) if with_extra else None
    return a, grad, z, extra


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
def test_activation_share_matches_reference(shape, with_extra):
    a, grad, z, extra = act_inputs(shape, with_extra)
    rel, g = ops.activation_share(a, grad, z, extra)
    ref_rel, ref_g = ref_activation_share(a, grad, z, extra)
    assert rel.dtype == F64 and g.dtype == F64
    assert_close(rel, ref_rel)
    assert_close(g, ref_g)
    assert (g[0, ..., 0] == 0).all()


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
def test_activation_share_backward_matches_reference(shape, with_extra):
    inputs = [leaf(t) for t in act_inputs(shape, with_extra)]
    diff = [t for t in inputs if t is not None]
    rel, g = ops.activation_share(*inputs)
    ref = ref_activation_share(*inputs)
    up = (randn(*rel.shape, seed=5), randn(*g.shape, seed=6))
    # Both outputs used, and each alone (the unused output's gradient arrives as None).
    for used in (up, (up[0], None), (None, up[1])):
        for got, want in zip(grads((rel, g), diff, used), grads(ref, diff, used)):
            assert_close(got, want if want is not None else torch.zeros_like(got))


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (4, 33)], ids=str)
def test_activation_share_noncontiguous(shape):
    a, grad, z, extra = act_inputs(shape, True)
    views = (
        channels_last_view if len(shape) == 4 else strided_view,
        strided_view,
        lambda t: t.transpose(0, -1).contiguous().transpose(0, -1),
        strided_view,
    )
    nc = [leaf(f(t)) for f, t in zip(views, (a, grad, z, extra))]
    assert not any(t.is_contiguous() for t in nc)
    rel, g = ops.activation_share(*nc)
    ref_rel, ref_g = ref_activation_share(a, grad, z, extra)
    assert_close(rel, ref_rel)
    assert_close(g, ref_g)
    up = (randn(*rel.shape, seed=5), randn(*g.shape, seed=6))
    contiguous = [leaf(t) for t in (a, grad, z, extra)]
    for got, want in zip(grads((rel, g), nc, up), grads(ref_activation_share(*contiguous), contiguous, up)):
        assert_close(got, want)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (3, 8)], ids=str)
def test_activation_share_zero(shape):
    zero = torch.zeros(shape, dtype=F64)
    rel, g = ops.activation_share(zero, zero, zero, None)
    assert (rel == 0).all() and (g == 0).all() and rel.shape == (shape[0],) + shape[2:]
    # Relevance is still carried by a * grad when the pre-activation is zero; g stays exactly 0.
    a, grad = randn(*shape, seed=1).requires_grad_(), randn(*shape, seed=2)
    z = zero.clone().requires_grad_()
    rel, g = ops.activation_share(a, grad, z, None)
    assert_close(rel, (a * grad).sum(1))
    assert (g == 0).all()
    ga, gz = torch.autograd.grad((rel.sum() + g.sum()), (a, z))
    assert_close(ga, grad)
    assert (gz == 0).all()


@pytest.mark.parametrize("shape", [(0, 4, 5, 6), (0, 3)], ids=str)
def test_activation_share_empty(shape):
    a = torch.zeros(shape, dtype=F64, requires_grad=True)
    extra = torch.zeros((0,) + shape[2:], dtype=F64, requires_grad=True)
    rel, g = ops.activation_share(a, a, a, extra)
    assert rel.shape == (0,) + shape[2:] and g.shape == shape
    ga, ge = torch.autograd.grad((rel.sum() + g.sum()), (a, extra))
    assert ga.shape == shape and ge.shape == extra.shape


# ------------------------------------------------------------------------------------------------
# conv_tap_norms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_conv_tap_norms_matches_reference(geom, tap_path):
    x, w, s, p, d, groups = conv_inputs(geom)
    x, w = leaf(x), leaf(w)
    n = ops.conv_tap_norms(x, w, s, p, d, groups)
    ref = ref_tap_norms(x, w, s, p, d, groups)
    assert n.shape == (geom[0], geom[5] * geom[6], geom[2], geom[3]) and n.dtype == F64
    assert_close(n, ref)
    # Pixels that a tap never reaches are exactly 0; every reached one is > 0 for random data.
    reached = torch.zeros_like(n, dtype=torch.bool)
    for t, _, iy, _, ix in taps_of(geom[5], geom[6], geom[2], geom[3], *out_hw(geom), s, p, d):
        reached[:, t, iy[:, None], ix[None, :]] = True
    assert (n[~reached] == 0).all() and (n[reached] > 0).all()
    dn = randn(*n.shape, seed=3)
    for got, want in zip(grads((n,), (x, w), (dn,)), grads((ref,), (x, w), (dn,))):
        assert_close(got, want)


@pytest.mark.parametrize("geom", [FIXED_GEOMS[1], FIXED_GEOMS[6], FIXED_GEOMS[9]], ids=["s2g2", "asym", "tiled"])
def test_conv_tap_norms_noncontiguous(geom, tap_path):
    x, w, s, p, d, groups = conv_inputs(geom)
    channel_step_2 = torch.stack([x, x], 2).flatten(1, 2)[:, ::2]
    xs = [leaf(channels_last_view(x)), leaf(strided_view(x)), leaf(channel_step_2)]
    wn = leaf(w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1))
    x0, w0 = leaf(x), leaf(w)
    ref = ref_tap_norms(x0, w0, s, p, d, groups)
    dn = randn(*ref.shape, seed=3)
    want = grads((ref,), (x0, w0), (dn,))
    for xn in xs:
        assert not xn.is_contiguous()
        n = ops.conv_tap_norms(xn, wn, s, p, d, groups)
        assert_close(n, ref)
        for got, exp in zip(grads((n,), (xn, wn), (dn,)), want):
            assert_close(got, exp)


@pytest.mark.parametrize("geom", [FIXED_GEOMS[1], FIXED_GEOMS[5], FIXED_GEOMS[9]], ids=["s2g2", "7x7", "tiled"])
def test_conv_tap_norms_zero(geom, tap_path):
    x, w, s, p, d, groups = conv_inputs(geom)
    x, w = torch.zeros_like(x, requires_grad=True), leaf(w)
    n = ops.conv_tap_norms(x, w, s, p, d, groups)
    assert (n == 0).all()
    gx, gw = torch.autograd.grad(n, (x, w), torch.ones_like(n))
    assert (gx == 0).all() and (gw == 0).all()
    # A zero weight gives zero norms too.
    n = ops.conv_tap_norms(randn(*x.shape, seed=1), torch.zeros_like(w), s, p, d, groups)
    assert (n == 0).all()


def test_conv_tap_norms_empty(tap_path):
    x, w, s, p, d, groups = conv_inputs(FIXED_GEOMS[1])
    x, w = leaf(x[:0]), leaf(w)
    n = ops.conv_tap_norms(x, w, s, p, d, groups)
    assert n.shape == (0, 9, 9, 8)
    gx, gw = torch.autograd.grad(n.sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape and (gw == 0).all()


# Layer shapes whose cheapest form is known: (geometry, form the cost model must pick).
CHOICES = [
    ((1, 3, 24, 24, 16, 7, 7, (2, 2), (3, 3), (1, 1), 1), "direct"),  # RGB stem
    ((2, 8, 12, 12, 8, 3, 3, (1, 1), (1, 1), (1, 1), 8), "direct"),  # depthwise
    ((2, 64, 28, 28, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1), "gram"),  # 1x1 expansion
    ((2, 64, 28, 28, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1), "gram"),  # first conv of a VGG stage
    ((1, 256, 4, 4, 1024, 1, 1, (1, 1), (0, 0), (1, 1), 1), "product"),  # too few pixels to pay for G_t
    ((2, 256, 6, 6, 64, 1, 1, (1, 1), (0, 0), (1, 1), 1), "product"),  # 1x1 reduction
    ((2, 64, 7, 7, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1), "product"),  # 3x3, C_in = C_out
]


@pytest.mark.parametrize("geom,form", CHOICES, ids=[f"{f}{i}" for i, (_, f) in enumerate(CHOICES)])
def test_conv_tap_norms_picks_form_by_cost(geom, form, monkeypatch):
    """The automatic choice gives bit for bit what the expected form gives (and each form is
    checked against the reference above)."""
    x, w, s, p, d, groups = conv_inputs(geom, dtype=torch.float32)
    auto = ops.conv_tap_norms(x, w, s, p, d, groups)
    forced = {}
    for f in ("product", "gram", "direct"):
        monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", f)
        forced[f] = ops.conv_tap_norms(x, w, s, p, d, groups)
    assert torch.equal(auto, forced[form])
    assert any(not torch.equal(auto, v) for f, v in forced.items() if f != form)  # the forms do differ


def test_conv_tap_norms_bad_path(monkeypatch):
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", "fast")
    with pytest.raises(RuntimeError, match="SRD_EXT_TAP_NORMS_PATH.*fast"):
        ops.conv_tap_norms(X, Wt, 1, 1)


def test_conv_tap_norms_gram_accuracy_float32(monkeypatch):
    """The Gram form rounds <G_t x, x>, whose terms may cancel. Where the cost model picks it
    (fewer input than output channels: W_t is tall), ||W_t x|| >= sigma_min ||x||, so n^2 keeps a
    relative error of about eps * cond(W_t)^2, also for x along W_t's weakest direction."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 32, 1, 1, generator=g, dtype=F64)
    sv = torch.linalg.svd(w[:, :, 0, 0])
    cond = (sv.S[0] / sv.S[-1]).item()
    x = torch.randn(2, 32, 5, 5, generator=g, dtype=F64)
    x[1] = sv.Vh[-1][:, None, None] + 1e-3 * x[1]  # sample 1: along the weakest direction
    want = ops.conv_tap_norms(x, w, 1, 0)
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", "gram")
    got = ops.conv_tap_norms(x.float(), w.float(), 1, 0).double()
    rel = ((got - want).abs() / want).max().item()
    assert rel <= 32 * 1.2e-7 * cond**2, (rel, cond)


# The fused float32 kernel (csrc/cpu/fused_tap_sums.cpp) runs where the CPU has AVX2+FMA or
# AVX-512; SRD_EXT_TAP_NORMS_FUSED=0 turns it off. Shapes that cut its register tiles and chunks
# unevenly (rows and Gram rows no multiple of the tile, pixel counts no multiple of a panel), with
# several phases, dilation, an inner dimension of 1 and many chunks.
FUSED_GEOMS = [
    (3, 70, 9, 11, 13, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 19, 12, 10, 37, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 33, 15, 15, 33, 5, 5, (1, 1), (4, 4), (2, 2), 1),
    (2, 1, 8, 8, 9, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 256, 40, 40, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 48, 5, 7, 96, 3, 3, (1, 2), (1, 0), (1, 1), 1),
]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def _fused_kernels():
    """The fused kernels this CPU runs, by their SRD_EXT_TAP_NORMS_FUSED names."""
    flags = _cpu_flags()
    return [k for k, need in (("avx512f", ["avx512f"]), ("avx2", ["avx2", "fma"])) if all(f in flags for f in need)]


def test_tap_norms_cpu_kernel(monkeypatch):
    """The extension reports the widest fused kernel the CPU supports; the switch picks another
    one or none, and a bad value is an error naming the accepted ones."""
    tiles = {"avx512f": "avx512f 8x48", "avx2": "avx2 6x16"}
    have = _fused_kernels()
    if _cpu_flags():
        assert ops.tap_norms_cpu_kernel() == (tiles[have[0]] if have else "none")
    for k in have:
        monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", k)
        assert ops.tap_norms_cpu_kernel() == tiles[k]
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", "0")
    assert ops.tap_norms_cpu_kernel() == "none"
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", "fast")
    with pytest.raises(RuntimeError, match="SRD_EXT_TAP_NORMS_FUSED must be 0, 1, auto, avx512f or avx2"):
        ops.tap_norms_cpu_kernel()
    with pytest.raises(RuntimeError, match="SRD_EXT_TAP_NORMS_FUSED.*fast"):
        ops.conv_tap_norms(X.float(), Wt.float(), 1, 1)


# Every fused kernel this CPU runs (a CPU with AVX-512 also runs the AVX2 one).
FUSED_KERNELS = _fused_kernels() or ["none"]


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("path", ["product", "gram"])
@pytest.mark.parametrize("geom", FUSED_GEOMS, ids=[f"f{i}" for i in range(len(FUSED_GEOMS))])
def test_conv_tap_norms_fused_float32(geom, path, kernel, monkeypatch):
    """Float32 norms from the fused kernel against the float64 reference and against the GEMM
    forms (the kernel switched off), within float32 rounding; unreached pairs are exactly 0."""
    if kernel == "none":
        pytest.skip("no fused kernel on this CPU")
    x, w, s, p, d, groups = conv_inputs(geom)
    ref = ref_tap_norms(x, w, s, p, d, groups)
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", path)
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", kernel)
    fused = ops.conv_tap_norms(x.float(), w.float(), s, p, d, groups)
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", "0")
    gemm = ops.conv_tap_norms(x.float(), w.float(), s, p, d, groups)
    tol = dict(rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(fused.double(), ref, **tol)
    torch.testing.assert_close(fused, gemm, **tol)
    assert torch.equal(fused == 0, ref == 0)


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("path", ["product", "gram"])
def test_conv_tap_norms_fused_nan(path, kernel, monkeypatch):
    """NaN in a float32 input reaches the fused kernel's norms of that pixel and no other."""
    if kernel == "none":
        pytest.skip("no fused kernel on this CPU")
    geom = FUSED_GEOMS[0]
    x, w, s, p, d, groups = conv_inputs(geom)
    x[1, 5, 4, 6] = NAN
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_PATH", path)
    monkeypatch.setenv("SRD_EXT_TAP_NORMS_FUSED", kernel)
    got = ops.conv_tap_norms(x.float(), w.float(), s, p, d, groups)
    want = ref_tap_norms(x, w, s, p, d, groups)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    keep = ~want.isnan()
    torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-5, atol=1e-6 * want[keep].abs().max().item())


# ------------------------------------------------------------------------------------------------
# Geometry: the ops accept exactly the inputs F.conv2d accepts
# ------------------------------------------------------------------------------------------------
def _conv2d_accepts(x, w, s, p, d):
    try:
        F.conv2d(x, w, None, s, p, d)
        return True
    except RuntimeError:
        return False


AXIS_CASES = [
    (n, k, s, p, d) for n in range(1, 6) for k in range(1, 5) for s in (1, 2, 3) for p in (0, 1, 2) for d in (1, 2)
]


@pytest.mark.parametrize("axis", [0, 1], ids=["rows", "cols"])
def test_geometry_rejects_what_conv2d_rejects(axis):
    rejected = 0
    for n, k, s, p, d in AXIS_CASES:
        H, W = (n, 6) if axis == 0 else (6, n)
        kh, kw = (k, 3) if axis == 0 else (3, k)
        x, w = randn(1, 2, H, W, seed=1), randn(3, 2, kh, kw, seed=2)
        stride, padding, dilation = [(s, 1), (p, 1), (d, 1)] if axis == 0 else [(1, s), (1, p), (1, d)]
        ok = _conv2d_accepts(x, w, stride, padding, dilation)
        Ho = out_size(H, kh, stride[0], padding[0], dilation[0])
        Wo = out_size(W, kw, stride[1], padding[1], dilation[1])
        n_ = torch.rand(1, kh * kw, H, W, dtype=F64)
        calls = {
            "conv_tap_norms": lambda: ops.conv_tap_norms(x, w, stride, padding, dilation),
            "bias_share_scatter": lambda: ops.bias_share_scatter(
                n_, randn(1, max(Ho, 1), max(Wo, 1), seed=3), (kh, kw), stride, padding, dilation
            ),
            "pfv_decompose": lambda: ops.pfv_decompose(
                x, w, None, torch.zeros(1, 3, dtype=torch.long), stride, padding, dilation
            ),
        }
        for name, call in calls.items():
            if ok:
                call()
            else:
                with pytest.raises(RuntimeError, match=f"srd_ext::{name}: .* is too small for"):
                    call()
        rejected += not ok
    assert 0 < rejected < len(AXIS_CASES)


def test_geometry_rejects_truncated_output():
    """Kernel 3, stride 2, no padding on 2 pixels: (2 - 3) // 2 + 1 = 0 outputs, but division
    toward 0 gives 1; F.conv2d rejects the input, and so do the ops."""
    x, w = randn(1, 2, 2, 6, seed=1), randn(3, 2, 3, 3, seed=2)
    assert not _conv2d_accepts(x, w, 2, 0, 1)
    with pytest.raises(RuntimeError, match=r"srd_ext::conv_tap_norms: input x \(1, 2, 2, 6\) is too small"):
        ops.conv_tap_norms(x, w, 2, 0)
    with pytest.raises(RuntimeError, match="srd_ext::bias_share_scatter: tap_norms .* is too small"):
        ops.bias_share_scatter(torch.rand(1, 9, 2, 6, dtype=F64), randn(1, 1, 2, seed=3), 3, 2, 0)


# ------------------------------------------------------------------------------------------------
# NaN reaches the outputs that depend on it, and only those
# ------------------------------------------------------------------------------------------------
def assert_same_nans(got, want):
    """NaN exactly where the reference has NaN (somewhere), the reference's values elsewhere."""
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(), want.isnan().sum())
    assert want.isnan().any()
    keep = ~want.isnan()
    assert_close(got[keep], want[keep])


@pytest.mark.parametrize(
    "geom", [FIXED_GEOMS[0], FIXED_GEOMS[1], FIXED_GEOMS[5], FIXED_GEOMS[9]], ids=["3x3", "s2g2", "7x7", "tiled"]
)
def test_conv_tap_norms_nan(geom, tap_path):
    x, w, s, p, d, groups = conv_inputs(geom)
    x[0, -1, geom[2] // 2, geom[3] // 2] = NAN
    x, w = leaf(x), leaf(w)
    n = ops.conv_tap_norms(x, w, s, p, d, groups)
    ref = ref_tap_norms(x, w, s, p, d, groups)
    assert_same_nans(n, ref)
    assert not n.isnan().all()
    # Gradients: NaN at the NaN pixel (through its norms) and in the taps of the weight that
    # reach it, the reference's values elsewhere.
    dn = randn(*n.shape, seed=3)
    gx, gw = torch.autograd.grad(n, (x, w), dn)
    rx, rw = torch.autograd.grad(ref, (x, w), dn)
    assert_same_nans(gx, rx)
    assert not gx.isnan().all()
    assert_same_nans(gw, rw)


@pytest.mark.parametrize("where", ["a", "z"])
def test_activation_share_nan(where):
    a, grad, z, extra = act_inputs((2, 5, 4, 3), True)
    (a if where == "a" else z)[1, 2, 2, 1] = NAN
    rel, g = ops.activation_share(a, grad, z, extra)
    want_rel = torch.zeros_like(rel)
    want_g = torch.zeros_like(g)
    if where == "a":
        want_rel[1, 2, 1] = NAN
    want_g[1, :, 2, 1] = NAN  # the pixel's scale R / ||z||^2 is NaN either way
    ref_rel, ref_g = ref_activation_share(a.nan_to_num(), grad, z.nan_to_num(), extra)
    if where == "a":
        assert_same_nans(rel, ref_rel + want_rel)
    else:
        assert_close(rel, ref_rel)
    assert_same_nans(g, ref_g + want_g)
    assert not g.isnan().all()


def ref_scatter_nan(n, d, kernel_size, stride, padding, dilation):
    """ref_scatter with NaN sums S_j passed on to c_j = d_j / S_j."""
    B, _, H, W = n.shape
    Ho, Wo = d.shape[1:]
    taps = taps_of(*kernel_size, H, W, Ho, Wo, stride, padding, dilation)
    S = d.new_zeros(B, Ho, Wo)
    for t, oy, iy, ox, ix in taps:
        S[:, oy[:, None], ox[None, :]] += n[:, t][:, iy[:, None], ix[None, :]]
    c = torch.where(S.isnan(), S, safe_div(d, S))
    R = n.new_zeros(B, H, W)
    for t, oy, iy, ox, ix in taps:
        R[:, iy[:, None], ix[None, :]] += n[:, t][:, iy[:, None], ix[None, :]] * c[:, oy[:, None], ox[None, :]]
    return R


@pytest.mark.parametrize("geom", [FIXED_GEOMS[0], FIXED_GEOMS[1], FIXED_GEOMS[5]], ids=["3x3", "s2g2", "7x7"])
def test_bias_share_scatter_nan(geom):
    n, bd, k, s, p, d = scatter_inputs(geom)
    n[0, k[0] * k[1] // 2, geom[2] // 2, geom[3] // 2] = NAN
    R = ops.bias_share_scatter(n, bd, k, s, p, d)
    assert_same_nans(R, ref_scatter_nan(n, bd, k, s, p, d))
    assert not R.isnan().all()


@pytest.mark.parametrize("mode", MODES)
def test_pfv_decompose_nan(mode):
    geom = FIXED_GEOMS[0]
    x, w, bias, pos, s, p, d = pfv_inputs(geom, True, n_rows=24)
    iy, ix = 3, 4
    x[0, 1, iy, ix] = NAN
    v, mu = ops.pfv_decompose(x, w, bias, pos, s, p, d, mode)
    # Rows that read the NaN pixel under some tap: z is NaN, so every ratio is NaN.
    ty, tx = torch.arange(3).repeat_interleave(3), torch.arange(3).repeat(3)
    reads = (
        (pos[:, 0:1] == 0)
        & (pos[:, 1:2] * s[0] - p[0] + ty * d[0] == iy)
        & (pos[:, 2:3] * s[1] - p[1] + tx * d[1] == ix)
    )
    touched = reads.any(1)
    assert touched.any() and not touched.all()
    assert mu[touched].isnan().all() and v[reads].isnan().all()
    assert torch.isfinite(mu[~touched]).all() and torch.isfinite(v[~touched]).all()
    rv, rmu = ref_pfv(x, w, bias, pos[~touched], s, p, d, mode)
    assert_close(v[~touched], rv)
    assert_close(mu[~touched], rmu)


# ------------------------------------------------------------------------------------------------
# bias_share_scatter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_bias_share_scatter_matches_reference(geom):
    n, bd, k, s, p, d = scatter_inputs(geom)
    n, bd = leaf(n), leaf(bd)
    R = ops.bias_share_scatter(n, bd, k, s, p, d)
    ref = ref_scatter(n, bd, k, s, p, d)
    assert R.shape == (geom[0], geom[2], geom[3])
    assert_close(R, ref)
    dR = randn(*R.shape, seed=9)
    for got, want in zip(grads((R,), (n, bd), (dR,)), grads((ref,), (n, bd), (dR,))):
        assert_close(got, want)


@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_bias_share_scatter_conserves(geom):
    n, bd, k, s, p, d = scatter_inputs(geom)
    # Tap norms of a real conv: every reached (pixel, tap) pair carries a share.
    x, w, *_ = conv_inputs(geom)
    real = ops.conv_tap_norms(x, w, s, p, d, geom[10])
    for tn in (n, real):
        R = ops.bias_share_scatter(tn, bd, k, s, p, d)
        S = torch.zeros_like(bd)
        for t, oy, iy, ox, ix in taps_of(*k, geom[2], geom[3], *bd.shape[1:], s, p, d):
            S[:, oy[:, None], ox[None, :]] += tn[:, t][:, iy[:, None], ix[None, :]]
        want = torch.where(S > 0, bd, torch.zeros_like(bd)).sum((1, 2))
        torch.testing.assert_close(R.sum((1, 2)), want, rtol=1e-10, atol=1e-10)


def test_bias_share_scatter_noncontiguous():
    geom = FIXED_GEOMS[2]
    n, bd, k, s, p, d = scatter_inputs(geom)
    n0, bd0 = leaf(n), leaf(bd)
    ref = ref_scatter(n0, bd0, k, s, p, d)
    dR = randn(*ref.shape, seed=9)
    want = grads((ref,), (n0, bd0), (dR,))
    nn_, bdn = leaf(channels_last_view(n)), leaf(bd.transpose(1, 2).contiguous().transpose(1, 2))
    assert not nn_.is_contiguous() and not bdn.is_contiguous()
    R = ops.bias_share_scatter(nn_, bdn, k, s, p, d)
    assert_close(R, ref)
    for got, exp in zip(grads((R,), (nn_, bdn), (dR,)), want):
        assert_close(got, exp)


def test_bias_share_scatter_zero_and_empty():
    geom = FIXED_GEOMS[1]
    n, bd, k, s, p, d = scatter_inputs(geom)
    n0, bdl = torch.zeros_like(n, requires_grad=True), leaf(bd)
    R = ops.bias_share_scatter(n0, bdl, k, s, p, d)
    assert (R == 0).all()
    gn, gd = torch.autograd.grad(R, (n0, bdl), torch.ones_like(R))
    assert (gn == 0).all() and (gd == 0).all()
    R = ops.bias_share_scatter(n, torch.zeros_like(bd), k, s, p, d)
    assert (R == 0).all()
    ne, bde = leaf(n[:0]), leaf(bd[:0])
    R = ops.bias_share_scatter(ne, bde, k, s, p, d)
    assert R.shape == (0,) + n.shape[2:]
    gn, gd = torch.autograd.grad(R.sum(), (ne, bde))
    assert gn.shape == ne.shape and gd.shape == bde.shape


# ------------------------------------------------------------------------------------------------
# pfv_decompose
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("geom", PFV_GEOMS, ids=PFV_IDS)
def test_pfv_decompose_matches_reference(geom, with_bias, mode):
    x, w, bias, pos, s, p, d = pfv_inputs(geom, with_bias)
    x, w = leaf(x), leaf(w)
    bias = leaf(bias) if with_bias else None
    v, mu = ops.pfv_decompose(x, w, bias, pos, s, p, d, mode)
    rv, rmu = ref_pfv(x, w, bias, pos, s, p, d, mode)
    assert v.shape == (len(pos), geom[5] * geom[6], geom[4]) and mu.shape == v.shape[:2]
    assert_close(v, rv)
    assert_close(mu, rmu)
    diff = [t for t in (x, w, bias) if t is not None]
    up = (randn(*v.shape, seed=11), randn(*mu.shape, seed=12))
    for used in (up, (up[0], None), (None, up[1])):
        for got, want in zip(grads((v, mu), diff, used), grads((rv, rmu), diff, used)):
            assert_close(got, want if want is not None else torch.zeros_like(got), rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geom", PFV_GEOMS, ids=PFV_IDS)
def test_pfv_decompose_sums_to_conv_output(geom, mode):
    x, w, bias, pos, s, p, d = pfv_inputs(geom, True)
    v, mu = ops.pfv_decompose(x, w, bias, pos, s, p, d, mode)
    z = F.conv2d(x, w, bias, s, p, d)[pos[:, 0], :, pos[:, 1], pos[:, 2]]
    if mode == "none":  # the bias is left out of every share
        torch.testing.assert_close(v.sum(1), z - bias, rtol=1e-10, atol=1e-10)
        return
    # Rows with no tap inside the input (all padding) have no PFV to carry the bias.
    H, W, kh, kw = geom[2], geom[3], geom[5], geom[6]
    iy = pos[:, 1:2] * s[0] - p[0] + torch.arange(kh)[None] * d[0]
    ix = pos[:, 2:3] * s[1] - p[1] + torch.arange(kw)[None] * d[1]
    rows = ((iy >= 0) & (iy < H)).any(1) & ((ix >= 0) & (ix < W)).any(1)
    torch.testing.assert_close(v.sum(1)[rows], z[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mu.sum(1)[rows], torch.ones(int(rows.sum()), dtype=F64), rtol=1e-10, atol=1e-10)


def test_pfv_decompose_noncontiguous():
    geom = FIXED_GEOMS[2]
    x, w, bias, pos, s, p, d = pfv_inputs(geom, True)
    want = ops.pfv_decompose(x, w, bias, pos, s, p, d, "contribution")
    xn = channels_last_view(x)
    wn = w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    bn = strided_view(bias)
    pn = pos.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (xn, wn, bn, pn))
    for got, exp in zip(ops.pfv_decompose(xn, wn, bn, pn, s, p, d, "contribution"), want):
        assert_close(got, exp)


@pytest.mark.parametrize("mode", MODES)
def test_pfv_decompose_zero(mode):
    x, w, bias, pos, s, p, d = pfv_inputs(FIXED_GEOMS[0], True)
    xz = torch.zeros_like(x, requires_grad=True)
    v, mu = ops.pfv_decompose(xz, w, torch.zeros_like(bias), pos, s, p, d, mode)
    assert (v == 0).all() and (mu == 0).all()
    # Zero input, nonzero bias: no tap can carry the bias (S = 0), so v_hat = 0 and mu = 0.
    v, mu = ops.pfv_decompose(xz, w, bias, pos, s, p, d, mode)
    assert (v == 0).all() and (mu == 0).all()
    (gx,) = torch.autograd.grad(v.sum() + mu.sum(), (xz,))
    assert torch.isfinite(gx).all()


def test_pfv_decompose_empty():
    x, w, bias, pos, s, p, d = pfv_inputs(FIXED_GEOMS[0], True)
    xl, wl, bl = leaf(x), leaf(w), leaf(bias)
    v, mu = ops.pfv_decompose(xl, wl, bl, pos[:0], s, p, d, "input")
    assert v.shape == (0, 9, w.shape[0]) and mu.shape == (0, 9)
    gx, gw, gb = torch.autograd.grad(v.sum() + mu.sum(), (xl, wl, bl))
    assert (gx == 0).all() and (gw == 0).all() and (gb == 0).all()
    v, mu = ops.pfv_decompose(x[:0], w, bias, pos[:0], s, p, d, "contribution")  # B = 0
    assert v.shape == (0, 9, w.shape[0]) and mu.shape == (0, 9)


# ------------------------------------------------------------------------------------------------
# float32 against float64 (same rounded inputs)
# ------------------------------------------------------------------------------------------------
def _f32_cases():
    g3, g7, gt = FIXED_GEOMS[1], FIXED_GEOMS[5], FIXED_GEOMS[9]
    a = act_inputs((2, 70, 6, 7), True)
    return {
        "activation_share": (ops.activation_share, list(a)),
        "conv_tap_norms_s2g2": (ops.conv_tap_norms, list(conv_inputs(g3))),
        "conv_tap_norms_7x7": (ops.conv_tap_norms, list(conv_inputs(g7))),
        "conv_tap_norms_tiled": (ops.conv_tap_norms, list(conv_inputs(gt))),
        "conv_tap_norms_expand": (
            ops.conv_tap_norms,
            list(conv_inputs((2, 16, 7, 6, 48, 3, 3, (1, 1), (1, 1), (1, 1), 1))),
        ),
        "bias_share_scatter": (ops.bias_share_scatter, list(scatter_inputs(g3))),
        "pfv_decompose": (ops.pfv_decompose, list(pfv_inputs(FIXED_GEOMS[2], True)) + ["contribution"]),
    }


F32_CASES = _f32_cases()


@pytest.mark.parametrize("case", list(F32_CASES))
def test_float32_agrees_with_float64(case, tap_path):
    if tap_path != "auto" and not case.startswith("conv_tap_norms"):
        pytest.skip("the path only matters to conv_tap_norms")
    fn, args = F32_CASES[case]
    args32 = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    args64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args32]
    out32, out64 = fn(*args32), fn(*args64)
    out32 = out32 if isinstance(out32, tuple) else (out32,)
    out64 = out64 if isinstance(out64, tuple) else (out64,)
    for a, b in zip(out32, out64):
        assert a.dtype == torch.float32
        assert_close(a, b, rtol=2e-5)
    # And the gradients.
    leaves32 = [leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args32]
    leaves64 = [leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args64]
    diff32 = [t for t in leaves32 if isinstance(t, torch.Tensor) and t.requires_grad]
    diff64 = [t for t in leaves64 if isinstance(t, torch.Tensor) and t.requires_grad]
    o32, o64 = fn(*leaves32), fn(*leaves64)
    o32 = o32 if isinstance(o32, tuple) else (o32,)
    o64 = o64 if isinstance(o64, tuple) else (o64,)
    ups = [randn(*o.shape, seed=20 + i) for i, o in enumerate(o64)]
    g32 = grads(o32, diff32, [u.float() for u in ups])
    g64 = grads(o64, diff64, ups)
    for a, b in zip(g32, g64):
        assert a.dtype == torch.float32
        assert_close(a, b, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile
# ------------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = FIXED_GEOMS[1]
    a = [leaf(t) for t in act_inputs((2, 3, 4, 5), True)]
    a2 = [leaf(t) for t in act_inputs((3, 6), False, dtype=torch.float32)]
    x, w, s, p, d, groups = conv_inputs(g)
    n, bd, k, *_ = scatter_inputs(g)
    px, pw, pb, pos, ps, pp, pd = pfv_inputs(FIXED_GEOMS[2], True)
    srd = torch.ops.srd_ext
    return {
        "activation_share": (srd.activation_share.default, tuple(a)),
        "activation_share_no_extra": (srd.activation_share.default, tuple(a[:3]) + (None,)),
        "activation_share_2d_f32": (srd.activation_share.default, tuple(a2[:3]) + (None,)),
        "conv_tap_norms": (srd.conv_tap_norms.default, (leaf(x), leaf(w), s, p, d, groups)),
        "bias_share_scatter": (srd.bias_share_scatter.default, (leaf(n), leaf(bd), k, s, p, d)),
        **{
            f"pfv_decompose_{m}": (srd.pfv_decompose.default, (leaf(px), leaf(pw), leaf(pb), pos, ps, pp, pd, m))
            for m in MODES
        },
        "pfv_decompose_nobias": (srd.pfv_decompose.default, (leaf(px), leaf(pw), None, pos, ps, pp, pd, "input")),
    }


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args)


def _gradcheck_cases():
    g = (2, 4, 5, 4, 4, 3, 3, (2, 1), (1, 1), (1, 2), 2)
    x, w, s, p, d, groups = conv_inputs(g, seed=3)
    n, bd, k, *_ = scatter_inputs(g, seed=3)
    n = n + 0.5  # keep every S_j well away from 0
    px, pw, pb, pos, ps, pp, pd = pfv_inputs((2, 3, 5, 4, 4, 3, 3, (1, 1), (1, 1), (2, 1), 1), True, n_rows=4, seed=3)
    a = act_inputs((2, 3, 3, 2), True, seed=3)
    a[2][0, ..., 0] += 1.0  # away from the zero-norm pixels, where g is not differentiable
    cases = {
        "activation_share": (ops.activation_share, list(a)),
        "activation_share_2d": (ops.activation_share, list(act_inputs((3, 4), False, seed=5))),
        "conv_tap_norms": (lambda x_, w_: ops.conv_tap_norms(x_, w_, s, p, d, groups), [x, w]),
        "bias_share_scatter": (lambda n_, d_: ops.bias_share_scatter(n_, d_, k, s, p, d), [n, bd]),
    }
    for m in MODES:
        cases[f"pfv_decompose_{m}"] = (
            lambda x_, w_, b_, m=m: ops.pfv_decompose(x_, w_, b_, pos, ps, pp, pd, m),
            [px, pw, pb],
        )
    return cases


GRADCHECK_CASES = _gradcheck_cases()


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case, tap_path):
    if tap_path != "auto" and not case.startswith("conv_tap_norms"):
        pytest.skip("the path only matters to conv_tap_norms")
    fn, args = GRADCHECK_CASES[case]
    inputs = [leaf(t) for t in args]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _pipeline(x, w, b, a, grad, pos):
    """One conv layer's SRD step touching every op: tap norms, bias scatter, activation share and
    an explicit decomposition."""
    y = F.conv2d(x, w, b, 2, 1)
    n = ops.conv_tap_norms(x, w, 2, 1, 1, 1)
    bias_dot = (grad * b[None, :, None, None]).sum(1)
    r_bias = ops.bias_share_scatter(n, bias_dot, 3, 2, 1, 1)
    rel, g = ops.activation_share(a, grad, y, None)
    v, mu = ops.pfv_decompose(x, w, b, pos, 2, 1, 1, "contribution")
    return rel, g, r_bias, v, mu


def test_torch_compile_fullgraph():
    x, w, s, p, d, _ = conv_inputs((2, 3, 8, 7, 5, 3, 3, (2, 2), (1, 1), (1, 1), 1))
    b = randn(5, seed=4)
    Ho, Wo = out_size(8, 3, 2, 1, 1), out_size(7, 3, 2, 1, 1)
    a, grad = randn(2, 5, Ho, Wo, seed=5), randn(2, 5, Ho, Wo, seed=6)
    pos = torch.tensor([[0, 0, 0], [1, Ho - 1, Wo - 1], [1, 2, 1]])
    leaves_e = [leaf(t) for t in (x, w, b, a, grad)]
    leaves_c = [leaf(t) for t in (x, w, b, a, grad)]
    eager = _pipeline(*leaves_e, pos)
    compiled = torch.compile(_pipeline, fullgraph=True)(*leaves_c, pos)
    for c, e in zip(compiled, eager):
        assert_close(c, e)
    ups = [randn(*o.shape, seed=30 + i) for i, o in enumerate(eager)]
    # A compiled backward may donate its buffers: take its gradient once, without retaining.
    for c, e in zip(grads(compiled, leaves_c, ups, retain=False), grads(eager, leaves_e, ups)):
        assert_close(c, e)


# ------------------------------------------------------------------------------------------------
# Argument checking
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


X, Wt = _t(2, 4, 8, 8), _t(6, 4, 3, 3)
N9, BD = _t(2, 9, 8, 8), _t(2, 8, 8)
POS = torch.tensor([[0, 1, 2], [1, 7, 7]])

BAD = {
    # activation_share
    "act_rank": (
        lambda: ops.activation_share(_t(2, 3, 4), _t(2, 3, 4), _t(2, 3, 4)),
        ["srd_ext::activation_share", "(2, 3, 4)"],
    ),
    "act_shapes": (
        lambda: ops.activation_share(_t(2, 3, 4, 5), _t(2, 3, 4, 6), _t(2, 3, 4, 5)),
        ["srd_ext::activation_share", "(2, 3, 4, 5)", "(2, 3, 4, 6)"],
    ),
    "act_extra_shape": (
        lambda: ops.activation_share(_t(2, 3, 4, 5), _t(2, 3, 4, 5), _t(2, 3, 4, 5), _t(2, 5, 4)),
        ["srd_ext::activation_share", "extra", "(2, 5, 4)", "(2, 3, 4, 5)"],
    ),
    "act_int": (
        lambda: ops.activation_share(*(_t(2, 3, dtype=torch.int64),) * 3),
        ["srd_ext::activation_share", "Long"],
    ),
    "act_dtypes": (
        lambda: ops.activation_share(_t(2, 3), _t(2, 3, dtype=F64), _t(2, 3)),
        ["srd_ext::activation_share", "Double", "Float"],
    ),
    "act_extra_dtype": (
        lambda: ops.activation_share(_t(2, 3), _t(2, 3), _t(2, 3), _t(2, dtype=F64)),
        ["srd_ext::activation_share", "extra", "Double"],
    ),
    # conv_tap_norms
    "norms_rank_x": (lambda: ops.conv_tap_norms(_t(4, 8, 8), Wt, 1, 1), ["srd_ext::conv_tap_norms", "(4, 8, 8)"]),
    "norms_rank_w": (lambda: ops.conv_tap_norms(X, _t(6, 4, 3), 1, 1), ["srd_ext::conv_tap_norms", "(6, 4, 3)"]),
    "norms_channels": (
        lambda: ops.conv_tap_norms(X, _t(6, 3, 3, 3), 1, 1),
        ["srd_ext::conv_tap_norms", "(2, 4, 8, 8)", "(6, 3, 3, 3)"],
    ),
    "norms_groups": (
        lambda: ops.conv_tap_norms(X, _t(6, 4, 3, 3), 1, 1, groups=2),
        ["srd_ext::conv_tap_norms", "(2, 4, 8, 8)", "(6, 4, 3, 3)", "groups=2"],
    ),
    "norms_too_small": (lambda: ops.conv_tap_norms(_t(1, 4, 2, 2), Wt), ["srd_ext::conv_tap_norms", "(1, 4, 2, 2)"]),
    "norms_int": (lambda: ops.conv_tap_norms(X.int(), Wt.int()), ["srd_ext::conv_tap_norms", "Int"]),
    "norms_dtypes": (lambda: ops.conv_tap_norms(X, Wt.double()), ["srd_ext::conv_tap_norms", "Double", "Float"]),
    "norms_stride": (lambda: ops.conv_tap_norms(X, Wt, 0), ["srd_ext::conv_tap_norms", "stride"]),
    # bias_share_scatter
    "scatter_rank": (
        lambda: ops.bias_share_scatter(N9, _t(2, 1, 8, 8), 3, 1, 1),
        ["srd_ext::bias_share_scatter", "(2, 1, 8, 8)"],
    ),
    "scatter_taps": (
        lambda: ops.bias_share_scatter(_t(2, 4, 8, 8), BD, 3, 1, 1),
        ["srd_ext::bias_share_scatter", "(2, 4, 8, 8)", "(3, 3)"],
    ),
    "scatter_out": (
        lambda: ops.bias_share_scatter(N9, _t(2, 7, 8), 3, 1, 1),
        ["srd_ext::bias_share_scatter", "(2, 7, 8)", "(2, 9, 8, 8)", "(2, 8, 8)"],
    ),
    "scatter_batch": (
        lambda: ops.bias_share_scatter(N9, _t(3, 8, 8), 3, 1, 1),
        ["srd_ext::bias_share_scatter", "(3, 8, 8)"],
    ),
    "scatter_int": (
        lambda: ops.bias_share_scatter(N9.long(), BD.long(), 3, 1, 1),
        ["srd_ext::bias_share_scatter", "Long"],
    ),
    "scatter_dtypes": (
        lambda: ops.bias_share_scatter(N9, BD.double(), 3, 1, 1),
        ["srd_ext::bias_share_scatter", "Double", "Float"],
    ),
    # pfv_decompose
    "pfv_rank": (lambda: ops.pfv_decompose(_t(4, 8, 8), Wt, None, POS, 1, 1), ["srd_ext::pfv_decompose", "(4, 8, 8)"]),
    "pfv_channels": (
        lambda: ops.pfv_decompose(X, _t(6, 2, 3, 3), None, POS, 1, 1),
        ["srd_ext::pfv_decompose", "(2, 4, 8, 8)", "(6, 2, 3, 3)"],
    ),
    "pfv_bias_shape": (lambda: ops.pfv_decompose(X, Wt, _t(5), POS, 1, 1), ["srd_ext::pfv_decompose", "(5)", "(6,)"]),
    "pfv_int": (lambda: ops.pfv_decompose(X.long(), Wt.long(), None, POS, 1, 1), ["srd_ext::pfv_decompose", "Long"]),
    "pfv_dtypes": (
        lambda: ops.pfv_decompose(X, Wt, _t(6, dtype=F64), POS, 1, 1),
        ["srd_ext::pfv_decompose", "bias", "Double", "Float"],
    ),
    "pfv_pos_row": (
        lambda: ops.pfv_decompose(X, Wt, None, torch.tensor([[0, 0, 0], [1, 8, 0]]), 1, 1),
        ["srd_ext::pfv_decompose", "row 1", "(1, 8, 0)", "[0, 2)", "[0, 8)"],
    ),
    "pfv_pos_batch": (
        lambda: ops.pfv_decompose(X, Wt, None, torch.tensor([[2, 0, 0]]), 1, 1),
        ["srd_ext::pfv_decompose", "row 0", "[0, 2)"],
    ),
    "pfv_pos_negative": (
        lambda: ops.pfv_decompose(X, Wt, None, torch.tensor([[0, 0, -1]]), 1, 1),
        ["srd_ext::pfv_decompose", "row 0", "(0, 0, -1)"],
    ),
    "pfv_pos_dtype": (
        lambda: ops.pfv_decompose(X, Wt, None, POS.int(), 1, 1),
        ["srd_ext::pfv_decompose", "int64", "Int"],
    ),
    "pfv_pos_float": (lambda: ops.pfv_decompose(X, Wt, None, POS.float(), 1, 1), ["srd_ext::pfv_decompose", "int64"]),
    "pfv_pos_shape": (lambda: ops.pfv_decompose(X, Wt, None, POS[:, :2], 1, 1), ["srd_ext::pfv_decompose", "(2, 2)"]),
    "pfv_mode": (
        lambda: ops.pfv_decompose(X, Wt, None, POS, 1, 1, bias_share="bias"),
        ["srd_ext::pfv_decompose", '"bias"', "contribution"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(case):
    fn, fragments = BAD[case]
    with pytest.raises(RuntimeError) as err:
        fn()
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"


@cuda_only
@pytest.mark.parametrize("op", ["activation_share", "conv_tap_norms", "bias_share_scatter", "pfv_decompose"])
def test_mixed_devices(op):
    c = lambda t: t.cuda()  # noqa: E731
    calls = {
        "activation_share": lambda: ops.activation_share(_t(2, 3), c(_t(2, 3)), _t(2, 3)),
        "conv_tap_norms": lambda: ops.conv_tap_norms(X, c(Wt), 1, 1),
        "bias_share_scatter": lambda: ops.bias_share_scatter(c(N9), BD, 3, 1, 1),
        "pfv_decompose": lambda: ops.pfv_decompose(c(X), c(Wt), None, POS, 1, 1),
    }
    with pytest.raises(RuntimeError) as err:
        calls[op]()
    msg = str(err.value)
    assert f"srd_ext::{op}" in msg and "cuda" in msg and "cpu" in msg
