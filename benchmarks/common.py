"""What the benchmark scripts share: building the model they run on, timing and peak memory on a
device, and the report of the environment a measurement was taken in.

srd_ext is imported on first use only: benchmarks/gpu_check.py imports this module before it has
built the extension."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn


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
    import srd_ext

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


def machine_info(device=None) -> Dict[str, object]:
    """The machine a measurement was taken on: versions, CPU, memory, threads, load, the srd_ext
    build (or why it cannot be imported), and the GPU: ``device``'s where that is a CUDA device,
    else, without ``device``, the first visible one."""
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    if device is not None:
        info["device"] = str(device)
    try:
        import srd_ext

        info["srd_ext"] = srd_ext.__file__
        info["cuda_kernels_built"] = srd_ext.ops.cuda_kernels_built()
    except Exception as e:  # noqa: BLE001  (a build that does not load is part of the report)
        info["srd_ext_import_error"] = f"{type(e).__name__}: {e}"
    else:
        try:
            info["tap_norms_cpu_kernel"] = srd_ext.ops.tap_norms_cpu_kernel()
        except AttributeError:  # a build from before the fused kernel
            pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = torch.device(device) if device is not None else torch.device("cuda", 0) if torch.cuda.is_available() else None
    if gpu is not None and gpu.type == "cuda":
        p = torch.cuda.get_device_properties(gpu)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def sync(device) -> None:
    """Waits for the work queued on ``device`` (a torch.device or its name); nothing to wait for on
    the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, repeats: int, warmup: int = 2, min_seconds: float = 1.0) -> dict:
    """Median milliseconds of each callable. Rounds call every callable once, rotating the order so
    that drifts in clock or load hit all of them alike; at least `repeats` rounds, and more (up to
    10x) while the case has run for less than `min_seconds`, so fast cases get more samples
    (`min_seconds=0`: exactly `repeats`). Also "min" (the fastest sample of each) and "samples" (the
    number of rounds)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start < min_seconds and r < 10 * repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    med = {name: statistics.median(v) for name, v in samples.items()}
    med["min"] = {name: min(v) for name, v in samples.items()}  # kept in the JSON, for noisy hosts
    med["samples"] = r
    return med


def cuda_peak_bytes(fn, device) -> Optional[int]:
    """Peak memory of one call of ``fn`` above what was allocated before it (CUDA only: None on
    another device). ``fn``'s result is held until the peak is read."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak
