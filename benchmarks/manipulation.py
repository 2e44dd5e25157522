"""Explanation manipulation attack (paper Sec. 4.3, Figure 4; Dombrowski et al. 2019).

For random (original, target) image pairs, a perturbation of the original is optimized so that
its explanation moves toward the target image's while the logits stay put:

    L = l1 * MSE(h(x_adv), h(x_target)) + l2 * MSE(F(x_adv), F(x_org)),  l1 = 1e11, l2 = 1e6

    python benchmarks/manipulation.py --model shapes-vgg --pairs 100 --out results/manipulation

Conventions (Dombrowski et al.'s code):

- Maps are absolute (|h|) and divided by their sum inside the loss; l1 and l2 are relative to
  maps normalized to sum 1 and to the mean squared error over pixels / logits. (With Adam only
  the ratio l1 / l2 and the terms' relative scales matter.)
- h(x_target) and F(x_org) come from the original network. The attack's gradients are taken
  through a deep copy whose ReLUs are Softplus(beta) (``--beta`` 30): on a ReLU network the
  gradient of a gradient map w.r.t. the input vanishes almost everywhere. Gradient-type maps are
  computed there with ``create_graph=True`` (integrated gradients with ``--attack-ig-steps``).
- SRD (``init="constant"``, input layer) is differentiated on the softplus copy too, through the
  extension's ops and their autograd formulas (the capture handles Softplus like any activation).
- LRP z+ (captum's rules, as ``baselines``) has no derivative in captum: captum keeps detached
  activations and rescales gradients in hooks. The attack uses
  ``srd_ext.baselines.LRPZPlus``, the same rules written so that the map has a derivative, on
  the softplus copy; on the ReLU network it reproduces captum's map (tested). Guided backprop
  (only positive gradients through each Softplus) is built the same way,
  ``srd_ext.baselines.GuidedBackprop``, so that its second derivative follows the network's
  real forward pass.
- Adam (lr 1e-3) on x_adv in [0, 1] pixel space (the ImageNet standardization is applied inside);
  after each step every RGB change is clamped to 8/255 and the image to [0, 1]. The attack stops
  once MSE(x_org, x_adv) >= 1e-3 or after ``--steps``. Note: in [0, 1] pixel space the 8/255
  bound caps that MSE at (8/255)^2 = 9.8e-4 < 1e-3, so the MSE stop only fires with
  ``--mse-space model`` (the MSE of the standardized inputs).
- The explanation is always evaluated on the original network: ``srd_ext.baselines`` (captum)
  for the baselines, ``srd_ext.Explainer`` for SRD. Explanations are for the original image's
  predicted class (x_target: its own predicted class).

Reports, per method, the mean and standard deviation over pairs of SSIM and PCC between
h(x_org) and h(x_adv) (``metrics.ssim`` / ``metrics.pcc`` on max-normalized maps): lower means
a more successful manipulation. Writes ``<out>/<tag>.md``, ``<tag>.csv`` and ``<tag>.png``
(one pair: images, original / target / manipulated map per method).

Default ``--steps`` 50 (Adam moves a pixel by about lr = 1e-3 per step, so 50 steps can reach
the 8/255 bound). The report has the seconds per attack step and per pair of each method.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from srd_ext import Explainer, baselines, data, metrics, models
from srd_ext.baselines import GuidedBackprop, LRPZPlus, smooth_copy

from common import build_model

METHODS = ("gradient", "gradinput", "guidedbackprop", "integratedgradients", "lrp-zplus", "srd")
LABELS = {
    "gradient": "Gradient",
    "gradinput": "GradInput",
    "guidedbackprop": "GuidedBackprop",
    "integratedgradients": "InteGrad",
    "lrp-zplus": "LRP z+",
    "srd": "SRD",
}
BASELINE = {
    "gradient": "saliency",
    "gradinput": "grad-input",
    "guidedbackprop": "guided-backprop",
    "integratedgradients": "integrated-gradients",
    "lrp-zplus": "lrp-z+",
}

L1, L2 = 1e11, 1e6
LR = 1e-3
EPS = 8 / 255
MSE_STOP = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", help="state_dict file (default for shapes models: the shipped weights)")
    ap.add_argument("--data", default="shapes", help="'shapes' or an image folder (ImageFolder layout)")
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=50, help="max optimization steps per pair")
    ap.add_argument("--beta", type=float, default=30.0, help="Softplus beta of the attack copy")
    ap.add_argument("--attack-ig-steps", type=int, default=8, help="IG steps inside the attack")
    ap.add_argument("--mse-space", choices=("pixel", "model"), default="pixel")
    ap.add_argument(
        "--pool", type=int, help="draw pairs from the first N images (default: all; shapes: the 752 test images)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/manipulation")
    ap.add_argument("--tag", help="output file stem (default: model[_random])")
    ap.add_argument("--no-progress", action="store_true")
    # test hooks: random weights and a small image size (numbers mean nothing)
    ap.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("pairs", "steps", "attack_ig_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.beta > 0:
        ap.error(f"--beta must be > 0, got {args.beta}")
    if args.pool is not None and args.pool < 2:
        ap.error(f"--pool must be >= 2 (pairs of distinct images), got {args.pool}")
    return args


# ----------------------------------------------------------------------------------------------
# model, data
# ----------------------------------------------------------------------------------------------
def load_pairs(args) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pairs, 2, 3, H, W) images in [0, 1] and the drawn dataset indices (pairs, 2)."""
    rng = np.random.default_rng(args.seed)
    if args.data == "shapes":
        pool = args.pool or data.DEFAULT_SIZES["test"]
        size = args.image_size or (models.model_input_size(args.model) if args.model in models.SHAPES_MODELS else 112)
        load = lambda i: data.generate("test", 1, image_size=size, start=int(i), standardize=False)[0][0]
    else:
        size = args.image_size or 224
        ds = data.image_folder(args.data, resize=size * 256 // 224, crop=size, standardize=False)
        pool = min(args.pool, len(ds)) if args.pool else len(ds)
        load = lambda i: ds[int(i)][0]
    if pool < 2:
        raise ValueError("need at least 2 images to draw pairs from")
    idx = np.stack([rng.choice(pool, 2, replace=False) for _ in range(args.pairs)])
    imgs = torch.stack([torch.stack([load(i) for i in p]) for p in idx])
    return imgs.to(args.device), torch.from_numpy(idx)


def to_model(x01: torch.Tensor) -> torch.Tensor:
    return data.standardize(x01)


def _input_grad(net, x, t):
    out = net(x)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x, create_graph=True)
    return g, out


