"""Augmentations of pseudo-batches and teacher batches (fed_dfkd/augment.py)."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.augment import augment_batches, random_flip, random_shift
from fed_dfkd.config import config_from_dict
from fed_dfkd.coordinator import Coordinator
from fed_dfkd.data import DatasetInfo
from fed_dfkd.config import ConfigError


def test_random_shift_moves_each_image_by_at_most_two_pixels() -> None:
    images = torch.zeros(64, 2, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the centre; a shift of <= 2 keeps it inside
    shifted = random_shift(images, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.equal(shifted.sum(dim=(2, 3)), torch.ones(64, 2))  # nothing lost or duplicated
    flat = shifted[:, 0].reshape(64, -1).argmax(dim=1)
    rows, cols = flat // 9, flat % 9
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert torch.equal(shifted[:, 0], shifted[:, 1])  # channels move together
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # 25 offsets, 64 draws


def test_a_shift_is_a_translation_with_zero_fill() -> None:
    image = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5)
    shifted = random_shift(image, max_shift=1, generator=torch.Generator().manual_seed(3))
    # Whatever the offset (dr, dc) in {-1, 0, 1}^2, the result is the image moved by it.
    candidates = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            moved = torch.zeros(5, 5)
            for r in range(5):
                for c in range(5):
                    if 0 <= r + dr < 5 and 0 <= c + dc < 5:
                        moved[r, c] = image[0, 0, r + dr, c + dc]
            candidates.append(moved)
    assert any(torch.equal(shifted[0, 0], m) for m in candidates)


def test_a_zero_shift_is_the_identity() -> None:
    images = torch.rand(4, 1, 6, 6)
    assert random_shift(images, max_shift=0, generator=torch.Generator()) is images


def test_random_flip_mirrors_about_half_and_keeps_the_rest() -> None:
    images = torch.rand(200, 3, 4, 5)
    flipped = random_flip(images, generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)])
    kept = torch.tensor([torch.equal(f, i) for f, i in zip(flipped, images)])
    assert bool((mirrored ^ kept).all())  # each image is exactly one of the two
    assert 70 < int(mirrored.sum()) < 130


def test_augment_batches_is_seeded_keeps_shape_and_dtype() -> None:
    batches = torch.randint(0, 256, (3, 8, 1, 10, 10), dtype=torch.uint8)
    first = augment_batches(batches, shift=2, flip=True, generator=torch.Generator().manual_seed(7))
    again = augment_batches(batches, shift=2, flip=True, generator=torch.Generator().manual_seed(7))
    other = augment_batches(batches, shift=2, flip=True, generator=torch.Generator().manual_seed(8))
    assert first.shape == batches.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_flip_only_permutes_pixels_within_rows() -> None:
    batches = torch.rand(2, 16, 1, 4, 4)
    out = augment_batches(batches, shift=0, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sort(dim=-1).values, batches.sort(dim=-1).values)


def _coordinator(**distill) -> Coordinator:
    raw = {
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd"},
        "distill": {"batch_size": 8, "student_steps": 2, "optimizer": "sgd", **distill},
        "federation": {"rounds": 4},
    }
    info = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))
    return Coordinator(config_from_dict(raw), info)


def test_the_student_trains_on_the_augmented_batches_with_the_same_targets(student_batches) -> None:
    samples = torch.randint(0, 256, (2, 8, 1, 8, 8), dtype=torch.uint8)
    targets = torch.randn(2, 8, 10)
    images, labels = student_batches(_coordinator(augment_shift=2, augment_flip=True), samples, targets)
    assert torch.equal(labels, targets)  # targets are the unaugmented samples' own
    assert not torch.equal(images, samples.float() / 255)  # but the images moved
    # Each image is a shifted (zero-filled) or mirrored copy: its pixels come from its sample.
    for image, sample in zip(images.flatten(0, 1), (samples.float() / 255).flatten(0, 1)):
        assert set(image.unique().tolist()) <= set(sample.unique().tolist()) | {0.0}


def test_without_augmentation_the_student_sees_the_samples_unchanged(student_batches) -> None:
    samples = torch.randint(0, 256, (2, 8, 1, 8, 8), dtype=torch.uint8)
    targets = torch.randn(2, 8, 10)
    images, labels = student_batches(_coordinator(), samples, targets)
    assert torch.equal(images, samples.float() / 255) and torch.equal(labels, targets)


def test_a_negative_shift_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="distill.augment_shift"):
        config_from_dict({"distill": {"augment_shift": -1}})
