"""The CUDA kernels of the srd_ext ops against their CPU kernels (forward and backward ops).

float32/float64 are compared with the CPU op in the same dtype; float16/bfloat16 with the CPU op in
float32 on the same (rounded) inputs, with loose tolerances. TF32 is switched off for the
comparisons (one test checks the TF32 path against its own tolerance). Beyond the comparisons:
every conv_tap_norms path, opcheck, gradcheck in float64, torch.compile(fullgraph=True),
determinism, realistic layer shapes, odd memory layouts, a side stream and CUDA-graph capture,
a second GPU, empty channel dimensions, and one run under compute-sanitizer where it is installed.
The CPU kernels themselves are checked against slow references in test_ops.py.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import srd_ext  # noqa: F401  (loads the operator library)
from srd_ext import ops as wrappers

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and wrappers.cuda_kernels_built()), reason="needs a CUDA device and the CUDA kernels"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_ENV = "SRD_EXT_TAP_NORMS_PATH"
TAP_PATHS = ["auto", "product", "gram", "direct"]
DIRECT_MAX_CG = 16  # the CUDA direct kernel's limit (csrc/cuda/conv_tap_norms.cu)

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


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 products on both devices, so that float32 results compare at 1e-4."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=TAP_PATHS)
def tap_path(request, monkeypatch):
    """conv_tap_norms forced onto one path, on both devices ("auto": the choice by cost)."""
    if request.param != "auto":
        monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


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


def skip_if_too_wide(geom, path):
    if path == "direct" and geom[1] // geom[10] > DIRECT_MAX_CG:
        pytest.skip(f"the CUDA direct path takes at most {DIRECT_MAX_CG} input channels per group")


@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_conv_tap_norms(dtype, geom, tap_path):
    skip_if_too_wide(geom, tap_path)
    x, w, s, p, d, groups = conv_inputs(geom, dtype)
    (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], dtype)
    dn = randn(*n.shape, dtype=dtype, seed=3)
    compare(ops.conv_tap_norms_backward, [dn, x, w, n.to(dtype), s, p, d, groups], dtype)


@pytest.mark.parametrize("geom", [GEOMS[1], GEOMS[6]], ids=["narrow", "wide"])
def test_conv_tap_norms_noncontiguous(geom, tap_path):
    skip_if_too_wide(geom, tap_path)
    dt = torch.float64
    x, w, s, p, d, groups = conv_inputs(geom, dt)
    (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], dt, prep=noncontig)
    dn = randn(*n.shape, dtype=dt, seed=3)
    compare(ops.conv_tap_norms_backward, [dn, x, w, n, s, p, d, groups], dt, prep=noncontig)


@pytest.mark.parametrize("geom", [GEOMS[1], GEOMS[6]], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_conv_tap_norms_zero(dtype, geom, tap_path):
    skip_if_too_wide(geom, tap_path)
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


def run_python(code, env=None, timeout=300):
    """Runs `code` in a fresh interpreter (with the repository on sys.path); returns the result."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_pfv_decompose_bad_positions():
    """Positions are checked on the device (no host copy): a bad row raises a device-side
    assertion naming the row. It poisons the CUDA context, hence the subprocess."""
    res = run_python("""
        import torch, srd_ext
        x, w = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(6, 4, 3, 3, device="cuda")
        pos = torch.tensor([[0, 0, 0], [1, 7, 7], [0, 3, 3], [1, 100, 2]], device="cuda")
        try:
            srd_ext.ops.pfv_decompose(x, w, None, pos, 1, 1)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("raised:", e)
    """)
    out = res.stdout + res.stderr
    assert "raised:" in out and "device-side assert" in out, out[-3000:]
    assert "positions row 3 is (b, y, x) = (1, 100, 2)" in out, out[-3000:]


def test_pfv_decompose_positions_on_cpu():
    x, w, bias, pos, s, p, d = pfv_inputs(GEOMS[0], torch.float32, True)
    with pytest.raises(RuntimeError, match="device"):
        ops.pfv_decompose(x.to(DEV), w.to(DEV), bias.to(DEV), pos, s, p, d, "contribution")


