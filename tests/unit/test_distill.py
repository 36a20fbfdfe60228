"""Student steps (fed_dfkd.distill): KD loss, relation term, self-paced weights, lr schedule, state."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.config import CurriculumConfig, DistillConfig, MethodConfig
from fed_dfkd.curriculum import SelfPacedWeighting
from fed_dfkd.distill import StudentTrainer, build_student_optimizer
from fed_dfkd.models import Classifier
from fed_dfkd.synthesis import Progress

IN_FEATURES, CLASSES = 4, 3


class LinearClassifier(Classifier):
    """logits = W·flatten(x) + b: small enough to check every number by hand."""

    def __init__(self) -> None:
        super().__init__(num_classes=CLASSES, feature_dim=IN_FEATURES, in_channels=1, image_size=2)
        self.fc = nn.Linear(IN_FEATURES, CLASSES)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = x.flatten(1)
        return self.fc(features), features


def zero_student() -> LinearClassifier:
    student = LinearClassifier()
    nn.init.zeros_(student.fc.weight)
    nn.init.zeros_(student.fc.bias)
    return student


def random_student(seed: int) -> LinearClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LinearClassifier()


def distill_config(**overrides) -> DistillConfig:
    values = dict(lr=0.1, momentum=0.9, weight_decay=0.0, temperature=2.0, lr_schedule="constant")
    values.update(overrides)
    return DistillConfig(**values)


def trainer_for(student: Classifier, *, relation_weight: float = 0.0, curriculum: CurriculumConfig | None = None,
                **distill) -> StudentTrainer:
    return StudentTrainer(
        student, distill_config(**distill), curriculum or CurriculumConfig(enabled=False),
        MethodConfig(relation_weight=relation_weight, contrastive_temperature=0.5),
    )


def batch(seed: int, size: int = 6) -> tuple[Tensor, Tensor]:
    rng = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 1, 2, 2, generator=rng)
    teacher_logits = torch.randn(size, CLASSES, generator=rng) * 3
    return images, teacher_logits


# Teacher logits with a hand-computable softmax at T = 2: row 0 -> (1/2, 1/4, 1/4), row 1 uniform.
LN2 = math.log(2.0)
HAND_TEACHER = torch.tensor([[2 * LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
HAND_IMAGES = torch.ones(2, 1, 2, 2)
# With a zero student (uniform softmax): KL_0 = T²·(Σ p log p + log 3) = 4·(log 3 − 1.5·log 2).
HAND_KD = torch.tensor([4 * (math.log(3.0) - 1.5 * LN2), 0.0])


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def test_without_curriculum_the_loss_is_the_mean_kd_in_closed_form():
    student = zero_student()
    report = trainer_for(student).step(HAND_IMAGES, HAND_TEACHER, Progress(0.0))
    assert report.loss == pytest.approx(float(HAND_KD.mean()), rel=1e-6)
    assert report.kd_loss == pytest.approx(float(HAND_KD.mean()), rel=1e-6)
    assert report.relation_loss == 0.0
    assert (report.mean_weight, report.admitted_fraction) == (1.0, 1.0)
    assert math.isnan(report.pace)


def test_the_step_is_sgd_on_the_kd_loss_in_closed_form():
    student = zero_student()
    trainer_for(student, lr=0.1).step(HAND_IMAGES, HAND_TEACHER, Progress(0.0))
    # d KL_T / d s = T·(p_s − p_t); batch mean: ((2·(1/3 − (1/2, 1/4, 1/4))) + 0) / 2.
    bias_gradient = torch.tensor([-1 / 6, 1 / 12, 1 / 12])
    assert torch.allclose(student.fc.bias.detach(), -0.1 * bias_gradient, atol=1e-7)
    # Every input pixel is 1, so each weight column moves like the bias.
    assert torch.allclose(student.fc.weight.detach(), (-0.1 * bias_gradient)[:, None].expand(3, 4), atol=1e-7)


def test_the_l1_divergence_is_the_mean_absolute_logit_error():
    student = zero_student()
    report = trainer_for(student, divergence="l1").step(HAND_IMAGES, HAND_TEACHER, Progress(0.0))
    assert report.loss == pytest.approx(2 * LN2 / 3 / 2, rel=1e-6)


def test_relation_weight_zero_gives_a_zero_relation_term():
    images, teacher = batch(1)
    report = trainer_for(random_student(0), relation_weight=0.0).step(images, teacher, Progress(0.3))
    assert report.relation_loss == 0.0
    assert report.loss == pytest.approx(report.kd_loss, rel=1e-6)


def test_the_relation_term_is_added_with_its_weight():
    # A zero student has zero (unit-normalised) logits: every similarity is 0, so the in-batch
    # InfoNCE is exactly log B for every row.
    report = trainer_for(zero_student(), relation_weight=0.5).step(HAND_IMAGES, HAND_TEACHER, Progress(0.0))
    assert report.relation_loss == pytest.approx(math.log(2.0), rel=1e-6)
    assert report.loss == pytest.approx(float(HAND_KD.mean()) + 0.5 * math.log(2.0), rel=1e-6)


def test_the_relation_term_matches_a_manual_infonce():
    images, teacher = batch(2)
    student = random_student(3)
    with torch.no_grad():
        logits = student(images)
    similarities = F.normalize(teacher, dim=1) @ F.normalize(logits, dim=1).T
    manual = -torch.log_softmax(similarities / 0.5, dim=1).diagonal()
    report = trainer_for(student, relation_weight=0.25).step(images, teacher, Progress(0.0))
    assert report.relation_loss == pytest.approx(float(manual.mean()), rel=1e-5)
    assert report.loss == pytest.approx(report.kd_loss + 0.25 * float(manual.mean()), rel=1e-5)


def test_the_target_temperature_sharpens_the_targets_in_closed_form():
    # τ_t = 0.5 at τ = 2: row 0's target is softmax((2·ln 2, 0, 0)) = (2/3, 1/6, 1/6), row 1 stays
    # uniform; against a zero student KL_0 = τ²·(Σ p log p + log 3).
    sharp = 4 * (2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 6) + math.log(3.0))
    report = trainer_for(zero_student(), target_temperature=0.5).step(HAND_IMAGES, HAND_TEACHER, Progress(0.0))
    assert report.kd_loss == pytest.approx(sharp / 2, rel=1e-6)


@pytest.mark.parametrize("relation_weight", [0.0, 0.3])
def test_the_target_temperature_is_the_same_as_dividing_the_targets(relation_weight):
    images, teacher = batch(4)
    divided, scaled = random_student(5), random_student(5)
    by_config = trainer_for(scaled, relation_weight=relation_weight, target_temperature=0.25)
    by_hand = trainer_for(divided, relation_weight=relation_weight)
    for _ in range(3):
        assert same_report(by_config.step(images, teacher, Progress(0.2)),
                           by_hand.step(images, teacher / 0.25, Progress(0.2)))
    for a, b in zip(scaled.parameters(), divided.parameters()):
        assert torch.equal(a, b)
    # The default leaves the targets alone: a different student from the same start.
    plain = random_student(5)
    unscaled = trainer_for(plain, relation_weight=relation_weight)
    for _ in range(3):
        unscaled.step(images, teacher, Progress(0.2))
    assert not torch.equal(plain.fc.weight, scaled.fc.weight)


def kd_by_hand(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    p_teacher = torch.softmax(teacher_logits / temperature, dim=1)
    log_ratio = torch.log_softmax(teacher_logits / temperature, dim=1) - torch.log_softmax(
        student_logits / temperature, dim=1)
    return temperature**2 * (p_teacher * log_ratio).sum(dim=1)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("kind", ["log", "hard", "soft"])
def test_self_paced_weights_are_applied_as_mean_of_v_times_loss(kind, granularity):
    curriculum = CurriculumConfig(enabled=True, weighting=kind, granularity=granularity, pace="quantile",
                                  pace_start=0.5, pace_end=1.0)
    images, teacher = batch(4, size=8)
    student = random_student(5)
    reference = copy.deepcopy(student)
    progress = Progress(0.25)
    trainer = trainer_for(student, curriculum=curriculum, weight_decay=0.0)

    losses = kd_by_hand(reference(images), teacher, 2.0)
    paced = SelfPacedWeighting(kind=kind, granularity=granularity, pace="quantile", pace_start=0.5,
                               pace_end=1.0, sharpness=curriculum.sharpness,
                               history=curriculum.history)(losses.detach(), progress.fraction)
    expected = (paced.weights * losses).mean()
    report = trainer.step(images, teacher, progress)

    assert report.loss == pytest.approx(float(expected.detach()), rel=1e-5)
    assert report.mean_weight == pytest.approx(paced.mean_weight)
    assert report.admitted_fraction == pytest.approx(paced.admitted_fraction)
    assert report.pace == pytest.approx(paced.pace)
    if kind == "hard" and granularity == "sample":
        assert 0 < report.admitted_fraction < 1  # the weights really select

    # The update is SGD on mean(v·ℓ) with v held constant (no gradient through the weights).
    expected.backward()
    for (name, parameter), (_, before) in zip(student.named_parameters(), reference.named_parameters()):
        assert torch.allclose(parameter.detach(), before.detach() - 0.1 * before.grad, atol=1e-6), name


# --------------------------------------------------------------------------------------------
# The learning rate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9])
def test_the_learning_rate_follows_the_cosine_of_progress(fraction):
    student = random_student(0)
    trainer = trainer_for(student, lr=0.2, lr_schedule="cosine")
    expected = 0.2 * 0.5 * (1 + math.cos(math.pi * fraction))
    assert trainer.learning_rate(Progress(fraction)) == pytest.approx(expected)
    images, teacher = batch(0)
    report = trainer.step(images, teacher, Progress(fraction))
    assert report.lr == pytest.approx(expected)
    assert all(group["lr"] == pytest.approx(expected) for group in trainer.optimizer.param_groups)


def test_a_constant_schedule_keeps_the_base_rate():
    trainer = trainer_for(random_student(0), lr=0.2, lr_schedule="constant")
    assert trainer.learning_rate(Progress(0.0)) == trainer.learning_rate(Progress(0.7)) == 0.2


def test_the_learning_rate_is_set_by_progress_not_by_step_count():
    trainer = trainer_for(random_student(0), lr=0.2, lr_schedule="cosine")
    images, teacher = batch(0)
    for _ in range(3):
        report = trainer.step(images, teacher, Progress(0.5))
        assert report.lr == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_the_optimizer_follows_the_config(optimizer, kind):
    built = build_student_optimizer(random_student(0), distill_config(optimizer=optimizer, weight_decay=1e-3))
    assert type(built) is kind
    assert built.param_groups[0]["weight_decay"] == 1e-3


# --------------------------------------------------------------------------------------------
# Rounds, dtypes and state
# --------------------------------------------------------------------------------------------


def test_train_round_takes_one_step_per_batch_and_averages_the_reports():
    images = torch.stack([batch(s)[0] for s in range(3)])
    targets = torch.stack([batch(s)[1] for s in range(3)])
    one_by_one, together = random_student(1), random_student(1)
    trainer = trainer_for(one_by_one)
    reports = [trainer.step(x, t, Progress(0.2)) for x, t in zip(images, targets)]
    summary = trainer_for(together).train_round(images, targets, Progress(0.2))
    assert summary["loss"] == pytest.approx(sum(r.loss for r in reports) / 3)
    assert summary["kd_loss"] == pytest.approx(sum(r.kd_loss for r in reports) / 3)
    for a, b in zip(one_by_one.parameters(), together.parameters()):
        assert torch.equal(a, b)


def test_float16_targets_are_accepted():
    images, teacher = batch(3)
    half = teacher.half()
    a, b = random_student(2), random_student(2)
    report_half = trainer_for(a).step(images, half, Progress(0.0))
    report_float = trainer_for(b).step(images, half.float(), Progress(0.0))
    assert same_report(report_half, report_float)


def same_report(a, b) -> bool:
    """Field-by-field equality in which NaN (the pace without curriculum) equals NaN."""
    left, right = dataclasses.asdict(a), dataclasses.asdict(b)
    return left.keys() == right.keys() and all(
        left[k] == right[k] or (math.isnan(left[k]) and math.isnan(right[k])) for k in left)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_state_round_trip_restores_optimizer_and_weighting(optimizer):
    # Batch granularity: the self-paced weighting keeps a history of batch losses (state).
    curriculum = CurriculumConfig(enabled=True, granularity="batch", pace="quantile", pace_start=0.5,
                                  pace_end=1.0, history=4)
    options = dict(curriculum=curriculum, optimizer=optimizer, lr=0.05, weight_decay=1e-3,
                   lr_schedule="cosine")
    original = random_student(0)
    trainer = trainer_for(original, **options)
    for seed in range(3):
        trainer.step(*batch(seed), Progress(seed / 10))
    saved = _roundtrip({"student": original.state_dict(), "trainer": trainer.state_dict()})
    assert saved["trainer"]["weighting"]["batch_loss_history"], "the weighting state is not empty"

    resumed = random_student(99)
    resumed_trainer = trainer_for(resumed, **options)
    resumed.load_state_dict(saved["student"])
    resumed_trainer.load_state_dict(saved["trainer"])
    # Without the trainer state the continuation differs: the round trip carries something.
    forgetful = random_student(99)
    forgetful.load_state_dict(saved["student"])
    forgetful_trainer = trainer_for(forgetful, **options)

    for seed in (3, 4):
        images, teacher = batch(seed)
        expected = trainer.step(images, teacher, Progress(seed / 10))
        assert resumed_trainer.step(images, teacher, Progress(seed / 10)) == expected
        forgetful_trainer.step(images, teacher, Progress(seed / 10))
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(original.parameters(), forgetful.parameters()))
    assert resumed_trainer.state_dict()["weighting"] == trainer.state_dict()["weighting"]


def test_state_round_trip_without_curriculum():
    student = random_student(0)
    trainer = trainer_for(student)
    trainer.step(*batch(0), Progress(0.0))
    state = _roundtrip(trainer.state_dict())
    assert state["weighting"] is None
    other_student = copy.deepcopy(student)
    other = trainer_for(other_student)
    other.load_state_dict(state)
    assert same_report(trainer.step(*batch(1), Progress(0.1)), other.step(*batch(1), Progress(0.1)))


# --------------------------------------------------------------------------------------------
# The averaged student (distill.student_ema)
# --------------------------------------------------------------------------------------------


def test_without_ema_the_evaluated_student_is_the_trained_one():
    student = random_student(0)
    trainer = trainer_for(student)
    assert trainer.ema is None and trainer.evaluated is student
    assert trainer.state_dict()["ema"] is None


def test_the_ema_follows_its_recursion_in_closed_form():
    decay = 0.75
    student = random_student(0)
    trainer = trainer_for(student, student_ema=decay)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for seed in range(3):
        trainer.step(*batch(seed), Progress(0.0))
        # θ_ema ← d·θ_ema + (1 − d)·θ after every step, from θ_ema = θ_0.
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in student.state_dict().items()}
    assert trainer.evaluated is trainer.ema and trainer.evaluated is not student
    for name, value in trainer.ema.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
        assert not torch.equal(value, student.state_dict()[name])  # the average lags the student
    assert not any(p.requires_grad for p in trainer.ema.parameters())


def test_the_ema_averages_batchnorm_statistics_and_copies_the_step_counter():
    decay = 0.5
    student = nn.Sequential(nn.BatchNorm1d(2))
    trainer = StudentTrainer.__new__(StudentTrainer)  # only update_ema is exercised
    trainer.student, trainer.distill = student, distill_config(student_ema=decay)
    trainer.ema = copy.deepcopy(student)
    student.train()
    student(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))  # running mean: 0.1·(2, 4); one batch tracked
    trainer.update_ema()
    ema = trainer.ema.state_dict()
    torch.testing.assert_close(ema["0.running_mean"], 0.5 * torch.tensor([0.2, 0.4]))
    assert int(ema["0.num_batches_tracked"]) == 1


def test_the_ema_survives_a_state_round_trip():
    student = random_student(0)
    trainer = trainer_for(student, student_ema=0.9)
    for seed in range(2):
        trainer.step(*batch(seed), Progress(0.0))
    saved = _roundtrip({"student": student.state_dict(), "trainer": trainer.state_dict()})
    resumed = random_student(7)
    resumed.load_state_dict(saved["student"])
    resumed_trainer = trainer_for(resumed, student_ema=0.9)
    resumed_trainer.load_state_dict(saved["trainer"])
    for seed in (2, 3):
        trainer.step(*batch(seed), Progress(0.0))
        resumed_trainer.step(*batch(seed), Progress(0.0))
    for a, b in zip(trainer.ema.state_dict().values(), resumed_trainer.ema.state_dict().values()):
        assert torch.equal(a, b)
    # A checkpoint with an average cannot resume a run without one, and the reverse.
    with pytest.raises(ValueError, match="student_ema"):
        trainer_for(random_student(0)).load_state_dict(saved["trainer"])
    with pytest.raises(ValueError, match="student_ema"):
        trainer_for(random_student(0), student_ema=0.9).load_state_dict(
            trainer_for(random_student(0)).state_dict())
