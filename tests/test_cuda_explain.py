"""``srd_ext.explain`` end to end on CUDA against the same model on the CPU.

Small VGG, ResNet and squeeze-excitation models (randomised biases and BatchNorm statistics), every
map layer from one pass, float64 and float32 (TF32 off), the differentiable map, half-precision
models and autocast. Skipped without a GPU; ``make gpu-check`` runs them.
"""

import copy

import pytest
import torch

import srd_ext
from srd_ext import ops as wrappers

from models_for_tests import Gates, randomize, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and wrappers.cuda_kernels_built()), reason="needs a CUDA device and the CUDA kernels"
)
DEV = "cuda"
MODELS = {
    "vgg": lambda: tiny_vgg(seed=1),
    "resnet": lambda: tiny_resnet(seed=2),
    "gates": lambda: randomize(Gates(), 3),
}
LAYERS = ["input", "high", "low"]  # for the ResNet (32x32 input: high is 4x4)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _inputs(dtype=torch.float32, b=3):
    x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return x, torch.arange(b) % 5


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.device.type == DEV
    scale = max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_explain_equals_cpu(name, dtype):
    model = MODELS[name]().to(dtype)
    x, t = _inputs(dtype)
    names = srd_ext.Explainer(model).layer_names(x)
    layers = ["input", names[len(names) // 2], "low"]
    cpu = srd_ext.explain(model, x, target=t, layer=layers)
    gpu_model = copy.deepcopy(model).to(DEV)
    gpu = srd_ext.explain(gpu_model, x.to(DEV), target=t.to(DEV), layer=layers)
    for k in layers:
        _close(gpu[k], cpu[k], TOL[dtype])
    # the model stays where the user put it, with its own parameters
    for p, q in zip(model.parameters(), gpu_model.parameters()):
        assert q.device.type == DEV and torch.equal(p, q.cpu())
    budget = srd_ext.Explainer(gpu_model).relevance_budget(x.to(DEV), target=t)
    lhs, rhs = budget["input"] + budget["unassigned"], budget["encoder"]
    torch.testing.assert_close(lhs, rhs, rtol=10 * TOL[dtype], atol=10 * TOL[dtype] * rhs.abs().max().item())


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_explain_batch_invariant(name):
    model = MODELS[name]().to(DEV)
    x, t = _inputs(torch.float64, b=4)
    model = model.double()
    whole = srd_ext.explain(model, x.to(DEV), target=t)
    for i in range(4):
        one = srd_ext.explain(model, x[i : i + 1].to(DEV), target=t[i : i + 1])
        _close(one, whole[i : i + 1].cpu(), 1e-9)


def test_differentiable_map_equals_cpu():
    model = tiny_resnet(seed=2).double()
    x, t = _inputs(torch.float64, b=2)
    grads = []
    for dev in ("cpu", DEV):
        m = copy.deepcopy(model).to(dev)
        xi = x.to(dev).requires_grad_(True)
        maps = srd_ext.explain(m, xi, target=t, create_graph=True)
        (g,) = torch.autograd.grad((maps**2).sum(), xi)
        grads.append(g)
    _close(grads[1], grads[0], 1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_model(dtype):
    """A model converted to float16/bfloat16 is explained in that dtype, close to float32."""
    model = tiny_resnet(seed=2).to(DEV)
    x, t = _inputs()
    x = x.to(DEV)
    ref = srd_ext.explain(model, x, target=t)
    half = srd_ext.explain(copy.deepcopy(model).to(dtype), x.to(dtype), target=t)
    assert half.dtype == dtype and bool(torch.isfinite(half).all())
    a, b = half.float().flatten(1), ref.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert bool((corr > 0.9).all()), corr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast(dtype):
    """Under autocast the explanation runs in the model's dtype and equals the plain one."""
    model = tiny_resnet(seed=2).to(DEV)
    x, t = _inputs()
    x = x.to(DEV)
    plain = srd_ext.explain(model, x, target=t, layer=LAYERS)
    with torch.autocast(DEV, dtype=dtype):
        mixed = srd_ext.explain(model, x, target=t, layer=LAYERS)
    for k in LAYERS:
        assert mixed[k].dtype == torch.float32
        _close(mixed[k], plain[k].cpu(), 1e-6)