# ------------------------------------------------------------------------------------------------
# TF32, as the forward conv runs it by default
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", [GEOMS[5], GEOMS[6], GEOMS[9]], ids=["32to80", "g2dil2", "stride3"])
def test_conv_tap_norms_tf32(geom):
    """The products follow torch's TF32 settings; the norms then stay within TF32's precision."""
    x, w, s, p, d, groups = conv_inputs(geom, torch.float32)
    want = ops.conv_tap_norms(x.double(), w.double(), s, p, d, groups)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    got = ops.conv_tap_norms(x.to(DEV), w.to(DEV), s, p, d, groups).cpu().double()
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3 * want.abs().max().item())


# ------------------------------------------------------------------------------------------------
# opcheck, gradcheck (float64), torch.compile
# ------------------------------------------------------------------------------------------------
def cuda_leaf(t, dtype=None):
    if t is None:
        return None
    t = t.to(DEV, dtype) if dtype is not None else t.to(DEV)
    return t.detach().requires_grad_(t.is_floating_point())


def _opcheck_cases():
    a = [cuda_leaf(t) for t in act_inputs((2, 3, 4, 5), torch.float64, True)]
    a2 = [cuda_leaf(t) for t in act_inputs((3, 6), torch.float32, False)]
    x, w, s, p, d, groups = conv_inputs(GEOMS[1], torch.float64)
    xw, ww, *_ = conv_inputs(GEOMS[6], torch.float64)
    n, bd, k, *_ = scatter_inputs(GEOMS[1], torch.float64)
    px, pw, pb, pos, ps, pp, pd = pfv_inputs(GEOMS[2], torch.float64, True)
    srd = torch.ops.srd_ext
    g6 = GEOMS[6]
    return {
        "activation_share": (srd.activation_share.default, tuple(a)),
        "activation_share_2d_f32": (srd.activation_share.default, tuple(a2[:3]) + (None,)),
        "conv_tap_norms": (srd.conv_tap_norms.default, (cuda_leaf(x), cuda_leaf(w), s, p, d, groups)),
        "conv_tap_norms_wide": (
            srd.conv_tap_norms.default,
            (cuda_leaf(xw), cuda_leaf(ww), list(g6[7]), list(g6[8]), list(g6[9]), g6[10]),
        ),
        "bias_share_scatter": (srd.bias_share_scatter.default, (cuda_leaf(n), cuda_leaf(bd), k, s, p, d)),
        "pfv_decompose": (
            srd.pfv_decompose.default,
            (cuda_leaf(px), cuda_leaf(pw), cuda_leaf(pb), pos.to(DEV), ps, pp, pd, "contribution"),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "activation_share",
        "activation_share_2d_f32",
        "conv_tap_norms",
        "conv_tap_norms_wide",
        "bias_share_scatter",
        "pfv_decompose",
    ],
)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _gradcheck_cases():
    g = (2, 4, 5, 4, 4, 3, 3, (2, 1), (1, 1), (1, 2), 2)
    x, w, s, p, d, groups = conv_inputs(g, torch.float64)
    gw = (1, 20, 5, 4, 24, 3, 3, (1, 1), (1, 1), (1, 1), 1)  # wider than the direct kernel
    xw, ww, sw_, pw_, dw_, _ = conv_inputs(gw, torch.float64)
    n, bd, k, *_ = scatter_inputs(g, torch.float64)
    n = n + 0.5  # keep every S_j well away from 0
    px, pw, pb, pos, ps, pp, pd = pfv_inputs(
        (2, 3, 5, 4, 4, 3, 3, (1, 1), (1, 1), (2, 1), 1), torch.float64, True, n_rows=4
    )
    pos = pos.to(DEV)
    a = list(act_inputs((2, 3, 3, 2), torch.float64, True))
    a[2][0, ..., 0] += 1.0  # away from the zero-norm pixels, where g is not differentiable
    a[2][:, :, 0, 0] += 1.0
    return {
        "activation_share": (wrappers.activation_share, a),
        "activation_share_2d": (wrappers.activation_share, list(act_inputs((3, 4), torch.float64, False))[:3]),
        "conv_tap_norms": (lambda x_, w_: wrappers.conv_tap_norms(x_, w_, s, p, d, groups), [x, w]),
        "conv_tap_norms_wide": (lambda x_, w_: wrappers.conv_tap_norms(x_, w_, sw_, pw_, dw_, 1), [xw, ww]),
        "bias_share_scatter": (lambda n_, d_: wrappers.bias_share_scatter(n_, d_, k, s, p, d), [n, bd]),
        "pfv_decompose": (
            lambda x_, w_, b_: wrappers.pfv_decompose(x_, w_, b_, pos, ps, pp, pd, "contribution"),
            [px, pw, pb],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "activation_share",
        "activation_share_2d",
        "conv_tap_norms",
        "conv_tap_norms_wide",
        "bias_share_scatter",
        "pfv_decompose",
    ],
)
def test_gradcheck(case, tap_path):
    if tap_path != "auto" and not case.startswith("conv_tap_norms"):
        pytest.skip("the path only matters to conv_tap_norms")
    if tap_path == "direct" and case == "conv_tap_norms_wide":
        pytest.skip("wider than the direct kernel")
    fn, args = _gradcheck_cases()[case]
    inputs = [cuda_leaf(t) for t in args]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _pipeline(x, w, b, a, grad, pos):
    """One conv layer's SRD step touching every op."""
    y = F.conv2d(x, w, b, 2, 1)
    n = wrappers.conv_tap_norms(x, w, 2, 1, 1, 1)
    bias_dot = (grad * b[None, :, None, None]).sum(1)
    r_bias = wrappers.bias_share_scatter(n, bias_dot, 3, 2, 1, 1)
    rel, g = wrappers.activation_share(a, grad, y, None)
    v, mu = wrappers.pfv_decompose(x, w, b, pos, 2, 1, 1, "contribution")
    return rel, g, r_bias, v, mu


