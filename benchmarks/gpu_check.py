"""One command that builds, tests and measures srd_ext on a GPU machine (`make gpu-check`).

    python benchmarks/gpu_check.py [--out DIR] [--skip-build] [--skip-tests] [--budget-s S]
    python benchmarks/gpu_check.py --dry-run     # CPU, tiny inputs, no build and no tests

For a machine that already has a CUDA build of torch and no network:

1. builds the extension against that torch, `pip install --no-build-isolation --no-deps -e .`
   (no TORCH_CUDA_ARCH_LIST: setup.py lets torch target the visible GPU);
2. runs tests/test_cuda_ops.py and tests/test_cuda_explain.py, then the compute-sanitizer tests
   (memcheck, racecheck; they skip where compute-sanitizer is not installed);
3. measures ResNet-50 and VGG16 (torchvision's architectures, or the same ones defined here
   without torchvision; random weights with randomised biases and batch-norm statistics) at
   224x224, batch 1 and 32, float32 and bfloat16: the time and peak memory
   (torch.cuda.max_memory_allocated) of `srd_ext.Explainer(model).explain(x, layer="input")`
   against a forward pass plus the input gradient of the predicted logits, measured side by side
   (interleaved repeats, medians), ms per image, and the device time per op (torch.profiler);
4. runs both paths of the ops on CUDA, the compiled kernels and the composite path
   (srd_ext.composite, SRD_EXT_BACKEND=composite): the maps of ResNet-50 and VGG16 (float32,
   batch 1 and 32) from each, their largest difference, and their time and peak memory side by
   side;
5. writes gpu_check.json and gpu_check.md to $OUT when set (else --out, default results/gpu/),
   and the record srd_ext/gpu_record.json: the GPU, torch, the commit and a digest of csrc/, the
   results, and `passed` (build, CUDA tests, sanitizer tests and measurements without error, and
   the two paths' maps within PATHS_RTOL of each other). Committing a passing record is what makes
   SRD_EXT_BACKEND=auto run the CUDA kernels (srd_ext/backend.py); prints one summary line last.

The measurements of step 3 run the compiled kernels (SRD_EXT_BACKEND=kernels), whatever the
record says.

It is meant to finish within 8 minutes from a clean tree, build included: --budget-s (default
450) is shared out so that each step stops in time for the next (the tests leave about 200 s to
the sanitizer and the measurements, the sanitizer about 110 s to the measurements), and the
measurements still to do once it is spent are skipped. --dry-run runs the measurements on the CPU
at 64x64 with batch 1 and 2 (float32 only), without building or testing: everything but CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import cuda_peak_bytes, machine_info, sync, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
START = time.monotonic()

# Goals of the GPU run (issue "GPU: tap norms on tensor cores ..."): SRD-input time against a
# forward plus input gradient, per (model, batch) at float32, and peak memory.
# The two paths' maps on CUDA, float32: largest difference over the largest |map|. Looser than the
# CPU's 1e-5: the composite path's 1x1 convs run on cuDNN, whose float32 sums are ordered otherwise.
PATHS_RTOL = 1e-4
TIME_GOALS = {("resnet50", 32): 1.5, ("vgg16", 32): 1.6, ("resnet50", 1): 2.0, ("vgg16", 1): 2.0}
MEM_GOAL = 1.3


def elapsed() -> float:
    return time.monotonic() - START


def log(msg: str) -> None:
    print(f"[gpu-check {elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout, env=None):
    """Runs a command, streaming nothing; returns (returncode or None on timeout, output, seconds)."""
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {}))
        )
        return res.returncode, res.stdout + res.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out + f"\n(timed out after {timeout} s)", time.monotonic() - t0


# ------------------------------------------------------------------------------------------------
# 1. Build
# ------------------------------------------------------------------------------------------------
def build(timeout: int) -> dict:
    env = {"MAX_JOBS": os.environ.get("GPU_CHECK_JOBS", str(os.cpu_count() or 4))}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    log("building: " + " ".join(cmd[2:]))
    code, out, secs = run(cmd, timeout, env)
    method = "pip install -e"
    if code != 0 and ("No module named pip" in out or "No module named 'pip'" in out):
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        log("pip is missing; building with setup.py build_ext --inplace")
        code, out, secs = run(cmd, timeout, env)
        method = "setup.py build_ext --inplace"
    return {
        "ok": code == 0,
        "seconds": round(secs, 1),
        "method": method,
        "tail": out[-4000:] if code != 0 else out[-800:],
    }


# ------------------------------------------------------------------------------------------------
# 2. Tests
# ------------------------------------------------------------------------------------------------
def pytest_counts(out: str) -> dict:
    counts = {}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", out):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


CUDA_TESTS = ["tests/test_cuda_ops.py", "tests/test_cuda_explain.py"]


def run_tests(files: list, select: str, timeout: int) -> dict:
    # The CUDA tests check the compiled kernels (against the CPU): auto would run the composite path
    # on CUDA until a record passes.
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SRD_EXT_BACKEND": "kernels",
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        *files,
        "-k",
        select,
        "-p",
        "no:cacheprovider",
    ]
    log("testing: pytest " + " ".join(cmd[3:]))
    code, out, secs = run(cmd, timeout, env)
    if code is not None and "No module named pytest" in out:
        return {"ok": False, "seconds": round(secs, 1), "error": "pytest is not installed", "counts": {}}
    counts = pytest_counts(out.splitlines()[-1] if out.strip() else "")
    failures = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {
        "ok": code == 0,
        "returncode": code,
        "seconds": round(secs, 1),
        "counts": counts,
        "failures": failures[:50],
        "tail": out[-3000:],
    }


# ------------------------------------------------------------------------------------------------
# 3. Measurements
# ------------------------------------------------------------------------------------------------
def local_models():
    """ResNet-50 and VGG16 with torchvision's module structure, for machines without torchvision."""
    from torch import nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inp, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + idt)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inp, layers = 64, []
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                down = nn.Sequential(nn.Conv2d(inp, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
                mods = [Bottleneck(inp, planes, stride, down)]
                inp = planes * 4
                mods += [Bottleneck(inp, planes) for _ in range(blocks - 1)]
                layers.append(nn.Sequential(*mods))
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    class VGG16(nn.Module):
        def __init__(self):
            super().__init__()
            mods, inp = [], 3
            for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
                if v == "M":
                    mods.append(nn.MaxPool2d(2, 2))
                else:
                    mods += [nn.Conv2d(inp, v, 3, padding=1), nn.ReLU(inplace=True)]
                    inp = v
            self.features = nn.Sequential(*mods)
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(25088, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 1000),
            )

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)).flatten(1))

    return {"resnet50": ResNet50, "vgg16": VGG16}


