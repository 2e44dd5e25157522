"""Evaluation metrics for attribution maps (paper Appendix E and Sec. 4.3).

All metrics are batched over dim 0, run on the device of their inputs and
return one value per sample. Maps are ``(B, H, W)`` (``(B, 1, H, W)`` is also
accepted), masks are ``(B, H, W)`` (nonzero = inside), images are
``(B, C, H, W)``.

Every metric first applies :func:`normalize` (per-sample division by the max,
then clamping to [-1, 1], as in the paper); pass ``normalized=True`` when the
maps are already normalized. Maps smaller than the mask / image are
bilinearly upsampled to it (:func:`upsample`) before normalization.

Random metrics (:func:`fidelity`, :func:`stability`) take a ``seed`` and draw
from a ``torch.Generator`` on the input's device: the same seed gives the same
result on one device, but CPU and CUDA streams differ. The random draws
depend only on the seed and the shape of one sample, and are shared by all
samples of a batch, so a sample's score does not depend on which other
samples are in the batch (batched and one-by-one calls agree).

Differences to Quantus (Hedström et al. 2023) are listed in each metric's
docstring. The paper used Quantus with its defaults without naming a version;
the versions it could have used (0.5.3 and older) perturb whole pixels in
``FaithfulnessCorrelation``, as :func:`fidelity` does, while Quantus 0.6
perturbs single channel entries. One difference applies to all:
Quantus' default ``normalise_by_max`` divides by the max *absolute* value
taken over the *whole batch* it is given (per sample only when called with
one sample) and does not clamp; here the divisor is each sample's own max and
values below -1 are clamped, which only matters for maps whose most negative
value exceeds the positive max in magnitude.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "normalize",
    "upsample",
    "pointing_game",
    "attribution_localization",
    "outside_share",
    "sparseness",
    "fidelity",
    "stability",
    "ssim",
    "pcc",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------------
# validation helpers


def _as_maps(maps, name: str = "maps") -> Tensor:
    if not isinstance(maps, Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"{name}: expected shape (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}")
    if maps.shape[0] == 0 or maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not torch.isfinite(maps).all():
        bad = (~torch.isfinite(maps)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name}: contains NaN or Inf (samples {bad})")
    return maps


def _as_masks(masks, name: str = "masks") -> Tensor:
    if not isinstance(masks, Tensor):
        masks = torch.as_tensor(masks)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"{name}: expected shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    return masks != 0


def _as_images(x, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    return x


def _as_target(target, batch: int, device) -> Tensor:
    t = torch.as_tensor(target, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"target: expected an int or shape ({batch},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"target: expected integer class indices, got {t.dtype}")
    return t.long()


def _check_batch(name: str, t: Tensor, batch: int, ref: str) -> None:
    if t.shape[0] != batch:
        raise ValueError(
            f"{name}: batch size {t.shape[0]} (shape {tuple(t.shape)}) does not match {ref} batch size {batch}"
        )


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or int(v) != v or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _prepare(maps, size: Tuple[int, int], normalized: bool, ref: str, device) -> Tensor:
    """Validate maps, move them to ``device``, upsample to ``size`` if smaller, normalize."""
    maps = _as_maps(maps).to(device)
    h, w = maps.shape[-2:]
    H, W = size
    if h > H or w > W:
        raise ValueError(
            f"maps: spatial size {(h, w)} (shape {tuple(maps.shape)}) is larger than "
            f"the {ref} size {(H, W)}; expected (B, h, w) with h <= {H}, w <= {W}"
        )
    if (h, w) != (H, W):
        maps = upsample(maps, (H, W))
    return maps if normalized else normalize(maps)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dim; 0 where either side is constant."""
    const = (a == a[..., :1]).all(-1) | (b == b[..., :1]).all(-1)
    ac = a - a.mean(-1, keepdim=True)
    bc = b - b.mean(-1, keepdim=True)
    den = (ac.square().sum(-1) * bc.square().sum(-1)).sqrt()
    r = (ac * bc).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where(const | (den == 0), torch.zeros_like(r), r)
    return r.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------