def attack_map_fn(method: str, model: nn.Module, args) -> Callable:
    """``fn(x, t) -> (map (B, H, W), logits)``, differentiable w.r.t. the model input x."""
    if method == "srd":
        # SRD of the softplus copy: the extension's ops, differentiated through their autograd
        # formulas; its forward gives the logits
        ex = Explainer(smooth_copy(model, args.beta), init="constant")
        return lambda x, t: ex.explain(x, t, return_logits=True, create_graph=True)
    if method == "lrp-zplus":
        lrp = LRPZPlus(model, args.beta)
        return lambda x, t: lrp(x, t, create_graph=True)
    if method == "guidedbackprop":
        gbp = GuidedBackprop(model, args.beta)
        return lambda x, t: gbp(x, t, create_graph=True)
    net = smooth_copy(model, args.beta)
    if method == "gradient":

        def fn(x, t):
            g, out = _input_grad(net, x, t)
            return g.abs().amax(1), out
    elif method == "gradinput":

        def fn(x, t):
            g, out = _input_grad(net, x, t)
            return (g * x).sum(1), out
    elif method == "integratedgradients":
        n = args.attack_ig_steps
        alphas = (torch.arange(n, device=args.device, dtype=torch.float32) + 0.5) / n  # midpoints

        def fn(x, t):
            b = x.shape[0]
            xs = (alphas.view(n, 1, 1, 1, 1) * x.unsqueeze(0)).reshape(n * b, *x.shape[1:])
            out = net(xs)
            (g,) = torch.autograd.grad(out.gather(1, t.repeat(n)[:, None]).sum(), xs, create_graph=True)
            g = g.view(n, b, *x.shape[1:]).mean(0)
            return (g * x).sum(1), net(x)
    else:
        raise KeyError(method)
    return fn


def eval_map_fn(method: str, model: nn.Module) -> Callable:
    """``fn(x, t) -> (B, H, W)`` detached map on the original network."""
    if method == "srd":
        ex = Explainer(model, init="constant")

        return lambda x, t: ex.explain(x, t)
    m = baselines.get(BASELINE[method])
    return lambda x, t: m(model, x, t)


def sum_normalized(h: torch.Tensor) -> torch.Tensor:
    h = h.abs()
    return h / h.flatten(1).sum(1).clamp_min(1e-30).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# attack
