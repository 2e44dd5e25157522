"""``srd-explain``: SRD relevance maps for image files and folders.

    srd-explain IMAGE_OR_DIR... --model NAME [--weights FILE] [--tv-weights NAME] [--target N]
                [--layer LAYER[,LAYER...]] [--resize N] [--crop N|none] [--format png|npy|both]
                [--panel] [--report] [--manifest] [--out DIR] [--device cpu|cuda] [--batch-size N]
                [--overwrite] [--timeout SECONDS]
    torchrun --nproc_per_node=N -m srd_ext.cli IMAGE_OR_DIR... --model NAME ...

Each photo is preprocessed as the model expects (``srd_ext.models.transforms_for``: shorter side
resized, centre crop, normalization; ``--resize``/``--crop`` override), explained, and the map is
placed back on the part of the photo the model saw. Per input ``<name>.<ext>`` and layer ``L``
it writes, under ``--out`` (folders keep their structure below ``--out/<folder name>``):

- ``<name>.<ext>.srd-L.png``: the map over the photo, at the photo's own size (``viz.overlay``);
- ``<name>.<ext>.srd-L.npy``: the map in the photo's coordinates, (H, W) float32, 0 outside the crop;
- ``<name>.<ext>.srd-L.panel.png`` with ``--panel``: image, map with colorbar, overlay, titled
  with the class and its probability;

with ``--report`` one self-contained HTML page, ``--out/report.html``, and with ``--manifest``
``--out/manifest.csv``, one row per input (status, reason, size, predicted class, output files).

Under torchrun (``srd_ext.distributed``) rank 0 finds and plans the inputs, every process explains
its share of the batches and writes the files of the inputs it explained, and rank 0 writes the
report, the manifest and the summary. Batches are fixed by the input list (``--batch-size``
consecutive inputs), not by the number of processes or by what exists already, so the maps are
the same whoever computes them. A stopped run is finished by running it again: inputs whose
outputs exist are skipped; with ``--report``/``--manifest`` the finished inputs are also recorded
in ``--out/.srd-explain-run/`` so that the report and manifest of the resumed run cover them.

Nothing is lost: the source's extension stays in the output names; outputs that would still
collide (same file name from two folders) get a ``~2``, ``~3`` suffix, decided before any write;
an output is never written over an input, even with ``--overwrite``; existing outputs are kept
unless ``--overwrite``; every file is written to a temporary file and renamed into place. Every
input ends written, skipped or failed, each skip and failure with its reason.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import os
import re
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .fileio import Staged, atomic_write, csv_text, npy_bytes, remove_stale_temporaries

if TYPE_CHECKING:
    from .distributed import ResumeLog

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = ("png", "npy", "both")
REPORT_NAME = "report.html"
MANIFEST_NAME = "manifest.csv"
STATE_DIR = ".srd-explain-run"  # finished inputs of a run with --report/--manifest, while it runs
# Names this tool writes: found in a folder, they are earlier results, not photos.
OUTPUT_NAME = re.compile(r"\.srd-[^/\\]+\.(png|npy)$")
THUMB = 256  # longer side of the report's pictures, in pixels


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2, nothing written."""


@dataclasses.dataclass
class Item:
    """One input file and what became of it."""

    path: str  # as found (the argument, or joined from the folder walk)
    stem: str  # output path relative to --out, without the ".srd-<layer>..." suffix
    status: str = "todo"  # todo, written, skipped, failed
    reason: str = ""
    outputs: Dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> path
    exists: bool = False  # skipped only because its outputs exist: explained with its batch, not written
    earlier: bool = False  # written by an earlier, stopped run of the same command (resumed)
    own: bool = False  # its outputs, if any exist, are a stopped run's: they may be replaced


# ------------------------------------------------------------------------------- planning
def find_inputs(paths: Sequence[str]) -> Tuple[List[Item], List[str]]:
    """Items for every file given or found in a given folder (searched recursively; image
    extensions and files without extension), and notes on folders without images."""
    items, notes = [], []
    for p in paths:
        if os.path.isdir(p):
            base = os.path.basename(os.path.abspath(p))
            n = len(items)
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if f.startswith(".") and f.endswith(".tmp"):
                        continue  # a temporary file of an interrupted write
                    if not (f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.splitext(f)[1]):
                        continue
                    full = os.path.join(root, f)
                    item = Item(full, os.path.join(base, os.path.relpath(full, p)))
                    if OUTPUT_NAME.search(f):
                        item.status, item.reason = (
                            "skipped",
                            (
                                "named like an srd-explain output (*.srd-<layer>.png/.npy) in a searched "
                                "folder; pass it by name to explain it"
                            ),
                        )
                    items.append(item)
            if len(items) == n:
                notes.append(f"no image files in folder {p}")
        elif os.path.isfile(p):
            items.append(Item(p, os.path.basename(p)))
        else:
            items.append(Item(p, os.path.basename(p), "failed", "no such file or folder"))
    return items, notes


