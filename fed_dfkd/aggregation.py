"""Aggregating what several teachers return into the student's targets.

Logits of K teachers on the same N pseudo-samples, ``[K, N, C]``, become one ``[N, C]``
target: ``mean`` (the plain ensemble), ``weighted`` (by client weights, e.g. data sizes),
``class_weighted`` (each class's probability from the teachers in proportion to how many
examples of that class each was trained on: under label skew a teacher that never saw a class
should not vote on it), ``consensus`` (per-class scores fitted jointly to every teacher's logits
on the classes it saw, with a free offset per teacher: see :func:`_consensus`), ``median`` or
``trimmed_mean`` (robust to a few corrupted teachers).

``weights`` is either one weight per teacher ``[K]`` or per teacher and class ``[K, C]`` (the
owners' class histograms); ``weighted`` uses the row sums of the latter.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

LOGIT_RULES = ("mean", "weighted", "class_weighted", "consensus", "median", "trimmed_mean")

# ``consensus``: teacher k's say on class c weighs n_kc / (n_kc + CONSENSUS_KAPPA), so a class
# a teacher saw a few times counts little and one it saw hundreds of times counts about 1
# (bench/results/federation_fmnist.md, session 13: κ = 50 and 200 gave test accuracies of the
# ensembles within 0.1 point of each other).
CONSENSUS_KAPPA = 200.0


def _normalised_weights(weights: Sequence[float] | Tensor, count: int, like: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
    if w.numel() != count:
        raise ValueError(f"need {count} weights, got {w.numel()}")
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _class_weighted(logits: Tensor, counts: Sequence[Sequence[float]] | Tensor | None) -> Tensor:
    """log p with p_ic = Σ_k w_kc·softmax(t_ki)_c renormalised, w_kc = n_kc / Σ_k n_kc."""
    k = logits.shape[0]
    n = _class_counts(logits, counts, "class_weighted").to(logits.dtype)
    totals = n.sum(dim=0, keepdim=True)
    # A class nobody saw: every teacher votes equally on it.
    w = torch.where(totals > 0, n / totals.clamp_min(1e-12), torch.full_like(n, 1.0 / k))
    probabilities = torch.einsum("kc,knc->nc", w, logits.softmax(dim=-1))
    probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
    return probabilities.clamp_min(1e-12).log()


def _class_counts(logits: Tensor, counts: Sequence[Sequence[float]] | Tensor | None, rule: str) -> Tensor:
    k, _, classes = logits.shape
    if counts is None:
        raise ValueError(f"rule {rule!r} needs per-class counts [teachers, classes]")
    n = torch.as_tensor(counts, dtype=torch.float64, device=logits.device)
    if n.shape != (k, classes) or (n < 0).any() or not torch.isfinite(n).all():
        raise ValueError(f"class counts must be non-negative, shape [{k}, {classes}]; got {tuple(n.shape)}")
    return n


def _consensus(logits: Tensor, counts: Sequence[Sequence[float]] | Tensor | None) -> Tensor:
    """log softmax(z), z the weighted least-squares fit of every teacher's class-balanced logits.

    A teacher trained on its owner's class mix π_k gives t_kc = log p(x | c) + log π_kc + a_k(x)
    on the classes c it saw, with a_k(x) unknown (it includes how likely x is to belong to the
    owner's classes at all). So t_kc − log n_kc − b_k estimates one score z_c = log p(x | c) for
    every teacher, up to a free offset b_k per teacher and sample. Per sample,

        (z, b) = argmin Σ_k Σ_c w_kc (z_c − b_k − t_kc + log n_kc)²,  w_kc = n_kc / (n_kc + κ)

    (κ = ``CONSENSUS_KAPPA``; a tiny ridge fixes the common shift of z and b, which the softmax
    ignores), and the target is softmax(z): class posteriors under a uniform prior. A teacher
    that never saw a class (n_kc = 0) says nothing about it, whatever its logit, and one that
    saw only some classes still ranks those among themselves; unlike ``class_weighted``, a
    specialist's confident answer on a sample of a class it never saw does not become a vote
    for its own classes. Consistent teachers (t_kc = z_c + log n_kc + b_k on the classes they
    saw) give exactly log softmax(z). The normal equations depend only on the counts, so all
    samples share one solve. A class that no teacher saw gets every teacher's logit with a small
    equal weight, as in ``class_weighted``, corrected as if it were a class of that teacher's
    average frequency; classes that no chain of shared classes connects
    keep the ridge's arbitrary relative offset.
    """
    k, samples, classes = logits.shape
    n = _class_counts(logits, counts, "consensus")
    unseen = n.sum(dim=0) == 0
    w = n / (n + CONSENSUS_KAPPA)
    w[:, unseen] = 1.0 / (k * (1.0 + CONSENSUS_KAPPA))
    # Design matrix of the residuals r_kc = z_c - b_k - y_kc, unknowns (z_1..z_C, b_1..b_K).
    design = torch.zeros(k, classes, classes + k, dtype=torch.float64, device=logits.device)
    index = torch.arange(classes, device=logits.device)
    design[:, index, index] = 1.0
    design[torch.arange(k), :, classes + torch.arange(k)] = -1.0
    design = design.reshape(k * classes, classes + k)
    weights = w.reshape(-1)
    normal = design.T @ (weights[:, None] * design)
    normal += 1e-9 * normal.diagonal().max() * torch.eye(classes + k, dtype=torch.float64, device=logits.device)
    solve = torch.linalg.solve(normal, design.T * weights)[:classes]  # [C, K*C]
    seen = n > 0
    average = (n.sum(dim=1) / seen.sum(dim=1).clamp_min(1)).clamp_min(1.0)  # [K]
    prior = torch.where(seen, n, average[:, None]).clamp_min(1.0)
    y = logits.double() - prior.log()[:, None, :]  # [K, N, C]
    z = y.permute(1, 0, 2).reshape(samples, k * classes) @ solve.T
    return z.log_softmax(dim=-1).to(logits.dtype)


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
    if rule == "consensus":
        return _consensus(logits, weights)
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
