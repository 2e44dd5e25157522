"""APOP accuracy table (the paper's Table 1 / Table 3) and the one-layer binarization curve (Fig. 6).

For every batch: record the activation pattern of the real images, then predict from the pattern
alone with zeros / ones / N(0, 1) inputs ("APOP": ReLU -> x * mask, MaxPool -> recorded indices;
"APOP & relu": relu(x * mask)). Reports top-1 / top-5 of the original model and of each variant.

    python examples/apop_accuracy.py --model shapes-vgg --data shapes
    python examples/apop_accuracy.py --model resnet50 --weights resnet50.pth --data /imagenet/val --num-images 5000
    torchrun --nproc_per_node=2 examples/apop_accuracy.py --model shapes-vgg --data shapes

Under torchrun every process takes its share of the batches (blocks of ``--batch-size`` images;
rank r of W takes blocks r, r+W, ...) and rank 0 adds up the counts and writes the tables: the
same numbers as one process, since the N(0, 1) input of an image is drawn from a generator seeded
by ``--seed`` and the image's index. Finished batches are recorded in
``<out>/apop_<model>.parts/``; a stopped run started again with the same options resumes there.
An image that cannot be read is reported by name and left out of the counts.
"""

import argparse
import json
import os
import sys

import torch

from srd_ext import apop, data, distributed, fileio, models

INPUTS = ("zeros", "ones", "normal")


def make_input(kind: str, like: torch.Tensor, seed: int, indices) -> torch.Tensor:
    """The input that replaces the images ``like``: zeros, ones, or N(0, 1) drawn per image from
    (``seed``, image index), so that it does not depend on the batch or the process."""
    if kind == "zeros":
        return torch.zeros_like(like)
    if kind == "ones":
        return torch.ones_like(like)
    gens = [torch.Generator().manual_seed(distributed.image_seed(seed, i)) for i in indices]
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in gens]).to(like.device)


def make_images(args) -> data.Images:
    """Shapes test images (rendered) or an ImageNet-style class folder (read; a file that cannot
    be read is reported and left out)."""
    if args.data == "shapes":
        return data.Images.shapes(models.model_input_size(args.model), limit=args.num_images)
    return data.Images.folder(data.image_folder(args.data), args.data, limit=args.num_images)


def probe(images: data.Images) -> torch.Tensor:
    """One image, (1, C, H, W): the first that can be read."""
    x = images.first_readable()
    if x is None:
        raise SystemExit(f"apop_accuracy: none of the {images.count} images in {images.root} can be read")
    return x


def topk_hits(logits, y, k):
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == y[:, None]).any(1).sum().item()


def row_names(inputs):
    return ["original"] + [f"{mode} ({kind})" for kind in inputs for mode in apop.REPLAY_MODES]