def make_model(name: str, seed: int = 0):
    """The architecture with random weights, randomised biases and batch-norm statistics (so that
    the bias shares and the folded batch norms are not trivial), in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    try:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        source = f"torchvision {torchvision.__version__}"
    except ImportError:
        model = local_models()[name]()
        source = "local definition (torchvision not installed)"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 1.5, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return model.eval(), source


def op_split(fn, device, top: int = 12) -> list:
    """Per op: device time (ms) over one call, srd_ext ops inclusive of their nested calls, every
    other op by its own (self) time; the largest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)

    def dev_time(ev, self_time):
        keys = (
            ["self_device_time_total", "self_cuda_time_total"]
            if self_time
            else ["device_time_total", "cuda_time_total"]
        )
        if device.type != "cuda":
            keys = ["self_cpu_time_total"] if self_time else ["cpu_time_total"]
        for k in keys:
            v = getattr(ev, k, None)
            if v is not None:
                return v / 1e3
        return 0.0

    rows = []
    for ev in prof.key_averages():
        ours = ev.key.startswith("srd_ext::")
        ms = dev_time(ev, self_time=not ours)
        if ms > 0:
            rows.append({"op": ev.key, "ms": round(ms, 3), "calls": ev.count, "inclusive": ours})
    total = sum(r["ms"] for r in rows if not r["inclusive"])
    for r in rows:
        r["share"] = round(r["ms"] / total, 4) if total else None
    ours = sorted((r for r in rows if r["inclusive"]), key=lambda r: -r["ms"])
    rest = sorted((r for r in rows if not r["inclusive"]), key=lambda r: -r["ms"])[:top]
    return ours + rest


