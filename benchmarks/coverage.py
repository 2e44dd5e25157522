"""Coverage: which CNNs srd_ext explains, checked model by model.

Every torchvision CNN classifier and the timm sample of ``srd_ext.zoo`` (random weights with
randomised biases, norm parameters and BatchNorm statistics) are captured and explained once
(SRD-input, constant initial relevance, 2 images); each row gives the encoder output chosen, how
well relevance is conserved (``|input + unassigned - encoder| / |encoder|``), the share of the
relevance no pixel could carry, the captured forward against the model's own, and the capture
and explanation times. Refused models are listed with the reason.

Writes results/coverage/coverage.{md,json}; ``--update-readme`` also replaces the README's
coverage table and its list of supported ops (generated from the rule registry) between their
markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys

import torch

from srd_ext import rules, zoo
from srd_ext.fileio import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")


def rows_for(library, names, progress):
    out = []
    for k, name in enumerate(names):
        torch.manual_seed(0)
        model = None
        try:
            model = zoo.build(name, library)
            res = zoo.check(model, name, library)
        except Exception as e:  # noqa: BLE001 - a crash is a row of the table too
            res = zoo.ZooResult(name, library, False, reason=f"{type(e).__name__}: {e}")
        out.append(res)
        if progress:
            status = f"ok, encoder {res.encoder}" if res.explained else f"REFUSED: {res.reason[:120]}"
            print(f"[{library} {k + 1}/{len(names)}] {name}: {status}", file=sys.stderr, flush=True)
        del model
    return out


HEADER = (
    "| model | library | explained | encoder output | conservation error | unassigned | "
    "forward error | capture s | explain s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def row(r):
    """One model's line of the table."""
    if r.explained:
        return (
            f"| {r.name} | {r.library} | yes | `{r.encoder}` | {r.budget_error:.0e} | "
            f"{r.unassigned:.2%} | {r.forward_error:.0e} | {r.capture_seconds:.1f} | "
            f"{r.explain_seconds:.2f} |"
        )
    return f"| {r.name} | {r.library} | **no**: {r.reason} | | | | | | |"


def table(results):
    return "\n".join([HEADER] + [row(r) for r in results])


def summary(results):
    out = []
    for lib in ("torchvision", "timm"):
        rs = [r for r in results if r.library == lib]
        if rs:
            ok = sum(r.explained for r in rs)
            out.append(f"{lib}: {ok} of {len(rs)} explained ({ok / len(rs):.0%})")
    return "; ".join(out)


def render(results):
    """The README's coverage block: the summary, the excluded families, the table."""
    return (
        f"{summary(results)}. Excluded from torchvision's list: the transformer families "
        f"({', '.join(sorted(zoo.TORCHVISION_EXCLUDED))}).\n\n" + table(results)
    )


def splice(text, marker, body):
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {start} ... {end} markers")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libraries", nargs="+", default=["torchvision", "timm"], choices=["torchvision", "timm"])
    ap.add_argument("--models", nargs="*", default=None, help="only these models (default: the whole zoo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/coverage")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--ops-only", action="store_true", help="only regenerate the README's list of supported ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ops_only:
        with open(README) as f:
            text = splice(f.read(), "ops", rules.supported_table())
        atomic_write(README, text)
        print(rules.supported_table())
        return
    results = []
    for lib in args.libraries:
        if lib == "torchvision":
            names, excluded = zoo.torchvision_cnns()
        else:
            try:
                import timm  # noqa: F401
            except ImportError:
                print("timm is not installed: skipping its sample", file=sys.stderr)
                continue
            names = list(zoo.TIMM_SAMPLE)
        if args.models:
            names = [n for n in names if n in args.models]
        results += rows_for(lib, names, True)
    md = render(results)
    report = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "summary": summary(results),
        "results": [dataclasses.asdict(r) for r in results],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "coverage.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "coverage.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if args.update_readme:
        with open(README) as f:
            text = f.read()
        text = splice(splice(text, "coverage", md), "ops", rules.supported_table())
        atomic_write(README, text)


if __name__ == "__main__":
    main()
