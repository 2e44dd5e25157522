"""Baselines of the paper's comparison (srd_ext.baselines) and the evaluation script."""

import copy
import csv
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")

from srd_ext import baselines  # noqa: E402
from srd_ext.baselines.cache import cached  # noqa: E402

from models_for_tests import tiny_resnet, tiny_vgg  # noqa: E402
from programs import run_script  # noqa: E402

VGG_CFG = (4, "M", 8, "M", 8, "M", 8, "M", 8, "M")  # ReLUs at 1, 1/2, ..., 1/16 of the input


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: threads only add contention on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vgg():
    return tiny_vgg(cfg=VGG_CFG)


CASES = {"vgg": (vgg, 64), "resnet": (tiny_resnet, 64)}
# Map sizes at a 64 x 64 input: "low" = encoder output, "high" = 1/8.
LOW = {"vgg": (4, 4), "resnet": (2, 2)}


def batch(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, size, size, generator=g), torch.tensor([0, 3, 1])


def snapshot(model):
    """Everything a method could leave changed on the model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
        "inplace": {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": [(n, p.grad is None, p.requires_grad) for n, p in model.named_parameters()],
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in ("modules", "attrs", "hooks", "inplace", "training", "grad"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("arch", sorted(CASES))
def test_every_method_finite_maps_model_unchanged(arch):
    build, size = CASES[arch]
    model = build()
    x, target = batch(size)
    x0 = x.clone()
    before = snapshot(model)
    want = {"input": (size, size), "low": LOW[arch], "high": (size // 8, size // 8)}
    for m in baselines.METHODS.values():
        maps = m(model, x, target)
        assert maps.shape == (3,) + want[m.resolution], m.name
        assert maps.dtype == torch.float32 and maps.device == x.device, m.name
        assert torch.isfinite(maps).all(), m.name
        assert not maps.requires_grad, m.name
    assert torch.equal(x, x0) and not x.requires_grad
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_per_sample_targets_match_single_images(arch):
    build, size = CASES[arch]
    model = build()
    x, target = batch(size, seed=1)
    for m in baselines.METHODS.values():
        if m.name == "smoothgrad":  # random noise per call
            continue
        whole = m(model, x, target)
        for i in range(3):
            one = m(model, x[i : i + 1], int(target[i]))
            torch.testing.assert_close(
                whole[i : i + 1], one, rtol=1e-3, atol=1e-5 * float(whole.abs().max()), msg=f"{m.name} sample {i}"
            )


def test_cam_layers_are_srd_layers():
    x = torch.zeros(1, 3, 64, 64)
    assert baselines.cam_layers(tiny_resnet(), x) == {"low": "layer4", "high": "layer2"}
    # VGG: the ReLU before the last max-pool (1/16 here) and the ReLU at 1/8.
    assert baselines.cam_layers(vgg(), x) == {"low": "features.13", "high": "features.10"}


@pytest.mark.parametrize(
    "name, cls",
    [("gradcam", "GradCAM"), ("layercam-high", "LayerCAM"), ("scorecam", "ScoreCAM"), ("fullgrad", "FullGrad")],
)
def test_cam_maps_are_the_library_maps_before_its_scaling(name, cls):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = tiny_resnet()
    x, t = batch(64)
    ours = baselines.get(name)(model, x, t).numpy()
    net = copy.deepcopy(model)
    layers = [] if cls == "FullGrad" else [net.layer2 if name.endswith("high") else net.layer4]
    with getattr(pytorch_grad_cam, cls)(net, layers) as cam:
        stock = cam(x, targets=[ClassifierOutputTarget(int(i)) for i in t])
    if cls != "FullGrad":  # the library min-max scales, resizes and min-max scales again
        ours = scale_cam_image(scale_cam_image(ours, (64, 64)))
    assert abs(ours - stock).max() < 1e-4


def test_target_none_is_prediction_and_errors():
    model = vgg()
    x, _ = batch(64)
    pred = model(x).argmax(1)
    m = baselines.get("gradcam")
    torch.testing.assert_close(m(model, x), m(model, x, pred))
    with pytest.raises(ValueError):
        m(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        m(model, x[0], 0)


def test_registry_lookup():
    assert baselines.names()[0] == "saliency" and baselines.names()[-1] == "srd-input"
    assert len(baselines.names()) == 17
    assert baselines.get("GradCAM†") is baselines.METHODS["gradcam"]
    assert baselines.get("lrp z+").name == "lrp-z+"
    assert baselines.get("integrated-gradients", n_steps=4).options["n_steps"] == 4
    with pytest.raises(KeyError, match="choose from"):
        baselines.get("nonsense")


def test_missing_library_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    x, t = batch(64)
    with pytest.raises(ImportError, match=r"pip install srd_ext\[bench\]"):
        baselines.get("saliency")(vgg(), x, t)


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)) + x
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def guided_reference(model, x, target):
    """Guided backprop by hand: ReLU gradients clamped at 0 as well."""

    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return g.clamp(min=0) * (z > 0)

    x = x.clone().requires_grad_(True)
    orig_relu, orig_trelu = F.relu, torch.relu
    try:
        F.relu = torch.relu = lambda z, inplace=False: Guided.apply(z)
        out = model(x)
    finally:
        F.relu, torch.relu = orig_relu, orig_trelu
    out.gather(1, target[:, None]).sum().backward()
    return x.grad.sum(1)


def test_guided_backprop_functional_relu_adapted():
    torch.manual_seed(0)
    model = FunctionalReLU().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    before = snapshot(model)
    maps = baselines.get("guided-backprop")(model, x, t)
    assert "functional relu" in baselines.NOTES["guided-backprop"]
    assert_same(before, snapshot(model))
    torch.testing.assert_close(maps, guided_reference(copy.deepcopy(model), x, t))


def test_lrp_copy_is_the_same_function_and_conserves():
    model = tiny_resnet()
    x, t = batch(64)
    maps = baselines.get("lrp-z+")(model, x, t)
    note = baselines.NOTES["lrp-z+"]
    assert "Addition_Module" in note and "BatchNorm2d folded" in note
    net, _ = cached(model, "lrp", lambda: None)  # the copy the call above made and kept
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)
        logit = model(x).gather(1, t[:, None])[:, 0]
    # z+ without biases conserves through the convs; only the head's biases absorb relevance.
    torch.testing.assert_close(maps.sum((1, 2)), logit, rtol=0.2, atol=0.5)


EVAL = "benchmarks/eval_table.py"


def test_eval_table_end_to_end(tmp_path):
    run_script(
        EVAL,
        "--model",
        "shapes-resnet",
        "--random-init",
        "--num-images",
        "3",
        "--batch-size",
        "2",
        "--methods",
        "saliency,gradcam",
        "srd-high",
        "--fidelity-runs",
        "4",
        "--stability-samples",
        "1",
        "--examples",
        "2",
        "--out",
        tmp_path,
        "--no-progress",
    )
    stem = tmp_path / "shapes-resnet_random"
    for ext in (".md", ".csv", ".json", ".png"):
        assert (stem.with_suffix(ext)).stat().st_size > 0, ext
    md = stem.with_suffix(".md").read_text()
    assert "| Method | Poi.↑ | Att.↑ | Spa.↑ | Fid.↑ | Sta.↓ |" in md
    assert "**SRD-high‡** (ours)" in md and "GradCAM†" in md and "**" in md
    for key in ("seed: 0", "fidelity_runs: 4", "stability_samples: 1", "n: 3", "torch:", "captum:"):
        assert key in md, key
    report = json.loads(stem.with_suffix(".json").read_text())
    assert "gradcam" in report["notes"] and "layer4" in report["notes"]["gradcam"]
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["saliency", "gradcam", "srd-high"]
    for r in rows:
        assert not r["failed"]
        for k in ("pointing_game", "attribution_localization", "sparseness", "fidelity", "stability"):
            v = float(r[k])
            assert v == v, (r["method"], k)
            assert int(r[k + "_n"]) == 3
    assert rows[1]["map_size"] == "4x4" and rows[2]["map_size"] == "14x14"


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-images", "0"],
        ["--batch-size", "0"],
        ["--fidelity-runs", "1"],
        ["--stability-samples", "-1"],
        ["--stability-n", "-2"],
        ["--timeout", "0"],
    ],
)
def test_eval_table_bad_arguments_are_named(argv):
    res = run_script(EVAL, "--model", "shapes-vgg", *argv, check=False)
    assert res.returncode == 2 and argv[0] in res.stderr


@pytest.mark.parametrize("argv,new", [(["--n", "5"], "--num-images"), (["--start=2"], "--first-image")])
def test_eval_table_renamed_options_name_their_new_name(argv, new):
    # torchrun reads --n and --start as abbreviations of its own options, so they were renamed.
    res = run_script(EVAL, "--model", "shapes-vgg", *argv, check=False)
    assert res.returncode == 2 and argv[0].split("=")[0] in res.stderr and new in res.stderr
