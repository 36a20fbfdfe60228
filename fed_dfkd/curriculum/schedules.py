"""Schedules as pure functions of training progress p ∈ [0, 1] (algorithms.md §12.3).

p = completed server rounds / total rounds. These are continuous versions of the reference's
per-epoch steps; quantise p to epochs for exact reproduction. A progress outside [0, 1] by more
than 1e-9 raises ``ValueError``; round-off inside that tolerance is clamped.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

__all__ = [
    "PROGRESS_TOLERANCE",
    "adversarial_weight",
    "check_progress",
    "cosine",
    "linear",
    "negative_window_start",
    "ramp",
]

PROGRESS_TOLERANCE = 1e-9


def check_progress(progress: float) -> float:
    """Validate p ∈ [0, 1] (with a 1e-9 tolerance) and return it clamped to [0, 1]."""
    progress = float(progress)
    if not -PROGRESS_TOLERANCE <= progress <= 1.0 + PROGRESS_TOLERANCE:  # also rejects NaN
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return min(max(progress, 0.0), 1.0)


def ramp(progress: float, *, begin: float, end: float) -> float:
    """ramp(p) = clip((p − b)/(e − b), 0, 1), algorithms.md §12.3.

    ``begin`` must not exceed ``end``; with ``begin == end`` it is a step: 0 for p < b, else 1.
    """
    progress = check_progress(progress)
    if begin > end:
        raise ValueError(f"ramp begin must be <= end, got begin={begin}, end={end}")
    if begin == end:
        return 0.0 if progress < begin else 1.0
    return min(max((progress - begin) / (end - begin), 0.0), 1.0)


def adversarial_weight(
    progress: float, *, initial: float, growth: float, begin: float, end: float
) -> float:
    """λ_adv(p) = adv0 + Δ_adv·ramp(p), algorithms.md §3.2 / §12.3.

    ``initial`` = adv0, ``growth`` = Δ_adv; Δ_adv = grad_adv·E·(e − b) reproduces an E-epoch run
    of the reference's linear schedule.
    """
    return initial + growth * ramp(progress, begin=begin, end=end)


def negative_window_start(progress: float, *, width: float, begin: float, end: float) -> float:
    """R2M window start h(p) = (1 − k)·ramp(p), algorithms.md §4.2 step 5 / §12.3; k = ``width``."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return (1.0 - width) * ramp(progress, begin=begin, end=end)


def linear(progress: float, *, start: float, end: float) -> float:
    """start + (end − start)·p: the self-paced pace λ(p) = λ0 + (λ_end − λ0)·p (§12.3), or the
    quantile level of the quantile pace."""
    progress = check_progress(progress)
    return start + (end - start) * progress


def cosine(progress: float, *, base: float, final: float = 0.0) -> float:
    """Cosine annealing final + (base − final)·½(1 + cos(π·p)), e.g. lr_S(p) (§12.3)."""
    progress = check_progress(progress)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
