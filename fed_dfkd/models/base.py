"""The classifier interface and input normalisation shared by every architecture.

Every classifier returns its logits and, on request, the penultimate pooled features
(f_t / f_s in algorithms.md §1.1), which the relation and contrastive terms consume.
"""

from __future__ import annotations

import abc
import logging
from typing import Literal, Sequence, overload

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _require_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Classifier(nn.Module, abc.ABC):
    """A classifier that also exposes its penultimate pooled features.

    Subclasses implement :meth:`forward_features`, returning ``(logits [B, C], features
    [B, feature_dim])``. ``forward(x)`` returns the logits alone, ``forward(x,
    return_features=True)`` the pair.
    """

    def __init__(self, *, num_classes: int, feature_dim: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        _require_positive(
            num_classes=num_classes, feature_dim=feature_dim, in_channels=in_channels, image_size=image_size
        )
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.in_channels = in_channels
        self.image_size = image_size

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(logits [B, num_classes], features [B, feature_dim])`` for images ``x``."""

    @overload
    def forward(self, x: Tensor, return_features: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, return_features: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        logits, features = self.forward_features(x)
        if return_features:
            return logits, features
        return logits


class Normalize(nn.Module):
    """Per-channel standardisation x = (x̃ − mean) / std (algorithms.md §1.1, ``norm``).

    ``inverse`` maps normalised images back to the generator's [0, 1] range.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_values = [float(value) for value in mean]
        std_values = [float(value) for value in std]
        if not mean_values or len(mean_values) != len(std_values):
            raise ValueError(
                "mean and std must be non-empty and of equal length, "
                f"got {len(mean_values)} and {len(std_values)}"
            )
        if any(not value > 0.0 for value in std_values):
            raise ValueError(f"std values must be positive, got {std_values}")
        self.register_buffer("mean", torch.tensor(mean_values).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_values).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        """Undo :meth:`forward`: x̃ = x · std + mean."""
        return x * self.std + self.mean

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def init_conv_kaiming(module: nn.Module) -> None:
    """He-normal (fan_out) conv weights, unit BN scale, zero biases: the usual init for ReLU nets.

    Draws from the global torch RNG; callers seed it before building a model.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear) and layer.bias is not None:
            nn.init.zeros_(layer.bias)
