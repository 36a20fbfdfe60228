"""Aggregating what several teachers return into the student's targets.

Logits of K teachers on the same N pseudo-samples, ``[K, N, C]``, become one ``[N, C]``
target: ``mean`` (the plain ensemble), ``weighted`` (by client weights, e.g. data sizes),
``class_weighted`` (each class's probability from the teachers in proportion to how many
examples of that class each was trained on: under label skew a teacher that never saw a class
should not vote on it), ``median`` or ``trimmed_mean`` (robust to a few corrupted teachers).

``weights`` is either one weight per teacher ``[K]`` or per teacher and class ``[K, C]`` (the
owners' class histograms); ``weighted`` uses the row sums of the latter.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

LOGIT_RULES = ("mean", "weighted", "class_weighted", "median", "trimmed_mean")


def _normalised_weights(weights: Sequence[float] | Tensor, count: int, like: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
    if w.numel() != count:
        raise ValueError(f"need {count} weights, got {w.numel()}")
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _class_weighted(logits: Tensor, counts: Sequence[Sequence[float]] | Tensor | None) -> Tensor:
    """log p with p_ic = Σ_k w_kc·softmax(t_ki)_c renormalised, w_kc = n_kc / Σ_k n_kc."""
    k, _, classes = logits.shape
    if counts is None:
        raise ValueError("rule 'class_weighted' needs per-class counts [teachers, classes]")
    n = torch.as_tensor(counts, dtype=logits.dtype, device=logits.device)
    if n.shape != (k, classes) or (n < 0).any() or not torch.isfinite(n).all():
        raise ValueError(f"class counts must be non-negative, shape [{k}, {classes}]; got {tuple(n.shape)}")
    totals = n.sum(dim=0, keepdim=True)
    # A class nobody saw: every teacher votes equally on it.
    w = torch.where(totals > 0, n / totals.clamp_min(1e-12), torch.full_like(n, 1.0 / k))
    probabilities = torch.einsum("kc,knc->nc", w, logits.softmax(dim=-1))
    probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
    return probabilities.clamp_min(1e-12).log()


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
        w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
        w = _normalised_weights(w.sum(dim=1) if w.dim() == 2 else w, count, logits)
        return torch.einsum("k,knc->nc", w, logits)
    if rule == "class_weighted":
        return _class_weighted(logits, weights)
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
