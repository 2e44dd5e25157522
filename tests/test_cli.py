"""srd-explain: preprocessing as the model expects, nothing lost or overwritten, every input
accounted for, pictures at the photo's size, and a report that renders in a browser."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models as tvm

import srd_ext
from srd_ext import cli, data, models, viz

pytestmark = pytest.mark.skipif(not (models.WEIGHTS_DIR / "shapes-vgg.pt").exists(), reason="shipped weights missing")

SIZES = [(400, 600), (600, 400), (150, 150)]  # (width, height) of the test photos


def photo(i, size, side=None):
    """A shapes test scene as a photo of ``size``: rendered square, then centre-cropped or padded."""
    w, h = size
    side = side or max(w, h)
    img, _, _ = data.render(0, "test", i, image_size=side)
    canvas = Image.new("RGB", (w, h), (120, 110, 100))
    canvas.paste(Image.fromarray(img), ((w - side) // 2, (h - side) // 2))
    return canvas


def files_digest(root):
    """Relative path -> sha256 of every file under ``root``."""
    out = {}
    for r, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(r, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def summary(out_text):
    m = re.search(r"(\d+) input\(s\): (\d+) written, (\d+) skipped, (\d+) failed", out_text)
    assert m, out_text
    return tuple(int(g) for g in m.groups())


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        photo(i, size).save(src / ("sub" if i == 2 else "") / f"img{i}.png")
    photo(3, (300, 200)).convert("L").save(src / "grey.png")
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("hello")
    return tmp_path, src


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(
    "name,weights", [("resnet18", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2"), ("vgg16_bn", "IMAGENET1K_V1")]
)
@pytest.mark.parametrize("size", [(400, 600), (600, 400), (512, 512), (97, 250)])
def test_transforms_equal_torchvision_weights_transforms(name, weights, size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = models.transforms_for(name, weights)
    theirs = tvm.get_model_weights(name)[weights].transforms()
    assert torch.equal(ours(img), theirs(img))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert torch.equal(ours(t), theirs(t))  # uint8 tensors too


@pytest.mark.parametrize("name", models.SHAPES_MODELS)
def test_shapes_transforms_equal_the_training_preprocessing(name):
    t = models.transforms_for(name)
    x, _, _ = data.generate("test", 2)
    raw, _, _ = data.generate("test", 2, uint8=True)
    for i in range(2):
        ours = t(Image.fromarray(raw[i].permute(1, 2, 0).numpy()))
        torch.testing.assert_close(ours, x[i], rtol=0, atol=1e-6)
    big = Image.fromarray(data.render(0, "test", 0, image_size=224)[0])
    assert t(big).shape == (3, 112, 112)


@pytest.mark.parametrize("size", [(400, 600), (600, 400), (97, 250), (333, 333)])
@pytest.mark.parametrize("crop", ["default", None])
def test_box_maps_model_pixels_back_to_the_photo(size, crop):
    """A bright dot in the photo, passed through the transform and placed back with box()."""
    t = models.transforms_for("resnet18")
    if crop is None:
        t = dataclasses.replace(t, crop=None)
    w, h = size
    for px, py in [(w // 2, h // 2), (w // 2 + w // 8, h // 2 - h // 9)]:
        a = np.zeros((h, w, 3), np.uint8)
        a[max(0, py - 2) : py + 3, max(0, px - 2) : px + 3] = 255
        x = t(Image.fromarray(a))
        m = viz.to_photo(x[0].numpy(), size, t.box(size), fill=x[0].min().item())
        y, xx = np.unravel_index(np.argmax(m), m.shape)
        assert abs(y - py) <= 2 and abs(xx - px) <= 2
    left, top, right, bottom = t.box(size)
    nw, nh = t.resized_size(size)
    assert min(nw, nh) == t.resize and abs(nw / nh - w / h) < 2 / min(nw, nh)  # aspect ratio kept
    if crop is None:
        assert (left, top, right, bottom) == (0, 0, w, h)
    else:
        assert right - left == pytest.approx(224 * w / nw) and bottom - top == pytest.approx(224 * h / nh)


def test_transform_errors_name_what_is_accepted():
    t = models.transforms_for("resnet18")
    with pytest.raises(ValueError, match=r"crop \(300\) is larger than resize \(256\)"):
        dataclasses.replace(t, crop=300)
    with pytest.raises(ValueError, match="positive int"):
        dataclasses.replace(t, resize=0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        dataclasses.replace(t, interpolation="cubic-ish")
    with pytest.raises(ValueError, match=r"IMAGENET1K_V1"):
        models.transforms_for("resnet18", "IMAGENET1K_V2")


class Recording(srd_ext.Explainer):
    """The real explainer, recording what the CLI feeds it."""

    seen = []

    def explain(self, x, *a, **kw):
        if x.shape[0]:
            Recording.seen.extend(x.clone())
        return super().explain(x, *a, **kw)


@pytest.fixture
def recording(monkeypatch):
    Recording.seen = []
    monkeypatch.setattr(srd_ext, "Explainer", Recording)
    return Recording.seen


def test_cli_feeds_the_model_its_own_transforms(tmp_path, capsys, recording):
    paths = []
    for i, size in enumerate([(400, 600), (600, 400)]):
        paths.append(tmp_path / f"p{i}.png")
        photo(i, size).save(paths[-1])
    t = models.transforms_for("shapes-vgg")

    assert run(capsys, *paths, "--model", "shapes-vgg", "--out", tmp_path / "a")[0] == 0
    assert len(recording) == 2
    for p, x in zip(paths, recording):
        assert torch.equal(x, t(Image.open(p).convert("RGB")))

    recording.clear()
    assert run(capsys, *paths, "--model", "shapes-vgg", "--resize", 150, "--crop", 120, "--out", tmp_path / "b")[0] == 0
    for p, x in zip(paths, recording):
        assert x.shape == (3, 120, 120)
        assert torch.equal(x, dataclasses.replace(t, resize=150, crop=120)(Image.open(p).convert("RGB")))

    recording.clear()
    assert run(capsys, *paths, "--model", "shapes-vgg", "--crop", "none", "--out", tmp_path / "c")[0] == 0
    assert [tuple(x.shape) for x in recording] == [(3, 168, 112), (3, 112, 168)]  # aspect ratio kept
    for p in paths:
        w, h = Image.open(p).size
        assert np.load(tmp_path / "c" / (p.name + ".srd-input.npy")).shape == (h, w)


def test_cli_torchvision_model_uses_its_weights_transforms(tmp_path, capsys, recording):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(tvm.resnet18(weights=None).state_dict(), weights)  # random weights, nothing downloaded
    p = tmp_path / "wide.jpg"
    photo(5, (320, 240)).save(p, quality=95)
    code, out, err = run(capsys, p, "--model", "resnet18", "--weights", weights, "--out", tmp_path / "o")
    assert code == 0, err
    expected = tvm.ResNet18_Weights.IMAGENET1K_V1.transforms()(Image.open(p).convert("RGB"))
    assert len(recording) == 1 and torch.equal(recording[0], expected)
    assert Image.open(tmp_path / "o" / "wide.jpg.srd-input.png").size == (320, 240)
    m = np.load(tmp_path / "o" / "wide.jpg.srd-input.npy")
    assert m.shape == (240, 320)
    left, _, right, _ = models.transforms_for("resnet18").box((320, 240))
    assert (m[:, : int(left)] == 0).all() and (m[:, int(np.ceil(right)) :] == 0).all()  # outside the crop


def test_photos_are_read_as_people_see_them(tmp_path):
    a = (np.arange(200 * 300).reshape(200, 300) * 1.09).astype(np.uint16)  # 0 .. 65398
    Image.fromarray(a).save(tmp_path / "deep.png")  # 16-bit greyscale
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(cli.read_photo(str(tmp_path / "deep.png")))
    assert rgb.shape == (200, 300, 3) and rgb.max() > 128  # scaled from 16 bits, not clipped to 255
    np.testing.assert_array_equal(rgb[..., 0], np.round(a / 65535 * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    photo(0, (300, 200)).save(tmp_path / "phone.jpg", exif=exif)
    assert cli.read_photo(str(tmp_path / "phone.jpg")).size == (200, 300)


# ----------------------------------------------------------------------------- outputs
def test_cli_folder(folder, capsys):
    tmp, src = folder
    before = files_digest(src)
    out = tmp / "out"
    code, stdout, err = run(capsys, src, "--model", "shapes-vgg", "--out", out, "--batch-size", 2)
    assert code == 1  # the corrupt image failed
    assert re.search(r"failed \S*broken\.png: not a readable image", err)
    assert summary(stdout) == (5, 4, 0, 1)
    found = {
        "photos/img0.png": SIZES[0],
        "photos/img1.png": SIZES[1],
        "photos/sub/img2.png": SIZES[2],
        "photos/grey.png": (300, 200),
    }
    for stem, (w, h) in found.items():
        over = Image.open(out / (stem + ".srd-input.png"))
        assert over.size == (w, h)  # the photo's own size, whatever its aspect ratio
        m = np.load(out / (stem + ".srd-input.npy"))
        assert m.shape == (h, w) and m.dtype == np.float32 and np.isfinite(m).all() and np.abs(m).max() > 0
    assert not (out / "photos" / "notes.txt.srd-input.png").exists()
    assert files_digest(src) == before  # nothing written to, nothing changed in the inputs
    # the progress bar names the input file it is working on
    assert re.search(r"\d+/5 \[[^\]]*img1\.png\]", err)
    assert not [f for f in files_digest(out) if f.endswith(".tmp")]


def test_formats_and_panels(tmp_path, capsys):
    p = tmp_path / "a.png"
    photo(0, (300, 200)).save(p)
    assert run(capsys, p, "--model", "shapes-resnet", "--format", "npy", "--out", tmp_path / "n")[0] == 0
    assert sorted(os.listdir(tmp_path / "n")) == ["a.png.srd-input.npy"]
    code, _, err = run(
        capsys,
        p,
        "--model",
        "shapes-resnet",
        "--format",
        "png",
        "--panel",
        "--layer",
        "input,low",
        "--out",
        tmp_path / "p",
    )
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "p")) == [
        "a.png.srd-input.panel.png",
        "a.png.srd-input.png",
        "a.png.srd-low.panel.png",
        "a.png.srd-low.png",
    ]
    panel = Image.open(tmp_path / "p" / "a.png.srd-low.panel.png")
    assert panel.width > 2 * panel.height  # image | map + colorbar | overlay, side by side
    assert Image.open(tmp_path / "p" / "a.png.srd-low.png").size == (300, 200)


def test_colliding_names_keep_both_results(tmp_path, capsys):
    a, b = tmp_path / "a" / "pics", tmp_path / "b" / "pics"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    photo(0, (400, 300)).save(a / "coffee.png")
    photo(1, (300, 400)).save(a / "coffee.jpg", quality=95)  # same stem, other extension
    photo(2, (200, 250)).save(b / "coffee.png")  # same folder name and file name as a/pics/coffee.png
    out = tmp_path / "out"
    code, stdout, err = run(capsys, a, b, "--model", "shapes-vgg", "--out", out)
    assert code == 0, err
    assert summary(stdout) == (3, 3, 0, 0)
    shapes = {f: np.load(out / "pics" / f).shape for f in os.listdir(out / "pics") if f.endswith(".npy")}
    assert shapes == {
        "coffee.png.srd-input.npy": (300, 400),
        "coffee.jpg.srd-input.npy": (400, 300),
        "coffee.png~2.srd-input.npy": (250, 200),
    }
    assert "coffee.png~2" in err  # the renamed outputs are announced
    # the same for two files given by name
    code, stdout, err = run(
        capsys, a / "coffee.png", b / "coffee.png", "--model", "shapes-vgg", "--out", tmp_path / "flat"
    )
    assert code == 0 and summary(stdout) == (2, 2, 0, 0)
    assert np.load(tmp_path / "flat" / "coffee.png.srd-input.npy").shape == (300, 400)
    assert np.load(tmp_path / "flat" / "coffee.png~2.srd-input.npy").shape == (250, 200)


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_equal_to_the_input_folder_leaves_inputs_untouched(tmp_path, capsys, overwrite):
    src = tmp_path / "photos"
    src.mkdir()
    photo(0, (300, 200)).save(src / "x.png")
    photo(1, (200, 300)).save(src / "y.jpg", quality=95)
    # a photo named like x.png's output: explaining x.png must not replace it
    photo(2, (150, 150)).save(src / "x.png.srd-input.png")
    flag = ["--overwrite"] if overwrite else []
    inputs = files_digest(src)

    code, stdout, err = run(
        capsys, src / "x.png", src / "y.jpg", src / "x.png.srd-input.png", "--model", "shapes-vgg", "--out", src, *flag
    )
    assert code == 0, err
    assert summary(stdout) == (3, 2, 1, 0)
    assert re.search(r"skipped \S*x\.png: its output \S*x\.png\.srd-input\.png would replace the input", err)
    after = files_digest(src)
    assert {k: after[k] for k in inputs} == inputs  # byte-identical inputs
    assert "y.jpg.srd-input.png" in after and "x.png.srd-input.png.srd-input.png" in after

    # The folder again, with the outputs of the first run in it: those are not photos.
    code, stdout, err = run(capsys, src, "--model", "shapes-vgg", "--out", src, *flag)
    skipped = re.findall(r"skipped (\S+): (.+)", err)
    n_in, written, n_skip, failed = summary(stdout)
    assert n_in == written + n_skip + failed and failed == 0 and n_skip == len(skipped)
    reasons = dict(skipped)
    assert "named like an srd-explain output" in reasons[str(src / "x.png.srd-input.png.srd-input.png")]
    # the folder is searched under its own name: outputs go to <out>/photos/, never onto an input
    after2 = files_digest(src)
    assert {k: after2[k] for k in after} == after


def test_every_skip_and_failure_is_reported(folder, capsys):
    tmp, src = folder
    out = tmp / "out"
    assert run(capsys, src / "img0.png", "--model", "shapes-vgg", "--out", out / "photos")[0] == 0
    stamp = os.path.getmtime(out / "photos" / "img0.png.srd-input.npy")
    code, stdout, err = run(capsys, src, src / "img1.png", tmp / "missing.png", "--model", "shapes-vgg", "--out", out)
    n_in, written, n_skip, failed = summary(stdout)
    # 5 images found in the folder, img1.png given again, one missing path
    assert (n_in, written, n_skip, failed) == (7, 3, 2, 2) and code == 1
    lines = dict(re.findall(r"srd-explain: (?:skipped|failed) (\S+): (.+)", err))
    assert len(lines) == n_skip + failed
    assert "exist" in lines[str(src / "img0.png")] and "--overwrite" in lines[str(src / "img0.png")]
    assert "same file as" in lines[str(src / "img1.png")]
    assert "no such file" in lines[str(tmp / "missing.png")]
    assert "not a readable image" in lines[str(src / "broken.png")]
    assert os.path.getmtime(out / "photos" / "img0.png.srd-input.npy") == stamp  # kept without --overwrite


def test_writes_are_atomic(folder, capsys, monkeypatch):
    tmp, src = folder
    out = tmp / "out"
    real = cli.npy_bytes
    calls = []

    def flaky(a):  # the second image's .npy cannot be written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a)

    monkeypatch.setattr(cli, "npy_bytes", flaky)
    code, stdout, err = run(capsys, src / "img0.png", src / "img1.png", "--model", "shapes-vgg", "--out", out)
    assert code == 1 and summary(stdout) == (2, 1, 0, 1)
    assert "could not write its outputs" in err and "No space left" in err
    assert sorted(os.listdir(out)) == ["img0.png.srd-input.npy", "img0.png.srd-input.png"]  # no part of img1

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Staged, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(src / "img1.png"), "--model", "shapes-vgg", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["img0.png.srd-input.npy", "img0.png.srd-input.png"]  # no temp files


def test_usage_errors_write_nothing(tmp_path, capsys):
    p = tmp_path / "a.png"
    photo(0, (120, 100)).save(p)
    out = tmp_path / "out"
    cases = [
        (["--layer", "nonexistent.layer"], "--layer"),
        (["--layer", "input,,low"], "empty layer name"),
        (["--crop", "abc"], "--crop must be a number of pixels or 'none'"),
        (["--resize", "100", "--crop", "150"], "larger than resize"),
        (["--tv-weights", "IMAGENET1K_V1"], "--tv-weights applies to torchvision models"),
        (["--target", "10"], "--target must be in 0..9"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, p, "--model", "shapes-vgg", "--out", out, *extra)
        assert code == 2 and message in err, (extra, err)
        assert not out.exists()
    code, _, err = run(capsys, p, "--model", "shapes-vgg", "--out", p)
    assert code == 2 and "is a file; give a folder" in err
    assert run(capsys, p, "--model", "resnet18", "--out", out)[0] == 2
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"garbage")
    code, _, err = run(capsys, p, "--model", "resnet18", "--weights", bad, "--out", out)
    assert code == 2 and "cannot read weights file" in err and not out.exists()


# ----------------------------------------------------------------------------- report
def make_report(tmp, src, capsys, *extra):
    out = tmp / "out"
    code, stdout, err = run(
        capsys, src, "--model", "shapes-resnet", "--layer", "input,high", "--report", "--out", out, *extra
    )
    assert code == 1, err  # broken.png
    return out / "report.html", stdout, err


def test_report_is_one_self_contained_page(folder, capsys):
    tmp, src = folder
    report, stdout, _ = make_report(tmp, src, capsys)
    page = report.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count('alt="photo"') == 4 and page.count('alt="SRD-input"') == 4 and page.count('alt="SRD-high"') == 4
    assert "<th>SRD-input</th><th>SRD-high</th>" in page  # the layers side by side
    assert "broken.png" in page and "not a readable image" in page
    assert "predicted: " in page
    # a second run does not replace it without --overwrite, and says so before any work
    code, _, err = run(capsys, src, "--model", "shapes-resnet", "--report", "--out", tmp / "out")
    assert code == 2 and "report.html exists" in err


CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var d = document.createElement('pre'); d.id = 'check';
  d.textContent = JSON.stringify(imgs.map(function (i) { return [i.complete, i.naturalWidth, i.naturalHeight]; }));
  document.body.appendChild(d);
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(folder, capsys):
    tmp, src = folder
    report, _, _ = make_report(tmp, src, capsys)
    page = report.read_text()
    probe = tmp / "probe.html"
    probe.write_text(page.replace("</body>", CHECK))
    # no network: any request for something outside the page would fail
    base = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--user-data-dir=" + str(tmp / "chromium-profile"),
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout, re.S)
    assert m, dom.stderr[-2000:]
    images = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(images) == page.count("<img ") and len(images) == 1 + 4 * 3  # legend + photo, 2 overlays per row
    assert all(c and w > 0 and h > 0 for c, w, h in images)  # every picture decoded
    shot = tmp / "report.png"
    subprocess.run(
        base + ["--window-size=1400,1000", f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120
    )
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert a.shape[:2] == (1000, 1400)
    assert (a.std(axis=(0, 1)) > 20).all()  # not a blank page: photos and overlays are drawn
    if os.environ.get("SRD_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SRD_KEEP_SCREENSHOT"])
