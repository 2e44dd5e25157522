"""Quantus for the benchmarks (``eval_table.py --sanity``, ``quantus_suite.py``): every method of
``srd_ext.baselines`` as a Quantus ``explain_func``, the sanity checks (MPRT, RandomLogit) with
their settings, and the workarounds of Quantus 0.6's faults under numpy 2, named in every output
(``FAULTS``).

Every score is computed by Quantus; this module only calls it, records which maps were all zero
(where Quantus' similarities are undefined) and averages Quantus' per-layer MPRT scores without
the trivial "original" entry.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import srd_ext
from srd_ext import baselines

#: Quantus 0.6 faults met here, and what is done about each.
FAULTS = {
    "np.trapz": "Quantus 0.6 calls np.trapz (PixelFlipping with return_auc_per_sample=True, and its AUC "
    "helper), which numpy 2 removed: np.trapz is set to np.trapezoid (the same function) before Quantus runs",
    "MPRT average": "MPRT(return_average_correlation=True) skips a key 'orig' where the key is 'original', so "
    "the trivial similarity of the original maps with themselves (1.0) is averaged in: not used; the "
    "per-layer scores Quantus returns are averaged here, without 'original'",
    "RelevanceMassAccuracy": "on signed maps the share of relevance inside the mask leaves [0, 1] (negative "
    "relevance outside the mask): run with abs=True (|map|)",
}

#: Quantus' settings of the sanity checks (stated in every report).
MPRT_SEED = 42  # Quantus' default; the randomised model is the same for every batch
NORMALISE = {"normalise_axes": [1, 2, 3]}  # each map by its own max |value| (Quantus' default: the batch's)


def patch_numpy() -> None:
    """Quantus 0.6 under numpy 2: restore ``np.trapz`` (see ``FAULTS``)."""
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid


def explain_method(model, inputs, targets, method, device=None) -> np.ndarray:
    """Quantus' ``explain_func`` for any method of ``srd_ext.baselines`` (a registry name or a
    ``baselines.Method``, with its options): float32 (B, 1, H, W).

    SRD methods go through ``srd_ext.explain_func`` (its ``layer``, ``upsample=True``); the
    others through ``baselines.get(method)``, their maps bilinearly resized to the input size
    (Quantus compares maps with images and masks of that size)."""
    m = baselines.get(method) if isinstance(method, str) else method
    if m.library == "srd_ext":
        return srd_ext.explain_func(model, inputs, targets, layer=m.options["layer"], device=device)
    p = next(model.parameters())
    x = torch.as_tensor(np.asarray(inputs), device=p.device, dtype=p.dtype)
    t = torch.as_tensor(np.asarray(targets), device=p.device).long()
    maps = m(model, x, t)
    if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
        maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return maps.detach().float().cpu().numpy()[:, None]


class Recorder:
    """``explain_method`` that also records, call by call, which maps were all zero."""

    def __init__(self):
        self.zero: List[np.ndarray] = []

    def __call__(self, model, inputs, targets, **kwargs) -> np.ndarray:
        a = explain_method(model, inputs, targets, **kwargs)
        self.zero.append(np.all(a.reshape(a.shape[0], -1) == 0, axis=1))
        return a


class SpearmanAndSSIM:
    """Quantus' ``correlation_spearman`` (returned to MPRT) and ``ssim`` (kept, call by call) of
    the same pairs of maps: two similarities from one cascade of randomisations."""

    def __init__(self):
        import quantus

        self.q = quantus
        self.ssim: List[np.ndarray] = []

    def __call__(self, a, b, batched=True, **kwargs):
        self.ssim.append(np.asarray(self.q.similarity_func.ssim(a, b, batched=batched), dtype=float))
        return self.q.similarity_func.correlation_spearman(a, b, batched=batched)


@contextlib.contextmanager
def quiet():
    """Quantus' parameterisation notes and numpy's 0/0 on an all-zero map (its score is NaN and
    counted as a zero map) are not shown."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        yield


