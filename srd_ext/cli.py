"""``srd-explain``: SRD heatmaps for image files and folders.

    srd-explain IMAGE_OR_DIR... --model NAME [--weights FILE] [--target N]
                [--layer input|high|low|NAME] [--out DIR] [--device cpu|cuda] [--batch-size N]
                [--overwrite]

Writes, per image, ``<out>/<name>.png`` (heatmap over the image) and ``<out>/<name>.npy`` (the raw
relevance map at the chosen layer's resolution). Folders are searched recursively; their
structure is kept under ``--out``. Unreadable files are reported by name and skipped; nothing is
written next to the inputs; existing outputs are kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(paths: List[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(file, output stem relative to --out) for every input, and the paths that do not exist."""
    found, missing = [], []
    for p in paths:
        if os.path.isdir(p):
            base = os.path.basename(os.path.normpath(p))
            for root, _, files in sorted(os.walk(p)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.splitext(f)[1]:
                        full = os.path.join(root, f)
                        rel = os.path.relpath(full, p)
                        found.append((full, os.path.join(base, os.path.splitext(rel)[0])))
        elif os.path.isfile(p):
            found.append((p, os.path.splitext(os.path.basename(p))[0]))
        else:
            missing.append(p)
    return found, missing


def overlay(image: Image.Image, relevance: np.ndarray) -> Image.Image:
    """Heatmap (red: positive, blue: negative relevance) blended over the image."""
    from matplotlib import colormaps

    r = relevance / (np.abs(relevance).max() or 1.0)
    heat = Image.fromarray((colormaps["bwr"]((r + 1) / 2)[..., :3] * 255).astype(np.uint8))
    heat = heat.resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, 0.55)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="srd-explain", description="SRD heatmaps for images.")
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ap.add_argument("--model", required=True, help="shapes-vgg, shapes-resnet, resnet18..152, vgg11..19[_bn]")
    ap.add_argument("--weights", default=None, help="state_dict file (required for torchvision models)")
    ap.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    ap.add_argument("--layer", default="input", help="input, high, low or a module path (default: input)")
    ap.add_argument("--out", default="srd_out")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    import srd_ext
    from srd_ext import models

    if args.batch_size < 1:
        print("srd-explain: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("srd-explain: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        model = models.load_model(args.model, args.weights, device=args.device)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"srd-explain: {e}", file=sys.stderr)
        return 2
    names = models.class_names(args.model)
    if args.target is not None and not 0 <= args.target < len(names):
        print(f"srd-explain: --target must be in 0..{len(names) - 1}", file=sys.stderr)
        return 2
    size = models.model_input_size(args.model)
    normalize = models.model_transform(args.model)
    explainer = srd_ext.Explainer(model)

    files, missing = find_images(args.inputs)
    failures = [f"{p}: no such file or folder" for p in missing]
    todo = []
    for path, stem in files:
        out_png = os.path.join(args.out, stem + ".png")
        out_npy = os.path.join(args.out, stem + ".npy")
        if not args.overwrite and (os.path.exists(out_png) or os.path.exists(out_npy)):
            print(f"srd-explain: {out_png} exists, skipped (use --overwrite)", file=sys.stderr)
            continue
        todo.append((path, out_png, out_npy))

    written = 0
    bar = tqdm(total=len(todo), desc="srd-explain", unit="img", file=sys.stderr, disable=len(todo) < 2)
    for start in range(0, len(todo), args.batch_size):
        batch, images, outs = [], [], []
        for path, out_png, out_npy in todo[start:start + args.batch_size]:
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                failures.append(f"{path}: not a readable image ({type(e).__name__})")
                bar.update(1)
                continue
            img = img.resize((size, size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            batch.append(normalize(t))
            images.append(img)
            outs.append((out_png, out_npy))
        if not batch:
            continue
        x = torch.stack(batch).to(args.device)
        try:
            with torch.no_grad():
                maps, logits = explainer.explain(x, args.target, layer=args.layer, return_logits=True)
        except ValueError as e:  # e.g. an unknown --layer
            bar.close()
            print(f"srd-explain: {e}", file=sys.stderr)
            return 2
        pred = logits.argmax(1).tolist()
        for img, m, (out_png, out_npy), p in zip(images, maps.cpu().numpy(), outs, pred):
            os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
            np.save(out_npy, m)
            overlay(img, m).save(out_png)
            written += 1
            bar.set_postfix_str(f"{os.path.basename(out_png)}: {names[p]}")
            bar.update(1)
    bar.close()
    for f in failures:
        print(f"srd-explain: skipped {f}", file=sys.stderr)
    print(f"srd-explain: wrote {written} explanation(s) to {args.out}; {len(failures)} skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
