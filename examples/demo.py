"""Explain 8 shapes test images with both shipped models and write one figure.

Per image: the input, its ground-truth mask, and for each model SRD at the input, high (1/8) and
low (encoder output) resolution for the predicted class, drawn over the image with
``srd_ext.viz`` (the drawing ``srd-explain`` uses: red for the class, blue against, transparent
where the relevance is 0). Prints predicted and true classes and how many maps have their maximum
inside the object mask.

    python examples/demo.py --out results/demo.png

``--photos DIR`` instead writes test scenes as photos of other sizes and aspect ratios (JPEG, PNG,
one greyscale) to try ``srd-explain`` on:

    python examples/demo.py --photos photos
    srd-explain photos --model shapes-resnet --layer input,high --panel --report --out srd_out
"""

import argparse
import os

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import srd_ext  # noqa: E402
from srd_ext import data, metrics, models, viz  # noqa: E402

LAYERS = ("input", "high", "low")
# (width, height, format, greyscale) of the photos written by --photos, cut from 448 px scenes
PHOTOS = [
    (448, 336, "jpg", False),
    (336, 448, "png", False),
    (448, 448, "jpg", False),
    (448, 252, "png", False),
    (300, 400, "png", True),
    (400, 300, "jpg", False),
]


def write_photos(folder, start=0):
    """Test scenes as photos: rendered at 448 px, cut to each size of PHOTOS around the object."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, (w, h, fmt, grey) in enumerate(PHOTOS):
        i = start + k
        img, mask, label = data.render(0, "test", i, image_size=448)
        ys, xs = np.nonzero(mask)
        cx, cy = int(xs.mean()), int(ys.mean())
        left = min(max(cx - w // 2, 0), 448 - w)
        top = min(max(cy - h // 2, 0), 448 - h)
        photo = Image.fromarray(img[top : top + h, left : left + w])
        if grey:
            photo = photo.convert("L")
        path = os.path.join(folder, f"{i:03d}-{data.SHAPES_CLASSES[label]}.{fmt}")
        photo.save(path, **({"quality": 92} if fmt == "jpg" else {}))
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo.png")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--start", type=int, default=0, help="first test image")
    ap.add_argument(
        "--photos",
        default=None,
        metavar="DIR",
        help=f"write {len(PHOTOS)} test scenes as photos to DIR (for srd-explain) and stop",
    )
    args = ap.parse_args()
    if args.photos:
        for p in write_photos(args.photos, args.start):
            print(f"wrote {p}")
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    x, masks, labels = data.generate("test", args.n, start=args.start)
    raw, _, _ = data.generate("test", args.n, start=args.start, standardize=False)
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
            print(
                f"  image {args.start + i}: true {names[labels[i]]:<10} predicted {names[pred[i]]:<10} "
                + " ".join(f"{layer}:{'hit' if hits[layer][i] else 'miss'}" for layer in LAYERS)
            )
        print(
            "  maxima inside the mask: "
            + ", ".join(f"SRD-{layer} {int(hits[layer].sum())}/{args.n}" for layer in LAYERS)
        )
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
                viz.draw(ax, raw[i], m[i])
                ax.set_xlabel(names[pred[i]], fontsize=6)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    legend = fig.add_axes((0.35, 0.022, 0.3, 0.01))
    legend.imshow(viz.colorbar_image(), aspect="auto")
    legend.set_xticks([0, 119.5, 239], ["against the class", "0", "for the class"], fontsize=6)
    legend.set_yticks([])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