# ----------------------------------------------------------------------------------------------
def attack(fn, x_org01, h_target, logits_org, t, args) -> Tuple[torch.Tensor, int, str]:
    """Returns x_adv in [0, 1], the steps taken and the stop reason ("mse" or "steps")."""
    x_adv = x_org01.clone().requires_grad_(True)
    opt = torch.optim.Adam([x_adv], lr=LR)
    target_n = sum_normalized(h_target)
    for step in range(1, args.steps + 1):
        h, logits = fn(to_model(x_adv), t)
        loss = L1 * F.mse_loss(sum_normalized(h), target_n) + L2 * F.mse_loss(logits, logits_org)
        # grad w.r.t. x_adv only: backward() would fill .grad of the user's parameters (SRD)
        (x_adv.grad,) = torch.autograd.grad(loss, x_adv)
        opt.step()
        with torch.no_grad():
            x_adv.copy_((x_org01 + (x_adv - x_org01).clamp(-EPS, EPS)).clamp(0, 1))
            a, b = (x_org01, x_adv) if args.mse_space == "pixel" else (to_model(x_org01), to_model(x_adv))
            if F.mse_loss(b, a).item() >= MSE_STOP:
                return x_adv.detach(), step, "mse"
    return x_adv.detach(), args.steps, "steps"


def run(args, model) -> Dict:
    imgs, idx = load_pairs(args)
    with torch.no_grad():
        logits = model(to_model(imgs.flatten(0, 1))).view(args.pairs, 2, -1)
    preds = logits.argmax(-1)
    res = {
        m: {
            "ssim": [],
            "pcc": [],
            "toward": [],
            "kept": [],
            "steps": [],
            "reasons": Counter(),
            "attack_s": 0.0,
            "total_s": 0.0,
            "example": None,
        }
        for m in args.methods
    }
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.pairs * len(args.methods), desc="manipulation", file=sys.stderr)
    for method in args.methods:
        ev = eval_map_fn(method, model)
        fn = attack_map_fn(method, model, args)
        for p in range(args.pairs):
            t_pair = time.perf_counter()
            x_org01, x_tgt01 = imgs[p, 0:1], imgs[p, 1:2]
            t_org, t_tgt = preds[p, 0:1], preds[p, 1:2]
            h_org = ev(to_model(x_org01), t_org).abs()
            h_tgt = ev(to_model(x_tgt01), t_tgt).abs()
            t0 = time.perf_counter()
            x_adv, steps, reason = attack(fn, x_org01, h_tgt, logits[p, 0:1], t_org, args)
            res[method]["attack_s"] += time.perf_counter() - t0
            h_adv = ev(to_model(x_adv), t_org).abs()
            r = res[method]
            r["total_s"] += time.perf_counter() - t_pair
            r["ssim"].append(metrics.ssim(h_org, h_adv).item())
            r["pcc"].append(metrics.pcc(h_org, h_adv).item())
            # how far the attack got: distance to the target map, after / before (original
            # network); and whether the predicted class survived
            tn = sum_normalized(h_tgt)
            r["toward"].append(
                (F.mse_loss(sum_normalized(h_adv), tn) / F.mse_loss(sum_normalized(h_org), tn).clamp_min(1e-30)).item()
            )
            with torch.no_grad():
                r["kept"].append(bool(model(to_model(x_adv)).argmax(1) == t_org))
            r["steps"].append(steps)
            r["reasons"][reason] += 1
            if p == 0:
                r["example"] = (h_org[0].cpu(), h_tgt[0].cpu(), h_adv[0].cpu())
            if progress is not None:
                progress.update()
    if progress is not None:
        progress.close()
    return {"results": res, "images": imgs[0].cpu(), "indices": idx}


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def summarize(res) -> List[Dict]:
    rows = []
    for m, r in res.items():
        ssim, pcc = np.array(r["ssim"]), np.array(r["pcc"])
        n_steps = int(np.sum(r["steps"]))
        rows.append(
            {
                "method": m,
                "label": LABELS[m],
                "pairs": len(ssim),
                "ssim_mean": ssim.mean(),
                "ssim_std": ssim.std(ddof=1) if len(ssim) > 1 else 0.0,
                "pcc_mean": pcc.mean(),
                "pcc_std": pcc.std(ddof=1) if len(pcc) > 1 else 0.0,
                "toward": float(np.mean(r["toward"])),
                "kept": float(np.mean(r["kept"])),
                "steps_mean": float(np.mean(r["steps"])),
                "s_per_step": r["attack_s"] / n_steps if n_steps else float("nan"),
                "s_per_pair": r["total_s"] / max(len(ssim), 1),
                "stop": dict(r["reasons"]),
            }
        )
    return rows


