"""srd_ext: Sharing Ratio Decomposition (SRD) explanations of CNNs with fused C++/CUDA operators.

Quick start::

    import srd_ext
    maps = srd_ext.explain(model.eval(), images)                  # (B, H, W), predicted class
    maps = srd_ext.explain(model, images, target=3, layer="high")   # 1/8 resolution
"""
from . import ops
from . import capture
from .capture import UnsupportedModelError
from .explain import Explainer, erf, explain
from .ops import activation_share, bias_share_scatter, conv_tap_norms, pfv_decompose

__version__ = "0.1.0"

__all__ = [
    "explain", "Explainer", "erf", "capture", "UnsupportedModelError",
    "ops", "activation_share", "bias_share_scatter", "conv_tap_norms", "pfv_decompose",
]
