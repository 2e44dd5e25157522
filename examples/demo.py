"""Explain 8 shapes test images with both shipped models and write one figure.

Per image: the input, its ground-truth mask, and for each model SRD at the input, high (1/8) and
low (encoder output) resolution for the predicted class. Prints predicted and true classes and how
many maps have their maximum inside the object mask.

    python examples/demo.py --out results/demo.png
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import srd_ext  # noqa: E402
from srd_ext import data, metrics, models  # noqa: E402

LAYERS = ("input", "high", "low")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo.png")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--start", type=int, default=0, help="first test image")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    x, masks, labels = data.generate("test", args.n, start=args.start)
    raw, _, _ = data.generate("test", args.n, start=args.start, normalize=False)
    names = data.SHAPES_CLASSES
    columns = [("image", None), ("mask", None)]
    maps = {}
    for model_name in models.SHAPES_MODELS:
        model = models.load_model(model_name)
        ex = srd_ext.Explainer(model)
        with torch.no_grad():
            out, logits = ex.explain(x, None, layer=list(LAYERS), upsample=True, return_logits=True)
        pred = logits.argmax(1)
        hits = {layer: metrics.pointing_game(out[layer], masks, tolerance=0) for layer in LAYERS}
        print(f"{model_name}: accuracy {float((pred == labels).float().mean()):.2f} on these {args.n} images")
        for i in range(args.n):
            print(f"  image {args.start + i}: true {names[labels[i]]:<10} predicted {names[pred[i]]:<10} "
                  + " ".join(f"{layer}:{'hit' if hits[layer][i] else 'miss'}" for layer in LAYERS))
        print("  maxima inside the mask: " + ", ".join(
            f"SRD-{layer} {int(hits[layer].sum())}/{args.n}" for layer in LAYERS))
        for layer in LAYERS:
            columns.append((f"{model_name}\nSRD-{layer}", (model_name, layer)))
            maps[(model_name, layer)] = (out[layer], pred)

    fig, axes = plt.subplots(args.n, len(columns), figsize=(1.6 * len(columns), 1.6 * args.n))
    for i in range(args.n):
        for c, (title, key) in enumerate(columns):
            ax = axes[i, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if key is None and title == "image":
                ax.imshow(raw[i].permute(1, 2, 0).numpy())
                ax.set_ylabel(names[labels[i]], fontsize=7)
            elif key is None:
                ax.imshow(masks[i].numpy(), cmap="gray")
            else:
                m, pred = maps[key]
                m = metrics.normalize(m[i:i + 1])[0]
                ax.imshow(m.numpy(), cmap="bwr", vmin=-1, vmax=1)
                ax.set_xlabel(names[pred[i]], fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
