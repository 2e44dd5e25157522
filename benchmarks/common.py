"""What the benchmark and example scripts share: building the model they run on and the report of
the environment a measurement was taken in."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Dict, Iterable

import torch
import torch.nn as nn

import srd_ext


def build_model(name: str, weights=None, device="cpu", random_init: bool = False, seed: int = 0) -> nn.Module:
    """The model ``name`` in eval mode on ``device``: with its weights (``srd_ext.models.load_model``:
    the shipped ones for the shapes models, ``weights`` otherwise), or with random weights drawn
    after ``torch.manual_seed(seed)`` (``random_init``: smoke tests, whose numbers mean nothing)."""
    from srd_ext import models

    if not random_init:
        return models.load_model(name, weights, device=device)
    torch.manual_seed(seed)
    builders = {"shapes-vgg": models.shapes_vgg, "shapes-resnet": models.shapes_resnet}
    if name in builders:
        model = builders[name]()
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown model {name!r}: one of {models.SHAPES_MODELS} or a torchvision classifier")
        model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def versions(packages: Iterable[str] = ("torchvision", "numpy", "captum", "grad-cam")) -> Dict[str, str]:
    """Python, platform, srd_ext and torch versions, and those of ``packages`` ("not installed")."""
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "srd_ext": srd_ext.__version__,
        "torch": torch.__version__,
    }
    for dist in packages:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine_info() -> Dict[str, object]:
    """The machine a timing was taken on: versions, CPU, memory, threads, load, GPU."""
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        from srd_ext import ops

        info["tap_norms_cpu_kernel"] = ops.tap_norms_cpu_kernel()
    except (ImportError, AttributeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info