def measure(model_name, batch, dtype_name, device, size, repeats) -> dict:
    import torch

    import srd_ext

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    row = {"model": model_name, "batch": batch, "dtype": dtype_name, "size": size}
    model, row["model_source"] = make_model(model_name)
    model = model.to(device, dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def forward_input_grad():
        xx = x.detach().requires_grad_(True)
        out = model(xx)
        sel = out.gather(1, out.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(sel, xx)
        return g

    try:
        srd_ext.backend.set_backend("kernels")
        t0 = time.perf_counter()
        explainer = srd_ext.Explainer(model)
        maps = explainer.explain(x, layer="input")
        sync(device)
        row["first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        row["map_shape"] = list(maps.shape)
        row["map_finite"] = bool(torch.isfinite(maps.float()).all())
        del maps
        srd = lambda: explainer.explain(x, layer="input")  # noqa: E731
        t = time_interleaved({"baseline": forward_input_grad, "srd": srd}, device, repeats, min_seconds=0)
        row["baseline_ms"], row["srd_ms"] = round(t["baseline"], 3), round(t["srd"], 3)
        row["time_ratio"] = round(t["srd"] / t["baseline"], 3)
        row["srd_ms_per_image"] = round(t["srd"] / batch, 3)
        row["baseline_ms_per_image"] = round(t["baseline"] / batch, 3)
        pb, ps = cuda_peak_bytes(forward_input_grad, device), cuda_peak_bytes(srd, device)
        if pb is not None:
            row["baseline_peak_mb"], row["srd_peak_mb"] = round(pb / 2**20, 1), round(ps / 2**20, 1)
            row["mem_ratio"] = round(ps / max(pb, 1), 3)
        row["ops"] = op_split(srd, device)
        goal = TIME_GOALS.get((model_name, batch)) if dtype_name == "fp32" else None
        if goal is not None:
            row["time_goal"] = goal
            row["time_ok"] = row["time_ratio"] <= goal
        if "mem_ratio" in row:
            row["mem_goal"], row["mem_ok"] = MEM_GOAL, row["mem_ratio"] <= MEM_GOAL
    except Exception as e:  # noqa: BLE001  (a failing configuration is a result, not a crash)
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        model = x = None  # noqa: F841  (released before the cache is emptied)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def compare_paths(model_name, batch, device, size, repeats) -> dict:
    """The compiled kernels against the composite path: maps, time and peak memory of one
    ``explain(x, layer="input")`` (float32), side by side."""
    import torch

    import srd_ext
    from srd_ext import backend

    row = {"model": model_name, "batch": batch, "dtype": "fp32", "size": size}
    model, _ = make_model(model_name)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    explainer = srd_ext.Explainer(model)

    def run(path):
        def call():
            with backend.use_backend(path):
                return explainer.explain(x, layer="input")

        return call

    try:
        maps = {p: run(p)() for p in ("kernels", "composite")}
        diff = (maps["kernels"] - maps["composite"]).abs().max().item()
        scale = maps["kernels"].abs().max().item()
        row["max_abs"], row["max_rel"] = diff, diff / max(scale, 1e-30)
        row["maps_ok"] = bool(torch.isfinite(maps["composite"]).all()) and row["max_rel"] <= PATHS_RTOL
        del maps
        t = time_interleaved({p: run(p) for p in ("kernels", "composite")}, device, repeats, min_seconds=0)
        row["kernels_ms"], row["composite_ms"] = round(t["kernels"], 3), round(t["composite"], 3)
        row["time_ratio"] = round(t["composite"] / t["kernels"], 3)
        pk, pc = cuda_peak_bytes(run("kernels"), device), cuda_peak_bytes(run("composite"), device)
        if pk is not None:
            row["kernels_peak_mb"], row["composite_peak_mb"] = round(pk / 2**20, 1), round(pc / 2**20, 1)
            row["mem_ratio"] = round(pc / max(pk, 1), 3)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        model = x = explainer = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def gpu_record(doc) -> dict:
    """srd_ext/gpu_record.json: what this GPU run checked and whether it passed."""
    import datetime

    sys.path.insert(0, str(ROOT))
    from srd_ext import backend

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
        except OSError:
            return None

    m = doc.get("machine", {})
    checks = {
        "build": doc.get("build", {"ok": True})["ok"],
        "tests": doc.get("tests", {}).get("ok", False),
        "sanitizer": doc.get("sanitizer", {}).get("ok", False),
        "bench": bool(doc["bench"]) and all("error" not in r and "skipped" not in r for r in doc["bench"]),
        "paths": bool(doc["paths"]) and all(r.get("maps_ok") for r in doc["paths"]),
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "gpu": m.get("gpu"),
        "capability": m.get("capability"),
        "torch": m.get("torch"),
        "cuda": m.get("cuda"),
        "commit": git("rev-parse", "HEAD"),
        "csrc_tree": git("rev-parse", "HEAD:csrc"),
        "csrc_dirty": bool(git("status", "--porcelain", "--", "csrc")),
        "csrc_digest": backend.csrc_digest(ROOT / "csrc"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests": {k: doc[k].get("counts") for k in ("tests", "sanitizer") if k in doc},
        "paths": [
            {k: r.get(k) for k in ("model", "batch", "max_rel", "time_ratio", "mem_ratio", "error") if k in r}
            for r in doc["paths"]
        ],
        "paths_rtol": PATHS_RTOL,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def markdown(doc) -> str:
    m = doc["machine"]
    lines = [
        "# srd_ext GPU check",
        "",
        f"{m.get('gpu', m['device'])} (capability {m.get('capability', '-')}), torch {m['torch']}, "
        f"CUDA {m.get('cuda')}, cuDNN {m.get('cudnn', '-')}, TF32 conv {m.get('cudnn_allow_tf32', '-')} / "
        f"matmul {m.get('matmul_allow_tf32', '-')}; {doc['total_s']:.0f} s in all.",
        "",
    ]
    b, t = doc.get("build"), doc.get("tests")
    if b:
        lines.append(f"- build: {'ok' if b['ok'] else 'FAILED'} ({b['method']}, {b['seconds']} s)")
    for key, label in (("tests", "CUDA tests"), ("sanitizer", "compute-sanitizer tests")):
        t = doc.get(key)
        if t:
            c = t.get("counts", {})
            lines.append(
                f"- {label}: {'ok' if t['ok'] else 'FAILED'} ({', '.join(f'{v} {k}' for k, v in c.items())}; "
                f"{t['seconds']} s){' ' + t['error'] if t.get('error') else ''}"
            )
    lines += [
        "",
        "## SRD-input against a forward pass plus the input gradient",
        "",
        f'`srd_ext.Explainer(model).explain(x, layer="input")`, {doc["size"]}x{doc["size"]}; medians '
        "of interleaved repeats; peak = max_memory_allocated above the inputs.",
        "",
        "| model | batch | dtype | fwd+grad ms | SRD ms | **SRD / fwd+grad** | goal | SRD ms/image "
        "| peak fwd+grad MB | peak SRD MB | **mem ratio** (<= 1.3) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in doc["bench"]:
        if "error" in r or "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['dtype']} | {r.get('error') or r.get('skipped')} | | | | | | | |"
            )
            continue
        goal = f"<= {r['time_goal']} {'ok' if r['time_ok'] else 'MISS'}" if "time_goal" in r else "-"
        mem = f"**{r['mem_ratio']:.2f}** {'ok' if r['mem_ok'] else 'MISS'}" if "mem_ratio" in r else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['baseline_ms']:.2f} | {r['srd_ms']:.2f} "
            f"| **{r['time_ratio']:.2f}** | {goal} | {r['srd_ms_per_image']:.2f} "
            f"| {_fmt(r.get('baseline_peak_mb'), '.0f')} | {_fmt(r.get('srd_peak_mb'), '.0f')} | {mem} |"
        )
    if doc.get("paths"):
        lines += [
            "",
            "## Compiled kernels against the composite path",
            "",
            f'`explain(x, layer="input")`, float32; maps compared (max |diff| / max |map| <= {PATHS_RTOL}), '
            "time and peak memory side by side.",
            "",
            "| model | batch | max abs | max rel | kernels ms | composite ms | **time ratio** "
            "| kernels MB | composite MB | **mem ratio** |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in doc["paths"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['kernels_ms']:.2f} "
                f"| {r['composite_ms']:.2f} | **{r['time_ratio']:.2f}** | {_fmt(r.get('kernels_peak_mb'), '.0f')} "
                f"| {_fmt(r.get('composite_peak_mb'), '.0f')} | {_fmt(r.get('mem_ratio'))} |"
            )
    if "record" in doc:
        rec = doc["record"]
        lines += ["", f"Record: passed = {rec['passed']} ({rec['checks']}), csrc digest {rec['csrc_digest']}."]
    lines += [
        "",
        "## Time per op in one SRD call",
        "",
        "srd_ext ops with their nested calls (inclusive), then the largest other ops by their own time; "
        "share = of the summed self times.",
        "",
    ]
    for r in doc["bench"]:
        if not r.get("ops"):
            continue
        lines += [
            f"**{r['model']}, batch {r['batch']}, {r['dtype']}**",
            "",
            "| op | calls | ms | share |",
            "|---|---:|---:|---:|",
        ]
        for o in r["ops"]:
            share = "(incl.)" if o["inclusive"] else _fmt(o["share"] and 100 * o["share"], ".1f") + "%"
            lines.append(f"| {o['op']} | {o['calls']} | {o['ms']:.3f} | {share} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def summary_line(doc, out_dir) -> str:
    parts = []
    b = doc.get("build")
    if b:
        parts.append(f"build {'ok' if b['ok'] else 'FAILED'} ({b['seconds']:.0f} s)")
    for key, label in (("tests", "tests"), ("sanitizer", "sanitizer")):
        t = doc.get(key)
        if t:
            c = t.get("counts", {})
            parts.append(
                f"{label} {'ok' if t['ok'] else 'FAILED'} ({c.get('passed', 0)} passed, "
                f"{c.get('failed', 0) + c.get('errors', 0)} failed, {c.get('skipped', 0)} skipped)"
            )
    ratios = []
    for r in doc["bench"]:
        if "time_ratio" in r:
            mem = f", mem {r['mem_ratio']:.2f}x" if "mem_ratio" in r else ""
            ratios.append(f"{r['model']} b{r['batch']} {r['dtype']} {r['time_ratio']:.2f}x{mem}")
        else:
            ratios.append(f"{r['model']} b{r['batch']} {r['dtype']} {'skipped' if 'skipped' in r else 'ERROR'}")
    parts.append("SRD/fwd+grad: " + "; ".join(ratios))
    paths = [
        f"{r['model']} b{r['batch']} rel {r['max_rel']:.1e} time {r['time_ratio']:.2f}x"
        if "time_ratio" in r
        else f"{r['model']} b{r['batch']} ERROR"
        for r in doc.get("paths", [])
    ]
    if paths:
        parts.append("composite/kernels: " + "; ".join(paths))
    if "record" in doc:
        parts.append(f"record passed={doc['record']['passed']}")
    return f"gpu-check: {' | '.join(parts)} | {doc['total_s']:.0f} s | {out_dir}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else results/gpu)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, 64x64, batch 1 and 2, float32; no build, no tests")
    ap.add_argument("--budget-s", type=float, default=450, help="time for everything, build included")
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--batches", default=None, help="default 1,32 (dry run: 1,2)")
    ap.add_argument("--dtypes", default=None, help="default fp32,bf16 (dry run: fp32)")
    ap.add_argument("--size", type=int, default=None, help="default 224 (dry run: 64)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "results" / "gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.skip_build = args.skip_tests = True
    sys.path.insert(0, str(ROOT))

    doc = {"dry_run": args.dry_run}
    if not args.skip_build:
        doc["build"] = build(timeout=max(60, int(args.budget_s * 0.5)))
        if not doc["build"]["ok"]:
            log("build failed:\n" + doc["build"]["tail"])
    build_ok = doc.get("build", {"ok": True})["ok"]

    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device is visible: nothing to check (use --dry-run for the CPU path)")
        doc.update(
            machine=machine_info(torch.device("cpu")), bench=[], size=None, total_s=elapsed(), error="no CUDA device"
        )
        _write(doc, out_dir)
        print(summary_line(doc, out_dir) + " | no CUDA device")
        return 1

    if not args.skip_tests and build_ok:
        doc["tests"] = run_tests(
            CUDA_TESTS, "not compute_sanitizer", timeout=max(60, int(args.budget_s - 200 - elapsed()))
        )
        doc["sanitizer"] = run_tests(
            CUDA_TESTS[:1], "compute_sanitizer", timeout=max(60, int(args.budget_s - 110 - elapsed()))
        )

    doc["machine"] = machine_info(device)
    size = args.size or (64 if args.dry_run else 224)
    batches = [int(b) for b in (args.batches or ("1,2" if args.dry_run else "1,32")).split(",")]
    dtypes = (args.dtypes or ("fp32" if args.dry_run else "fp32,bf16")).split(",")
    doc["size"], doc["bench"] = size, []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if build_ok:
        for model_name in args.models.split(","):
            for dtype_name in dtypes:
                for batch in batches:
                    if elapsed() > args.budget_s:
                        doc["bench"].append(
                            {
                                "model": model_name,
                                "batch": batch,
                                "dtype": dtype_name,
                                "skipped": f"time budget of {args.budget_s:.0f} s spent",
                            }
                        )
                        continue
                    log(f"measuring {model_name}, batch {batch}, {dtype_name}")
                    row = measure(model_name, batch, dtype_name, device, size, repeats=10 if batch == 1 else 5)
                    doc["bench"].append(row)
                    log("  " + (row.get("error") or f"SRD/fwd+grad {row['time_ratio']:.2f}x"))
    doc["paths"] = []
    if build_ok:
        for model_name in args.models.split(","):
            for batch in batches:
                if elapsed() > args.budget_s + 120:
                    doc["paths"].append({"model": model_name, "batch": batch, "error": "time budget spent"})
                    continue
                log(f"comparing the two paths: {model_name}, batch {batch}")
                row = compare_paths(model_name, batch, device, size, repeats=5 if batch == 1 else 3)
                doc["paths"].append(row)
                log(
                    "  "
                    + (row.get("error") or f"max rel {row['max_rel']:.1e}, composite/kernels {row['time_ratio']:.2f}x")
                )
    if device.type == "cuda":
        doc["record"] = gpu_record(doc)
        record_text = json.dumps(doc["record"], indent=2) + "\n"
        (ROOT / "srd_ext" / "gpu_record.json").write_text(record_text)
        (out_dir / "gpu_record.json").write_text(record_text)
        log(f"wrote srd_ext/gpu_record.json (passed={doc['record']['passed']}); commit it to make it count")
    doc["total_s"] = round(elapsed(), 1)
    _write(doc, out_dir)
    line = summary_line(doc, out_dir)
    ok = (
        build_ok
        and all(doc.get(k, {"ok": True})["ok"] for k in ("tests", "sanitizer"))
        and all("error" not in r for r in doc["bench"])
        and all("error" not in r and r.get("maps_ok", True) for r in doc["paths"])
    )
    print(line)
    return 0 if ok else 1


def _write(doc, out_dir: Path) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    if "machine" in doc and "bench" in doc and doc.get("size"):
        (out_dir / "gpu_check.md").write_text(markdown(doc))
    log(f"wrote {out_dir / 'gpu_check.json'}")


if __name__ == "__main__":
    sys.exit(main())
