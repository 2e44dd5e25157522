"""Quantitative comparison of SRD with the baselines, laid out like the paper's Table 2.

For every method of ``srd_ext.baselines``: pointing game, attribution localization, sparseness,
fidelity and stability (``srd_ext.metrics``) averaged over the images. Maps are divided by their
max, clamped to [-1, 1] and bilinearly upsampled to the input size (``metrics.normalize`` then
``metrics.upsample``), as the paper does, before every metric.

    python benchmarks/eval_table.py --model shapes-vgg --num-images 752 --out results/eval
    python benchmarks/eval_table.py --model vgg16 --weights vgg16.pth --data ImageNet-S50/ \\
        --class-index imagenet_class_index.json --num-images 752
    torchrun --nproc_per_node=2 benchmarks/eval_table.py --model shapes-vgg --num-images 752

Writes ``<out>/<tag>.md`` (Table 2 layout: best **bold**, second <u>underlined</u>, then timings,
settings, package versions and model adaptations), ``<tag>.csv`` (means, standard errors,
seconds per image), ``<tag>.json``, ``<tag>.png`` (example maps: images x methods) and
``<tag>.per-image.csv`` (one row per image and method: index, image, label, target, the five
metrics; with ``--save-maps`` also ``map_file``, the method's raw map of that image as a ``.npy``
file under ``<tag>.maps/<method>/``, path relative to ``<out>``).

Whole datasets (``srd_ext.distributed``): under ``torchrun`` every process takes its share of the
batches (blocks of ``--batch-size`` images from ``--first-image``, rank r of W taking blocks
r, r+W, ...), rank 0 gathers the per-image results and writes the outputs once, and the numbers
are those of one process: a batch is computed the same way whichever process takes it, and every
random draw is seeded by ``--seed`` and the batch's first image. Finished batches are recorded in
``<out>/<tag>.parts/`` as they complete; a stopped run started again with the same options (any
number of processes) does only the rest and writes the same outputs, and the folder is removed
once they are written. An image that cannot be read is reported by name and left out.

Settings and their defaults (chosen so that all 17 methods on either shapes model, n=752, fit in
an hour on 2 CPU cores; see the timing table each run writes):

- pointing game: 15 px tolerance at any input size. On the 112 x 112 shapes images that is twice
  as lenient, relative to the image, as the paper's 15 px at 224 x 224.
- fidelity: ``--fidelity-runs`` 100 random pixel subsets (Quantus' default; the perturbed images
  do not depend on the method, so their logits are computed once per batch and shared);
  ``--fidelity-subset`` defaults to Quantus' 224 pixels at 224 x 224 scaled by the image area
  (56 at 112 x 112), baseline 0 (the dataset mean after standardization).
- stability: ``--stability-samples`` 3 noisy copies (sigma 0.1) per image, on the first
  ``--stability-n`` 200 images (20 per shapes class: labels cycle through the classes). Each
  copy costs one more explanation by every method, which dominates the run time. Quantus'
  default is 200 copies, far beyond a CPU budget: with few copies the max ratio is a lower
  bound of the 200-copy one, comparable between methods evaluated with the same copies (the
  noise draws are seeded and shared).
- method costs: integrated gradients ``--ig-steps`` 32, SmoothGrad ``--smoothgrad-samples`` 16.
- ``--threads`` 1: the small shapes models gain little from intra-op threads, and on a CPU
  shared with other jobs two threads waiting on each other ran 4x slower than one. Two
  evaluations (one per model) can run side by side, one core each.

Each run's report has a timing table (seconds per image and method); the README lists the run
times measured for its tables. Stability costs about one more explanation per copy.

Sanity checks (``--sanity``; ``--sanity-only`` skips the five metrics; needs Quantus): for every
method, Quantus' MPRT (cascading model-parameter randomisation, top layer first, on a deep copy:
Spearman and SSIM after each layer and after the whole network) and RandomLogit (SSIM between
the maps of the target and of a random other class), with the all-zero maps counted beside them
(a similarity with an all-zero map is undefined). Quantus runs once per batch, with the settings
of ``quantus_support.settings`` (stated in the report): MPRT's randomised model is the same for
every batch (Quantus' seed 42), RandomLogit's other classes are drawn with ``--seed`` and the
batch's first image, and each map is normalised by its own max, so the numbers do not depend on
the number of processes either. Writes ``<tag>.sanity.csv`` and the section of ``<tag>.md``.

The target is the ground-truth label (``--target pred``: the predicted class). Every random draw
is seeded by ``--seed`` (fidelity subsets and stability noise: the same draws for every image and
method; SmoothGrad's noise: ``--seed`` and the first image of the batch). ``--random-init`` builds the architecture with random weights (smoke
tests only: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from srd_ext import baselines, data, distributed, fileio, metrics, models

import quantus_support
from common import build_model, versions

METRICS = (  # key, column, higher is better
    ("pointing_game", "Poi.", True),
    ("attribution_localization", "Att.", True),
    ("sparseness", "Spa.", True),
    ("fidelity", "Fid.", True),
    ("stability", "Sta.", False),
)
# Options renamed because torchrun takes them for abbreviations of its own.
SANITY = (  # key, column (all: lower is better), the zero-map flags that leave a value undefined
    ("mprt_last", "MPRT ρ (all)", ("zero_original", "zero_randomised")),
    ("mprt_last_ssim", "MPRT SSIM (all)", ("zero_original", "zero_randomised")),
    ("mprt_mean", "MPRT ρ (layer mean)", ("zero_original", "zero_randomised")),
    ("random_logit", "RandomLogit SSIM", ("zero_original", "zero_other_class")),
)
ZERO_FLAGS = ("zero_original", "zero_randomised", "zero_other_class")
RENAMED = {"--n": "--num-images", "--start": "--first-image"}
PER_IMAGE_FIELDS = ["index", "image", "label", "target", "method"] + [k for k, _, _ in METRICS] + ["map_file"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help=f"one of {models.SHAPES_MODELS + models.IMAGENET_MODELS}")
    ap.add_argument("--weights", help="state_dict file (default for shapes models: the shipped weights)")
    ap.add_argument("--random-init", action="store_true", help="random weights (smoke tests only)")
    ap.add_argument("--data", default="shapes", help="'shapes' or an ImageNet-S folder")
    ap.add_argument("--split", default="validation", help="ImageNet-S split folder (default: validation)")
    ap.add_argument(
        "--class-index",
        help="JSON mapping ImageNet-S class folders to model outputs: "
        '{wnid: index} or torchvision\'s {"0": [wnid, name], ...}',
    )
    ap.add_argument(
        "--num-images",
        type=int,
        default=752,
        help="number of images (default 752, the shapes test split; -1: all from --first-image)",
    )
    ap.add_argument("--first-image", type=int, default=0, help="index of the first image (default 0)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help=f"'all' or names (comma or space separated) from {baselines.names()}",
    )
    ap.add_argument("--target", choices=("label", "pred"), default="label")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fidelity-runs", type=int, default=100)
    ap.add_argument(
        "--fidelity-subset", type=int, default=None, help="pixels per subset (default: 224 * H * W / 224^2)"
    )
    ap.add_argument("--stability-samples", type=int, default=3, help="noisy copies per image (0: skip)")
    ap.add_argument(
        "--stability-n", type=int, default=200, help="stability on the first N images (default 200; -1: all)"
    )
    ap.add_argument("--pointing-tolerance", type=int, default=15)
    ap.add_argument("--ig-steps", type=int, default=baselines.IG_STEPS)
    ap.add_argument("--smoothgrad-samples", type=int, default=baselines.SMOOTHGRAD_SAMPLES)
    ap.add_argument("--examples", type=int, default=4, help="images in the example figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/eval")
    ap.add_argument("--tag", help="output file name stem (default: model[_random][_data])")
    ap.add_argument(
        "--save-maps",
        action="store_true",
        help="also write every method's raw map of every image: <out>/<tag>.maps/<method>/<index>.npy, "
        "listed in <tag>.per-image.csv",
    )
    ap.add_argument(
        "--sanity",
        action="store_true",
        help="also the sanity checks through Quantus (MPRT cascading top-down, RandomLogit) and the count of all-zero maps",
    )
    ap.add_argument("--sanity-only", action="store_true", help="the sanity checks without the five metrics")
    distributed.add_timeout_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    hint = distributed.rename_hint(argv, RENAMED)
    if hint:
        ap.error(hint)
    args = ap.parse_args(argv)
    args.sanity = args.sanity or args.sanity_only
    minimum = {
        "batch_size": 1,
        "fidelity_runs": 2,
        "stability_samples": 0,
        "first_image": 0,
        "pointing_tolerance": 0,
        "ig_steps": 1,
        "smoothgrad_samples": 1,
        "examples": 0,
        "threads": 0,
    }
    if args.num_images < 1 and args.num_images != -1:
        ap.error(f"--num-images must be >= 1 or -1 (all images), got {args.num_images}")
    for name, low in minimum.items():
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.stability_n < -1:
        ap.error(f"--stability-n must be >= 0 or -1 (all images), got {args.stability_n}")
    if args.fidelity_subset is not None and args.fidelity_subset < 1:
        ap.error(f"--fidelity-subset must be >= 1, got {args.fidelity_subset}")
    return args


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _class_index(path: Optional[str]) -> Optional[Dict[str, int]]:
    if not path:
        return None
    with open(path) as f:
        obj = json.load(f)
    if all(isinstance(v, list) for v in obj.values()):  # torchvision / Keras layout
        return {v[0]: int(k) for k, v in obj.items()}
    return {k: int(v) for k, v in obj.items()}


def make_images(args) -> data.Images:
    """The images of the run, loaded by dataset index: the shapes test split (rendered) or an
    ImageNet-S folder (read; an unreadable file is reported, not fatal)."""
    limit = None if args.num_images == -1 else args.num_images
    if args.data == "shapes":
        size = models.model_input_size(args.model) if args.model in models.SHAPES_MODELS else 112
        return data.Images.shapes(size, first=args.first_image, limit=limit)
    ds = data.ImageNetSFolder(args.data, split=args.split, class_to_idx=_class_index(args.class_index))
    return data.Images.folder(ds, args.data, first=args.first_image, limit=limit)


class SharedForward:
    """The model, memoized per batch of images.

    Fidelity's perturbed images depend on the images and the seed only, not on the map, so every
    method sends the same chunks through the model; each distinct chunk runs once. A chunk is
    keyed by its shape and its projection on two fixed random vectors (float64), which tells
    apart any two inputs that differ, short of a measure-zero coincidence, at a fraction of a
    forward's cost."""

    def __init__(self, model):
        self.model, self.cache, self.probe = model, {}, None
        self.seconds = 0.0  # spent in the model

    def __call__(self, x):
        flat = x.detach().reshape(x.shape[0], -1).double()
        if self.probe is None or self.probe.shape[0] != flat.shape[1]:
            g = torch.Generator(device=x.device).manual_seed(1234)
            self.probe = torch.randn(flat.shape[1], 2, generator=g, device=x.device, dtype=torch.float64)
        key = (tuple(x.shape), (flat @ self.probe).cpu().numpy().tobytes())
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.model(x)
            self.seconds += time.perf_counter() - t0
        return self.cache[key]


