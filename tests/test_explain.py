"""srd_ext.explain / Explainer / erf against the literal reference, and SRD's properties."""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import srd_ext
from models_for_tests import tiny_resnet, tiny_vgg
from reference import ReferenceSRD

MODELS = {
    "vgg": (lambda: tiny_vgg(seed=1), 16),
    "resnet-basic": (lambda: tiny_resnet(BasicBlock, seed=2), 32),
    "resnet-bottleneck": (lambda: tiny_resnet(Bottleneck, seed=3, widths=(4, 4, 4, 4)), 32),
}


def _input(size, batch=1, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("bias_share", ["contribution", "input", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_equals_reference_at_every_layer(name, bias_share):
    build, size = MODELS[name]
    model = build().double()
    x = _input(size)
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    fast = ex.relevance_at_all_layers(x)
    enc = ex.encoder_index
    ref = ReferenceSRD(model, x, bias_share=bias_share)
    r_ref = ref.run(enc, fast[ex.plan.steps[enc].name][0])
    if bias_share != "none":  # the explicit decomposition is exact: sum_i v_hat_{i->j} = v_j
        assert max(ref.residuals.values()) < 1e-10
    checked = 0
    for step in ex.plan.steps:
        if step.name in fast and step.index in r_ref:
            assert _rel_err(fast[step.name][0], r_ref[step.index]) < 1e-4, step.name
            checked += 1
    assert checked >= 4


def _cut_layers(ex):
    """Activation layers every path to the output passes through (all of a chain network, the
    block outputs of a ResNet): relevance is conserved across them."""
    return [s.name for s in ex.plan.steps if s.kind == "act" and s.index <= ex.encoder_index
            and ex._is_cut(s.index)] + ["x"]


WIDE = {  # wide enough that no receptive field is entirely zero (its bias would have no carrier)
    "vgg": (lambda: tiny_vgg(seed=1, cfg=(16, "M", 16, "M", 16, 16)), 16),
    "resnet-basic": (lambda: tiny_resnet(BasicBlock, seed=2, widths=(16, 16, 16, 16)), 32),
    "resnet-bottleneck": (lambda: tiny_resnet(Bottleneck, seed=3, widths=(8, 8, 8, 8)), 32),
}


@pytest.mark.parametrize("bias_share", ["contribution", "input"])
@pytest.mark.parametrize("name", list(WIDE))
def test_conservation(name, bias_share):
    build, size = WIDE[name]
    model = build().double()
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    maps = ex.relevance_at_all_layers(_input(size, batch=3))
    cuts = _cut_layers(ex)
    assert len(cuts) >= 3
    total = maps[cuts[0]].sum((1, 2))
    for n in cuts[1:]:
        rel = (maps[n].sum((1, 2)) - total).abs() / total.abs().clamp_min(1e-12)
        assert float(rel.detach().max()) <= 1e-4, n


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_invariance_and_per_sample_targets(name):
    build, size = MODELS[name]
    model = build().double()
    x = _input(size, batch=3, seed=5)
    target = torch.tensor([0, 3, 1])
    ex = srd_ext.Explainer(model)
    layers = ["input", "low", ex.plan.activations()[1].name]
    batch = ex.explain(x, target, layer=layers)
    for i in range(3):
        one = ex.explain(x[i:i + 1], int(target[i]), layer=layers)
        for k in batch:
            torch.testing.assert_close(batch[k][i:i + 1], one[k], rtol=1e-9, atol=1e-12)
    other = ex.explain(x, torch.tensor([2, 2, 2]))
    assert not torch.allclose(other, batch["input"])


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_form_equals_backward(name):
    """Eq. 1-3 (ERFs composed forward with the sharing ratios) = the backward result (App. C)."""
    build, size = MODELS[name]
    model = build().double()
    x = _input(size, seed=7)
    ex = srd_ext.Explainer(model)
    fast = ex.relevance_at_all_layers(x)
    enc = ex.encoder_index
    ref = ReferenceSRD(model, x)
    r_enc = fast[ex.plan.steps[enc].name][0]
    ref.run(enc, r_enc)
    # Forward: ERF of every PFV, layer by layer (Eq. 1, 2).
    steps = ex.plan.steps
    n_in = x.shape[2] * x.shape[3]
    erf = {ex.plan.input_index: torch.eye(n_in, dtype=torch.float64)}  # (pixels of layer, input pixels)
    for s in steps:
        if s.kind != "act" or s.index > enc:
            continue
        total = 0
        for src in ref.sources_of[s.index]:
            mu = ref.mu[(src, s.index)]  # (P_src, H_k, W_k)
            total = total + mu.reshape(mu.shape[0], -1).T @ erf[src]
        erf[s.index] = total
    # Eq. 3: the saliency map is the mu-weighted sum of the encoder PFVs' ERFs.
    phi = (r_enc.reshape(-1) @ erf[enc]).view(x.shape[2:])
    assert _rel_err(phi, fast["x"][0]) < 1e-6
    # One PFV's ERF (Explainer.erf, a backward from a one-hot relevance) = its forward ERF.
    h, w = fast[steps[enc].name].shape[-2:]
    pos = (h // 2, w // 2)
    back = ex.erf(x, steps[enc].name, pos)[0]
    assert _rel_err(back, erf[enc][pos[0] * w + pos[1]].view(x.shape[2:])) < 1e-6


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def test_model_unchanged_also_on_error():
    model = tiny_resnet(seed=4)
    hook = model.layer1.register_forward_hook(lambda *a: None)
    before = _state(model)
    x = torch.randn(2, 3, 32, 32)
    srd_ext.explain(model, x, layer="high")
    with pytest.raises(ValueError):
        srd_ext.explain(model, x, target=99)
    after = _state(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    assert before[1:] == after[1:]
    hook.remove()


def test_layers_and_upsample():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 64, 64)
    ex = srd_ext.Explainer(model)
    maps = ex.explain(x, layer=["input", "high", "low", "layer2", "layer1_0_relu_1"])
    assert maps["input"].shape == (2, 64, 64)
    assert maps["high"].shape == (2, 8, 8)
    assert maps["low"].shape == (2, 2, 2)
    torch.testing.assert_close(maps["layer2"], maps["high"])
    up = ex.explain(x, layer="low", upsample=True)
    assert up.shape == (2, 64, 64)
    with pytest.raises(ValueError, match="used 2 times"):
        ex.explain(x, layer="layer1.0.relu")
    with pytest.raises(ValueError, match="unknown layer"):
        ex.explain(x, layer="nope")


@pytest.mark.parametrize("init", ["gradcam-contrast", "gradcam", "cam", "constant"])
def test_inits(init):
    model = tiny_resnet(seed=4).double()
    x = _input(32, batch=2)
    m = srd_ext.explain(model, x, init=init, layer="low")
    assert m.shape == (2, 1, 1) and torch.isfinite(m).all()
    user = torch.rand(2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(srd_ext.explain(model, x, init=user, layer="low"), user)


def test_gradcam_contrast_matches_autograd():
    """Eq. 4 from the engine's own head gradient equals one computed with torch.autograd."""
    model = tiny_vgg(seed=1).double()
    x = _input(16, batch=2)
    ex = srd_ext.Explainer(model)
    enc = ex.plan.steps[ex.encoder_index]
    r0 = ex.explain(x, torch.tensor([1, 4]), layer="low")
    feats = {}
    h = dict(model.named_modules())[enc.path].register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    logits = model(x)
    h.remove()
    A = feats["a"]
    k = logits.shape[1]
    w = torch.nn.functional.one_hot(torch.tensor([1, 4]), k).double() - 1.0 / k
    grad, = torch.autograd.grad((logits * w).sum(), A)
    expect = torch.relu(torch.einsum("bc,bchw->bhw", grad.mean((2, 3)), A))
    torch.testing.assert_close(r0, expect.detach())


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.ELU(), nn.SiLU(), nn.GELU(), nn.Tanh(), nn.Softplus(beta=5)])
def test_other_activations_conserve_and_match_reference(act):
    model = tiny_vgg(seed=6).double()
    for name, m in list(model.features.named_children()):
        if isinstance(m, nn.ReLU):
            model.features[int(name)] = copy.deepcopy(act)
    x = _input(16)
    ex = srd_ext.Explainer(model)
    fast = ex.relevance_at_all_layers(x)
    ref = ReferenceSRD(model, x)
    r_ref = ref.run(ex.encoder_index, fast[ex.plan.steps[ex.encoder_index].name][0])
    torch.testing.assert_close(fast["x"][0], r_ref[ex.plan.input_index], rtol=1e-6, atol=1e-9)


def test_differentiable_wrt_input():
    model = tiny_vgg(seed=1, cfg=(3, "M", 4)).double()
    x = _input(6).requires_grad_(True)
    ex = srd_ext.Explainer(model, init="constant")
    assert torch.autograd.gradcheck(lambda inp: ex.explain(inp, 0), (x,), eps=1e-6, atol=1e-5)


def test_torch_compile_matches_eager():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32)
    ex = srd_ext.Explainer(model)
    eager = ex.explain(x, torch.tensor([0, 1]), layer="input")
    compiled = torch.compile(lambda inp, t: ex.explain(inp, t, layer="input"), fullgraph=True)
    torch.testing.assert_close(compiled(x, torch.tensor([0, 1])), eager, rtol=1e-4, atol=1e-6)


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
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        srd_ext.explain(model, x)
    model.eval()


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(srd_ext.UnsupportedModelError, match=r"'2'.*Upsample"):
        srd_ext.Explainer(model)


def test_empty_batch():
    model = tiny_vgg(seed=1)
    out = srd_ext.explain(model, torch.zeros(0, 3, 16, 16), layer="input")
    assert out.shape == (0, 16, 16)


@pytest.mark.parametrize("module", [nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(0.7), nn.SiLU(), nn.GELU(),
                                    nn.GELU(approximate="tanh"), nn.Tanh(), nn.Softplus(beta=3, threshold=4)])
def test_activation_derivatives_match_autograd(module):
    """The head gradient (Eq. 4) uses each activation's derivative."""
    from srd_ext.capture import _module_activation

    act = _module_activation(module)
    z = torch.linspace(-3, 3, 601, dtype=torch.float64).requires_grad_(True)
    a = module(z)
    (expected,) = torch.autograd.grad(a.sum(), z)
    torch.testing.assert_close(act.derivative(z.detach(), a.detach()), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(act(z.detach()), a.detach())
