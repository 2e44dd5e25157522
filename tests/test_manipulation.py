"""Manipulation benchmark: differentiability of SRD maps and the attack script end to end."""
import copy
import os

import pytest
import torch

from srd_ext import Explainer, baselines

from models_for_tests import tiny_resnet, tiny_vgg
from scripts import load_script


def load_manipulation():
    return load_script("benchmarks/manipulation.py")


def _check_directional_derivatives(f, x, g):
    xr = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(f(xr), xr)
    assert grad.abs().sum() > 0
    eps = 1e-6
    with torch.no_grad():
        for _ in range(4):
            v = torch.randn(x.shape, generator=g, dtype=torch.float64)
            fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
            torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("smooth", [False, True], ids=["relu", "softplus-copy"])
def test_srd_map_gradient_matches_finite_differences(smooth):
    mod = load_manipulation()
    model = tiny_vgg(cfg=(3, "M", 4)).double()
    ex = Explainer(mod.smooth_copy(model, 5.0) if smooth else model, init="constant")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(1, 6, 6, generator=g, dtype=torch.float64)
    target = int(model(x).argmax(1))
    _check_directional_derivatives(lambda z: (w * ex.explain(z, target, create_graph=True)).sum(), x, g)


@pytest.mark.parametrize("build", [tiny_vgg, tiny_resnet])
def test_differentiable_lrp_equals_captum(build):
    pytest.importorskip("captum")
    mod = load_manipulation()
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, 3, 32, 32)
    t = model(x).argmax(1)
    ref = baselines.get("lrp-z+")(model, x, t)
    mine, logits = mod.LRPZPlus(model)(x, t)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("build", [lambda: tiny_vgg(cfg=(3, "M", 4)), lambda: tiny_resnet()],
                         ids=["vgg", "resnet"])
def test_lrp_softplus_copy_gradient_matches_finite_differences(build):
    pytest.importorskip("captum")
    mod = load_manipulation()
    torch.manual_seed(0)
    model = build().double().eval()
    lrp = mod.LRPZPlus(model, beta=5.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    t = model(x).argmax(1)
    _check_directional_derivatives(lambda z: (w * lrp(z, t, create_graph=True)[0]).sum(), x, g)


def test_attack_end_to_end(tmp_path):
    mod = load_manipulation()
    paths = mod.main(["--model", "shapes-vgg", "--random-init", "--image-size", "32", "--pairs", "2",
                      "--steps", "3", "--pool", "8", "--out", str(tmp_path), "--no-progress"])
    for key in ("md", "csv", "png"):
        assert os.path.getsize(paths[key]) > 0
    with open(paths["csv"]) as f:
        rows = f.read().splitlines()
    assert len(rows) == 1 + len(mod.METHODS)
    table = open(paths["md"]).read()
    for label in mod.LABELS.values():
        assert f"| {label} |" in table


@pytest.mark.parametrize("build", [lambda: tiny_vgg(), lambda: tiny_resnet()])
def test_attack_leaves_model_unchanged(build):
    mod = load_manipulation()
    model = build()
    state = copy.deepcopy(model.state_dict())
    modules = [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()]
    training = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    args = mod.parse_args(["--model", "tiny", "--pairs", "1", "--steps", "2", "--pool", "4",
                           "--image-size", "16", "--no-progress", "--device", "cpu"])
    out = mod.run(args, model)
    assert set(out["results"]) == set(mod.METHODS)
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k in state:
        assert torch.equal(state[k], after[k]), k
    assert [(n, type(m), getattr(m, "inplace", None)) for n, m in model.named_modules()] == modules
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("build", [lambda: tiny_vgg(cfg=(3, "M", 4)), lambda: tiny_resnet()],
                         ids=["vgg", "resnet"])
def test_guided_backprop_copy(build):
    pytest.importorskip("captum")
    mod = load_manipulation()
    torch.manual_seed(0)
    model = build().double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = model(x).argmax(1)
    # a very sharp softplus is the ReLU network: captum's guided backprop
    sharp, _ = mod.GuidedBackprop(model, beta=1e4)(x, t)
    torch.testing.assert_close(sharp, baselines.get("guided-backprop")(model, x, t),
                               rtol=1e-3, atol=1e-5, check_dtype=False)
    gbp = mod.GuidedBackprop(model, beta=5.0)
    w = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    _check_directional_derivatives(lambda z: (w * gbp(z, t, create_graph=True)[0]).sum(), x, g)


def test_attack_on_an_image_folder(tmp_path):
    from PIL import Image

    mod = load_manipulation()
    rng = torch.Generator().manual_seed(3)
    for k, cls in enumerate(["a", "a", "b", "b"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        px = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / "imgs" / cls / f"{k}.png")
    paths = mod.main(["--model", "resnet18", "--random-init", "--data", str(tmp_path / "imgs"),
                      "--image-size", "32", "--pairs", "2", "--steps", "2", "--methods", "srd",
                      "gradient", "--out", str(tmp_path / "out"), "--no-progress"])
    with open(paths["csv"]) as f:
        rows = f.read().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["srd", "gradient"]
    assert all("nan" not in r for r in rows[1:])


@pytest.mark.parametrize("argv", [["--pairs", "0"], ["--steps", "0"], ["--beta", "0"], ["--pool", "1"]])
def test_bad_arguments_are_named(argv, capsys):
    mod = load_manipulation()
    with pytest.raises(SystemExit):
        mod.parse_args(["--model", "shapes-vgg", *argv])
    assert argv[0] in capsys.readouterr().err