def prepare(maps: torch.Tensor, size) -> torch.Tensor:
    """The paper's display: divided by the max (clamped to [-1, 1]), bilinearly upsampled."""
    return metrics.upsample(metrics.normalize(maps), size)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def evaluate_block(args, model, methods, images, block, skip, say, stem):
    """Every metric of every method on the images of ``block`` (one batch). Returns the block's
    record: JSON-ready per-image values in image order, timings, method failures. ``skip``: the
    methods that failed on an earlier block of this process (not run again); ``say``: prints a
    message without breaking the progress bar."""
    x, masks, labels, indices, bad = images.load(block)
    for b in bad:
        say(f"eval_table: {b['image']} (image {b['index']}) could not be read, left out: {b['reason']}")
    rec = {
        "images": [],
        "failed_images": bad,
        "scores": {},
        "seconds": {},
        "failed": {},
        "skipped": [],
        "sizes": {},
        "forward_s": 0.0,
        "sanity": {},
    }
    if x is None:
        return rec
    x, masks, labels = x.to(args.device), masks.to(args.device), labels.to(args.device)
    if args.target == "label":
        target = labels
    else:
        with torch.no_grad():
            target = model(x).argmax(1)
    rec["images"] = [
        {"index": i, "image": images.name(i), "label": int(l), "target": int(t)}
        for i, l, t in zip(indices, labels.tolist(), target.tolist())
    ]
    shared = SharedForward(model)
    stab_end = images.first + (images.count if args.stability_n < 0 else args.stability_n)
    n_stab = sum(i < stab_end for i in indices)  # indices increase: these are the first n_stab
    rec["stability_images"] = n_stab if args.stability_samples > 0 else 0
    for m in methods:
        if m.name in skip:
            rec["skipped"].append(m.name)
            continue
        sec = {"explain": 0.0, "fidelity": 0.0, "stability": 0.0, "explained": 0, "stability_images": 0}
        s = {}
        # SmoothGrad draws from torch's global generator: seeded by the batch, not by the process.
        torch.manual_seed(distributed.image_seed(args.seed, block.start))
        try:
            if not args.sanity_only:
                s = paper_metrics(args, model, m, x, target, masks, shared, n_stab, indices, stem, rec, sec)
            if args.sanity:
                t0 = time.perf_counter()
                rec["sanity"][m.name] = quantus_support.sanity_scores(model, x, target, m, args.seed, block.start)
                sec["sanity"] = time.perf_counter() - t0
        except Exception as e:  # keep a long run going; the report names the failure
            rec["failed"][m.name] = f"{type(e).__name__}: {e}"
            skip.add(m.name)
            continue
        rec["scores"][m.name] = {k: [float(v) for v in t.detach().double().cpu()] for k, t in s.items()}
        rec["seconds"][m.name] = sec
    rec["forward_s"] = shared.seconds
    return rec


