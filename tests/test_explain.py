"""srd_ext.explain / Explainer / erf against the literal reference, and SRD's properties."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import srd_ext

from models_for_tests import op_models, tiny_resnet, tiny_vgg
from reference import ReferenceSRD, check_every_site, rel_err

MODELS = {
    "vgg": (lambda: tiny_vgg(seed=1), 16),
    "resnet-basic": (lambda: tiny_resnet(BasicBlock, seed=2), 32),
    "resnet-bottleneck": (lambda: tiny_resnet(Bottleneck, seed=3, widths=(4, 4, 4, 4)), 32),
    **op_models(),
}


def _input(size, batch=1, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bias_share", ["contribution", "input", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_equals_reference_at_every_site(name, bias_share):
    build, size = MODELS[name]
    assert check_every_site(build().double(), _input(size), bias_share) >= 4


WIDE = {  # wide enough that no receptive field is entirely zero (its bias would have no carrier)
    "vgg": (lambda: tiny_vgg(seed=1, cfg=(16, "M", 16, "M", 16, 16)), 16),
    "resnet-basic": (lambda: tiny_resnet(BasicBlock, seed=2, widths=(16, 16, 16, 16)), 32),
    "resnet-bottleneck": (lambda: tiny_resnet(Bottleneck, seed=3, widths=(8, 8, 8, 8)), 32),
    **op_models(),
}


def _cut_layers(ex, x):
    g = ex.graph(x)
    return [g.display_name(i) for i in ex.layer_indices(x) if i in g.cuts or i == g.input_index]


@pytest.mark.parametrize("bias_share", ["contribution", "input"])
@pytest.mark.parametrize("name", list(WIDE))
def test_conservation(name, bias_share):
    """Relevance is the same at every layer all paths pass through, up to the relevance that no
    pixel can carry, which the budget accounts for exactly."""
    build, size = WIDE[name]
    model = build().double()
    x = _input(size, batch=3)
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    budget = ex.relevance_budget(x)
    torch.testing.assert_close(budget["input"] + budget["unassigned"], budget["encoder"], rtol=1e-9, atol=1e-12)
    maps = ex.relevance_at_all_layers(x)
    cuts = _cut_layers(ex, x)
    assert len(cuts) >= 3
    if float(budget["unassigned"].abs().max()) == 0:
        total = maps[cuts[-1]].sum((1, 2))
        for n in cuts:
            rel = (maps[n].sum((1, 2)) - total).abs() / total.abs().clamp_min(1e-12)
            assert float(rel.max()) <= 1e-9, n


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_invariance_and_per_sample_targets(name):
    build, size = MODELS[name]
    model = build().double()
    x = _input(size, batch=3, seed=5)
    target = torch.tensor([0, 3, 1])
    ex = srd_ext.Explainer(model)
    layers = ["input", "low", ex.layer_names(x)[4]]
    batch = ex.explain(x, target, layer=layers)
    for i in range(3):
        one = ex.explain(x[i : i + 1], int(target[i]), layer=layers)
        for k in batch:
            torch.testing.assert_close(batch[k][i : i + 1], one[k], rtol=1e-9, atol=1e-12)
    other = ex.explain(x, torch.tensor([2, 2, 2]))
    assert not torch.allclose(other, batch["input"])


@pytest.mark.parametrize("name", ["vgg", "resnet-basic", "concat-split", "channels-last"])
def test_forward_form_equals_backward(name):
    """Eq. 1-3 (ERFs composed forward with the sharing ratios) = the backward result (App. C)."""
    build, size = MODELS[name]
    model = build().double()
    x = _input(size, seed=7)
    ex = srd_ext.Explainer(model)
    g = ex.graph(x)
    fast = ex.relevance_at_all_layers(x)
    ref = ReferenceSRD(model, x)
    enc = ref.plan.encoder
    r_enc = fast[g.display_name(enc)][0]
    ref.run(r_enc)
    n_in = x.shape[2] * x.shape[3]
    erf = {g.input_index: torch.eye(n_in, dtype=torch.float64)}  # (pixels of a layer, input pixels)
    for k in ref.sites():
        total = 0
        for src in ref.sources_of[k]:
            mu = ref.mu[(src, k)]  # (P_src, J_k)
            total = total + mu.T @ erf[src]
        erf[k] = total
    phi = (r_enc.reshape(-1) @ erf[enc]).view(x.shape[2:])
    assert rel_err(phi, fast["input"][0]) < 1e-6
    h, w = r_enc.shape
    pos = (h // 2, w // 2)
    back = ex.erf(x, g.display_name(enc), pos)[0]
    assert rel_err(back, erf[enc][pos[0] * w + pos[1]].view(x.shape[2:])) < 1e-6


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        [id(m) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize("name", ["resnet-basic", "gates", "channels-last"])
def test_model_unchanged_also_on_error(name):
    build, size = MODELS[name]
    model = build()
    model.classifier_dropout = nn.Dropout(0.5).train()  # a submodule in training mode stays so
    hook = model.register_forward_hook(lambda *a: None)
    before = _state(model)
    x = torch.randn(2, 3, size, size)
    expected = model(x)
    srd_ext.explain(model, x, layer="low")
    with pytest.raises(ValueError):
        srd_ext.explain(model, x, target=99)
    after = _state(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    assert before[1:] == after[1:]
    torch.testing.assert_close(model(x), expected)
    hook.remove()


def test_layers_and_upsample():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 64, 64)
    ex = srd_ext.Explainer(model)
    maps = ex.explain(x, layer=["input", "high", "low", "layer2", "layer1.0.relu@1", "layer1_0_relu_1"])
    assert maps["input"].shape == (2, 64, 64)
    assert maps["high"].shape == (2, 8, 8)
    assert maps["low"].shape == (2, 2, 2)
    torch.testing.assert_close(maps["layer2"], maps["high"])
    torch.testing.assert_close(maps["layer1.0.relu@1"], maps["layer1_0_relu_1"])
    up = ex.explain(x, layer="low", upsample=True)
    assert up.shape == (2, 64, 64)
    with pytest.raises(ValueError, match="used 2 times"):
        ex.explain(x, layer="layer1.0.relu")
    with pytest.raises(ValueError, match="unknown layer"):
        ex.explain(x, layer="nope")
    with pytest.raises(ValueError, match="head"):
        ex.explain(x, layer="fc")
    with pytest.raises(ValueError, match="folded"):
        ex.explain(x, layer="layer1.0.conv1")
    assert ex.encoder_layer(x) == "layer4"
    assert "layer3" in ex.layer_names(x)


def test_encoder_argument():
    model = tiny_vgg(seed=1, cfg=(4, "M", 8, "M", 8, 8)).double()
    x = _input(16, batch=2)
    ex = srd_ext.Explainer(model, encoder="features.6")
    assert ex.encoder_layer(x) == "features.6"
    low = ex.explain(x, layer="low")
    assert low.shape == (2, 4, 4)
    m = srd_ext.explain(model, x, encoder="features.6", layer=["input", "low"], init="constant")
    budget = ex.relevance_budget(x, init="constant")
    torch.testing.assert_close(m["input"].sum((1, 2)) + budget["unassigned"], m["low"].sum((1, 2)))
    with pytest.raises(ValueError, match="unknown encoder"):
        srd_ext.Explainer(model, encoder="nope").explain(x)
    with pytest.raises(ValueError, match="after the encoder"):
        ex.explain(x, layer="features.9")


@pytest.mark.parametrize("init", ["gradcam-contrast", "gradcam", "cam", "constant"])
def test_inits(init):
    model = tiny_resnet(seed=4).double()
    x = _input(32, batch=2)
    m = srd_ext.explain(model, x, init=init, layer="low")
    assert m.shape == (2, 1, 1) and torch.isfinite(m).all()
    user = torch.rand(2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(srd_ext.explain(model, x, init=user, layer="low"), user)


def test_cam_init_needs_a_pool_linear_head():
    model = tiny_vgg(seed=1).double()  # the head is pool, linear, relu, dropout, linear
    with pytest.raises(ValueError, match="global-average-pool"):
        srd_ext.explain(model, _input(16), init="cam")


@pytest.mark.parametrize("name", ["vgg", "channels-last", "gates"])
def test_gradcam_contrast_matches_autograd(name):
    """Eq. 4 from the engine's own head gradient equals one computed with torch.autograd."""
    build, size = MODELS[name]
    model = build().double()
    x = _input(size, batch=2)
    ex = srd_ext.Explainer(model)
    g = ex.graph(x)
    enc = ex._plan(g).encoder
    r0 = ex.explain(x, torch.tensor([1, 4]), layer="low")
    values = g.forward(x)
    A = values[enc].detach().requires_grad_(True)
    # the head re-run from the encoder output with autograd
    vals = list(values)
    vals[enc] = A
    from srd_ext.capture import Instrument, _ForwardContext
    from srd_ext.nodes import load

    ctx = _ForwardContext(Instrument(), None, g, vals)
    for n in g.nodes[enc + 1 :]:
        if n.kind == "call":
            vals[n.index] = n.rule.forward(n, load(n.args, vals.__getitem__), load(n.kwargs, vals.__getitem__), ctx)
        elif n.kind == "output":
            vals[n.index] = vals[n.inputs[0]]
    logits = vals[g.output_index]
    k = logits.shape[1]
    w = torch.nn.functional.one_hot(torch.tensor([1, 4]), k).double() - 1.0 / k
    (grad,) = torch.autograd.grad((logits * w).sum(), A)
    from srd_ext.rules import to_nchw

    lay = g.nodes[enc].layout
    A4, G4 = to_nchw(A.detach(), lay), to_nchw(grad, lay)
    expect = torch.relu(torch.einsum("bc,bchw->bhw", G4.mean((2, 3)), A4))
    torch.testing.assert_close(r0, expect)


