"""What a teacher's class histogram steers in G's objective: ``method.class_balance_prior`` (the
class mix the class-balance term asks for) and ``method.one_hot_prior_adjustment`` (the one-hot
term under a uniform prior; the loss itself in test_prior_adjusted_one_hot.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fed_dfkd.centralized import CentralDistillation
from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.data.teachers import TeacherManifest
from fed_dfkd.federated import FederatedServer
from fed_dfkd.losses import class_balance_loss, prior_adjusted_cross_entropy
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.protocol import RefusalData
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer, teacher_class_prior
from fed_dfkd.teacher_host import TeacherHost

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))
SKEWED = [90, 10, 0, 0, 0, 0, 0, 0, 0, 0]


def _config(prior: str = "teacher", federation: dict | None = None, privacy: dict | None = None,
            **method):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "cudfkd", "class_balance_prior": prior, "generator_steps": 2,
                   "adversarial_weight": 0.0, **method},
        "distill": {"batch_size": 16, "student_steps": 1, "optimizer": "sgd"},
        "federation": {"rounds": 2, **(federation or {})},
        **({"privacy": privacy} if privacy else {}),
    })


def _teacher(seed: int = 0) -> NormalizedClassifier:
    torch.manual_seed(seed)
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    return NormalizedClassifier(net, INFO.mean, INFO.std).eval()


def test_the_prior_is_the_summed_histogram_plus_one_and_none_when_uniform() -> None:
    method = _config().method
    prior = teacher_class_prior([SKEWED, [0, 0, 5, 0, 0, 0, 0, 0, 0, 5]], method)
    assert prior.tolist() == [91, 11, 6, 1, 1, 1, 1, 1, 1, 6]
    assert teacher_class_prior([SKEWED], _config("uniform").method) is None
    with pytest.raises(ValueError, match="histogram"):
        teacher_class_prior([[]], method)
    with pytest.raises(ValueError, match="histogram"):
        teacher_class_prior([[1, -1]], method)


def _step(class_prior: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    cfg = _config()
    generator = build_pseudo_generator(cfg, INFO)
    student = build_student(cfg, INFO)
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16, teacher_feature_dim=128,
                                    student_feature_dim=64, seed=0)
    report = synthesizer.step(
        teacher=_teacher(), student=student, generator=generator,
        optimizer=build_generator_optimizer(generator, cfg.method), progress=Progress(0.0, 0),
        rng=torch.Generator().manual_seed(3), class_prior=class_prior,
    )
    return generator.state_dict(), report.terms


def test_a_uniform_prior_steps_like_no_prior_and_a_skewed_one_does_not() -> None:
    plain, plain_terms = _step(None)
    uniform, uniform_terms = _step(torch.full((10,), 7.0))
    skewed, skewed_terms = _step(torch.tensor(SKEWED, dtype=torch.float32) + 1)
    for name, tensor in plain.items():
        torch.testing.assert_close(uniform[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # The reported term is KL(p̄ ‖ π): −H(p̄) + log C under the uniform prior.
    expected = plain_terms["class_balance"] + math.log(10)
    assert uniform_terms["class_balance"] == pytest.approx(expected, abs=1e-4)
    weights = [k for k, v in plain.items() if v.is_floating_point() and v.dim() > 1]
    assert any(not torch.allclose(skewed[k], plain[k]) for k in weights)
    assert skewed_terms["class_balance"] > uniform_terms["class_balance"]


def test_the_objective_s_term_is_the_loss_with_that_prior() -> None:
    cfg = _config()
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16, teacher_feature_dim=128,
                                    student_feature_dim=64, seed=0)
    teacher = _teacher()
    images = torch.rand(16, 1, 8, 8)
    prior = torch.tensor(SKEWED, dtype=torch.float32) + 1
    weights = synthesizer.term_weights(Progress(0.0, 0))
    _, terms, _ = synthesizer.objective(teacher=teacher, student=build_student(cfg, INFO), images=images,
                                        progress=Progress(0.0, 0), weights=weights, class_prior=prior)
    expected = class_balance_loss(teacher(images), temperature=float(cfg.method.class_balance_temperature),
                                  prior=prior)
    torch.testing.assert_close(terms["class_balance"], expected)


def _manifest(histogram: list[int]) -> TeacherManifest:
    return TeacherManifest(
        architecture="cnn_digits_bn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.25],
        class_names=list(INFO.class_names), dataset="digits", partition_id=0, num_clients=2,
        train_size=sum(histogram), class_histogram=histogram, test_accuracy=0.5, config_hash="x",
        created_at="now", wall_seconds=0.0,
    )


def _recorded_step(synthesizer, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every call's keyword arguments to ``synthesizer.step``, which still runs."""
    calls: list[dict] = []
    original = synthesizer.step
    monkeypatch.setattr(synthesizer, "step", lambda **kwargs: calls.append(kwargs) or original(**kwargs))
    return calls


