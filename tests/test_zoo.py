"""Every torchvision CNN classifier and a broad sample of timm's CNN families, with random
weights (biases, norm parameters, gains and BatchNorm statistics randomised): captured, explained,
and relevance conserved from the encoder output to the input (up to the relevance no pixel can
carry, which the budget accounts for)."""

import pytest
import torch

import srd_ext
from srd_ext import zoo

TV_CNNS, TV_EXCLUDED = zoo.torchvision_cnns()


def _assert_conserving(res):
    assert res.explained, f"{res.name}: {res.reason}"
    assert res.forward_error < 1e-4, f"{res.name}: captured forward differs by {res.forward_error:.2e}"
    assert res.budget_error < 1e-4, f"{res.name}: relevance budget off by {res.budget_error:.2e}"
    assert res.unassigned < 0.05, f"{res.name}: {res.unassigned:.1%} of the relevance unassigned"


def test_torchvision_zoo_is_complete():
    """68 CNN classifiers; only the transformer families are left out."""
    assert len(TV_CNNS) == 68, TV_CNNS
    assert all(n.startswith(("vit_", "swin_", "maxvit_")) for n in TV_EXCLUDED)


@pytest.mark.parametrize("name", TV_CNNS)
def test_torchvision_cnn(name):
    torch.manual_seed(0)
    model = zoo.build(name, "torchvision")
    _assert_conserving(zoo.check(model, name, "torchvision"))


@pytest.mark.parametrize("name", zoo.TIMM_SAMPLE)
def test_timm_cnn(name):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = zoo.build(name, "timm")
    res = zoo.check(model, name, "timm")
    if name in zoo.TIMM_REFUSED:
        assert not res.explained and zoo.TIMM_REFUSED[name] in res.reason
        return
    _assert_conserving(res)


def test_timm_coverage_at_least_85_percent():
    explained = len(zoo.TIMM_SAMPLE) - len(zoo.TIMM_REFUSED)
    assert set(zoo.TIMM_REFUSED) <= set(zoo.TIMM_SAMPLE)
    assert explained / len(zoo.TIMM_SAMPLE) >= 0.85


@pytest.mark.parametrize("name", list(zoo.TRANSFORMERS_CI))
def test_timm_transformer(name):
    """A part of the transformer sample: explained through its blocks (the encoder after the
    last attention), conserving; or refused with the reason named."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    size = zoo.transformer_size(name)
    model = zoo.build(name, "timm", img_size=size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    res = zoo.check(model, name, "timm", x=x)
    refused_by = zoo.TRANSFORMERS_CI[name]
    if refused_by is not None:
        assert not res.explained and refused_by in res.reason, res.reason
        return
    _assert_conserving(res)
    ex = srd_ext.Explainer(model)
    g = ex.graph(x)
    enc = ex._plan(g).encoder
    attention = [n.index for n in g.nodes if n.kind == "call" and n.data and "attention" in n.op_name]
    attention += [n.index for n in g.nodes if n.kind == "call" and n.data and n.op_name.endswith("softmax")]
    assert attention and max(attention) < enc, f"{name}: encoder {g.display_name(enc)} before the last attention"
