"""Client-level Gaussian mechanisms: L2 clipping and seeded Gaussian noise (DESIGN.md §4).

The Gaussian mechanism releases M(x) = clip_C(x) + N(0, (σC)² I): clipping bounds the L2
sensitivity of a release to C, and noise of standard deviation σ·C makes it (ε, δ)-DP for the
accountant's noise multiplier σ (Dwork & Roth 2014, Thm. A.1; Abadi et al. 2016 for its
subsampled composition). A "release" is one whole contribution: a generator update ΔG as a dict
of tensors is clipped jointly, over all its tensors, as DP-FedAvg does (McMahan et al. 2018).

σ = 0 with C = ∞ is exactly the identity, so a run without DP and a run through the mechanism
with no noise and no clipping give bit-identical results.

Randomness. Opacus's cryptographically secure RNG (``secure_mode``, torchcsprng) is not
available here: torchcsprng has no build for this Python and torch. Noise comes from torch's
default pseudo-random generator (a seeded ``torch.Generator`` passed in by the caller, seeded per
round), which is reproducible but **not cryptographically secure**. The (ε, δ) numbers assume
ideal Gaussian noise; a PRNG an attacker could predict (e.g. from a known seed) voids them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar, Union

import torch
from torch import Tensor

# A release: one tensor, or a mapping name -> tensor clipped and noised as one vector.
Tensors = Union[Tensor, Mapping[str, Tensor]]
T = TypeVar("T", Tensor, Mapping[str, Tensor])


def _items(tensors: Tensors) -> list[tuple[str, Tensor]]:
    items = [("", tensors)] if isinstance(tensors, Tensor) else list(tensors.items())
    for name, tensor in items:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name or 'release'} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise ValueError(f"{name or 'release'} has dtype {tensor.dtype}; only floating "
                             "tensors can be clipped or noised")
    return items


def _rebuild(tensors: Tensors, values: list[Tensor]) -> Tensors:
    if isinstance(tensors, Tensor):
        return values[0]
    return dict(zip(tensors.keys(), values))


def _check_max_norm(max_norm: float) -> float:
    max_norm = float(max_norm)
    if not max_norm > 0:  # also rejects NaN
        raise ValueError(f"max_norm must be > 0 (or inf for no clipping), got {max_norm}")
    return max_norm


def l2_norm(tensors: Tensors) -> float:
    """The L2 norm of all the tensors' entries taken together, ‖concat(vec(x_i))‖₂."""
    items = _items(tensors)
    if not items:
        return 0.0
    # In float64 on the CPU: the entries may sit on different devices, and a joint norm over
    # millions of entries loses digits in float32.
    squares = sum(torch.linalg.vector_norm(t.detach(), dtype=torch.float64).cpu() ** 2
                  for _, t in items)
    return float(torch.sqrt(squares))


def clip_by_l2(tensors: T, *, max_norm: float) -> tuple[T, float]:
    """Scale the release so its joint L2 norm is at most C: x · min(1, C / ‖x‖₂).

    Returns the clipped release (new tensors; the input is untouched) and its norm before
    clipping. ``max_norm = inf`` returns an exact copy. A non-finite release cannot be clipped
    to a bounded norm and raises ValueError.
    """
    max_norm = _check_max_norm(max_norm)
    norm = l2_norm(tensors)
    if not math.isfinite(norm) and math.isfinite(max_norm):
        raise ValueError(f"cannot clip a release of norm {norm} (non-finite entries)")
    # A factor of exactly 1.0 when not clipping keeps the values bit-identical.
    factor = 1.0 if norm <= max_norm else max_norm / norm
    clipped = [t * factor for _, t in _items(tensors)]
    return _rebuild(tensors, clipped), norm


def clip_rows(logits: Tensor, *, max_norm: float) -> tuple[Tensor, Tensor]:
    """Clip each row (last dimension) of ``logits`` to L2 norm at most C.

    Returns the clipped tensor and the per-row norms before clipping. The L2 sensitivity of the
    whole batch of n clipped rows (one client's release) is then C·√n.
    """
    max_norm = _check_max_norm(max_norm)
    if not logits.is_floating_point():
        raise ValueError(f"logits have dtype {logits.dtype}; only floating tensors can be clipped")
    norms = torch.linalg.vector_norm(logits, dim=-1, keepdim=True)
    if math.isinf(max_norm):
        return logits.clone(), norms.squeeze(-1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("cannot clip rows with non-finite entries")
    factor = torch.clamp(max_norm / norms, max=1.0)  # 0-norm rows give inf, clamped to 1
    return logits * factor, norms.squeeze(-1)


def gaussian_noise_like(tensors: T, *, std: float, rng: torch.Generator) -> T:
    """Independent N(0, std²) noise shaped like each tensor, drawn from ``rng``.

    Tensors are drawn in the mapping's order, so the same order and seed give the same noise.
    ``rng`` must live on the tensors' device. ``std = 0`` gives zeros and draws nothing.
    """
    std = float(std)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    noise = []
    for _, tensor in _items(tensors):
        if std == 0.0:
            noise.append(torch.zeros_like(tensor))
        else:
            noise.append(torch.randn(tensor.shape, generator=rng, dtype=tensor.dtype,
                                     device=tensor.device) * std)
    return _rebuild(tensors, noise)


@dataclass(frozen=True, kw_only=True)
class GaussianMechanism:
    """M(x) = clip_C(x) + N(0, (σC)² I), one release at a time.

    ``clip`` is the L2 bound C on the whole release (``inf`` only with σ = 0: unbounded
    sensitivity cannot be noised), ``noise_multiplier`` is σ, the number the accountant takes.
    """

    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        clip = _check_max_norm(self.clip)
        sigma = float(self.noise_multiplier)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {sigma}")
        if math.isinf(clip) and sigma > 0:
            raise ValueError("a noisy Gaussian mechanism needs a finite clip (its sensitivity)")
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "noise_multiplier", sigma)

    @property
    def noise_std(self) -> float:
        """σ·C, the standard deviation of the noise on each coordinate (0 when σ = 0)."""
        return 0.0 if self.noise_multiplier == 0.0 else self.noise_multiplier * self.clip

    def release(self, tensors: T, *, rng: torch.Generator) -> T:
        """Clip the release to C, then add N(0, (σC)²) to every coordinate (new tensors)."""
        clipped, _ = clip_by_l2(tensors, max_norm=self.clip)
        if self.noise_std == 0.0:
            return clipped
        noise = gaussian_noise_like(clipped, std=self.noise_std, rng=rng)
        if isinstance(clipped, Tensor):
            return clipped + noise
        return {name: value + noise[name] for name, value in clipped.items()}
