"""Confidence and diversity priors on teacher outputs (DAFL, DFQ, CuDFKD generator terms)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "activation_loss",
    "batch_entropy",
    "class_balance_loss",
    "one_hot_loss",
    "prior_adjusted_cross_entropy",
]


def _check_logits(teacher_logits: Tensor) -> None:
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] == 0:
        raise ValueError(
            f"teacher_logits must be a non-empty [batch, classes] tensor, "
            f"got shape {tuple(teacher_logits.shape)}"
        )


def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """Instance confidence, algorithms.md §1.2 one-hot: L_oh = (1/B)·Σ_i CE(t_i, argmax t_i)."""
    _check_logits(teacher_logits)
    pseudo_labels = teacher_logits.argmax(dim=1)
    return F.cross_entropy(teacher_logits, pseudo_labels)


def prior_adjusted_cross_entropy(
    teacher_logits: Tensor, labels: Tensor | None, *, class_counts: Tensor, strength: float = 1.0
) -> Tensor:
    """Assigned-class confidence judged under a uniform class prior (logit adjustment).

    L = (1/B)·Σ_i CE(s_i, y_i) with s_ic = t_ic − τ·log n_c over the classes the teacher saw
    (n_c > 0, plus the asked class y_i), the rest masked out. A teacher trained on class mix
    π ∝ n gives t_c = log p(x | c) + log π_c + a(x) (the model of ``distill.ensemble:
    consensus``, docs/methods.md); at τ = 1, s_c is log p(x | c) up to a shift, so a sample
    asked for the owner's majority class must look like that class more than like the others
    it knows, not merely be any image (a skewed teacher's prior hands almost every image to its
    majority class). τ = 0 is the plain CE(t, y) over the seen classes; a class the teacher never
    saw (n_c = 0) has no say either way. Without ``labels`` (fresh latents, an unconditional G)
    y_i = argmax_c s_ic, as in the plain one-hot term. (Menon et al., "Long-tail learning via logit
    adjustment", ICLR 2021, applied to the generator's one-hot term.)
    """
    _check_logits(teacher_logits)
    classes = teacher_logits.shape[1]
    counts = torch.as_tensor(class_counts, dtype=teacher_logits.dtype, device=teacher_logits.device)
    if counts.shape != (classes,) or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(
            f"class_counts must be {classes} finite non-negative counts, got shape {tuple(counts.shape)}"
        )
    if labels is not None and labels.shape != teacher_logits.shape[:1]:
        raise ValueError(f"labels must be [{teacher_logits.shape[0]}], got {tuple(labels.shape)}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be finite and >= 0, got {strength}")
    seen = counts > 0
    # An asked class the teacher never saw keeps its raw logit (its count is taken as 1).
    adjusted = teacher_logits - strength * counts.clamp_min(1.0).log()
    if labels is None:
        if not bool(seen.any()):
            raise ValueError("class_counts are all zero: the teacher saw no class")
        labels = adjusted.masked_fill(~seen, float("-inf")).argmax(dim=1)
    asked = F.one_hot(labels, classes).bool()
    masked = adjusted.masked_fill(~(seen.unsqueeze(0) | asked), float("-inf"))
    return F.cross_entropy(masked, labels)


def _log_mean_probabilities(teacher_logits: Tensor, temperature: float) -> Tensor:
    # log p̄ computed as a log-sum-exp over the batch: finite even when a class's mean
    # probability underflows, so p̄·log p̄ never becomes 0·(−inf).
    _check_logits(teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probabilities = F.log_softmax(teacher_logits / temperature, dim=1)
    return torch.logsumexp(log_probabilities, dim=0) - math.log(teacher_logits.shape[0])


def class_balance_loss(
    teacher_logits: Tensor, *, temperature: float = 1.0, prior: Tensor | None = None
) -> Tensor:
    """Class balance, algorithms.md §1.2 batch entropy: Σ_c p̄_c log p̄_c = −H(p̄).

    p̄ = (1/B)·Σ_i σ_T(t_i). Minimising it maximises the batch entropy. The benchmark "balance"
    term is +w·Σ p̄ log p̄ (T = 1, w = 20); CuDFKD's λ_ent·H(p̄) with λ_ent = −20 at T = ``--T``
    equals this loss with weight +20 at that temperature.

    With a ``prior`` π (a probability vector over the classes) it is KL(p̄ ‖ π) =
    Σ_c p̄_c (log p̄_c − log π_c), minimised at p̄ = π: a teacher trained on a label-skewed share
    is asked for its own class mix instead of the uniform one. A uniform π gives the loss above
    plus log C, so the same gradients.
    """
    log_mean = _log_mean_probabilities(teacher_logits, temperature)
    if prior is None:
        return (log_mean.exp() * log_mean).sum()
    if prior.shape != log_mean.shape or not bool((prior > 0).all()):
        raise ValueError(
            f"prior must be {tuple(log_mean.shape)} with positive entries, got shape {tuple(prior.shape)}"
        )
    log_prior = prior.to(log_mean).log() - prior.to(log_mean).sum().log()
    return (log_mean.exp() * (log_mean - log_prior)).sum()


def batch_entropy(teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """H(p̄) = −Σ_c p̄_c log p̄_c with p̄ = (1/B)·Σ_i σ_T(t_i) (algorithms.md §1.2, natural log)."""
    return -class_balance_loss(teacher_logits, temperature=temperature)


def activation_loss(features: Tensor) -> Tensor:
    """DAFL activation, algorithms.md §1.2: L_act = −mean |f_t| (over all entries)."""
    if features.numel() == 0:
        raise ValueError("features must not be empty")
    return -features.abs().mean()
