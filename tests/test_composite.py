"""The composite path (srd_ext.composite, ATen ops only) and the backend switch (srd_ext.backend).

The op tests of test_ops.py (against their float64 references) and a chosen part of the explain,
APOP and ERF tests run again here with the backend set to ``composite`` on the CPU; opcheck,
gradcheck and torch.compile run on the srd_ext_composite operators; the choice of ``auto`` is the
one the README's device table states.
"""

import re
from pathlib import Path

import pytest
import test_apop
import test_explain
import test_ops
import torch

from srd_ext import backend, composite, ops

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def composite_backend():
    with backend.use_backend("composite"):
        yield


@pytest.fixture
def tap_path():
    """conv_tap_norms' forms are the CPU kernel's; the composite path has one."""
    return "auto"


# ------------------------------------------------------------------------------------------------
# The op tests of test_ops.py on the composite path
# ------------------------------------------------------------------------------------------------
_OP_TESTS = [
    "test_activation_share_matches_reference",
    "test_activation_share_backward_matches_reference",
    "test_activation_share_noncontiguous",
    "test_activation_share_zero",
    "test_activation_share_empty",
    "test_activation_share_nan",
    "test_conv_tap_norms_matches_reference",
    "test_conv_tap_norms_noncontiguous",
    "test_conv_tap_norms_zero",
    "test_conv_tap_norms_empty",
    "test_conv_tap_norms_nan",
    "test_bias_share_scatter_matches_reference",
    "test_bias_share_scatter_conserves",
    "test_bias_share_scatter_noncontiguous",
    "test_bias_share_scatter_zero_and_empty",
    "test_bias_share_scatter_nan",
    "test_pfv_decompose_matches_reference",
    "test_pfv_decompose_sums_to_conv_output",
    "test_pfv_decompose_noncontiguous",
    "test_pfv_decompose_zero",
    "test_pfv_decompose_empty",
    "test_pfv_decompose_nan",
    "test_float32_agrees_with_float64",
    "test_bad_arguments",
    "test_gradcheck",
]
for _name in _OP_TESTS:
    globals()[_name] = getattr(test_ops, _name)


def test_wrappers_route_to_the_composite_operators():
    x = torch.randn(1, 2, 5, 5)
    with torch.profiler.profile() as prof:
        ops.conv_tap_norms(x, torch.randn(3, 2, 3, 3), 1, 1)
    seen = {e.name for e in prof.events()}
    assert "srd_ext_composite::conv_tap_norms" in seen and "srd_ext::conv_tap_norms" not in seen


@pytest.mark.parametrize("case", list(test_ops.OPCHECK_CASES))
def test_opcheck(case):
    op, args = test_ops.OPCHECK_CASES[case]
    name = op._schema.name.split("::")[1]
    torch.library.opcheck(getattr(torch.ops.srd_ext_composite, name).default, args)


def test_composite_kernel_registered_for_devices_without_one():
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"srd_ext::{name}", "CompositeExplicitAutograd")


@pytest.mark.skipif(not ops.cpu_kernels_built(), reason="needs the compiled extension")
def test_schemas_match_the_compiled_ones():
    for name, schema in ops.SCHEMAS.items():
        compiled = str(getattr(torch.ops.srd_ext, name).default._schema)
        assert compiled == f"srd_ext::{name}{schema}"


def test_float64_refused_where_the_device_cannot(monkeypatch):
    """MPS has no float64: the ops and explain say so (emulated on the CPU with MPS's dtypes)."""
    mps = composite.device_dtypes(torch.device("mps"))
    assert torch.float64 not in mps and torch.float32 in mps
    monkeypatch.setattr(composite, "device_dtypes", lambda device: mps)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"srd_ext::conv_tap_norms: x is float64 \(Double\).*float32"):
        ops.conv_tap_norms(x, torch.randn(3, 2, 3, 3, dtype=torch.float64), 1, 1)
    with pytest.raises(RuntimeError, match="srd_ext::activation_share: a is float64"):
        ops.activation_share(x, x, x)


def test_explain_refuses_float64_on_mps_and_mixed_devices(monkeypatch):
    import srd_ext.checks as checks

    model = test_explain.tiny_vgg(seed=1)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="move one of them"):
        checks.check_input(model, x.to("meta"))
    monkeypatch.setattr(checks, "device_dtypes", lambda device: composite.device_dtypes(torch.device("mps")))
    with pytest.raises(TypeError, match="float64.*cannot compute.*float32"):
        checks.check_input(model.double(), x.double())


