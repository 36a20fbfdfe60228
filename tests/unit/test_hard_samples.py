"""Hard samples (``distill.hard_samples``): pool samples pushed towards the student's mistakes
(:mod:`fed_dfkd.hard_samples`) and the coordinator's batches of them."""

from __future__ import annotations

import math

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator
from fed_dfkd.data import DatasetInfo
from fed_dfkd.hard_samples import perturb_towards_errors
from fed_dfkd.losses.kd import kd_kl_per_sample

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


class _Linear(torch.nn.Module):
    """Two logits: ``[w . x + b, 0]`` with every weight non-zero (so every pixel's gradient sign
    is fixed); ``start_logit`` sets b so that the first logit is that at x = 0.5."""

    def __init__(self, pixels: int, seed: int = 0, start_logit: float | None = None) -> None:
        super().__init__()
        w = torch.randn(pixels, generator=torch.Generator().manual_seed(seed))
        self.w = torch.nn.Parameter(w + w.sign() * 0.1)
        self.b = 0.0 if start_logit is None else start_logit - 0.5 * float(self.w.detach().sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = x.flatten(1) @ self.w + self.b
        return torch.stack([s0, torch.zeros_like(s0)], dim=1)


def student_divergence(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """What the perturbation ascends: the per-sample KL at T = 1."""
    return kd_kl_per_sample(student_logits, target_logits, temperature=1.0)


def test_divergence_is_the_kl_from_the_targets_softmax() -> None:
    same = torch.tensor([[2.0, -1.0, 0.5]])
    assert student_divergence(same, same).item() == pytest.approx(0.0, abs=1e-7)
    # Targets (0.5, 0.5); student (0.75, 0.25): 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4/3).
    kl = student_divergence(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_a_linear_student_is_pushed_to_the_corner_of_the_ball_against_its_weights() -> None:
    # Targets say class 0 surely, so the divergence grows as w . x falls: every pixel ends at
    # origin - radius * sign(w), whatever the random start (5 steps of 0.5 radius cross the ball).
    student = _Linear(16)
    images = torch.full((3, 1, 4, 4), 128, dtype=torch.uint8)
    targets = torch.tensor([[30.0, 0.0]]).expand(3, 2)
    out = perturb_towards_errors(student, images, targets, radius=10 / 255, steps=5,
                                 rng=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    expected = (128 - 10 * student.w.detach().sign()).to(torch.uint8).view(1, 1, 4, 4).expand(3, 1, 4, 4)
    assert torch.equal(out, expected)
    # The opposite target pushes the other way.
    out = perturb_towards_errors(student, images, torch.tensor([[0.0, 30.0]]).expand(3, 2),
                                 radius=10 / 255, steps=5, rng=torch.Generator().manual_seed(0))
    opposite = (128 + 10 * student.w.detach().sign()).to(torch.uint8).view(1, 1, 4, 4)
    assert torch.equal(out, opposite.expand(3, 1, 4, 4))


def test_the_target_temperature_scales_the_targets_it_ascends_against() -> None:
    # Student logits (w . x + b, 0) with w . x + b = 1 at the start, within 0.01 * sum|w| of it in
    # the ball. Targets (0.5, 0) ask for less of class 0 than the student gives: the ascent raises
    # w . x further. At target temperature 1/4 they are (2, 0), which asks for more: it lowers it.
    student = _Linear(4, start_logit=1.0)
    images = torch.full((1, 1, 2, 2), 0.5)
    up = (0.5 + 0.01 * student.w.detach().sign()).view(1, 1, 2, 2)
    down = (0.5 - 0.01 * student.w.detach().sign()).view(1, 1, 2, 2)
    targets = torch.tensor([[0.5, 0.0]])
    plain = perturb_towards_errors(student, images, targets, radius=0.01, steps=5,
                                   rng=torch.Generator().manual_seed(0))
    sharp = perturb_towards_errors(student, images, targets, radius=0.01, steps=5,
                                   rng=torch.Generator().manual_seed(0), target_temperature=0.25)
    torch.testing.assert_close(plain, up)
    torch.testing.assert_close(sharp, down)


def test_perturbation_stays_in_the_ball_and_in_range_and_raises_the_divergence() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 10))
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    images[:8] = 0  # at the range's edge
    targets = torch.randn(64, 10) * 3
    radius = 0.1
    out = perturb_towards_errors(student, images, targets, radius=radius, steps=7,
                                 rng=torch.Generator().manual_seed(3))
    moved = (out.float() - images.float()).abs() / 255
    assert moved.max() <= radius + 0.5 / 255 + 1e-6  # rounding to a level: half a level more
    assert moved.max() > radius / 2
    before = student_divergence(student(images.float() / 255), targets)
    after = student_divergence(student(out.float() / 255), targets)
    assert after.mean() > before.mean() and (after > before).float().mean() > 0.9
    # Floats in, floats out, in [0, 1].
    floats = perturb_towards_errors(student, images.float() / 255, targets, radius=radius, steps=7,
                                    rng=torch.Generator().manual_seed(3))
    assert floats.dtype == torch.float32 and floats.min() >= 0 and floats.max() <= 1
    assert torch.equal((floats * 255).round().to(torch.uint8), out)


def test_perturbation_is_seeded_leaves_the_student_as_it_was_and_radius_zero_is_identity() -> None:
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10), torch.nn.Dropout(0.5))
    student.train()
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    targets = torch.randn(5, 10)

    def run(seed: int, radius: float = 0.2) -> torch.Tensor:
        return perturb_towards_errors(student, images, targets, radius=radius, steps=1,
                                      rng=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))  # the random start differs
    assert torch.equal(run(1, radius=0.0), images)
    assert student.training
    assert all(p.grad is None for p in student.parameters())
    with pytest.raises(ValueError, match="steps >= 1"):
        perturb_towards_errors(student, images, targets, radius=0.1, steps=0,
                               rng=torch.Generator().manual_seed(0))


