"""Pseudo-batches drawn from the generator, and their uint8 wire form.

A round's pseudo-samples are drawn once, quantised to uint8 (every party then sees exactly the
same tensor, 4x smaller than float32) and used for the teachers' logits and the student's steps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fed_dfkd.models import Generator
from fed_dfkd.seeding import make_rng


def quantize_images(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 (round to nearest of 256 levels)."""
    return (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def dequantize_images(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 255.0


def assigned_labels(
    batch_size: int, num_classes: int, *, rng: torch.Generator, class_counts: Sequence[float] | None = None
) -> Tensor:
    """The classes a latent batch is fitted to, shuffled with ``rng``.

    Balanced (class ``i mod num_classes`` for row i) without ``class_counts`` or when they sum
    to zero; otherwise each class gets a share of the batch proportional to its count (floors,
    then the largest remainders, ties to the lower class), so an owner's generator is asked for
    the classes its teacher was trained on, in their proportions.
    """
    counts = None if class_counts is None else torch.tensor([float(c) for c in class_counts],
                                                            dtype=torch.float64)
    if counts is None or float(counts.sum()) <= 0:
        labels = torch.arange(batch_size) % num_classes
    else:
        if len(counts) != num_classes or bool((counts < 0).any()):
            raise ValueError(f"class_counts must be {num_classes} non-negative counts, "
                             f"got {list(class_counts or [])}")
        quota = counts / counts.sum() * batch_size
        shares = quota.floor().long()
        remainder = quota - shares
        # Stable sort: equal remainders go to the lower class.
        order = torch.sort(-remainder, stable=True).indices
        shares[order[: batch_size - int(shares.sum())]] += 1
        labels = torch.repeat_interleave(torch.arange(num_classes), shares)
    return labels[torch.randperm(batch_size, generator=rng)]


def round_latents(
    generator: Generator,
    *,
    seed: int,
    round_index: int,
    batch_size: int,
    num_classes: int,
    device: torch.device | str | None = None,
    owner: int | None = None,
    class_counts: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``method.generator_latents: round``: the latent batch Z and its assigned classes Y of a
    round, the same for every party (seeded by ``"round-latents"`` and the round).

    Y is balanced: class ``i mod num_classes`` for row i, shuffled. G's steps in round r fit
    G(Z_{r+1}) to Y_{r+1}; the pseudo-batch drawn in round r + 1 is G(Z_{r+1}), the batch G was
    fitted to (DENSE / CMI's synthesis of one batch, with assigned targets).

    With ``owner`` (``federation.generators: per_owner``) the stream is that owner's own, so
    every owner's generator fits a different batch; with ``class_counts`` Y follows those counts
    (:func:`assigned_labels`). Z never depends on the counts, so the server redraws an owner's
    batch from Z alone (an unconditional G) without knowing them.
    """
    rng = (make_rng(seed, "round-latents", round_index) if owner is None
           else make_rng(seed, "round-latents", round_index, "owner", owner))
    latents = generator.sample_latent(batch_size, rng=rng, device=device)
    labels = assigned_labels(batch_size, num_classes, rng=rng, class_counts=class_counts)
    return latents, labels if device is None else labels.to(device)


def boundary_targets(
    labels: Tensor, num_classes: int, *, fraction: float, mix: float, rng: torch.Generator
) -> Tensor:
    """``method.boundary_fraction``: soft targets ``[B, num_classes]`` for assigned ``labels``.

    The first ⌊fraction·B + ½⌋ rows (the labels are shuffled, so a random subset) become
    (1 − mix)·e_y + mix·e_y', y' drawn uniformly from the other classes by ``rng``; every other
    row stays the one-hot e_y, so with ``fraction`` 0 the cross-entropy against these targets is
    the plain one-hot term.
    """
    if num_classes < 2:
        raise ValueError("boundary targets need at least 2 classes")
    targets = torch.nn.functional.one_hot(labels, num_classes).float()
    rows = int(fraction * labels.shape[0] + 0.5)
    if rows:
        offset = torch.randint(1, num_classes, (rows,), generator=rng, device=rng.device)
        partner = (labels[:rows] + offset.to(labels.device)) % num_classes
        targets[:rows] *= 1.0 - mix
        targets[torch.arange(rows, device=labels.device), partner] += mix
    return targets


@torch.no_grad()
def draw_pseudo_batches(
    generator: Generator,
    *,
    num_batches: int,
    batch_size: int,
    rng: torch.Generator,
    quantize: bool = True,
    batch_statistics: bool = False,
    latents: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``[num_batches, batch_size, C, H, W]`` samples from G, uint8 when ``quantize`` else float32.

    By default G runs in eval mode (its BatchNorm running statistics, as the reference samples
    student batches). With ``batch_statistics`` each batch is normalised by its own statistics,
    as during G's own steps, and G's running statistics are left untouched. With ``latents``
    (``(Z, Y)`` of :func:`round_latents`) the one batch is G(Z) (Y goes to a conditional G)
    instead of a draw from ``rng``.
    """
    if latents is not None and (num_batches != 1 or len(latents[0]) != batch_size):
        raise ValueError(f"given latents make one batch of {len(latents[0])}, "
                         f"not {num_batches} of {batch_size}")
    was_training = generator.training
    generator.train(batch_statistics)
    # Batch statistics without moving the running ones: momentum 0 for the duration.
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    tracked = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in norms]
    if batch_statistics:
        for m in norms:
            m.momentum = 0.0
    device = next(generator.parameters()).device
    try:
        batches = []
        for _ in range(num_batches):
            if latents is not None:
                latent, labels = latents[0].to(device), latents[1].to(device)
                images = generator(latent, labels if generator.conditional else None)
            else:
                latent = generator.sample_latent(batch_size, rng=rng, device=device)
                images = generator(latent, generator.sample_labels(batch_size, rng=rng, device=device))
            batches.append(quantize_images(images) if quantize else images.float())
    finally:
        generator.train(was_training)
        for m, momentum, count in zip(norms, momenta, tracked):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
    return torch.stack(batches)


def as_float_images(images: Tensor) -> Tensor:
    return dequantize_images(images) if images.dtype == torch.uint8 else images
