"""The CUDA kernels of the srd_ext ops against their CPU kernels (forward and backward ops).

float32/float64 are compared with the CPU op in the same dtype; float16/bfloat16 with the CPU op in
float32 on the same (rounded) inputs, with loose tolerances.
"""
import pytest
import torch

import srd_ext  # noqa: F401  (loads the operator library)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.srd_ext
DEV = "cuda"
EXACT = [torch.float64, torch.float32]
LOW = [torch.float16, torch.bfloat16]
ALL = EXACT + LOW
# Tolerance, relative to the values and to the reference's largest magnitude.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}

# (B, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
GEOMS = [
    (2, 4, 8, 7, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 6, 9, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1), 2),  # stride 2, groups 2
    (1, 4, 10, 9, 5, 3, 2, (1, 2), (2, 0), (2, 2), 1),  # dilation 2, asymmetric
    (2, 8, 6, 6, 12, 1, 1, (1, 1), (0, 0), (1, 1), 1),  # 1x1
    (1, 3, 12, 12, 4, 7, 7, (2, 2), (3, 3), (1, 1), 1),  # 7x7
    (2, 32, 9, 10, 80, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # several tiles along every axis
    (1, 48, 7, 7, 96, 3, 3, (2, 2), (1, 1), (2, 2), 2),  # tiled, groups 2, dilation 2
    (2, 8, 7, 7, 8, 3, 3, (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (1, 64, 5, 5, 130, 1, 1, (2, 2), (0, 0), (1, 1), 1),  # 1x1 stride 2: pixels never reached
    (1, 40, 11, 13, 40, 5, 5, (3, 2), (2, 2), (1, 1), 1),  # stride 3
    (1, 2, 3, 3, 2, 3, 3, (1, 1), (4, 4), (1, 1), 1),  # padding larger than the input
    (0, 4, 5, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # empty batch
]
GEOM_IDS = [f"g{i}" for i in range(len(GEOMS))]
PFV_GEOMS = [g for g in GEOMS if g[10] == 1] + [
    (2, 300, 5, 5, 260, 3, 3, (1, 1), (1, 1), (1, 1), 1),  # more channels than threads
]
PFV_IDS = [f"p{i}" for i in range(len(PFV_GEOMS))]


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)


def ref_dtype(dtype):
    return dtype if dtype in EXACT else torch.float32


def noncontig(t):
    """A non-contiguous tensor (on t's device) with t's values."""
    u = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    u[..., ::2] = t
    v = u[..., ::2]
    assert not v.is_contiguous() or t.numel() <= 1
    return v


def as_tuple(r):
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def assert_close(actual, expected, dtype):
    assert actual.device.type == "cuda"
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    actual = actual.cpu().to(expected.dtype)
    assert torch.isfinite(actual).all()
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def compare(op, args, dtype, prep=None):
    """Runs `op` on CUDA copies of the CPU arguments `args` (tensors of `dtype`) and checks it
    against the CPU op (in float32 for half types). `prep` may transform each CUDA tensor."""
    rd = ref_dtype(dtype)
    cpu_args = [a.to(rd) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    expected = as_tuple(op(*cpu_args))
    dev_args = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.to(DEV)
            if prep is not None:
                a = prep(a)
        dev_args.append(a)
    actual = as_tuple(op(*dev_args))
    assert len(actual) == len(expected)
    for x, e in zip(actual, expected):
        assert_close(x, e, dtype)
    return expected


# ------------------------------------------------------------------------------------------------
# activation_share
# ------------------------------------------------------------------------------------------------
ACT_SHAPES = [(2, 5, 6, 7), (3, 70, 3, 3), (4, 33), (2, 3, 1, 1), (0, 4, 5, 5), (0, 3)]


def act_inputs(shape, dtype, with_extra):
    a, grad, z = (randn(*shape, dtype=dtype, seed=s) for s in (1, 2, 3))
    if shape[0] > 0:
        z[0, ..., 0] = 0  # pixels with a zero pre-activation PFV
        if len(shape) == 4:
            z[:, :, 0, 0] = 0
    pix = (shape[0],) + tuple(shape[2:])
    extra = randn(*pix, dtype=dtype, seed=4) if with_extra else None
    return a, grad, z, extra


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_activation_share(dtype, shape, with_extra):
    a, grad, z, extra = act_inputs(shape, dtype, with_extra)
    rel, _ = compare(ops.activation_share, [a, grad, z, extra], dtype)
    pix = (shape[0],) + tuple(shape[2:])
    d_rel, d_g = randn(*pix, dtype=dtype, seed=5), randn(*shape, dtype=dtype, seed=6)
    compare(ops.activation_share_backward, [d_rel, d_g, a, grad, z, rel.to(dtype)], dtype)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (4, 33)], ids=str)
def test_activation_share_noncontiguous(shape):
    a, grad, z, extra = act_inputs(shape, torch.float64, True)
    rel, _ = compare(ops.activation_share, [a, grad, z, extra], torch.float64, prep=noncontig)
    d_rel, d_g = randn(*rel.shape, dtype=torch.float64, seed=5), randn(*shape, dtype=torch.float64, seed=6)
    compare(ops.activation_share_backward, [d_rel, d_g, a, grad, z, rel], torch.float64, prep=noncontig)


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_activation_share_zero(dtype):
    a = torch.zeros(2, 4, 5, 6, dtype=dtype, device=DEV)
    rel, g = ops.activation_share(a, a, a, None)
    assert (rel == 0).all() and (g == 0).all()
    outs = ops.activation_share_backward(torch.ones_like(rel), torch.ones_like(a), a, a, a, rel)
    for o in outs:
        assert torch.isfinite(o.float()).all()
    assert (outs[2] == 0).all()


# ------------------------------------------------------------------------------------------------
# conv_tap_norms
# ------------------------------------------------------------------------------------------------
def conv_inputs(geom, dtype):
    B, cin, H, W, cout, kh, kw, s, p, d, groups = geom
    x = randn(B, cin, H, W, dtype=dtype, seed=1)
    w = (randn(cout, cin // groups, kh, kw, dtype=torch.float64, seed=2) / (cin // groups) ** 0.5).to(dtype)
    return x, w, list(s), list(p), list(d), groups


@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_conv_tap_norms(dtype, geom):
    x, w, s, p, d, groups = conv_inputs(geom, dtype)
    (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], dtype)
    dn = randn(*n.shape, dtype=dtype, seed=3)
    compare(ops.conv_tap_norms_backward, [dn, x, w, n.to(dtype), s, p, d, groups], dtype)


@pytest.mark.parametrize("geom", [GEOMS[1], GEOMS[6]], ids=["direct", "tiled"])
def test_conv_tap_norms_noncontiguous(geom):
    dt = torch.float64
    x, w, s, p, d, groups = conv_inputs(geom, dt)
    (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], dt, prep=noncontig)
    dn = randn(*n.shape, dtype=dt, seed=3)
    compare(ops.conv_tap_norms_backward, [dn, x, w, n, s, p, d, groups], dt, prep=noncontig)


@pytest.mark.parametrize("geom", [GEOMS[1], GEOMS[6]], ids=["direct", "tiled"])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_conv_tap_norms_zero(dtype, geom):
    x, w, s, p, d, groups = conv_inputs(geom, dtype)
    x = torch.zeros_like(x, device=DEV)
    w = w.to(DEV)
    n = ops.conv_tap_norms(x, w, s, p, d, groups)
    assert (n == 0).all()
    gx, gw = ops.conv_tap_norms_backward(torch.ones_like(n), x, w, n, s, p, d, groups)
    assert (gx == 0).all() and (gw == 0).all()


# ------------------------------------------------------------------------------------------------
# bias_share_scatter
# ------------------------------------------------------------------------------------------------
def scatter_inputs(geom, dtype):
    B, _, H, W, _, kh, kw, s, p, d, _ = geom
    Ho, Wo = out_size(H, kh, s[0], p[0], d[0]), out_size(W, kw, s[1], p[1], d[1])
    g = torch.Generator().manual_seed(7)
    n = torch.rand(B, kh * kw, H, W, dtype=torch.float64, generator=g)
    n[n < 0.3] = 0
    n[:, :, : min(H, 2)] = 0  # outputs whose taps all read these rows have S = 0
    bias_dot = randn(B, Ho, Wo, dtype=torch.float64, seed=8)
    return n.to(dtype), bias_dot.to(dtype), [kh, kw], list(s), list(p), list(d)


@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_bias_share_scatter(dtype, geom):
    n, bd, k, s, p, d = scatter_inputs(geom, dtype)
    (rel,) = compare(ops.bias_share_scatter, [n, bd, k, s, p, d], dtype)
    d_rel = randn(*rel.shape, dtype=dtype, seed=9)
    compare(ops.bias_share_scatter_backward, [d_rel, n, bd, k, s, p, d], dtype)


def test_bias_share_scatter_noncontiguous():
    n, bd, k, s, p, d = scatter_inputs(GEOMS[2], torch.float64)
    (rel,) = compare(ops.bias_share_scatter, [n, bd, k, s, p, d], torch.float64, prep=noncontig)
    d_rel = randn(*rel.shape, dtype=torch.float64, seed=9)
    compare(ops.bias_share_scatter_backward, [d_rel, n, bd, k, s, p, d], torch.float64, prep=noncontig)


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_bias_share_scatter_zero(dtype):
    n, bd, k, s, p, d = scatter_inputs(GEOMS[0], dtype)
    n = torch.zeros_like(n, device=DEV)
    bd = bd.to(DEV)
    rel = ops.bias_share_scatter(n, bd, k, s, p, d)
    assert (rel == 0).all()
    gn, gd = ops.bias_share_scatter_backward(torch.ones_like(rel), n, bd, k, s, p, d)
    assert (gn == 0).all() and (gd == 0).all()


# ------------------------------------------------------------------------------------------------
# pfv_decompose
# ------------------------------------------------------------------------------------------------
def pfv_inputs(geom, dtype, with_bias, n_rows=17):
    x, w, s, p, d, _ = conv_inputs(geom, dtype)
    B, _, H, W, cout, kh, kw = geom[:7]
    Ho, Wo = out_size(H, kh, s[0], p[0], d[0]), out_size(W, kw, s[1], p[1], d[1])
    bias = randn(cout, dtype=dtype, seed=4) if with_bias else None
    if B == 0:
        pos = torch.zeros(0, 3, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(5)
        pos = torch.stack([torch.randint(0, m, (n_rows,), generator=g) for m in (B, Ho, Wo)], 1)
        pos[0] = torch.tensor([0, 0, 0])
        pos[1] = torch.tensor([B - 1, Ho - 1, Wo - 1])
    return x, w, bias, pos, s, p, d


@pytest.mark.parametrize("mode", ["none", "contribution", "input"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("geom", PFV_GEOMS, ids=PFV_IDS)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_pfv_decompose(dtype, geom, with_bias, mode):
    x, w, bias, pos, s, p, d = pfv_inputs(geom, dtype, with_bias)
    compare(ops.pfv_decompose, [x, w, bias, pos, s, p, d, mode], dtype)


def test_pfv_decompose_noncontiguous():
    x, w, bias, pos, s, p, d = pfv_inputs(GEOMS[2], torch.float64, True)
    compare(ops.pfv_decompose, [x, w, bias, pos, s, p, d, "contribution"], torch.float64, prep=noncontig)


def test_pfv_decompose_zero_and_empty():
    x, w, bias, pos, s, p, d = pfv_inputs(GEOMS[0], torch.float32, True)
    x, w, bias, pos = x.to(DEV), w.to(DEV), bias.to(DEV), pos.to(DEV)
    for mode in ("none", "contribution", "input"):
        v, mu = ops.pfv_decompose(torch.zeros_like(x), w, torch.zeros_like(bias), pos, s, p, d, mode)
        assert (v == 0).all() and (mu == 0).all()
    v, mu = ops.pfv_decompose(x, w, bias, pos[:0], s, p, d, "input")
    assert v.shape == (0, 9, w.shape[0]) and mu.shape == (0, 9) and v.is_cuda


def test_pfv_decompose_bad_positions():
    x, w, bias, pos, s, p, d = pfv_inputs(GEOMS[0], torch.float32, True)
    x, w, bias = x.to(DEV), w.to(DEV), bias.to(DEV)
    bad = pos.clone()
    bad[3, 1] = 100
    with pytest.raises(RuntimeError, match="row 3"):
        ops.pfv_decompose(x, w, bias, bad.to(DEV), s, p, d, "contribution")
    with pytest.raises(RuntimeError, match="device"):
        ops.pfv_decompose(x, w, bias, pos, s, p, d, "contribution")  # positions left on the CPU
