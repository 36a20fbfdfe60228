"""Per-class accuracy: the evaluator's, the report's ``per_class_accuracy`` and plots/per_class.png."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_dfkd.config import config_from_dict
from fed_dfkd.evaluation import Evaluator
from fed_dfkd.plots import plot_per_class
from fed_dfkd.reporting import build_report, per_class_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Fixed(nn.Module):
    """A classifier that answers the given logits for the images coded 0, 1, ... (pixel value)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images[:, 0, 0, 0].long()]


def _one_hot(classes: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 5


def test_the_evaluator_scores_each_class_of_the_student_and_of_the_ensemble() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2)  # batches of 4 and 2
    teacher = Fixed(_one_hot([0, 1, 1, 1, 0, 2]))  # class 0: 1/2, class 1: 2/3, class 2: 1/1
    evaluator = Evaluator(images, labels, [teacher], batch_size=4)
    assert evaluator.ensemble_per_class == pytest.approx([0.5, 2 / 3, 1.0])
    student = Fixed(_one_hot([0, 0, 2, 2, 1, 0]))  # class 0: 2/2, class 1: 1/3, class 2: 0/1
    metrics = evaluator.evaluate(student)
    assert metrics["per_class_accuracy"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert metrics["student_accuracy"] == pytest.approx(3 / 6)


def test_the_report_takes_the_last_evaluated_round_with_the_class_names() -> None:
    cfg = config_from_dict({"data": {"dataset": "digits"}, "federation": {"rounds": 3}})
    history = [
        {"step": 1, "student_accuracy": 0.5, "per_class_accuracy": [0.1, 0.9]},
        {"step": 2, "student_accuracy": 0.6, "per_class_accuracy": [0.3, 0.8]},
        {"step": 3},  # not evaluated
    ]
    report = build_report(cfg, history=history, wall_seconds=1.0, teacher_accuracies=[0.9],
                          ensemble_accuracy=0.9, class_names=["a", "b"], ensemble_per_class=[0.95, None])
    assert report["per_class_accuracy"] == {"classes": ["a", "b"], "student": [0.3, 0.8],
                                            "ensemble": [0.95, None]}
    assert "per_class_accuracy" not in report["history"][0]  # the lists stay in metrics.jsonl
    assert per_class_report([{"step": 1}], ["a"], None) is None
    assert per_class_report(history[:1], None, None) == {"classes": ["0", "1"], "student": [0.1, 0.9],
                                                         "ensemble": None}


def test_the_per_class_plot_is_a_png_with_missing_values_and_series(tmp_path) -> None:
    names = ["T-shirt/top", "Trouser", "Pullover"]
    plot_per_class(tmp_path / "a.png", names, {"student": [0.8, None, 0.5], "teacher ensemble": None})
    plot_per_class(tmp_path / "b.png", ["0", "1"], {"student": None})
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
