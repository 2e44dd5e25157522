"""The images of an evaluation run, loaded by dataset index: the shapes test split (rendered) or a
folder of image files (read; a file that cannot be read is reported, not fatal). The evaluation
scripts (``benchmarks/eval_table.py``, ``examples/apop_accuracy.py``) take their images from here.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, NamedTuple, Optional

import torch

from .shapes import DEFAULT_SIZES, generate

__all__ = ["Images", "Loaded"]


class Loaded(NamedTuple):
    """A block of images as :meth:`Images.load` returns it."""

    images: Optional[torch.Tensor]  # (B, 3, H, W), None if no image could be read
    masks: Optional[torch.Tensor]  # (B, H, W) bool; None if none could be read or the dataset has none
    labels: Optional[torch.Tensor]  # (B,)
    indices: List[int]  # dataset indices of the images read
    failed: List[Dict]  # unreadable images: {"index", "image", "reason"}


class Images:
    """``count`` images from dataset index ``first`` (:meth:`shapes`, :meth:`folder`).

    ``dataset`` is None for the shapes test split, rendered at ``size`` x ``size``; otherwise a
    dataset whose ``samples[i][0]`` is the file of item ``i`` and whose items are (image, mask,
    label), as :class:`~srd_ext.data.ImageNetSFolder`'s, or (image, label), as
    :func:`~srd_ext.data.image_folder`'s. ``root`` names the images in messages."""

    def __init__(self, dataset, root: str, size: Optional[int] = None, first: int = 0, limit: Optional[int] = None):
        self.ds, self.root, self.size, self.first = dataset, root, size, first
        if dataset is None:  # rendered: any count is there
            self.count = DEFAULT_SIZES["test"] - first if limit is None else limit
        else:
            self.count = max(0, len(dataset) - first)
            if limit is not None:
                self.count = min(self.count, limit)

    @classmethod
    def shapes(cls, size: int, first: int = 0, limit: Optional[int] = None) -> "Images":
        """The shapes test split at ``size`` x ``size``: ``limit`` images from ``first`` (None: to
        the end of the split)."""
        return cls(None, "shapes", size=size, first=first, limit=limit)

    @classmethod
    def folder(cls, dataset, root: str, first: int = 0, limit: Optional[int] = None) -> "Images":
        """The items of ``dataset`` (read from ``root``) from ``first``, at most ``limit`` of them
        (None: all)."""
        return cls(dataset, root, first=first, limit=limit)

    def name(self, i: int) -> str:
        """Image ``i``'s name in reports: ``shapes/test/<i>`` or its file's path below the root."""
        if self.ds is None:
            return f"shapes/test/{i}"
        return os.path.relpath(self.ds.samples[i][0], self.root)

    def load(self, indices: Iterable[int]) -> Loaded:
        """The images of dataset indices ``indices`` (consecutive for the shapes split); images
        None if none could be read."""
        indices = list(indices)
        if self.ds is None:
            x, masks, labels = generate("test", len(indices), image_size=self.size, start=indices[0])
            return Loaded(x, masks, labels, indices, [])
        items, ok, bad = [], [], []
        for i in indices:
            try:
                items.append(self.ds[i])
                ok.append(i)
            except Exception as e:  # one bad file must not end the run
                bad.append({"index": i, "image": self.name(i), "reason": f"{type(e).__name__}: {str(e)[:200]}"})
        if not items:
            return Loaded(None, None, None, [], bad)
        masks = torch.stack([it[1] for it in items]) if len(items[0]) == 3 else None
        return Loaded(
            torch.stack([it[0] for it in items]),
            masks,
            torch.tensor([it[-1] for it in items]),
            ok,
            bad,
        )

    def first_readable(self) -> Optional[torch.Tensor]:
        """One image, (1, C, H, W): the first that can be read (None if none can)."""
        for i in range(self.first, self.first + self.count):
            x = self.load([i]).images
            if x is not None:
                return x
        return None
