"""The shapes benchmark with a shortcut cue (srd_ext.data.confounded), the SRD penalty
(srd_ext.metrics.outside_share) and a compiled training step with the penalty, as
examples/train_right_reasons.py trains with.

The compiled-step test compiles the step with Inductor (C++ kernels on CPU): slow with a cold
Inductor cache, quick once the cache (``TORCHINDUCTOR_CACHE_DIR``) holds it.
"""

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import VGG, make_layers

import srd_ext
from srd_ext.data import CUE_COLORS, confounded, render, standardize
from srd_ext.metrics import outside_share


def small_vgg(num_classes: int = 10) -> VGG:
    """A three-conv torchvision VGG with the shapes VGG's head layout (global pool, Dropout)."""
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features = make_layers([8, "M", 16, "M", 16], batch_norm=False)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(0.2), nn.Linear(16, num_classes))
    return model


def test_confounded_cue():
    size, n = 32, 60
    train = confounded("train", n, size)
    test = confounded("test", n, size)
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
        assert torch.equal(colors, torch.from_numpy(CUE_COLORS)[d["cues"]][:, None].expand_as(colors))
    assert torch.equal(train["cues"], train["labels"])
    agree = (test["cues"] == test["labels"]).float().mean().item()
    assert agree < 0.3 and len(test["cues"].unique()) >= 8
    # Subsets of classes stay balanced and labelled by shape.
    sub = confounded("train", 6, size, num_classes=3)
    assert sub["labels"].tolist() == [0, 1, 2, 0, 1, 2] and torch.equal(sub["cues"], sub["labels"])


def penalty_step(model, lam, layer):
    """``step(x, y, mask) -> (loss, ce, penalty)``: cross-entropy on the logits of the explainer's
    own forward plus ``lam`` times the SRD relevance outside the mask; gradients land in ``.grad``."""
    explainer = srd_ext.Explainer(model)

    def step(x, y, mask):
        R, logits = explainer.explain(x, y, layer=layer, return_logits=True, create_graph=True)
        ce = F.cross_entropy(logits, y)
        penalty = outside_share(R, mask).mean()
        loss = ce + lam * penalty
        loss.backward()
        return loss.detach(), ce.detach(), penalty.detach()

    return step, explainer


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    model = small_vgg().eval()
    twin = copy.deepcopy(model)
    d = confounded("train", 4, 32)
    x, y, mask = standardize(d["images"].float() / 255), d["labels"], d["masks"].float()

    eager = penalty_step(model, 1.0, "input")[0](x, y, mask)
    step, explainer = penalty_step(twin, 1.0, "input")
    explainer.prepare(x)  # the capture runs eagerly, before compiling
    compiled_step = torch.compile(step, fullgraph=True, dynamic=False)
    # trace_autograd_ops: dynamo traces loss.backward() instead of breaking the graph there.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
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
    step, explainer = penalty_step(copy.deepcopy(model), 1.0, "input")
    explainer.prepare(x)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        e = torch._dynamo.explain(step)(x, y, mask)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(r.reason) for r in e.break_reasons]


def test_outside_share():
    R = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(outside_share(R, mask), torch.tensor([2.0 / 4.0]))
    # A coarser map: the mask is averaged down.
    big = torch.zeros(1, 4, 4)
    big[0, :2, :2] = 1
    torch.testing.assert_close(outside_share(torch.ones(1, 2, 2), big), torch.tensor([0.75]))
