"""Evaluation metrics on logits: accuracy, Agree@1, probability loyalty L_p, per-class accuracy.

Pure functions of logit tensors, computed without gradient; running models over data is the
caller's job. algorithms.md §9.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "accuracy",
    "agreement",
    "per_class_accuracy",
    "probability_loyalty",
    "top_k_accuracy",
]

# Added to both probability vectors before renormalising, as the reference's ProbLoyalty does.
_LOYALTY_SMOOTHING = 1e-8


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty [batch, classes] tensor, got {tuple(logits.shape)}"
        )


def _check_labels(logits: Tensor, labels: Tensor) -> None:
    _check_logits("logits", logits)
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(labels.shape)}"
        )


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    _check_logits("student_logits", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]: (1/N)·Σ_i 1[argmax logits_i = labels_i]."""
    _check_labels(logits, labels)
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


@torch.no_grad()
def top_k_accuracy(logits: Tensor, labels: Tensor, *, k: int) -> float:
    """Top-k accuracy as a fraction: label among the k largest logits (§9 reports top-1, top-5)."""
    _check_labels(logits, labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    top_k = logits.topk(k, dim=1).indices
    return float((top_k == labels.to(logits.device)[:, None]).any(dim=1).double().mean())


@torch.no_grad()
def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Agree@1 (algorithms.md §9) as a fraction: (1/N)·Σ_i 1[argmax s_i = argmax t_i].

    The reference reports it in percent (×100).
    """
    _check_pair(student_logits, teacher_logits)
    agree = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1).to(student_logits.device)
    return float(agree.double().mean())


@torch.no_grad()
def probability_loyalty(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Probability loyalty L_p, algorithms.md §9 (the reference's form).

    p_s = softmax(s) + 1e-8 and p_t = softmax(t) + 1e-8, each renormalised; d_JS = √JSD(p_s, p_t)
    is the Jensen–Shannon *distance* (natural log, as scipy's ``jensenshannon``); then
    L_p = mean_i (1 − √d_JS,i) = mean_i (1 − JSD_i^{1/4}). 1 for identical distributions.
    Samples whose value is NaN (e.g. NaN logits) are excluded from the sum and the count, as
    ``ProbLoyalty`` does; round-off that makes JSD slightly negative is clamped to 0 instead of
    producing NaN. Returns NaN when no sample is left.
    """
    _check_pair(student_logits, teacher_logits)
    p_student = torch.softmax(student_logits.double(), dim=1) + _LOYALTY_SMOOTHING
    p_teacher = torch.softmax(teacher_logits.double(), dim=1).to(p_student.device)
    p_teacher = p_teacher + _LOYALTY_SMOOTHING
    p_student = p_student / p_student.sum(dim=1, keepdim=True)
    p_teacher = p_teacher / p_teacher.sum(dim=1, keepdim=True)
    mixture = 0.5 * (p_student + p_teacher)
    log_mixture = mixture.log()
    divergence = 0.5 * (p_student * (p_student.log() - log_mixture)).sum(dim=1) + 0.5 * (
        p_teacher * (p_teacher.log() - log_mixture)
    ).sum(dim=1)
    loyalty = 1.0 - divergence.clamp_min(0.0).pow(0.25)
    valid = ~torch.isnan(loyalty)
    if not bool(valid.any()):
        return math.nan
    return float(loyalty[valid].mean())


@torch.no_grad()
def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy per true class, ``num_classes`` entries; None for a class without samples."""
    _check_labels(logits, labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = labels.to(logits.device).long()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes})")
    correct = (logits.argmax(dim=1) == labels).double()
    totals = torch.bincount(labels, minlength=num_classes).tolist()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes).tolist()
    return [hit / total if total else None for hit, total in zip(hits, totals)]
