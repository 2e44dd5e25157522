"""Drawing relevance maps: overlays at the photo's own size, panels and colour legends.

Shared by ``srd-explain``, ``examples/demo.py`` and the scripts, so that every picture of this
package reads the same way:

- a diverging colormap centred at 0 (``CMAP``: red for relevance for the class, blue against);
- opacity proportional to ``|relevance|``, so pixels without relevance show the photo (partly
  desaturated, ``DESATURATE``, so that the map's red and blue stand out from the photo's colours);
- colour and opacity saturate at ``scale`` (default :func:`robust_scale`: the 99.5th percentile of
  ``|relevance|``, so a few extreme pixels do not make the rest invisible);
- where a model saw only part of the photo (a centre crop), the map is placed on the crop's box
  (:func:`to_photo`) and the part outside is dimmed.

Images are PIL images or (H, W, 3) uint8 arrays; maps are (H, W) numpy arrays or tensors.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "CMAP",
    "robust_scale",
    "to_photo",
    "heat_rgba",
    "overlay",
    "draw",
    "panel",
    "class_title",
    "colorbar_image",
    "png_bytes",
]

CMAP = "RdBu_r"
MAX_ALPHA = 0.85  # opacity where |relevance| >= scale
OUTSIDE_DIM = 0.55  # brightness kept outside the part of the photo the model saw
DESATURATE = 0.6  # how far the photo under the map goes toward grey, so the map's colours stand out

Box = Tuple[float, float, float, float]


def _np(relevance) -> np.ndarray:
    if hasattr(relevance, "detach"):
        relevance = relevance.detach().cpu().numpy()
    r = np.asarray(relevance, dtype=np.float32)
    if r.ndim != 2:
        raise ValueError(f"a relevance map must be 2-D (H, W), got shape {tuple(r.shape)}")
    return r


def _image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:  # (3, H, W) tensor layout
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def robust_scale(relevance, q: float = 99.5) -> float:
    """``|relevance|`` at which colours saturate: the ``q``-th percentile of the finite values,
    their maximum when that percentile is 0 (sparse maps), 1 when the map is all zeros."""
    a = np.abs(_np(relevance))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    s = float(np.percentile(a, q))
    if s <= 0:
        s = float(a.max())
    return s if s > 0 else 1.0


def _axis_weights(n_out: int, n_in: int, start: float, stop: float) -> Tuple[np.ndarray, np.ndarray]:
    """Bilinear weights (n_out, n_in) of a map of ``n_in`` cells spread over [start, stop) of an
    axis of ``n_out`` pixels, and which output pixels have their centre inside."""
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    src = (centres - start) / (stop - start) * n_in - 0.5  # in map cells, cell centres at integers
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = src - i0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    w[np.arange(n_out), i0] += 1 - f
    w[np.arange(n_out), i1] += f
    inside = (centres >= start) & (centres < stop)
    return w, inside


def to_photo(relevance, size: Tuple[int, int], box: Optional[Box] = None, fill: float = 0.0) -> np.ndarray:
    """A map of any resolution placed on a photo of ``size`` = (width, height): bilinearly
    resampled onto ``box`` = (left, top, right, bottom) (the part of the photo the model saw,
    e.g. ``ImageTransform.box``; default the whole photo), ``fill`` outside it. Returns (H, W)
    float32."""
    r = _np(relevance)
    w, h = size
    if box is None:
        box = (0.0, 0.0, float(w), float(h))
    left, top, right, bottom = box
    if not (right > left and bottom > top):
        raise ValueError(f"box must be (left, top, right, bottom) with right > left and bottom > top, got {box}")
    wy, in_y = _axis_weights(h, r.shape[0], top, bottom)
    wx, in_x = _axis_weights(w, r.shape[1], left, right)
    out = (wy @ r.astype(np.float64) @ wx.T).astype(np.float32)
    out[~in_y, :] = fill
    out[:, ~in_x] = fill
    return out


def heat_rgba(relevance, scale: Optional[float] = None, cmap: str = CMAP, max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """(H, W, 4) uint8: colour from ``cmap`` centred at 0, opacity ``max_alpha * |r| / scale``
    (clipped at ``max_alpha``); transparent where the relevance is 0 or not finite."""
    from matplotlib import colormaps

    r = _np(relevance)
    s = robust_scale(r) if scale is None else float(scale)
    if not s > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    finite = np.isfinite(r)
    v = np.clip(np.where(finite, r, 0) / s, -1, 1)
    rgba = colormaps[cmap]((v + 1) / 2)
    rgba[..., 3] = np.abs(v) * max_alpha
    return (rgba * 255).round().astype(np.uint8)


def overlay(
    image,
    relevance,
    scale: Optional[float] = None,
    box: Optional[Box] = None,
    cmap: str = CMAP,
    max_alpha: float = MAX_ALPHA,
    outside: float = OUTSIDE_DIM,
    desaturate: float = DESATURATE,
) -> Image.Image:
    """The relevance drawn over ``image`` at the image's own size (an RGB PIL image).

    A map whose shape is not the image's is first placed on ``box`` (default: the whole image)
    with :func:`to_photo`. Under the map the photo is moved ``desaturate`` of the way to grey
    (0: original colours); outside ``box`` it is dimmed to ``outside`` of its brightness.
    """
    img = _image(image)
    r = _np(relevance)
    if box is not None or r.shape != (img.height, img.width):
        r = to_photo(r, img.size, box)
    base = np.asarray(img, dtype=np.float32)
    if desaturate:
        grey = base @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        base = base * (1 - desaturate) + grey[..., None] * desaturate
    if box is not None:
        _, in_y = _axis_weights(img.height, 1, box[1], box[3])
        _, in_x = _axis_weights(img.width, 1, box[0], box[2])
        seen = in_y[:, None] & in_x[None, :]
        base = np.where(seen[..., None], base, base * outside)
    heat = heat_rgba(r, scale, cmap, max_alpha).astype(np.float32)
    a = heat[..., 3:] / 255.0
    out = base * (1 - a) + heat[..., :3] * a
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def draw(
    ax, image, relevance, scale: Optional[float] = None, box: Optional[Box] = None, title: Optional[str] = None, **kw
) -> None:
    """:func:`overlay` shown in a matplotlib axis, without ticks."""
    ax.imshow(overlay(image, relevance, scale, box, **kw))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def class_title(names: Sequence[str], probs, target: Optional[int] = None, sep: str = ", ") -> str:
    """ "predicted: circle (p = 0.97)" from a vector of class probabilities; with a ``target``,
    "target: square (p = 0.02), predicted: circle (p = 0.97)" (parts joined by ``sep``)."""
    p = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
    if p.ndim != 1 or len(p) != len(names):
        raise ValueError(f"probs must be a vector of {len(names)} class probabilities, got shape {p.shape}")
    pred = int(p.argmax())
    parts = [f"predicted: {names[pred]} (p = {p[pred]:.2f})"]
    if target is not None:
        parts.insert(0, f"target: {names[int(target)]} (p = {p[int(target)]:.2f})")
    return sep.join(parts)


def panel(
    image,
    relevance,
    title: str = "",
    scale: Optional[float] = None,
    box: Optional[Box] = None,
    cmap: str = CMAP,
    dpi: int = 100,
):
    """A matplotlib figure of three panels: the image, the map in the image's coordinates with a
    colorbar (grey outside ``box``), and the overlay."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    img = _image(image)
    r = _np(relevance)
    if box is not None or r.shape != (img.height, img.width):
        shown = to_photo(r, img.size, box, fill=np.nan)
    else:
        shown = r
    s = robust_scale(shown) if scale is None else float(scale)
    aspect = img.height / img.width
    width = 11.0
    fig = Figure(figsize=(width, width / 3.3 * aspect + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    cm = colormaps[cmap].with_extremes(bad="#d0d0d0")
    im = axes[1].imshow(np.ma.masked_invalid(shown), cmap=cm, vmin=-s, vmax=s, interpolation="nearest")
    axes[1].set_title("relevance", fontsize=9)
    extend = "neither"
    finite = shown[np.isfinite(shown)]
    if finite.size and (finite.max() > s or finite.min() < -s):
        extend = "both"
    cb = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.03, extend=extend)
    cb.ax.tick_params(labelsize=7)
    axes[2].imshow(overlay(img, r, s, box, cmap))
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def colorbar_image(width: int = 240, height: int = 14, cmap: str = CMAP, max_alpha: float = MAX_ALPHA) -> Image.Image:
    """A horizontal legend of the overlay's colours, from -scale (left) to +scale (right), drawn
    over white with the overlay's opacity."""
    v = np.linspace(-1, 1, width, dtype=np.float32)[None, :].repeat(height, 0)
    white = Image.new("RGB", (width, height), (255, 255, 255))
    return overlay(white, v, 1.0, cmap=cmap, max_alpha=max_alpha, desaturate=0)


def png_bytes(obj, **kw) -> bytes:
    """PNG file contents of a PIL image or a matplotlib figure."""
    buf = io.BytesIO()
    if isinstance(obj, Image.Image):
        obj.save(buf, format="PNG", **kw)
    else:
        obj.savefig(buf, format="png", bbox_inches="tight", **kw)
    return buf.getvalue()
