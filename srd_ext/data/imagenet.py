"""ImageNet standardization (the mean/std of every channel), shared by the shapes benchmark and the
real-data loaders (every model of :mod:`srd_ext.models` expects ImageNet-standardized RGB input)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "standardize", "to_input", "to_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet standardization of ``[0, 1]`` images, (3, H, W) or (N, 3, H, W): ``(x - mean) / std``."""
    return _standardize(x)


# Internal name, for functions whose `standardize` argument shadows the public one.
def _standardize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def to_input(images: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> the input of the models: float32 in ``[0, 1]``, ImageNet-standardized,
    on ``device`` (None: where they are)."""
    return _standardize(images.to(device).float().div_(255))


def to_tensor(img: np.ndarray, standardize: bool) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], ImageNet-standardized if ``standardize``."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255)
    return _standardize(x) if standardize else x
