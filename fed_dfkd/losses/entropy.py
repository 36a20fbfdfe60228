"""Confidence and diversity priors on teacher outputs (DAFL, DFQ, CuDFKD generator terms)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["activation_loss", "batch_entropy", "class_balance_loss", "one_hot_loss"]


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
