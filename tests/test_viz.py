"""srd_ext.viz: maps placed on the photo, transparency at 0, colours centred at 0, panels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from srd_ext import viz


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_to_photo_same_size_is_identity():
    r = np.random.default_rng(1).normal(size=(30, 50)).astype(np.float32)
    np.testing.assert_allclose(viz.to_photo(r, (50, 30)), r, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "size,box",
    [
        ((400, 600), (25.0, 125.0, 375.0, 475.0)),
        ((600, 400), (125.0, 25.0, 475.0, 375.0)),
        ((97, 250), (6.06, 82.7, 90.94, 167.68)),
    ],
)
def test_to_photo_places_each_cell_on_its_part_of_the_box(size, box):
    h, w = 7, 5
    left, top, right, bottom = box
    for i, j in [(0, 0), (3, 2), (6, 4)]:
        r = np.zeros((h, w), np.float32)
        r[i, j] = 1.0
        m = viz.to_photo(r, size, box, fill=-1.0)
        assert m.shape == (size[1], size[0])
        y, x = np.unravel_index(np.argmax(m), m.shape)
        # the maximum lies inside the cell's rectangle of the box
        assert top + i * (bottom - top) / h - 1 <= y + 0.5 <= top + (i + 1) * (bottom - top) / h + 1
        assert left + j * (right - left) / w - 1 <= x + 0.5 <= left + (j + 1) * (right - left) / w + 1
        ys, xs = np.arange(size[1]) + 0.5, np.arange(size[0]) + 0.5
        inside = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
        assert (m[~inside] == -1.0).all() and (m[inside] >= 0).all()


def test_to_photo_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        viz.to_photo(np.zeros((1, 4, 4)), (4, 4))
    with pytest.raises(ValueError, match="right > left"):
        viz.to_photo(np.zeros((4, 4)), (4, 4), box=(3, 0, 1, 4))


def test_heat_is_transparent_at_zero_and_opacity_follows_abs_relevance():
    r = np.array([[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], np.float32)
    rgba = viz.heat_rgba(r, scale=1.0).astype(int)
    alpha = rgba[0, :, 3]
    assert alpha[3] == 0 and alpha[7] == 0  # zero and NaN: transparent
    assert alpha[4] == alpha[2] > 0 and alpha[5] == alpha[1] > alpha[4]  # |r| decides the opacity
    assert alpha[6] == alpha[5] == round(255 * viz.MAX_ALPHA)  # saturates at the scale
    red, blue = rgba[0, :, 0], rgba[0, :, 2]
    assert (red[4:7] > blue[4:7]).all() and (blue[0:3] > red[0:3]).all()  # diverging, centred at 0


def test_robust_scale_ignores_a_few_extreme_pixels():
    r = np.full((100, 100), 0.1, np.float32)
    r[0, 0] = 1000.0
    assert viz.robust_scale(r) == pytest.approx(0.1)
    sparse = np.zeros((100, 100), np.float32)
    sparse[5, 5] = -3.0  # percentile is 0: the maximum is used
    assert viz.robust_scale(sparse) == pytest.approx(3.0)
    assert viz.robust_scale(np.zeros((4, 4))) == 1.0


@pytest.mark.parametrize("size", [(400, 600), (640, 360), (123, 77)])
def test_overlay_at_the_photo_size_keeps_pixels_without_relevance(size):
    photo = _photo(*size)
    r = np.zeros((14, 14), np.float32)
    r[7, 7] = 1.0
    box = (0.0, 0.0, float(size[0]), float(size[1]))
    out = viz.overlay(photo, r, box=box, desaturate=0)
    assert out.size == photo.size and out.mode == "RGB"
    m = viz.to_photo(r, size, box)
    a, b = np.asarray(out).astype(int), np.asarray(photo).astype(int)
    assert (a[m == 0] == b[m == 0]).all()  # transparent where the relevance is 0
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert a[y, x, 0] > a[y, x, 2]  # red where it is largest


def test_overlay_dims_outside_the_box_and_accepts_tensors():
    photo = Image.new("RGB", (60, 40), (200, 200, 200))
    box = (10.0, 0.0, 50.0, 40.0)
    out = np.asarray(viz.overlay(photo, torch.zeros(8, 8), box=box, desaturate=0)).astype(int)
    assert (out[:, 20] == 200).all()
    assert (out[:, 5] == round(200 * viz.OUTSIDE_DIM)).all() and (out[:, 55] == out[:, 5]).all()
    # a (3, H, W) float image in [0, 1], as the datasets return them
    out2 = viz.overlay(torch.full((3, 40, 60), 200 / 255), torch.zeros(40, 60), desaturate=0)
    assert (np.asarray(out2) == 200).all()


def test_class_title():
    names = ("circle", "square", "star")
    p = torch.tensor([0.1, 0.7, 0.2])
    assert viz.class_title(names, p) == "predicted: square (p = 0.70)"
    assert viz.class_title(names, p, target=2) == "target: star (p = 0.20), predicted: square (p = 0.70)"
    with pytest.raises(ValueError, match="3 class probabilities"):
        viz.class_title(names, torch.ones(4) / 4)


def test_panel_has_image_map_with_colorbar_and_overlay():
    photo = _photo(300, 200)
    r = np.random.default_rng(0).normal(size=(28, 28)).astype(np.float32)
    box = (50.0, 0.0, 250.0, 200.0)
    fig = viz.panel(photo, r, "predicted: circle (p = 0.97)", box=box)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["image", "relevance", "overlay"] and len(fig.axes) == 4  # + the colorbar
    assert fig._suptitle.get_text() == "predicted: circle (p = 0.97)"
    lo, hi = fig.axes[1].images[0].get_clim()
    assert lo == -hi and hi == pytest.approx(viz.robust_scale(viz.to_photo(r, photo.size, box, fill=np.nan)))
    img = Image.open(io.BytesIO(viz.png_bytes(fig)))
    assert img.format == "PNG" and img.width > 600


def test_colorbar_image_runs_from_blue_to_red():
    a = np.asarray(viz.colorbar_image(100, 4)).astype(int)
    assert a[0, 0, 2] > a[0, 0, 0] and a[0, -1, 0] > a[0, -1, 2]
    assert (a[0, 50] >= 250).all()  # the middle is 0: white shows through


# Runs examples/demo.py as a program, counting the calls of srd_ext.viz.draw it makes.
_DEMO = """
import json, runpy, sys
from srd_ext import viz
calls = []
real = viz.draw
viz.draw = lambda *a, **kw: calls.append(1) or real(*a, **kw)
sys.argv = ["demo.py"] + sys.argv[1:]
g = runpy.run_path("examples/demo.py", run_name="__main__")
print(json.dumps({"draws": len(calls), "photos": [[w, h] for w, h, _, _ in g["PHOTOS"]]}))
"""


def _run_demo(*args):
    import json
    import subprocess
    import sys

    from programs import ROOT

    res = subprocess.run([sys.executable, "-c", _DEMO, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_demo_draws_with_viz(tmp_path):
    from srd_ext import models

    if not (models.WEIGHTS_DIR / "shapes-vgg.pt").exists():
        pytest.skip("shipped weights missing")
    out = _run_demo("--n", "2", "--out", tmp_path / "demo.png")
    assert out["draws"] == 2 * 6  # 2 images x (2 models x 3 layers), all drawn by srd_ext.viz
    assert Image.open(tmp_path / "demo.png").size[0] > 500
    out = _run_demo("--photos", tmp_path / "photos")
    sizes = sorted(Image.open(p).size for p in (tmp_path / "photos").iterdir())
    assert sizes == sorted(tuple(wh) for wh in out["photos"])
