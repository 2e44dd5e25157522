"""The synthetic "shapes" benchmark: images with exact object masks.

Each image shows one *class object* whose shape alone decides the label (see
``SHAPES_CLASSES``), on a textured background (gradients, stripes, value noise) with
distractors: irregular blobs, scribbles and bars in the same colour distribution as
objects (often in the object's own colour), plus pixel noise. The object's position,
size, aspect, rotation and colour are random. Distractors never touch the object; a thin
line may cross *over* it, so the mask is the visible part.

Image ``i`` of split ``s`` is rendered from an RNG seeded by ``(seed, s, i)``, so any item
is reproducible on its own and the splits never share a seed. Labels cycle through the
classes (``label = i % 10``), so every prefix of a split is balanced.

Images are rendered as uint8 RGB; the tensors returned are float32 in ``[0, 1]`` or,
with ``standardize=True`` (default), standardized with the ImageNet mean/std, which is what
every model of :mod:`srd_ext.models` expects. Masks mark the pixels at least half covered
by the visible object (the object is drawn antialiased).
"""

from __future__ import annotations

import colorsys
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .imagenet import _standardize, to_tensor

__all__ = [
    "SHAPES_CLASSES",
    "SPLITS",
    "DEFAULT_SIZES",
    "ShapesDataset",
    "dihedral",
    "generate",
    "render",
]

SHAPES_CLASSES: Tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "semicircle",
    "ring",
    "crescent",
    "heart",
    "arrow",
)
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 10000, "val": 500, "test": 752}  # train: what train_shapes.py uses

_SS = 4  # supersampling factor of the antialiased rasterizer


# --------------------------------------------------------------------------- shapes
# Each class is a list of (polygon, fill) in unit coordinates (extent about 1);
# fill 0 cuts a hole into what was painted before.


def _ngon(n: int, r: float = 1.0, phase: float = 0.0, center=(0.0, 0.0)) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([center[0] + r * np.cos(t), center[1] + r * np.sin(t)], 1)


def _star(points: int, r_out: float, r_in: float) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    p = np.stack([x, y], 1)
    p -= (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max()


def _build_shapes() -> List[List[Tuple[np.ndarray, int]]]:
    w, l = 0.25, 0.95
    cross = np.array(
        [[-w, -l], [w, -l], [w, -w], [l, -w], [l, w], [w, w], [w, l], [-w, l], [-w, w], [-l, w], [-l, -w], [-w, -w]]
    )
    arrow = np.array([[-1.0, -0.2], [0.15, -0.2], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6], [0.15, 0.2], [-1.0, 0.2]])
    t = np.linspace(0, np.pi, 49)
    semi = 0.9 * (np.stack([np.cos(t), -np.sin(t)], 1) + [0, 0.5])
    return [
        [(_ngon(96, 0.9), 1)],  # circle
        [(_ngon(4, 1.05, np.pi / 4), 1)],  # square
        [(_ngon(3, 1.05, -np.pi / 2) + [0, 0.2], 1)],  # triangle
        [(_star(5, 1.05, 0.42), 1)],  # star
        [(cross, 1)],  # cross
        [(semi, 1)],  # semicircle
        [(_ngon(96, 0.95), 1), (_ngon(96, 0.55), 0)],  # ring
        [(_ngon(96, 0.95, center=(0.22, 0)), 1), (_ngon(96, 0.8, center=(0.67, 0)), 0)],  # crescent
        [(_heart(), 1)],  # heart
        [(arrow, 1)],  # arrow
    ]


_SHAPES = _build_shapes()


# --------------------------------------------------------------------------- rendering


def _color(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.15:  # some greys, so hue alone never separates object and clutter
        return np.full(3, rng.uniform(0.05, 0.95), np.float32)
    hsv = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    return np.array(colorsys.hsv_to_rgb(*hsv), np.float32)


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(32):
        c = _color(rng)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _value_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multi-octave noise in [0, 1] (cheap Perlin substitute)."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for cells in (3, 6, 12, 24)[: rng.integers(2, 5)]:
        grid = rng.random((cells, cells)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        out += amp * np.asarray(up)
        total += amp
        amp *= 0.55
    out /= total
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = _color(rng), _color(rng), _color(rng)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    bg = c0[None, None] + (c1 - c0)[None, None] * t[..., None]
    kind = rng.integers(3)
    if kind == 0:  # stripes
        b = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(3, 14)
        phase = rng.uniform(0, 2 * np.pi)
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(b) * xx + np.sin(b) * yy) + phase)
        if rng.random() < 0.5:
            tex = (tex > 0.5).astype(np.float32)
    elif kind == 1:
        tex = _value_noise(rng, size)
    else:  # checker-like plaid of two sinusoids
        f1, f2 = rng.uniform(2, 8, 2)
        tex = 0.5 + 0.25 * (np.sin(2 * np.pi * f1 * xx) + np.sin(2 * np.pi * f2 * yy))
    amp = rng.uniform(0.25, 0.7)
    bg = bg + amp * tex[..., None] * (c2 - bg)
    return bg.astype(np.float32)