def _owner_step(cfg, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The keyword arguments of the one generator step an owner with SKEWED data takes."""
    host = TeacherHost(cfg, _teacher(), _manifest(SKEWED), INFO)
    calls = _recorded_step(host.synthesizer, monkeypatch)
    instruction, _ = FederatedServer(cfg, INFO).plan_round()
    assert not isinstance(host.serve(instruction), RefusalData)
    assert len(calls) == 1
    return calls[0]


OTHER = [0, 0, 5, 0, 0, 0, 0, 0, 0, 5]


def _central_step(cfg, monkeypatch: pytest.MonkeyPatch) -> tuple[CentralDistillation, dict]:
    """A central loop over two teachers (SKEWED and OTHER data) and its one round's step arguments."""
    central = CentralDistillation(cfg, [_teacher(0), _teacher(1)], INFO,
                                  teacher_weights=[[float(c) for c in SKEWED], [float(c) for c in OTHER]])
    calls = _recorded_step(central.synthesizer, monkeypatch)
    central.run_round()
    assert len(calls) == 1
    return central, calls[0]


def test_an_owner_steps_with_its_own_histogram_and_the_centre_with_the_summed_ones(monkeypatch) -> None:
    assert _owner_step(_config("teacher"), monkeypatch)["class_prior"].tolist() == [91, 11, 1, 1, 1, 1, 1, 1, 1, 1]
    assert _owner_step(_config("uniform"), monkeypatch)["class_prior"] is None
    central, step = _central_step(_config(), monkeypatch)
    assert central.class_prior.tolist() == [91, 11, 6, 1, 1, 1, 1, 1, 1, 6]
    assert step["class_prior"].tolist() == [91, 11, 6, 1, 1, 1, 1, 1, 1, 6]
    with pytest.raises(ValueError, match="histograms"):
        CentralDistillation(_config(), [_teacher()], INFO)


@pytest.mark.parametrize("federation, privacy, message", [
    ({"mode": "logits_only"}, None, "generator_and_logits"),
    (None, {"level": "record", "target_epsilon": 1.0, "summary": False}, "privacy.summary: true"),
])
def test_the_teacher_prior_is_refused_where_no_owner_histogram_steers_g(federation, privacy, message) -> None:
    with pytest.raises(ConfigError, match="method.class_balance_prior") as error:
        _config(federation=federation, privacy=privacy)
    assert message in str(error.value)
    with pytest.raises(ConfigError, match="method.class_balance_prior"):
        _config("balanced")


def test_the_objective_s_one_hot_term_is_the_adjusted_loss() -> None:
    cfg = _config("uniform", one_hot_prior_adjustment=0.5)
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16, teacher_feature_dim=128,
                                    student_feature_dim=64, seed=0)
    teacher = _teacher()
    images = torch.rand(16, 1, 8, 8)
    counts = torch.tensor(SKEWED, dtype=torch.float32)
    weights = synthesizer.term_weights(Progress(0.0, 0))
    kwargs = dict(teacher=teacher, student=build_student(cfg, INFO), images=images,
                  progress=Progress(0.0, 0), weights=weights)
    _, terms, _ = synthesizer.objective(**kwargs, class_counts=counts)
    expected = prior_adjusted_cross_entropy(teacher(images), None, class_counts=counts, strength=0.5)
    torch.testing.assert_close(terms["one_hot"], expected)
    with pytest.raises(ValueError, match="class counts"):
        synthesizer.objective(**kwargs)


def test_an_owner_adjusts_by_its_own_histogram_and_the_centre_by_the_summed_ones(monkeypatch) -> None:
    cfg = _config("uniform", one_hot_prior_adjustment=1.0)
    assert _owner_step(cfg, monkeypatch)["class_counts"].tolist() == SKEWED
    _, step = _central_step(cfg, monkeypatch)
    assert step["class_counts"].tolist() == [90, 10, 5, 0, 0, 0, 0, 0, 0, 5]
    with pytest.raises(ValueError, match="histograms"):
        CentralDistillation(cfg, [_teacher()], INFO)
    # Off: no counts are needed and none are passed.
    assert CentralDistillation(_config("uniform"), [_teacher()], INFO).class_counts is None


@pytest.mark.parametrize("adjustment, federation, privacy, message", [
    (-1.0, None, None, ">= 0"),
    (float("inf"), None, None, "finite"),
    (1.0, {"mode": "logits_only"}, None, "generator_and_logits"),
    (1.0, None, {"level": "record", "target_epsilon": 1.0, "summary": False}, "privacy.summary: true"),
])
def test_the_adjustment_is_refused_where_it_cannot_act(adjustment, federation, privacy, message) -> None:
    with pytest.raises(ConfigError, match="method.one_hot_prior_adjustment") as error:
        _config("uniform", federation=federation, privacy=privacy, one_hot_prior_adjustment=adjustment)
    assert message in str(error.value)
