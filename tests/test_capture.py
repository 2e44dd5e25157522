"""Capture: regions export wraps (autocast, grad mode) are inlined, and a model whose attention
comes after the last layer with pixels SRD can decompose is refused instead of being explained
through its stem."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import srd_ext

from models_for_tests import randomize


class _Block(nn.Module):
    """conv -> ReLU -> conv, optionally under ``torch.autocast(enabled=False)`` (which export
    captures as a wrapped submodule)."""

    def __init__(self, wrapped: bool):
        super().__init__()
        self.wrapped = wrapped
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def inner(self, x):
        return self.b(F.relu(self.a(x)))

    def forward(self, x):
        if self.wrapped:
            with torch.autocast(x.device.type, enabled=False):
                y = self.inner(x)
        else:
            y = self.inner(x)
        y = F.relu(y)
        return self.fc(y.mean((2, 3)))


def test_wrapped_region_is_inlined():
    torch.manual_seed(0)
    plain = randomize(_Block(False), seed=3)
    wrapped = randomize(_Block(True), seed=3)
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    plain, wrapped = plain.double(), wrapped.double()
    g = srd_ext.capture.capture(wrapped, x)
    assert all(n.kind != "call" or "wrap" not in n.op_name for n in g.nodes)
    torch.testing.assert_close(g.forward(x)[g.output_index], wrapped(x))
    for layer in ("input", "a"):
        torch.testing.assert_close(srd_ext.explain(wrapped, x, layer=layer), srd_ext.explain(plain, x, layer=layer))
    budget = srd_ext.Explainer(wrapped, init="constant").relevance_budget(x)
    torch.testing.assert_close(budget["encoder"], budget["input"] + budget["unassigned"])


class _UnfoldAttention(nn.Module):
    """A conv stem, then tokens cut with ``F.unfold`` (whose pixels srd_ext does not follow), one
    attention over them and a mean-pool head: the last layer with pixels SRD can decompose is
    the stem, before the attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Linear(64, 8)
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(F.unfold(F.relu(self.stem(x)), 4, stride=4).transpose(1, 2))  # (B, N, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.fc(t.mean(1))


def test_attention_after_the_last_pixel_layer_is_refused_with_the_way_out():
    model = randomize(_UnfoldAttention(), seed=1)
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        srd_ext.UnsupportedModelError, match=r"mixes tokens.*scaled_dot_product_attention.*encoder='relu'"
    ):
        srd_ext.explain(model, x)
    # the user may still ask for the stem knowingly
    r = srd_ext.explain(model, x, encoder="relu")
    assert r.shape == (2, 16, 16) and torch.isfinite(r).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
