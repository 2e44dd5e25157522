"""Smoke test of an installed srd_ext, run from outside the source tree by check_install.sh.

Checks that the package imported is the installed one, that a plain import loads neither
torchvision nor the optional submodules, that the compiled operators run, that an explanation of
a small CNN conserves its relevance, and that the shipped weights are in the package.
Usage: python smoke.py EXPECTED_TORCH_VERSION
"""

import importlib.metadata
import importlib.resources
import os
import sys

import torch
import torch.nn as nn

import srd_ext

expected_torch = sys.argv[1]
assert torch.__version__ == expected_torch, f"torch is {torch.__version__}, expected {expected_torch}"
here = os.path.realpath(os.getcwd())
assert "site-packages" in srd_ext.__file__, f"imported srd_ext from {srd_ext.__file__}, not an installed copy"
assert srd_ext.__version__ == importlib.metadata.version("srd_ext"), "version differs from the metadata"
for name in ("torchvision", "srd_ext.models", "srd_ext.baselines", "srd_ext.metrics", "matplotlib"):
    assert name not in sys.modules, f"import srd_ext loaded {name}"

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, 5),
).eval()
x = torch.randn(3, 3, 16, 16)
maps = srd_ext.explain(model, x, layer=["input", "low"])
assert maps["input"].shape == (3, 16, 16) and maps["low"].shape == (3, 8, 8), {k: v.shape for k, v in maps.items()}
budget = srd_ext.Explainer(model).relevance_budget(x)
torch.testing.assert_close(budget["encoder"], budget["input"] + budget["unassigned"], rtol=1e-4, atol=1e-6)
assert bool((budget["encoder"] > 0).any()), "no relevance at the encoder output"
print("cuda kernels built:", srd_ext.ops.cuda_kernels_built())

files = importlib.resources.files("srd_ext") / "weights"
for name in ("shapes-vgg.pt", "shapes-resnet.pt"):
    with importlib.resources.as_file(files / name) as path:
        state = torch.load(path, weights_only=True, map_location="cpu")
    assert isinstance(state, dict) and state, f"{name}: not a state_dict"
dist = importlib.metadata.distribution("srd_ext")
assert any(str(f).endswith("LICENSE") for f in dist.files or ()), "LICENSE missing from the installed metadata"

try:
    import torchvision  # noqa: F401
except ImportError:
    try:
        _ = srd_ext.models
    except ImportError as e:
        assert "torchvision" in str(e), e
    else:
        raise AssertionError("srd_ext.models imported without torchvision")
print(f"smoke test passed: srd_ext {srd_ext.__version__}, torch {torch.__version__}, {srd_ext.__file__}")
