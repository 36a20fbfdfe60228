"""``method.boundary_fraction``: part of each round's assigned rows asks for a blend of two classes."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.samples import boundary_targets
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def _config(**method):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd", "generator_steps": 2, "generator_latents": "round", **method},
        "distill": {"batch_size": 16, "student_steps": 1, "pseudo_batches": 1, "optimizer": "sgd"},
        "federation": {"rounds": 2},
    })


def test_boundary_rows_blend_their_class_with_another_and_the_rest_stay_one_hot() -> None:
    labels = torch.arange(20) % 10
    targets = boundary_targets(labels, 10, fraction=0.25, mix=0.3, rng=torch.Generator().manual_seed(3))
    assert targets.shape == (20, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(20))
    for row in range(5):  # round(0.25 * 20) rows
        assert targets[row, labels[row]] == pytest.approx(0.7)
        partners = [c for c in range(10) if c != labels[row] and targets[row, c] > 0]
        assert len(partners) == 1 and targets[row, partners[0]] == pytest.approx(0.3)
    torch.testing.assert_close(targets[5:], torch.nn.functional.one_hot(labels[5:], 10).float())
    again = boundary_targets(labels, 10, fraction=0.25, mix=0.3, rng=torch.Generator().manual_seed(3))
    assert torch.equal(targets, again)  # seeded
    other = boundary_targets(labels, 10, fraction=0.25, mix=0.3, rng=torch.Generator().manual_seed(4))
    assert not torch.equal(targets, other)


def test_partners_cover_every_other_class_and_never_the_row_s_own() -> None:
    labels = torch.zeros(2000, dtype=torch.long)
    targets = boundary_targets(labels, 10, fraction=1.0, mix=0.5, rng=torch.Generator().manual_seed(0))
    assert torch.all(targets[:, 0] == 0.5)
    counts = (targets[:, 1:] > 0).sum(0)
    assert counts.sum() == 2000 and counts.min() > 150  # about 222 each


def test_fraction_zero_is_the_one_hot_term() -> None:
    labels = torch.tensor([3, 1, 4, 1, 5])
    targets = boundary_targets(labels, 6, fraction=0.0, mix=0.5, rng=torch.Generator().manual_seed(0))
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, targets),
                               torch.nn.functional.cross_entropy(logits, labels))


def _step(**method):
    cfg = _config(**method)
    torch.manual_seed(0)
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    teacher = NormalizedClassifier(net, INFO.mean, INFO.std).eval()
    generator = build_pseudo_generator(cfg, INFO)
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16, teacher_feature_dim=128,
                                    student_feature_dim=64, seed=0)
    asked = []
    objective = synthesizer.objective

    def recording(**kwargs):
        asked.append(kwargs["labels"])
        return objective(**kwargs)

    synthesizer.objective = recording
    latents = (torch.randn(16, cfg.models.generator.latent_dim, generator=torch.Generator().manual_seed(1)),
               torch.arange(16) % 10)
    report = synthesizer.step(teacher=teacher, student=build_student(cfg, INFO), generator=generator,
                              optimizer=build_generator_optimizer(generator, cfg.method),
                              progress=Progress(0.0, 0), rng=torch.Generator().manual_seed(5), latents=latents)
    return asked, latents[1], report


def test_the_generator_steps_ask_the_blends_drawn_once_from_the_step_stream() -> None:
    asked, labels, report = _step(boundary_fraction=0.5, boundary_mix=0.4)
    expected = boundary_targets(labels, 10, fraction=0.5, mix=0.4, rng=torch.Generator().manual_seed(5))
    assert len(asked) == 2
    for targets in asked:  # the same blends at every step of the round
        assert torch.equal(targets, expected)
    # The one-hot term is the cross-entropy against them: (0.6 + 0.4) of its mass off one-hot.
    assert report.terms["one_hot"] > 0
    plain, labels, _ = _step()
    assert all(torch.equal(targets, labels) for targets in plain)  # off: the assigned classes


def test_config_rejects_boundary_samples_it_cannot_serve() -> None:
    with pytest.raises(ConfigError, match="method.boundary_fraction"):
        _config(boundary_fraction=1.5)
    with pytest.raises(ConfigError, match="method.boundary_mix"):
        _config(boundary_fraction=0.5, boundary_mix=0.6)
    with pytest.raises(ConfigError, match="method.boundary_mix"):
        _config(boundary_fraction=0.5, boundary_mix=0.0)
    with pytest.raises(ConfigError, match="generator_latents: round"):
        _config(boundary_fraction=0.5, generator_latents="fresh")
    with pytest.raises(ConfigError, match="method.boundary_fraction"):
        _config(boundary_fraction=0.5, one_hot_prior_adjustment=1.0)
    assert _config(boundary_fraction=0.5).method.boundary_mix == 0.5
