"""Adversarial teacher training: the L2 PGD attack, the clean BatchNorm recalibration, and
``models.pretrain.adversarial_epsilon`` in the trainer, the config and the teacher hash."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fed_dfkd.adversarial import pgd_l2, recalibrate_batchnorm
from fed_dfkd.config import ConfigError, PretrainConfig, load_config
from fed_dfkd.data.datasets import load_dataset
from fed_dfkd.data.teachers import teacher_config_hash, train_classifier
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier


class _Linear2(nn.Module):
    """logits = [0, w·x]: the worst L2 perturbation of radius ε is ∓ε w/‖w‖ (closed form)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w.flatten()
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_pgd_l2_reaches_the_closed_form_worst_case_of_a_linear_model() -> None:
    w = torch.tensor([[[3.0, -4.0], [0.0, 0.0]]])  # one channel, 2 x 2; ‖w‖ = 5
    model = _Linear2(w)
    images = torch.full((2, 1, 2, 2), 0.5)
    labels = torch.tensor([0, 1])
    eps = 0.1
    attacked = pgd_l2(model, images, labels, epsilon=eps, steps=3)
    direction = w / 5.0
    # Class 0 loses when w·x grows, class 1 when it shrinks: ±ε along w, on the ball's surface.
    torch.testing.assert_close(attacked[0] - images[0], eps * direction)
    torch.testing.assert_close(attacked[1] - images[1], -eps * direction)
    assert model.w.grad is None  # the model's parameters are untouched


def test_pgd_l2_stays_in_the_ball_and_the_pixel_range_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    images = torch.rand(32, 1, 4, 4)
    labels = torch.randint(0, 3, (32,))
    bn = model[2]
    before = bn.running_mean.clone()
    attacked = pgd_l2(model, images, labels, epsilon=0.3, steps=5)
    assert model.training  # mode restored
    torch.testing.assert_close(bn.running_mean, before)  # eval-mode attack: statistics unchanged
    norms = (attacked - images).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.3 + 1e-5
    assert float(attacked.min()) >= 0.0 and float(attacked.max()) <= 1.0
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(images), labels)
        worse = F.cross_entropy(model(attacked), labels)
    assert float(worse) > float(clean)
    assert torch.equal(pgd_l2(model, images, labels, epsilon=0.0, steps=5), images)
    with pytest.raises(ValueError):
        pgd_l2(model, images, labels, epsilon=-1.0, steps=1)


def test_recalibrated_statistics_are_the_exact_averages_of_the_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(7.0)
    model.eval()
    batches = [torch.randn(10, 3) * s + s for s in (1.0, 2.0, 3.0)]
    assert recalibrate_batchnorm(model, batches) == 1
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert bn.momentum == 0.1 and not model.training
    assert recalibrate_batchnorm(nn.Linear(3, 3), batches) == 0


def _digits_teacher() -> tuple[NormalizedClassifier, torch.Tensor, torch.Tensor]:
    splits = load_dataset("digits", seed=0, train_subset=256)
    info = splits.info
    torch.manual_seed(0)
    net = build_classifier("cnn_digits_bn", num_classes=info.num_classes,
                           in_channels=info.in_channels, image_size=info.image_size)
    return NormalizedClassifier(net, info.mean, info.std), splits.train_images, splits.train_labels


def test_adversarial_training_keeps_the_clean_statistics_and_differs_from_plain() -> None:
    config = PretrainConfig(epochs=2, batch_size=64, lr=2e-3)
    plain, images, labels = _digits_teacher()
    train_classifier(plain, images, labels, config=config, seed=0, device="cpu")
    robust, _, _ = _digits_teacher()
    history = train_classifier(robust, images, labels, seed=0, device="cpu",
                               config=replace(config, adversarial_epsilon=0.5, adversarial_steps=2))
    assert len(history) == 2
    # Same seed, same batches: only the attack separates the two runs.
    assert any(not torch.equal(a, b) for a, b in zip(robust.parameters(), plain.parameters()))
    # The running statistics are those of the clean images: recalibrating again changes nothing.
    layers = [m for m in robust.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    assert layers
    stored = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    recalibrate_batchnorm(robust, (images[i:i + 64] for i in range(0, images.shape[0], 64)))
    for (mean, var), layer in zip(stored, layers):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def test_hash_and_config_rules(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {dataset: digits}\n")
    base = load_config(path)
    robust = load_config(path, ["models.pretrain.adversarial_epsilon=0.5"])
    assert teacher_config_hash(robust) != teacher_config_hash(base)
    # Steps matter only when the attack is on: the hash of a plain teacher never moves.
    assert teacher_config_hash(load_config(path, ["models.pretrain.adversarial_steps=7"])) == \
        teacher_config_hash(base)
    assert teacher_config_hash(load_config(path, ["models.pretrain.adversarial_epsilon=0.5",
                                                  "models.pretrain.adversarial_steps=7"])) != \
        teacher_config_hash(robust)
    with pytest.raises(ConfigError, match="models.pretrain.adversarial_epsilon"):
        load_config(path, ["models.pretrain.adversarial_epsilon=-0.1"])
    with pytest.raises(ConfigError, match="models.pretrain.adversarial_steps"):
        load_config(path, ["models.pretrain.adversarial_steps=0"])
    with pytest.raises(ConfigError, match="models.pretrain.adversarial_epsilon"):
        load_config(path, ["models.pretrain.adversarial_epsilon=0.5", "privacy.level=record",
                           "privacy.noise_multiplier=1.0"])