# normalization


def normalize(maps: Tensor) -> Tensor:
    """Divide each map by its own max and clamp to [-1, 1] (paper, Appendix E).

    ``maps``: (B, H, W) or (B, 1, H, W); returns (B, H, W).

    Degenerate maps: a map whose max is <= 0 but that is not all-zero is
    divided by its max absolute value instead (so it lies in [-1, 0] and keeps
    its shape); an all-zero map is returned unchanged. No NaN is produced.
    """
    maps = _as_maps(maps)
    flat = maps.flatten(1)
    mx = flat.amax(1)
    scale = torch.where(mx > 0, mx, flat.abs().amax(1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (maps / scale[:, None, None]).clamp(-1.0, 1.0)


def upsample(maps: Tensor, size: Union[int, Sequence[int]]) -> Tensor:
    """Bilinear resize of (B, h, w) maps to ``size`` (align_corners=False)."""
    maps = _as_maps(maps)
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"size: expected (H, W), got {size}")
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------
# localization


def _disk_dilate(masks: Tensor, radius: int) -> Tensor:
    if radius == 0:
        return masks
    r = torch.arange(-radius, radius + 1, device=masks.device)
    disk = (r[:, None] ** 2 + r[None, :] ** 2 <= radius**2).float()
    # 0/1 sums stay exact in float32, so > 0.5 is an exact "any".
    out = F.conv2d(masks[:, None].float(), disk[None, None], padding=radius)
    return out[:, 0] > 0.5


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 15, normalized: bool = False) -> Tensor:
    """Pointing game (Zhang et al. 2018): (B,) bool, True for a hit.

    A hit when a pixel holding the map's maximum lies in the mask dilated by a
    closed Euclidean disk of radius ``tolerance`` pixels, i.e. within distance
    <= ``tolerance`` of a mask pixel. Ties: a hit if any maximal pixel is in.
    Maps smaller than the masks are bilinearly upsampled first. An empty mask
    gives False.

    Versus Quantus ``PointingGame``: Quantus has no tolerance (same as
    ``tolerance=0`` here); for an empty mask it writes NaN into a bool array,
    so it reports a hit. TorchRay's
    pointing game uses an open disk (distance < tolerance) around a single
    maximum.
    """
    masks = _as_masks(masks)
    maps = _prepare(maps, tuple(masks.shape[-2:]), normalized, "masks", masks.device)
    _check_batch("maps", maps, masks.shape[0], "masks")
    tolerance = _positive_int("tolerance", tolerance, minimum=0)
    flat = maps.flatten(1)
    is_max = flat == flat.amax(1, keepdim=True)
    region = _disk_dilate(masks, tolerance).flatten(1)
    return (is_max & region).any(1)


def attribution_localization(maps: Tensor, masks: Tensor, normalized: bool = False) -> Tensor:
    """Attribution localization (Kohlbrenner et al. 2020): (B,).

    Positive relevance inside the mask divided by all positive relevance;
    0 when the map has no positive relevance (and, naturally, for an empty
    mask). Maps smaller than the masks are bilinearly upsampled first.

    Versus Quantus ``AttributionLocalisation``: its defaults (``abs=True``,
    ``positive_attributions=False``) use absolute relevance; this metric
    equals Quantus with ``abs=False, positive_attributions=True``, up to its
    +1e-9 in the denominator and its NaN for an empty mask.
    """
    masks = _as_masks(masks)
    maps = _prepare(maps, tuple(masks.shape[-2:]), normalized, "masks", masks.device)
    _check_batch("maps", maps, masks.shape[0], "masks")
    pos = maps.clamp(min=0).flatten(1)
    inside = (pos * masks.flatten(1)).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)


