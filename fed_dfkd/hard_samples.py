"""Hard samples: pool samples pushed towards the student's mistakes, for the teachers to label.

A pool of pseudo-samples that the student already fits teaches it little more; the samples it
gets wrong lie near its decision boundaries. Co-Boosting (Dai et al., ICLR 2024) makes such
samples by ascending the ensemble-student discrepancy, which needs the teachers' gradients. The
server here holds no teacher, so it ascends what it can compute: the student's divergence from
the targets the teachers already gave these samples. The perturbed images then travel with the
next round's samples, every owner labels them like any other sample (logits only: no extra round
trip, no gradient leaves an owner), and they join the pool with those fresh labels. Where the
teachers keep the old label the student learns that it was wrong to move; where they change
it the student learns where the boundary is.

``distill.hard_samples`` (0: off), ``distill.hard_sample_radius`` and
``distill.hard_sample_steps`` set it up (docs/methods.md); the wire carries nothing new: uint8
images derived from the generators' samples, and logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fed_dfkd.losses.kd import kd_kl_per_sample
from fed_dfkd.samples import dequantize_images, quantize_images


def perturb_towards_errors(
    student: torch.nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    radius: float,
    steps: int,
    rng: torch.Generator,
    target_temperature: float = 1.0,
) -> Tensor:
    """Projected sign-gradient ascent (PGD, L-infinity ball of ``radius`` in [0, 1] pixel units)
    of the per-sample KL(softmax(t / target_temperature) || softmax(student(x)))
    (:func:`~fed_dfkd.losses.kd.kd_kl_per_sample` at T = 1).

    Starts from a uniform random point of the ball (drawn with ``rng``), takes ``steps`` steps of
    ``2.5 * radius / steps`` (Madry et al.'s step for reaching the boundary), projects onto the
    ball and onto [0, 1] after each. ``images`` are uint8 (returned uint8, rounded to the nearest
    level, which can move a pixel by half a level past the ball) or floats in [0, 1] (returned
    floats). The student's mode and parameters' gradients are left as they were.
    """
    if radius < 0 or steps < 1:
        raise ValueError(f"radius must be >= 0 and steps >= 1, got {radius} and {steps}")
    quantized = images.dtype == torch.uint8
    origin = dequantize_images(images) if quantized else images.detach().float()
    scaled = targets.detach().float() / target_temperature
    was_training = student.training
    student.eval()
    try:
        noise = torch.rand(origin.shape, generator=rng, device=rng.device) * 2.0 - 1.0
        x = (origin + radius * noise.to(origin.device)).clamp(0.0, 1.0)
        step = 2.5 * radius / steps
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            loss = kd_kl_per_sample(student(x), scaled, temperature=1.0).sum()
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + step * grad.sign()
            x = torch.minimum(torch.maximum(x, origin - radius), origin + radius).clamp(0.0, 1.0)
    finally:
        student.train(was_training)
    return quantize_images(x) if quantized else x.detach()
