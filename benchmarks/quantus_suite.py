"""Quantus' broader suite (faithfulness, localisation, complexity, randomisation, robustness) for
SRD and the baselines, every map through a Quantus ``explain_func``.

    python benchmarks/quantus_suite.py --model shapes-resnet --num-images 16
    python benchmarks/quantus_suite.py --model shapes-vgg --methods srd-input,srd-high,saliency

Every method of ``srd_ext.baselines`` is explained through ``quantus_support.explain_method``
(SRD's through ``srd_ext.explain_func``); every score is Quantus'. Metrics run one after another
on the same images, each seeded (``np.random`` and torch by ``--seed``) before each method, so a
rerun gives the same numbers. A score that is undefined (NaN: an all-zero map) is counted, not
averaged. Prints, and writes to ``<out>/<model>.md`` and ``.json``, a table of means (metric x
method) with each metric's category and direction of "better", then every metric's settings and
the Quantus 0.6 faults worked around.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from srd_ext import baselines, data, fileio, models

import quantus_support
from common import build_model, versions

DEFAULT_METHODS = "srd-input,srd-high,saliency,guided-backprop,integrated-gradients,gradcam"


@dataclasses.dataclass
class Spec:
    """One Quantus metric: ``make()`` builds it, ``settings`` says how, ``masks``: needs s_batch."""

    name: str
    make: Callable
    settings: str
    masks: bool = False


def specs(num_classes: int, n_pixels: int, samples: int) -> List[Spec]:
    import quantus

    step = max(1, n_pixels // 32)
    while n_pixels % step:  # PixelFlipping needs a step that divides the number of pixels
        step -= 1
    q = dict(disable_warnings=True, display_progressbar=False)
    norm = dict(normalise_func_kwargs=quantus_support.NORMALISE)
    return [
        Spec(
            "FaithfulnessCorrelation",
            lambda: quantus.FaithfulnessCorrelation(
                nr_runs=50, subset_size=56, perturb_baseline="black", return_aggregate=False, **norm, **q
            ),
            "50 random subsets of 56 pixels (Quantus' 224 at 224 x 224, scaled by area) set to the image "
            "minimum ('black'), Pearson with the summed attribution",
        ),
        Spec(
            "PixelFlipping (AUC)",
            lambda: quantus.PixelFlipping(
                features_in_step=step, perturb_baseline="black", return_auc_per_sample=True, **norm, **q
            ),
            f"{step} pixels per step ({n_pixels // step} steps), most relevant first, set to the image "
            "minimum; area under the target's probability curve",
        ),
        Spec("PointingGame", lambda: quantus.PointingGame(**norm, **q), "the max of the map inside the mask", True),
        Spec(
            "AttributionLocalisation",
            lambda: quantus.AttributionLocalisation(**norm, **q),
            "share of positive relevance inside the mask (abs=True, Quantus' default)",
            True,
        ),
        Spec(
            "RelevanceMassAccuracy",
            lambda: quantus.RelevanceMassAccuracy(abs=True, **norm, **q),
            "relevance mass inside the mask over all, on |map| (abs=True: see the faults)",
            True,
        ),
        Spec("Sparseness", lambda: quantus.Sparseness(**norm, **q), "Gini index of |map|"),
        Spec("Complexity", lambda: quantus.Complexity(**norm, **q), "entropy of the |map| fractions"),
        Spec(
            "RandomLogit",
            lambda: quantus.RandomLogit(num_classes=num_classes, **norm, **q),
            f"SSIM to the map of a random other class of {num_classes}, np.random seed 42 (Quantus')",
        ),
        Spec(
            "MPRT (all layers)",
            lambda: quantus.MPRT(layer_order="top_down", seed=quantus_support.MPRT_SEED, skip_layers=True, **norm, **q),
            "Spearman of |map| before and after randomising every layer top-down (skip_layers=True: "
            f"only the fully randomised model), seed {quantus_support.MPRT_SEED}",
        ),
        Spec(
            "MaxSensitivity",
            lambda: quantus.MaxSensitivity(nr_samples=samples, lower_bound=0.2, **q),
            f"max over {samples} uniform perturbations (|noise| <= 0.2) of the change of the map "
            "(Frobenius norm over that of the map, unnormalised)",
        ),
    ]


def score(spec: Spec, model, x, y, masks, method, seed: int) -> np.ndarray:
    quantus_support.patch_numpy()
    np.random.seed(seed)
    torch.manual_seed(seed)
    metric = spec.make()
    with quantus_support.quiet():
        out = metric(
            model=model,
            x_batch=x,
            y_batch=y,
            a_batch=None,
            s_batch=masks if spec.masks else None,
            device="cpu",
            explain_func=quantus_support.explain_method,
            explain_func_kwargs={"method": method},
            batch_size=len(x),
        )
    if isinstance(out, dict):  # MPRT: the fully randomised model's scores
        out = list(out.values())[-1]
    return np.asarray(out, dtype=float).reshape(len(x), -1).mean(1)


def table(results, methods, metric_specs) -> str:
    """Means, metric x method; best per row in bold; (n=) where some images were undefined."""
    import quantus

    head = "| Metric | category | better | " + " | ".join(m.label for m in methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 3)]
    for spec in metric_specs:
        metric_cls = getattr(quantus, spec.name.split(" ")[0])
        higher = metric_cls.score_direction.name == "HIGHER"
        cells, vals = [], []
        for m in methods:
            r = results[spec.name][m.name]
            vals.append(r["mean"])
            cells.append(f"{r['mean']:.3f}" + ("" if r["n"] == r["images"] else f" (n={r['n']})"))
        finite = [v for v in vals if v == v]
        best = (max if higher else min)(finite) if finite else None
        cells = [f"**{c}**" if v == best else c for c, v in zip(cells, vals)]
        cat = metric_cls.evaluation_category.name.lower()
        lines.append(f"| {spec.name} | {cat} | {'higher' if higher else 'lower'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-resnet", help=f"one of {models.SHAPES_MODELS}")
    ap.add_argument("--num-images", type=int, default=16, help="shapes test images from the first (default 16)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {baselines.names()}")
    ap.add_argument("--sensitivity-samples", type=int, default=10, help="MaxSensitivity's perturbations (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/quantus")
    args = ap.parse_args(argv)
    if args.num_images < 1:
        ap.error(f"--num-images must be >= 1, got {args.num_images}")
    import quantus  # noqa: F401  (fails here, with its name, where Quantus is not installed)

    quantus_support.patch_numpy()
    torch.set_num_threads(args.threads)
    model = build_model(args.model)
    methods = [baselines.get(n) for n in args.methods.split(",") if n]
    loaded = data.Images.shapes(models.model_input_size(args.model), limit=args.num_images).load(range(args.num_images))
    x, y = loaded.images.numpy(), loaded.labels.numpy()
    masks = loaded.masks[:, None].float().numpy()
    n_cls = int(model(loaded.images[:1]).shape[-1])
    metric_specs = specs(n_cls, x.shape[-1] * x.shape[-2], args.sensitivity_samples)
    results: Dict[str, Dict[str, Dict]] = {}
    t_all = time.perf_counter()
    for spec in metric_specs:
        results[spec.name] = {}
        for m in methods:
            t0 = time.perf_counter()
            v = score(spec, model, x, y, masks, m, args.seed)
            ok = np.isfinite(v)
            results[spec.name][m.name] = {
                "mean": float(v[ok].mean()) if ok.any() else float("nan"),
                "n": int(ok.sum()),
                "images": len(v),
                "per_image": [float(s) for s in v],
                "seconds": round(time.perf_counter() - t0, 2),
            }
        print(f"quantus_suite: {spec.name} done ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_all
    md = [
        f"# Quantus suite: {args.model}, {len(x)} shapes test images",
        "",
        f"Means over the images (n= where Quantus' score was undefined for some: all-zero maps). Best per row in "
        f"bold. Wall time {wall:.0f} s, {args.threads} thread(s).",
        "",
        table(results, methods, metric_specs),
        "",
        "## Settings",
        "",
        "- every metric: each map normalised by its own max |value| (Quantus' normalise_by_max per sample), "
        f"target: the label, seed {args.seed} (np.random and torch) before each metric and method",
    ]
    md += [f"- {s.name}: {s.settings}" for s in metric_specs]
    md += ["", "## Quantus faults worked around", ""] + [f"- {k}: {v}" for k, v in quantus_support.FAULTS.items()]
    md += ["", "## Versions", ""] + [
        f"- {k}: {v}" for k, v in versions(("numpy", "captum", "grad-cam", "quantus")).items()
    ]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.model)
    fileio.atomic_write(stem + ".md", "\n".join(md) + "\n")
    report = {
        "model": args.model,
        "images": len(x),
        "seed": args.seed,
        "wall_seconds": round(wall, 1),
        "results": results,
    }
    report["settings"] = {s.name: s.settings for s in metric_specs}
    fileio.atomic_write(stem + ".json", json.dumps(report, indent=1))
    print(table(results, methods, metric_specs))
    print(f"\n{len(x)} images, wall {wall:.0f} s; wrote {stem}.md/.json")
    return report


if __name__ == "__main__":
    main()
