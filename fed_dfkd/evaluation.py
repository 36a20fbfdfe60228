"""Evaluation of the student against the real test split and the teachers (metrics.py)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.data.teachers import predict_logits
from fed_dfkd.metrics import accuracy, agreement, per_class_accuracy, probability_loyalty
from fed_dfkd.models import Classifier


class Evaluator:
    """Scores students on a fixed test split; the teachers' test logits are computed once."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        teachers: Sequence[Classifier],
        *,
        rule: str = "mean",
        weights: Sequence[float] | None = None,
        batch_size: int = 1024,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        member_logits = torch.stack([predict_logits(t, images, batch_size=batch_size) for t in teachers])
        self.teacher_accuracies = [accuracy(logits, labels) for logits in member_logits]
        self.ensemble_logits = aggregate_logits(member_logits, rule=rule, weights=weights)
        self.ensemble_accuracy = accuracy(self.ensemble_logits, labels)
        self.num_classes = int(self.ensemble_logits.shape[1])
        self.ensemble_per_class = per_class_accuracy(self.ensemble_logits, labels, self.num_classes)

    @property
    def best_teacher_accuracy(self) -> float:
        return max(self.teacher_accuracies)

    def evaluate(self, student: Classifier) -> dict[str, Any]:
        """Accuracy, Agree@1 and L_p against the ensemble, and ``per_class_accuracy`` (a list
        over the classes, None for a class the test split lacks)."""
        logits = predict_logits(student, self.images, batch_size=self.batch_size)
        return {
            "student_accuracy": accuracy(logits, self.labels),
            "agreement": agreement(logits, self.ensemble_logits),
            "probability_loyalty": probability_loyalty(logits, self.ensemble_logits),
            "per_class_accuracy": per_class_accuracy(logits, self.labels, self.num_classes),
        }


class ScoresStudents(Protocol):
    def evaluate(self, student: Classifier) -> dict[str, Any]: ...


def evaluate_round(evaluator: ScoresStudents, coordinator: Any) -> dict[str, Any]:
    """The round's evaluation of ``coordinator``'s student; after a final fit
    (``distill.final_fit_steps``) also ``student_accuracy_before_fit``, the accuracy of the
    student the fit replaced, so one run shows what the fit did."""
    metrics = evaluator.evaluate(coordinator.evaluated_student)
    before, coordinator.pre_fit_student = coordinator.pre_fit_student, None
    if before is not None:
        metrics["student_accuracy_before_fit"] = evaluator.evaluate(before)["student_accuracy"]
    return metrics
