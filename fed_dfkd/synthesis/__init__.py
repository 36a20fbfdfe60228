"""Synthesis methods behind one interface (one module per method).

Registered names: ``dafl``, ``dfad``, ``deepinversion``, ``cudfkd``, ``adadfkd``.
"""

from fed_dfkd.synthesis.base import (
    SYNTHESIZERS,
    Progress,
    SynthesisReport,
    Synthesizer,
    build_generator_optimizer,
    build_synthesizer,
    method_defaults,
    teacher_class_prior,
)
from fed_dfkd.synthesis import adadfkd, cudfkd, dafl, deepinversion, dfad  # noqa: F401  (registration)

__all__ = [
    "SYNTHESIZERS",
    "Progress",
    "SynthesisReport",
    "Synthesizer",
    "build_generator_optimizer",
    "build_synthesizer",
    "method_defaults",
    "teacher_class_prior",
]
