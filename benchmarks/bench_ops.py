"""Fused srd_ext operators against the unfused PyTorch compositions that compute the same thing.

    python benchmarks/bench_ops.py [--quick] [--repeats N] [--threads N] [--out results/bench_ops] [--no-cuda]

Runs on the CPU always and on CUDA when a device and the CUDA kernels are present. Every op and
its composition are timed in the same run with interleaved repeats (median of at least N). For
conv_tap_norms it also times one F.conv2d of the same layer (target: tap norms <= 2x conv) and
measures the peak memory of tap norms against the composition that materializes every per-tap
product (target: <= 1/4). On the CPU peak memory is the peak-RSS growth of a fresh subprocess
that runs the call once (torch's CPU allocations are invisible to tracemalloc: VmHWM after a
reset of it, or ru_maxrss where that is not possible); on CUDA it is
torch.cuda.max_memory_allocated above the memory already allocated.

Prints a JSON document and markdown tables, and writes both (bench_ops.json, bench_ops.md) to --out.
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
from pathlib import Path

import torch
import torch.nn.functional as F

from srd_ext import ops

from common import machine_info
from peak_memory import CHILD_ENV, peak_growth

# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------
# (name, C_in, C_out, H, W, k, stride, padding): layers of ResNet-50 / VGG16 at 224x224.
LAYERS = [
    ("r50.layer1 3x3 64->64 @56", 64, 64, 56, 56, 3, 1, 1),
    ("r50.layer2 3x3 128->128 @28", 128, 128, 28, 28, 3, 1, 1),
    ("r50.layer2.0 3x3 s2 128->128 @56", 128, 128, 56, 56, 3, 2, 1),
    ("r50.layer1 1x1 256->64 @56", 256, 64, 56, 56, 1, 1, 0),
    ("r50.stem 7x7 s2 3->64 @224", 3, 64, 224, 224, 7, 2, 3),
]
VGG_LAYERS = [("vgg16.conv3 3x3 256->256 @56", 256, 256, 56, 56, 3, 1, 1)]
QUICK_LAYERS = [
    ("3x3 32->32 @28", 32, 32, 28, 28, 3, 1, 1),
    ("3x3 s2 32->32 @28", 32, 32, 28, 28, 3, 2, 1),
    ("1x1 64->32 @28", 64, 32, 28, 28, 1, 1, 0),
    ("stem 7x7 s2 3->16 @64", 3, 16, 64, 64, 7, 2, 3),
]


def out_size(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# ------------------------------------------------------------------------------------------------
# Unfused compositions
# ------------------------------------------------------------------------------------------------
def activation_share_unfused(a, grad, z):
    rel = (a * grad).sum(1)
    n2 = (z * z).sum(1, keepdim=True)
    g = torch.where(n2 > 0, z * rel.unsqueeze(1) / n2, torch.zeros((), dtype=z.dtype, device=z.device))
    return rel, g


def _tap_slices(H, W, Ho, Wo, kh, kw, s, p, d):
    """Per tap: (t, output slice, input slice) of the (output, input) pairs inside the image."""
    def axis(n_in, n_out, k):
        lo = max(0, -(-(p - k * d) // s))  # first output whose input is >= 0
        hi = min(n_out, (n_in - 1 + p - k * d) // s + 1)
        return (lo, hi, lo * s - p + k * d) if hi > lo else None

    out = []
    for ty in range(kh):
        for tx in range(kw):
            ry, rx = axis(H, Ho, ty), axis(W, Wo, tx)
            if ry and rx:
                o_sl = (slice(ry[0], ry[1]), slice(rx[0], rx[1]))
                i_sl = (slice(ry[2], ry[2] + (ry[1] - ry[0] - 1) * s + 1, s),
                        slice(rx[2], rx[2] + (rx[1] - rx[0] - 1) * s + 1, s))
                out.append((ty * kw + tx, o_sl, i_sl))
    return out


def tap_norms_materialized(x, w, s, p, taps):
    """Every per-tap product W_t x_i as one (B, kh*kw, C_out, L) tensor, then its norms."""
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    T = kh * kw
    Ho, Wo = out_size(H, kh, s, p), out_size(W, kw, s, p)
    cols = F.unfold(x, (kh, kw), padding=p, stride=s).view(B, C, T, Ho * Wo)
    y = torch.matmul(w.reshape(O, C, T).permute(2, 0, 1), cols.transpose(1, 2))  # (B, T, O, L)
    norms = torch.linalg.vector_norm(y, dim=2).view(B, T, Ho, Wo)
    out = x.new_zeros(B, T, H, W)
    for t, o_sl, i_sl in taps:
        out[:, t, i_sl[0], i_sl[1]] = norms[:, t, o_sl[0], o_sl[1]]
    return out


def bias_share_scatter_unfold_fold(n, d, k, s, p):
    B, T, H, W = n.shape
    L = d.shape[1] * d.shape[2]
    # Tap t of output j reads channel t of n at i(j, t): the diagonal of the unfolded taps.
    nd = F.unfold(n.reshape(B * T, 1, H, W), k, padding=p, stride=s).view(B, T, T, L).diagonal(dim1=1, dim2=2)
    S = nd.sum(-1)
    c = torch.where(S > 0, d.reshape(B, L) / S, torch.zeros((), dtype=d.dtype, device=d.device))
    return F.fold((nd * c.unsqueeze(-1)).transpose(1, 2), (H, W), k, padding=p, stride=s).view(B, H, W)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, repeats: int, warmup: int = 2, min_seconds: float = 1.0) -> dict:
    """Median milliseconds of each callable. Rounds call every callable once, rotating the order so
    that drifts in clock or load hit all of them alike; at least `repeats` rounds, and more (up to
    10x) while the case has run for less than `min_seconds`, so fast cases get more samples."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start < min_seconds and r < 10 * repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    med = {name: statistics.median(v) for name, v in samples.items()}
    med["min"] = {name: min(v) for name, v in samples.items()}  # kept in the JSON, for noisy hosts
    med["samples"] = r
    return med