@pytest.mark.parametrize("cin", [3, 24], ids=["narrow", "wide"])
def test_torch_compile_fullgraph(cin):
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g).to(DEV)  # noqa: E731
    Ho = Wo = out_size(8, 3, 2, 1, 1)
    x, w, b = mk(2, cin, 8, 8), mk(5, cin, 3, 3), mk(5)
    a, grad = mk(2, 5, Ho, Wo), mk(2, 5, Ho, Wo)
    pos = torch.tensor([[0, 0, 0], [1, Ho - 1, Wo - 1], [1, 2, 1]], device=DEV)
    leaves_e = [t.clone().requires_grad_() for t in (x, w, b, a, grad)]
    leaves_c = [t.clone().requires_grad_() for t in (x, w, b, a, grad)]
    eager = _pipeline(*leaves_e, pos)
    # Inductor generates Triton code for CUDA; without Triton, aot_eager still traces the whole
    # graph through the fake kernels and the autograd formulas.
    backend = "inductor" if importlib.util.find_spec("triton") is not None else "aot_eager"
    compiled = torch.compile(_pipeline, fullgraph=True, backend=backend)(*leaves_c, pos)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-10)
    ups = [torch.randn_like(o) for o in eager]
    ge = torch.autograd.grad(eager, leaves_e, ups, allow_unused=True)
    gc = torch.autograd.grad(compiled, leaves_c, ups, allow_unused=True)
    for c, e in zip(gc, ge):
        torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
