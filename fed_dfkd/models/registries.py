"""The model registries and the two builders that read them.

Kept apart from ``fed_dfkd/models/__init__.py`` so that each architecture module can register
itself without importing the package that imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from fed_dfkd.registry import Registry

if TYPE_CHECKING:
    from fed_dfkd.models.base import Classifier
    from fed_dfkd.models.generator import Generator

ClassifierConstructor = Callable[..., "Classifier"]
GeneratorConstructor = Callable[..., "Generator"]

CLASSIFIERS: Registry[ClassifierConstructor] = Registry("classifier")
GENERATORS: Registry[GeneratorConstructor] = Registry("generator")


#: runtime.memory_format's names.
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def to_memory_format(module: nn.Module, name: str) -> nn.Module:
    """Lay out ``module``'s 4-d parameters and buffers in ``name`` (``runtime.memory_format``),
    in place; returns the module. With ``channels_last`` (NHWC) its convolutions then run in
    that layout on any input, and loading a state dict keeps the layout (``copy_`` into the
    parameter)."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format {name!r} is not one of {sorted(MEMORY_FORMATS)}")
    return module.to(memory_format=MEMORY_FORMATS[name])


def build_classifier(name: str, *, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Build the classifier registered as ``name``.

    Raises :class:`fed_dfkd.registry.UnknownNameError` (listing the valid names) for an unknown
    ``name`` and ``ValueError`` for sizes the architecture cannot take.
    """
    constructor = CLASSIFIERS.get(name)
    return constructor(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def build_generator(
    name: str,
    *,
    latent_dim: int,
    width: int,
    depth: int,
    image_size: int,
    channels: int,
    init: str = "dcgan",
    num_classes: int = 0,
) -> Generator:
    """Build the generator registered as ``name`` (see algorithms.md §1.4 for ``dcgan``)."""
    constructor = GENERATORS.get(name)
    return constructor(
        latent_dim=latent_dim,
        width=width,
        depth=depth,
        image_size=image_size,
        channels=channels,
        init=init,
        num_classes=num_classes,
    )