def test_default_maps_are_detached_and_create_graph_differentiates():
    model = tiny_vgg(seed=1, cfg=(3, "M", 4)).double()
    x = _input(6).requires_grad_(True)
    ex = srd_ext.Explainer(model, init="constant")
    plain = ex.explain(x, 0)
    assert not plain.requires_grad and plain.grad_fn is None
    assert torch.autograd.gradcheck(lambda inp: ex.explain(inp, 0, create_graph=True), (x,), eps=1e-6, atol=1e-5)
    maps, logits = ex.explain(x, 0, return_logits=True, create_graph=True)
    loss = maps.sum() + logits.sum()
    grads = torch.autograd.grad(loss, [x] + list(model.parameters()), allow_unused=True)
    assert grads[0] is not None and any(gr is not None for gr in grads[1:])


def test_torch_compile_matches_eager():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    ex = srd_ext.Explainer(model)
    eager = ex.explain(x, torch.tensor([0, 1]), layer="input")
    compiled = torch.compile(lambda inp, t: ex.explain(inp, t, layer="input"), fullgraph=True)
    torch.testing.assert_close(compiled(x, torch.tensor([0, 1])), eager, rtol=1e-4, atol=1e-6)


def test_autocast_explains_in_the_model_dtype():
    """Under torch.autocast the explanation runs in the model's own dtype (autocast off inside),
    so it equals the plain explanation and conserves; the caller's autocast state is kept."""
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    ex = srd_ext.Explainer(model)
    plain = ex.explain(x, layer=["input", "high"])
    budget = ex.relevance_budget(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ex.explain(x, layer=["input", "high"])
        mixed_budget = ex.relevance_budget(x)
        erf = ex.erf(x, "high", (0, 0))
        assert torch.is_autocast_enabled("cpu")
    for k in plain:
        assert mixed[k].dtype == torch.float32
        torch.testing.assert_close(mixed[k], plain[k])
    for k in budget:
        torch.testing.assert_close(mixed_budget[k], budget[k])
    assert erf.dtype == torch.float32 and torch.isfinite(erf).all()


def test_compile_without_an_eager_call_says_what_to_do():
    model = tiny_resnet(seed=4)
    ex = srd_ext.Explainer(model)
    compiled = torch.compile(lambda inp: ex.explain(inp), fullgraph=True)
    with pytest.raises(Exception, match="once eagerly"):
        compiled(torch.randn(1, 3, 32, 32))


def test_bad_inputs():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="B, C, H, W"):
        srd_ext.explain(model, x[0])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        srd_ext.explain(model, bad)
    with pytest.raises(ValueError, match="out of range"):
        srd_ext.explain(model, x, target=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        srd_ext.explain(model, x, target=[0, 1, 2])
    with pytest.raises(TypeError, match="integers"):
        srd_ext.explain(model, x, target=torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="float32 or float64"):
        srd_ext.explain(model, x.half())
    with pytest.raises(ValueError, match="bias_share"):
        srd_ext.Explainer(model, bias_share="all")
    with pytest.raises(ValueError, match="init"):
        srd_ext.Explainer(model, init="zeros")
    with pytest.raises(TypeError, match="nn.Module"):
        srd_ext.explain(lambda t: t, x)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        srd_ext.explain(model, x)
    model.eval()


def test_unsupported_op_is_named():
    class Quotient(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x)) / (torch.relu(self.b(x)) + 1)  # the divisor is no gate
            return self.fc(torch.relu(y).mean((2, 3)))

    with pytest.raises(srd_ext.UnsupportedModelError, match=r"'div'.*divisor is not a gate"):
        srd_ext.explain(Quotient().eval(), torch.randn(1, 3, 8, 8))

    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x)).softmax(1)
            return self.fc(torch.relu(y * 3).mean((2, 3)))

    with pytest.raises(
        srd_ext.UnsupportedModelError, match=r"'softmax' \(aten.softmax.*Supported on the relevance path"
    ):
        srd_ext.explain(Softmaxed().eval(), torch.randn(1, 3, 8, 8))


