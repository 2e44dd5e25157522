"""Cost of a how-tree (``srd_ext.how``) against one explanation of the same images.

For each model (torchvision, random weights with randomised biases and BatchNorm statistics) and
batch size, in one run with interleaved repeats (median milliseconds, ``common.time_interleaved``):

- ``explain``: ``Explainer.explain(x)``, the map at the input (one forward, one walk);
- ``how``: ``how(explainer, x, depth=, top=)`` with every node's ERF box (one forward; per tree
  level one walk of all that level's nodes as one batch of seeds, down to the next tree layer and
  the input);
- ``how-noboxes``: the same without boxes (the walks stop at the deepest tree layer).

The capture is made once before timing (it is cached per model and input shape). Prints JSON and a
markdown table with each cost as a ratio to ``explain``; ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from common import build_model, machine_info, time_interleaved


def measure(name: str, batch: int, size: int, depth: int, top: int, device: str, repeats: int) -> dict:
    import srd_ext
    from srd_ext.zoo import randomize

    model = randomize(build_model(name, random_init=True, device=device), 0)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ex = srd_ext.Explainer(model)
    ex.prepare(x)
    fns = {
        "explain": lambda: ex.explain(x),
        "how": lambda: srd_ext.how(ex, x, depth=depth, top=top),
        "how-noboxes": lambda: srd_ext.how(ex, x, depth=depth, top=top, boxes=False),
    }
    ms = time_interleaved(fns, device, repeats, warmup=1, min_seconds=0)
    tree = srd_ext.how(ex, x, depth=depth, top=top)[0]
    return {
        "model": name,
        "batch": batch,
        "size": size,
        "depth": depth,
        "top": top,
        "layers": tree.layers,
        "nodes_per_image": len(tree.nodes()),
        "ms": {k: ms[k] for k in fns},
        "ratio": {k: ms[k] / ms["explain"] for k in fns},
        "samples": ms["samples"],
    }


def table(rows) -> str:
    out = [
        "| model | batch | tree layers | nodes/image | explain ms | how ms (x explain) | how, no boxes ms (x explain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, q = r["ms"], r["ratio"]
        out.append(
            f"| {r['model']} | {r['batch']} | {', '.join(r['layers'])} | {r['nodes_per_image']} | "
            f"{ms['explain']:.1f} | {ms['how']:.1f} ({q['how']:.2f}x) | "
            f"{ms['how-noboxes']:.1f} ({q['how-noboxes']:.2f}x) |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the JSON here")
    a = p.parse_args(argv)
    rows = [measure(m, b, a.size, a.depth, a.top, a.device, a.repeats) for m in a.models for b in a.batch]
    report = {"machine": machine_info(a.device), "rows": rows}
    print(json.dumps(report, indent=1, default=str))
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
