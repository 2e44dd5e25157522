import warnings

import pytest
import torch

from srd_ext import metrics as M


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- normalize


def test_normalize_by_max_and_clamp():
    maps = torch.tensor([[[2.0, -4.0], [1.0, 0.0]]])
    assert torch.equal(M.normalize(maps), torch.tensor([[[1.0, -1.0], [0.5, 0.0]]]))


def test_normalize_degenerate_maps():
    maps = torch.tensor([[[-2.0, -1.0]], [[0.0, 0.0]], [[0.0, -3.0]]])
    out = M.normalize(maps)
    assert torch.equal(out, torch.tensor([[[-1.0, -0.5]], [[0.0, 0.0]], [[0.0, -1.0]]]))
    assert torch.isfinite(out).all()


def test_normalize_accepts_channel_dim_and_is_per_sample():
    maps = torch.rand(3, 1, 5, 5, generator=_gen()) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    out = M.normalize(maps)
    assert out.shape == (3, 5, 5)
    assert torch.allclose(out.flatten(1).amax(1), torch.ones(3))


# ---------------------------------------------------------------- pointing game


def _point(h, w, y, x):
    m = torch.zeros(1, h, w)
    m[0, y, x] = 1.0
    return m


@pytest.mark.parametrize(
    "peak,hit",
    [
        ((10, 25), True),  # distance 15: exactly the tolerance
        ((10, 26), False),  # distance 16
        ((19, 22), True),  # distance sqrt(9^2 + 12^2) = 15
        ((21, 21), False),  # distance 15.56: inside the square, outside the disk
    ],
)
def test_pointing_game_tolerance_boundary(peak, hit):
    mask = _point(40, 40, 10, 10)
    maps = _point(40, 40, *peak)
    assert M.pointing_game(maps, mask, tolerance=15).item() is hit


def test_pointing_game_no_tolerance_ties_and_empty_mask():
    mask = _point(8, 8, 3, 3)
    assert M.pointing_game(_point(8, 8, 3, 3), mask, tolerance=0).item()
    assert not M.pointing_game(_point(8, 8, 3, 4), mask, tolerance=0).item()
    tie = _point(8, 8, 0, 0) + _point(8, 8, 3, 3)
    assert M.pointing_game(tie, mask, tolerance=0).item()
    assert not M.pointing_game(_point(8, 8, 3, 3), torch.zeros(1, 8, 8), tolerance=3).item()


def test_pointing_game_upsamples_small_maps():
    small = _point(4, 4, 1, 1)  # cell (1, 1) covers pixels 4..7 of a 16x16 mask
    inside = torch.zeros(1, 16, 16, dtype=torch.bool)
    inside[0, 5:7, 5:7] = True
    outside = torch.zeros(1, 16, 16, dtype=torch.bool)
    outside[0, 12:, 12:] = True
    assert M.pointing_game(small, inside, tolerance=0).item()
    assert not M.pointing_game(small, outside, tolerance=0).item()
    assert M.upsample(small, 16).shape == (1, 16, 16)


def test_pointing_game_batch_equals_single():
    maps = torch.randn(5, 20, 20, generator=_gen(1))
    masks = torch.rand(5, 20, 20, generator=_gen(2)) > 0.8
    batch = M.pointing_game(maps, masks, tolerance=2)
    single = torch.cat([M.pointing_game(maps[i : i + 1], masks[i : i + 1], tolerance=2) for i in range(5)])
    assert torch.equal(batch, single)


# ---------------------------------------------------------------- localization


def test_attribution_localization_hand_cases():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True
    ones = torch.ones(1, 4, 4)
    assert M.attribution_localization(ones, mask).item() == pytest.approx(0.5)
    # negative relevance is ignored, wherever it is
    with_neg = ones.clone()
    with_neg[0, 0, 0] = -5.0
    with_neg[0, 0, 3] = -5.0
    assert M.attribution_localization(with_neg, mask).item() == pytest.approx(7 / 14)
    inside_only = ones * mask
    assert M.attribution_localization(inside_only, mask).item() == pytest.approx(1.0)
    assert M.attribution_localization(-ones, mask).item() == 0.0
    assert M.attribution_localization(torch.zeros(1, 4, 4), mask).item() == 0.0


