"""Unit tests for fed_dfkd.metrics: closed-form values on tiny logit tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fed_dfkd.metrics import (
    accuracy,
    agreement,
    per_class_accuracy,
    probability_loyalty,
    top_k_accuracy,
)


def test_accuracy_is_a_fraction() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(logits, torch.tensor([0, 1, 0])) == 1.0
    assert accuracy(logits, torch.tensor([1, 0, 1])) == 0.0


def test_top_k_accuracy() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([1, 0])
    assert top_k_accuracy(logits, labels, k=1) == 0.0
    assert top_k_accuracy(logits, labels, k=2) == 0.5
    assert top_k_accuracy(logits, labels, k=3) == 1.0
    with pytest.raises(ValueError, match="k"):
        top_k_accuracy(logits, labels, k=4)


def test_agreement_compares_argmaxes() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    teacher = torch.tensor([[9.0, 1.0, 0.0], [0.0, 3.0, 2.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    assert agreement(student, teacher) == pytest.approx(0.5)
    assert agreement(teacher, teacher) == 1.0


def test_probability_loyalty_is_one_for_identical_distributions() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [50.0, -50.0, 0.0]])
    assert probability_loyalty(logits, logits) == pytest.approx(1.0, abs=1e-9)
    assert probability_loyalty(logits, logits + 7.0) == pytest.approx(1.0, abs=1e-6)


def test_probability_loyalty_closed_form() -> None:
    student = torch.tensor([[0.0, 0.0]])  # [1/2, 1/2]
    teacher = torch.tensor([[math.log(4.0), 0.0]])  # [4/5, 1/5]
    p, q, m = [0.5, 0.5], [0.8, 0.2], [0.65, 0.35]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m)
    )
    expected = 1.0 - jsd**0.25  # 1 − √(JS distance), the reference's extra square root
    assert probability_loyalty(student, teacher) == pytest.approx(expected, rel=1e-6)
    assert probability_loyalty(teacher, student) == pytest.approx(expected, rel=1e-6)


def test_probability_loyalty_matches_scipy_jensenshannon() -> None:
    spatial = pytest.importorskip("scipy.spatial.distance")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator) * 3
    teacher = torch.randn(6, 5, generator=generator) * 3

    def smoothed(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.double(), dim=1) + 1e-8
        return p / p.sum(dim=1, keepdim=True)

    distances = spatial.jensenshannon(smoothed(student).numpy(), smoothed(teacher).numpy(), axis=1)
    expected = float((1.0 - distances**0.5).mean())
    assert probability_loyalty(student, teacher) == pytest.approx(expected, rel=1e-9)


def test_probability_loyalty_excludes_nan_samples() -> None:
    student = torch.tensor([[0.0, 0.0], [float("nan"), 0.0]])
    teacher = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])
    assert probability_loyalty(student, teacher) == pytest.approx(
        probability_loyalty(student[:1], teacher[:1])
    )
    assert math.isnan(probability_loyalty(student[1:], teacher[1:]))


def test_per_class_accuracy_with_a_missing_class() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0, 2, 2])
    assert per_class_accuracy(logits, labels, num_classes=3) == [0.5, None, 0.5]
    assert per_class_accuracy(logits, labels, num_classes=4)[3] is None
    with pytest.raises(ValueError, match="labels"):
        per_class_accuracy(logits, torch.tensor([0, 0, 2, 5]), num_classes=3)


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        agreement(torch.zeros(3, 2), torch.zeros(3, 3))
