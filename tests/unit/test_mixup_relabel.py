"""MixUp of the student's batches (``distill.mixup``) and the teachers' labels on the augmented
images (``distill.relabel_augmented``, "function matching")."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.augment import mixup_batches
from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator, fit_fresh_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.errors import UserError
from fed_dfkd.federated import FederatedServer

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def _unit_images(steps: int, batch: int) -> torch.Tensor:
    """Image i of every batch is the unit vector at pixel i (so a blend shows its two parts)."""
    return torch.eye(64)[:batch].view(1, batch, 1, 8, 8).expand(steps, batch, 1, 8, 8).clone()


def test_each_image_and_its_target_are_blended_with_one_partner_by_the_same_weight() -> None:
    steps, batch = 3, 16
    images, targets = _unit_images(steps, batch), torch.randn(steps, batch, 5)
    mixed, mixed_targets = mixup_batches(images, targets, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and mixed_targets.shape == targets.shape
    for s in range(steps):
        partners = []
        for i in range(batch):
            pixels = mixed[s, i].flatten()
            assert float(pixels.sum()) == pytest.approx(1.0, abs=1e-6)  # λ + (1 − λ)
            lam = float(pixels[i])
            others = [j for j in range(batch) if j != i and float(pixels[j]) > 0]
            if not others:  # its own partner (or λ = 1): unchanged
                assert torch.equal(mixed_targets[s, i], targets[s, i]) or lam == pytest.approx(1.0)
                partners.append(i)
                continue
            (j,) = others
            partners.append(j)
            torch.testing.assert_close(mixed_targets[s, i], lam * targets[s, i] + (1 - lam) * targets[s, j])
        # The partners form a permutation of the batch.
        assert sorted(partners) == list(range(batch))


def test_the_weights_follow_the_beta_distribution() -> None:
    # Var Beta(α, α) = 1 / (4 (2α + 1)); mean 1/2. Read λ off unit images (pixel i of image i),
    # where the partner is another image.
    batch = 64
    for alpha in (0.2, 1.0, 5.0):
        mixed, _ = mixup_batches(_unit_images(40, batch), torch.zeros(40, batch, 2), alpha=alpha,
                                 generator=torch.Generator().manual_seed(1))
        flat = mixed.flatten(2)
        lam = flat[:, torch.arange(batch), torch.arange(batch)]
        lam = lam[(flat > 0).sum(dim=2) == 2]  # not those that drew themselves as partner
        assert len(lam) > 0.95 * 40 * batch
        assert float(lam.mean()) == pytest.approx(0.5, abs=0.02)
        assert float(lam.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_mixup_is_seeded() -> None:
    images, targets = torch.rand(2, 8, 1, 4, 4), torch.randn(2, 8, 3)
    first = mixup_batches(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(3))
    again = mixup_batches(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(3))
    other = mixup_batches(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


class _Affine:
    """A teacher whose logits are affine in the pixels: blending the targets of two images is
    exactly its answer on their blend, so the stored-target MixUp and the relabelled one agree."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(5)
        self.weight, self.bias = torch.randn(64, 10, generator=generator), torch.randn(10, generator=generator)
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1) @ self.weight + self.bias


def _config(**distill):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd"},
        "distill": {"batch_size": 8, "student_steps": 2, "optimizer": "sgd", **distill},
        "federation": {"rounds": 4},
    })


def _seen(student_batches, coordinator: Coordinator, relabel=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(samples as floats, the images the trainer receives, their targets) for one round whose
    stored targets are the affine teacher's on the samples."""
    samples = torch.randint(0, 256, (2, 8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    floats = samples.float() / 255
    images, labels = student_batches(coordinator, samples, _Affine()(floats.flatten(0, 1)).view(2, 8, 10),
                                     relabel=relabel)
    return floats, images, labels


def test_mixup_trains_on_blends_against_blended_targets(student_batches) -> None:
    teacher = _Affine()
    floats, images, labels = _seen(student_batches, Coordinator(_config(mixup=1.0), INFO))
    assert not torch.equal(images, floats)
    torch.testing.assert_close(labels, teacher(images.flatten(0, 1)).view(2, 8, 10), rtol=1e-4, atol=1e-4)


def test_relabelling_asks_the_teachers_about_exactly_the_images_the_student_sees(student_batches) -> None:
    teacher = _Affine()
    # MixUp: for an affine teacher the answer on the blend equals the blended targets.
    _, images, labels = _seen(student_batches, Coordinator(_config(mixup=1.0, relabel_augmented=True), INFO),
                              relabel=teacher)
    assert teacher.calls == 1
    torch.testing.assert_close(labels, teacher(images.flatten(0, 1)).view(2, 8, 10))
    # A shift changes an affine teacher's answer: the stored targets no longer fit, the new ones do.
    floats, shifted, relabelled = _seen(
        student_batches, Coordinator(_config(augment_shift=2, relabel_augmented=True), INFO), relabel=teacher)
    assert not torch.equal(shifted, floats)
    torch.testing.assert_close(relabelled, teacher(shifted.flatten(0, 1)).view(2, 8, 10))
    stored = teacher(floats.flatten(0, 1)).view(2, 8, 10)
    assert not torch.allclose(relabelled, stored)


def test_relabelling_without_the_teachers_is_an_error(student_batches) -> None:
    with pytest.raises(ValueError, match="relabel_augmented needs the teachers"):
        _seen(student_batches, Coordinator(_config(mixup=1.0, relabel_augmented=True), INFO))


def test_the_final_fit_mixes_and_relabels_its_batches_too() -> None:
    cfg = _config(mixup=0.5, relabel_augmented=True)
    teacher = _Affine()
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    targets = torch.zeros(32, 10)  # wrong on purpose: the fit must not train on them
    seen = []

    def record(trainer, i, n):
        seen.append(i)

    trainer, _ = fit_fresh_student(cfg, INFO, images, targets, steps=4, relabel=teacher, after_chunk=record)
    assert teacher.calls == 2 and seen == [0, 1]  # once per chunk of student_steps
    with pytest.raises(ValueError, match="relabel_augmented needs the teachers"):
        fit_fresh_student(cfg, INFO, images, targets, steps=4)


@pytest.mark.parametrize("distill, key", [
    ({"mixup": -0.1}, "distill.mixup"),
    ({"mixup": float("nan")}, "distill.mixup"),
    ({"relabel_augmented": True}, "distill.relabel_augmented"),
])
def test_bad_settings_are_config_errors(distill, key) -> None:
    with pytest.raises(ConfigError, match=key):
        _config(**distill)


def test_a_federation_refuses_to_relabel() -> None:
    with pytest.raises(UserError, match="relabel_augmented needs the teachers in the server's process"):
        FederatedServer(_config(mixup=1.0, relabel_augmented=True), INFO)