def test_attribution_localization_batch_equals_single():
    maps = torch.randn(4, 9, 9, generator=_gen(3))
    masks = torch.rand(4, 9, 9, generator=_gen(4)) > 0.5
    batch = M.attribution_localization(maps, masks)
    single = torch.cat([M.attribution_localization(maps[i : i + 1], masks[i : i + 1]) for i in range(4)])
    assert torch.allclose(batch, single)


# ---------------------------------------------------------------- sparseness


def test_sparseness_hand_cases():
    n = 16
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 1] = 3.0
    assert M.sparseness(one_hot).item() == pytest.approx(1 - 1 / n)
    assert M.sparseness(torch.full((1, 4, 4), 0.3)).item() == pytest.approx(0.0, abs=1e-7)
    assert M.sparseness(torch.zeros(1, 4, 4)).item() == 0.0
    # sorted |a| = (0, 0, 1, 3), n = 4: ((-3)*0 + (-1)*0 + 1*1 + 3*3) / (4 * 4)
    v = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])
    assert M.sparseness(v).item() == pytest.approx(10 / 16)


def test_sparseness_matches_paper_eq26():
    maps = torch.rand(3, 6, 6, generator=_gen(5), dtype=torch.float64)
    v = M.normalize(maps).abs().flatten(1).sort(1).values
    d = v.shape[1]
    k = torch.arange(1, d + 1, dtype=torch.float64)
    eq26 = 1 - 2 * (v / v.sum(1, keepdim=True) * (d - k + 0.5) / d).sum(1)
    assert torch.allclose(M.sparseness(maps), eq26)


# ---------------------------------------------------------------- fidelity


class _Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight  # (K, C, H, W)

    def forward(self, x):
        return torch.einsum("kchw,nchw->nk", self.weight, x)


def _linear_case(B=3, C=2, H=6, W=6, K=4, seed=0):
    g = _gen(seed)
    w = torch.rand(K, C, H, W, generator=g, dtype=torch.float64) + 0.1
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) + 0.1
    return _Linear(w), x


def test_fidelity_linear_model_is_one():
    model, x = _linear_case()
    target = torch.tensor([0, 2, 3])
    maps = (model.weight[target] * x).sum(1)  # logit drop of a zeroed subset == its summed map
    fid = M.fidelity(model, x, target, maps, n_runs=30, subset_size=5, seed=1)
    assert torch.allclose(fid, torch.ones(3, dtype=fid.dtype), atol=1e-10)
    anti = M.fidelity(model, x, target, -maps, n_runs=30, subset_size=5, seed=1)
    assert torch.allclose(anti, -torch.ones(3, dtype=fid.dtype), atol=1e-10)


def test_fidelity_linear_model_with_baseline_tensor():
    model, x = _linear_case()
    base = torch.tensor([0.3, 0.6], dtype=torch.float64).view(2, 1, 1)
    maps = (model.weight[1] * (x - base)).sum(1)
    fid = M.fidelity(model, x, 1, maps, n_runs=20, subset_size=7, baseline=base, normalized=True)
    assert torch.allclose(fid, torch.ones(3, dtype=fid.dtype), atol=1e-10)


def _small_net():
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 5),
        )
        .double()
        .eval()
    )


def test_fidelity_seed_and_batching():
    net = _small_net()
    x = torch.randn(3, 3, 8, 8, generator=_gen(6), dtype=torch.float64)
    maps = torch.randn(3, 4, 4, generator=_gen(7), dtype=torch.float64)  # upsampled to 8x8
    kw = dict(n_runs=12, subset_size=6)
    a = M.fidelity(net, x, 2, maps, seed=3, batch_size=5, **kw)
    b = M.fidelity(net, x, 2, maps, seed=3, batch_size=64, **kw)
    c = M.fidelity(net, x, 2, maps, seed=4, **kw)
    single = torch.cat([M.fidelity(net, x[i : i + 1], 2, maps[i : i + 1], seed=3, **kw) for i in range(3)])
    assert torch.allclose(a, b) and torch.allclose(a, single)
    assert not torch.allclose(a, c)
    assert ((a >= -1) & (a <= 1)).all()


