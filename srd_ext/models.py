"""Models: small torchvision VGG / ResNet for the shapes benchmark (weights shipped with the
package) and torchvision's ImageNet architectures (weights supplied by the user).

All models return logits and expect ImageNet-normalized RGB input (``model_transform``);
the shapes models take 112 x 112 images, the ImageNet ones 224 x 224. ``transforms_for(name)``
gives each model's whole preprocessing of a photo (resize the shorter side, centre crop,
normalize) as an :class:`ImageTransform`, which also says where the crop lies in the photo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

try:
    from torchvision import models as tvm
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.vgg import VGG, make_layers
except ImportError as e:  # torchvision is the optional `vision` extra
    raise ImportError(
        "srd_ext.models needs torchvision (its models are torchvision's VGG and ResNet): install the "
        f"torchvision release that matches your torch {torch.__version__}, e.g. with the same command "
        "that installed torch"
    ) from e

from .data import IMAGENET_MEAN, IMAGENET_STD, SHAPES_CLASSES

__all__ = [
    "SHAPES_MODELS",
    "IMAGENET_MODELS",
    "WEIGHTS_DIR",
    "shapes_vgg",
    "shapes_resnet",
    "load_model",
    "model_transform",
    "model_input_size",
    "ImageTransform",
    "transforms_for",
    "class_names",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

SHAPES_VGG_CFG = [16, "M", 32, "M", 64, "M", 128, "M", 128, "M"]
SHAPES_RESNET_WIDTHS = (16, 32, 64, 128)
SHAPES_RESNET_BLOCKS = (1, 1, 1, 1)

SHAPES_MODELS = ("shapes-vgg", "shapes-resnet")
IMAGENET_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
)


def shapes_vgg(num_classes: int = 10) -> VGG:
    """torchvision ``VGG`` with a narrow feature stack, global average pooling and a small head."""
    # The stock 25088->4096 head is built on the meta device: it is replaced right away.
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features = make_layers(SHAPES_VGG_CFG, batch_norm=False)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    width = SHAPES_VGG_CFG[-2]
    model.classifier = nn.Sequential(nn.Linear(width, 128), nn.ReLU(True), nn.Dropout(0.2), nn.Linear(128, num_classes))
    # torchvision's conv initialization; the Linear layers keep PyTorch's default, as
    # VGG's N(0, 0.01) would starve this small head (and the convs) of gradient.
    for m in model.features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def shapes_resnet(num_classes: int = 10) -> ResNet:
    """torchvision ``ResNet`` with ``BasicBlock``s, narrowed to widths 16/32/64/128."""
    with torch.device("meta"):
        model = ResNet(BasicBlock, list(SHAPES_RESNET_BLOCKS), num_classes=num_classes)
    w = SHAPES_RESNET_WIDTHS
    model.inplanes = w[0]
    model.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(w[0])
    model.layer1 = model._make_layer(BasicBlock, w[0], SHAPES_RESNET_BLOCKS[0])
    model.layer2 = model._make_layer(BasicBlock, w[1], SHAPES_RESNET_BLOCKS[1], stride=2)
    model.layer3 = model._make_layer(BasicBlock, w[2], SHAPES_RESNET_BLOCKS[2], stride=2)
    model.layer4 = model._make_layer(BasicBlock, w[3], SHAPES_RESNET_BLOCKS[3], stride=2)
    model.fc = nn.Linear(w[3], num_classes)
    for m in model.modules():  # torchvision's ResNet initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


_SHAPES_BUILDERS = {"shapes-vgg": shapes_vgg, "shapes-resnet": shapes_resnet}


def _check_name(name: str) -> None:
    if name not in SHAPES_MODELS and name not in IMAGENET_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {SHAPES_MODELS + IMAGENET_MODELS}")


def _read_state_dict(path: Union[str, os.PathLike], name: str) -> Dict[str, torch.Tensor]:
    what = f"a state_dict of torchvision's {name}" if name in IMAGENET_MODELS else f"a state_dict of {name}"
    where = f"weights file {str(path)!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{where} for {name!r} not found; expected {what} (torch.save(model.state_dict(), path))"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise RuntimeError(
            f"cannot read {where} for {name!r} ({type(e).__name__}: {reason}); expected {what} saved with torch.save"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common checkpoint layout
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"{where} does not hold a state_dict (got {type(obj).__name__}); expected {what}")
    return obj


def _brief(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _load_into(model: nn.Module, sd: Dict[str, torch.Tensor], path, name: str) -> None:
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_brief(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_brief(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (file vs model): {_brief(mismatched, 3)}")
        raise RuntimeError(f"weights file {str(path)!r} does not fit {name!r}: " + "; ".join(parts))
    model.load_state_dict(sd)


def load_model(
    name: str, weights: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device] = "cpu"
) -> nn.Module:
    """Build ``name`` and load its weights; returns the model in eval mode on ``device``.

    ``"shapes-vgg"`` / ``"shapes-resnet"`` load the weights shipped in ``srd_ext/weights``
    unless ``weights`` is given. torchvision's ``resnet18..152``, ``vgg11..19`` and
    ``vgg11_bn..vgg19_bn`` require ``weights``: a state_dict file (e.g. torchvision's
    ImageNet checkpoint) for that architecture with 1000 classes.
    """
    _check_name(name)
    if name in SHAPES_MODELS:
        model = _SHAPES_BUILDERS[name](len(SHAPES_CLASSES))
        path = WEIGHTS_DIR / f"{name}.pt" if weights is None else weights
    else:
        if weights is None:
            raise ValueError(
                f"{name!r} needs weights: pass weights=<path to a state_dict file of "
                f"torchvision's {name}> (e.g. the ImageNet checkpoint from torchvision)"
            )
        path = weights
        model = getattr(tvm, name)(weights=None)
    _load_into(model, _read_state_dict(path, name), path, name)
    return model.eval().to(device)


def model_input_size(name: str) -> int:
    _check_name(name)
    return 112 if name in SHAPES_MODELS else 224


def model_transform(name: str):
    """Normalization the model expects on ``[0, 1]`` RGB tensors (ImageNet mean/std for all)."""
    from torchvision import transforms

    _check_name(name)
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class ImageTransform:
    """A model's preprocessing of one photo: the shorter side resized to ``resize`` pixels
    (aspect ratio kept), a ``crop`` x ``crop`` centre crop (``crop=None``: no crop, the whole
    resized photo), scaling to ``[0, 1]`` and normalization with ``mean``/``std``.

    Called on a PIL image or a (C, H, W) / (B, C, H, W) uint8 or float tensor, it returns the
    float32 tensor the model takes, computed with ``torchvision.transforms.functional`` in the
    order and with the arguments of torchvision's ``ImageClassification`` preset (what
    ``Weights.transforms()`` returns), so that ``transforms_for("resnet50")(img)`` equals
    ``ResNet50_Weights.IMAGENET1K_V1.transforms()(img)``. Override a step with
    ``dataclasses.replace(t, resize=..., crop=...)``.
    """

    resize: int
    crop: Optional[int]
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value

    def __post_init__(self):
        from torchvision.transforms import InterpolationMode

        if not isinstance(self.resize, int) or self.resize < 1:
            raise ValueError(f"resize must be a positive int (pixels of the shorter side), got {self.resize!r}")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 1):
            raise ValueError(f"crop must be a positive int (side of the square centre crop) or None, got {self.crop!r}")
        if self.crop is not None and self.crop > self.resize:
            raise ValueError(
                f"crop ({self.crop}) is larger than resize ({self.resize}): the crop would "
                f"reach past the resized photo; use a crop <= resize"
            )
        modes = [m.value for m in InterpolationMode]
        if self.interpolation not in modes:
            raise ValueError(f"interpolation must be one of {modes}, got {self.interpolation!r}")

    @classmethod
    def from_torchvision(cls, t) -> "ImageTransform":
        """The same preprocessing as torchvision's ``ImageClassification`` preset ``t``."""
        for attr in ("resize_size", "crop_size", "mean", "std", "interpolation"):
            if not hasattr(t, attr):
                raise TypeError(
                    f"expected torchvision's ImageClassification preset (Weights.transforms()), "
                    f"got {type(t).__name__} without {attr!r}"
                )
        if len(t.resize_size) != 1 or len(t.crop_size) != 1:
            raise ValueError(
                f"expected one resize and one crop size, got resize_size={t.resize_size}, crop_size={t.crop_size}"
            )
        return cls(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )

    def resized_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """(width, height) of a ``size`` = (width, height) photo after the resize step (as
        torchvision computes it: the longer side is truncated, not rounded)."""
        w, h = size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if w <= h else (new_long, self.resize)

    def box(self, size: Tuple[int, int]) -> Tuple[float, float, float, float]:
        """The part of a ``size`` = (width, height) photo that the model sees, as
        (left, top, right, bottom) in the photo's pixel coordinates (floats: edges, not centres)."""
        w, h = size
        nw, nh = self.resized_size(size)
        if self.crop is None:
            return (0.0, 0.0, float(w), float(h))
        left = int(round((nw - self.crop) / 2.0))
        top = int(round((nh - self.crop) / 2.0))
        return (left * w / nw, top * h / nh, (left + self.crop) * w / nw, (top + self.crop) * h / nh)

    def __call__(self, img) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        if self.crop is not None:
            img = TF.center_crop(img, [self.crop])
        if not isinstance(img, torch.Tensor):
            img = TF.pil_to_tensor(img)
        img = TF.convert_image_dtype(img, torch.float)
        return TF.normalize(img, mean=list(self.mean), std=list(self.std))