def settings(num_classes: Optional[int] = None) -> Dict[str, object]:
    import quantus

    return {
        "quantus": quantus.__version__,
        "MPRT": f"cascading, top-down (layer_order='top_down'), every module with reset_parameters (conv, "
        f"BatchNorm, linear) re-initialised in turn, seed {MPRT_SEED} (torch.manual_seed({MPRT_SEED + 1}) "
        "before each, in Quantus), on a deep copy of the model; similarity: Spearman rank correlation "
        "(Quantus' default) and SSIM of the same pairs; abs=True, each map normalised by its max |value|",
        "RandomLogit": f"similarity SSIM (Quantus' default), one random other class per image among the "
        f"model's {num_classes or ''} classes (num_classes={num_classes}), np.random seeded by --seed and "
        "the batch's first image; "
        "abs=False, each map normalised by its max |value|",
        "SSIM": "Quantus' ssim: skimage structural_similarity of the flattened maps, default window, "
        "data range of the pair",
        "zero maps": "a similarity with an all-zero map is undefined (NaN): such values are counted, not averaged",
    }


def _block_seed(seed: int, first: int) -> int:
    from srd_ext import distributed

    return distributed.image_seed(seed, first) % (2**32)


def sanity_scores(model, x: torch.Tensor, target: torch.Tensor, method, seed: int, first: int):
    """MPRT and RandomLogit (Quantus) of one method on one batch. Returns per-image lists:
    ``mprt_last`` (Spearman, fully randomised model), ``mprt_last_ssim``, ``mprt_mean`` (mean
    Spearman over the layers, NaN where no layer is defined), ``mprt_layers`` ({layer: [per
    image]}, in randomisation order), ``random_logit`` (SSIM), and zero-map flags ``zero_original``,
    ``zero_randomised`` (fully randomised model), ``zero_other_class``. The model is not changed
    (Quantus randomises a deep copy)."""
    import quantus

    patch_numpy()
    xs, ys = x.detach().cpu().numpy(), target.detach().cpu().numpy()
    kw = {"method": method}
    dev = str(x.device)
    mprt_maps, sim = Recorder(), SpearmanAndSSIM()
    quiet_metric = dict(
        normalise=True, normalise_func_kwargs=NORMALISE, disable_warnings=True, display_progressbar=False
    )

    def run(metric, maps):
        with quiet():
            return metric(
                model=model,
                x_batch=xs,
                y_batch=ys,
                a_batch=None,
                device=dev,
                explain_func=maps,
                explain_func_kwargs=kw,
                batch_size=len(xs),
            )

    mprt = quantus.MPRT(similarity_func=sim, layer_order="top_down", seed=MPRT_SEED, abs=True, **quiet_metric)
    scores = run(mprt, mprt_maps)
    layers = [k for k in scores if k != "original"]
    per_layer = np.array([scores[k] for k in layers], dtype=float)  # (layers, B)
    with quiet():
        mean = np.nanmean(per_layer, axis=0)
    rl_maps = Recorder()
    num_classes = int(model(x[:1]).shape[-1])
    rl = quantus.RandomLogit(num_classes=num_classes, seed=_block_seed(seed, first), abs=False, **quiet_metric)
    rls = run(rl, rl_maps)
    # Recorder calls: MPRT's a_batch, the original model, one per layer; RandomLogit's own class, the other.
    assert len(mprt_maps.zero) == 2 + len(layers) and len(rl_maps.zero) == 2, (len(mprt_maps.zero), len(layers))
    out = {
        "mprt_last": per_layer[-1],
        "mprt_last_ssim": sim.ssim[-1],
        "mprt_mean": mean,
        "random_logit": np.asarray(rls, dtype=float),
        "zero_original": mprt_maps.zero[1],
        "zero_randomised": mprt_maps.zero[-1],
        "zero_other_class": rl_maps.zero[1],
    }
    out = {k: [float(v) for v in np.asarray(a, dtype=float)] for k, a in out.items()}
    out["mprt_layers"] = {k: [float(v) for v in per_layer[i]] for i, k in enumerate(layers)}
    return out