def paper_metrics(args, model, m, x, target, masks, shared, n_stab, indices, stem, rec, sec):
    """The five metrics of Table 2 of method ``m`` on one batch: per-image tensors by metric key
    (``sec``: its seconds and counts, updated; ``rec["sizes"]``: its map size)."""
    H, W = x.shape[-2:]
    subset = args.fidelity_subset or max(1, round(224 * H * W / 224**2))
    s = {}
    t0 = time.perf_counter()
    raw = m(model, x, target)
    sec["explain"] += time.perf_counter() - t0
    sec["explained"] += x.shape[0]
    rec["sizes"][m.name] = list(raw.shape[-2:])
    maps = prepare(raw, (H, W))
    s["pointing_game"] = metrics.pointing_game(maps, masks, args.pointing_tolerance, normalized=True).float()
    s["attribution_localization"] = metrics.attribution_localization(maps, masks, normalized=True)
    s["sparseness"] = metrics.sparseness(maps, normalized=True)
    t0, f0 = time.perf_counter(), shared.seconds
    s["fidelity"] = metrics.fidelity(
        shared,
        x,
        target,
        maps,
        n_runs=args.fidelity_runs,
        subset_size=subset,
        seed=args.seed,
        batch_size=64,
        normalized=True,
    )
    # The shared forwards are counted once, apart from the methods.
    sec["fidelity"] += time.perf_counter() - t0 - (shared.seconds - f0)
    if args.stability_samples > 0 and n_stab > 0:
        xs, ts, first = x[:n_stab], target[:n_stab], maps[:n_stab]

        def explain_fn(xx, tt, xs=xs, first=first, m=m):
            # The unperturbed images were just explained.
            if xx.data_ptr() == xs.data_ptr() and xx.shape == xs.shape:
                return first
            return prepare(m(model, xx, tt), (H, W))

        t0 = time.perf_counter()
        s["stability"] = metrics.stability(
            explain_fn,
            xs,
            ts,
            n_samples=args.stability_samples,
            sigma=0.1,
            seed=args.seed,
            batch_size=max(n_stab, args.batch_size),
            normalized=True,
        )
        sec["stability"] += time.perf_counter() - t0
        sec["stability_images"] += n_stab
    if args.save_maps:
        # Written by this process, the one that computed them, before the block is recorded.
        for k, i in enumerate(indices):
            fileio.save_npy(os.path.join(stem + ".maps", m.name, f"{i:06d}.npy"), raw[k].detach().float().cpu().numpy())
    return s


