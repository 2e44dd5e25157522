"""Right for the right reasons: penalize SRD relevance outside the object while training.

The shapes benchmark gets a shortcut: in the training split a small coloured square in a corner
(outside the object) has the colour of the class; in the test split its colour is random. The
shapes VGG is trained twice from the same initialization and batches:

  (a) cross-entropy only,
  (b) cross-entropy + lambda * share of positive SRD relevance outside the object mask,
      the SRD map computed for the true class inside the training step and differentiated
      through the extension's operators.

Each training step (forward, SRD map, loss, backward) runs as one ``torch.compile(fullgraph=True)``
graph. The script reports test accuracy on the unconfounded test split, how often predictions
follow the cue, pointing game, attribution localization, the relevance share on the cue, and the
time of a training step with / without the SRD term, eager / compiled.

    python examples/train_right_reasons.py                       # the defaults
    python examples/train_right_reasons.py --epochs 2 --n-train 512 --out /tmp/rr

Writes ``<out>/results.md`` (the table), ``<out>/right_reasons.png`` (curves and example maps)
and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import srd_ext
from srd_ext import metrics
from srd_ext.data import SHAPES_CLASSES, confounded, dihedral, to_input
from srd_ext.models import shapes_vgg

# --------------------------------------------------------------------------- training step


def make_step(
    model: torch.nn.Module, lam: float, layer: str
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, ...]]:
    """``step(x, y, mask) -> (loss, ce, penalty)``: forward, loss and backward (gradients land
    in ``.grad``). ``lam=0`` is the plain cross-entropy step (no explanation computed)."""
    explainer = srd_ext.Explainer(model) if lam else None

    def step(x, y, mask):
        if explainer is None:
            ce = F.cross_entropy(model(x), y)
            penalty = torch.zeros((), device=x.device)
            loss = ce
        else:
            # The explainer's forward gives the logits too: one forward for both terms.
            R, logits = explainer.explain(x, y, layer=layer, return_logits=True, create_graph=True)
            ce = F.cross_entropy(logits, y)
            penalty = metrics.outside_share(R, mask).mean()
            loss = ce + lam * penalty
        loss.backward()
        return loss.detach(), ce.detach(), penalty.detach()

    step.explainer = explainer
    return step


def compile_step(step: Callable) -> Callable:
    """The whole step as one graph: ``trace_autograd_ops`` lets dynamo trace ``loss.backward()``
    (as ``torch.autograd.grad`` + accumulation into ``.grad``) instead of breaking the graph."""
    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def run(*args):
        if getattr(step, "explainer", None) is not None:
            step.explainer.prepare(args[0])  # the model's capture runs eagerly (cached after once)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)

    return run


def graph_breaks(step: Callable, *args) -> Tuple[int, int, list]:
    """(graphs, graph breaks, reasons) of ``step`` as dynamo sees it. Runs the step once."""
    if getattr(step, "explainer", None) is not None:
        step.explainer.prepare(args[0])
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        e = torch._dynamo.explain(step)(*args)
    return e.graph_count, e.graph_break_count, [str(r.reason).splitlines()[0] for r in e.break_reasons]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, data, device, layer="input", batch_size=100, tolerance=0):
    """Accuracy, cue following and SRD localization (true class, input resolution)."""
    explainer = srd_ext.Explainer(model)
    preds, maps = [], []
    for i in range(0, len(data["labels"]), batch_size):
        x = to_input(data["images"][i : i + batch_size], device)
        y = data["labels"][i : i + batch_size].to(device)
        R, logits = explainer.explain(x, y, layer=layer, upsample=True, return_logits=True)
        preds.append(logits.argmax(1).cpu())
        maps.append(R.cpu())
    pred, maps = torch.cat(preds), torch.cat(maps)
    y, cues = data["labels"], data["cues"]
    pos = maps.clamp(min=0).flatten(1)
    on_cue = (pos * data["cue_masks"].flatten(1)).sum(1) / pos.sum(1).clamp(min=1e-12)
    informative = cues != y  # where following the cue is wrong
    return (
        {
            "accuracy": (pred == y).float().mean().item(),
            "accuracy_cue_differs": (pred == y)[informative].float().mean().item(),
            "follows_cue": (pred == cues)[informative].float().mean().item(),
            "pointing_game": metrics.pointing_game(maps, data["masks"], tolerance=tolerance).float().mean().item(),
            "localization": metrics.attribution_localization(maps, data["masks"]).mean().item(),
            "relevance_on_cue": on_cue.mean().item(),
        },
        maps,
        pred,
    )


# --------------------------------------------------------------------------- timing


def time_steps(variants: Dict[str, Callable], batch, rounds: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per step of each variant; rounds interleave the variants so that load
    from elsewhere on the machine hits all of them alike."""
    sync = torch.cuda.synchronize if batch[0].is_cuda else (lambda: None)
    for f in variants.values():
        for _ in range(warmup):
            f(*batch)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            sync()
            t = time.perf_counter()
            f(*batch)
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def with_optimizer(step: Callable, opt: torch.optim.Optimizer) -> Callable:
    def full(*args):
        opt.zero_grad(set_to_none=True)
        out = step(*args)
        opt.step()
        return out

    return full


