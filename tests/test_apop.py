"""APOP: recording, replay, binarization, restoration of the model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from srd_ext import apop

from models_for_tests import Gates, randomize, tiny_resnet, tiny_vgg


class Functional(nn.Module):
    """Functional and in-place ReLUs, F.max_pool2d, a module used twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.c1(x), inplace=True)
        x = F.max_pool2d(x, 2)
        x = self.act(self.c2(x))
        x = torch.relu(self.c2(x)) + x
        x = self.act(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PiecewiseLinear(nn.Module):
    """Every piecewise-linear activation APOP records: ReLU6, LeakyReLU, PReLU, Hardsigmoid
    (as an activation, not a gate), clamp; concatenation and an adaptive max-pool head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(12, 6, 3, padding=1)
        self.prelu = nn.PReLU(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu6(self.c1(x) * 3)
        y = F.leaky_relu(self.c2(x), 0.1)
        x = self.prelu(self.c3(torch.cat([x, y], 1)))
        x = F.hardsigmoid(x) + x.clamp(-0.5, 0.5)
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


TORCHVISION = ["mobilenet_v2", "densenet121", "shufflenet_v2_x0_5", "googlenet", "squeezenet1_1"]


def _tv(name):
    kw = {"init_weights": False, "aux_logits": False} if name == "googlenet" else {}
    return randomize(torchvision.models.get_model(name, weights=None, num_classes=7, **kw), 3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_vgg(seed=1),
        lambda: tiny_resnet(seed=2),
        lambda: Functional().eval(),
        lambda: randomize(PiecewiseLinear(), 4),
    ]
    + [lambda name=name: _tv(name) for name in TORCHVISION],
    ids=["vgg", "resnet", "functional", "piecewise"] + TORCHVISION,
)
def test_replay_on_original_input_gives_original_logits(build):
    model = build()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        logits, pats = apop.patterns_of(model, x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(apop.replay(model, pats, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(apop.replay(model, pats, x, "apop+relu"), expected, rtol=1e-5, atol=1e-5)
        z = apop.replay(model, pats, torch.zeros_like(x))
    assert z.shape == expected.shape and torch.isfinite(z).all()


def test_masks_recorded_for_reused_and_functional_relus():
    model = Functional().eval()
    x = torch.randn(2, 3, 16, 16)
    _, pats = apop.patterns_of(model, x)
    assert len(pats.masks) == 4  # F.relu, act (1st use), torch.relu, act (2nd use)
    assert len(pats.indices) == 1
    # each recorded mask is z > 0 of its own use of the module
    first = F.relu(model.c1(x))
    assert torch.equal(pats.mask(min(pats.masks)), model.c1(x) > 0)
    assert pats.nbytes() <= sum(4 * torch.Size(s).numel() for _, s, _ in pats.masks.values()) / 8 + sum(
        v.numel() * 4 for v in pats.indices.values()
    )
    del first


def test_masks_compact():
    model = tiny_resnet(seed=2)
    _, pats = apop.patterns_of(model, torch.randn(2, 3, 32, 32))
    for packed, shape, is_packed in pats.masks.values():
        assert packed.dtype == torch.uint8 and is_packed
        assert packed.numel() * 1 <= torch.Size(shape).numel() * 4 / 8


def test_three_piece_activations_replay_their_pieces():
    model = randomize(PiecewiseLinear(), 4)
    x = torch.randn(2, 3, 8, 8)
    _, pats = apop.patterns_of(model, x)
    assert len(pats.pieces) == 5 and len(pats.indices) == 1
    codes = [pats.piece(i) for i, (_, _, packed) in pats.pieces.items() if not packed]
    assert len(codes) == 3 and all(set(c.unique().tolist()) <= {0, 1, 2} for c in codes)
    ones = apop.replay(model, pats, torch.ones_like(x))
    assert torch.isfinite(ones).all() and not torch.allclose(ones, model(x))


def test_smooth_activations_have_no_pattern():
    model = randomize(Gates(), 2)  # Hardswish, SiLU, sigmoid gates, Mish
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match="not defined for smooth activations.*smooth='keep'"):
        apop.patterns_of(model, x)
    logits, pats = apop.patterns_of(model, x, smooth="keep")
    torch.testing.assert_close(apop.replay(model, pats, x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="smooth must be"):
        apop.patterns_of(model, x, smooth="ignore")


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        dict(model.__dict__.items()).keys(),
        model.forward.__func__,
        model.training,
    )


def test_model_restored_also_on_error():
    model = tiny_vgg(seed=1)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with apop.record(model):
            model(torch.randn(1, 3, 16, 16))
            raise RuntimeError("boom")
    after = _snapshot(model)
    assert before[1] == after[1] and before[2] is after[2] and before[3] == after[3]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    assert "forward" not in model.__dict__


def test_binarize_changes_only_that_layer():
    model = tiny_vgg(seed=1)
    x = torch.randn(2, 3, 16, 16)
    names = apop.activation_layers(model, x)
    outs = [apop.binarize(model, x, i) for i in range(len(names))]
    assert all(o.shape == (2, 5) for o in outs)
    assert not torch.allclose(outs[0], model(x))
    torch.testing.assert_close(apop.binarize(model, x, names[1]), outs[1])


def test_errors():
    no_relu = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 14 * 14, 2)).eval()
    with pytest.raises(ValueError, match="no piecewise-linear activation"):
        apop.patterns_of(no_relu, torch.randn(1, 3, 16, 16))
    model = tiny_vgg(seed=1)
    _, pats = apop.patterns_of(model, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="recorded for input shape"):
        apop.replay(model, pats, torch.zeros(3, 3, 16, 16))
    with pytest.raises(ValueError, match="mode must be"):
        apop.replay(model, pats, torch.zeros(2, 3, 16, 16), mode="bad")