@dataclasses.dataclass
class Totals:
    """What the block records of a run add up to (:func:`combine`)."""

    scores: Dict[str, Dict[str, List[torch.Tensor]]]  # method -> metric -> per-block values
    seconds: Dict[str, Dict[str, float]]  # method -> explain/fidelity/stability seconds and counts
    failed: Dict[str, str]  # method -> why it failed
    sizes: Dict[str, tuple]  # method -> its map's (h, w)
    forward_s: float  # seconds of the fidelity forwards shared by all methods
    done: int  # images evaluated
    failed_images: List[Dict]  # unreadable images: {"index", "image", "reason"}


def summarize_sanity(methods, records, failed) -> List[Dict]:
    """Per method: the mean of each sanity column over the images where Quantus' value is
    defined (``_n`` of them), the all-zero maps (``zero_*``: of the original model, of the fully
    randomised one, for the random other class), the undefined values no zero map accounts for
    (``unexplained_nan``, expected 0), the mean Spearman per randomised layer, and seconds."""
    rows = []
    for m in methods:
        parts = [rec["sanity"][m.name] for rec in records if m.name in rec.get("sanity", {})]
        row = {"method": m.name, "label": m.label, "library": m.library, "failed": failed.get(m.name, "")}
        cat = {
            k: np.array([v for p in parts for v in p[k]], dtype=float)
            for k in [k for k, _, _ in SANITY] + list(ZERO_FLAGS)
        }
        unexplained = 0
        for k, _, flags in SANITY:
            vals = cat[k]
            ok = np.isfinite(vals)
            row[k] = float(vals[ok].mean()) if ok.any() and m.name not in failed else float("nan")
            row[k + "_n"] = int(ok.sum())
            zero = np.zeros(len(vals), bool)
            for f in flags:
                zero |= cat[f].astype(bool)
            unexplained += int((~ok & ~zero).sum())
        for f in ZERO_FLAGS:
            row[f] = int(cat[f].sum())
        row["images"] = len(cat["mprt_last"])
        row["unexplained_nan"] = unexplained
        layers = list(parts[0]["mprt_layers"]) if parts else []
        row["layers"] = {}
        for layer in layers:
            v = np.array([x for p in parts for x in p["mprt_layers"][layer]], dtype=float)
            row["layers"][layer] = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
        secs = [rec["seconds"].get(m.name, {}).get("sanity", 0.0) for rec in records]
        row["sanity_s_per_image"] = sum(secs) / max(row["images"], 1)
        rows.append(row)
    return rows


def sanity_table(rows) -> str:
    head = (
        "| Method | "
        + " | ".join(f"{c}↓" for _, c, _ in SANITY)
        + " | zero maps: original / randomised / other class |"
    )
    lines = [head, "|" + "---|" * (len(SANITY) + 2)]
    for r in rows:
        cells = [f"{_fmt(r[k])}" + ("" if r[k + "_n"] == r["images"] else f" (n={r[k + '_n']})") for k, _, _ in SANITY]
        zeros = " / ".join(str(r[f]) for f in ZERO_FLAGS)
        label = r["label"] if r["library"] != "srd_ext" else f"**{r['label']}** (ours)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {zeros} |")
    return "\n".join(lines)