def test_fidelity_constant_map_gives_zero():
    net = _small_net()
    x = torch.randn(2, 3, 8, 8, generator=_gen(8), dtype=torch.float64)
    fid = M.fidelity(net, x, 0, torch.ones(2, 8, 8, dtype=torch.float64), n_runs=5, subset_size=4)
    assert torch.equal(fid, torch.zeros(2, dtype=fid.dtype))


# ---------------------------------------------------------------- stability


def test_stability_identity_explainer():
    x = torch.rand(2, 1, 6, 6, generator=_gen(9), dtype=torch.float64)
    calls = []

    def identity(xx, t):
        calls.append(xx.shape[0])
        return xx[:, 0]

    st = M.stability(identity, x, 0, n_samples=4, normalized=True, batch_size=3)
    assert torch.allclose(st, torch.ones(2, dtype=st.dtype))
    assert sum(calls) == 2 * (4 + 1) and max(calls) <= 3
    # normalized: phi = x / max(x) ~ x / 10 when one pixel dominates
    x[:, 0, 0, 0] = 10.0
    st = M.stability(lambda xx, t: xx[:, 0], x, 0, n_samples=4, sigma=0.01)
    assert torch.allclose(st, torch.full((2,), 0.1, dtype=st.dtype), rtol=0.05)


def test_stability_seed_and_batching():
    x = torch.randn(3, 2, 5, 5, generator=_gen(10), dtype=torch.float64)

    def explain(xx, t):  # nonlinear, target dependent
        return (xx.square().sum(1) + t.view(-1, 1, 1)) * xx[:, 0].sign()

    t = torch.tensor([0, 1, 2])
    a = M.stability(explain, x, t, n_samples=6, seed=1, batch_size=4)
    b = M.stability(explain, x, t, n_samples=6, seed=1, batch_size=32)
    c = M.stability(explain, x, t, n_samples=6, seed=2)
    single = torch.cat([M.stability(explain, x[i : i + 1], t[i : i + 1], n_samples=6, seed=1) for i in range(3)])
    assert torch.allclose(a, b) and torch.allclose(a, single)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------- ssim / pcc


