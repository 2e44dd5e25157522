"""Loaders of real images for users who have them: ImageNet-S folders (images and segmentation
masks) and ImageNet-style class folders."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .imagenet import IMAGENET_MEAN, IMAGENET_STD, to_tensor

__all__ = ["ImageNetSFolder", "image_folder"]

_IMG_EXT = (".jpeg", ".jpg", ".png")


class ImageNetSFolder(torch.utils.data.Dataset):
    """ImageNet-S style folder: ``root/<split>/<class>/<name>.JPEG`` with masks at
    ``root/<split>-segmentation/<class>/<name>.png``.

    Items are (image (3, crop, crop) float32, mask (crop, crop) bool, label). Image and mask
    get the same resize (shorter side to ``resize``; bilinear / nearest) and center crop.
    The mask is the annotated object: nonzero pixels, where RGB masks encode the class id
    as ``R + 256 * G`` and id 1000 ("ignore") is excluded. Labels index the sorted class
    folders unless ``class_to_idx`` maps folder names to labels (e.g. ImageNet-1k indices).
    Images without a mask file are skipped.
    """

    def __init__(
        self,
        root: str,
        split: str = "validation",
        resize: int = 224,
        crop: int = 224,
        standardize: bool = True,
        class_to_idx: Optional[dict] = None,
    ):
        self.image_dir = os.path.join(root, split)
        self.mask_dir = os.path.join(root, f"{split}-segmentation")
        for d in (self.image_dir, self.mask_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"ImageNet-S folder {d!r} does not exist")
        self.classes = sorted(e.name for e in os.scandir(self.image_dir) if e.is_dir())
        self.class_to_idx = (
            dict(class_to_idx) if class_to_idx is not None else {c: i for i, c in enumerate(self.classes)}
        )
        self.resize, self.crop, self.standardize = resize, crop, standardize
        self.samples: List[Tuple[str, str, int]] = []
        for c in self.classes:
            if c not in self.class_to_idx:
                raise KeyError(f"class folder {c!r} is missing from class_to_idx")
            for name in sorted(os.listdir(os.path.join(self.image_dir, c))):
                stem, ext = os.path.splitext(name)
                mask = os.path.join(self.mask_dir, c, stem + ".png")
                if ext.lower() in _IMG_EXT and os.path.isfile(mask):
                    self.samples.append((os.path.join(self.image_dir, c, name), mask, self.class_to_idx[c]))

    def __len__(self) -> int:
        return len(self.samples)

    def _geometry(self, img: Image.Image, resample) -> Image.Image:
        w, h = img.size
        s = self.resize / min(w, h)
        img = img.resize((max(self.crop, round(w * s)), max(self.crop, round(h * s))), resample)
        w, h = img.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        return img.crop((left, top, left + self.crop, top + self.crop))

    def __getitem__(self, i: int):
        path, mask_path, label = self.samples[i]
        with Image.open(path) as im:
            img = self._geometry(im.convert("RGB"), Image.Resampling.BILINEAR)
        with Image.open(mask_path) as m:
            if m.mode in ("RGB", "RGBA"):
                a = np.asarray(m.convert("RGB"), dtype=np.int32)
                ids = a[..., 0] + 256 * a[..., 1]
            else:
                ids = np.asarray(m.convert("I"), dtype=np.int32)
        ids = np.asarray(self._geometry(Image.fromarray(ids), Image.Resampling.NEAREST))
        mask = torch.from_numpy((ids != 0) & (ids != 1000))
        return to_tensor(np.asarray(img), self.standardize), mask, label


def image_folder(
    root: str, resize: int = 256, crop: int = 224, standardize: bool = True, transform: Optional[Callable] = None
):
    """torchvision ``ImageFolder`` with the standard ImageNet evaluation preprocessing
    (resize 256, center crop 224, ImageNet standardization unless ``standardize=False``)."""
    from torchvision import datasets, transforms

    if transform is None:
        steps = [transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor()]
        if standardize:
            steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        transform = transforms.Compose(steps)
    return datasets.ImageFolder(root, transform=transform)