def layer_table(rows) -> str:
    """Mean Spearman correlation after each step of the cascade (columns: the layer randomised
    last, top-down)."""
    layers = list(rows[0]["layers"]) if rows else []
    lines = ["| Method | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(r["layers"].get(k, float("nan"))) for k in layers) + " |")
    return "\n".join(lines)


def sanity_markdown(args, rows, num_classes) -> List[str]:
    """The report's sanity section: the table, the per-layer table, Quantus' settings and faults."""
    md = [
        "## Sanity checks (Quantus)",
        "",
        "Similarity of each method's maps to its maps after randomising the model (MPRT: Spearman ρ "
        "and SSIM after the whole network is randomised, top layer first; ρ averaged over the "
        "randomisation steps) and to its maps for a random other class (RandomLogit, SSIM). Lower "
        "is better: a map that does not change is not explaining the weights or the class. A "
        "similarity with an all-zero map is undefined; such images are counted in the last column, "
        "and the mean is over the others (n where fewer than all).",
        "",
        sanity_table(rows),
        "",
        "### MPRT per layer (mean Spearman ρ after the cascade reached the layer)",
        "",
        layer_table(rows),
        "",
        "### Quantus settings",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in quantus_support.settings(num_classes).items()]
    md += ["", "### Quantus faults worked around", ""]
    md += [f"- {k}: {v}" for k, v in quantus_support.FAULTS.items() if k != "RelevanceMassAccuracy"]
    bad = {r["method"]: r["unexplained_nan"] for r in rows if r["unexplained_nan"]}
    if bad:
        md += ["", f"Undefined values without an all-zero map: {bad}"]
    return md


def combine(methods, records) -> Totals:
    """The per-method lists and totals ``summarize`` takes, from block records in image order."""
    scores = {m.name: {k: [] for k, _, _ in METRICS} for m in methods}
    seconds = {
        m.name: {
            "explain": 0.0,
            "fidelity": 0.0,
            "stability": 0.0,
            "explained": 0,
            "stability_images": 0,
            "sanity": 0.0,
        }
        for m in methods
    }
    failed: Dict[str, str] = {}
    sizes: Dict[str, tuple] = {}
    forward_s, done, failed_images = 0.0, 0, []
    for rec in records:
        for name, msg in rec["failed"].items():
            failed.setdefault(
                name,
                f"{msg} (on images {rec['images'][0]['index']}..{rec['images'][-1]['index']})"
                if rec["images"]
                else msg,
            )
        for name, sc in rec["scores"].items():
            for k, vals in sc.items():
                scores[name][k].append(torch.tensor(vals, dtype=torch.float64))
            for k, v in rec["seconds"][name].items():
                seconds[name][k] += v
        for name, size in rec["sizes"].items():
            sizes.setdefault(name, tuple(size))
        forward_s += rec["forward_s"]
        done += len(rec["images"])
        failed_images += rec["failed_images"]
    return Totals(scores, seconds, failed, sizes, forward_s, done, failed_images)


def per_image_fields(args) -> List[str]:
    fields = PER_IMAGE_FIELDS[:-1]
    if args.sanity:
        fields = fields + [k for k, _, _ in SANITY] + list(ZERO_FLAGS)
    return fields + (["map_file"] if args.save_maps else [])


def per_image_rows(methods, records, failed, stem, out, save_maps):
    for rec in records:
        n_stab = rec.get("stability_images", 0)
        for m in methods:
            if m.name in failed or m.name not in rec["scores"]:
                continue
            sc = rec["scores"][m.name]
            for k, img in enumerate(rec["images"]):
                row = dict(img, method=m.name)
                for key, _, _ in METRICS:
                    vals = sc.get(key, [])
                    row[key] = repr(vals[k]) if k < len(vals) and (key != "stability" or k < n_stab) else None
                for key in rec.get("sanity", {}).get(m.name, {}):
                    if key != "mprt_layers":
                        row[key] = repr(rec["sanity"][m.name][key][k])
                if save_maps:
                    row["map_file"] = os.path.relpath(
                        os.path.join(stem + ".maps", m.name, f"{img['index']:06d}.npy"), out
                    )
                yield row


def example_maps(args, model, methods, images, failed):
    """Maps of the first ``--examples`` readable images by every method that did not fail
    (computed here, on rank 0, so the figure does not depend on who computed what), and one
    image to probe the model with."""
    examples = {"images": [], "masks": [], "labels": [], "targets": [], "maps": {m.name: [] for m in methods}}
    want, probe = max(args.examples, 1), None
    xs, ms, ls = [], [], []
    for b in distributed.blocks(images.count, args.batch_size, images.first):
        x, masks, labels, _, _ = images.load(b)
        if x is not None:
            xs.append(x), ms.append(masks), ls.append(labels)
        if sum(len(v) for v in xs) >= want:
            break
    if not xs:
        return examples, None
    x, masks, labels = (torch.cat(v)[:want] for v in (xs, ms, ls))
    x, masks, labels = x.to(args.device), masks.to(args.device), labels.to(args.device)
    probe = x[:1]
    x, masks, labels = x[: args.examples], masks[: args.examples], labels[: args.examples]
    if args.examples == 0:
        return examples, probe
    if args.target == "label":
        target = labels
    else:
        with torch.no_grad():
            target = model(x).argmax(1)
    for m in methods:
        if m.name in failed:
            continue
        torch.manual_seed(distributed.image_seed(args.seed, images.first))
        try:
            examples["maps"][m.name].append(prepare(m(model, x, target), x.shape[-2:]).detach().cpu())
        except Exception:
            pass
    examples["images"] = list(x.cpu())
    examples["masks"] = list(masks.cpu())
    examples["labels"] = labels.cpu().tolist()
    examples["targets"] = target.cpu().tolist()
    return examples, probe


def summarize(methods, scores, seconds, failed, sizes):
    rows = []
    for m in methods:
        row = {
            "method": m.name,
            "label": m.label,
            "resolution": m.resolution,
            "map_size": "x".join(map(str, sizes.get(m.name, ()))),
            "library": m.library,
        }
        for k, _, _ in METRICS:
            vals = torch.cat(scores[m.name][k]) if scores[m.name][k] else torch.empty(0)
            n = vals.numel()
            row[k] = float(vals.double().mean()) if n and m.name not in failed else float("nan")
            row[k + "_sem"] = (
                float(vals.double().std() / math.sqrt(n)) if n > 1 and m.name not in failed else float("nan")
            )
            row[k + "_n"] = n
        sec = seconds[m.name]
        row["explain_s_per_image"] = sec["explain"] / max(sec["explained"], 1)
        row["fidelity_s_per_image"] = sec["fidelity"] / max(sec["explained"], 1)
        row["stability_s_per_image"] = sec["stability"] / max(sec["stability_images"], 1)
        row["failed"] = failed.get(m.name, "")
        rows.append(row)
    return rows


def _fmt(v: float) -> str:
    if v != v:
        return "–"
    s = f"{v:.3f}"
    return s.replace("0.", ".", 1) if s.startswith(("0.", "-0.")) else s


def markdown_table(rows) -> str:
    head = "| Method | " + " | ".join(f"{c}{'↑' if up else '↓'}" for _, c, up in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    marks = {}
    for k, _, up in METRICS:
        vals = sorted({round(r[k], 3) for r in rows if r[k] == r[k]}, reverse=up)
        marks[k] = (vals[0] if vals else None, vals[1] if len(vals) > 1 else None)
    for r in rows:
        cells = []
        for k, _, _ in METRICS:
            c = _fmt(r[k])
            v = round(r[k], 3) if r[k] == r[k] else None
            if v is not None and v == marks[k][0]:
                c = f"**{c}**"
            elif v is not None and v == marks[k][1]:
                c = f"<u>{c}</u>"
            cells.append(c)
        label = r["label"] if r["library"] != "srd_ext" else f"**{r['label']}** (ours)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(path, examples, methods, rows_by_name, class_names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = examples["images"]
    if not imgs:
        return
    shown = [m for m in methods if examples["maps"][m.name]]
    n, cols = len(imgs), 1 + len(shown)
    fig, axes = plt.subplots(n, cols, figsize=(1.25 * cols, 1.35 * n), squeeze=False)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for i in range(n):
        img = (imgs[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        ax = axes[i, 0]
        ax.imshow(img)
        ax.contour(examples["masks"][i].numpy().astype(float), levels=[0.5], colors="w", linewidths=0.6)
        t = examples["targets"][i]
        ax.set_ylabel(class_names[t] if t < len(class_names) else str(t), fontsize=6)
        if i == 0:
            ax.set_title("image", fontsize=6)
        for c, m in enumerate(shown, start=1):
            ax = axes[i, c]
            ax.imshow(torch.cat(examples["maps"][m.name])[i].numpy(), cmap="bwr", vmin=-1, vmax=1)
            if i == 0:
                size = rows_by_name[m.name]["map_size"]
                ax.set_title(f"{m.label}\n{size}", fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def fingerprint(args, methods) -> Dict:
    """The options that decide the numbers: a stopped run resumes only with the same ones."""
    keep = (
        "model",
        "weights",
        "random_init",
        "data",
        "split",
        "class_index",
        "num_images",
        "first_image",
        "target",
        "batch_size",
        "fidelity_runs",
        "fidelity_subset",
        "stability_samples",
        "stability_n",
        "pointing_tolerance",
        "ig_steps",
        "smoothgrad_samples",
        "threads",
        "seed",
        "save_maps",
        "sanity",
        "sanity_only",
    )
    out = {k: getattr(args, k) for k in keep}
    out["methods"] = [m.name for m in methods]
    out["device"] = torch.device(args.device).type
    return out


def main(argv=None) -> Optional[Dict]:
    """Rank 0 (and a one-process run) returns the report; the other ranks None. Exits with status
    1 when a process could not finish its share (what was finished stays on disk)."""
    args = parse_args(argv)
    return distributed.run_in_session("eval_table", args.device, args.timeout, lambda session: run(args, session))


def run(args, session) -> Optional[Dict]:
    args.device = str(session.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    names: List[str] = []
    for item in args.methods:
        names.extend(p for p in item.split(",") if p)
    methods = list(baselines.METHODS.values()) if names in (["all"], []) else [baselines.get(n) for n in names]
    methods = [
        m.with_options(n_steps=args.ig_steps)
        if m.name == "integrated-gradients"
        else m.with_options(n_samples=args.smoothgrad_samples)
        if m.name == "smoothgrad"
        else m
        for m in methods
    ]
    if args.data != "shapes" and args.target == "label" and not args.class_index and session.is_main:
        print(
            "warning: no --class-index: labels are the indices of the sorted class folders, "
            "which match the model's outputs only if it was trained on exactly these folders",
            file=sys.stderr,
        )
    model = build_model(args.model, args.weights, args.device, args.random_init, args.seed)
    images = make_images(args)
    baselines.NOTES.clear()
    data_name = "shapes" if args.data == "shapes" else os.path.basename(os.path.normpath(args.data))
    tag = args.tag or "_".join(
        [args.model] + (["random"] if args.random_init else []) + ([] if data_name == "shapes" else [data_name])
    )
    stem = os.path.join(args.out, tag)

    # The work: blocks of images, the same for any number of processes; each takes its share of
    # those not finished by an earlier run.
    units = distributed.blocks(images.count, args.batch_size, images.first)
    resume_log = distributed.ResumeLog(stem + ".parts", fingerprint(args, methods), session, "evaluation")
    records = resume_log.open()
    if session.is_main and args.save_maps:  # what a killed process was writing, before anyone writes again
        for m in methods:
            fileio.remove_stale_temporaries(os.path.join(stem + ".maps", m.name))
    session.broadcast()
    earlier = sum(len(b) for b in units if b.key in records)
    todo = [b for b in units if b.key not in records]
    if session.is_main and earlier:
        print(
            f"eval_table: resuming: {earlier} of {images.count} images were finished by an earlier run "
            f"({resume_log.folder})",
            file=sys.stderr,
        )
    progress = distributed.Progress(
        session, images.count - earlier, args.model, disable=args.no_progress, dynamic_ncols=True
    )
    t_start, c_start = time.perf_counter(), time.process_time()
    skip = set()

    def work(block):
        rec = evaluate_block(args, model, methods, images, block, skip, progress.write, stem)
        rec["notes"] = dict(baselines.NOTES)
        return rec

    new, error = distributed.run_share(session, todo, work, resume_log, progress, "eval_table")
    if not distributed.finish_run(
        session, error, progress, "eval_table", f"The finished images are kept in {resume_log.folder}"
    ):
        raise SystemExit(1)
    gathered = session.gather(new)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    if not session.is_main:
        return None
    for part in gathered:
        records.update(part)
    ordered = [records[b.key] for b in units]
    totals = combine(methods, ordered)
    failed, done, failed_images = totals.failed, totals.done, totals.failed_images
    examples, probe = example_maps(args, model, methods, images, failed)
    notes: Dict[str, str] = {}
    for rec in ordered:
        notes.update(rec.get("notes", {}))
    notes.update(baselines.NOTES)

    rows = summarize(methods, totals.scores, totals.seconds, failed, totals.sizes)
    rows_by_name = {r["method"]: r for r in rows}
    os.makedirs(args.out, exist_ok=True)
    try:
        layers = baselines.cam_layers(model, probe)
    except Exception as e:
        layers = {"error": str(e)}
    H, W = probe.shape[-2:] if probe is not None else (None, None)
    stab_n = sum(r.get("stability_images", 0) for r in ordered)
    settings = {
        "model": args.model,
        "weights": "random init (smoke test)"
        if args.random_init
        else (
            args.weights
            or (f"shipped {models.WEIGHTS_DIR.name}/{args.model}.pt" if args.model in models.SHAPES_MODELS else None)
        ),
        "data": data_name,
        "n": done,
        "first_image": args.first_image,
        "target": args.target,
        "input_size": [H, W] if probe is not None else None,
        "device": torch.device(args.device).type,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "pointing_tolerance_px": args.pointing_tolerance,
        "fidelity_runs": args.fidelity_runs,
        "fidelity_subset": args.fidelity_subset or (max(1, round(224 * H * W / 224**2)) if H else None),
        "fidelity_baseline": 0.0,
        "stability_samples": args.stability_samples,
        "stability_images": stab_n,
        "stability_sigma": 0.1,
        "ig_steps": args.ig_steps,
        "smoothgrad_samples": args.smoothgrad_samples,
        "smoothgrad_noise": baselines.SMOOTHGRAD_NOISE,
        "cam_layers": layers,
        "processes": session.world_size,
        "images_from_an_earlier_run": earlier,
        "wall_seconds": round(wall, 1),
        "cpu_seconds_rank0": round(cpu, 1),
        "fidelity_forward_seconds": round(totals.forward_s, 1),
    }
    sanity_rows = summarize_sanity(methods, ordered, failed) if args.sanity else []
    num_classes = int(model(probe).shape[-1]) if probe is not None else None
    if args.sanity:
        settings["sanity"] = quantus_support.settings(num_classes)
        settings["sanity_only"] = args.sanity_only
    report = {
        "settings": settings,
        "versions": versions(("torchvision", "numpy", "captum", "grad-cam") + (("quantus",) if args.sanity else ())),
        "sanity": sanity_rows,
        "rows": rows,
        "notes": notes,
        "failed": failed,
        "failed_images": failed_images,
    }

    fileio.atomic_write(stem + ".json", json.dumps(report, indent=1))
    fileio.write_csv(stem + ".csv", rows, list(rows[0].keys()))
    fileio.write_csv(
        stem + ".per-image.csv",
        per_image_rows(methods, ordered, failed, stem, args.out, args.save_maps),
        per_image_fields(args),
    )
    if args.sanity:
        fileio.write_csv(stem + ".sanity.csv", sanity_rows, [k for k in sanity_rows[0] if k != "layers"])
    class_names = (
        models.class_names(args.model) if args.data == "shapes" or args.model in models.IMAGENET_MODELS else ()
    )
    figure(stem + ".png", examples, methods, rows_by_name, class_names)

    md = [
        f"# {args.model} on {data_name}: {done} images",
        "",
        "Average results of Pointing game (Poi.), Attribution localization (Att.), Sparseness "
        "(Spa.), Fidelity (Fid.) and Stability (Sta.). Maps divided by their max, clamped to "
        '[-1, 1] and bilinearly upsampled to the input size. † encoder-output ("low") layer, '
        '‡ 1/8-resolution ("high") layer, others input resolution (map sizes: timing table). Best in **bold**, second '
        "<u>underlined</u>.",
        "",
        "(--sanity-only: the five metrics were not computed.)" if args.sanity_only else markdown_table(rows),
        "",
    ]
    if args.sanity:
        md += sanity_markdown(args, sanity_rows, num_classes) + [""]
    md += [
        "## Settings",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in settings.items()]
    md += [
        "",
        "Pointing game: the tolerance is in pixels at this input size (the paper: 15 px at "
        "224 x 224). Stability: max over the noisy copies of ||phi(x) - phi(x')|| / ||x - x'|| on "
        f"the first {stab_n} images; few copies give a lower bound of Quantus' 200-copy estimate.",
        "",
        "## Seconds per image",
        "",
        "| Method | map | explain | fidelity (own part) | stability (all copies) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['label']} | {r['map_size']} | {r['explain_s_per_image']:.4f} | "
        f"{r['fidelity_s_per_image']:.4f} | {r['stability_s_per_image']:.4f} |"
        for r in rows
    ]
    md += [
        "",
        f"Fidelity forwards (shared by all methods): {totals.forward_s / max(done, 1):.4f} s per image. "
        f"Wall time: {wall:.0f} s ({wall / max(done, 1):.2f} s per image, {session.world_size} process(es)"
        + (f", {earlier} images from an earlier run" if earlier else "")
        + ").",
        "",
        "## Versions",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in report["versions"].items()]
    md += ["", "## Model adaptations", ""]
    md += [f"- {k}: {v}" for k, v in notes.items()] or ["- none"]
    if failed:
        md += ["", "## Failed methods", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    if failed_images:
        md += ["", "## Images left out (unreadable)", ""] + [
            f"- {b['image']} (image {b['index']}): {b['reason']}" for b in failed_images
        ]
    fileio.atomic_write(stem + ".md", "\n".join(md) + "\n")
    resume_log.remove()  # everything is in the outputs now

    if not args.sanity_only:
        print(markdown_table(rows))
    if args.sanity:
        print(("\n" if not args.sanity_only else "") + sanity_table(sanity_rows))
    print(
        f"\n{done} images, wall {wall:.0f} s, {session.world_size} process(es); "
        f"wrote {stem}.md/.csv/.json/.png/.per-image.csv" + (f" and {stem}.maps/" if args.save_maps else "")
    )
    for k, v in notes.items():
        print(f"note {k}: {v}")
    for k, v in failed.items():
        print(f"FAILED {k}: {v}", file=sys.stderr)
    for b in failed_images:
        print(f"left out {b['image']} (image {b['index']}): {b['reason']}", file=sys.stderr)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result and result["failed_images"] else 0)