# --------------------------------------------------------------------------- main


def train(name, model, step, train_data, test_data, args, device):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    n = len(train_data["labels"])
    steps_per_epoch = n // args.batch_size  # full batches only: one compiled shape
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    g = torch.Generator().manual_seed(args.seed)
    history, step_times = [], []
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} {epoch + 1}/{args.epochs}", leave=False)
        for s in bar:
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            x, m = dihedral(train_data["images"][idx], g, train_data["masks"][idx])
            x, m = to_input(x, device), m.to(device).float()
            y = train_data["labels"][idx].to(device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, ce, pen = step(x, y, m)
            opt.step()
            step_times.append(time.perf_counter() - t)
            sched.step()
            bar.set_postfix(ce=f"{ce.item():.3f}", pen=f"{pen.item():.3f}")
        res, maps, pred = evaluate(model, test_data, device, tolerance=args.tolerance)
        res.update(epoch=epoch + 1, train_ce=ce.item(), train_penalty=pen.item())
        history.append(res)
        print(
            f"{name} epoch {epoch + 1}/{args.epochs}: ce {ce.item():.3f} penalty {pen.item():.3f} | test acc "
            f"{res['accuracy']:.3f}, follows cue {res['follows_cue']:.3f}, pointing {res['pointing_game']:.3f}, "
            f"localization {res['localization']:.3f}, on cue {res['relevance_on_cue']:.3f}",
            flush=True,
        )
    return history, step_times, maps, pred


def plot(path, histories, examples, test_data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("accuracy", "test accuracy (random cue)"),
        ("localization", "attribution localization"),
        ("pointing_game", "pointing game"),
        ("relevance_on_cue", "positive relevance on the cue"),
    ]
    n_ex = examples[0][1].shape[0]
    cols = max(len(keys), n_ex)
    span = cols // len(keys)
    fig = plt.figure(figsize=(1.45 * cols, 2.3 + 1.3 * (1 + len(examples))))
    gs = fig.add_gridspec(2 + len(examples), cols, height_ratios=[1.5] + [1] * (1 + len(examples)))
    for c, (key, title) in enumerate(keys):
        ax = fig.add_subplot(gs[0, c * span : (c + 1) * span])
        for (name, _, _), hist in zip(examples, histories):
            ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        if c == 0:
            ax.legend(fontsize=7)
    for i in range(n_ex):
        ax = fig.add_subplot(gs[1, i])
        ax.imshow(test_data["images"][i].permute(1, 2, 0).numpy())
        ax.contour(test_data["masks"][i].numpy(), levels=[0.5], colors="w", linewidths=0.6)
        ax.set_title(
            f"{SHAPES_CLASSES[test_data['labels'][i]]}\ncue: {SHAPES_CLASSES[test_data['cues'][i]]}", fontsize=7
        )
        ax.set_xticks([])
        ax.set_yticks([])
        for r, (name, maps, pred) in enumerate(examples):
            ax = fig.add_subplot(gs[2 + r, i])
            ax.imshow(metrics.normalize(maps[i : i + 1])[0].numpy(), cmap="bwr", vmin=-1, vmax=1)
            ax.set_title(f"pred: {SHAPES_CLASSES[pred[i]]}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(
        "SRD at the input for the true class (red +, blue -); cue colour random at test time", fontsize=9, y=0.995
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lam", type=float, default=3.0, help="weight of the SRD penalty")
    p.add_argument(
        "--layer",
        default="features.4",
        help='SRD layer of the penalty ("input" or an activation layer, e.g. features.4)',
    )
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10, help="use the first N shape classes")
    p.add_argument(
        "--tolerance", type=int, default=None, help="pointing game tolerance in pixels (default: 15 px at 224, scaled)"
    )
    p.add_argument("--timing-rounds", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="train eagerly (timings still compare both)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: OpenMP threads stall when the cores are shared)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/right_reasons")
    args = p.parse_args()
    if args.lam <= 0:
        p.error("--lam must be > 0 (the first run is the cross-entropy-only baseline)")
    if args.tolerance is None:
        args.tolerance = round(15 * args.image_size / 224)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    t = time.time()
    train_data = confounded("train", args.n_train, args.image_size, args.seed, num_classes=args.classes)
    test_data = confounded("test", args.n_test, args.image_size, args.seed, num_classes=args.classes)
    print(
        f"rendered {args.n_train} train / {args.n_test} test images ({args.image_size}px, {args.classes} classes) "
        f"in {time.time() - t:.0f} s",
        flush=True,
    )

    # Both runs keep Dropout off (eval mode; there is no BatchNorm): the explainer's forward
    # treats it as the identity, so the runs differ in the penalty alone.
    def fresh_model():
        torch.manual_seed(args.seed)
        return shapes_vgg(args.classes).to(device).eval()

    b = args.batch_size
    probe = (
        to_input(train_data["images"][:b], device),
        train_data["labels"][:b].to(device),
        train_data["masks"][:b].to(device).float(),
    )
    graphs, breaks, reasons = graph_breaks(make_step(fresh_model(), args.lam, args.layer), *probe)
    print(
        f"dynamo: the SRD training step is {graphs} graph(s) with {breaks} graph break(s)"
        + (": " + "; ".join(reasons) if reasons else ""),
        flush=True,
    )

    runs = [("CE", 0.0), (f"CE + {args.lam:g} x SRD", args.lam)]
    histories, examples, train_time, compile_time = [], [], {}, {}
    for name, lam in runs:
        model = fresh_model()
        step = make_step(model, lam, args.layer)
        if not args.no_compile:
            step = compile_step(step)
        t = time.time()
        hist, times, maps, pred = train(name, model, step, train_data, test_data, args, device)
        train_time[name] = time.time() - t
        compile_time[name] = times[0] - statistics.median(times)  # the first step compiles
        histories.append(hist)
        examples.append((name, maps[:8], pred[:8]))

    # Step timings on one model: eager and compiled, with and without the SRD term (the
    # compiled graphs come from the cache filled above).
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ce_step, srd_step = make_step(model, 0.0, args.layer), make_step(model, args.lam, args.layer)
    variants = {
        ("CE", "eager"): ce_step,
        ("CE", "compiled"): compile_step(ce_step),
        ("CE + SRD", "eager"): srd_step,
        ("CE + SRD", "compiled"): compile_step(srd_step),
    }
    variants = {k: with_optimizer(f, opt) for k, f in variants.items()}
    timing = time_steps(variants, probe, args.timing_rounds)

    rows = []
    for (name, _), hist in zip(runs, histories):
        r = hist[-1]
        rows.append(
            f"| {name} | {r['accuracy']:.3f} | {r['accuracy_cue_differs']:.3f} | {r['follows_cue']:.3f} | "
            f"{r['pointing_game']:.3f} | {r['localization']:.3f} | {r['relevance_on_cue']:.3f} | "
            f"{train_time[name] / 60:.1f} |"
        )
    chance = 1 / args.classes
    table = "\n".join(
        [
            f"Shapes VGG, {args.image_size}px, {args.classes} classes, {args.n_train} training images with the "
            f"class-coloured cue, {args.epochs} epochs, batch {b}; penalty at `{args.layer}`. Test: {args.n_test} "
            f"images, cue colour random (chance accuracy {chance:.2f}); maps: SRD at the input for the true class; "
            f"pointing game tolerance {args.tolerance} px.",
            "",
            "| model | test acc | acc where cue != label | follows cue | pointing game | attribution localization "
            "| relevance on cue | train + eval min |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Time per training step (batch {b}, forward + loss + backward + AdamW step; median of "
            f"{args.timing_rounds} interleaved rounds after warm-up; {device}, torch threads: {torch.get_num_threads()}):",
            "",
            "| step | eager | compiled | eager / compiled |",
            "|---|---|---|---|",
            *[
                f"| {n} | {timing[(n, 'eager')] * 1e3:.0f} ms | {timing[(n, 'compiled')] * 1e3:.0f} ms | "
                f"{timing[(n, 'eager')] / timing[(n, 'compiled')]:.2f} |"
                for n in ("CE", "CE + SRD")
            ],
            f"| CE + SRD / CE | {timing[('CE + SRD', 'eager')] / timing[('CE', 'eager')]:.2f} | "
            f"{timing[('CE + SRD', 'compiled')] / timing[('CE', 'compiled')]:.2f} | |",
            "",
            f"torch.compile(fullgraph=True) of the SRD training step: {graphs} graph, {breaks} graph breaks"
            + (f" ({'; '.join(reasons)})" if reasons else "")
            + ". "
            + (
                "First-step (compile) time: " + ", ".join(f"{k} {v:.0f} s" for k, v in compile_time.items()) + "."
                if not args.no_compile
                else "Training ran eagerly."
            ),
        ]
    )
    print("\n" + table + "\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "history": dict(zip([n for n, _ in runs], histories)),
                "timing_s": {f"{a} / {c}": v for (a, c), v in timing.items()},
                "graphs": graphs,
                "graph_breaks": breaks,
                "train_s": train_time,
                "compile_s": compile_time,
            },
            f,
            indent=1,
        )
    plot(os.path.join(args.out, "right_reasons.png"), histories, examples, test_data)
    print(
        f"wrote {args.out}/results.md, results.json, right_reasons.png (total {(time.time() - t_start) / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
