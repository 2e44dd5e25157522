"""The shapes benchmark with a shortcut: a small square in the class's colour (the cue) painted in a
corner of each image, outside the object. In the train split the cue's colour is the label's, in
the val and test splits a random class's, so a model that learned the cue fails on the test split.
``examples/train_right_reasons.py`` trains a model with and without an SRD penalty on it.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .shapes import SHAPES_CLASSES, SPLITS, render

__all__ = ["CUE_COLORS", "paint_cue", "confounded"]

# One colour per class for the cue (tab10); the classes themselves are decided by shape only.
CUE_COLORS = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    np.uint8,
)


def paint_cue(img: np.ndarray, obj: np.ndarray, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a solid square of ``color`` into a random corner that keeps clear of the object.

    Returns the cue's mask. ``render`` keeps the object 1.25 radii from the border, so one
    corner always has room for the square (about half the smallest radius wide).
    """
    s = img.shape[0]
    side = max(3, round(0.1 * s))
    inset = max(1, round(0.02 * s))
    far = s - inset - side
    corners = [(inset, inset), (inset, far), (far, inset), (far, far)]
    rng.shuffle(corners)
    pad = 2  # gap between cue and object
    for y, x in corners:
        box = obj[max(0, y - pad) : y + side + pad, max(0, x - pad) : x + side + pad]
        if not box.any():
            break
    else:
        raise RuntimeError("no free corner for the cue")  # cannot happen with render()'s margins
    img[y : y + side, x : x + side] = color
    cue = np.zeros_like(obj)
    cue[y : y + side, x : x + side] = True
    return cue


def confounded(
    split: str, n: int, image_size: int = 64, seed: int = 0, start: int = 0, num_classes: int = 10
) -> Dict[str, torch.Tensor]:
    """Items ``start..start+n-1`` of a confounded shapes split (classes ``0..num_classes-1``).

    The cue's colour is the label's in the train split and a uniformly random class's in the
    val and test splits. Returns uint8 images (N, 3, H, W), object masks and cue masks
    (N, H, W) bool, labels and cue classes (N,) int64.
    """
    if not 2 <= num_classes <= len(SHAPES_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES_CLASSES)}, got {num_classes}")
    out = {k: [] for k in ("images", "masks", "cue_masks", "labels", "cues")}
    k = len(SHAPES_CLASSES)
    for j in range(start, start + n):
        # Item j of the subset is scene index j // num_classes * 10 + class: balanced prefixes.
        index = (j // num_classes) * k + j % num_classes
        img, mask, label = render(seed, split, index, image_size)
        # A separate stream per item: the scene stays exactly the benchmark's.
        rng = np.random.default_rng([seed, SPLITS[split], index, 1])
        cue = label if split == "train" else int(rng.integers(num_classes))
        img = img.copy()
        cue_mask = paint_cue(img, mask, CUE_COLORS[cue], rng)
        for key, v in zip(out, (img, mask, cue_mask, label, cue)):
            out[key].append(v)
    return {
        "images": torch.from_numpy(np.stack(out["images"])).permute(0, 3, 1, 2).contiguous(),
        "masks": torch.from_numpy(np.stack(out["masks"])),
        "cue_masks": torch.from_numpy(np.stack(out["cue_masks"])),
        "labels": torch.tensor(out["labels"], dtype=torch.int64),
        "cues": torch.tensor(out["cues"], dtype=torch.int64),
    }
