"""The student's feature hint (``distill.feature_weight``): the loss in closed form, the
trainer's map P (its gradient, its state, its seed), the final fit, and where it is refused."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator, fit_fresh_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.distill import StudentTrainer
from fed_dfkd.errors import UserError
from fed_dfkd.federated import FederatedServer
from fed_dfkd.losses import feature_hint_per_sample, kd_per_sample
from fed_dfkd.synthesis import Progress

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def test_hint_by_hand() -> None:
    target = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # per-dimension variances 2 and 2: v̄ = 2
    projected = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    # Row 0: (1² + 0²) / 2 / 2 = 0.25; row 1: (0² + 3²) / 2 / 2 = 2.25.
    torch.testing.assert_close(feature_hint_per_sample(projected, target), torch.tensor([0.25, 2.25]))
    torch.testing.assert_close(feature_hint_per_sample(target, target), torch.zeros(2))


def test_predicting_the_batch_mean_costs_one_at_any_scale() -> None:
    # mean_i ℓ_i = (1/d) Σ_j ((B − 1)/B) var_j / v̄ = (B − 1)/B for P f_S = the batch mean.
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(16, 5, generator=generator) * torch.tensor([1.0, 3.0, 0.1, 7.0, 2.0])
    mean = target.mean(dim=0, keepdim=True).expand_as(target)
    for scale in (1.0, 1e3):
        loss = feature_hint_per_sample(mean * scale, target * scale)
        assert float(loss.mean()) == pytest.approx(15 / 16, rel=1e-5)


def test_hint_checks_shapes_and_passes_no_gradient_to_the_target() -> None:
    with pytest.raises(ValueError, match="same shape|one shape"):
        feature_hint_per_sample(torch.zeros(4, 3), torch.zeros(4, 2))
    target = torch.randn(4, 3, requires_grad=True)
    projected = torch.randn(4, 3, requires_grad=True)
    feature_hint_per_sample(projected, target).sum().backward()
    assert target.grad is None and projected.grad is not None
    assert torch.isfinite(feature_hint_per_sample(torch.ones(1, 3), torch.zeros(1, 3))).all()


def _config(**distill):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "cudfkd"},
        "distill": {"batch_size": 8, "student_steps": 2, "optimizer": "adam", "lr": 0.01, **distill},
        "curriculum": {"enabled": False},
        "federation": {"rounds": 4},
    })


class _Features:
    """A fixed 'teacher' with 6 features: a seeded linear map of the pixels."""

    def __init__(self) -> None:
        self.weight = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1) @ self.weight


def _trainer(cfg, features=None, dim=6, seed=7) -> StudentTrainer:
    from fed_dfkd.coordinator import build_student

    return StudentTrainer(build_student(cfg, INFO), cfg.distill, cfg.curriculum, cfg.method,
                          teacher_features=features, teacher_feature_dim=dim, projection_seed=seed)


def test_the_step_adds_the_weighted_hint_and_trains_the_map() -> None:
    cfg = _config(feature_weight=0.5)
    features = _Features()
    trainer = _trainer(cfg, features)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    # Expected loss, computed before the step from the same student and map.
    with torch.no_grad():
        trainer.student.train()
        s_logits, s_features = trainer.student(images, return_features=True)
        kd = kd_per_sample(s_logits, logits, divergence=cfg.distill.divergence,
                           temperature=cfg.distill.temperature)
        hint = feature_hint_per_sample(trainer.projection(s_features), features(images))
    before = trainer.projection.weight.detach().clone()
    report = trainer.step(images, logits, Progress.of_round(0, 4))
    assert report.kd_loss == pytest.approx(float(kd.mean()), rel=1e-5)
    assert report.feature_loss == pytest.approx(float(hint.mean()), rel=1e-5)
    assert report.loss == pytest.approx(float((kd + 0.5 * hint).mean()), rel=1e-5)
    assert not torch.equal(trainer.projection.weight, before)  # P is trained with S


def test_without_the_weight_there_is_no_map_and_the_step_is_the_plain_one() -> None:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    plain = _trainer(_config())
    assert plain.projection is None and "projection" in plain.state_dict()
    report = plain.step(images, logits, Progress.of_round(0, 4))
    assert report.feature_loss == 0.0 and report.loss == pytest.approx(report.kd_loss)


def test_the_map_is_seeded_saved_and_restored() -> None:
    cfg = _config(feature_weight=1.0)
    a, b, c = _trainer(cfg, _Features()), _trainer(cfg, _Features()), _trainer(cfg, _Features(), seed=8)
    assert torch.equal(a.projection.weight, b.projection.weight)
    assert not torch.equal(a.projection.weight, c.projection.weight)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a.step(images, torch.randn(8, 10, generator=torch.Generator().manual_seed(2)), Progress.of_round(0, 4))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.projection.weight, a.projection.weight)
    assert c.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="feature map"):
        _trainer(_config()).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="feature map"):
        a.load_state_dict(_trainer(_config()).state_dict())


def test_a_zero_map_leaves_the_first_step_of_the_student_to_the_plain_loss() -> None:
    # With P = 0 the hint's gradient to the student's features, P^T (P f_S - f_T), is zero, so
    # the first step moves the student exactly as the step without the hint does; P itself learns.
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    zero = _trainer(_config(feature_weight=1.0, feature_projection_init="zero"), _Features())
    torch.manual_seed(5)
    plain = _trainer(_config())
    assert not zero.projection.weight.any() and not zero.projection.bias.any()
    report = zero.step(images, logits, Progress.of_round(0, 4))
    plain.step(images, logits, Progress.of_round(0, 4))
    # P f_S = 0 for every sample: the hint is sum_j f_T,ij^2 / (d v̄), positive.
    assert report.feature_loss > 0
    for mine, theirs in zip(zero.student.state_dict().values(), plain.student.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert zero.projection.weight.any()
    # The seeded map, by contrast, moves the student differently from the first step.
    torch.manual_seed(5)
    seeded = _trainer(_config(feature_weight=1.0), _Features())
    seeded.step(images, logits, Progress.of_round(0, 4))
    moved = [not torch.equal(a, b) for a, b in zip(seeded.student.parameters(), plain.student.parameters())]
    assert any(moved)


def test_an_unknown_map_init_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="distill.feature_projection_init"):
        _config(feature_weight=1.0, feature_projection_init="orthogonal")


def test_the_weight_without_the_teachers_features_is_an_error() -> None:
    with pytest.raises(ValueError, match="feature_weight needs the teachers' features"):
        _trainer(_config(feature_weight=1.0), features=None)
    with pytest.raises(ValueError, match="feature_weight needs the teachers' features"):
        Coordinator(_config(feature_weight=1.0), INFO)


def test_the_final_fit_regresses_the_features_too() -> None:
    cfg = _config(feature_weight=1.0)
    features = _Features()
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    trainer, report = fit_fresh_student(cfg, INFO, images, torch.randn(32, 10), steps=4,
                                        teacher_features=features, teacher_feature_dim=6)
    assert features.calls == 4 and report["feature_loss"] > 0  # one teacher call per step
    with pytest.raises(ValueError, match="feature_weight needs the teachers' features"):
        fit_fresh_student(cfg, INFO, images, torch.randn(32, 10), steps=4)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_weights_are_config_errors(value) -> None:
    with pytest.raises(ConfigError, match="distill.feature_weight"):
        _config(feature_weight=value)


def test_a_federation_refuses_the_hint() -> None:
    with pytest.raises(UserError, match="feature_weight needs the teachers' penultimate features"):
        FederatedServer(_config(feature_weight=1.0), INFO)


def test_the_central_loops_teacher_answers_carry_no_graph() -> None:
    from fed_dfkd.centralized import CentralDistillation
    from fed_dfkd.models import build_classifier
    from fed_dfkd.models.normalized import NormalizedClassifier

    torch.manual_seed(0)
    teacher = NormalizedClassifier(build_classifier("cnn_digits_bn", num_classes=10, in_channels=1,
                                                    image_size=8), INFO.mean, INFO.std)
    central = CentralDistillation(_config(feature_weight=1.0), [teacher], INFO)
    images = torch.rand(4, 1, 8, 8, requires_grad=True)
    features, targets = central.teacher_features(images), central.teacher_targets(images)
    assert features.shape == (4, teacher.feature_dim) and targets.shape == (4, 10)
    assert not features.requires_grad and not targets.requires_grad
    assert central.coordinator.trainer.projection.out_features == teacher.feature_dim