def test_deterministic_algorithms():
    """Under torch.use_deterministic_algorithms(True) every op and its backward runs (no op
    raises the not-deterministic alert) and two runs agree bit for bit."""
    res = run_python(
        """
        import torch, srd_ext
        from srd_ext import ops
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        dev = "cuda"
        def run():
            outs = []
            a, g, z = (torch.randn(4, 256, 7, 7, device=dev, requires_grad=True) for _ in range(3))
            rel, gg = ops.activation_share(a, g, z)
            a1, g1, z1 = (torch.randn(1, 2048, 7, 7, device=dev, requires_grad=True) for _ in range(3))
            rel1, gg1 = ops.activation_share(a1, g1, z1)  # channels split across blocks
            outs += [rel, gg, rel1, gg1] + list(torch.autograd.grad((rel.sum() + gg.sum() + rel1.sum() + gg1.sum()),
                                                                  (a, g, z, a1, g1, z1)))
            for cin, cout, k, s, groups in [(64, 128, 3, 1, 1), (256, 64, 3, 2, 1), (3, 64, 7, 2, 1), (32, 32, 3, 1, 32)]:
                x = torch.randn(2, cin, 14, 14, device=dev, requires_grad=True)
                w = torch.randn(cout, cin // groups, k, k, device=dev, requires_grad=True)
                n = ops.conv_tap_norms(x, w, s, k // 2, 1, groups)
                outs += [n] + list(torch.autograd.grad((n * torch.rand_like(n)).sum(), (x, w)))
                d = torch.randn(2, (14 + 2 * (k // 2) - k) // s + 1, (14 + 2 * (k // 2) - k) // s + 1, device=dev)
                nn = n.detach().requires_grad_()
                r = ops.bias_share_scatter(nn, d, k, s, k // 2)
                outs += [r] + list(torch.autograd.grad(r.sum(), (nn,)))
            x = torch.randn(2, 64, 14, 14, device=dev); w = torch.randn(32, 64, 3, 3, device=dev)
            pos = torch.randint(0, 2, (50, 3), device=dev) * torch.tensor([1, 6, 6], device=dev)
            outs += list(ops.pfv_decompose(x, w, torch.randn(32, device=dev), pos, 1, 1))
            return outs
        torch.manual_seed(1); first = run()
        torch.manual_seed(1); second = run()
        assert len(first) == len(second)
        bad = [i for i, (p, q) in enumerate(zip(first, second)) if not torch.equal(p, q)]
        print("mismatches:", bad)
    """,
        env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "mismatches: []" in res.stdout, res.stdout[-3000:]


# ------------------------------------------------------------------------------------------------
# Realistic layer shapes: 512-2048 channels at 7x7 and 14x14, the 224x224 stem; batch 1 and 32
# ------------------------------------------------------------------------------------------------
BATCHES = [1, 32]
REAL_ACT = [(2048, 7, 7), (512, 14, 14), (1024, 14, 14), (64, 112, 112), (2048,)]


@pytest.mark.parametrize("shape", REAL_ACT, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
def test_activation_share_layer_shapes(batch, shape):
    a, grad, z, extra = act_inputs((batch,) + shape, torch.float32, True)
    rel, _ = compare(ops.activation_share, [a, grad, z, extra], torch.float32)
    d_rel, d_g = randn(*rel.shape, dtype=torch.float32, seed=5), randn(batch, *shape, dtype=torch.float32, seed=6)
    compare(ops.activation_share_backward, [d_rel, d_g, a, grad, z, rel], torch.float32)


# (name, C_in, H, W, C_out, k, stride, padding, groups)
REAL_CONV = [
    ("stem 7x7 s2 3->64 @224", 3, 224, 224, 64, 7, 2, 3, 1),
    ("3x3 512->512 @7", 512, 7, 7, 512, 3, 1, 1, 1),
    ("3x3 s2 512->512 @14", 512, 14, 14, 512, 3, 2, 1, 1),
    ("3x3 256->256 @14", 256, 14, 14, 256, 3, 1, 1, 1),
    ("1x1 512->2048 @7", 512, 7, 7, 2048, 1, 1, 0, 1),
    ("1x1 2048->512 @7", 2048, 7, 7, 512, 1, 1, 0, 1),
    ("1x1 s2 1024->2048 @14", 1024, 14, 14, 2048, 1, 2, 0, 1),
    ("3x3 g32 1024->1024 @7", 1024, 7, 7, 1024, 3, 1, 1, 32),
    ("dw 3x3 960 @7", 960, 7, 7, 960, 3, 1, 1, 960),
]


def real_geom(layer, batch):
    _, cin, H, W, cout, k, s, p, groups = layer
    return (batch, cin, H, W, cout, k, k, (s, s), (p, p), (1, 1), groups)


@pytest.mark.parametrize("layer", REAL_CONV, ids=[lay[0] for lay in REAL_CONV])
@pytest.mark.parametrize("batch", BATCHES)
def test_conv_ops_layer_shapes(batch, layer):
    geom = real_geom(layer, batch)
    x, w, s, p, d, groups = conv_inputs(geom, torch.float32)
    (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], torch.float32)
    if batch == 1:
        dn = randn(*n.shape, dtype=torch.float32, seed=3)
        compare(ops.conv_tap_norms_backward, [dn, x, w, n, s, p, d, groups], torch.float32)
    bn, bd, k, *_ = scatter_inputs(geom, torch.float32)
    (rel,) = compare(ops.bias_share_scatter, [bn, bd, k, s, p, d], torch.float32)
    if batch == 1:
        compare(
            ops.bias_share_scatter_backward,
            [randn(*rel.shape, dtype=torch.float32, seed=9), bn, bd, k, s, p, d],
            torch.float32,
        )


@pytest.mark.parametrize("batch", BATCHES)
def test_pfv_decompose_layer_shape(batch):
    geom = real_geom(("3x3 512 @14", 512, 14, 14, 512, 3, 1, 1, 1), batch)
    x, w, bias, pos, s, p, d = pfv_inputs(geom, torch.float32, True, n_rows=1024)
    compare(ops.pfv_decompose, [x, w, bias, pos, s, p, d, "contribution"], torch.float32)


# ------------------------------------------------------------------------------------------------
# Memory layouts: channels_last, storage offsets, strided float16/bfloat16
# ------------------------------------------------------------------------------------------------
def with_offset(t):
    """t's values at storage offset 3 (no 16-byte alignment)."""
    buf = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
    buf[3:].copy_(t.reshape(-1))
    return buf[3:].view(t.shape)


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else noncontig(t)


LAYOUTS = {"channels_last": channels_last, "offset": with_offset, "strided": noncontig}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
def test_layouts(dtype, layout):
    prep = LAYOUTS[layout]
    a, grad, z, extra = act_inputs((2, 70, 3, 5), dtype, True)
    rel, _ = compare(ops.activation_share, [a, grad, z, extra], dtype, prep=prep)
    compare(
        ops.activation_share_backward,
        [randn(*rel.shape, dtype=dtype, seed=5), randn(2, 70, 3, 5, dtype=dtype, seed=6), a, grad, z, rel.to(dtype)],
        dtype,
        prep=prep,
    )
    for geom in (GEOMS[1], GEOMS[6], GEOMS[9]):
        x, w, s, p, d, groups = conv_inputs(geom, dtype)
        (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, groups], dtype, prep=prep)
        compare(
            ops.conv_tap_norms_backward,
            [randn(*n.shape, dtype=dtype, seed=3), x, w, n.to(dtype), s, p, d, groups],
            dtype,
            prep=prep,
        )
    n, bd, k, s, p, d = scatter_inputs(GEOMS[2], dtype)
    compare(ops.bias_share_scatter, [n, bd, k, s, p, d], dtype, prep=prep)
    x, w, bias, pos, s, p, d = pfv_inputs(GEOMS[2], dtype, True)
    compare(
        ops.pfv_decompose,
        [x, w, bias, pos, s, p, d, "input"],
        dtype,
        prep=lambda t: t if t.dtype == torch.long else prep(t),
    )