def write_outputs(args, out, rows) -> Dict[str, str]:
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or args.model + ("_random" if args.random_init else "")
    paths = {k: os.path.join(args.out, f"{tag}.{k}") for k in ("md", "csv", "png")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "pairs",
                "ssim_mean",
                "ssim_std",
                "pcc_mean",
                "pcc_std",
                "target_distance_ratio",
                "class_kept",
                "steps_mean",
                "seconds_per_step",
                "seconds_per_pair",
                "stop_reasons",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r["method"],
                    r["pairs"],
                    f"{r['ssim_mean']:.4f}",
                    f"{r['ssim_std']:.4f}",
                    f"{r['pcc_mean']:.4f}",
                    f"{r['pcc_std']:.4f}",
                    f"{r['toward']:.4f}",
                    f"{r['kept']:.3f}",
                    f"{r['steps_mean']:.1f}",
                    f"{r['s_per_step']:.4f}",
                    f"{r['s_per_pair']:.3f}",
                    ";".join(f"{k}={v}" for k, v in sorted(r["stop"].items())),
                ]
            )
    lines = [
        f"# Explanation manipulation: {args.model}" + (" (random weights)" if args.random_init else ""),
        "",
        f"{args.pairs} pairs, data {args.data}, seed {args.seed}, max steps {args.steps}, "
        f"l1 {L1:g}, l2 {L2:g} (maps normalized to sum 1, MSE), Adam lr {LR:g}, "
        f"|delta| <= 8/255, MSE stop {MSE_STOP:g} ({args.mse_space} space), "
        f"Softplus beta {args.beta:g}, attack IG steps {args.attack_ig_steps}.",
        "SSIM / PCC between h(x_org) and h(x_adv) on the original network (lower: manipulated "
        "more). to target: MSE(h(x_adv), h(x_target)) / MSE(h(x_org), h(x_target)) on "
        "sum-normalized maps, mean over pairs (below 1: moved toward the target map). "
        "class kept: fraction of pairs whose x_adv keeps x_org's predicted class.",
        "",
        "| Method | SSIM | PCC | to target | class kept | steps | s/step | s/pair | stop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stop = ", ".join(f"{k} {v}" for k, v in sorted(r["stop"].items()))
        lines.append(
            f"| {r['label']} | {r['ssim_mean']:.3f} ± {r['ssim_std']:.3f} | "
            f"{r['pcc_mean']:.3f} ± {r['pcc_std']:.3f} | {r['toward']:.3f} | "
            f"{r['kept']:.2f} | {r['steps_mean']:.1f} | "
            f"{r['s_per_step']:.3f} | {r['s_per_pair']:.2f} | {stop} |"
        )
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(out, paths["png"])
    return paths


def figure(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, imgs = out["results"], out["images"]
    methods = list(res)
    cols = ["original image", "target image", "original map", "target map", "manipulated map"]
    fig, axes = plt.subplots(len(methods), 5, figsize=(10, 2.1 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        h_org, h_tgt, h_adv = (metrics.normalize(h[None])[0].numpy() for h in res[m]["example"])
        panels = [imgs[0].permute(1, 2, 0).numpy(), imgs[1].permute(1, 2, 0).numpy(), h_org, h_tgt, h_adv]
        for j, (ax, im) in enumerate(zip(axes[i], panels)):
            ax.imshow(im, cmap=None if j < 2 else "hot", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
        axes[i, 0].set_ylabel(LABELS[m], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> Dict[str, str]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.weights, args.device, args.random_init, args.seed)
    out = run(args, model)
    rows = summarize(out["results"])
    paths = write_outputs(args, out, rows)
    print(f"max steps {args.steps}")
    for r in rows:
        stop = ", ".join(f"{k}: {v}" for k, v in sorted(r["stop"].items()))
        print(
            f"{r['label']:>15}  SSIM {r['ssim_mean']:.3f} ± {r['ssim_std']:.3f}  "
            f"PCC {r['pcc_mean']:.3f} ± {r['pcc_std']:.3f}  to target {r['toward']:.3f}  "
            f"class kept {r['kept']:.2f}  mean steps {r['steps_mean']:.1f}  "
            f"{r['s_per_step']:.3f} s/step  {r['s_per_pair']:.2f} s/pair  stop: {stop}"
        )
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
