"""The model registries and the two builders that read them.

Kept apart from ``fed_dfkd/models/__init__.py`` so that each architecture module can register
itself without importing the package that imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from fed_dfkd.registry import Registry

if TYPE_CHECKING:
    from fed_dfkd.models.base import Classifier
    from fed_dfkd.models.generator import Generator

ClassifierConstructor = Callable[..., "Classifier"]
GeneratorConstructor = Callable[..., "Generator"]

CLASSIFIERS: Registry[ClassifierConstructor] = Registry("classifier")
GENERATORS: Registry[GeneratorConstructor] = Registry("generator")


#: The memory format build_classifier gives the classifiers' 4-d tensors (runtime.memory_format,
#: set for the process by fed_dfkd.runtime.resolve_device, like torch's thread count).
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
_memory_format = "contiguous"


def set_memory_format(name: str) -> None:
    """Lay out the classifiers built from now on in ``name`` (``contiguous`` or ``channels_last``)."""
    global _memory_format
    if name not in _MEMORY_FORMATS:
        raise ValueError(f"memory format {name!r} is not one of {sorted(_MEMORY_FORMATS)}")
    _memory_format = name


def memory_format() -> str:
    """The memory format build_classifier applies now."""
    return _memory_format


def build_classifier(name: str, *, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Build the classifier registered as ``name``, laid out in the current memory format.

    With ``channels_last`` the convolutions' weights are NHWC, so convolutions run in that
    layout on any input; loading a state dict keeps the layout (``copy_`` into the parameter).

    Raises :class:`fed_dfkd.registry.UnknownNameError` (listing the valid names) for an unknown
    ``name`` and ``ValueError`` for sizes the architecture cannot take.
    """
    constructor = CLASSIFIERS.get(name)
    model = constructor(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if _memory_format != "contiguous":
        model = model.to(memory_format=_MEMORY_FORMATS[_memory_format])
    return model


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
