import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from srd_ext.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPES_CLASSES,
    ImageNetSFolder,
    Images,
    ShapesDataset,
    dihedral,
    generate,
    image_folder,
    render,
    standardize,
    to_input,
)


def _digest(a) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    p = np.pad(m, r)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= p[r + dy : r + dy + m.shape[0], r + dx : r + dx + m.shape[1]]
    return out


def test_classes():
    assert len(SHAPES_CLASSES) == 10 and len(set(SHAPES_CLASSES)) == 10


def test_render_deterministic():
    for i in (0, 7, 1234):
        a = render(0, "train", i)
        b = render(0, "train", i)
        assert _digest(a[0]) == _digest(b[0]) and _digest(a[1]) == _digest(b[1]) and a[2] == b[2]
    assert _digest(render(0, "test", 3)[0]) != _digest(render(1, "test", 3)[0])
    assert _digest(render(0, "test", 3)[0]) != _digest(render(0, "test", 4)[0])


def test_items_reproducible_alone():
    x, m, y = generate("val", 6, start=10, standardize=False)
    ds = ShapesDataset("val", standardize=False)
    for j in (0, 5):
        img, mask, label = ds[10 + j]
        assert torch.equal(img, x[j]) and torch.equal(mask, m[j]) and label == y[j]


def test_generate_test_split():
    x, m, y = generate("test")
    assert x.shape == (752, 3, 112, 112) and x.dtype == torch.float32
    assert m.shape == (752, 112, 112) and m.dtype == torch.bool
    assert y.dtype == torch.int64 and torch.equal(y, torch.arange(752) % 10)
    raw, _, _ = generate("test", 8, uint8=True)
    assert raw.dtype == torch.uint8
    assert torch.allclose(x[:8], standardize(raw.float() / 255), atol=1e-6)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x[:8] * std + mean, raw.float() / 255, atol=1e-5)


def test_image_size_argument():
    x, m, y = generate("test", 3, image_size=64, standardize=False)
    assert x.shape == (3, 3, 64, 64) and m.shape == (3, 64, 64)
    assert 0 <= x.min() and x.max() <= 1
    assert all(mi.any() for mi in m)


def test_splits_disjoint():
    seen = {}
    for split in ("train", "val", "test"):
        x, _, _ = generate(split, 150, uint8=True)
        for img in x.numpy():
            seen.setdefault(_digest(img), set()).add(split)
    assert all(len(s) == 1 for s in seen.values())
    assert len(seen) == 450
    with pytest.raises(ValueError):
        render(0, "training", 0)


def test_masks_are_the_visible_object():
    for i in range(40):
        img, mask, label = render(0, "test", i)
        bare, mask2, _ = render(0, "test", i, draw_object=False)
        assert np.array_equal(mask, mask2)
        # Non-empty, sizeable, and the whole object lies inside the image.
        assert mask.sum() > 150
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        changed = np.abs(img.astype(int) - bare.astype(int)).max(-1) > 0
        # The object changes (almost) every masked pixel (a distractor of the same colour
        # under it can hide a few) and nothing beyond its antialiased rim.
        assert (changed & mask).sum() >= 0.9 * mask.sum()
        assert not (changed & ~_dilate(mask, 2)).any()
        # Its colour stands out from what it covers.
        inside = img[mask].astype(float).mean(0)
        under = bare[mask].astype(float).mean(0)
        assert np.linalg.norm(inside - under) > 40


def test_occluded_masks_exclude_occluder():
    # Some scenes draw a line across the object: the mask must have a hole there, i.e.
    # some object pixels inside the filled mask are not in the mask.
    holes = 0
    for i in range(40):
        img, mask, _ = render(0, "test", i)
        bare, _, _ = render(0, "test", i, draw_object=False)
        drawn = np.abs(img.astype(int) - bare.astype(int)).max(-1) > 0
        holes += int((_dilate(mask, 1) & ~mask & ~drawn).sum() > 10)
    assert holes > 0


def test_clutter_uncorrelated_with_label():
    # Mean colour and object position should not give away the class.
    x, m, y = generate("val", 200, standardize=False)
    mean_rgb = x.mean((2, 3))
    for c in range(3):
        per_class = torch.stack([mean_rgb[y == k, c].mean() for k in range(10)])
        assert per_class.std() < 0.05
    cy = torch.stack([torch.nonzero(mi).float().mean(0) for mi in m])
    assert torch.stack([cy[y == k].mean(0) for k in range(10)]).std(0).max() < 8


def test_to_input_is_standardized_float():
    raw, _, _ = generate("test", 2, image_size=32, uint8=True)
    x = to_input(raw)
    assert x.dtype == torch.float32 and torch.equal(x, standardize(raw.float() / 255))