def _layer_tag(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer)


def _key(path: str) -> str:
    # Names that differ only in case are one file on some file systems: treat them as one.
    return os.path.normcase(os.path.abspath(path)).casefold()


def _identity(path: str) -> Optional[Tuple[int, int]]:
    """(device, inode) of the file ``path`` leads to (through links), None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def input_identities(items: List[Item]) -> Dict[Tuple[int, int], str]:
    """The files read as inputs (also those skipped), by identity."""
    ids = {}
    for it in items:
        i = _identity(it.path) if it.status != "failed" else None
        if i is not None:
            ids.setdefault(i, it.path)
    return ids


def input_signature(path: str) -> Optional[List[int]]:
    """(size, mtime in ns) of an input file: a resumed run takes an earlier result only for an
    input that has not changed since."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _output_kinds(layers: Sequence[str], fmt: str, panel: bool) -> List[Tuple[str, str]]:
    """(kind ``png:L`` / ``npy:L`` / ``panel:L``, file name suffix) of every output of an input."""
    kinds = []
    for layer in layers:
        tag = _layer_tag(layer)
        if fmt in ("png", "both"):
            kinds.append((f"png:{layer}", f".srd-{tag}.png"))
        if fmt in ("npy", "both"):
            kinds.append((f"npy:{layer}", f".srd-{tag}.npy"))
        if panel:
            kinds.append((f"panel:{layer}", f".srd-{tag}.panel.png"))
    return kinds


def _skip_repeats(items: List[Item]) -> None:
    """The same file given twice (or found twice, or through a link) is explained once."""
    first: Dict[Tuple[int, int], Item] = {}
    for it in items:
        if it.status != "todo":
            continue
        i = _identity(it.path)
        if i in first:
            it.status, it.reason = "skipped", f"same file as {first[i].path}, which is explained once"
        elif i is not None:
            first[i] = it


def _name_outputs(it: Item, out: str, kinds: List[Tuple[str, str]], taken: set) -> Optional[str]:
    """Set ``it``'s output paths, with a ``~N`` suffix where an earlier input took the names
    (``taken``, which gains them); a note when it needed one."""
    stem, n = it.stem, 1
    while True:
        outs = {k: os.path.join(out, stem + suffix) for k, suffix in kinds}
        if not any(_key(p) in taken for p in outs.values()):
            break
        n += 1
        stem = f"{it.stem}~{n}"
    note = f"{it.path}: outputs named {stem}.srd-* ({it.stem}.srd-* are another input's)" if n > 1 else None
    it.stem, it.outputs = stem, outs
    taken.update(_key(p) for p in outs.values())
    return note


def _resumed_record(it: Item, resumed: Optional[Dict[str, dict]]) -> Optional[dict]:
    """The stopped run's record of ``it`` if it is this input's, as planned now: unchanged, with
    the same outputs, and written or begun (not a write that was refused)."""
    rec = (resumed or {}).get(_key(it.path))
    if rec is not None and not (
        rec.get("state") in ("done", "intent")
        and rec.get("stem") == it.stem
        and rec.get("outputs") == it.outputs
        and rec.get("input") == input_signature(it.path)
    ):
        return None
    return rec


def _decide(it: Item, inputs: Dict[Tuple[int, int], str], rec: Optional[dict], overwrite: bool) -> None:
    """Whether ``it``, its outputs named, is written: never over an input, not again if a stopped
    run (``rec``) wrote it, not over existing outputs without ``overwrite``."""
    # An output that exists and is (a link to) an input file is never written, even with
    # --overwrite. One that does not exist cannot be an input: inputs exist.
    outs = it.outputs
    hit = next(((p, inputs[_identity(p)]) for p in outs.values() if _identity(p) in inputs), None)
    if hit is not None:
        it.status, it.reason = (
            "skipped",
            (
                f"its output {hit[0]} would replace the input {hit[1]} (inputs are never written, "
                f"even with --overwrite); choose another --out"
            ),
        )
    elif rec is not None:
        if rec["state"] == "done" and all(os.path.isfile(p) for p in outs.values()):
            it.status, it.earlier = "written", True
        else:
            it.own = True
    elif not overwrite:
        existing = [p for p in outs.values() if os.path.lexists(p)]
        if existing:
            more = f" and {len(existing) - 1} more of its outputs" if len(existing) > 1 else ""
            it.status, it.reason = "skipped", f"{existing[0]}{more} exist(s) (--overwrite replaces them)"
            it.exists = True


