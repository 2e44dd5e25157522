"""benchmarks/eval_table.py --sanity: Quantus' MPRT and RandomLogit for every method, with the
all-zero maps counted; the same numbers from one process and from two (torchrun, gloo); the
user's model unchanged. Skipped where Quantus (or the comparison libraries) are absent."""

import copy
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from programs import ROOT

pytest.importorskip("quantus")
pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")

sys.path.insert(0, str(ROOT / "benchmarks"))
import quantus_support  # noqa: E402

SANITY = [
    "benchmarks/eval_table.py",
    "--model",
    "shapes-resnet",
    "--num-images",
    "8",
    "--batch-size",
    "4",
    "--methods",
    "srd-input,saliency,gradcam",
    "--sanity-only",
    "--examples",
    "0",
    "--no-progress",
]
KEYS = ("mprt_last", "mprt_last_ssim", "mprt_mean", "random_logit")
FLAGS = ("zero_original", "zero_randomised", "zero_other_class")


def run(nproc, argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    res = subprocess.run(head + argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sanity_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("sanity_one")
    return out, run(0, SANITY + ["--out", str(out)])


def test_sanity_values_are_finite_or_counted_as_zero_maps(sanity_one):
    out, stdout = sanity_one
    rows = read(out / "shapes-resnet.per-image.csv")
    assert len(rows) == 3 * 8
    for r in rows:
        flags = {f: float(r[f]) == 1.0 for f in FLAGS}
        for k in KEYS:
            v = float(r[k])
            other = "zero_other_class" if k == "random_logit" else "zero_randomised"
            assert math.isfinite(v) or flags["zero_original"] or flags[other], (r["method"], r["index"], k)
    summary = {r["method"]: r for r in read(out / "shapes-resnet.sanity.csv")}
    assert set(summary) == {"srd-input", "saliency", "gradcam"}
    for r in summary.values():
        assert int(r["unexplained_nan"]) == 0 and not r["failed"]
        assert all(math.isfinite(float(r[k])) for k in KEYS)
        n_zero = max(int(r[f]) for f in FLAGS)
        assert int(r["mprt_last_n"]) >= 8 - 2 * n_zero
    # The randomised shipped ResNet has no positive evidence for some images' class: zero maps counted.
    assert sum(int(r["zero_randomised"]) for r in summary.values()) > 0
    md = (out / "shapes-resnet.md").read_text()
    for key in ("## Sanity checks (Quantus)", "top-down", "seed 42", "num_classes=10", "np.trapz", "'original'"):
        assert key in md, key
    assert "MPRT ρ (all)↓" in stdout and "| Poi." not in stdout


def test_sanity_two_processes_give_the_numbers_of_one(sanity_one, tmp_path):
    ref, ref_stdout = sanity_one
    stdout = run(2, SANITY + ["--out", str(tmp_path)])
    assert [x for x in stdout.splitlines() if x.startswith("| ")] == [
        x for x in ref_stdout.splitlines() if x.startswith("| ")
    ]
    assert (tmp_path / "shapes-resnet.per-image.csv").read_bytes() == (ref / "shapes-resnet.per-image.csv").read_bytes()

    def numbers(path):
        return [{k: v for k, v in r.items() if not k.endswith("_per_image")} for r in read(path)]

    assert numbers(tmp_path / "shapes-resnet.sanity.csv") == numbers(ref / "shapes-resnet.sanity.csv")


def test_sanity_leaves_the_model_unchanged():
    from srd_ext import data, models

    model = models.load_model("shapes-resnet")
    before = copy.deepcopy(model.state_dict())
    grads = [p.requires_grad for p in model.parameters()]
    loaded = data.Images.shapes(112, limit=2).load(range(2))
    for method in ("srd-high", "saliency"):
        scores = quantus_support.sanity_scores(model, loaded.images, loaded.labels, method, seed=0, first=0)
        assert len(scores["mprt_layers"]) == 25 and list(scores["mprt_layers"])[0] == "fc"  # top-down
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads and not model.training
