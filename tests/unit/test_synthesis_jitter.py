"""``method.synthesis_jitter``: G's batch shifted before the teacher and the student see it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_dfkd.augment import random_shift
from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def _config(jitter: int, **federation):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd", "generator_steps": 3, "synthesis_jitter": jitter},
        "distill": {"batch_size": 16, "student_steps": 1, "optimizer": "sgd"},
        "federation": {"rounds": 2, **federation},
    })


class Recording(nn.Module):
    """The teacher, recording every batch it is given."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.seen = teacher, []

    def forward(self, images, return_features: bool = False):
        self.seen.append(images.detach().clone())
        return self.teacher(images, return_features=return_features)


def _run(jitter: int):
    cfg = _config(jitter)
    torch.manual_seed(0)
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    teacher = Recording(NormalizedClassifier(net, INFO.mean, INFO.std).eval())
    generator = build_pseudo_generator(cfg, INFO)
    start = {k: v.clone() for k, v in generator.state_dict().items()}
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16, teacher_feature_dim=128,
                                    student_feature_dim=64, seed=0)
    latents = (torch.randn(16, cfg.models.generator.latent_dim, generator=torch.Generator().manual_seed(1)),
               torch.arange(16) % 10)
    synthesizer.step(teacher=teacher, student=build_student(cfg, INFO), generator=generator,
                     optimizer=build_generator_optimizer(generator, cfg.method), progress=Progress(0.0, 0),
                     rng=torch.Generator().manual_seed(5), latents=latents)
    return teacher.seen, start, generator, latents


def test_the_teacher_sees_g_batch_shifted_by_the_seeded_offsets() -> None:
    seen, start, generator, latents = _run(jitter=2)
    assert len(seen) == 3
    # Step 1: G at its initialisation; the teacher's batch is random_shift of G(Z) with the
    # first draw of the step's stream.
    generator.load_state_dict(start)
    generator.train()
    with torch.no_grad():
        images = generator(latents[0])
    expected = random_shift(images, max_shift=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], images)  # some image did move


def test_no_jitter_shows_the_teacher_g_batch_itself() -> None:
    seen, start, generator, latents = _run(jitter=0)
    generator.load_state_dict(start)
    generator.train()
    with torch.no_grad():
        images = generator(latents[0])
    torch.testing.assert_close(seen[0], images)


def test_config_rejects_a_negative_or_whole_image_jitter_and_jitter_in_logits_only() -> None:
    with pytest.raises(ConfigError, match="method.synthesis_jitter"):
        _config(-1)
    with pytest.raises(ConfigError, match=r"image size \(8 for digits"):
        _config(8)  # digits are 8x8
    assert _config(7).method.synthesis_jitter == 7
    with pytest.raises(ConfigError, match="method.synthesis_jitter"):
        _config(2, mode="logits_only")
    assert _config(2).method.synthesis_jitter == 2
