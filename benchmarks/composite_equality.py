"""The composite path against the compiled kernels on the CPU: the maps of zoo models.

    python benchmarks/composite_equality.py [--models all|tv|timm|NAME,...] [--layers input,high]
        [--batch 2] [--out results/composite_equality.json]

Each model is built as in ``srd_ext.zoo`` (random weights, randomised biases and statistics) and
explained in float32 (SRD-input, Grad-CAM-contrast init, bias share by contribution) once with
``SRD_EXT_BACKEND=kernels`` and once with ``composite``; reported are the largest absolute
difference of the maps and that difference over the largest |map| (the issue's criterion: within
1e-5). Models SRD refuses are listed as refused by both paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import srd_ext
from srd_ext import backend, zoo
from srd_ext.nodes import UnsupportedModelError


def models(which: str):
    tv, _ = zoo.torchvision_cnns()
    if which == "all":
        return [(n, "torchvision") for n in tv] + [(n, "timm") for n in zoo.TIMM_SAMPLE]
    if which == "tv":
        return [(n, "torchvision") for n in tv]
    if which == "timm":
        return [(n, "timm") for n in zoo.TIMM_SAMPLE]
    names = which.split(",")
    return [(n, "torchvision" if n in tv else "timm") for n in names]


def compare(name: str, library: str, layers, batch: int) -> dict:
    model = zoo.build(name, library)
    s = zoo.input_size(name)
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    row = {"model": name, "library": library}
    for layer in layers:
        maps = {}
        for b in ("kernels", "composite"):
            with backend.use_backend(b):
                t0 = time.perf_counter()
                try:
                    maps[b] = srd_ext.explain(model, x, layer=layer)
                except UnsupportedModelError:
                    row["refused"] = True
                    return row
                row[f"{layer}_{b}_s"] = round(time.perf_counter() - t0, 3)
        diff = (maps["kernels"] - maps["composite"]).abs().max().item()
        scale = maps["kernels"].abs().max().item()
        row[f"{layer}_max_abs"] = diff
        row[f"{layer}_max_rel"] = diff / max(scale, 1e-30)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all")
    ap.add_argument("--layers", default="input")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="results/composite_equality.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, library in models(args.models):
        try:
            row = compare(name, library, args.layers.split(","), args.batch)
        except Exception as e:  # a model that cannot be built here (missing library) is reported
            row = {"model": name, "library": library, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rels = [v for r in rows for k, v in r.items() if k.endswith("_max_rel")]
    abss = [v for r in rows for k, v in r.items() if k.endswith("_max_abs")]
    doc = {
        "models": len(rows),
        "compared": sum(1 for r in rows if any(k.endswith("_max_rel") for k in r)),
        "max_abs": max(abss, default=None),
        "max_rel": max(rels, default=None),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}), file=sys.stderr)
    return 0 if doc["max_rel"] is None or doc["max_rel"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
