"""Curriculum: schedules as pure functions of progress, self-paced weights, R2M negative bank."""

from fed_dfkd.curriculum.negative_bank import NegativeBank
from fed_dfkd.curriculum.schedules import (
    PROGRESS_TOLERANCE,
    adversarial_weight,
    check_progress,
    cosine,
    linear,
    negative_window_start,
    ramp,
)
from fed_dfkd.curriculum.self_paced import (
    SELF_PACED_GRANULARITIES,
    SELF_PACED_KINDS,
    SELF_PACED_PACES,
    SelfPacedResult,
    SelfPacedWeighting,
    self_paced_weights,
)

__all__ = [
    "NegativeBank",
    "PROGRESS_TOLERANCE",
    "SELF_PACED_GRANULARITIES",
    "SELF_PACED_KINDS",
    "SELF_PACED_PACES",
    "SelfPacedResult",
    "SelfPacedWeighting",
    "adversarial_weight",
    "check_progress",
    "cosine",
    "linear",
    "negative_window_start",
    "ramp",
    "self_paced_weights",
]
