"""srd_ext: Sharing Ratio Decomposition (SRD) explanations of CNNs with fused C++/CUDA operators.

Quick start::

    import srd_ext
    maps = srd_ext.explain(model.eval(), images)                  # (B, H, W), predicted class
    maps = srd_ext.explain(model, images, target=3, layer="high")   # 1/8 resolution

The core (``explain``, ``Explainer``, ``erf``, ``how``, ``ops``, ``capture``) is imported with the
package.
The other submodules (``apop``, ``baselines``, ``cli``, ``concepts``, ``data``, ``distributed``, ``interop``,
``metrics``, ``models``, ``viz``, ``zoo``) are imported on first use, so ``import srd_ext`` stays
fast and their optional dependencies (torchvision, captum, pytorch-grad-cam, matplotlib, timm)
are needed only by what uses them. ``srd_ext.explain_func`` (Quantus) and ``srd_ext.SRD``
(captum) come from :mod:`srd_ext.interop`.
"""

import importlib

from . import capture, ops
from ._version import __version__
from .explain import Decomposition, Explainer, ZeroRelevanceWarning, erf, explain
from .how import HowNode, HowTree, how
from .nodes import UnsupportedModelError
from .ops import activation_share, bias_share_scatter, conv_tap_norms, pfv_decompose

# Submodules imported on first attribute access (module __getattr__, PEP 562).
_LAZY_MODULES = (
    "apop",
    "baselines",
    "cli",
    "concepts",
    "data",
    "distributed",
    "interop",
    "metrics",
    "models",
    "viz",
    "zoo",
)
# Names defined in a lazily imported submodule: name -> submodule.
_LAZY_NAMES = {"explain_func": "interop", "SRD": "interop"}

__all__ = [
    "__version__",
    "explain",
    "Explainer",
    "erf",
    "Decomposition",
    "how",
    "HowTree",
    "HowNode",
    "capture",
    "UnsupportedModelError",
    "ZeroRelevanceWarning",
    "ops",
    "activation_share",
    "bias_share_scatter",
    "conv_tap_norms",
    "pfv_decompose",
    "explain_func",
    "SRD",
    *_LAZY_MODULES,
]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