def outside_share(maps: Tensor, masks: Tensor, eps: float = 1e-8) -> Tensor:
    """Positive relevance outside the mask over total absolute relevance, per sample: (B,).

    Differentiable, and the maps are used as they are (no :func:`normalize`): a penalty for
    training a model to look at the object (``examples/train_right_reasons.py``). ``masks``
    (B, H, W) (float or bool) are averaged down to the map's size, so a coarse cell counts as
    outside in proportion to the part of it that is.
    """
    # No check of the values (NaN, ...): it would break a compiled training step's graph.
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"outside_share: expected maps (B, h, w) and masks (B, H, W), got {tuple(maps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    masks = masks.to(maps.dtype)
    if masks.shape[-2:] != maps.shape[-2:]:
        masks = F.adaptive_avg_pool2d(masks[:, None], maps.shape[-2:])[:, 0]
    outside = (maps.clamp(min=0) * (1 - masks)).flatten(1).sum(1)
    return outside / (maps.abs().flatten(1).sum(1) + eps)


# --------------------------------------------------------------------------
# complexity


def sparseness(maps: Tensor, normalized: bool = False) -> Tensor:
    """Sparseness (Chalasani et al. 2020): Gini index of the flattened |map|, (B,).

    With a_1 <= ... <= a_n the sorted absolute values,
    ``gini = sum_k (2k - n - 1) a_k / (n sum_k a_k)`` (paper Eq. 26 rewritten);
    a one-hot map gives 1 - 1/n, a constant map 0, an all-zero map 0.
    The value depends on the map's resolution; upsample low-resolution maps
    (:func:`upsample`) to compare them with input-scale maps.

    Versus Quantus ``Sparseness``: Quantus adds 1e-7 to every value, which
    shifts the result by O(1e-7 n / sum|a|) and makes an all-zero map score 0
    as well.
    """
    maps = _as_maps(maps)
    if not normalized:
        maps = normalize(maps)
    a = maps.abs().flatten(1).sort(1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(1)
    num = ((2 * k - n - 1) * a).sum(1)
    return torch.where(total > 0, num / (n * torch.where(total > 0, total, 1.0)), 0.0)


# --------------------------------------------------------------------------
# faithfulness


@torch.no_grad()
def _target_logits(model, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        y = model(x[i : i + batch_size])
        if y.dim() != 2:
            raise ValueError(f"model output: expected shape (N, num_classes), got {tuple(y.shape)}")
        out.append(y.gather(1, target[i : i + batch_size, None])[:, 0])
    return torch.cat(out)


@torch.no_grad()
def fidelity(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target,
    maps: Tensor,
    n_runs: int = 100,
    subset_size: int = 224,
    baseline: Union[float, Tensor] = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    normalized: bool = False,
) -> Tensor:
    """Faithfulness correlation (Bhatt et al. 2020): (B,).

    For each of ``n_runs`` random subsets S of ``subset_size`` distinct pixels
    (all channels of a pixel together), x_S is set to ``baseline`` and the
    Pearson correlation over runs is taken between ``sum_{i in S} phi_i`` and
    ``F(x)_t - F(x_[x_S = baseline])_t`` (target logit drop). 0 when either
    series is constant.

    ``model``: maps (N, C, H, W) to logits (N, num_classes); put it in eval
    mode first. ``target``: int or (B,). ``maps``: (B, h, w) with h <= H,
    w <= W (upsampled to H, W). ``baseline``: float or a tensor broadcastable
    to (C, H, W), e.g. a per-channel mean of shape (C, 1, 1). The
    B * n_runs perturbed images go through the model in chunks of
    ``batch_size``. The subsets are shared by all samples of the batch.
    Paper: 200 pixels set to 0; defaults here are Quantus' 100 runs, 224.

    Versus Quantus ``FaithfulnessCorrelation``: Quantus 0.5.3 and older draw
    whole pixels, as here; Quantus 0.6 broadcasts the map over channels and
    draws ``subset_size`` of the C*H*W (channel, pixel) entries, so it perturbs
    single channels and counts a pixel's attribution once per drawn channel.
    Quantus' default baseline "black" is the sample's minimum value, not 0;
    it draws subsets per sample from NumPy's global RNG and by default
    returns the batch mean (as read in 0.6).
    """
    x = _as_images(x)
    B, C, H, W = x.shape
    target = _as_target(target, B, x.device)
    maps = _prepare(maps, (H, W), normalized, "x", x.device)
    _check_batch("maps", maps, B, "x")
    n_runs = _positive_int("n_runs", n_runs, minimum=2)
    batch_size = _positive_int("batch_size", batch_size)
    n = H * W
    subset_size = _positive_int("subset_size", subset_size)
    if subset_size > n:
        raise ValueError(f"subset_size: {subset_size} exceeds the number of pixels {n}")
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        base = base.expand(C, H, W)
    except RuntimeError:
        raise ValueError(f"baseline: shape {tuple(base.shape)} is not broadcastable to {(C, H, W)}") from None

    g = _generator(x.device, seed)
    keys = torch.rand(n_runs, n, generator=g, device=x.device)
    idx = keys.topk(subset_size, dim=1).indices
    drop = torch.zeros(n_runs, n, dtype=torch.bool, device=x.device)
    drop.scatter_(1, idx, True)

    att = maps.flatten(1).to(x.dtype) @ drop.to(x.dtype).T  # (B, n_runs)
    logit0 = _target_logits(model, x, target, batch_size)

    drop = drop.view(n_runs, 1, H, W)
    total = B * n_runs
    pert = torch.empty(total, dtype=logit0.dtype, device=x.device)
    for start in range(0, total, batch_size):
        p = torch.arange(start, min(start + batch_size, total), device=x.device)
        b, r = p // n_runs, p % n_runs
        xp = torch.where(drop[r], base, x[b])
        pert[start : start + p.numel()] = _target_logits(model, xp, target[b], p.numel())
    delta = logit0[:, None] - pert.view(B, n_runs)
    return _pearson(att.double(), delta.double()).to(maps.dtype)


# --------------------------------------------------------------------------
# robustness


def _explain(explain_fn, x: Tensor, target: Tensor, batch_size: int, normalized: bool) -> Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        m = explain_fn(x[i : i + batch_size], target[i : i + batch_size])
        m = _as_maps(m.detach() if isinstance(m, Tensor) else m, "explain_fn output")
        if m.shape[0] != min(batch_size, x.shape[0] - i):
            raise ValueError(
                f"explain_fn output: expected {min(batch_size, x.shape[0] - i)} maps, got shape {tuple(m.shape)}"
            )
        out.append(m if normalized else normalize(m))
    return torch.cat(out)


def stability(
    explain_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    target,
    n_samples: int = 10,
    sigma: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    normalized: bool = False,
) -> Tensor:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): (B,), lower is better.

    ``max_j ||phi(x) - phi(x_j)||_2 / ||x - x_j||_2`` over ``n_samples`` noisy
    copies ``x_j = x + N(0, sigma^2)``. ``explain_fn(x, target)`` takes
    (N, C, H, W) images and (N,) long targets and returns (N, h, w) maps; each
    map is normalized (:func:`normalize`) before the difference, so the
    estimate measures the change of the displayed map, not of its scale
    (``normalized=True``: explain_fn already returns normalized maps). The
    original and the B * n_samples noisy images are explained in chunks of
    ``batch_size``, i.e. n_samples + 1 explanation passes per image. The noise
    draws are shared by all samples of the batch. Not run under no_grad, so
    gradient-based explainers work.

    Versus Quantus ``LocalLipschitzEstimate``: Quantus defaults to 200
    samples, normalizes original and perturbed maps by the max |value| over
    the whole batch, adds 1e-10 to the denominator and draws noise per sample
    from NumPy's global RNG.
    """
    x = _as_images(x)
    B, C, H, W = x.shape
    target = _as_target(target, B, x.device)
    n_samples = _positive_int("n_samples", n_samples)
    batch_size = _positive_int("batch_size", batch_size)
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma!r}")

    g = _generator(x.device, seed)
    noise = torch.randn((n_samples, C, H, W), generator=g, device=x.device, dtype=x.dtype)
    noise = noise * sigma

    phi0 = _explain(explain_fn, x, target, batch_size, normalized)
    total = B * n_samples
    ratio = torch.empty(total, dtype=phi0.dtype, device=x.device)
    for start in range(0, total, batch_size):
        p = torch.arange(start, min(start + batch_size, total), device=x.device)
        b, s = p // n_samples, p % n_samples
        xp = x[b] + noise[s]
        phi = _explain(explain_fn, xp, target[b], p.numel(), normalized)
        if phi.shape[1:] != phi0.shape[1:]:
            raise ValueError(
                f"explain_fn output: map size changed from {tuple(phi0.shape[1:])} to {tuple(phi.shape[1:])}"
            )
        num = (phi - phi0[b]).flatten(1).norm(dim=1)
        den = (xp - x[b]).flatten(1).norm(dim=1)
        ratio[start : start + p.numel()] = num / den
    return ratio.view(B, n_samples).amax(1)


# --------------------------------------------------------------------------
# similarity of two maps (manipulation experiment, Sec. 4.3)


def _pair(a, b, normalized: bool) -> Tuple[Tensor, Tensor]:
    a, b = _as_maps(a, "a"), _as_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if not normalized:
        a, b = normalize(a), normalize(b)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def ssim(
    a: Tensor,
    b: Tensor,
    data_range: Optional[float] = None,
    sigma: float = 1.5,
    K1: float = 0.01,
    K2: float = 0.03,
    use_sample_covariance: bool = True,
    normalized: bool = False,
) -> Tensor:
    """Mean structural similarity of two (B, H, W) map batches: (B,).

    Matches ``skimage.metrics.structural_similarity(a, b, data_range=...,
    gaussian_weights=True)`` with its other defaults: Gaussian window of
    sigma 1.5 truncated at 3.5 sigma (11 taps), K1 = 0.01, K2 = 0.03, sample
    covariance (``use_sample_covariance=True``; False gives Wang et al.'s
    population covariance), and the mean taken over pixels at least 5 pixels
    from the border (where the window lies inside the map, so no padding
    matters). H and W must be >= 11.

    ``data_range``: None uses, per sample, max - min over both (normalized)
    maps (skimage requires it explicitly for floats; 2.0 is the range of
    normalized maps and older skimage's float default). If that range is 0
    the two maps are the same constant and the result is 1.
    """
    a, b = _pair(a, b, normalized)
    B, H, W = a.shape
    r = int(3.5 * sigma + 0.5)
    win = 2 * r + 1
    if H < win or W < win:
        raise ValueError(
            f"a: spatial size {(H, W)} is smaller than the {win}x{win} window (sigma={sigma}); expected H, W >= {win}"
        )
    if data_range is None:
        both = torch.cat([a.flatten(1), b.flatten(1)], 1)
        dr = both.amax(1) - both.amin(1)
        dr = torch.where(dr > 0, dr, torch.ones_like(dr))
    else:
        if not data_range > 0:
            raise ValueError(f"data_range: expected > 0, got {data_range!r}")
        dr = torch.full((B,), float(data_range), dtype=a.dtype, device=a.device)
    dr = dr[:, None, None]

    t = torch.arange(-r, r + 1, dtype=a.dtype, device=a.device)
    k = torch.exp(-0.5 * t.square() / sigma**2)
    k = k / k.sum()
    stack = torch.stack([a, b, a * a, b * b, a * b], 1).reshape(B * 5, 1, H, W)
    f = F.conv2d(F.conv2d(stack, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    ux, uy, uxx, uyy, uxy = f.view(B, 5, H - 2 * r, W - 2 * r).unbind(1)

    cov_norm = win * win / (win * win - 1) if use_sample_covariance else 1.0
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    C1 = (K1 * dr) ** 2
    C2 = (K2 * dr) ** 2
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return s.flatten(1).double().mean(1).to(a.dtype)


def pcc(a: Tensor, b: Tensor, normalized: bool = False) -> Tensor:
    """Pearson correlation of the flattened (normalized) maps: (B,).

    0 where either map is constant (correlation undefined).
    """
    a, b = _pair(a, b, normalized)
    return _pearson(a.flatten(1).double(), b.flatten(1).double()).to(a.dtype)
