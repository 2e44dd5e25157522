"""Fused srd_ext operators against the unfused PyTorch compositions that compute the same thing.

    python benchmarks/bench_ops.py [--quick] [--repeats N] [--threads N] [--out results/bench_ops] [--no-cuda]
        [--ops conv_tap_norms,...] [--only REGEX] [--no-peak] [--no-materialized] [--paths product,gram]
        [--backend auto|kernels|composite|compare]

Runs on the CPU always and on CUDA when a device and the CUDA kernels are present. Every op and
its composition are timed in the same run with interleaved repeats (median of at least N). For
conv_tap_norms it also times one F.conv2d of the same layer (target: tap norms <= 2x conv) and
measures the peak memory of tap norms against the composition that materializes every per-tap
product (target: <= 1/4). On the CPU peak memory is the peak-RSS growth of a fresh subprocess
that runs the call once (torch's CPU allocations are invisible to tracemalloc: VmHWM after a
reset of it, or ru_maxrss where that is not possible); on CUDA it is
torch.cuda.max_memory_allocated above the memory already allocated.

The layers are the distinct conv shapes of ResNet-50 and VGG16 at 224x224 (--only picks some by
name). --paths also times conv_tap_norms forced onto each named evaluation path, so that the
automatic choice can be compared with every path in the same run.

--backend runs the srd_ext ops on that backend (srd_ext.backend; default auto); ``compare`` times
the compiled kernels (the "fused" column) and the composite path (srd_ext.composite, ATen ops only)
of every op and layer side by side, with the composite path's peak memory for conv_tap_norms.

Prints a JSON document and markdown tables, and writes both (bench_ops.json, bench_ops.md) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from srd_ext import backend, ops

from common import cuda_peak_bytes, machine_info, time_interleaved
from peak_memory import CHILD_ENV, peak_growth

# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------
# (name, C_in, C_out, H, W, k, stride, padding): the distinct conv shapes of ResNet-50 (torchvision,
# stride in the 3x3) and VGG16 at 224x224.
R50_LAYERS = [
    ("r50.stem 7x7 s2 3->64 @224", 3, 64, 224, 224, 7, 2, 3),
    ("r50.layer1 1x1 64->64 @56", 64, 64, 56, 56, 1, 1, 0),
    ("r50.layer1 3x3 64->64 @56", 64, 64, 56, 56, 3, 1, 1),
    ("r50.layer1 1x1 64->256 @56", 64, 256, 56, 56, 1, 1, 0),
    ("r50.layer1 1x1 256->64 @56", 256, 64, 56, 56, 1, 1, 0),
    ("r50.layer2.0 3x3 s2 128->128 @56", 128, 128, 56, 56, 3, 2, 1),
    ("r50.layer2.0 down 1x1 s2 256->512 @56", 256, 512, 56, 56, 1, 2, 0),
    ("r50.layer2 3x3 128->128 @28", 128, 128, 28, 28, 3, 1, 1),
    ("r50.layer2 1x1 128->512 @28", 128, 512, 28, 28, 1, 1, 0),
    ("r50.layer3 3x3 256->256 @14", 256, 256, 14, 14, 3, 1, 1),
    ("r50.layer3 1x1 256->1024 @14", 256, 1024, 14, 14, 1, 1, 0),
    ("r50.layer3 1x1 1024->256 @14", 1024, 256, 14, 14, 1, 1, 0),
    ("r50.layer4 3x3 512->512 @7", 512, 512, 7, 7, 3, 1, 1),
    ("r50.layer4 1x1 512->2048 @7", 512, 2048, 7, 7, 1, 1, 0),
]
VGG_LAYERS = [
    ("vgg16.conv1_1 3x3 3->64 @224", 3, 64, 224, 224, 3, 1, 1),
    ("vgg16.conv1_2 3x3 64->64 @224", 64, 64, 224, 224, 3, 1, 1),
    ("vgg16.conv2_1 3x3 64->128 @112", 64, 128, 112, 112, 3, 1, 1),
    ("vgg16.conv2_2 3x3 128->128 @112", 128, 128, 112, 112, 3, 1, 1),
    ("vgg16.conv3_1 3x3 128->256 @56", 128, 256, 56, 56, 3, 1, 1),
    ("vgg16.conv3_2 3x3 256->256 @56", 256, 256, 56, 56, 3, 1, 1),
    ("vgg16.conv4_1 3x3 256->512 @28", 256, 512, 28, 28, 3, 1, 1),
    ("vgg16.conv4_2 3x3 512->512 @28", 512, 512, 28, 28, 3, 1, 1),
    ("vgg16.conv5 3x3 512->512 @14", 512, 512, 14, 14, 3, 1, 1),
]
LAYERS = R50_LAYERS + VGG_LAYERS
# Grouped convs (a 9th entry: groups): ResNeXt-50 32x4d's 3x3 convs and MobileNetV2 depthwise ones.
GROUPED_LAYERS = [
    ("resnext50.layer1 3x3 g32 128->128 @56", 128, 128, 56, 56, 3, 1, 1, 32),
    ("resnext50.layer2 3x3 g32 256->256 @28", 256, 256, 28, 28, 3, 1, 1, 32),
    ("resnext50.layer3 3x3 g32 512->512 @14", 512, 512, 14, 14, 3, 1, 1, 32),
    ("resnext50.layer4 3x3 g32 1024->1024 @7", 1024, 1024, 7, 7, 3, 1, 1, 32),
    ("mobilenetv2 dw 3x3 96 @56", 96, 96, 56, 56, 3, 1, 1, 96),
    ("mobilenetv2 dw 3x3 s2 144 @56", 144, 144, 56, 56, 3, 2, 1, 144),
    ("mobilenetv2 dw 3x3 576 @14", 576, 576, 14, 14, 3, 1, 1, 576),
]
LAYER_SETS = {"default": LAYERS, "grouped": GROUPED_LAYERS, "all": LAYERS + GROUPED_LAYERS}
ALL_OPS = ["activation_share", "conv_tap_norms", "bias_share_scatter", "pfv_decompose"]
QUICK_LAYERS = [
    ("3x3 32->32 @28", 32, 32, 28, 28, 3, 1, 1),
    ("3x3 s2 32->32 @28", 32, 32, 28, 28, 3, 2, 1),
    ("1x1 64->32 @28", 64, 32, 28, 28, 1, 1, 0),
    ("stem 7x7 s2 3->16 @64", 3, 16, 64, 64, 7, 2, 3),
]


def groups_of(layer):
    return layer[8] if len(layer) > 8 else 1


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
                i_sl = (
                    slice(ry[2], ry[2] + (ry[1] - ry[0] - 1) * s + 1, s),
                    slice(rx[2], rx[2] + (rx[1] - rx[0] - 1) * s + 1, s),
                )
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
    _, cin, cout, H, W, k, s, p = layer[:8]
    groups = groups_of(layer)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, H, W, generator=g).to(device)
    w = (torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5).to(device)
    return x, w


def peak_fns(layer, x, w):
    _, _, _, H, W, k, s, p = layer[:8]
    groups = groups_of(layer)
    taps = _tap_slices(H, W, out_size(H, k, s, p), out_size(W, k, s, p), k, k, s, p, 1)
    fns = {
        "tap_norms": lambda: ops.conv_tap_norms(x, w, s, p, groups=groups),
        "materialized": lambda: tap_norms_materialized(x, w, s, p, taps),
        "conv2d": lambda: F.conv2d(x, w, None, s, p, groups=groups),
    }
    if groups > 1:  # the composition is written for groups = 1
        del fns["materialized"]
    return fns


def _peak_child(spec: str) -> None:
    """Subprocess body: peak resident-memory growth (bytes) over one call, printed as JSON."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    layer = tuple(args["layer"])
    small = (layer[0], layer[1], layer[2], 16, 16) + tuple(layer[5:])
    with torch.no_grad():
        peak_fns(small, *layer_inputs(small, 1, "cpu"))[args["fn"]]()  # load libraries, thread pools
        x, w = layer_inputs(layer, args["batch"], "cpu")
        peak, out = peak_growth(peak_fns(layer, x, w)[args["fn"]])
    print(json.dumps({"peak_bytes": peak, "out_bytes": out.numel() * out.element_size()}))