def count_block(args, model, images, block, n_layers, say):
    """Top-1 / top-5 hits of every row and of every binarized layer on one block of images."""
    x, _, y, indices, bad = images.load(block)
    for b in bad:
        say(f"apop_accuracy: {b['image']} (image {b['index']}) could not be read, left out: {b['reason']}")
    rec = {"rows": {}, "binarized": [0] * n_layers, "total": 0, "classes": None, "failed_images": bad}
    if x is None:
        return rec
    x, y = x.to(args.device), y.to(args.device)
    with torch.no_grad():
        logits, pats = apop.patterns_of(model, x)
        rec["rows"]["original"] = [topk_hits(logits, y, 1), topk_hits(logits, y, 5)]
        for kind in args.inputs:
            inp = make_input(kind, x, args.seed, indices)
            for mode in apop.REPLAY_MODES:
                out = apop.replay(model, pats, inp, mode)
                rec["rows"][f"{mode} ({kind})"] = [topk_hits(out, y, 1), topk_hits(out, y, 5)]
        for i in range(n_layers):
            rec["binarized"][i] = topk_hits(apop.binarize(model, x, i), y, 1)
    rec["total"], rec["classes"] = y.numel(), logits.shape[1]
    return rec


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default="shapes", help="'shapes' or an ImageNet-style class folder")
    ap.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    ap.add_argument(
        "--num-images",
        "--limit",
        dest="num_images",
        type=int,
        default=None,
        help="number of images (default: all; --limit is the old name)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--binarize-each-layer", action="store_true")
    ap.add_argument("--out", default="results/apop")
    distributed.add_timeout_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.num_images is not None and args.num_images < 1:
        ap.error(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return distributed.run_in_session("apop_accuracy", args.device, args.timeout, lambda session: run(args, session))


def run(args, session):
    args.device = str(session.device)
    model = models.load_model(args.model, args.weights, device=args.device)
    images = make_images(args)
    layers = apop.activation_layers(model, probe(images).to(args.device)) if args.binarize_each_layer else []
    stem = os.path.join(args.out, f"apop_{args.model}")
    settings = {
        k: getattr(args, k)
        for k in ("model", "weights", "data", "inputs", "num_images", "batch_size", "seed", "binarize_each_layer")
    }
    settings["device"] = session.device.type
    units = distributed.blocks(images.count, args.batch_size)
    resume_log = distributed.ResumeLog(stem + ".parts", settings, session, "APOP run")
    records = resume_log.open()
    earlier = sum(len(b) for b in units if b.key in records)
    if session.is_main and earlier:
        print(
            f"apop_accuracy: resuming: {earlier} of {images.count} images were finished by an earlier run "
            f"({resume_log.folder})",
            file=sys.stderr,
        )
    todo = [b for b in units if b.key not in records]
    progress = distributed.Progress(
        session, images.count - earlier, f"APOP {args.model}", disable=args.no_progress, dynamic_ncols=True
    )
    new, error = distributed.run_share(
        session,
        todo,
        lambda block: count_block(args, model, images, block, len(layers), progress.write),
        resume_log,
        progress,
        "apop_accuracy",
    )
    if not distributed.finish_run(
        session, error, progress, "apop_accuracy", f"The finished images are kept in {resume_log.folder}"
    ):
        raise SystemExit(1)
    gathered = session.gather(new)
    if not session.is_main:
        return None
    for part in gathered:
        records.update(part)
    ordered = [records[b.key] for b in units]

    names = row_names(args.inputs)
    rows = {name: [0, 0] for name in names}
    binarized = [0] * len(layers)
    total, classes, failed_images = 0, None, []
    for rec in ordered:
        for name, (t1, t5) in rec["rows"].items():
            rows[name][0] += t1
            rows[name][1] += t5
        binarized = [a + b for a, b in zip(binarized, rec["binarized"])]
        total += rec["total"]
        classes = classes or rec["classes"]
        failed_images += rec["failed_images"]
    if total == 0:
        print("apop_accuracy: no image could be read", file=sys.stderr)
        raise SystemExit(1)

    os.makedirs(args.out, exist_ok=True)
    lines = [
        f"APOP on {args.data} ({total} images), model {args.model}, seed {args.seed}",
        "",
        "| prediction from | top-1 | top-5 |",
        "|---|---|---|",
    ]
    table = [
        {"prediction_from": name, "top1": t1 / total, "top5": t5 / total, "images": total}
        for name, (t1, t5) in rows.items()
    ]
    lines += [f"| {r['prediction_from']} | {r['top1']:.3f} | {r['top5']:.3f} |" for r in table]
    fileio.write_csv(stem + ".csv", table, ["prediction_from", "top1", "top5", "images"])
    chance = 1.0 / classes
    lines.append(f"\nchance level (top-1): {chance:.3f}")
    if layers:
        lines += [
            "",
            "One-layer binarization (Fig. 6): top-1 when that activation's output is replaced by 0/1",
            "",
            "| layer | top-1 |",
            "|---|---|",
        ]
        lines += [f"| {n} | {b / total:.3f} |" for n, b in zip(layers, binarized)]
        fileio.write_csv(
            stem + "_binarize.csv",
            [{"layer_index": i, "layer": n, "top1": b / total} for i, (n, b) in enumerate(zip(layers, binarized))],
            ["layer_index", "layer", "top1"],
        )
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
        plt.close(fig)
    if failed_images:
        lines += ["", "Images left out (unreadable):"] + [
            f"- {b['image']} (image {b['index']}): {b['reason']}" for b in failed_images
        ]
    text = "\n".join(lines)
    print(text)
    fileio.atomic_write(stem + ".md", text + "\n")
    fileio.atomic_write(
        stem + ".json",
        json.dumps(
            {
                "rows": table,
                "binarized": dict(zip(layers, [b / total for b in binarized])),
                "images": total,
                "processes": session.world_size,
                "images_from_an_earlier_run": earlier,
                "failed_images": failed_images,
            },
            indent=1,
        ),
    )
    resume_log.remove()
    return {"rows": rows, "binarized": binarized, "total": total, "failed_images": failed_images}


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result and result["failed_images"] else 0)
