"""Aggregating what several teachers return into the student's targets.

Logits of K teachers on the same N pseudo-samples, ``[K, N, C]``, become one ``[N, C]``
target: ``mean`` (the plain ensemble), ``weighted`` (by client weights, e.g. data sizes),
``median`` or ``trimmed_mean`` (robust to a few corrupted teachers).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

LOGIT_RULES = ("mean", "weighted", "median", "trimmed_mean")


def _normalised_weights(weights: Sequence[float] | Tensor, count: int, like: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
    if w.numel() != count:
        raise ValueError(f"need {count} weights, got {w.numel()}")
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def aggregate_logits(
    logits: Tensor,
    *,
    rule: str = "mean",
    weights: Sequence[float] | Tensor | None = None,
    trim_fraction: float = 0.2,
) -> Tensor:
    """Combine ``[K, N, C]`` teacher logits into ``[N, C]`` targets by ``rule``."""
    if logits.dim() != 3:
        raise ValueError(f"expected [teachers, samples, classes] logits, got {tuple(logits.shape)}")
    count = logits.shape[0]
    if rule == "mean":
        return logits.mean(dim=0)
    if rule == "weighted":
        if weights is None:
            raise ValueError("rule 'weighted' needs weights")
        w = _normalised_weights(weights, count, logits)
        return torch.einsum("k,knc->nc", w, logits)
    if rule == "median":
        return logits.median(dim=0).values if count % 2 else logits.sort(dim=0).values[
            count // 2 - 1 : count // 2 + 1
        ].mean(dim=0)
    if rule == "trimmed_mean":
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        cut = int(trim_fraction * count)
        ordered = logits.sort(dim=0).values
        return ordered[cut : count - cut].mean(dim=0)
    raise ValueError(f"unknown logit aggregation rule {rule!r}; valid: {', '.join(LOGIT_RULES)}")
