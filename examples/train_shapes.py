"""Train the shapes-benchmark models shipped in ``srd_ext/weights`` from scratch.

    python examples/train_shapes.py                      # both models, default settings
    python examples/train_shapes.py --model shapes-vgg --epochs 20 --out /tmp/weights

Training is seeded and deterministic on CPU: the same seed and ``--threads`` give
bit-identical weights (a different thread count changes float summation order, hence the
weights slightly). It prints validation accuracy after each epoch and the test accuracy
(752 images) at the end, and writes ``<out>/<model>.pt`` (float32 state_dict).

The shipped weights were made with ``--threads 1`` and otherwise default settings
(10000 training images; shapes-vgg 24 epochs, shapes-resnet 30 epochs); the README gives their
test accuracy and training times. Both models pass 98 % validation accuracy well before the last
epoch (vgg: epoch 9, resnet: epoch 17), so ``--epochs`` can be cut for a quick run.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from srd_ext.data import DEFAULT_SIZES, dihedral, generate, to_input
from srd_ext.models import WEIGHTS_DIR, shapes_resnet, shapes_vgg

BUILDERS = {"shapes-vgg": shapes_vgg, "shapes-resnet": shapes_resnet}
# Per-model defaults: (epochs, peak learning rate).
DEFAULTS = {"shapes-vgg": (24, 2e-3), "shapes-resnet": (30, 4e-3)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 250) -> float:
    model.eval()
    correct = sum(
        (model(to_input(x[i : i + bs])).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(x), bs)
    )
    return correct / len(x)


def train(name, data, epochs, lr, batch_size, seed, out):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} {epoch + 1}/{epochs}", leave=False)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = dihedral(to_input(xtr[idx]), g)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(
            f"{name} epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  "
            f"val acc {accuracy(model, xva, yva):.4f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )
    minutes = (time.time() - t0) / 60
    test_acc = accuracy(model, xte, yte)
    print(f"{name}: test acc {test_acc:.4f} on {len(xte)} images, trained in {minutes:.1f} min", flush=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.pt")
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)", flush=True)
    return test_acc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["all", *BUILDERS], default="all")
    p.add_argument("--epochs", type=int, default=None, help="default: per model")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per model)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy CPU)")
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t = time.time()
    data = [generate(s, n, uint8=True)[::2] for s, n in (("train", args.train_size), ("val", None), ("test", None))]
    print(
        f"generated {args.train_size} train / {len(data[1][0])} val / {len(data[2][0])} test images "
        f"in {time.time() - t:.0f} s",
        flush=True,
    )
    names = list(BUILDERS) if args.model == "all" else [args.model]
    for name in names:
        epochs, lr = DEFAULTS[name]
        train(name, data, args.epochs or epochs, args.lr or lr, args.batch_size, args.seed, args.out)


if __name__ == "__main__":
    main()
