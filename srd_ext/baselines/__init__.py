"""Attribution baselines of the paper's comparison (Sec. 4.2, Table 2) behind one interface.

Every method is called as ``method(model, x, target) -> Tensor (B, H, W)``: float32, on ``x``'s
device, detached. ``target`` is an int, a per-sample sequence / LongTensor, or ``None`` (the
predicted class). Maps come at the method's native resolution: the input size for pixel-space
methods, the target layer's size for CAM methods and SRD-low/-high (``Method.resolution``);
the evaluation (``benchmarks/eval_table.py``) divides them by their max and upsamples them
bilinearly, as the paper does. Pass a model in eval mode.

Libraries: captum (Saliency, GuidedBackprop, GradInput, IntegratedGradients, LRP z+, SmoothGrad),
pytorch-grad-cam (FullGrad and the CAM family) and srd_ext itself (SRD). captum and
pytorch-grad-cam are the ``bench`` extra (``pip install srd_ext[bench]``) and are imported only
when a method that needs them runs.

Channel reduction of captum's (B, C, H, W) attributions, as in each method's paper:

- Saliency, SmoothGrad: ``max_c |grad|`` (Simonyan et al. 2014, Sec. 3.1; SmoothGrad averages
  ``|grad|`` over noisy copies and is displayed like the map it smooths).
- GuidedBackprop, GradInput, IntegratedGradients, LRP z+: signed sum over channels (for the
  last three the per-pixel sum keeps completeness / conservation).

The model is never modified. Where a library would change it or give a wrong result on a model
as users have it, the method runs on an adapted deep copy (kept per model by
:mod:`srd_ext.baselines.cache` and rebuilt when its parameters or modules change); :data:`NOTES`
records what was adapted.

- LRP z+: captum's LRP leaves attributes on the modules it visits and needs every addition to be
  a module and every layer to be used once. The copy is re-traced with torch.fx: BatchNorm folded
  into the preceding conv (canonization), each ReLU use given its own non-inplace module,
  functional ``+`` replaced by captum's ``Addition_Module``. Rules: ``Alpha1_Beta0_Rule``
  (the z+ rule, biases set to zero) on every Conv2d, captum's default ``EpsilonRule`` (1e-9)
  on Linear, pooling and additions.
- GuidedBackprop: captum hooks ``nn.ReLU`` modules only (reused and in-place ones work);
  functional ``F.relu`` calls would not be guided, so such models run on an fx copy with one
  ReLU module per call.
- CAM methods, FullGrad: pytorch-grad-cam calls ``model.eval()``, registers hooks, fills
  parameter gradients, and AblationCAM swaps the target layer out while it runs; they run on a
  deep copy (parameters frozen: the input carries the graph).

CAM target layers are SRD's: "low" is the encoder output (the last spatial activation every
path passes through: ResNet's ``layer4``, VGG's last ReLU before the final max-pool) and "high"
the last activation at 1/8 of the input size (ResNet's ``layer2``); each is hooked on the
outermost module whose output that activation is (:func:`cam_layers`). GradCAM, GradCAM++,
ScoreCAM, AblationCAM and XGradCAM use "low"; LayerCAM both. CAM maps are the library's
weighted activation sums with its ReLU, before its min-max scaling and resize. FullGrad is the
library's full output (input resolution, its own per-layer post-processing, scaled to [0, 1]).

Modules: :mod:`~srd_ext.baselines.registry` (:class:`Method`, :data:`METHODS`, :func:`get`),
:mod:`~srd_ext.baselines.captum` and :mod:`~srd_ext.baselines.gradcam` (the two libraries),
:mod:`~srd_ext.baselines.differentiable` (guided backprop and LRP z+ maps with a derivative with
respect to the input, for attacks on explanations), :mod:`~srd_ext.baselines.adapt` (the fx
copies) and :mod:`~srd_ext.baselines.cache` (the copies kept per model).
"""

from ._common import INSTALL_HINT, NOTES
from .captum import IG_STEPS, SMOOTHGRAD_NOISE, SMOOTHGRAD_SAMPLES
from .differentiable import GuidedBackprop, LRPZPlus, run_two_chains, smooth_copy
from .gradcam import CAM_BATCH, cam_layers
from .registry import METHODS, Method, get, names

__all__ = [
    "Method",
    "METHODS",
    "NOTES",
    "get",
    "names",
    "cam_layers",
    "GuidedBackprop",
    "LRPZPlus",
    "smooth_copy",
    "run_two_chains",
    "IG_STEPS",
    "SMOOTHGRAD_SAMPLES",
    "SMOOTHGRAD_NOISE",
    "CAM_BATCH",
    "INSTALL_HINT",
]
