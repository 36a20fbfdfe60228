"""Label-preserving image augmentations, seeded by an explicit ``torch.Generator``.

Used for teacher pretraining (``models.pretrain.augment``), on the server for the student's
pseudo-batches (``distill.augment_shift``, ``distill.augment_flip``), and inside the generator
steps (``method.synthesis_jitter``, a differentiable shift of G's batch). The teachers
label each pseudo-sample once, as it left G; the student then sees a shifted and/or mirrored
copy against that same target. That assumes the teachers' answers barely change under a shift
of a pixel or two and, with ``flip``, under a left-right mirror. Plausible for real garments
and natural images, never for digits (a mirrored 3 is not a 3); on Fashion-MNIST
pseudo-samples both options cost accuracy (bench/results/fmnist_tuning.md), so both are off
by default.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, *, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image of ``[B, C, H, W]`` by up to ``max_shift`` pixels each way.

    Zero padding of ``max_shift`` on every side, then a crop of the original size at a uniform
    offset in ``[0, 2·max_shift]`` per axis and per image. Works on float and uint8 batches.
    """
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator,
                            device=generator.device).to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # [B, W]
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 moves the channel dim last: [B, H, W, C].
    cropped = padded[batch_index, :, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_flip(images: Tensor, *, generator: torch.Generator) -> Tensor:
    """Mirror each image of ``[B, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, images.flip(-1), images)


def augment_batches(
    batches: Tensor, *, shift: int, flip: bool, generator: torch.Generator
) -> Tensor:
    """Augment every batch of ``[steps, B, C, H, W]``: shift by up to ``shift`` pixels, then
    mirror with probability 1/2 when ``flip``; one draw per image from ``generator``."""
    steps, batch = batches.shape[:2]
    flat = batches.reshape(steps * batch, *batches.shape[2:])
    flat = random_shift(flat, max_shift=shift, generator=generator)
    if flip:
        flat = random_flip(flat, generator=generator)
    return flat.reshape(batches.shape)


def mixup_batches(
    batches: Tensor, targets: Tensor, *, alpha: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """MixUp within each batch of float images ``[steps, B, C, H, W]``: image i becomes
    λ_i·x_i + (1 − λ_i)·x_π(i), with π a random permutation of the batch and λ_i drawn from
    Beta(``alpha``, ``alpha``), both from ``generator`` (torch's Beta sampler takes no generator,
    so λ comes from a NumPy stream seeded by it). ``targets`` ``[steps, B, K]`` (logits) are
    blended with the same λ_i and π: a first-order stand-in for the teachers' answer on the
    blend, which ``distill.relabel_augmented`` replaces by the answer itself."""
    steps, batch = batches.shape[:2]
    perm = torch.argsort(torch.rand(steps, batch, generator=generator, device=generator.device), dim=1)
    lam = beta_draws(alpha, (steps, batch), generator=generator)
    perm = perm.to(batches.device)
    image_shape = (steps, batch) + (1,) * (batches.dim() - 2)
    partner = torch.gather(batches, 1, perm.view(image_shape).expand_as(batches))
    partner_targets = torch.gather(targets, 1, perm[..., None].expand_as(targets))
    image_lam = lam.to(batches.device, batches.dtype).view(image_shape)
    target_lam = lam.to(targets.device, targets.dtype)[..., None]
    return (image_lam * batches + (1 - image_lam) * partner,
            target_lam * targets + (1 - target_lam) * partner_targets)


def beta_draws(alpha: float, shape: tuple[int, ...], *, generator: torch.Generator) -> Tensor:
    """λ ~ Beta(``alpha``, ``alpha``) of ``shape`` (float64), from a NumPy stream seeded by one
    draw of ``generator`` (torch's Beta sampler takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=shape))


def blend_pairs(images: Tensor, count: int, *, alpha: float, generator: torch.Generator) -> Tensor:
    """``count`` blends λ·x_i + (1 − λ)·x_j of pairs of ``images`` ``[N, C, H, W]``: i uniform
    over the N, j uniform over the others (j ≠ i once N > 1), λ ~ Beta(``alpha``, ``alpha``),
    all from ``generator``. uint8 images give uint8 blends (rounded to the nearest level, as
    they would travel), floats give floats. ``distill.mixup_queries``: new samples for the
    teachers to label, not a label-preserving augmentation."""
    n = images.shape[0]
    if n < 1 or count < 0 or alpha <= 0:
        raise ValueError(f"need images, count >= 0 and alpha > 0; got {n} images, {count}, {alpha}")
    first = torch.randint(n, (count,), generator=generator, device=generator.device)
    offset = torch.randint(1, n, (count,), generator=generator, device=generator.device) if n > 1 \
        else torch.zeros(count, dtype=torch.long, device=generator.device)
    second = (first + offset) % n
    lam = beta_draws(alpha, (count,), generator=generator).to(torch.float32)
    lam = lam.view(count, *([1] * (images.dim() - 1))).to(images.device)
    first, second = first.to(images.device), second.to(images.device)
    quantized = images.dtype == torch.uint8
    x = images.to(torch.float32) / 255.0 if quantized else images
    blends = lam * x[first] + (1 - lam) * x[second]
    return (blends.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8) if quantized else blends