def plan_outputs(
    items: List[Item],
    out: str,
    layers: Sequence[str],
    fmt: str,
    panel: bool,
    overwrite: bool,
    resumed: Optional[Dict[str, dict]] = None,
) -> List[str]:
    """Decide every output path before anything is written, and mark the items to skip (the
    same file twice, an output that is an input, outputs that exist without ``overwrite``).
    ``resumed``: the records of a stopped run of the same command (input key -> record); an
    input it finished, unchanged and with all its outputs in place, is marked written (earlier),
    and outputs it had begun are its own to replace. Returns notes about outputs given a ``~N``
    suffix."""
    kinds = _output_kinds(layers, fmt, panel)
    inputs = input_identities(items)
    _skip_repeats(items)
    notes, taken = [], set()
    for it in items:
        if it.status != "todo":
            continue
        note = _name_outputs(it, out, kinds, taken)
        if note is not None:
            notes.append(note)
        _decide(it, inputs, _resumed_record(it, resumed), overwrite)
    return notes


# ------------------------------------------------------------------------------- writing
def read_photo(path: str) -> Image.Image:
    """The photo as people see it (EXIF orientation applied), RGB; 16-bit greyscale scaled."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray((a / top * 255).round().clip(0, 255).astype(np.uint8), "L")
        return im.convert("RGB")


# ------------------------------------------------------------------------------- report
def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    img = img.copy()
    img.thumbnail((THUMB, THUMB), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


REPORT_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .3em 0; }
p.meta { margin: .2em 0; font-size: .9em; color: #444; }
table.grid { border-collapse: collapse; margin-top: 1em; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 6px; vertical-align: top; }
table.grid th { background: #f4f4f4; font-size: .85em; }
td.pic img { display: block; max-width: 256px; max-height: 256px; }
td.pic a { font-size: .8em; }
td.name { font-size: .8em; min-width: 10em; max-width: 16em; overflow-wrap: anywhere; }
td.name .cls { font-size: 1.1em; margin-top: .6em; }
td.name .cls b { display: block; }
.legend { display: flex; align-items: center; gap: .5em; font-size: .85em; margin-top: .6em; }
table.skips td { font-size: .85em; padding: 2px 8px; }
"""


