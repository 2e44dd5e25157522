"""Cost of an SRD explanation, called the way users call it, against a plain gradient.

Each model (torchvision, random weights with randomised biases and BatchNorm statistics, so that
every bias share is computed as for a trained model) is explained at 224x224 with
``srd_ext.explain(model, x, layer=...)`` in grad mode, as in a notebook (the model's parameters
require grad). Against it, in the same run with interleaved repeats (median):

- ``grad``: forward plus input-gradient backward (``torch.autograd.grad`` of the target logit);
- ``lrp``: zennit's LRP with the EpsilonPlusFlat composite (the peer users would otherwise pick;
  skipped when zennit is not installed).

Peak memory of one call is measured in a fresh subprocess per (model, batch, method): resident
memory growth on CPU, ``torch.cuda.max_memory_allocated`` on GPU. The first call of
``srd_ext.explain`` captures the model (cached for later calls); the capture is timed separately.

``--backend`` runs SRD on that backend (srd_ext.backend: auto, kernels, composite); ``compare``
runs every SRD method twice in the same interleaved repeats, ``srd-*:kernels`` (the compiled
kernels) and ``srd-*:composite`` (the composite path, ATen ops only), and reports the composite
path's time and peak memory over the kernels'.

Prints JSON and a markdown table, writes both and a plot of cost against batch size under --out.
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

from common import cuda_peak_bytes, sync
from peak_memory import CHILD_ENV, peak_growth

METHODS = ("grad", "srd-input", "srd-high", "srd-low", "lrp")


def build(name: str, device: str) -> torch.nn.Module:
    from srd_ext.zoo import randomize

    torch.manual_seed(0)
    return randomize(getattr(torchvision.models, name)(weights=None), 0).to(device)


def have_zennit() -> bool:
    try:
        import zennit  # noqa: F401

        return True
    except ImportError:
        return False


def make_runner(model, method: str, x: torch.Tensor):
    """A no-argument function doing one explanation of ``x`` the way a user would."""
    import srd_ext

    if method == "grad":

        def run():
            xi = x.detach().requires_grad_(True)
            logits = model(xi)
            idx = logits.argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), xi)
            return g * xi

        return run
    if method == "lrp":
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat

        def run():
            xi = x.detach().requires_grad_(True)
            with Gradient(model=model, composite=EpsilonPlusFlat()) as attributor:
                logits = model(xi)
                onehot = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(x.dtype)
                _, rel = attributor(xi, onehot)
            return rel.sum(1)

        return run
    method, _, path = method.partition(":")
    layer = method.split("-")[1]
    if path:

        def run():
            with srd_ext.backend.use_backend(path):
                return srd_ext.explain(model, x, layer=layer)

        return run
    return lambda: srd_ext.explain(model, x, layer=layer)


def time_methods(name, device, batch, repeats, methods):
    import srd_ext

    model = build(name, device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    t0 = time.perf_counter()
    srd_ext.Explainer(model).prepare(x)
    capture_s = time.perf_counter() - t0
    runners = {m: make_runner(model, m, x) for m in methods}
    for r in runners.values():  # warm-up
        r()
    sync(device)
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m, r in runners.items():
            sync(device)
            t0 = time.perf_counter()
            r()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}, capture_s


def peak_memory_child(name, method, device, batch):
    """Runs in a subprocess: peak memory of one call, in MiB."""
    model = build(name, device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    run = make_runner(model, method, x)
    make_runner(model, method, torch.randn(1, 3, 224, 224, device=device))()  # capture, caches
    if device == "cuda":
        return cuda_peak_bytes(run, device) / 2**20
    peak, _ = peak_growth(run)
    return peak / 2**20


def peak_memory(name, method, device, batch):
    import srd_ext

    out = subprocess.run(
        [sys.executable, __file__, "--child", name, method, device, str(batch)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(CHILD_ENV, SRD_EXT_BACKEND=srd_ext.backend.get_backend()),
    )
    return float(out.stdout.strip().splitlines()[-1])


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in report["results"]}, key=[r["model"] for r in report["results"]].index)
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    for col, name in enumerate(models):
        rows = [r for r in report["results"] if r["model"] == name]
        batches = [r["batch"] for r in rows]
        for m in report["methods"]:
            if m == "grad":
                continue
            axes[0][col].plot(batches, [r["ratio_to_grad"][m] for r in rows], marker="o", label=m)
            if all("memory_ratio_to_grad" in r for r in rows):
                axes[1][col].plot(batches, [r["memory_ratio_to_grad"][m] for r in rows], marker="o", label=m)
        for row, what in ((0, "time"), (1, "peak memory")):
            ax = axes[row][col]
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel(f"{what} / (forward + input gradient)")
            ax.set_title(f"{name}: {what}")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(
        f"cost of one explanation against a gradient ({report['device']}, {report['threads']} threads, 224x224)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, method, device, batch = sys.argv[2:6]
        print(peak_memory_child(name, method, device, int(batch)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "efficientnet_b0"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--backend", default="auto", choices=["auto", "kernels", "composite", "compare"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default="results/bench_explain")
    args = ap.parse_args()
    import srd_ext

    methods = [m for m in args.methods if m != "lrp" or have_zennit()]
    if "grad" not in methods:
        methods.insert(0, "grad")
    if args.backend == "compare":
        methods = [v for m in methods for v in ((m + ":kernels", m + ":composite") if m.startswith("srd") else (m,))]
    else:
        srd_ext.backend.set_backend(args.backend)
    report = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "methods": methods,
        "backend": args.backend,
        "results": [],
    }
    for name in args.models:
        for batch in args.batches:
            t, capture_s = time_methods(name, args.device, batch, args.repeats, methods)
            row = {
                "model": name,
                "batch": batch,
                "time_s": t,
                "capture_s": capture_s,
                "ratio_to_grad": {m: t[m] / t["grad"] for m in methods},
            }
            if not args.no_memory:
                mem = {m: peak_memory(name, m, args.device, batch) for m in methods}
                row["peak_mib"] = mem
                row["memory_ratio_to_grad"] = {m: mem[m] / mem["grad"] for m in methods}
            if args.backend == "compare":
                row["composite_over_kernels"] = {
                    m[: -len(":kernels")]: {
                        "time": t[m.replace(":kernels", ":composite")] / t[m],
                        **(
                            {"peak_memory": mem[m.replace(":kernels", ":composite")] / mem[m]}
                            if not args.no_memory
                            else {}
                        ),
                    }
                    for m in methods
                    if m.endswith(":kernels")
                }
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"device: {report['device']}, torch {report['torch']}, {report['threads']} threads, 224x224",
        "",
        "| model | batch | method | time / (fwd+grad) | peak memory / (fwd+grad) |",
        "|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for m in methods:
            if m == "grad":
                continue
            mr = row.get("memory_ratio_to_grad", {}).get(m)
            lines.append(
                f"| {row['model']} | {row['batch']} | {m} | {row['ratio_to_grad'][m]:.2f} | "
                f"{'' if mr is None else f'{mr:.2f}'} |"
            )
    if args.backend == "compare":
        lines += ["", "| model | batch | method | composite / kernels: time | peak memory |", "|---|---|---|---|---|"]
        for row in report["results"]:
            for m, v in row["composite_over_kernels"].items():
                pm = v.get("peak_memory")
                lines.append(
                    f"| {row['model']} | {row['batch']} | {m} | {v['time']:.2f} | {'' if pm is None else f'{pm:.2f}'} |"
                )
    table = "\n".join(lines)
    print(json.dumps(report, indent=1))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bench_explain_{args.device}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, f"bench_explain_{args.device}.md"), "w") as f:
        f.write(table + "\n")
    plot(report, os.path.join(args.out, f"bench_explain_{args.device}.png"))


if __name__ == "__main__":
    main()