def _canvas(size: int) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size * _SS, size * _SS), 0)
    return img, ImageDraw.Draw(img)


def _coverage(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.reduce(_SS), dtype=np.float32) * np.float32(1 / 255)


def _pts(p: np.ndarray) -> List[Tuple[float, float]]:
    return [tuple(q) for q in (p * _SS).tolist()]


def _place(poly: np.ndarray, center, radius: float, angle: float, aspect: float) -> np.ndarray:
    p = poly * np.array([aspect, 1.0 / aspect]) * radius
    c, s = np.cos(angle), np.sin(angle)
    return p @ np.array([[c, s], [-s, c]]) + np.asarray(center)


def _blob(rng: np.random.Generator) -> np.ndarray:
    """Irregular closed blob: low-order radial harmonics, none dominant enough to look like a class shape."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k, amax in ((1, 0.25), (2, 0.35), (3, 0.25), (4, 0.08)):
        r += rng.uniform(0, amax) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3, None)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1) / r.max()


def _scribble(rng: np.random.Generator, start, step: float) -> np.ndarray:
    n = rng.integers(3, 7)
    ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.9, n))
    steps = step * rng.uniform(0.5, 1.0, (n, 1)) * np.stack([np.cos(ang), np.sin(ang)], 1)
    return np.concatenate([[start], start + np.cumsum(steps, 0)])


def _distractor(rng: np.random.Generator, S: int, u: float) -> np.ndarray:
    """Coverage of one clutter item: an irregular blob, a scribble or a bar."""
    cv, dr = _canvas(S)
    kind = rng.random()
    pos = rng.uniform(0, S, 2)
    if kind < 0.5:
        p = _place(_blob(rng), pos, rng.uniform(5, 13) * u, rng.uniform(0, 2 * np.pi), 1.0)
        dr.polygon(_pts(p), fill=255)
    elif kind < 0.8:
        dr.line(
            _pts(_scribble(rng, pos, 14 * u)), fill=255, width=int(round(rng.uniform(1.5, 4) * u * _SS)), joint="curve"
        )
    else:
        t = rng.uniform(0, np.pi)
        d = rng.uniform(10, 30) * u * np.array([np.cos(t), np.sin(t)])
        dr.line(_pts(np.stack([pos - d, pos + d])), fill=255, width=int(round(rng.uniform(2, 6) * u * _SS)))
    return _coverage(cv, S)


def render(
    seed: int, split: str, index: int, image_size: int = 112, draw_object: bool = True
) -> Tuple[np.ndarray, np.ndarray, int]:
    """Render one scene. Returns (uint8 image (H, W, 3), bool mask (H, W), label).

    ``draw_object=False`` renders the identical scene without the class object (the mask
    is still the object's), which shows exactly which pixels the object changes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    S = int(image_size)
    u = S / 112.0  # all lengths are specified at 112 px
    label = int(index) % len(SHAPES_CLASSES)

    img = _background(rng, S)

    # Class object geometry first: its colour must contrast with the background under it.
    radius = rng.uniform(20, 34) * u
    aspect = float(np.exp(rng.uniform(-0.1, 0.1)))
    margin = radius * 1.25  # keeps the whole object inside the image
    center = rng.uniform(margin, S - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    x0, y0 = np.clip((center - radius).astype(int), 0, S - 1)
    x1, y1 = np.clip((center + radius).astype(int), 1, S)
    obj_color = _contrasting_color(rng, img[y0:y1, x0:x1].reshape(-1, 3).mean(0), 0.45)

    cv, dr = _canvas(S)
    for poly, fill in _SHAPES[label]:
        dr.polygon(_pts(_place(poly, center, radius, angle, aspect)), fill=255 * fill)
    obj_img = cv.reduce(_SS)
    obj = np.asarray(obj_img, dtype=np.float32) * np.float32(1 / 255)
    # Distractors keep a gap to the object, so none (e.g. one in the object's colour) can
    # merge with it and change its outline.
    keep_out = np.asarray(obj_img.filter(ImageFilter.MaxFilter(5))) > 0

    same_color = rng.random() < 0.5  # often one distractor wears the object's colour
    for k in range(int(rng.integers(3, 8))):
        color = obj_color if (same_color and k == 0) else _color(rng)
        for _ in range(10):
            a = _distractor(rng, S, u)
            if not (keep_out & (a > 0)).any():
                img = img * (1 - a[..., None]) + color * a[..., None]
                break

    if draw_object:
        img = img * (1 - obj[..., None]) + obj_color * obj[..., None]

    # An occasional thin line over everything: the mask must be the visible part.
    visible = obj
    if rng.random() < 0.25:
        cv, dr = _canvas(S)
        t = rng.uniform(0, np.pi)
        d = S * np.array([np.cos(t), np.sin(t)])
        p = rng.uniform(0.2 * S, 0.8 * S, 2)
        dr.line(_pts(np.stack([p - d, p + d])), fill=255, width=int(round(rng.uniform(1.5, 3) * u * _SS)))
        a = _coverage(cv, S)
        img = img * (1 - a[..., None]) + _color(rng) * a[..., None]
        visible = obj * (1 - a)

    img = img + np.float32(rng.uniform(0.0, 0.06)) * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return img, visible >= 0.5, label


def generate(
    split: str,
    n: Optional[int] = None,
    image_size: int = 112,
    seed: int = 0,
    start: int = 0,
    standardize: bool = True,
    uint8: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items ``start .. start+n-1`` of a split as (images (N, 3, H, W), masks (N, H, W), labels (N,)).

    Images are float32 (ImageNet-standardized unless ``standardize=False``), or raw uint8 with ``uint8=True``.
    """
    n = DEFAULT_SIZES[split] if n is None else int(n)
    imgs = np.empty((n, image_size, image_size, 3), np.uint8)
    masks = np.empty((n, image_size, image_size), bool)
    labels = np.empty(n, np.int64)
    for j in range(n):
        imgs[j], masks[j], labels[j] = render(seed, split, start + j, image_size)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    if not uint8:
        x = x.float().div_(255)
        if standardize:
            x = _standardize(x)
    return x, torch.from_numpy(masks), torch.from_numpy(labels)


class ShapesDataset(torch.utils.data.Dataset):
    """Split of the shapes benchmark: items are (image (3, H, W) float32, mask (H, W) bool, label).

    Items are rendered on access; nothing is cached.
    """

    classes = SHAPES_CLASSES

    def __init__(
        self,
        split: str = "test",
        size: Optional[int] = None,
        image_size: int = 112,
        seed: int = 0,
        standardize: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        self.split, self.image_size, self.seed, self.standardize = split, image_size, seed, standardize
        self.size = DEFAULT_SIZES[split] if size is None else int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not -self.size <= i < self.size:
            raise IndexError(i)
        img, mask, label = render(self.seed, self.split, i % self.size, self.image_size)
        return to_tensor(img, self.standardize), torch.from_numpy(mask), label


def dihedral(x: torch.Tensor, g: torch.Generator, mask: Optional[torch.Tensor] = None):
    """A random flip / 90-degree rotation of each image of ``x`` (N, C, H, W), drawn from ``g``:
    the augmentation of the training scripts (every class is closed under these, and so is the cue
    of :mod:`srd_ext.data.confounded`). With ``mask`` (N, H, W), each mask gets the transform of
    its image, and the result is ``(x, mask)``."""
    k = torch.randint(0, 8, (x.shape[0],), generator=g)
    xo = torch.empty_like(x)
    mo = None if mask is None else torch.empty_like(mask)
    for t in range(8):
        idx = (k == t).nonzero().flatten()
        if idx.numel():
            a = torch.rot90(x[idx], t % 4, (2, 3))
            xo[idx] = a.flip(3) if t >= 4 else a
            if mask is not None:
                b = torch.rot90(mask[idx], t % 4, (1, 2))
                mo[idx] = b.flip(2) if t >= 4 else b
    return xo if mask is None else (xo, mo)