def peak_cpu(fn_name, layer, batch, path=None) -> int:
    spec = json.dumps({"fn": fn_name, "layer": list(layer), "batch": batch, "threads": torch.get_num_threads()})
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_peak", spec],
        capture_output=True,
        text=True,
        check=True,
        env=dict(CHILD_ENV, SRD_EXT_BACKEND=path or backend.get_backend()),
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------
def _row(op, case, t, fused, unfused, diff, **extra):
    return dict(
        op=op,
        case=case,
        fused_ms=t[fused],
        unfused_ms=t.get(unfused),
        min_ms=t["min"],
        samples=t["samples"],
        max_rel_diff=diff,
        **extra,
    )


PATH_ENV = "SRD_EXT_TAP_NORMS_PATH"
FUSED_ENV = "SRD_EXT_TAP_NORMS_FUSED"


def with_path(path, fn):
    """fn run with conv_tap_norms forced onto one evaluation path (see csrc/cpu/conv_tap_norms.cpp);
    "unfused": the form chosen by cost, with the fused float32 CPU kernel turned off."""
    name, value = (FUSED_ENV, "0") if path == "unfused" else (PATH_ENV, path)

    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return run


def on_backend(name, fn):
    """fn run with the srd_ext ops on one backend (srd_ext.backend)."""

    def run():
        with backend.use_backend(name):
            return fn()

    return run


