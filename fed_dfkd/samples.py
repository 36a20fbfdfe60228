"""Pseudo-batches drawn from the generator, and their uint8 wire form.

A round's pseudo-samples are drawn once, quantised to uint8 (every party then sees exactly the
same tensor, 4x smaller than float32) and used for the teachers' logits and the student's steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fed_dfkd.models import Generator


def quantize_images(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 (round to nearest of 256 levels)."""
    return (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def dequantize_images(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 255.0


@torch.no_grad()
def draw_pseudo_batches(
    generator: Generator,
    *,
    num_batches: int,
    batch_size: int,
    rng: torch.Generator,
    quantize: bool = True,
    batch_statistics: bool = False,
) -> Tensor:
    """``[num_batches, batch_size, C, H, W]`` samples from G, uint8 when ``quantize`` else float32.

    By default G runs in eval mode (its BatchNorm running statistics, as the reference samples
    student batches). With ``batch_statistics`` each batch is normalised by its own statistics,
    as during G's own steps, and G's running statistics are left untouched.
    """
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