def max_rel_diff(a, b):
    a, b = (t if isinstance(t, tuple) else (t,) for t in (a, b))
    worst = 0.0
    for x, y in zip(a, b):
        scale = y.abs().max().item() if y.numel() else 0.0
        worst = max(worst, (x.double() - y.double()).abs().max().item() / max(scale, 1e-30))
    return worst


# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------
def layer_inputs(layer, batch, device, seed=0):
    _, cin, cout, H, W, k, s, p = layer
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, H, W, generator=g).to(device)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device)
    return x, w


def peak_fns(layer, x, w):
    _, _, _, H, W, k, s, p = layer
    taps = _tap_slices(H, W, out_size(H, k, s, p), out_size(W, k, s, p), k, k, s, p, 1)
    return {
        "tap_norms": lambda: ops.conv_tap_norms(x, w, s, p),
        "materialized": lambda: tap_norms_materialized(x, w, s, p, taps),
        "conv2d": lambda: F.conv2d(x, w, None, s, p),
    }


def _peak_child(spec: str) -> None:
    """Subprocess body: peak resident-memory growth (bytes) over one call, printed as JSON."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    layer = tuple(args["layer"])
    small = (layer[0], layer[1], layer[2], 16, 16, layer[5], layer[6], layer[7])
    with torch.no_grad():
        peak_fns(small, *layer_inputs(small, 1, "cpu"))[args["fn"]]()  # load libraries, thread pools
        x, w = layer_inputs(layer, args["batch"], "cpu")
        peak, out = peak_growth(peak_fns(layer, x, w)[args["fn"]])
    print(json.dumps({"peak_bytes": peak, "out_bytes": out.numel() * out.element_size()}))


def peak_cpu(fn_name, layer, batch) -> int:
    spec = json.dumps({"fn": fn_name, "layer": list(layer), "batch": batch, "threads": torch.get_num_threads()})
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_peak", spec],
                         capture_output=True, text=True, check=True, env=CHILD_ENV)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def peak_cuda(fn, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------
def _row(op, case, t, fused, unfused, diff, **extra):
    return dict(op=op, case=case, fused_ms=t[fused], unfused_ms=t[unfused], min_ms=t["min"],
                samples=t["samples"], max_rel_diff=diff, **extra)


def bench_device(device, layers, batch, act_shape, pfv_rows, repeats, log):
    rows = []
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def pair(op, case, fused, unfused, **extra):
        t = time_interleaved({"fused": fused, "unfused": unfused}, device, repeats)
        rows.append(_row(op, case, t, "fused", "unfused", max_rel_diff(fused(), unfused()), **extra))
        log(rows[-1])

    a, grad, z = rnd(*act_shape), rnd(*act_shape), rnd(*act_shape)
    z[:, :, 0, 0] = 0  # pixels that take the zero guard
    pair("activation_share", f"{tuple(act_shape)}", lambda a=a, grad=grad, z=z: ops.activation_share(a, grad, z),
         lambda a=a, grad=grad, z=z: activation_share_unfused(a, grad, z))
    del a, grad, z

    for layer in layers:
        name, cin, cout, H, W, k, s, p = layer
        x, w = layer_inputs(layer, batch, device)
        fns = peak_fns(layer, x, w)
        t = time_interleaved(fns, device, repeats)
        row = _row("conv_tap_norms", name, t, "tap_norms", "materialized",
                   max_rel_diff(fns["tap_norms"](), fns["materialized"]()), conv_ms=t["conv2d"],
                   shape=f"x {(batch, cin, H, W)}, w {(cout, cin, k, k)}, stride {s}, padding {p}")
        for n in fns:
            row[f"peak_{n}_bytes"] = peak_cuda(fns[n], device) if device.type == "cuda" else peak_cpu(n, layer, batch)
        rows.append(row)
        log(row)

        n = ops.conv_tap_norms(x, w, s, p)
        d = rnd(batch, out_size(H, k, s, p), out_size(W, k, s, p))
        pair("bias_share_scatter", name, lambda n=n, d=d, k=k, s=s, p=p: ops.bias_share_scatter(n, d, k, s, p),
             lambda n=n, d=d, k=k, s=s, p=p: bias_share_scatter_unfold_fold(n, d, k, s, p), shape=f"n {tuple(n.shape)}, d {tuple(d.shape)}")
        del x, w, n, d, fns

    name, cin, cout, H, W, k, s, p = layers[0]
    x, w = layer_inputs(layers[0], batch, device)
    bias = rnd(cout)
    pos = torch.stack([torch.randint(0, m, (pfv_rows,), generator=g)
                       for m in (batch, out_size(H, k, s, p), out_size(W, k, s, p))], 1).to(device)
    args = ([s, s], [p, p], [1, 1], "contribution")
    pair("pfv_decompose", f"{name}, {pfv_rows} positions", lambda: ops.pfv_decompose(x, w, bias, pos, *args),
         lambda: ops.pfv_decompose_reference(x, w, bias, pos, *args))

    for r in rows:
        r["device"] = str(device)
        r["speedup"] = r["unfused_ms"] / r["fused_ms"]
        if r["op"] == "conv_tap_norms":
            r["tap_norms_over_conv"] = r["fused_ms"] / r["conv_ms"]
            r["mem_ratio"] = r["peak_tap_norms_bytes"] / max(r["peak_materialized_bytes"], 1)
    return rows


def _ms(v):
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def markdown(doc):
    mb = 2**20
    m = doc["machine"]
    lines = ["# srd_ext ops benchmark", "",
             f"torch {m['torch']}, {m.get('cpu', platform.processor())} ({m['cpu_count']} CPUs, "
             f"{m['torch_threads']} torch threads, load average {m['load_avg']})"
             + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + f"; float32; median of at least {doc['repeats']} interleaved repeats "
             "(more for fast cases: `samples` in the JSON).", ""]
    for dev in doc["devices"]:
        res = [r for r in doc["results"] if r["device"] == dev["device"]]
        lines += [f"## {dev['device']} (batch {dev['batch']})", "",
                  "### conv_tap_norms: against one conv and against the materializing composition", "",
                  "| layer | tap norms ms | conv2d ms | **tap norms / conv** (<= 2) | materializing ms "
                  "| **materializing / tap norms** | peak tap norms MB | peak materializing MB "
                  "| **mem ratio** (<= 0.25) | peak conv2d MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res:
            if r["op"] != "conv_tap_norms":
                continue
            ok_t = "ok" if r["tap_norms_over_conv"] <= 2 else "MISS"
            ok_m = "ok" if r["mem_ratio"] <= 0.25 else "MISS"
            lines.append(f"| {r['case']} | {_ms(r['fused_ms'])} | {_ms(r['conv_ms'])} | "
                         f"**{r['tap_norms_over_conv']:.2f}** {ok_t} | {_ms(r['unfused_ms'])} | "
                         f"**{r['speedup']:.2f}x** | {r['peak_tap_norms_bytes'] / mb:.1f} | "
                         f"{r['peak_materialized_bytes'] / mb:.1f} | **{r['mem_ratio']:.3f}** {ok_m} | "
                         f"{r['peak_conv2d_bytes'] / mb:.1f} |")
        lines += ["", "### Fused op against the unfused composition", "",
                  "| op | case | fused ms | unfused ms | **speedup** (unfused / fused) | max rel diff |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in res:
            lines.append(f"| {r['op']} | {r['case']} | {_ms(r['fused_ms'])} | {_ms(r['unfused_ms'])} | "
                         f"**{r['speedup']:.2f}x** | {r['max_rel_diff']:.1e} |")
        lines.append("")
    lines += ["Compositions: activation_share = `(a*G).sum(1)`, `z*R/(z*z).sum(1)` with a zero guard; "
              "materializing tap norms = unfold + one batched matmul into (B, kh*kw, C_out, H_out*W_out), "
              "then norms, scattered to input pixels; bias_share_scatter = unfold of every tap channel "
              "(diagonal) + fold; pfv_decompose = gather + einsum (`srd_ext.ops.pfv_decompose_reference`). "
              "Peak memory: CPU = peak-RSS growth of a fresh process over one call, CUDA = "
              "max_memory_allocated growth.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median)")
    ap.add_argument("--out", default="results/bench_ops")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in the CUDA conv/matmul baselines")
    ap.add_argument("--_peak", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._peak:
        return _peak_child(args._peak)
    if args.threads:
        torch.set_num_threads(args.threads)

    if torch.cuda.is_available():  # same precision for the baselines as for the fused ops
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    plan = [(torch.device("cpu"), dict(
        layers=QUICK_LAYERS if args.quick else LAYERS, batch=2 if args.quick else 4,
        act_shape=(2, 64, 28, 28) if args.quick else (8, 256, 56, 56), pfv_rows=256 if args.quick else 1024,
        repeats=args.repeats or (5 if args.quick else 7)))]
    if torch.cuda.is_available() and ops.cuda_kernels_built() and not args.no_cuda:
        plan.append((torch.device("cuda"), dict(
            layers=QUICK_LAYERS if args.quick else LAYERS + VGG_LAYERS, batch=8 if args.quick else 32,
            act_shape=(8, 64, 28, 28) if args.quick else (32, 256, 56, 56),
            pfv_rows=1024 if args.quick else 8192, repeats=args.repeats or 25)))

    doc = {"machine": machine_info(), "devices": [], "results": []}
    log = lambda r: print(f"  {r['op']:<20} {r['case']:<40} fused {r['fused_ms']:9.2f} ms  "  # noqa: E731
                          f"unfused {r['unfused_ms']:9.2f} ms", file=sys.stderr, flush=True)
    for device, cfg in plan:
        print(f"[{device}] batch {cfg['batch']}, {cfg['repeats']} repeats", file=sys.stderr, flush=True)
        with torch.no_grad():
            doc["results"] += bench_device(device, cfg["layers"], cfg["batch"], cfg["act_shape"],
                                           cfg["pfv_rows"], cfg["repeats"], log)
        doc["devices"].append({"device": str(device), "batch": cfg["batch"], "repeats": cfg["repeats"]})
    doc["repeats"] = ", ".join(f"{d['repeats']} ({d['device']})" for d in doc["devices"])

    md = markdown(doc)
    text = json.dumps(doc, indent=2)
    print(text)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ops.json").write_text(text + "\n")
    (out / "bench_ops.md").write_text(md)
    print(f"wrote {out / 'bench_ops.json'} and {out / 'bench_ops.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