def test_empty_batch():
    model = tiny_vgg(seed=1)
    out = srd_ext.explain(model, torch.zeros(0, 3, 16, 16), layer="input")
    assert out.shape == (0, 16, 16)


def test_wrapped_models_are_explained_like_the_model():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    plain = srd_ext.explain(model, x)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        torch.testing.assert_close(srd_ext.explain(wrapped, x), plain)


def test_capture_is_cached_and_follows_the_model():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    ex = srd_ext.Explainer(model)
    g1 = ex.graph(x)
    assert ex.graph(torch.randn(5, 3, 32, 32)) is g1  # any batch size
    assert srd_ext.Explainer(model).graph(x) is g1  # shared between explainers
    assert ex.graph(torch.randn(2, 3, 48, 48)) is not g1  # another input size
    before = ex.explain(x)
    with torch.no_grad():  # a training step: seen at once
        for p in model.parameters():
            p.mul_(1.1)
    assert ex.graph(x) is g1
    torch.testing.assert_close(ex.explain(x), srd_ext.explain(copy.deepcopy(model), x))
    assert not torch.allclose(ex.explain(x), before)
    model.fc = nn.Linear(8, 3)  # structure changed: captured again
    assert ex.graph(x) is not g1
    assert ex.explain(x, 2).shape == (2, 32, 32)


