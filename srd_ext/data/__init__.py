"""Datasets: a synthetic "shapes" benchmark with exact object masks (:mod:`srd_ext.data.shapes`;
with a shortcut cue: :mod:`srd_ext.data.confounded`), loaders of real images, ImageNet-S and
ImageNet-style folders (:mod:`srd_ext.data.real`), and the images of an evaluation run, loaded by
index from the shapes split or a folder (:mod:`srd_ext.data.images`).
ImageNet standardization (mean/std) is in :mod:`srd_ext.data.imagenet`; every name is also here, as
``srd_ext.data.<name>``.

Shapes benchmark
----------------
Each image shows one *class object* whose shape alone decides the label (see
``SHAPES_CLASSES``), on a textured background with distractors in the same colours; image ``i`` of
a split is rendered from ``(seed, split, i)``; masks are exact. See :mod:`srd_ext.data.shapes`.
"""

from .confounded import CUE_COLORS, confounded
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, standardize, to_input
from .images import Images, Loaded
from .real import ImageNetSFolder, image_folder
from .shapes import DEFAULT_SIZES, SHAPES_CLASSES, SPLITS, ShapesDataset, dihedral, generate, render

__all__ = [
    "SHAPES_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "DEFAULT_SIZES",
    "ShapesDataset",
    "generate",
    "render",
    "dihedral",
    "standardize",
    "to_input",
    "ImageNetSFolder",
    "image_folder",
    "Images",
    "Loaded",
    "CUE_COLORS",
    "confounded",
]