# ------------------------------------------------------------------------------------------------
# Streams and CUDA graphs, a second device
# ------------------------------------------------------------------------------------------------
def _all_ops(dev, dtype=torch.float32):
    """Callables running every op (forward and backward ops) on fixed inputs on `dev`."""
    g = torch.Generator().manual_seed(3)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)  # noqa: E731
    a, grad, z = mk(2, 40, 5, 5), mk(2, 40, 5, 5), mk(2, 40, 5, 5)
    d_rel, d_g, rel = mk(2, 5, 5), mk(2, 40, 5, 5), mk(2, 5, 5)
    a1, g1, z1 = mk(1, 600, 2, 2), mk(1, 600, 2, 2), mk(1, 600, 2, 2)  # few pixels: channels split
    n, d, d_rel_in = mk(2, 9, 9, 9).abs(), mk(2, 5, 5), mk(2, 9, 9)
    xs = {cin: mk(2, cin, 9, 9) for cin in (3, 24)}
    ws = {cin: mk(40, cin, 3, 3) for cin in (3, 24)}
    dn, bias = mk(2, 9, 9, 9), mk(40)
    pos = torch.tensor([[0, 0, 0], [1, 4, 4], [1, 2, 3]], device=dev)
    geo = ([2, 2], [1, 1], [1, 1])
    fns = {
        "activation_share": lambda: ops.activation_share(a, grad, z, None),
        "activation_share_split": lambda: ops.activation_share(a1, g1, z1, None),
        "activation_share_backward": lambda: ops.activation_share_backward(d_rel, d_g, a, grad, z, rel),
        "bias_share_scatter": lambda: ops.bias_share_scatter(n, d, [3, 3], *geo),
        "bias_share_scatter_backward": lambda: ops.bias_share_scatter_backward(d_rel_in, n, d, [3, 3], *geo),
        "pfv_decompose": lambda: ops.pfv_decompose(xs[24], ws[24], bias, pos, *geo, "contribution"),
    }
    for cin in (3, 24):  # the direct and a GEMM path
        x, w = xs[cin], ws[cin]
        fns[f"conv_tap_norms_{cin}"] = lambda x=x, w=w: ops.conv_tap_norms(x, w, *geo, 1)
        fns[f"conv_tap_norms_backward_{cin}"] = lambda x=x, w=w: ops.conv_tap_norms_backward(
            dn, x, w, ops.conv_tap_norms(x, w, *geo, 1), *geo, 1
        )
    return fns