def test_coordinator_makes_whole_batches_of_perturbed_pool_samples_from_the_round_stream(pool_config) -> None:
    cfg = pool_config(hard_samples=16, hard_sample_radius=0.05, hard_sample_steps=2)
    c = Coordinator(cfg, INFO)
    assert c.hard_batches() is None  # nothing pooled yet: the first round has none
    samples = c.draw_samples()
    assert samples.shape[:2] == (2, 8) and samples.dtype == torch.uint8
    c.train_student(samples, torch.randn(2, 8, 10))
    assert len(c.replay) == 16
    c.end_round()
    hard = c.hard_batches()
    assert hard.shape == (2, 8, 1, 8, 8) and hard.dtype == torch.uint8
    pool = c.replay.samples()[0]
    # Every hard sample is a pool sample moved within the ball; all 16 pool samples are used once.
    distance = (hard.flatten(0, 1)[:, None].float() - pool[None].float()).abs().amax(dim=(2, 3, 4))
    nearest = distance.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(16))
    assert distance.min(dim=1).values.max() <= 0.05 * 255 + 0.5
    assert torch.equal(hard, c.hard_batches())  # the round's seeded streams
    c.end_round()
    assert not torch.equal(hard, c.hard_batches())
    # More asked for than pooled: drawn with replacement, still whole batches.
    c = Coordinator(pool_config(hard_samples=24), INFO)
    c.train_student(samples, torch.randn(2, 8, 10))
    assert c.hard_batches().shape == (3, 8, 1, 8, 8)
    assert Coordinator(pool_config(), INFO).cfg.distill.hard_samples == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"distill": {"batch_size": 8, "hard_samples": 12}}, "distill.hard_samples"),
     ({"distill": {"hard_samples": -8, "batch_size": 8}}, "distill.hard_samples"),
     ({"distill": {"hard_sample_radius": 1.5}}, "distill.hard_sample_radius"),
     ({"distill": {"hard_sample_steps": 0}}, "distill.hard_sample_steps"),
     ({"distill": {"batch_size": 8, "hard_samples": 8},
       "federation": {"sample_transport": "seed"}}, "distill.hard_samples")],
)
def test_config_rules(overrides, field) -> None:
    base = {"data": {"dataset": "digits"}, "models": {"teacher": "cnn_digits", "student": "cnn_digits"}}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({**base, **overrides})
