"""srd_ext.explain_func (Quantus' explain_func) and srd_ext.SRD (captum's attribution convention),
driven by Quantus metrics and captum.metrics."""

import numpy as np
import pytest
import torch

import srd_ext

from models_for_tests import tiny_vgg

# ReLUs at 1, 1/2, 1/4 and 1/8 of a 32 x 32 input: "high" exists, "low" is the last one.
CFG = (4, "M", 8, "M", 8, "M", 8)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = tiny_vgg(cfg=CFG).eval()
    x = torch.randn(4, 3, 32, 32)
    y = model(x).argmax(1)
    return model, x, y


def test_explain_func_returns_quantus_layout(setup):
    model, x, y = setup
    a = srd_ext.explain_func(model, x.numpy(), y.numpy())
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(a[:, 0], srd_ext.explain(model, x, y).numpy(), rtol=1e-6, atol=1e-7)
    low = srd_ext.explain_func(model, x, y, layer="low", upsample=False)
    assert low.shape == (4, 1, 4, 4)
    # int target, predicted classes
    np.testing.assert_allclose(srd_ext.explain_func(model, x, None), a, rtol=1e-6, atol=1e-7)
    one = srd_ext.explain_func(model, x, 2)
    np.testing.assert_allclose(one[:, 0], srd_ext.explain(model, x, 2).numpy(), rtol=1e-6, atol=1e-7)


def test_explain_func_refuses_unknown_options(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match=r"layr.*accepts.*'layer'"):
        srd_ext.explain_func(model, x, y, layr="high")
    with pytest.raises(ValueError, match=r"inputs must be images \(B, C, H, W\)"):
        srd_ext.explain_func(model, x[0].numpy(), y[:1].numpy())


def test_quantus_metric_runs_with_explain_func(setup):
    quantus = pytest.importorskip("quantus")
    model, x, y = setup
    kwargs = {"layer": "high", "init": "gradcam"}
    metric = quantus.Sparseness(disable_warnings=True, display_progressbar=False)
    via_func = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=None,
        device="cpu",
        explain_func=srd_ext.explain_func,
        explain_func_kwargs=kwargs,
    )
    # The same metric on maps computed directly with the same options: the options reached SRD.
    a = srd_ext.explain(model, x, y, layer="high", init="gradcam", upsample=True).unsqueeze(1).numpy()
    direct = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu")
    np.testing.assert_allclose(via_func, direct, rtol=1e-6)
    default = metric(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, device="cpu", explain_func=srd_ext.explain_func
    )
    assert not np.allclose(default, via_func)  # another layer gives other maps
    # A robustness metric calls explain_func on perturbed inputs again.
    sens = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True, display_progressbar=False)
    scores = sens(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=None,
        device="cpu",
        explain_func=srd_ext.explain_func,
        explain_func_kwargs={"layer": "input"},
    )
    assert len(scores) == 4 and np.all(np.isfinite(scores)) and np.all(np.asarray(scores) > 0)


def test_srd_attribute_follows_captum_conventions(setup):
    model, x, y = setup
    srd = srd_ext.SRD(model)
    attr = srd.attribute(x, target=y)
    assert attr.shape == x.shape and attr.dtype == x.dtype
    ref = srd_ext.explain(model, x, y)
    torch.testing.assert_close(attr.sum(1), ref)  # each channel holds 1/C of the pixel's relevance
    torch.testing.assert_close(attr[:, 0], attr[:, 2])
    (t,) = srd.attribute((x,), target=y.tolist())
    torch.testing.assert_close(t, attr)
    high = srd.attribute(x, target=y, layer="high")
    assert high.shape == x.shape
    per_pixel = srd.attribute(x, target=y, layer="high", upsample=False, per_pixel=True)
    torch.testing.assert_close(per_pixel[:, 0], srd_ext.explain(model, x, y, layer="high"))
    assert srd.forward_func is model and srd.has_convergence_delta() is False


def test_srd_attribute_errors_name_the_alternatives(setup):
    model, x, y = setup
    srd = srd_ext.SRD(model)
    with pytest.raises(ValueError, match="upsample=True.*per_pixel=True"):
        srd.attribute(x, target=y, layer="high", upsample=False)
    with pytest.raises(ValueError, match="additional_forward_args"):
        srd.attribute(x, target=y, additional_forward_args=(1,))
    with pytest.raises(ValueError, match="tuple targets"):
        srd.attribute(x, target=(0, 1))
    with pytest.raises(ValueError, match="one input tensor; got 2"):
        srd.attribute((x, x), target=y)


def test_captum_infidelity_with_srd(setup):
    captum_metrics = pytest.importorskip("captum.metrics")
    model, x, y = setup
    srd = srd_ext.SRD(model)
    attr = srd.attribute(x, target=y)
    g = torch.Generator().manual_seed(1)
    # One fixed perturbation: whole pixels (all channels alike) of a random quarter of the image.
    pixels = (torch.rand(x.shape[0], 1, 32, 32, generator=g) < 0.25).to(x.dtype).expand_as(x)
    perturb = pixels * x

    def perturb_fn(inputs):
        return perturb.repeat_interleave(inputs.shape[0] // x.shape[0], 0), inputs - perturb.repeat_interleave(
            inputs.shape[0] // x.shape[0], 0
        )

    infid = captum_metrics.infidelity(model, perturb_fn, x, attr, target=y, n_perturb_samples=1, normalize=False)
    # captum's definition, by hand: (sum_i I_i phi_i - (f(x) - f(x - I)))^2, and sum_i I_i phi_i
    # over whole pixels is the SRD relevance of the perturbed pixels (times their values' mean).
    with torch.no_grad():
        drop = model(x).gather(1, y[:, None])[:, 0] - model(x - perturb).gather(1, y[:, None])[:, 0]
    srd_map = srd_ext.explain(model, x, y)
    dot = (srd_map * (perturb.mean(1))).flatten(1).sum(1)
    torch.testing.assert_close(infid, (dot - drop) ** 2, rtol=1e-4, atol=1e-6)


def test_captum_sensitivity_max_with_srd(setup):
    captum_metrics = pytest.importorskip("captum.metrics")
    model, x, y = setup
    srd = srd_ext.SRD(model)
    still = captum_metrics.sensitivity_max(srd.attribute, x, target=y, perturb_radius=0.0, n_perturb_samples=2)
    assert still.shape == (4,) and torch.equal(still, torch.zeros(4))  # the same input, the same map
    moved = captum_metrics.sensitivity_max(srd.attribute, x, target=y, perturb_radius=0.1, n_perturb_samples=3)
    assert moved.shape == (4,) and torch.isfinite(moved).all() and (moved > 0).all()
    high = captum_metrics.sensitivity_max(
        srd.attribute, x, target=y, layer="high", perturb_radius=0.1, n_perturb_samples=3
    )
    assert not torch.allclose(high, moved)  # the layer reached SRD