def test_dihedral_moves_masks_with_their_images():
    x, m, _ = generate("test", 16, image_size=32, uint8=True)
    xo, mo = dihedral(x, torch.Generator().manual_seed(0), m)
    assert torch.equal(xo, dihedral(x, torch.Generator().manual_seed(0)))  # the same draws
    assert not torch.equal(xo, x)
    for i in range(16):
        turns = [(torch.rot90(x[i], k, (1, 2)), torch.rot90(m[i], k, (0, 1))) for k in range(4)]
        turns += [(a.flip(2), b.flip(1)) for a, b in turns]
        assert any(torch.equal(xo[i], a) and torch.equal(mo[i], b) for a, b in turns)


# --------------------------------------------------------------------------- folders


def _save_rgb(path, w, h, color=(200, 50, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def test_imagenet_s_folder(tmp_path):
    root = tmp_path / "ImageNetS50"
    # Wide image: object box in the middle of the (center-cropped) frame.
    _save_rgb(root / "validation" / "n01" / "a.JPEG", 400, 200)
    seg = np.zeros((200, 400, 3), np.uint8)
    seg[50:150, 200:300, 0] = 7  # class id 7 (R + 256 G)
    seg[0:20, 0:400] = (1000 % 256, 1000 // 256, 0)  # "ignore" band
    (root / "validation-segmentation" / "n01").mkdir(parents=True)
    Image.fromarray(seg).save(root / "validation-segmentation" / "n01" / "a.png")
    # Grayscale mask, other class; plus an image without a mask (skipped).
    _save_rgb(root / "validation" / "n02" / "b.JPEG", 224, 300)
    gray = np.zeros((300, 224), np.uint8)
    gray[100:200, 50:150] = 3
    (root / "validation-segmentation" / "n02").mkdir(parents=True)
    Image.fromarray(gray).save(root / "validation-segmentation" / "n02" / "b.png")
    _save_rgb(root / "validation" / "n02" / "c.JPEG", 224, 224)

    ds = ImageNetSFolder(str(root))
    assert len(ds) == 2 and ds.classes == ["n01", "n02"]
    img, mask, label = ds[0]
    assert img.shape == (3, 224, 224) and img.dtype == torch.float32
    assert mask.shape == (224, 224) and mask.dtype == torch.bool and label == 0
    # 400x200 -> 448x224, crop columns 112..335: box x 200..299 -> 224..335 -> 112..223.
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert 55 <= ys.min() <= 57 and 166 <= ys.max() <= 168
    assert 111 <= xs.min() <= 113 and xs.max() == 223
    assert not mask[:20].any()  # ignore band excluded
    raw = ImageNetSFolder(str(root), standardize=False)[0][0]
    assert torch.allclose(raw[:, 100, 100], torch.tensor([200, 50, 50]) / 255, atol=0.02)
    img, mask, label = ds[1]
    assert label == 1 and mask.shape == (224, 224)
    # 224x300 -> no resize, crop rows 38..261: box rows 100..199 -> 62..161.
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (62, 161, 50, 149)

    remapped = ImageNetSFolder(str(root), class_to_idx={"n01": 5, "n02": 9})
    assert [remapped[i][2] for i in range(2)] == [5, 9]
    with pytest.raises(FileNotFoundError):
        ImageNetSFolder(str(tmp_path / "nowhere"))


def test_image_folder(tmp_path):
    _save_rgb(tmp_path / "cat" / "x.png", 320, 240)
    _save_rgb(tmp_path / "dog" / "y.jpg", 240, 320, (10, 10, 10))
    ds = image_folder(str(tmp_path))
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    x, y = ds[1]
    assert x.shape == (3, 224, 224) and y == 1
    expected = (torch.tensor([10.0, 10, 10]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 112, 112], expected, atol=0.02)


# --------------------------------------------------------------------------- images of a run


def test_images_of_the_shapes_split():
    images = Images.shapes(32, first=3, limit=2)
    assert images.count == 2 and images.name(4) == "shapes/test/4"
    loaded = images.load(range(3, 5))
    x, m, y = generate("test", 2, image_size=32, start=3)
    assert torch.equal(loaded.images, x) and torch.equal(loaded.masks, m) and torch.equal(loaded.labels, y)
    assert loaded.indices == [3, 4] and loaded.failed == []
    assert Images.shapes(32, first=700).count == 52


def test_images_of_a_folder_report_unreadable_files(tmp_path):
    _save_rgb(tmp_path / "cat" / "x.png", 240, 240)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "y.jpg").write_bytes(b"not an image")
    images = Images.folder(image_folder(str(tmp_path)), str(tmp_path), limit=5)
    assert images.count == 2 and images.name(1) == "dog/y.jpg"
    loaded = images.load([0, 1])
    assert loaded.images.shape == (1, 3, 224, 224) and loaded.masks is None
    assert loaded.labels.tolist() == [0] and loaded.indices == [0]
    assert [(f["index"], f["image"]) for f in loaded.failed] == [(1, "dog/y.jpg")]
    assert images.load([1]).images is None
    assert torch.equal(images.first_readable(), loaded.images)
    assert Images.folder(image_folder(str(tmp_path)), str(tmp_path), first=1).first_readable() is None