def test_side_stream():
    """Every op runs on the current stream: results computed on a side stream are the default
    stream's."""
    fns = _all_ops(DEV)
    want = {k: as_tuple(f()) for k, f in fns.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = {k: as_tuple(f()) for k, f in fns.items()}
    side.synchronize()
    for k in fns:
        for x, y in zip(got[k], want[k]):
            assert torch.equal(x, y), k


def test_cuda_graph_capture():
    """No op synchronizes with the host (pfv_decompose checks its positions on the device), so
    all of them can be captured in a CUDA graph and replayed."""
    fns = _all_ops(DEV)
    want = {k: [t.clone() for t in as_tuple(f())] for k, f in fns.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (allocator, library handles) off the default stream
        for f in fns.values():
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {k: as_tuple(f()) for k, f in fns.items()}
    for o in outs.values():
        for t in o:
            t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for k in fns:
        for x, y in zip(outs[k], want[k]):
            assert torch.equal(x, y), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    """On cuda:1 with cuda:0 current: results on cuda:1, equal to the CPU op's."""
    fns_cpu, fns_1 = _all_ops("cpu"), _all_ops("cuda:1")
    with torch.cuda.device(0):
        for k in fns_cpu:
            got, want = as_tuple(fns_1[k]()), as_tuple(fns_cpu[k]())
            for x, y in zip(got, want):
                assert x.device == torch.device("cuda:1"), k
                torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-4 * max(1.0, y.abs().max().item()))


# ------------------------------------------------------------------------------------------------
# Empty channel dimensions: C = 0, C_out = 0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_channels(dtype):
    a, grad, z, extra = act_inputs((2, 0, 3, 4), dtype, True)
    rel, _ = compare(ops.activation_share, [a, grad, z, extra], dtype)
    compare(ops.activation_share_backward, [randn(2, 3, 4, dtype=dtype, seed=5), a, a, grad, z, rel.to(dtype)], dtype)
    s, p, d = [1, 1], [1, 1], [1, 1]
    for cin, cout in ((0, 5), (4, 0), (0, 0)):
        x, w = randn(2, cin, 5, 6, dtype=dtype, seed=1), randn(cout, cin, 3, 3, dtype=dtype, seed=2)
        (n,) = compare(ops.conv_tap_norms, [x, w, s, p, d, 1], dtype)
        compare(
            ops.conv_tap_norms_backward, [randn(*n.shape, dtype=dtype, seed=3), x, w, n.to(dtype), s, p, d, 1], dtype
        )
        pos = torch.tensor([[0, 0, 0], [1, 4, 5]])
        bias = randn(cout, dtype=dtype, seed=4)
        compare(ops.pfv_decompose, [x, w, bias, pos, s, p, d, "contribution"], dtype)


# ------------------------------------------------------------------------------------------------
# compute-sanitizer
# ------------------------------------------------------------------------------------------------
def _sanitizer():
    found = shutil.which("compute-sanitizer")
    if found is None:
        cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")
        found = cand if os.path.exists(cand) else None
    return found


SANITIZER_WORKLOAD = """
import os, torch, srd_ext
from srd_ext import ops
torch.manual_seed(0)
dev = "cuda"
def mk(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=dev).to(dtype)
for dtype in (torch.float32, torch.float16):
    for shape in [(2, 40, 5, 5), (1, 600, 2, 2), (3, 33), (2, 7, 1, 1)]:
        a, g, z = mk(*shape, dtype=dtype), mk(*shape, dtype=dtype), mk(*shape, dtype=dtype)
        pix = (shape[0],) + tuple(shape[2:])
        rel, gg = ops.activation_share(a, g, z, mk(*pix, dtype=dtype))
        torch.ops.srd_ext.activation_share_backward(mk(*pix, dtype=dtype), mk(*shape, dtype=dtype), a, g, z, rel)
    for path in ("product", "gram", "direct"):
        os.environ["SRD_EXT_TAP_NORMS_PATH"] = path
        for cin, cout, k, s, groups, hw in [(4, 6, 3, 1, 1, 7), (12, 20, 3, 2, 2, 9), (16, 8, 5, 3, 1, 11), (8, 8, 3, 1, 8, 6)]:
            x = mk(2, cin, hw, hw + 1, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last) if cin == 12 else x
            w = mk(cout, cin // groups, k, k, dtype=dtype)
            n = ops.conv_tap_norms(x, w, s, k // 2, 1, groups)
            torch.ops.srd_ext.conv_tap_norms_backward(torch.rand_like(n), x, w, n, [s, s], [k // 2] * 2, [1, 1], groups)
            ho, wo = (hw + 2 * (k // 2) - k) // s + 1, (hw + 1 + 2 * (k // 2) - k) // s + 1
            bd = mk(2, ho, wo, dtype=dtype)
            r = ops.bias_share_scatter(n, bd, k, s, k // 2)
            torch.ops.srd_ext.bias_share_scatter_backward(torch.rand_like(r), n, bd, [k, k], [s, s], [k // 2] * 2, [1, 1])
            if groups == 1:
                pos = torch.tensor([[0, 0, 0], [1, ho - 1, wo - 1], [0, ho // 2, 0]], device=dev)
                ops.pfv_decompose(x, w, mk(cout, dtype=dtype), pos, s, k // 2, 1, "contribution")
torch.cuda.synchronize()
print("workload done")
"""


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "workload.py"
    script.write_text(SANITIZER_WORKLOAD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    base = [exe, "--tool", tool, "--error-exitcode", "3"]
    # Only the extension's kernels are instrumented (torch's and cuDNN's are not ours to check),
    # and failing CUDA API calls inside torch are not reported. Older tools lack some of these
    # options (or call the filter --kernel-regex): then the next set is tried.
    option_sets = (
        ["--report-api-errors", "no", "--kernel-name", "kns=srd_ext"],
        ["--kernel-name", "kns=srd_ext"],
        ["--kernel-regex", "kns=srd_ext"],
        [],
    )
    for options in option_sets:
        res = subprocess.run(
            base + options + [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
        )
        out = res.stdout + res.stderr
        unknown_option = re.search(r"(?i)unrecognized|unknown option|invalid (option|value)", out)
        if "workload done" in out or not unknown_option:
            break
    assert res.returncode == 0 and "workload done" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out[-4000:]
