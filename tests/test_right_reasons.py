"""examples/train_right_reasons.py: the confounded data and the compiled SRD-penalty training step.

The compiled-step test compiles the step with Inductor (C++ kernels on CPU): about 1-2 minutes on
2 cores with a cold Inductor cache, a few seconds once the cache (``TORCHINDUCTOR_CACHE_DIR``,
default under /tmp) holds it.
"""
import copy

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.vgg import VGG, make_layers

from srd_ext.data import render

from scripts import load_script

rr = load_script("examples/train_right_reasons.py")


def small_vgg(num_classes: int = 10) -> VGG:
    """A three-conv torchvision VGG with the shapes VGG's head layout (global pool, Dropout)."""
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features = make_layers([8, "M", 16, "M", 16], batch_norm=False)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(0.2),
                                     nn.Linear(16, num_classes))
    return model


def test_confounded_cue():
    size, n = 32, 60
    train = rr.confounded("train", n, size)
    test = rr.confounded("test", n, size)
    for d in (train, test):
        assert d["images"].shape == (n, 3, size, size) and d["images"].dtype == torch.uint8
        assert torch.equal(d["labels"], torch.arange(n) % 10)
        # The cue lies outside the object; the scene and the mask are the benchmark's.
        assert not (d["cue_masks"] & d["masks"]).any()
        assert (d["cue_masks"].flatten(1).sum(1) == round(0.1 * size) ** 2).all()
        for i in (0, 7):
            img, mask, label = render(0, "train" if d is train else "test", i, size)
            outside = ~d["cue_masks"][i].numpy()
            assert np.array_equal(d["images"][i].permute(1, 2, 0).numpy()[outside], img[outside])
            assert np.array_equal(d["masks"][i].numpy(), mask) and label == d["labels"][i]
        # The cue's pixels carry its class colour.
        colors = d["images"].permute(0, 2, 3, 1)[d["cue_masks"]].view(n, -1, 3)
        assert torch.equal(colors, torch.from_numpy(rr.CUE_COLORS)[d["cues"]][:, None].expand_as(colors))
    assert torch.equal(train["cues"], train["labels"])
    agree = (test["cues"] == test["labels"]).float().mean().item()
    assert agree < 0.3 and len(test["cues"].unique()) >= 8
    # Subsets of classes stay balanced and labelled by shape.
    sub = rr.confounded("train", 6, size, num_classes=3)
    assert sub["labels"].tolist() == [0, 1, 2, 0, 1, 2] and torch.equal(sub["cues"], sub["labels"])


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    model = small_vgg().eval()
    twin = copy.deepcopy(model)
    d = rr.confounded("train", 4, 32)
    x, y, mask = rr.to_input(d["images"], "cpu"), d["labels"], d["masks"].float()

    eager = rr.make_step(model, 1.0, "input")(x, y, mask)
    compiled_step = rr.compile_step(rr.make_step(twin, 1.0, "input"))
    compiled = compiled_step(x, y, mask)
    for a, b in zip(compiled, eager):  # loss, cross-entropy, penalty
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert eager[2] > 0  # the penalty is active
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None, name
        # float32 rounding differs between the fused kernels and eager; the tolerance is
        # relative to each gradient's largest entry.
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")

    # The step is one graph: no break from the extension's operators or from backward().
    graphs, breaks, reasons = rr.graph_breaks(rr.make_step(copy.deepcopy(model), 1.0, "input"), x, y, mask)
    assert (graphs, breaks) == (1, 0), reasons


def test_outside_share():
    R = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(rr.outside_share(R, mask), torch.tensor([2.0 / 4.0]))
    # A coarser map: the mask is averaged down.
    big = torch.zeros(1, 4, 4)
    big[0, :2, :2] = 1
    torch.testing.assert_close(rr.outside_share(torch.ones(1, 2, 2), big), torch.tensor([0.75]))
