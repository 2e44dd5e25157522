"""Quantitative comparison of SRD with the baselines, laid out like the paper's Table 2.

For every method of ``srd_ext.baselines``: pointing game, attribution localization, sparseness,
fidelity and stability (``srd_ext.metrics``) averaged over the images. Maps are divided by their
max, clamped to [-1, 1] and bilinearly upsampled to the input size (``metrics.normalize`` then
``metrics.upsample``), as the paper does, before every metric.

    python benchmarks/eval_table.py --model shapes-vgg --n 752 --out results/eval
    python benchmarks/eval_table.py --model vgg16 --weights vgg16.pth --data ImageNet-S50/ \\
        --class-index imagenet_class_index.json --n 752

Writes ``<out>/<tag>.md`` (Table 2 layout: best **bold**, second <u>underlined</u>, then timings,
settings, package versions and model adaptations), ``<tag>.csv`` (means, standard errors,
seconds per image), ``<tag>.json`` and ``<tag>.png`` (example maps: images x methods).

Settings and their defaults (chosen so that all 17 methods on either shapes model, n=752, fit in
an hour on 2 CPU cores; see the timing table each run writes):

- pointing game: 15 px tolerance at any input size. On the 112 x 112 shapes images that is twice
  as lenient, relative to the image, as the paper's 15 px at 224 x 224.
- fidelity: ``--fidelity-runs`` 100 random pixel subsets (Quantus' default; the perturbed images
  do not depend on the method, so their logits are computed once per batch and shared);
  ``--fidelity-subset`` defaults to Quantus' 224 pixels at 224 x 224 scaled by the image area
  (56 at 112 x 112), baseline 0 (the dataset mean after normalization).
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

Measured wall time with the defaults, n = 752, 1 thread on a 2-core machine running other jobs:
shapes-vgg 1644 s (1594 s of CPU), shapes-resnet 1128 s (the per-method split is in each
report's timing table). Stability costs about one explanation per copy: SRD-input with 10 copies
on all 752 shapes-vgg images took 10.1x its explanation time.

The target is the ground-truth label (``--target pred``: the predicted class). Every random draw
is seeded by ``--seed``. ``--random-init`` builds the architecture with random weights (smoke
tests only: its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

import srd_ext
from srd_ext import baselines, data, metrics, models

METRICS = (  # key, column, higher is better
    ("pointing_game", "Poi.", True),
    ("attribution_localization", "Att.", True),
    ("sparseness", "Spa.", True),
    ("fidelity", "Fid.", True),
    ("stability", "Sta.", False),
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"one of {models.SHAPES_MODELS + models.IMAGENET_MODELS}")
    ap.add_argument("--weights", help="state_dict file (default for shapes models: the shipped weights)")
    ap.add_argument("--random-init", action="store_true", help="random weights (smoke tests only)")
    ap.add_argument("--data", default="shapes", help="'shapes' or an ImageNet-S folder")
    ap.add_argument("--split", default="validation", help="ImageNet-S split folder (default: validation)")
    ap.add_argument("--class-index", help="JSON mapping ImageNet-S class folders to model outputs: "
                    "{wnid: index} or torchvision's {\"0\": [wnid, name], ...}")
    ap.add_argument("--n", type=int, default=752, help="number of images (default 752)")
    ap.add_argument("--start", type=int, default=0, help="first image index")
    ap.add_argument("--methods", nargs="+", default=["all"],
                    help=f"'all' or names (comma or space separated) from {baselines.names()}")
    ap.add_argument("--target", choices=("label", "pred"), default="label")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fidelity-runs", type=int, default=100)
    ap.add_argument("--fidelity-subset", type=int, default=None,
                    help="pixels per subset (default: 224 * H * W / 224^2)")
    ap.add_argument("--stability-samples", type=int, default=3, help="noisy copies per image (0: skip)")
    ap.add_argument("--stability-n", type=int, default=200,
                    help="stability on the first N images (default 200; -1: all)")
    ap.add_argument("--pointing-tolerance", type=int, default=15)
    ap.add_argument("--ig-steps", type=int, default=baselines.IG_STEPS)
    ap.add_argument("--smoothgrad-samples", type=int, default=baselines.SMOOTHGRAD_SAMPLES)
    ap.add_argument("--examples", type=int, default=4, help="images in the example figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/eval")
    ap.add_argument("--tag", help="output file name stem (default: model[_random][_data])")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    minimum = {"n": 1, "batch_size": 1, "fidelity_runs": 2, "stability_samples": 0, "start": 0,
               "pointing_tolerance": 0, "ig_steps": 1, "smoothgrad_samples": 1, "examples": 0,
               "threads": 0}
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
def build_model(args) -> torch.nn.Module:
    if args.random_init:
        torch.manual_seed(args.seed)
        if args.model == "shapes-vgg":
            m = models.shapes_vgg()
        elif args.model == "shapes-resnet":
            m = models.shapes_resnet()
        else:
            import torchvision
            m = getattr(torchvision.models, args.model)(weights=None)
        return m.eval().to(args.device)
    return models.load_model(args.model, args.weights, device=args.device)


def _class_index(path: Optional[str]) -> Optional[Dict[str, int]]:
    if not path:
        return None
    with open(path) as f:
        obj = json.load(f)
    if all(isinstance(v, list) for v in obj.values()):  # torchvision / Keras layout
        return {v[0]: int(k) for k, v in obj.items()}
    return {k: int(v) for k, v in obj.items()}


def batches(args):
    """Yields (images, masks, labels) batches of the ``args.n`` images."""
    if args.data == "shapes":
        size = models.model_input_size(args.model) if args.model in models.SHAPES_MODELS else 112
        for s in range(args.start, args.start + args.n, args.batch_size):
            yield data.generate("test", min(args.batch_size, args.start + args.n - s), image_size=size, start=s)
        return
    ds = data.ImageNetSFolder(args.data, split=args.split, class_to_idx=_class_index(args.class_index))
    end = min(len(ds), args.start + args.n)
    for s in range(args.start, end, args.batch_size):
        items = [ds[i] for i in range(s, min(s + args.batch_size, end))]
        yield (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
               torch.tensor([it[2] for it in items]))


def dataset_size(args) -> int:
    if args.data == "shapes":
        return args.n
    ds = data.ImageNetSFolder(args.data, split=args.split, class_to_idx=_class_index(args.class_index))
    return max(0, min(len(ds), args.start + args.n) - args.start)


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
def evaluate(args, model, methods, progress=None):
    scores = {m.name: {k: [] for k, _, _ in METRICS} for m in methods}
    seconds = {m.name: {"explain": 0.0, "fidelity": 0.0, "stability": 0.0, "explained": 0,
                        "stability_images": 0} for m in methods}
    failed: Dict[str, str] = {}
    examples = {"images": [], "masks": [], "labels": [], "targets": [], "maps": {m.name: [] for m in methods}}
    sizes: Dict[str, tuple] = {}
    forward_s = 0.0
    probe = None
    stab_n = args.n if args.stability_n < 0 else args.stability_n
    done = 0
    for x, masks, labels in batches(args):
        x, masks, labels = x.to(args.device), masks.to(args.device), labels.to(args.device)
        H, W = x.shape[-2:]
        if probe is None:
            probe = x[:1]
        subset = args.fidelity_subset or max(1, round(224 * H * W / 224 ** 2))
        args.fidelity_subset_used = subset
        if args.target == "label":
            target = labels
        else:
            with torch.no_grad():
                target = model(x).argmax(1)
        shared = SharedForward(model)
        n_stab = max(0, min(x.shape[0], stab_n - done))
        need_ex = max(0, args.examples - len(examples["images"]))
        for m in methods:
            if m.name in failed:
                continue
            if progress is not None:
                progress.set_postfix_str(m.name)
            try:
                t0 = time.perf_counter()
                raw = m(model, x, target)
                seconds[m.name]["explain"] += time.perf_counter() - t0
                seconds[m.name]["explained"] += x.shape[0]
                sizes[m.name] = tuple(raw.shape[-2:])
                maps = prepare(raw, (H, W))
                s = scores[m.name]
                s["pointing_game"].append(metrics.pointing_game(
                    maps, masks, args.pointing_tolerance, normalized=True).float().cpu())
                s["attribution_localization"].append(
                    metrics.attribution_localization(maps, masks, normalized=True).cpu())
                s["sparseness"].append(metrics.sparseness(maps, normalized=True).cpu())
                t0, f0 = time.perf_counter(), shared.seconds
                s["fidelity"].append(metrics.fidelity(
                    shared, x, target, maps, n_runs=args.fidelity_runs, subset_size=subset,
                    seed=args.seed, batch_size=64, normalized=True).cpu())
                # The shared forwards are counted once, apart from the methods.
                seconds[m.name]["fidelity"] += time.perf_counter() - t0 - (shared.seconds - f0)
                if args.stability_samples > 0 and n_stab > 0:
                    xs, ts, first = x[:n_stab], target[:n_stab], maps[:n_stab]

                    def explain_fn(xx, tt, xs=xs, first=first, m=m):
                        # The unperturbed images were just explained.
                        if xx.data_ptr() == xs.data_ptr() and xx.shape == xs.shape:
                            return first
                        return prepare(m(model, xx, tt), (H, W))

                    t0 = time.perf_counter()
                    s["stability"].append(metrics.stability(
                        explain_fn, xs, ts, n_samples=args.stability_samples, sigma=0.1,
                        seed=args.seed, batch_size=max(n_stab, args.batch_size), normalized=True).cpu())
                    seconds[m.name]["stability"] += time.perf_counter() - t0
                    seconds[m.name]["stability_images"] += n_stab
                if need_ex:
                    examples["maps"][m.name].append(maps[:need_ex].cpu())
            except Exception as e:  # keep a long run going; the report names the failure
                failed[m.name] = f"{type(e).__name__}: {e}"
        if need_ex:
            examples["images"].extend(x[:need_ex].cpu())
            examples["masks"].extend(masks[:need_ex].cpu())
            examples["labels"].extend(labels[:need_ex].cpu().tolist())
            examples["targets"].extend(target[:need_ex].cpu().tolist())
        forward_s += shared.seconds
        done += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
    return scores, seconds, failed, examples, sizes, forward_s, done, probe


def summarize(methods, scores, seconds, failed, sizes):
    rows = []
    for m in methods:
        row = {"method": m.name, "label": m.label, "resolution": m.resolution,
               "map_size": "x".join(map(str, sizes.get(m.name, ()))), "library": m.library}
        for k, _, _ in METRICS:
            vals = torch.cat(scores[m.name][k]) if scores[m.name][k] else torch.empty(0)
            n = vals.numel()
            row[k] = float(vals.double().mean()) if n and m.name not in failed else float("nan")
            row[k + "_sem"] = float(vals.double().std() / math.sqrt(n)) if n > 1 and m.name not in failed else float("nan")
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


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "srd_ext": srd_ext.__version__, "torch": torch.__version__}
    for dist in ("torchvision", "numpy", "captum", "grad-cam"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


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


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    names: List[str] = []
    for item in args.methods:
        names.extend(p for p in item.split(",") if p)
    methods = list(baselines.METHODS.values()) if names in (["all"], []) else [baselines.get(n) for n in names]
    methods = [m.with_options(n_steps=args.ig_steps) if m.name == "integrated-gradients" else
               m.with_options(n_samples=args.smoothgrad_samples) if m.name == "smoothgrad" else m
               for m in methods]
    if args.data != "shapes" and args.target == "label" and not args.class_index:
        print("warning: no --class-index: labels are the indices of the sorted class folders, "
              "which match the model's outputs only if it was trained on exactly these folders",
              file=sys.stderr)
    model = build_model(args)
    args.n = dataset_size(args)
    baselines.NOTES.clear()

    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.n, unit="img", desc=args.model, dynamic_ncols=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    scores, seconds, failed, examples, sizes, forward_s, done, probe = evaluate(args, model, methods, progress)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    if progress is not None:
        progress.close()

    rows = summarize(methods, scores, seconds, failed, sizes)
    rows_by_name = {r["method"]: r for r in rows}
    data_name = "shapes" if args.data == "shapes" else os.path.basename(os.path.normpath(args.data))
    tag = args.tag or "_".join([args.model] + (["random"] if args.random_init else [])
                               + ([] if data_name == "shapes" else [data_name]))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, tag)
    try:
        layers = baselines.cam_layers(model, probe)
    except Exception as e:
        layers = {"error": str(e)}
    stab_n = min(done, args.n if args.stability_n < 0 else args.stability_n)
    settings = {
        "model": args.model,
        "weights": "random init (smoke test)" if args.random_init else (
            args.weights or (f"shipped {models.WEIGHTS_DIR.name}/{args.model}.pt"
                             if args.model in models.SHAPES_MODELS else None)),
        "data": data_name, "n": done, "start": args.start, "target": args.target,
        "input_size": list(probe.shape[-2:]) if probe is not None else None, "device": str(args.device),
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "seed": args.seed,
        "pointing_tolerance_px": args.pointing_tolerance,
        "fidelity_runs": args.fidelity_runs, "fidelity_subset": getattr(args, "fidelity_subset_used", None),
        "fidelity_baseline": 0.0,
        "stability_samples": args.stability_samples, "stability_images": stab_n, "stability_sigma": 0.1,
        "ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples,
        "smoothgrad_noise": baselines.SMOOTHGRAD_NOISE, "cam_layers": layers,
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "fidelity_forward_seconds": round(forward_s, 1),
    }
    notes = dict(baselines.NOTES)
    report = {"settings": settings, "versions": versions(), "rows": rows, "notes": notes, "failed": failed}

    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    class_names = models.class_names(args.model) if args.data == "shapes" or args.model in models.IMAGENET_MODELS else ()
    figure(stem + ".png", examples, methods, rows_by_name, class_names)

    md = [f"# {args.model} on {data_name}: {done} images", "",
          "Average results of Pointing game (Poi.), Attribution localization (Att.), Sparseness "
          "(Spa.), Fidelity (Fid.) and Stability (Sta.). Maps divided by their max, clamped to "
          "[-1, 1] and bilinearly upsampled to the input size. † encoder-output (\"low\") layer, "
          "‡ 1/8-resolution (\"high\") layer, others input resolution (map sizes: timing table). Best in **bold**, second "
          "<u>underlined</u>.", "", markdown_table(rows), "",
          "## Settings", ""]
    md += [f"- {k}: {v}" for k, v in settings.items()]
    md += ["", "Pointing game: the tolerance is in pixels at this input size (the paper: 15 px at "
           "224 x 224). Stability: max over the noisy copies of ||phi(x) - phi(x')|| / ||x - x'|| on "
           f"the first {stab_n} images; few copies give a lower bound of Quantus' 200-copy estimate.",
           "", "## Seconds per image", "",
           "| Method | map | explain | fidelity (own part) | stability (all copies) |", "|---|---|---|---|---|"]
    md += [f"| {r['label']} | {r['map_size']} | {r['explain_s_per_image']:.4f} | "
           f"{r['fidelity_s_per_image']:.4f} | {r['stability_s_per_image']:.4f} |" for r in rows]
    md += ["", f"Fidelity forwards (shared by all methods): {forward_s / max(done, 1):.4f} s per image. "
           f"Wall time: {wall:.0f} s ({wall / max(done, 1):.2f} s per image).", "", "## Versions", ""]
    md += [f"- {k}: {v}" for k, v in report["versions"].items()]
    md += ["", "## Model adaptations", ""]
    md += [f"- {k}: {v}" for k, v in notes.items()] or ["- none"]
    if failed:
        md += ["", "## Failed methods", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")

    print(markdown_table(rows))
    print(f"\n{done} images, wall {wall:.0f} s; wrote {stem}.md/.csv/.json/.png")
    for k, v in notes.items():
        print(f"note {k}: {v}")
    for k, v in failed.items():
        print(f"FAILED {k}: {v}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