def bench_device(device, layers, batch, act_shape, pfv_rows, repeats, log, opts):
    rows = []
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    compare = opts.backend == "compare"

    def pair(op, case, fused, unfused, **extra):
        fns = {"fused": on_backend("kernels", fused) if compare else fused, "unfused": unfused}
        if compare:
            fns["composite"] = on_backend("composite", fused)
        t = time_interleaved(fns, device, repeats)
        if compare:
            extra = dict(
                extra, composite_ms=t["composite"], composite_diff=max_rel_diff(fns["composite"](), fns["fused"]())
            )
        rows.append(_row(op, case, t, "fused", "unfused", max_rel_diff(fns["fused"](), unfused()), **extra))
        log(rows[-1])

    if "activation_share" in opts.ops:
        a, grad, z = rnd(*act_shape), rnd(*act_shape), rnd(*act_shape)
        z[:, :, 0, 0] = 0  # pixels that take the zero guard
        pair(
            "activation_share",
            f"{tuple(act_shape)}",
            lambda: ops.activation_share(a, grad, z),
            lambda: activation_share_unfused(a, grad, z),
        )
        del a, grad, z

    for layer in layers:
        name, cin, cout, H, W, k, s, p = layer[:8]
        x, w = layer_inputs(layer, batch, device)
        if "conv_tap_norms" in opts.ops:
            fns = peak_fns(layer, x, w)
            if not opts.materialized:
                fns.pop("materialized", None)
            for path in opts.paths:
                fns[f"path:{path}"] = with_path(path, fns["tap_norms"])
            if compare:
                fns["composite"] = on_backend("composite", fns["tap_norms"])
                fns["tap_norms"] = on_backend("kernels", fns["tap_norms"])
            t = time_interleaved(fns, device, repeats)
            ref = fns["materialized"]() if "materialized" in fns else None
            row = _row(
                "conv_tap_norms",
                name,
                t,
                "tap_norms",
                "materialized",
                max_rel_diff(fns["tap_norms"](), ref) if ref is not None else None,
                conv_ms=t["conv2d"],
                shape=f"x {(batch, cin, H, W)}, w {tuple(w.shape)}, stride {s}, padding {p}, groups {groups_of(layer)}",
                path_ms={pth: t[f"path:{pth}"] for pth in opts.paths},
            )
            if compare:
                row["composite_ms"] = t["composite"]
                row["composite_diff"] = max_rel_diff(fns["composite"](), fns["tap_norms"]())
            del ref
            if opts.peak:
                for n in ("tap_norms", "materialized", "conv2d"):
                    if n in fns:
                        row[f"peak_{n}_bytes"] = (
                            cuda_peak_bytes(fns[n], device)
                            if device.type == "cuda"
                            else peak_cpu(n, layer, batch, "kernels" if compare else None)
                        )
                if compare:
                    row["peak_composite_bytes"] = (
                        cuda_peak_bytes(fns["composite"], device)
                        if device.type == "cuda"
                        else peak_cpu("tap_norms", layer, batch, "composite")
                    )
            rows.append(row)
            log(row)
            del fns

        if "bias_share_scatter" in opts.ops:
            n = ops.conv_tap_norms(x, w, s, p, groups=groups_of(layer))
            d = rnd(batch, out_size(H, k, s, p), out_size(W, k, s, p))
            pair(
                "bias_share_scatter",
                name,
                lambda: ops.bias_share_scatter(n, d, k, s, p),
                lambda: bias_share_scatter_unfold_fold(n, d, k, s, p),
                shape=f"n {tuple(n.shape)}, d {tuple(d.shape)}",
            )
            del n, d
        del x, w

    first = next((lay for lay in layers if groups_of(lay) == 1), None)  # pfv_decompose: groups = 1
    if "pfv_decompose" in opts.ops and first is not None:
        name, cin, cout, H, W, k, s, p = first
        x, w = layer_inputs(first, batch, device)
        bias = rnd(cout)
        pos = torch.stack(
            [
                torch.randint(0, m, (pfv_rows,), generator=g)
                for m in (batch, out_size(H, k, s, p), out_size(W, k, s, p))
            ],
            1,
        ).to(device)
        args = ([s, s], [p, p], [1, 1], "contribution")
        pair(
            "pfv_decompose",
            f"{name}, {pfv_rows} positions",
            lambda: ops.pfv_decompose(x, w, bias, pos, *args),
            lambda: ops.pfv_decompose_reference(x, w, bias, pos, *args),
        )

    for r in rows:
        r["device"] = str(device)
        r["speedup"] = r["unfused_ms"] / r["fused_ms"] if r["unfused_ms"] is not None else None
        if "composite_ms" in r:
            r["composite_over_kernels"] = r["composite_ms"] / r["fused_ms"]
        if "peak_composite_bytes" in r and "peak_tap_norms_bytes" in r:
            r["composite_mem_over_kernels"] = r["peak_composite_bytes"] / max(r["peak_tap_norms_bytes"], 1)
        if r["op"] == "conv_tap_norms":
            r["tap_norms_over_conv"] = r["fused_ms"] / r["conv_ms"]
            r["path_over_conv"] = {pth: v / r["conv_ms"] for pth, v in r["path_ms"].items()}
            if "peak_tap_norms_bytes" in r and "peak_materialized_bytes" in r:
                r["mem_ratio"] = r["peak_tap_norms_bytes"] / max(r["peak_materialized_bytes"], 1)
    return rows


