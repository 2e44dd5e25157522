"""APOP accuracy table (the paper's Table 1 / Table 3) and the one-layer binarization curve (Fig. 6).

For every batch: record the activation pattern of the real images, then predict from the pattern
alone with zeros / ones / N(0, 1) inputs ("APOP": ReLU -> x * mask, MaxPool -> recorded indices;
"APOP & relu": relu(x * mask)). Reports top-1 / top-5 of the original model and of each variant.

    python examples/apop_accuracy.py --model shapes-vgg --data shapes
    python examples/apop_accuracy.py --model resnet50 --weights resnet50.pth --data /imagenet/val --limit 5000
"""
import argparse
import csv
import os
import sys

import torch
from tqdm import tqdm

from srd_ext import apop, data, models

INPUTS = ("zeros", "ones", "normal")


def make_input(kind: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros_like(like)
    if kind == "ones":
        return torch.ones_like(like)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)


def batches(args, name):
    """(images, labels) batches of the chosen data."""
    if args.data == "shapes":
        n = args.limit or data.DEFAULT_SIZES["test"]
        for start in range(0, n, args.batch_size):
            x, _, y = data.generate("test", min(args.batch_size, n - start), start=start,
                                    image_size=models.model_input_size(name))
            yield x, y
        return
    ds = data.image_folder(args.data)
    if args.limit:
        ds = torch.utils.data.Subset(ds, range(min(args.limit, len(ds))))
    yield from torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=0)


def topk_hits(logits, y, k):
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == y[:, None]).any(1).sum().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default="shapes", help="'shapes' or an ImageNet-style class folder")
    ap.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    ap.add_argument("--limit", type=int, default=None, help="number of images (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--binarize-each-layer", action="store_true")
    ap.add_argument("--out", default="results/apop")
    args = ap.parse_args(argv)

    model = models.load_model(args.model, args.weights, device=args.device)
    gen = torch.Generator().manual_seed(args.seed)
    rows = {"original": [0, 0]}
    for kind in args.inputs:
        for mode in apop.REPLAY_MODES:
            rows[f"{mode} ({kind})"] = [0, 0]
    layers = apop.activation_layers(model) if args.binarize_each_layer else []
    binarized = [0] * len(layers)
    total = 0
    with torch.no_grad():
        for x, y in tqdm(batches(args, args.model), desc=f"APOP {args.model}", unit="batch", file=sys.stderr):
            x, y = x.to(args.device), y.to(args.device)
            logits, pats = apop.patterns_of(model, x)
            rows["original"][0] += topk_hits(logits, y, 1)
            rows["original"][1] += topk_hits(logits, y, 5)
            for kind in args.inputs:
                inp = make_input(kind, x, gen)
                for mode in apop.REPLAY_MODES:
                    out = apop.replay(model, pats, inp, mode)
                    rows[f"{mode} ({kind})"][0] += topk_hits(out, y, 1)
                    rows[f"{mode} ({kind})"][1] += topk_hits(out, y, 5)
            for i in range(len(layers)):
                binarized[i] += topk_hits(apop.binarize(model, x, i), y, 1)
            total += y.numel()

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"apop_{args.model}")
    lines = [f"APOP on {args.data} ({total} images), model {args.model}, seed {args.seed}", "",
             "| prediction from | top-1 | top-5 |", "|---|---|---|"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prediction_from", "top1", "top5", "images"])
        for name, (t1, t5) in rows.items():
            lines.append(f"| {name} | {t1 / total:.3f} | {t5 / total:.3f} |")
            w.writerow([name, t1 / total, t5 / total, total])
    chance = 1.0 / len(logits[0])
    lines.append(f"\nchance level (top-1): {chance:.3f}")
    if layers:
        lines += ["", "One-layer binarization (Fig. 6): top-1 when that activation's output is replaced by 0/1",
                  "", "| layer | top-1 |", "|---|---|"]
        lines += [f"| {n} | {b / total:.3f} |" for n, b in zip(layers, binarized)]
        with open(stem + "_binarize.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer_index", "layer", "top1"])
            for i, (n, b) in enumerate(zip(layers, binarized)):
                w.writerow([i, n, b / total])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(range(len(layers)), [b / total for b in binarized], marker="o", label="binarized layer")
        ax.axhline(rows["original"][0] / total, color="gray", ls="--", label="original")
        ax.axhline(chance, color="red", ls=":", label="chance")
        ax.set_xlabel("activation layer (forward order)")
        ax.set_ylabel("top-1")
        ax.set_title(f"{args.model}: one-layer binarization")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + "_binarize.png", dpi=120)
    table = "\n".join(lines)
    print(table)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
