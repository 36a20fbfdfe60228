"""Knowledge-distillation losses between student and teacher logits.

Pure functions ``(tensors, *, knobs) -> Tensor``. Nothing is detached here: the caller decides
what carries gradient (the student step detaches the teacher targets, the adversarial generator
step does not).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "KD_DIVERGENCES",
    "kd_kl",
    "kd_kl_per_sample",
    "kd_l1",
    "kd_l1_per_sample",
    "kd_loss",
    "kd_per_sample",
    "feature_hint_per_sample",
]


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(
            f"student_logits must be [batch, classes], got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd_kl_per_sample(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float
) -> Tensor:
    """Per-sample temperature-scaled KL divergence, shape ``[B]``.

    algorithms.md §1.2 KD-KL: ℓ_KL,i = T²·Σ_c σ_T(t_i)_c [log σ_T(t_i)_c − log σ_T(s_i)_c],
    with σ_T(u) = softmax(u / T). The T² factor keeps gradient magnitudes comparable across T.
    """
    _check_logit_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    p_teacher = log_p_teacher.exp()
    return temperature**2 * (p_teacher * (log_p_teacher - log_p_student)).sum(dim=1)


def kd_l1_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample logit mean absolute error, shape ``[B]``.

    algorithms.md §1.2 KD-L1: ℓ_L1,i = (1/C)·Σ_c |s_ic − t_ic|.
    """
    _check_logit_pair(student_logits, teacher_logits)
    return (student_logits - teacher_logits).abs().mean(dim=1)


def _kd_kl_dispatch(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    return kd_kl_per_sample(student_logits, teacher_logits, temperature=temperature)


def _kd_l1_dispatch(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    # KD-L1 has no temperature; it is accepted so that every divergence has one signature.
    return kd_l1_per_sample(student_logits, teacher_logits)


KD_DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "kl": _kd_kl_dispatch,
    "l1": _kd_l1_dispatch,
}


def kd_per_sample(
    student_logits: Tensor, teacher_logits: Tensor, *, divergence: str, temperature: float
) -> Tensor:
    """Per-sample KD loss ``[B]`` by name: ``"kl"`` (§1.2 KD-KL) or ``"l1"`` (§1.2 KD-L1).

    ``temperature`` is ignored by ``"l1"``. An unknown name raises ``ValueError`` listing the
    valid ones.
    """
    try:
        loss_fn = KD_DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(
            f"unknown KD divergence {divergence!r}; valid: {', '.join(sorted(KD_DIVERGENCES))}"
        ) from None
    return loss_fn(student_logits, teacher_logits, temperature)


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """Batch-mean ("batchmean") KD-KL, algorithms.md §1.2: (1/B)·Σ_i ℓ_KL,i."""
    return kd_kl_per_sample(student_logits, teacher_logits, temperature=temperature).mean()


def kd_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Batch KD-L1, algorithms.md §1.2: the mean over all B·C entries of |s − t|."""
    return kd_l1_per_sample(student_logits, teacher_logits).mean()


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, divergence: str, temperature: float
) -> Tensor:
    """Batch mean of :func:`kd_per_sample` (algorithms.md §1.2 KD-KL / KD-L1)."""
    return kd_per_sample(
        student_logits, teacher_logits, divergence=divergence, temperature=temperature
    ).mean()


def feature_hint_per_sample(projected: Tensor, teacher_features: Tensor) -> Tensor:
    """Per-sample feature hint (FitNets), shape ``[B]``, scale-free in the teacher's features.

    ℓ_hint,i = ‖P f_S,i − f_T,i‖² / (d · v̄),  v̄ = (1/d)·Σ_j Var_batch(f_T,·j)

    with ``projected`` = P f_S ``[B, d]`` (the student's penultimate features through a linear
    map) and ``teacher_features`` f_T ``[B, d]``. Dividing by the batch's mean per-dimension
    variance v̄ (no gradient flows through it) makes ℓ = 1 for a student that predicts the
    batch mean of every dimension, whatever the teacher's feature scale, so one weight suits
    any teacher. A batch of one (no variance) divides by 1.
    """
    if projected.dim() != 2 or projected.shape != teacher_features.shape:
        raise ValueError(
            "projected and teacher_features must both be [batch, dim] of one shape, got "
            f"{tuple(projected.shape)} and {tuple(teacher_features.shape)}"
        )
    target = teacher_features.detach()
    scale = target.var(dim=0).mean().clamp_min(1e-8) if target.shape[0] > 1 else target.new_ones(())
    return ((projected - target) ** 2).mean(dim=1) / scale
