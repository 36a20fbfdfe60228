"""Classifiers and generators, built by name.

Importing this package registers every architecture:

* classifiers (``CLASSIFIERS``): ``lenet5``, ``lenet5_bn``, ``lenet5_bn_full``, ``lenet5_half``,
  ``lenet5_half_bn``, ``cnn_digits``, ``cnn_digits_bn``, ``cnn_digits_half``,
  ``cnn_digits_half_bn``, ``resnet18``, ``resnet34``, ``wrn16_1``, ``wrn16_2``, ``wrn40_1``,
  ``wrn40_2``, ``vgg11_bn``;
* generators (``GENERATORS``): ``dcgan``.
"""

from fed_dfkd.models.registries import (
    CLASSIFIERS, GENERATORS, MEMORY_FORMATS, build_classifier, build_generator, to_memory_format,
)
from fed_dfkd.models.base import Classifier, Normalize
from fed_dfkd.models.generator import Generator
from fed_dfkd.models import lenet, resnet, small_cnn, vgg, wrn  # noqa: F401  (registration)

__all__ = [
    "CLASSIFIERS",
    "GENERATORS",
    "Classifier",
    "Generator",
    "Normalize",
    "build_classifier",
    "build_generator",
    "MEMORY_FORMATS",
    "to_memory_format",
]