def test_ssim_identical_is_one_and_symmetric():
    a = torch.randn(3, 16, 16, generator=_gen(11), dtype=torch.float64)
    b = a + 0.3 * torch.randn(3, 16, 16, generator=_gen(12), dtype=torch.float64)
    assert torch.allclose(M.ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(M.ssim(a, b), M.ssim(b, a))
    assert (M.ssim(a, b) < 1).all()
    assert M.ssim(torch.ones(1, 12, 12), torch.ones(1, 12, 12)).item() == pytest.approx(1.0)


def test_pcc_hand_cases():
    a = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert M.pcc(a, torch.tensor([[[1.0, 3.0, 2.0]]]), normalized=True).item() == pytest.approx(0.5)
    x = torch.rand(4, 7, 7, generator=_gen(13))
    assert torch.allclose(M.pcc(x, 3 * x + 2), torch.ones(4), atol=1e-6)
    assert torch.allclose(M.pcc(x, -2 * x + 1, normalized=True), -torch.ones(4), atol=1e-6)
    assert torch.equal(M.pcc(x, torch.full_like(x, 2.0)), torch.zeros(4))


# ---------------------------------------------------------------- errors


def test_errors_name_argument_and_shapes():
    with pytest.raises(ValueError, match=r"maps: expected shape \(B, H, W\).*got \(4, 4\)"):
        M.normalize(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"masks: .*got \(2, 3, 4, 4\)"):
        M.pointing_game(torch.zeros(2, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"maps: batch size 2"):
        M.attribution_localization(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"maps: spatial size \(8, 8\)"):
        M.pointing_game(torch.zeros(1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, C, H, W\)"):
        M.fidelity(_small_net(), torch.zeros(3, 8, 8), 0, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"target: expected"):
        M.fidelity(_small_net(), torch.zeros(2, 3, 8, 8), [0, 1, 2], torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"b: expected the shape of a"):
        M.pcc(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match=r"window"):
        M.ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    bad = torch.zeros(2, 4, 4)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"maps: contains NaN or Inf \(samples \[1\]\)"):
        M.sparseness(bad)
    bad[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        M.pointing_game(bad, torch.ones(2, 4, 4))


# ---------------------------------------------------------------- reference implementations


def _quantus_inputs(B=4, H=12, W=12, seed=0):
    g = _gen(seed)
    maps = torch.randn(B, 1, H, W, generator=g)
    maps[:, 0, 0, 0] = maps.abs().amax((1, 2, 3)) + 0.1  # positive max dominates: no clamping
    masks = (torch.rand(B, 1, H, W, generator=g) > 0.6).float()
    x = torch.randn(B, 3, H, W, generator=g)
    return maps, masks, x


def test_against_quantus_localisation_and_sparseness():
    quantus = pytest.importorskip("quantus")
    maps, masks, x = _quantus_inputs()
    kw = dict(model=None, x_batch=x.numpy(), y_batch=torch.zeros(4, dtype=torch.long).numpy(), a_batch=maps.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = quantus.PointingGame(disable_warnings=True)(s_batch=masks.numpy(), **kw)
        al = quantus.AttributionLocalisation(abs=False, positive_attributions=True, disable_warnings=True)(
            s_batch=masks.numpy(), **kw
        )
        sp = quantus.Sparseness(disable_warnings=True)(**kw)
    assert torch.equal(M.pointing_game(maps, masks, tolerance=0), torch.tensor([bool(v) for v in pg]))
    assert torch.allclose(M.attribution_localization(maps, masks), torch.tensor(al, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(M.sparseness(maps), torch.tensor(sp, dtype=torch.float32), atol=1e-5)


def test_against_quantus_on_linear_cases():
    quantus = pytest.importorskip("quantus")
    model, x = _linear_case(B=2, C=1, H=6, W=6, K=3)
    model.weight = model.weight.float()
    model.eval()
    x = x.float()
    y = torch.tensor([0, 2])
    maps = model.weight[y] * x  # (B, 1, H, W); with C=1 pixel == feature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_fid = quantus.FaithfulnessCorrelation(
            nr_runs=20, subset_size=5, perturb_baseline=0.0, return_aggregate=False, disable_warnings=True
        )(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), device="cpu")
        q_lle = quantus.LocalLipschitzEstimate(nr_samples=5, normalise=False, disable_warnings=True)(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            a_batch=(2 * x).numpy(),
            device="cpu",
            explain_func=lambda model, inputs, targets, **k: 2 * inputs,
        )
    fid = M.fidelity(model, x, y, maps, n_runs=20, subset_size=5)
    lle = M.stability(lambda xx, t: 2 * xx[:, 0], x, y, n_samples=5, normalized=True)
    assert torch.allclose(fid, torch.tensor(q_fid, dtype=fid.dtype), atol=1e-4)
    assert torch.allclose(lle, torch.tensor(q_lle, dtype=lle.dtype), atol=1e-4)


@pytest.mark.parametrize("data_range,sample_cov", [(None, True), (2.0, True), (2.0, False)])
def test_ssim_against_skimage(data_range, sample_cov):
    skm = pytest.importorskip("skimage.metrics")
    a = torch.randn(3, 20, 17, generator=_gen(14), dtype=torch.float64)
    b = 0.5 * a + torch.randn(3, 20, 17, generator=_gen(15), dtype=torch.float64)
    na, nb = M.normalize(a), M.normalize(b)
    ours = M.ssim(a, b, data_range=data_range, use_sample_covariance=sample_cov)
    for i in range(3):
        dr = data_range
        if dr is None:
            dr = float(torch.cat([na[i], nb[i]]).max() - torch.cat([na[i], nb[i]]).min())
        ref = skm.structural_similarity(
            na[i].numpy(),
            nb[i].numpy(),
            data_range=dr,
            gaussian_weights=True,
            use_sample_covariance=sample_cov,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