def _ms(v):
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _opt(v, fmt, none="-"):
    return none if v is None else fmt(v)


def markdown(doc):
    mb = 2**20
    m = doc["machine"]
    lines = [
        "# srd_ext ops benchmark",
        "",
        f"torch {m['torch']}, {m.get('cpu', platform.processor())} ({m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads, load average {m['load_avg']})"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; float32; median of at least {doc['repeats']} interleaved repeats "
        "(more for fast cases: `samples` in the JSON).",
        "",
    ]
    for dev in doc["devices"]:
        res = [r for r in doc["results"] if r["device"] == dev["device"]]
        paths = dev.get("paths", [])
        tap = [r for r in res if r["op"] == "conv_tap_norms"]
        if tap:
            lines += [
                f"## {dev['device']} (batch {dev['batch']})",
                "",
                "### conv_tap_norms: against one conv and against the materializing composition",
                "",
                "| layer | tap norms ms | conv2d ms | **tap norms / conv** (<= 2) | "
                + "".join(f"{p} / conv | " for p in paths)
                + "materializing ms | **materializing / tap norms** | peak tap norms MB "
                "| peak materializing MB | **mem ratio** (<= 0.25) | peak conv2d MB |",
                "|---|---:|---:|---:|" + "---:|" * len(paths) + "---:|---:|---:|---:|---:|---:|",
            ]
            for r in tap:
                ok_t = "ok" if r["tap_norms_over_conv"] <= 2 else "MISS"
                mem = r.get("mem_ratio")
                ok_m = "" if mem is None else (" ok" if mem <= 0.25 else " MISS")
                lines.append(
                    f"| {r['case']} | {_ms(r['fused_ms'])} | {_ms(r['conv_ms'])} | "
                    f"**{r['tap_norms_over_conv']:.2f}** {ok_t} | "
                    + "".join(f"{r['path_over_conv'][p]:.2f} | " for p in paths)
                    + f"{_opt(r['unfused_ms'], _ms)} | {_opt(r['speedup'], lambda v: f'**{v:.2f}x**')} | "
                    f"{_opt(r.get('peak_tap_norms_bytes'), lambda v: f'{v / mb:.1f}')} | "
                    f"{_opt(r.get('peak_materialized_bytes'), lambda v: f'{v / mb:.1f}')} | "
                    f"{_opt(mem, lambda v: f'**{v:.3f}**')}{ok_m} | "
                    f"{_opt(r.get('peak_conv2d_bytes'), lambda v: f'{v / mb:.1f}')} |"
                )
        other = [r for r in res if r["unfused_ms"] is not None]
        if other:
            lines += [
                "",
                f"### Fused op against the unfused composition ({dev['device']})",
                "",
                "| op | case | fused ms | unfused ms | **speedup** (unfused / fused) | max rel diff |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for r in other:
                lines.append(
                    f"| {r['op']} | {r['case']} | {_ms(r['fused_ms'])} | {_ms(r['unfused_ms'])} | "
                    f"**{r['speedup']:.2f}x** | {r['max_rel_diff']:.1e} |"
                )
        lines.append("")
    lines += [
        "Compositions: activation_share = `(a*G).sum(1)`, `z*R/(z*z).sum(1)` with a zero guard; "
        "materializing tap norms = unfold + one batched matmul into (B, kh*kw, C_out, H_out*W_out), "
        "then norms, scattered to input pixels; bias_share_scatter = unfold of every tap channel "
        "(diagonal) + fold; pfv_decompose = gather + einsum (`srd_ext.ops.pfv_decompose_reference`). "
        "`<path> / conv`: conv_tap_norms forced onto one evaluation path (SRD_EXT_TAP_NORMS_PATH); "
        "`unfused / conv`: the choice by cost with the fused float32 CPU kernel off (SRD_EXT_TAP_NORMS_FUSED=0). "
        "Peak memory: CPU = peak-RSS growth of a fresh process over one call, CUDA = "
        "max_memory_allocated growth.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median)")
    ap.add_argument("--out", default="results/bench_ops")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in the CUDA conv/matmul baselines")
    ap.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated subset of {','.join(ALL_OPS)}")
    ap.add_argument(
        "--layers",
        choices=sorted(LAYER_SETS),
        default="default",
        help="layer shapes: ResNet-50 and VGG16 (default), grouped convs, or all",
    )
    ap.add_argument("--only", default=None, help="regular expression on the layer names")
    ap.add_argument("--no-peak", dest="peak", action="store_false", help="skip the peak-memory measurements")
    ap.add_argument(
        "--no-materialized",
        dest="materialized",
        action="store_false",
        help="skip the materializing tap-norms composition",
    )
    ap.add_argument(
        "--paths",
        default="",
        help="comma-separated conv_tap_norms paths to time as well, forced through "
        f"{PATH_ENV} (CPU: product, gram, direct; CUDA: gemm, direct), or unfused (CPU: the choice by "
        f"cost without the fused float32 kernel, {FUSED_ENV}=0)",
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "kernels", "composite", "compare"],
        help="backend of the srd_ext ops; compare: the compiled kernels and the composite path side by side",
    )
    ap.add_argument("--_peak", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._peak:
        return _peak_child(args._peak)
    if args.backend != "compare":
        backend.set_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in args.ops if o not in ALL_OPS]
    if bad:
        ap.error(f"unknown ops {bad}; choose from {ALL_OPS}")
    args.paths = [p for p in args.paths.split(",") if p]
    pick = (lambda layers: [lay for lay in layers if re.search(args.only, lay[0])]) if args.only else (lambda v: v)

    if torch.cuda.is_available():  # same precision for the baselines as for the fused ops
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    plan = [
        (
            torch.device("cpu"),
            dict(
                layers=pick(QUICK_LAYERS if args.quick else LAYER_SETS[args.layers]),
                batch=2 if args.quick else 4,
                act_shape=(2, 64, 28, 28) if args.quick else (8, 256, 56, 56),
                pfv_rows=256 if args.quick else 1024,
                repeats=args.repeats or (5 if args.quick else 7),
            ),
        )
    ]
    if torch.cuda.is_available() and ops.cuda_kernels_built() and not args.no_cuda:
        plan.append(
            (
                torch.device("cuda"),
                dict(
                    layers=pick(QUICK_LAYERS if args.quick else LAYER_SETS[args.layers]),
                    batch=8 if args.quick else 32,
                    act_shape=(8, 64, 28, 28) if args.quick else (32, 256, 56, 56),
                    pfv_rows=1024 if args.quick else 8192,
                    repeats=args.repeats or 25,
                ),
            )
        )

    doc = {"machine": machine_info(), "backend": args.backend, "devices": [], "results": []}

    def log(r):
        extra = (
            f"conv {r['conv_ms']:9.2f} ms  ratio {r['fused_ms'] / r['conv_ms']:.2f}"
            + "".join(f"  {p} {v / r['conv_ms']:.2f}" for p, v in r["path_ms"].items())
            if r["op"] == "conv_tap_norms"
            else f"unfused {r['unfused_ms']:9.2f} ms"
        )
        if "composite_ms" in r:
            extra += f"  composite {r['composite_ms']:9.2f} ms ({r['composite_ms'] / r['fused_ms']:.2f}x)"
            if "composite_mem_over_kernels" in r:
                extra += f" mem {r['composite_mem_over_kernels']:.2f}x"
        print(f"  {r['op']:<20} {r['case']:<40} fused {r['fused_ms']:9.2f} ms  {extra}", file=sys.stderr, flush=True)

    for device, cfg in plan:
        print(f"[{device}] batch {cfg['batch']}, {cfg['repeats']} repeats", file=sys.stderr, flush=True)
        with torch.no_grad():
            doc["results"] += bench_device(
                device, cfg["layers"], cfg["batch"], cfg["act_shape"], cfg["pfv_rows"], cfg["repeats"], log, args
            )
        doc["devices"].append(
            {"device": str(device), "batch": cfg["batch"], "repeats": cfg["repeats"], "paths": args.paths}
        )
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
