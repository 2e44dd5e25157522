"""The model zoo srd_ext is checked on: every torchvision CNN classifier and a broad sample of
timm's CNN families, built with random weights (no download), and one check per model.

Used by the zoo tests and by ``benchmarks/coverage.py``, which writes the README's coverage
table. :func:`randomize` also serves anyone who wants to test SRD on a model of their own:
default initialisations leave biases at 0 and BatchNorm at the identity, and on such a model no
bias rule is exercised.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "randomize",
    "torchvision_cnns",
    "TORCHVISION_EXCLUDED",
    "TIMM_SAMPLE",
    "TIMM_REFUSED",
    "TRANSFORMERS",
    "TRANSFORMERS_CI",
    "build",
    "check",
    "ZooResult",
    "input_size",
]

# torchvision's classification models that are not CNNs (attention stages, patch embeddings).
TORCHVISION_EXCLUDED = {
    "vit": "vision transformer (attention, no convolutional feature map)",
    "swin": "Swin transformer (windowed attention)",
    "maxvit": "MaxViT (attention blocks between its conv stages)",
}

# A broad sample of timm's CNN families: the smallest variant of each, plus the ones that
# exercise something special (TF 'same' padding, GroupNorm, weight standardisation, space to
# depth, selective kernels, split attention, ...).
TIMM_SAMPLE = [
    "resnet10t",
    "resnet18d",
    "resnet26t",
    "resnet50_gn",
    "seresnet18",
    "seresnext26d_32x4d",
    "ecaresnet26t",
    "skresnet18",
    "resnest14d",
    "res2net50_14w_8s",
    "res2next50",
    "resnetv2_18",
    "resnetv2_50x1_bit",
    "nf_resnet26",
    "nfnet_l0",
    "dm_nfnet_f0",
    "regnetx_002",
    "regnety_002",
    "regnetz_005",
    "efficientnet_b0",
    "tf_efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnetv2_b0",
    "efficientnet_b0_gn",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "tf_mobilenetv3_small_minimal_100",
    "mobilenetv4_conv_small",
    "mixnet_s",
    "tf_mixnet_s",
    "ghostnet_050",
    "ghostnetv2_100",
    "repghostnet_050",
    "densenet121",
    "dpn48b",
    "inception_v3",
    "inception_v4",
    "inception_resnet_v2",
    "xception41",
    "vgg11_bn",
    "repvgg_a0",
    "mobileone_s0",
    "dla34",
    "dla46_c",
    "hrnet_w18_small",
    "cspresnet50",
    "cspdarknet53",
    "cs3darknet_s",
    "darknet17",
    "convnext_atto",
    "convnextv2_atto",
    "inception_next_atto",
    "convmixer_768_32",
    "poolformer_s12",
    "rexnet_100",
    "mnasnet_050",
    "fbnetc_100",
    "fbnetv3_b",
    "lcnet_050",
    "hardcorenas_a",
    "tinynet_e",
    "selecsls42b",
    "tresnet_m",
    "gernet_s",
    "vovnet39a",
    "ese_vovnet19b_dw",
    "hgnetv2_b0",
    "rdnet_tiny",
    "starnet_s050",
    "mambaout_femto",
]

# Sampled timm models SRD refuses, and why (checked by the zoo test: they must be refused).
TIMM_REFUSED: Dict[str, str] = {}

# Vision transformers and hybrids: every torchvision one and a broad timm sample, as
# (library, name, input size). Where the model takes its image size as an argument it is built
# for that size (small, so that the check stays quick); the rest accept any size.
TRANSFORMERS: List[Tuple[str, str, int]] = [
    ("torchvision", "vit_b_16", 32),
    ("torchvision", "vit_b_32", 64),
    ("torchvision", "vit_l_16", 32),
    ("torchvision", "vit_l_32", 64),
    ("torchvision", "vit_h_14", 28),
    ("torchvision", "swin_t", 64),
    ("torchvision", "swin_s", 64),
    ("torchvision", "swin_b", 64),
    ("torchvision", "swin_v2_t", 64),
    ("torchvision", "swin_v2_s", 64),
    ("torchvision", "swin_v2_b", 64),
    ("torchvision", "maxvit_t", 224),
    ("timm", "vit_tiny_patch16_224", 64),
    ("timm", "vit_small_patch16_224", 64),
    ("timm", "vit_base_patch16_clip_224", 64),
    ("timm", "vit_small_patch14_reg4_dinov2", 56),
    ("timm", "flexivit_small", 64),
    ("timm", "deit_tiny_patch16_224", 64),
    ("timm", "deit_tiny_distilled_patch16_224", 64),
    ("timm", "vit_tiny_r_s16_p8_224", 64),
    ("timm", "beit_base_patch16_224", 64),
    ("timm", "eva02_tiny_patch14_224", 64),
    ("timm", "cait_xxs24_224", 64),
    ("timm", "xcit_nano_12_p16_224", 64),
    ("timm", "convit_tiny", 64),
    ("timm", "pit_ti_224", 64),
    ("timm", "levit_128s", 64),
    ("timm", "tnt_s_patch16_224", 64),
    ("timm", "volo_d1_224", 64),
    ("timm", "swin_tiny_patch4_window7_224", 64),
    ("timm", "swinv2_tiny_window8_256", 64),
    ("timm", "twins_pcpvt_small", 64),
    ("timm", "pvt_v2_b0", 64),
    ("timm", "coat_lite_tiny", 64),
    ("timm", "nest_tiny", 64),
    ("timm", "gcvit_xxtiny", 64),
    ("timm", "davit_tiny", 64),
    ("timm", "focalnet_tiny_srf", 64),
    ("timm", "mvitv2_tiny", 224),
    ("timm", "hiera_tiny_224", 224),
    ("timm", "maxvit_nano_rw_256", 64),
    ("timm", "coatnet_nano_rw_224", 64),
    ("timm", "mobilevit_xxs", 64),
    ("timm", "mobilevitv2_050", 64),
    ("timm", "efficientformer_l1", 224),
    ("timm", "efficientformerv2_s0", 64),
    ("timm", "fastvit_t8", 64),
    ("timm", "tiny_vit_5m_224", 64),
    ("timm", "edgenext_xx_small", 64),
    ("timm", "efficientvit_b0", 64),
    ("timm", "efficientvit_m0", 64),
]

# The part of it ``make test`` checks (the rest is tabled by benchmarks/coverage.py): small
# models explained through their blocks, and families still refused, with the words refused by.
TRANSFORMERS_CI = {
    "vit_tiny_patch16_224": None,
    "deit_tiny_distilled_patch16_224": None,
    "eva02_tiny_patch14_224": None,
    "coatnet_nano_rw_224": None,
    "efficientvit_m0": None,
    "swin_tiny_patch4_window7_224": "mixes tokens",
}


def transformer_size(name: str) -> int:
    return next(s for _, n, s in TRANSFORMERS if n == name)


_SIZES = {"inception_v3": 75, "inception_v4": 75, "inception_resnet_v2": 75, "alexnet": 64, "ghostnetv2_100": 64}


def input_size(name: str) -> int:
    """Input resolution of the zoo checks: small (the capture does not depend on it), except
    where a model needs more."""
    return _SIZES.get(name, 32)


def randomize(model: nn.Module, seed: int = 0, weights: bool = False) -> nn.Module:
    """Seeded random biases, norm affine parameters, gains and layer scales (around 1), and
    BatchNorm running statistics; returns the model in eval mode. Conv and linear weights keep
    their initialisation, or with ``weights=True`` are drawn He-scaled from the same seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if p is None or not p.dtype.is_floating_point or p.numel() == 0:
                    continue
                if name == "running_mean":
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif name == "running_var":
                    p.copy_(1 + 0.3 * torch.rand(p.shape, generator=g))
                elif name in ("bias", "beta") or name.endswith("_bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif weights and name == "weight" and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
                elif p.dim() <= 1 or p.numel() == p.shape[0] or bool((p == p.reshape(-1)[0]).all()):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@contextlib.contextmanager
def _no_init():
    """``torch.nn.init``'s initialisers as no-ops (the tensors keep whatever they hold)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def torchvision_cnns() -> Tuple[List[str], Dict[str, str]]:
    """(torchvision's CNN classifiers, the excluded ones with their reason)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    cnns, excluded = [], {}
    for n in names:
        fam = next((f for f in TORCHVISION_EXCLUDED if n.startswith(f + "_")), None)
        if fam is None:
            cnns.append(n)
        else:
            excluded[n] = TORCHVISION_EXCLUDED[fam]
    return cnns, excluded


def build(
    name: str, library: str = "torchvision", num_classes: int = 10, seed: int = 0, img_size: Optional[int] = None
) -> nn.Module:
    """A zoo model with random weights, randomised by :func:`randomize`. ``img_size``: the input
    size to build a transformer for, where the model takes one."""
    if library == "torchvision":
        import torchvision

        kw = {"init_weights": False, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        if img_size is not None and name.startswith("vit_"):
            kw["image_size"] = img_size
        # Built without running its own initialisation, then filled here: the largest variants
        # take many seconds to initialise and are only checked, never trained.
        with _no_init():
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return randomize(model, seed, weights=True)
    elif library == "timm":
        import timm

        try:
            kw = {} if img_size is None else {"img_size": img_size}
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        except TypeError:  # a model that accepts any input size
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        raise ValueError(f"library must be 'torchvision' or 'timm', got {library!r}")
    return randomize(model, seed)


@dataclass
class ZooResult:
    name: str
    library: str
    explained: bool
    encoder: str = ""
    reason: str = ""
    budget_error: float = float("nan")  # max |input + unassigned - encoder| / |encoder|
    unassigned: float = float("nan")  # max unassigned / |encoder|
    forward_error: float = float("nan")  # the captured forward against the model's own
    capture_seconds: float = float("nan")
    explain_seconds: float = float("nan")
    nodes: int = 0
    extra: Dict[str, str] = field(default_factory=dict)


def check(
    model: nn.Module, name: str, library: str, x: Optional[torch.Tensor] = None, bias_share: str = "contribution"
) -> ZooResult:
    """Capture and explain ``model`` once: SRD-input with a constant initial relevance, the
    relevance budget and the captured forward against the model's."""
    from .explain import Explainer
    from .nodes import UnsupportedModelError

    if x is None:
        s = input_size(name)
        x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    ex = Explainer(model, init="constant", bias_share=bias_share)
    res = ZooResult(name, library, False)
    try:
        t0 = time.perf_counter()
        g = ex.graph(x)
        res.capture_seconds = time.perf_counter() - t0
        res.nodes = len(g.nodes)
        t0 = time.perf_counter()
        budget = ex.relevance_budget(x)
        res.explain_seconds = time.perf_counter() - t0
        res.encoder = ex.encoder_layer(x)
    except UnsupportedModelError as e:
        res.reason = str(e).split(". Supported on the relevance path")[0]
        return res
    enc = budget["encoder"].abs().clamp_min(1e-12)
    res.budget_error = float(((budget["input"] + budget["unassigned"] - budget["encoder"]).abs() / enc).max())
    res.unassigned = float((budget["unassigned"].abs() / enc).max())
    with torch.no_grad():
        ours = g.forward(x)[g.output_index]
        theirs = model(x)
    res.forward_error = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
    res.explained = True
    return res
