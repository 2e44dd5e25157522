"""srd-explain on a temporary folder: good images, a corrupt image, a non-image file."""
import os

import numpy as np
import pytest
from PIL import Image

from srd_ext import cli, data, models


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    raw, _, _ = data.generate("test", 3, uint8=True)
    for i in range(3):
        Image.fromarray(raw[i].permute(1, 2, 0).numpy()).save(src / ("sub" if i == 2 else "") / f"img{i}.png")
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("hello")
    return tmp_path, src


def _listing(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.skipif(not (models.WEIGHTS_DIR / "shapes-vgg.pt").exists(), reason="shipped weights missing")
def test_cli_folder(folder, capsys):
    tmp, src = folder
    before = _listing(src)
    out = tmp / "out"
    code = cli.main([str(src), "--model", "shapes-vgg", "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1  # the corrupt image was skipped
    assert "broken.png" in err and "not a readable image" in err
    for stem in ("in/img0", "in/img1", "in/sub/img2"):
        assert (out / (stem + ".png")).exists()
        m = np.load(out / (stem + ".npy"))
        assert m.shape == (112, 112) and np.isfinite(m).all()
    assert _listing(src) == before  # nothing written to, nothing changed in the inputs
    # existing outputs are kept unless --overwrite
    stamp = os.path.getmtime(out / "in/img0.npy")
    cli.main([str(src / "img0.png"), "--model", "shapes-vgg", "--out", str(out / "in")])
    assert "exists, skipped" in capsys.readouterr().err
    assert os.path.getmtime(out / "in/img0.npy") == stamp
    assert cli.main([str(src / "img0.png"), "--model", "shapes-vgg", "--out", str(out / "in"),
                     "--overwrite", "--layer", "low"]) == 0
    assert np.load(out / "in/img0.npy").shape != (112, 112)


def test_cli_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--model", "resnet18"]) == 2
    assert "needs weights" in capsys.readouterr().err
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"garbage")
    assert cli.main([str(tmp_path), "--model", "resnet18", "--weights", str(bad)]) == 2