ACTIVATIONS = [
    nn.ReLU(),
    nn.LeakyReLU(0.2),
    nn.ELU(0.7),
    nn.SELU(),
    nn.CELU(0.5),
    nn.SiLU(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.Softplus(beta=3, threshold=4),
    nn.Hardtanh(-0.5, 2.0),
    nn.ReLU6(),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.Mish(),
    nn.PReLU(1, 0.3),
]


@pytest.mark.parametrize("module", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_activation_derivatives_match_autograd(module):
    """The head gradient (Eq. 4) uses each activation's derivative."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), module).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    z = (torch.linspace(-4, 4, 801, dtype=torch.float64) + 1e-3 * 2**0.5).view(1, 1, 1, -1)  # off the kinks
    g = srd_ext.capture.graph_for(model, z)
    node = next(n for n in g.nodes if n.kind == "call" and n.rule.is_activation)
    values = g.forward(z)

    class Run:
        def value(self, i):
            return values[i]

    zz = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(module(zz).sum(), zz)
    got = node.rule.derivative(node, values[node.z_input], values[node.index], Run())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_zero_initial_relevance_gives_zero_maps_and_names_the_samples():
    # docs/api.md: a sample whose initial relevance is zero everywhere gets an all-zero map (SRD
    # decomposes that relevance; nothing is substituted) and a ZeroRelevanceWarning naming it.
    model = tiny_vgg(seed=1).eval()
    x = _input(32, batch=3).float()
    r_low = srd_ext.explain(model, x, layer="low")
    init = torch.ones_like(r_low)
    init[1] = 0.0
    with pytest.warns(srd_ext.ZeroRelevanceWarning, match=r"sample\(s\) \[1\] of 3 is zero everywhere"):
        maps = srd_ext.explain(model, x, init=init)
    assert torch.all(maps[1] == 0) and torch.all(maps[[0, 2]].flatten(1).abs().sum(1) > 0)
    # A model with no evidence for any class (a zeroed last layer: Grad-CAM is zero): every sample.
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.classifier[-1].weight.zero_()
    before = copy.deepcopy(dead.state_dict())
    with pytest.warns(srd_ext.ZeroRelevanceWarning, match=r"\[0, 1, 2\] of 3 .*does not exceed the mean"):
        maps = srd_ext.explain(dead, x, layer=["input", "features.3"])
    assert all(torch.all(m == 0) and torch.isfinite(m).all() for m in maps.values())
    assert all(torch.equal(v, before[k]) for k, v in dead.state_dict().items())
    with warnings.catch_warnings():  # samples with relevance: no warning
        warnings.simplefilter("error", srd_ext.ZeroRelevanceWarning)
        srd_ext.explain(model, x, init="constant")