def write_report(
    path: str, rows: List[dict], items: List[Item], layers: Sequence[str], header: Dict[str, str], overwrite: bool
) -> None:
    from . import viz

    e = html.escape
    counts = {s: sum(it.status == s for it in items) for s in ("written", "skipped", "failed")}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>srd-explain report</title>",
        f"<style>{REPORT_CSS}</style></head><body>",
        "<h1>srd-explain report</h1>",
    ]
    for k, v in header.items():
        parts.append(f'<p class="meta"><b>{e(k)}:</b> {e(v)}</p>')
    parts.append(
        f'<p class="meta"><b>inputs:</b> {len(items)}: {counts["written"]} written, '
        f"{counts['skipped']} skipped, {counts['failed']} failed</p>"
    )
    parts.append(
        '<div class="legend"><span>against the class</span>'
        f'<img alt="colour scale" src="{_data_uri(viz.colorbar_image(), "PNG")}">'
        "<span>for the class; transparent: no relevance; dimmed: outside the crop the "
        "model saw</span></div>"
    )
    parts.append(
        '<table class="grid"><tr><th>file and class</th><th>photo</th>'
        + "".join(f"<th>SRD-{e(layer)}</th>" for layer in layers)
        + "</tr>"
    )
    for r in rows:
        classes = "".join(f"<b>{e(line)}</b>" for line in r["classes"])
        cells = [
            f'<td class="name" title="{e(r["path"])}">{e(r["name"])}<br>{r["size"][0]}&times;{r["size"][1]} px'
            f'<div class="cls">{classes}</div></td>',
            f'<td class="pic"><img alt="photo" src="{r["photo"]}"></td>',
        ]
        for layer in layers:
            link = r["links"].get(layer)
            img = f'<img alt="SRD-{e(layer)}" src="{r["overlays"][layer]}">'
            cells.append(f'<td class="pic">{img}' + (f'<a href="{e(link)}">full size</a>' if link else "") + "</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    others = [it for it in items if it.status in ("skipped", "failed")]
    if others:
        parts.append('<h2>Skipped and failed</h2><table class="skips">')
        for it in others:
            parts.append(f"<tr><td>{e(it.status)}</td><td>{e(it.path)}</td><td>{e(it.reason)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    atomic_write(path, "\n".join(parts), overwrite)


# ------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="srd-explain",
        description="SRD relevance maps for image files and folders.",
        epilog="Outputs per input NAME.EXT and layer L: NAME.EXT.srd-L.png (overlay at the photo's "
        "size), NAME.EXT.srd-L.npy (map in the photo's coordinates), NAME.EXT.srd-L.panel.png "
        "(--panel); --report adds OUT/report.html.",
    )
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ap.add_argument("--model", required=True, help="shapes-vgg, shapes-resnet, resnet18..152, vgg11..19[_bn]")
    ap.add_argument("--weights", default=None, help="state_dict file (required for torchvision models)")
    ap.add_argument(
        "--tv-weights",
        default=None,
        metavar="NAME",
        help="torchvision models: the torchvision weights whose transforms() to use "
        "(default IMAGENET1K_V1; IMAGENET1K_V2 for ResNet-50/101/152's V2 checkpoints)",
    )
    ap.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    ap.add_argument(
        "--layer",
        action="append",
        default=None,
        metavar="LAYER[,LAYER...]",
        help="input, high, low or a module path; repeat or separate by commas for several (default: input)",
    )
    ap.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="N",
        help="resize the shorter side to N pixels (default: the model's transforms)",
    )
    ap.add_argument(
        "--crop",
        default=None,
        metavar="N|none",
        help="centre crop of N x N pixels, or none for the whole resized photo (default: the model's transforms)",
    )
    ap.add_argument("--format", default="both", choices=FORMATS, help="files per input (default: both)")
    ap.add_argument("--panel", action="store_true", help="also write image | map + colorbar | overlay panels")
    ap.add_argument("--report", action="store_true", help=f"also write OUT/{REPORT_NAME}, one self-contained page")
    ap.add_argument(
        "--manifest",
        action="store_true",
        help=f"also write OUT/{MANIFEST_NAME}, one row per input: status, reason, size, predicted class "
        "and probability, output files (read it with pandas.read_csv or the csv module)",
    )
    ap.add_argument("--out", default="srd_out", metavar="DIR", help="output folder (default: srd_out)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    from srd_ext import distributed

    distributed.add_timeout_argument(ap)
    return ap


def _layers(arg: Optional[List[str]]) -> List[str]:
    if not arg:
        return ["input"]
    layers = []
    for a in arg:
        for layer in a.split(","):
            layer = layer.strip()
            if not layer:
                raise UsageError(f"--layer {a!r} has an empty layer name; give names such as input,high,low")
            if layer not in layers:
                layers.append(layer)
    return layers


def _transform(args):
    from . import models

    if args.model in models.SHAPES_MODELS:
        if args.tv_weights is not None:
            raise UsageError(f"--tv-weights applies to torchvision models; {args.model} has its own transforms")
        t = models.transforms_for(args.model)
    else:
        t = models.transforms_for(args.model, args.tv_weights or "IMAGENET1K_V1")
    changes = {}
    if args.resize is not None:
        if args.resize < 1:
            raise UsageError(f"--resize must be a positive number of pixels, got {args.resize}")
        changes["resize"] = args.resize
    if args.crop is not None:
        if args.crop.lower() == "none":
            changes["crop"] = None
        else:
            try:
                changes["crop"] = int(args.crop)
            except ValueError:
                raise UsageError(f"--crop must be a number of pixels or 'none', got {args.crop!r}") from None
            if changes["crop"] < 1:
                raise UsageError(f"--crop must be a positive number of pixels or 'none', got {args.crop}")
    try:
        return dataclasses.replace(t, **changes)
    except ValueError as e:
        raise UsageError(f"--resize/--crop: {e} (the model's transforms: resize {t.resize}, crop {t.crop})") from None


def _describe(t) -> str:
    crop = "no crop" if t.crop is None else f"centre crop {t.crop}x{t.crop}"
    return (
        f"shorter side resized to {t.resize} ({t.interpolation}), {crop}, "
        f"mean {tuple(round(v, 3) for v in t.mean)}, std {tuple(round(v, 3) for v in t.std)}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed

    try:
        env = distributed.Env.from_environ()
    except distributed.DistributedError as e:
        print(f"srd-explain: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, env)
    except UsageError as e:
        if env.is_main:  # every process finds the same mistake; one says it
            print(f"srd-explain: {e}", file=sys.stderr)
        return 2


def _prediction(names: Sequence[str], probs: torch.Tensor, target: Optional[int]) -> dict:
    pred = int(probs.argmax())
    out = {
        "predicted": pred,
        "predicted_class": names[pred] if pred < len(names) else str(pred),
        "probability": float(probs[pred]),
    }
    if target is not None:
        out["target_probability"] = float(probs[target])
    return out


def manifest_fields(layers: Sequence[str], kinds: Sequence[str]) -> List[str]:
    fields = [
        "input",
        "status",
        "reason",
        "width",
        "height",
        "predicted",
        "predicted_class",
        "probability",
        "target",
        "target_probability",
    ]
    for layer in layers:
        fields += [f"{kind}_{layer}" for kind in kinds]
    return fields


def write_manifest(
    path: str,
    items: List[Item],
    records: Dict[int, dict],
    out: str,
    layers: Sequence[str],
    fmt: str,
    panel: bool,
    target: Optional[int],
    overwrite: bool,
) -> None:
    """OUT/manifest.csv: one row per input in input order; output paths relative to OUT."""
    kinds = [k for k, on in (("png", fmt in ("png", "both")), ("npy", fmt in ("npy", "both")), ("panel", panel)) if on]
    rows = []
    for i, it in enumerate(items):
        row = {"input": it.path, "status": it.status, "reason": it.reason}
        rec = records.get(i)
        if it.status == "written" and rec is not None:
            row.update(
                width=rec["size"][0],
                height=rec["size"][1],
                target=target,
                **{k: (repr(v) if isinstance(v, float) else v) for k, v in rec["prediction"].items()},
            )
            for kind_layer, p in it.outputs.items():
                kind, layer = kind_layer.split(":", 1)
                row[f"{kind}_{layer}"] = os.path.relpath(p, out)
        rows.append(row)
    atomic_write(path, csv_text(rows, manifest_fields(layers, kinds)), overwrite)


def _run(args, env) -> int:
    import srd_ext
    from srd_ext import distributed, models

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = distributed.resolve_device(args.device, env)
    except distributed.DistributedError as e:
        raise UsageError(str(e)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    layers = _layers(args.layer)
    try:
        transform = _transform(args)
        model = models.load_model(args.model, args.weights, device=device)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    names = models.class_names(args.model)
    if args.target is not None and not 0 <= args.target < len(names):
        raise UsageError(
            f"--target must be in 0..{len(names) - 1} ({args.model} has {len(names)} classes), got {args.target}"
        )
    explainer = srd_ext.Explainer(model)
    side = transform.crop or transform.resize
    try:  # unknown layers fail here, before anything is read or written
        with torch.no_grad():
            explainer.explain(torch.zeros(0, 3, side, side, device=device), None, layer=layers)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--layer: {e}") from None
    try:
        with distributed.Session(args.device, args.timeout, env) as session:
            return _explain_all(args, session, explainer, transform, layers, names)
    except distributed.DistributedError as e:
        if env.is_main:
            print(f"srd-explain: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------- the run
# srd-explain in steps: find the inputs, plan their outputs (and resume a stopped run), explain
# this rank's share of the batches (distributed.run_share), write each input's files, finish.
@dataclasses.dataclass
class Job:
    """What a run was asked to do, checked before any input is read."""

    args: argparse.Namespace
    explainer: object  # srd_ext.Explainer
    transform: object  # srd_ext.models.Transforms
    layers: List[str]
    names: Sequence[str]  # class names

    @property
    def report_path(self) -> str:
        return os.path.join(self.args.out, REPORT_NAME)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.args.out, MANIFEST_NAME)

    def settings(self, device: torch.device) -> dict:
        """What decides the outputs: a stopped run is resumed only with the same."""
        keys = ("inputs", "model", "weights", "tv_weights", "target", "resize", "crop", "format")
        keys += ("panel", "report", "manifest", "batch_size")
        settings = {k: getattr(self.args, k) for k in keys}
        settings.update(layers=list(self.layers), device=device.type, out=os.path.abspath(self.args.out))
        return settings


def _find_step(job: Job) -> Tuple[List[Item], List[str]]:
    """Rank 0: the inputs and notes (:func:`find_inputs`); the report and manifest must not
    replace an input, nor an earlier one without --overwrite."""
    args = job.args
    items, notes = find_inputs(args.inputs)
    for flag, path in (("--report", job.report_path), ("--manifest", job.manifest_path)):
        if not getattr(args, flag[2:]):
            continue
        clash = input_identities(items).get(_identity(path))
        if clash is not None:
            raise UsageError(f"the {flag[2:]} {path} would replace the input {clash}; choose another --out")
        if os.path.lexists(path) and not args.overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    return items, notes


def _open_resume_log(job: Job, session) -> Tuple[Optional["ResumeLog"], Dict[str, dict]]:
    """Collective. With --report/--manifest the finished inputs are recorded in a resume log, so
    that a stopped run, started again, can put the inputs it finished in the report and manifest.
    Returns the log (None without either) and the records of a stopped run (input key -> record)."""
    from srd_ext import distributed

    if not (job.args.report or job.args.manifest):
        return None, {}
    folder = os.path.join(job.args.out, STATE_DIR)
    log = distributed.ResumeLog(folder, job.settings(session.device), session, "srd-explain run")
    try:
        return log, log.open()
    except distributed.SettingsMismatch as e:
        raise UsageError(str(e)) from None


def _plan_step(job: Job, items: List[Item], notes: List[str], resumed: Dict[str, dict]):
    """Rank 0: :func:`plan_outputs`, then the temporary files of a killed run's writes go before
    anyone writes again. Returns the items and all notes."""
    args = job.args
    more = plan_outputs(items, args.out, job.layers, args.format, args.panel, args.overwrite, resumed)
    targets: Dict[str, set] = {}
    for it in items:
        for p in it.outputs.values():
            targets.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    for folder, names in targets.items():
        remove_stale_temporaries(folder, names)
    return items, notes + more


def _announce(items: List[Item], notes: List[str], out: str) -> None:
    """Rank 0: the notes, every skip and failure so far with its reason, and what is resumed."""
    for n in notes:
        print(f"srd-explain: note: {n}", file=sys.stderr)
    for it in items:
        if it.status in ("skipped", "failed"):
            print(f"srd-explain: {it.status} {it.path}: {it.reason}", file=sys.stderr)
    earlier = sum(it.earlier for it in items)
    if earlier:
        print(
            f"srd-explain: resuming: {earlier} input(s) were written by an earlier run of this command "
            f"({os.path.join(out, STATE_DIR)})",
            file=sys.stderr,
        )


class ItemWriter:
    """The end of one input on this rank: its files written (all or none), its record in the
    resume log, its outcome (``status``, ``reason`` and, once written, ``record``), a step of
    the progress bar."""

    def __init__(self, job: Job, items: List[Item], log, progress):
        self.job = job
        self.items = items
        self.log = log  # a distributed.ResumeLog, or None
        self.progress = progress  # a distributed.Progress

    def fail(self, i: int, reason: str) -> dict:
        it = self.items[i]
        it.status, it.reason = "failed", reason
        self.progress.write(f"srd-explain: failed {it.path}: {reason}", file=sys.stderr)
        self.progress.update(1)
        return {"status": "failed", "reason": reason}

    def write(self, i: int, photo: Image.Image, maps: Dict[str, torch.Tensor], k: int, probs: torch.Tensor) -> dict:
        """Input ``i``, explained as row ``k`` of ``maps``, with class probabilities ``probs``."""
        from srd_ext import viz

        job, it = self.job, self.items[i]
        report = {
            "name": it.stem,
            "path": it.path,
            "size": photo.size,
            "overlays": {},
            "links": {},
            "classes": viz.class_title(job.names, probs, job.args.target, sep="\n").split("\n"),
        }
        record = {"stem": it.stem, "outputs": it.outputs, "input": input_signature(it.path)}
        staged = Staged(job.args.overwrite or it.own)
        try:
            self._stage(staged, it, photo, {layer: maps[layer][k] for layer in job.layers}, probs, report)
            self._commit(staged, it, record)
        except OSError as e:
            return self.fail(i, f"could not write its outputs ({type(e).__name__}: {e})")
        finally:
            staged.discard()
        it.status = "written"
        if job.args.report:
            report["photo"] = _data_uri(photo)
        record.update(
            state="done",
            size=list(photo.size),
            prediction=_prediction(job.names, probs, job.args.target),
            report=report if job.args.report else None,
        )
        if self.log is not None:
            self.log.add(_key(it.path), record)
        self.progress.update(1)
        return {"status": "written", "reason": "", "record": record}

    def _stage(self, staged: Staged, it: Item, photo: Image.Image, maps: Dict[str, torch.Tensor], probs, report):
        """The input's files, each layer's ``maps`` placed back on the photo, into ``staged``;
        the report's pictures and links into ``report``."""
        from srd_ext import viz

        job = self.job
        box = job.transform.box(photo.size)
        title = viz.class_title(job.names, probs, job.args.target)
        for layer in job.layers:
            on_photo = viz.to_photo(maps[layer].float().cpu().numpy(), photo.size, box)
            scale = viz.robust_scale(on_photo)
            over = viz.overlay(photo, on_photo, scale, box)
            if f"png:{layer}" in it.outputs:
                staged.add(it.outputs[f"png:{layer}"], viz.png_bytes(over))
                report["links"][layer] = os.path.relpath(it.outputs[f"png:{layer}"], job.args.out)
            if f"npy:{layer}" in it.outputs:
                staged.add(it.outputs[f"npy:{layer}"], npy_bytes(on_photo))
            if f"panel:{layer}" in it.outputs:
                caption = f"{os.path.basename(it.path)}, SRD-{layer}: {title}"
                fig = viz.panel(photo, on_photo, caption, scale=scale, box=box)
                staged.add(it.outputs[f"panel:{layer}"], viz.png_bytes(fig))
            if job.args.report:
                report["overlays"][layer] = _data_uri(over)

    def _commit(self, staged: Staged, it: Item, record: dict) -> None:
        """Put the files in place; from just before, they are this run's (even if it stops now)."""
        if self.log is not None:
            self.log.add(_key(it.path), dict(record, state="intent"))
        try:
            staged.commit()
        except OSError:
            if self.log is not None:
                self.log.add(_key(it.path), dict(record, state="refused"))
            raise


def _load_batch(job: Job, items: List[Item], members: List[int], writer: ItemWriter, outcomes: Dict[int, dict]):
    """(index, photo, model input) of the ``members`` of a batch that could be read; an input to
    be written that cannot be read fails (one bad file must not end the run)."""
    loaded = []
    for i in members:
        it = items[i]
        if it.status == "todo":
            writer.progress.working_on(it.path, os.path.basename(it.path))
        try:
            photo = read_photo(it.path)
            loaded.append((i, photo, job.transform(photo)))
        except Exception as e:
            if it.status == "todo":
                outcomes[i] = writer.fail(i, f"not a readable image ({type(e).__name__}: {str(e)[:120]})")
    return loaded


def _explain_block(job: Job, device, items: List[Item], block, writer: ItemWriter) -> Dict[int, dict]:
    """One batch: its inputs explained together and those to be written written. Inputs skipped
    because their outputs exist (or written by a stopped run) are explained with it but not
    written, so the others' maps do not depend on them being there. Returns the outcomes by
    input index."""
    outcomes: Dict[int, dict] = {}
    members = [i for i in block if items[i].status == "todo" or items[i].exists or items[i].earlier]
    writer.progress.working_on(f"{items[members[0]].path} and the rest of its batch")
    groups: Dict[tuple, list] = {}
    for entry in _load_batch(job, items, members, writer, outcomes):
        groups.setdefault(tuple(entry[2].shape), []).append(entry)  # without a crop, one batch per shape
    for group in groups.values():
        if not any(items[i].status == "todo" for i, _, _ in group):
            continue
        x = torch.stack([g[2] for g in group]).to(device)
        try:
            with torch.no_grad():
                maps, logits = job.explainer.explain(x, job.args.target, layer=job.layers, return_logits=True)
        except Exception as e:
            for i, _, _ in group:
                if items[i].status == "todo":
                    outcomes[i] = writer.fail(i, f"explanation failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        probs = logits.float().softmax(1).cpu()
        for k, (i, photo, _) in enumerate(group):
            if items[i].status == "todo":
                writer.progress.working_on(items[i].path, os.path.basename(items[i].path))
                outcomes[i] = writer.write(i, photo, maps, k, probs[k])
    return outcomes


def _explain_batches(job: Job, session, items: List[Item], log):
    """This rank's share of the batches. Batches are --batch-size consecutive inputs of the list,
    the same whatever exists already and however many processes share them; a batch is
    explained if one of its inputs is to be written. Returns (outcomes by input index, error or
    None, the progress bar)."""
    from srd_ext import distributed

    todo_total = sum(it.status == "todo" for it in items)
    units = [
        b for b in distributed.blocks(len(items), job.args.batch_size) if any(items[i].status == "todo" for i in b)
    ]
    progress = distributed.Progress(session, todo_total, "srd-explain", disable=todo_total < 2)
    writer = ItemWriter(job, items, log, progress)
    new, error = distributed.run_share(
        session,
        units,
        lambda block: _explain_block(job, session.device, items, block, writer),
        None,  # each input is recorded in the log as it is written (ItemWriter)
        progress,
        "srd-explain",
        describe=lambda block: f"the batch of {items[block.start].path}",
        count=None,  # the bar counts inputs (ItemWriter), not blocks
    )
    if log is not None:
        log.close()
    return {i: o for part in new.values() for i, o in part.items()}, error, progress


def _records(items: List[Item], resumed: Dict[str, dict], gathered: List[Dict[int, dict]]) -> Dict[int, dict]:
    """Rank 0: every rank's outcomes applied to ``items``; the records of the written inputs
    (this run's and a stopped run's) by input index."""
    records: Dict[int, dict] = {}
    for i, it in enumerate(items):
        if it.earlier:
            records[i] = resumed[_key(it.path)]
    for part in gathered:
        for i, o in part.items():
            items[i].status, items[i].reason = o["status"], o["reason"]
            if "record" in o:
                records[i] = o["record"]
    return records


def _write_tables(job: Job, items: List[Item], records: Dict[int, dict]) -> Tuple[List[str], bool]:
    """Rank 0: the report and the manifest asked for. Returns what was written and whether all was."""
    args, written, ok = job.args, [], True
    if args.report:
        rows = [records[i]["report"] for i in sorted(records)]
        header = {
            "model": args.model + (f" ({args.weights})" if args.weights else ""),
            "preprocessing": _describe(job.transform),
            "explained class": "predicted" if args.target is None else f"{args.target} ({job.names[args.target]})",
            "layers": ", ".join(job.layers),
        }
        try:
            write_report(job.report_path, rows, items, job.layers, header, args.overwrite)
            written.append(f"report {job.report_path}")
        except OSError as e:
            print(f"srd-explain: could not write the report {job.report_path}: {e}", file=sys.stderr)
            ok = False
    if args.manifest:
        fmt, panel, target = args.format, args.panel, args.target
        try:
            write_manifest(job.manifest_path, items, records, args.out, job.layers, fmt, panel, target, args.overwrite)
            written.append(f"manifest {job.manifest_path}")
        except OSError as e:
            print(f"srd-explain: could not write the manifest {job.manifest_path}: {e}", file=sys.stderr)
            ok = False
    return written, ok


def _finish(job: Job, items: List[Item], resumed: Dict[str, dict], gathered, log) -> int:
    """Rank 0, once every rank finished its share: the report, the manifest and the summary.
    Returns the exit status."""
    records = _records(items, resumed, gathered)
    counts = {s: sum(it.status == s for it in items) for s in ("written", "skipped", "failed")}
    if sum(counts.values()) != len(items):  # cannot happen; a bug if it does
        raise RuntimeError(f"srd-explain lost track of inputs: {counts} for {len(items)} inputs")
    written, ok = _write_tables(job, items, records)
    if log is not None and ok:
        log.remove()  # every input is accounted for in the report and manifest now
    earlier = sum(it.earlier for it in items)
    print(
        f"srd-explain: {len(items)} input(s): {counts['written']} written, {counts['skipped']} skipped, "
        f"{counts['failed']} failed; outputs in {job.args.out}"
        + "".join(f"; {w}" for w in written)
        + (f"; {earlier} of the written inputs were written by an earlier run of this command" if earlier else "")
    )
    return 1 if counts["failed"] or not ok else 0


def _explain_all(args, session, explainer, transform, layers, names) -> int:
    """The run on every rank, step by step; returns the exit status (rank 0's, on every rank)."""
    from srd_ext import distributed

    job = Job(args, explainer, transform, list(layers), names)
    items, notes = session.share(lambda: _find_step(job))  # a usage error is raised on every rank
    if session.distributed:
        session.check_shared_folder(args.out)  # every process writes its maps there
    log, resumed = _open_resume_log(job, session)
    items, notes = session.share(lambda: _plan_step(job, items, notes, resumed))
    if session.is_main:
        _announce(items, notes, args.out)
    outcomes, error, progress = _explain_batches(job, session, items, log)
    if not distributed.finish_run(session, error, progress, "srd-explain", "The inputs written so far are kept"):
        return 1
    gathered = session.gather(outcomes)
    if not session.is_main:
        return session.broadcast(None)
    return session.broadcast(_finish(job, items, resumed, gathered, log))


if __name__ == "__main__":
    sys.exit(main())