# ------------------------------------------------------------------------------------------------
# Explain, APOP and ERF on the composite path: a chosen subset (the rest of those suites runs the
# same wrappers, on the kernels)
# ------------------------------------------------------------------------------------------------
_EXPLAIN_TESTS = [
    "test_layers_and_upsample",
    "test_gradcam_contrast_matches_autograd",
    "test_torch_compile_matches_eager",
    "test_empty_batch",
]
for _name in _EXPLAIN_TESTS:
    globals()[_name] = getattr(test_explain, _name)


@pytest.mark.parametrize("bias_share", ["contribution", "input"])
@pytest.mark.parametrize("name", ["resnet-bottleneck", "concat-split", "products"])
def test_conservation(name, bias_share):
    test_explain.test_conservation(name, bias_share)


_APOP_TESTS = ["test_masks_recorded_for_reused_and_functional_relus", "test_binarize_changes_only_that_layer"]
for _name in _APOP_TESTS:
    globals()[_name] = getattr(test_apop, _name)


@pytest.mark.parametrize("name", ["vgg", "resnet", "functional"])
def test_replay_on_original_input_gives_original_logits(name):
    build = {
        "vgg": lambda: test_apop.tiny_vgg(seed=1),
        "resnet": lambda: test_apop.tiny_resnet(seed=2),
        "functional": lambda: test_apop.Functional().eval(),
    }[name]
    test_apop.test_replay_on_original_input_gives_original_logits(build)


@pytest.mark.parametrize("name", ["vgg", "channels-last"])
def test_forward_form_equals_backward(name):
    test_explain.test_forward_form_equals_backward(name)


@pytest.mark.parametrize("name", ["resnet-bottleneck", "gates"])
def test_fast_path_equals_reference_at_every_site(name):
    test_explain.test_fast_path_equals_reference_at_every_site(name, "contribution")


@pytest.mark.parametrize("name", ["resnet-basic", "resnet-bottleneck"])
def test_maps_equal_the_kernels(name):
    """The composite path's maps and ERF against the compiled kernels', on the CPU."""
    import srd_ext

    build, size = test_explain.MODELS[name]
    model = build().float()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = {}
    for b in ("kernels", "composite"):
        with backend.use_backend(b):
            out[b] = (srd_ext.explain(model, x, layer=["input", "high"]), srd_ext.erf(model, x, "high", (1, 1)))
    (mk, ek), (mc, ec) = out["kernels"], out["composite"]
    for layer in mk:
        torch.testing.assert_close(mc[layer], mk[layer], rtol=1e-5, atol=1e-5 * mk[layer].abs().max().item())
    torch.testing.assert_close(ec, ek, rtol=1e-5, atol=1e-5 * ek.abs().max().item())


# ------------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------------
def test_auto_picks_what_the_readme_says():
    """README: kernels on the CPU; on CUDA the kernels only with a passing GPU record (none has
    passed yet), else composite; composite on MPS, XPU and the rest."""
    with backend.use_backend("auto"):
        assert backend.path_for("cpu") == ("kernels" if ops.cpu_kernels_built() else "composite")
        cuda = "kernels" if ops.cuda_kernels_built() and backend.gpu_record_passed() else "composite"
        assert backend.path_for("cuda") == cuda
        assert backend.path_for("mps") == backend.path_for("xpu") == "composite"
    with backend.use_backend("kernels"):
        assert backend.path_for("cuda") == ("kernels" if ops.cuda_kernels_built() else "composite")
        assert backend.path_for("mps") == "composite"
    assert backend.path_for("cpu") == backend.path_for("cuda") == "composite"
    readme = (ROOT / "README.md").read_text()
    assert "SRD_EXT_BACKEND" in readme
    for row in ("| CPU |", "| CUDA, kernels built |", "| CUDA, no kernels built |", "| MPS |", "| XPU |"):
        assert row in readme


def test_the_record_says_whether_a_gpu_run_passed():
    record = backend.gpu_record()
    assert "passed" in record
    assert backend._record_passes({"passed": True, "csrc_digest": "x"}, None)  # installed: no sources
    assert not backend._record_passes({"passed": True, "csrc_digest": "x"}, "y")  # sources changed since
    assert not backend._record_passes({"passed": False}, None)
    if record["passed"]:
        assert re.fullmatch(r"[0-9a-f]{64}", record["csrc_digest"])


def test_bad_backend_names():
    with pytest.raises(ValueError, match="auto, kernels, composite"):
        backend.set_backend("gpu")
    assert backend.get_backend() == "composite"