def transforms_for(name: str, tv_weights: str = "IMAGENET1K_V1") -> ImageTransform:
    """The preprocessing ``name`` expects of a photo (see :class:`ImageTransform`).

    Shapes models: shorter side to 112, 112 x 112 centre crop, ImageNet mean/std (the training
    images are 112 x 112, so they pass unchanged apart from the normalization). torchvision
    models: the ``transforms()`` of their weights ``tv_weights`` (default ``"IMAGENET1K_V1"``,
    resize 256 and crop 224; ResNet-50/101/152's ``"IMAGENET1K_V2"`` resizes to 232).
    """
    _check_name(name)
    if name in SHAPES_MODELS:
        size = model_input_size(name)
        return ImageTransform(resize=size, crop=size)
    enum = tvm.get_model_weights(name)
    names = [w.name for w in enum]
    if tv_weights not in names:
        raise ValueError(f"torchvision has no weights {tv_weights!r} for {name!r}; choose from {names}")
    return ImageTransform.from_torchvision(enum[tv_weights].transforms())


def class_names(name: str) -> Tuple[str, ...]:
    """Class names of the model's outputs (ImageNet models: torchvision's category names)."""
    _check_name(name)
    if name in SHAPES_MODELS:
        return SHAPES_CLASSES
    return tuple(tvm.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
