"""Adversarial (student–teacher disagreement) terms and the total-variation image prior.

The generator *maximises* the disagreement, so every ``adversarial_*`` loss is the negated
divergence (or ADI's ``1 − clip(JS*)``). Teacher logits are **not** detached: in the reference
the generator's gradient flows through both teacher and student (algorithms.md §2, §3.1); a
caller that wants the server-side variant of §12.4 detaches them itself.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_dfkd.losses.kd import _check_logit_pair, _check_temperature, kd_kl_per_sample

logger = logging.getLogger(__name__)

__all__ = [
    "ADVERSARIAL_DIVERGENCES",
    "adi_competition",
    "adversarial_js",
    "adversarial_kl",
    "adversarial_l1",
    "adversarial_loss",
    "js_star",
    "total_variation",
]

# ADI clamps the three distributions to this range before taking logs.
_JS_CLAMP_MIN, _JS_CLAMP_MAX = 0.01, 0.99


def adversarial_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0
) -> Tensor:
    """algorithms.md §1.2 adversarial KL: L_adv = −(1/B)·Σ_i τ²·KL(σ_τ(t_i) ‖ σ_τ(s_i)).

    The reference fixes τ = 3 (factor 9). Gradient flows into both logit tensors.
    """
    return -kd_kl_per_sample(student_logits, teacher_logits, temperature=temperature).mean()


def adversarial_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DFAD adversary, algorithms.md §2.2: −mean |s − t| over all B·C entries."""
    _check_logit_pair(student_logits, teacher_logits)
    return -(student_logits - teacher_logits).abs().mean()


def js_star(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0) -> Tensor:
    """ADI's clamped Jensen–Shannon form, algorithms.md §1.2 JS*.

    P = σ_τ(s), Q = σ_τ(t), M = (P + Q)/2; then P, Q and M are each clamped to [0.01, 0.99]
    (M is formed *before* clamping) and JS* = ½·KL(M‖P) + ½·KL(M‖Q), averaged over the batch.
    The order KL(M‖·) is the reference's, not the textbook JS. No τ² factor.
    """
    _check_logit_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    mixture = 0.5 * (p_student + p_teacher)
    p_student = p_student.clamp(_JS_CLAMP_MIN, _JS_CLAMP_MAX)
    p_teacher = p_teacher.clamp(_JS_CLAMP_MIN, _JS_CLAMP_MAX)
    mixture = mixture.clamp(_JS_CLAMP_MIN, _JS_CLAMP_MAX)
    log_mixture = mixture.log()
    kl_mixture_student = (mixture * (log_mixture - p_student.log())).sum(dim=1)
    kl_mixture_teacher = (mixture * (log_mixture - p_teacher.log())).sum(dim=1)
    return (0.5 * kl_mixture_student + 0.5 * kl_mixture_teacher).mean()


def adversarial_js(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0
) -> Tensor:
    """−JS* (algorithms.md §1.2; CuDFKD's ``js`` adversary, §3.1)."""
    return -js_star(student_logits, teacher_logits, temperature=temperature)


def adi_competition(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0
) -> Tensor:
    """ADI competition, algorithms.md §1.2: L_comp = 1 − clip(JS*, 0, 1) (AdaDFKD's ``js``)."""
    return 1.0 - js_star(student_logits, teacher_logits, temperature=temperature).clamp(0.0, 1.0)


def _adversarial_l1_dispatch(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    return adversarial_l1(student_logits, teacher_logits)


def _adversarial_kl_dispatch(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    return adversarial_kl(student_logits, teacher_logits, temperature=temperature)


def _adversarial_js_dispatch(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    return adversarial_js(student_logits, teacher_logits, temperature=temperature)


def _adi_competition_dispatch(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> Tensor:
    return adi_competition(student_logits, teacher_logits, temperature=temperature)


ADVERSARIAL_DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "kl": _adversarial_kl_dispatch,
    "l1": _adversarial_l1_dispatch,
    "js": _adversarial_js_dispatch,
    "adi": _adi_competition_dispatch,
}


def adversarial_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str,
    temperature: float = 3.0,
) -> Tensor:
    """Adversarial generator term by name (algorithms.md §1.2).

    ``"kl"``: :func:`adversarial_kl`; ``"l1"``: :func:`adversarial_l1` (ignores temperature);
    ``"js"``: :func:`adversarial_js` (−JS*, CuDFKD); ``"adi"``: :func:`adi_competition`
    (1 − clip(JS*, 0, 1), ADI and AdaDFKD). An unknown name raises ``ValueError``.
    """
    try:
        loss_fn = ADVERSARIAL_DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(
            f"unknown adversarial divergence {divergence!r}; "
            f"valid: {', '.join(sorted(ADVERSARIAL_DIVERGENCES))}"
        ) from None
    return loss_fn(student_logits, teacher_logits, temperature)


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation, algorithms.md §1.2 TV (benchmark form).

    The sum over 4 neighbour directions (right, down, down-right and down-left diagonals) of
    the mean |Δx| over all entries of that direction's difference tensor. ``images`` is
    ``[..., H, W]`` (typically [B, C, H, W]).
    """
    if images.dim() < 2 or images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(f"images must be [..., H, W] with H, W >= 2, got {tuple(images.shape)}")
    right = images[..., :, 1:] - images[..., :, :-1]
    down = images[..., 1:, :] - images[..., :-1, :]
    down_right = images[..., 1:, 1:] - images[..., :-1, :-1]
    down_left = images[..., 1:, :-1] - images[..., :-1, 1:]
    return sum(
        (difference.abs().mean() for difference in (right, down, down_right, down_left)),
        torch.zeros((), dtype=images.dtype, device=images.device),
    )
