"""Manipulation benchmark: the differentiable maps it attacks (srd_ext.baselines.differentiable and
SRD), and benchmarks/manipulation.py run end to end as a program."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from srd_ext import Explainer, baselines

from models_for_tests import tiny_resnet, tiny_vgg
from programs import run_script

SCRIPT = "benchmarks/manipulation.py"
METHODS = ["gradient", "gradinput", "guidedbackprop", "integratedgradients", "lrp-zplus", "srd"]
LABELS = ["Gradient", "GradInput", "GuidedBackprop", "InteGrad", "LRP z+", "SRD"]


def _check_directional_derivatives(f, x, g):
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xr), xr)
    assert grad.abs().sum() > 0
    eps = 1e-6
    with torch.no_grad():
        for _ in range(4):
            v = torch.randn(x.shape, generator=g, dtype=torch.float64)
            fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
            torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("smooth", [False, True], ids=["relu", "softplus-copy"])
def test_srd_map_gradient_matches_finite_differences(smooth):
    model = tiny_vgg(cfg=(3, "M", 4)).double()
    ex = Explainer(baselines.smooth_copy(model, 5.0) if smooth else model, init="constant")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(1, 6, 6, generator=g, dtype=torch.float64)
    target = int(model(x).argmax(1))
    _check_directional_derivatives(lambda z: (w * ex.explain(z, target, create_graph=True)).sum(), x, g)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_differentiable_lrp_equals_captum(build):
    pytest.importorskip("captum")
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, 3, 32, 32)
    t = model(x).argmax(1)
    ref = baselines.get("lrp-z+")(model, x, t)
    mine, logits = baselines.LRPZPlus(model)(x, t)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("build", [lambda: tiny_vgg(cfg=(3, "M", 4)), lambda: tiny_resnet()], ids=["vgg", "resnet"])
def test_lrp_softplus_copy_gradient_matches_finite_differences(build):
    pytest.importorskip("captum")
    torch.manual_seed(0)
    model = build().double().eval()
    lrp = baselines.LRPZPlus(model, beta=5.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    t = model(x).argmax(1)
    _check_directional_derivatives(lambda z: (w * lrp(z, t, create_graph=True)[0]).sum(), x, g)


def test_attack_end_to_end(tmp_path):
    run_script(
        SCRIPT,
        "--model",
        "shapes-vgg",
        "--random-init",
        "--image-size",
        "32",
        "--pairs",
        "2",
        "--steps",
        "3",
        "--pool",
        "8",
        "--out",
        tmp_path,
        "--no-progress",
    )
    stem = tmp_path / "shapes-vgg_random"
    for ext in (".md", ".csv", ".png"):
        assert stem.with_suffix(ext).stat().st_size > 0, ext
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == METHODS
    assert all(r["pairs"] == "2" for r in rows)
    table = stem.with_suffix(".md").read_text()
    for label in LABELS:
        assert f"| {label} |" in table


@pytest.mark.parametrize("build", [lambda: tiny_vgg(), lambda: tiny_resnet()], ids=["vgg", "resnet"])
def test_differentiable_maps_leave_model_unchanged(build):
    """The attack's maps (SRD, LRP z+ and guided backprop on their copies), differentiated with
    respect to the input as the attack does, change nothing of the user's model."""
    pytest.importorskip("captum")
    model = build()
    state = copy.deepcopy(model.state_dict())
    modules = [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()]
    training = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    t = model(x).argmax(1)
    srd = Explainer(baselines.smooth_copy(model, 30.0), init="constant")
    maps = [srd.explain(x, t, create_graph=True)]
    for make in (baselines.LRPZPlus, baselines.GuidedBackprop):
        maps.append(make(model, 30.0)(x, t, create_graph=True)[0])
    for h in maps:
        (g,) = torch.autograd.grad(F.mse_loss(h, torch.zeros_like(h)), x)
        assert torch.isfinite(g).all()
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k in state:
        assert torch.equal(state[k], after[k]), k
    assert [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()] == modules
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("build", [lambda: tiny_vgg(cfg=(3, "M", 4)), lambda: tiny_resnet()], ids=["vgg", "resnet"])
def test_guided_backprop_copy(build):
    pytest.importorskip("captum")
    torch.manual_seed(0)
    model = build().double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = model(x).argmax(1)
    # a very sharp softplus is the ReLU network: captum's guided backprop
    sharp, _ = baselines.GuidedBackprop(model, beta=1e4)(x, t)
    torch.testing.assert_close(
        sharp, baselines.get("guided-backprop")(model, x, t), rtol=1e-3, atol=1e-5, check_dtype=False
    )
    gbp = baselines.GuidedBackprop(model, beta=5.0)
    w = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    _check_directional_derivatives(lambda z: (w * gbp(z, t, create_graph=True)[0]).sum(), x, g)


def test_attack_on_an_image_folder(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(3)
    for k, cls in enumerate(["a", "a", "b", "b"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        px = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / "imgs" / cls / f"{k}.png")
    run_script(
        SCRIPT,
        "--model",
        "resnet18",
        "--random-init",
        "--data",
        tmp_path / "imgs",
        "--image-size",
        "32",
        "--pairs",
        "2",
        "--steps",
        "2",
        "--methods",
        "srd",
        "gradient",
        "--out",
        tmp_path / "out",
        "--no-progress",
    )
    with open(tmp_path / "out" / "resnet18_random.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["srd", "gradient"]
    assert all("nan" not in ",".join(r.values()) for r in rows)


@pytest.mark.parametrize("argv", [["--pairs", "0"], ["--steps", "0"], ["--beta", "0"], ["--pool", "1"]])
def test_bad_arguments_are_named(argv):
    res = run_script(SCRIPT, "--model", "shapes-vgg", *argv, check=False)
    assert res.returncode == 2 and argv[0] in res.stderr
