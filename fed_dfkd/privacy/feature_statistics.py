"""Private feature statistics: the BN prior for teachers without BatchNorm (docs/privacy.md).

A DP-SGD teacher has GroupNorm where BatchNorm was (:mod:`fed_dfkd.privacy.dpsgd`), so it has
no running statistics for the generator's BN-statistics prior (algorithms.md §1.2). Its owner
releases them instead, once, with the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1):

1. For every private record i, at the input of every normalisation layer l of the (final, DP)
   teacher in eval mode: the per-channel spatial mean and the per-channel spatial mean of
   squares, concatenated over layers into f_i (2·Σ_l C_l entries in 2L blocks).
2. Public standardisation: f̃_i = f_i / S, with one scalar per block, S_b = s_b·√D (D = the
   length of f), where s_b is the block's RMS on data-independent probe images (uniform noise in
   [0, 1], seeded) through the same DP teacher: a function of the teacher alone, so public. Every
   block then has the same scale and a probe image has ‖f̃‖ ≈ 1: ``clip`` is in these units.
   Without it the deepest layers' mean of squares (hundreds of times larger than the first
   layer's mean on the digits CNN) would take the whole clip and drown the early layers in noise.
3. Each record's vector v_i = [f̃_i, a·onehot(y_i)], a = C·√ρ (C = ``clip``, ρ = ``label_share``),
   is clipped as a whole to L2 norm C:
   w_i·v_i with w_i = min(1, C/‖v_i‖). The label part counts too: a record the clip shrinks is
   down-weighted in the features *and* in the count alike. Adding or removing one record moves
   Σ_i w_i v_i by at most C: the L2 sensitivity is C.
4. Release S̃ = Σ_i w_i v_i + N(0, (σ_s·C)² I), σ_s = ``noise_multiplier``: one Gaussian release at
   sample rate 1, one step, accounted as ``(σ_s, 1, 1)`` in the owner's ledger (the same ledger as
   its DP-SGD steps).
5. Post-processing: the noisy histogram h̃ = S̃_labels / a, the noisy count ñ = Σ_c h̃_c (a
   weighted count: Σ_i w_i plus noise), and per layer μ = S·S̃_m / ñ, E[x²] = S·S̃_s / ñ,
   σ² = max(E[x²] − μ², ``min_variance``). The statistics are a weighted mean over records, so
   clipping down-weights unusual records instead of shrinking every statistic towards 0.
   Averaging the records' spatial means gives exactly BN's mean over (N, H, W) (every record has
   the same H, W): with w_i = 1 and no noise, μ and σ² are the biased BN statistics of the whole
   private set. The released histogram is round(max(h̃, 0)).

The noise on a channel's mean is σ_s·C·S_b / n = σ_s·C·s_b·√D / n. Choose C so that a typical
record fits, ‖f̃_i‖ ≲ C·√(1−ρ), i.e. C ≈ 1.5-3 when the data look like the probes to the
teacher: a smaller C down-weights most records (fewer effective records, a smaller count), a
larger one only adds noise. Measuring with the DP teacher on the private data is the release
itself, not a leak: the teacher is DP (post-processing) and this data pass is what the Gaussian
mechanism above accounts for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.losses.bn_statistics import NORMALIZATION_TYPES, num_channels
from fed_dfkd.privacy.mechanisms import clip_rows, gaussian_noise_like

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureStatistics",
    "exact_feature_statistics",
    "normalization_layer_names",
    "probe_scales",
    "release_feature_statistics",
    "sample_moments",
]


@dataclass(frozen=True, kw_only=True)
class FeatureStatistics:
    """One owner's released statistics: per-layer ``(mean, var)`` and a noisy class histogram.

    ``layers`` maps module names (as in the teacher's ``named_modules()``) to per-channel
    float32 tensors; ``count`` is the noisy (weighted) record count ñ, unrounded: the number of
    records when the clip shrank none, less when it did, off by the noise either way;
    ``noise_multiplier`` σ_s and ``clip`` C describe the release (σ_s = 0: exact, not private).
    """

    layers: dict[str, tuple[Tensor, Tensor]]
    class_histogram: list[int]
    count: float
    noise_multiplier: float
    clip: float

    def targets(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (mean, var)}``, the form the BN-statistics prior takes as ``targets``."""
        return dict(self.layers)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and lists only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "layers": {name: {"mean": mean.detach().cpu(), "var": var.detach().cpu()}
                       for name, (mean, var) in self.layers.items()},
            "class_histogram": [int(c) for c in self.class_histogram],
            "count": float(self.count),
            "noise_multiplier": float(self.noise_multiplier),
            "clip": float(self.clip),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FeatureStatistics:
        """Inverse of :meth:`state_dict`; ValueError naming what is malformed."""
        missing = [key for key in ("layers", "class_histogram", "count", "noise_multiplier", "clip")
                   if key not in state]
        if missing:
            raise ValueError(f"feature statistics lack {', '.join(missing)}")
        layers: dict[str, tuple[Tensor, Tensor]] = {}
        for name, entry in dict(state["layers"]).items():
            mean, var = entry.get("mean"), entry.get("var")
            if not (isinstance(mean, Tensor) and isinstance(var, Tensor)
                    and mean.dim() == 1 and mean.shape == var.shape):
                raise ValueError(f"feature statistics of {name!r}: mean and var must be 1-D tensors "
                                 "of one shape")
            layers[str(name)] = (mean.float(), var.float())
        return cls(layers=layers, class_histogram=[int(c) for c in state["class_histogram"]],
                   count=float(state["count"]), noise_multiplier=float(state["noise_multiplier"]),
                   clip=float(state["clip"]))


def normalization_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's normalisation layers (BatchNorm, GroupNorm, InstanceNorm), in order."""
    return [name for name, module in model.named_modules() if isinstance(module, NORMALIZATION_TYPES)]


def _layers_of(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    names = normalization_layer_names(model) if layers is None else list(layers)
    chosen = []
    for name in names:
        module = modules.get(name)
        if module is None or not isinstance(module, NORMALIZATION_TYPES):
            raise ValueError(f"{name!r} is not a normalisation layer of the model")
        chosen.append((name, module))
    return chosen


def sample_moments(
    model: nn.Module, images: Tensor, *, layers: Sequence[str] | None = None
) -> Tensor:
    """f_i for each image: per layer, the per-channel spatial mean then mean of squares.

    Returns ``[N, Σ_l 2·C_l]`` in float64, layers in the order of ``layers`` (default: every
    normalisation layer in ``named_modules()`` order). One forward pass of ``images`` through
    ``model`` as it is (the caller sets eval mode and ``no_grad``); hooks are removed after.
    """
    chosen = _layers_of(model, layers)
    recorded: dict[str, Tensor] = {}

    def hook_for(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            features = inputs[0].detach().to(torch.float64)
            flat = features.reshape(features.shape[0], features.shape[1], -1)  # [B, C, H·W]
            recorded[name] = torch.cat([flat.mean(dim=2), flat.square().mean(dim=2)], dim=1)

        return record

    handles = [module.register_forward_hook(hook_for(name)) for name, module in chosen]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in chosen if name not in recorded]
    if missing:
        raise RuntimeError(f"the forward pass did not reach normalisation layers {missing}")
    if not chosen:
        return images.new_zeros((images.shape[0], 0), dtype=torch.float64)
    return torch.cat([recorded[name] for name, _ in chosen], dim=1)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_inputs(images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.dim() < 2 or images.shape[0] == 0 or labels.shape != (images.shape[0],):
        raise ValueError(f"need non-empty images [N, C, ...] and labels [N], got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if num_classes < 1 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return images, labels


def probe_scales(
    model: nn.Module,
    *,
    image_shape: Sequence[int],
    rng: torch.Generator,
    layers: Sequence[str] | None = None,
    num_probes: int = 256,
    batch_size: int = 256,
) -> Tensor:
    """s_b per coordinate: the RMS of each block of f on uniform-noise probe images.

    ``image_shape`` is one image's shape (C, H, W); the probes are U[0, 1] images drawn from
    ``rng`` (CPU), never data, so the result depends on the model alone. Returns a float64
    vector shaped like one row of :func:`sample_moments`, constant over each block (a layer's
    means, or its means of squares). A block that is (almost) silent on the probes is floored at
    1e-3 of the largest block's scale. ``model`` runs as it is (the caller sets eval mode).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    chosen = _layers_of(model, layers)
    names = [name for name, _ in chosen]
    device = _model_device(model)
    probes = torch.rand((num_probes, *image_shape), generator=rng, dtype=torch.float32)
    with torch.no_grad():
        moments = torch.cat([
            sample_moments(model, probes[start : start + batch_size].to(device), layers=names).cpu()
            for start in range(0, num_probes, batch_size)
        ])
    scales = torch.empty(moments.shape[1], dtype=torch.float64)
    offset = 0
    for _, module in chosen:
        for _ in range(2):  # the means, then the means of squares
            block = slice(offset, offset + num_channels(module))
            scales[block] = moments[:, block].square().mean().sqrt()
            offset += num_channels(module)
    if scales.numel():
        scales = torch.clamp(scales, min=1e-3 * float(scales.max()) if float(scales.max()) > 0 else 1.0)
    return scales


def _statistics_from_sums(
    sums: Tensor, scales: Tensor, layout: list[tuple[str, int]], *, label_norm: float,
    num_classes: int, min_variance: float, noise_multiplier: float, clip: float,
) -> FeatureStatistics:
    """Step 5 of the module docstring: histogram, count, then per-layer mean and variance."""
    feature_sums, label_sums = sums[:-num_classes] * scales, sums[-num_classes:]
    histogram = label_sums / label_norm
    count = float(histogram.sum())
    if count > 0:
        divisor = count
    else:  # the noise swamped the count: nothing meaningful to divide by
        logger.warning("feature statistics: the noisy count is %.3g <= 0; the released statistics "
                       "are noise (lower the summary's noise multiplier or clip)", count)
        divisor = 1.0
    layers: dict[str, tuple[Tensor, Tensor]] = {}
    offset = 0
    for name, channels in layout:
        mean = feature_sums[offset : offset + channels] / divisor
        mean_square = feature_sums[offset + channels : offset + 2 * channels] / divisor
        offset += 2 * channels
        var = torch.clamp(mean_square - mean.square(), min=min_variance)
        layers[name] = (mean.float(), var.float())
    released = [int(v) for v in torch.round(torch.clamp(histogram, min=0.0)).tolist()]
    return FeatureStatistics(layers=layers, class_histogram=released, count=count,
                             noise_multiplier=float(noise_multiplier), clip=float(clip))


def release_feature_statistics(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    clip: float,
    noise_multiplier: float,
    rng: torch.Generator,
    layers: Sequence[str] | None = None,
    label_share: float = 0.5,
    num_probes: int = 256,
    min_variance: float = 1e-5,
    batch_size: int = 256,
) -> FeatureStatistics:
    """The Gaussian release of the module docstring: standardise, clip, sum, noise, post-process.

    ``model`` is measured in eval mode without gradients (its mode is restored); ``images`` are
    what it takes. ``rng`` (a CPU ``torch.Generator``) draws the ``num_probes`` probe images
    first, then the noise N(0, (σ_s·C)²) on every coordinate of the sum; σ_s = 0 releases the
    exact (clipped) statistics. ``label_share`` is ρ, the share of C² the one-hot label part
    takes. The caller accounts the release as ``(noise_multiplier, 1, 1)``.
    """
    images, labels = _check_inputs(images, labels, num_classes)
    clip = float(clip)
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0 (the sensitivity), got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 < label_share < 1:
        raise ValueError(f"label_share must be in (0, 1), got {label_share}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = _layers_of(model, layers)
    names = [name for name, _ in chosen]
    layout = [(name, num_channels(module)) for name, module in chosen]
    feature_dim = 2 * sum(channels for _, channels in layout)
    # Without layers the whole budget C goes to the histogram.
    label_norm = clip * math.sqrt(label_share) if chosen else clip

    device = _model_device(model)
    feature_sum = torch.zeros(feature_dim, dtype=torch.float64)
    label_sum = torch.zeros(num_classes, dtype=torch.float64)
    clipped = 0
    was_training = model.training
    model.eval()
    try:
        scales = probe_scales(model, image_shape=images.shape[1:], rng=rng, layers=names,
                              num_probes=num_probes, batch_size=batch_size)
        # Every block at RMS 1/√D per coordinate on the probes: a probe image has ‖f̃‖ ≈ 1.
        scales = scales * math.sqrt(feature_dim)
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                features = sample_moments(model, batch, layers=names).cpu() / scales
                onehot = F.one_hot(labels[start : start + batch_size].cpu(), num_classes)
                rows = torch.cat([features, onehot.to(torch.float64) * label_norm], dim=1)
                bounded, norms = clip_rows(rows, max_norm=clip)
                feature_sum += bounded[:, :feature_dim].sum(dim=0)
                label_sum += bounded[:, feature_dim:].sum(dim=0)
                clipped += int((norms > clip).sum())
    finally:
        model.train(was_training)
    sums = torch.cat([feature_sum, label_sum])
    sums = sums + gaussian_noise_like(sums, std=noise_multiplier * clip, rng=rng)
    # The owner's own log only: how many of its records the clip shrank is not released.
    logger.debug("feature statistics: %d of %d records clipped to %.4g", clipped, images.shape[0],
                 clip)
    return _statistics_from_sums(sums, scales, layout, label_norm=label_norm,
                                 num_classes=num_classes, min_variance=min_variance,
                                 noise_multiplier=noise_multiplier, clip=clip)


def exact_feature_statistics(
    model: nn.Module, images: Tensor, labels: Tensor, *, num_classes: int,
    layers: Sequence[str] | None = None,
) -> FeatureStatistics:
    """The non-private oracle: BN's biased per-channel statistics over (N, H, W) of each layer
    input on all of ``images`` in one pass, and the exact histogram (no clipping, no noise).

    For tests and for measuring what the private release loses; never released.
    """
    images, labels = _check_inputs(images, labels, num_classes)
    chosen = _layers_of(model, layers)
    recorded: dict[str, tuple[Tensor, Tensor]] = {}

    def hook_for(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            features = inputs[0].detach().to(torch.float64)
            dims = [0, *range(2, features.dim())]
            var, mean = torch.var_mean(features, dim=dims, correction=0)
            recorded[name] = (mean.float().cpu(), var.float().cpu())

        return record

    handles = [module.register_forward_hook(hook_for(name)) for name, module in chosen]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images.to(_model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    histogram = torch.bincount(labels, minlength=num_classes).tolist()
    return FeatureStatistics(layers={name: recorded[name] for name, _ in chosen},
                             class_histogram=[int(c) for c in histogram],
                             count=float(images.shape[0]), noise_multiplier=0.0, clip=math.inf)
