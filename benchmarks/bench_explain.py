"""Cost of an SRD explanation against a plain gradient (forward + input-gradient backward).

ResNet-50 and VGG16 (torchvision, random weights: cost does not depend on training) at 224x224:
SRD-input, SRD-high and SRD-low against forward+backward, timed in the same run with interleaved
repeats (median), and peak memory of each, measured in a fresh subprocess per (model, method)
(peak RSS increase on CPU, torch.cuda.max_memory_allocated on GPU). Also the slow literal
reference (tests/reference.py) against the fast path on one small case.

Prints JSON and a markdown table and writes both under --out.
Targets: SRD-input <= 2.5x forward+backward on CPU (batch 4), <= 2.0x on GPU (batch 32);
peak memory <= 2x forward+backward.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from peak_memory import CHILD_ENV, peak_growth

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("grad", "srd-input", "srd-high", "srd-low")


def build(name: str, device: str) -> torch.nn.Module:
    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def make_runner(model, method: str, x: torch.Tensor):
    import srd_ext

    if method == "grad":
        def run():
            xi = x.detach().requires_grad_(True)
            logits = model(xi)
            idx = logits.argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), xi)
            return g * xi
        return run
    ex = srd_ext.Explainer(model)
    layer = method.split("-")[1]

    def run():
        with torch.no_grad():
            return ex.explain(x, layer=layer)
    return run


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(name, device, batch, repeats):
    model = build(name, device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    runners = {m: make_runner(model, m, x) for m in METHODS}
    for r in runners.values():  # warm-up
        r()
    sync(device)
    times = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m, r in runners.items():
            sync(device)
            t0 = time.perf_counter()
            r()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def peak_memory_child(name, method, device, batch):
    """Runs in a subprocess: peak memory of one call, in MiB."""
    model = build(name, device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    run = make_runner(model, method, x)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    small = torch.randn(1, 3, 64, 64, device=device)
    make_runner(model, method, small)()  # libraries, thread pools and first-call caches
    peak, _ = peak_growth(run)
    return peak / 2 ** 20


def peak_memory(name, method, device, batch):
    out = subprocess.run([sys.executable, __file__, "--child", name, method, device, str(batch)],
                         capture_output=True, text=True, check=True, env=CHILD_ENV)
    return float(out.stdout.strip().splitlines()[-1])


def reference_case():
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import srd_ext
    from models_for_tests import tiny_vgg
    from reference import ReferenceSRD

    model = tiny_vgg(seed=1).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ex = srd_ext.Explainer(model)
    t0 = time.perf_counter()
    fast = ex.relevance_at_all_layers(x)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ReferenceSRD(model, x)
    r = ref.run(ex.encoder_index, fast[ex.plan.steps[ex.encoder_index].name][0])
    t_ref = time.perf_counter() - t0
    err = float((fast["x"][0] - r[ex.plan.input_index]).abs().max() / r[ex.plan.input_index].abs().max())
    return {"case": "tiny VGG, 16x16, float64", "fast_s": t_fast, "reference_s": t_ref,
            "speedup": t_ref / t_fast, "max_rel_err": err}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, method, device, batch = sys.argv[2:6]
        print(peak_memory_child(name, method, device, int(batch)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default="results/bench_explain")
    args = ap.parse_args()
    batch = args.batch or (32 if args.device == "cuda" else 4)
    torch.manual_seed(0)
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "batch": batch, "results": []}
    for name in args.models:
        t = time_methods(name, args.device, batch, args.repeats)
        row = {"model": name, "time_s": t, "ratio_to_grad": {m: t[m] / t["grad"] for m in METHODS}}
        if not args.no_memory:
            mem = {m: peak_memory(name, m, args.device, batch) for m in METHODS}
            row["peak_mib"] = mem
            row["memory_ratio_to_grad"] = {m: mem[m] / mem["grad"] for m in METHODS}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    report["reference"] = reference_case()
    lines = [f"device: {report['device']}, torch {report['torch']}, threads {report['threads']}, batch {batch}", "",
             "| model | method | time (s) | x forward+backward | peak MiB | x forward+backward memory |",
             "|---|---|---|---|---|---|"]
    for row in report["results"]:
        for m in METHODS:
            mem = row.get("peak_mib", {}).get(m)
            mr = row.get("memory_ratio_to_grad", {}).get(m)
            lines.append(f"| {row['model']} | {m} | {row['time_s'][m]:.3f} | {row['ratio_to_grad'][m]:.2f} | "
                         f"{'' if mem is None else f'{mem:.0f}'} | {'' if mr is None else f'{mr:.2f}'} |")
    ref = report["reference"]
    lines += ["", f"reference ({ref['case']}): fast {ref['fast_s']:.4f} s, literal {ref['reference_s']:.2f} s "
              f"({ref['speedup']:.0f}x), max relative difference {ref['max_rel_err']:.1e}"]
    table = "\n".join(lines)
    print(json.dumps(report, indent=1))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bench_explain_{args.device}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, f"bench_explain_{args.device}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
