"""Contrastive (InfoNCE) terms of AdaDFKD: R2M on the generator side, the relation term on the
student side.

Both functions normalise their feature inputs to unit length themselves (:func:`unit`), so
callers may pass raw features. Projections between student and teacher feature spaces are the
caller's job (algorithms.md §12.2).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "negative_window_ranks",
    "r2m_infonce",
    "relation_infonce",
    "relation_infonce_per_sample",
    "unit",
]

# Absorbs round-off in h·K (e.g. 0.7·10 = 6.999…) so window bounds land on the intended rank.
_RANK_TOLERANCE = 1e-9


def unit(x: Tensor, dim: int = -1) -> Tensor:
    """unit(u) = u / ‖u‖₂ along ``dim`` (algorithms.md §1.1); a zero vector stays zero."""
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


def negative_window_ranks(
    num_negatives: int, *, window_start: float, window_width: float
) -> tuple[int, int]:
    """Rank band [⌊h·K⌋, ⌊(h+k)·K⌋) of the R2M negative window (algorithms.md §4.2 step 4).

    Ranks count ascending similarity (rank 0 = easiest negative). The band keeps at least one
    negative and stays inside [0, K).
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if not 0.0 < window_width <= 1.0:
        raise ValueError(f"window_width must be in (0, 1], got {window_width}")
    if not -_RANK_TOLERANCE <= window_start <= 1.0 - window_width + _RANK_TOLERANCE:
        raise ValueError(
            f"window_start must be in [0, 1 - window_width] = [0, {1.0 - window_width}], "
            f"got {window_start}"
        )
    window_start = max(window_start, 0.0)
    first = math.floor(window_start * num_negatives + _RANK_TOLERANCE)
    stop = math.floor((window_start + window_width) * num_negatives + _RANK_TOLERANCE)
    first = min(first, num_negatives - 1)
    stop = min(max(stop, first + 1), num_negatives)
    return first, stop


def r2m_infonce(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    window_start: float,
    window_width: float,
    temperature: float,
) -> Tensor:
    """R2M InfoNCE with a progressive negative window, algorithms.md §4.2.

    q_i = unit(anchors_i) (teacher features, carries gradient), k_i = unit(positives_i)
    (student keys; the caller detaches them), Q_j = unit(negatives_j) (the bank, ``[K, d]``).
    a_i = q_i·k_i, n_ij = q_i·Q_j. Each row n_i· is sorted ascending (low similarity = easy)
    and only ranks in [⌊h·K⌋, ⌊(h+k)·K⌋) are kept (at least one), h = ``window_start``,
    k = ``window_width``. Then

        L_R2M = −(1/B)·Σ_i log[ e^{a_i/τ} / (e^{a_i/τ} + Σ_{j∈window_i} e^{n_ij/τ}) ],

    the cross-entropy over [a_i, kept n_ij]/τ with target 0.
    """
    if anchors.dim() != 2 or positives.shape != anchors.shape:
        raise ValueError(
            "anchors and positives must both be [batch, dim], got "
            f"{tuple(anchors.shape)} and {tuple(positives.shape)}"
        )
    if negatives.dim() != 2 or negatives.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"negatives must be [K, {anchors.shape[1]}], got {tuple(negatives.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    first, stop = negative_window_ranks(
        negatives.shape[0], window_start=window_start, window_width=window_width
    )
    queries = unit(anchors)
    keys = unit(positives)
    bank = unit(negatives).to(dtype=queries.dtype, device=queries.device)
    positive_logits = (queries * keys).sum(dim=1, keepdim=True)
    negative_logits = queries @ bank.T
    negative_logits = negative_logits.sort(dim=1).values[:, first:stop]
    logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, targets)


def relation_infonce_per_sample(
    teacher_features: Tensor, student_features: Tensor, *, temperature: float
) -> Tensor:
    """Per-row in-batch teacher↔student InfoNCE ``[B]``, algorithms.md §4.3 (per-row form).

    d = unit(f_t)·unit(f_s)ᵀ (B×B), ℓ_rel,i = −log softmax(d_i·/τ)_i. The features must live in
    one space (project the student's first); the caller detaches the teacher features.
    """
    if teacher_features.dim() != 2 or teacher_features.shape != student_features.shape:
        raise ValueError(
            "teacher_features and student_features must both be [batch, dim], got "
            f"{tuple(teacher_features.shape)} and {tuple(student_features.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    similarities = unit(teacher_features) @ unit(student_features).T
    log_probabilities = F.log_softmax(similarities / temperature, dim=1)
    return -log_probabilities.diagonal()


def relation_infonce(
    teacher_features: Tensor, student_features: Tensor, *, temperature: float
) -> Tensor:
    """Batch mean of :func:`relation_infonce_per_sample`: L_rel = CE(d/τ, 0..B−1), §4.3."""
    return relation_infonce_per_sample(
        teacher_features, student_features, temperature=temperature
    ).mean()
