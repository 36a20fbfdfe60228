"""Adversarial training of teachers (``models.pretrain.adversarial_epsilon``).

A classifier trained on worst-case inputs within a small L2 ball (Madry et al. 2018) has input
gradients that point at features a person would call the class (Santurkar et al. 2019, "Image
synthesis with a single robust classifier"): what a generator finds by maximising such a
teacher's confidence looks more like data. These are the two pieces the teacher trainer needs:
the attack and a clean recalibration of the BatchNorm running statistics afterwards, so the
statistics the BN prior matches are those of the owners' real images, not of the attacks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pgd_l2", "recalibrate_batchnorm"]


def _per_sample_norm(values: Tensor) -> Tensor:
    """L2 norm of each row of ``values`` flattened, shaped to broadcast against ``values``."""
    norms = values.flatten(1).norm(dim=1)
    return norms.view(-1, *([1] * (values.dim() - 1)))


def pgd_l2(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, steps: int,
           step_size: float | None = None) -> Tensor:
    """Projected gradient ascent on the cross-entropy inside the L2 ball of radius ``epsilon``.

    x_{k+1} = Π_{‖x − x_0‖₂ ≤ ε, x ∈ [0, 1]}(x_k + η g_k / ‖g_k‖₂), g_k = ∇_x CE(model(x_k), y),
    from x_0 = ``images`` (no random start, so a seed reproduces it), with η = 2.5 ε / steps
    unless ``step_size`` is given (Madry et al.'s choice: the ball can be crossed). The model is
    evaluated in eval mode (its BatchNorm running statistics neither used from the attack's
    batches nor changed by them) and its mode restored; its parameter gradients are untouched.
    Returns the perturbed images, detached. ``epsilon = 0`` or ``steps = 0`` returns a copy of
    ``images``.
    """
    if epsilon < 0 or steps < 0:
        raise ValueError("epsilon and steps must be >= 0")
    if epsilon == 0 or steps == 0:
        return images.detach().clone()
    eta = 2.5 * epsilon / steps if step_size is None else step_size
    was_training = model.training
    model.eval()
    original = images.detach()
    adversarial = original.clone()
    try:
        for _ in range(steps):
            adversarial.requires_grad_(True)
            loss = F.cross_entropy(model(adversarial), labels)
            (gradient,) = torch.autograd.grad(loss, adversarial)
            step = gradient / _per_sample_norm(gradient).clamp_min(1e-12)
            delta = adversarial.detach() + eta * step - original
            delta = delta * (epsilon / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            adversarial = (original + delta).clamp(0.0, 1.0)
    finally:
        model.train(was_training)
    return adversarial.detach()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Replace every BatchNorm layer's running statistics by their exact averages over ``batches``.

    Each layer's running mean and variance are reset and re-estimated with a cumulative average
    (momentum ``None``) of the batch statistics of ``batches`` in train mode, without gradients;
    the layers' momenta and the model's mode are restored. Returns the number of layers changed
    (0: the model has no BatchNorm and nothing happened).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)
