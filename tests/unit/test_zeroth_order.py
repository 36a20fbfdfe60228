"""Zeroth-order generator training for black-box teachers (fed_dfkd.zeroth_order)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fed_dfkd.config import config_from_dict
from fed_dfkd.coordinator import build_student
from fed_dfkd.data import dataset_info
from fed_dfkd.losses import class_balance_loss, one_hot_loss
from fed_dfkd.models import build_generator
from fed_dfkd.samples import as_float_images, dequantize_images, quantize_images
from fed_dfkd.synthesis import Progress
from fed_dfkd.zeroth_order import (
    ZerothOrderGeneratorTrainer,
    forward_difference_gradient,
    perturb,
    replace_one_values,
    sample_directions,
)


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def linear_estimate(slopes: torch.Tensor, *, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """The estimate for f(x) = <a, x> at x = 0 with steps radius·u (``slopes`` a: [B, d])."""
    steps = radius * directions
    values = torch.einsum("bd,bmd->bm", slopes, steps)
    return forward_difference_gradient(torch.zeros(len(slopes)), values, steps)


# --------------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orthogonal", [True, False])
def test_directions_have_the_asked_shape_and_unit_norm(orthogonal):
    directions = sample_directions(5, 3, (2, 4, 4), rng=rng(0), orthogonal=orthogonal)
    assert directions.shape == (5, 3, 2, 4, 4)
    torch.testing.assert_close(directions.flatten(2).norm(dim=2), torch.ones(5, 3))


def test_orthogonal_directions_form_frames_and_a_new_frame_past_d():
    d = 6
    directions = sample_directions(4, 2 * d + 2, (d,), rng=rng(1))
    for block in (directions[:, :d], directions[:, d : 2 * d]):
        gram = block @ block.transpose(1, 2)
        torch.testing.assert_close(gram, torch.eye(d).expand(4, d, d), atol=1e-5, rtol=0)
    # Two frames are independent draws, not the same frame twice.
    assert not torch.allclose(directions[:, :d], directions[:, d : 2 * d])


def test_directions_are_seeded():
    a = sample_directions(3, 4, (1, 8, 8), rng=rng(7))
    assert torch.equal(a, sample_directions(3, 4, (1, 8, 8), rng=rng(7)))
    assert not torch.equal(a, sample_directions(3, 4, (1, 8, 8), rng=rng(8)))


def test_orthogonal_directions_are_uniform_on_the_sphere_on_average():
    # E[u uᵀ] = I/d is what makes d·(∇f·u)u unbiased; the sign fix of QR matters for it.
    d = 4
    directions = sample_directions(20000, 1, (d,), rng=rng(3))[:, 0]
    second_moment = torch.einsum("bi,bj->ij", directions, directions) / len(directions)
    torch.testing.assert_close(second_moment, torch.eye(d) / d, atol=0.01, rtol=0)
    assert directions.mean(0).abs().max() < 0.02


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


def test_one_orthonormal_frame_recovers_a_linear_gradient_exactly():
    d, batch = 16, 8
    slopes = torch.randn(batch, d, generator=rng(0))
    directions = sample_directions(batch, d, (d,), rng=rng(1))
    estimate = linear_estimate(slopes, directions=directions, radius=0.3)
    torch.testing.assert_close(estimate, slopes, atol=1e-5, rtol=1e-5)


def test_independent_directions_converge_as_m_grows():
    # m steps see the projection of ∇f on their span: E cos ≈ √(m/d), exact at m = d.
    d, batch = 16, 256
    slopes = torch.randn(batch, d, generator=rng(0))
    means = []
    for m in (d // 4, d // 2, d):
        directions = sample_directions(batch, m, (d,), rng=rng(m), orthogonal=False)
        means.append(float(cosine(linear_estimate(slopes, directions=directions, radius=0.1), slopes).mean()))
    assert means[0] < means[1] < means[2]
    assert means[0] == pytest.approx(0.5, abs=0.07) and means[1] == pytest.approx(0.71, abs=0.07)
    assert means[2] > 0.9999


def test_fewer_directions_than_d_estimate_the_projection_scaled_by_d_over_m():
    d, m = 8, 3
    slopes = torch.randn(1, d, generator=rng(4))
    directions = sample_directions(1, m, (d,), rng=rng(5))
    projection = (directions[0].T @ directions[0]) @ slopes[0]
    estimate = linear_estimate(slopes, directions=directions, radius=0.2)
    torch.testing.assert_close(estimate[0], d / m * projection, atol=1e-5, rtol=1e-5)


def test_quadratic_gradient_is_recovered_up_to_a_first_order_bias_in_the_radius():
    # f(x) = ½ xᵀAx + bᵀx at x0: the forward difference along h is ∇f·h/|h| + ½|h|·ûᵀAû,
    # so with one orthonormal frame the error is ½|h|·Σ_j (u_jᵀAu_j)·u_j, at most ½|h|·‖A‖·√d.
    d, batch = 12, 4
    generator = rng(5)
    matrix = torch.randn(d, d, generator=generator, dtype=torch.float64)
    matrix = matrix @ matrix.T / d
    linear = torch.randn(d, generator=generator, dtype=torch.float64)
    x0 = torch.randn(batch, d, generator=generator, dtype=torch.float64)

    def f(x):
        return 0.5 * torch.einsum("...i,ij,...j->...", x, matrix, x) + x @ linear

    truth = x0 @ matrix + linear
    directions = sample_directions(batch, d, (d,), rng=rng(6)).double()
    errors = []
    for radius in (1e-2, 5e-3):
        steps = radius * directions
        estimate = forward_difference_gradient(f(x0), f(x0.unsqueeze(1) + steps), steps)
        error = float((estimate - truth).norm(dim=1).max())
        assert error <= 0.5 * radius * float(torch.linalg.matrix_norm(matrix, ord=2)) * math.sqrt(d) + 1e-9
        errors.append(error)
    assert errors[1] == pytest.approx(errors[0] / 2, rel=1e-3)  # first order in the radius


def test_a_zero_step_is_left_out_of_the_sum_and_of_m():
    d = 4
    slopes = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    frame = torch.eye(d).unsqueeze(0)
    steps = torch.cat([0.1 * frame, torch.zeros(1, 2, d)], dim=1)  # two directions erased
    values = torch.einsum("bd,bmd->bm", slopes, steps)
    estimate = forward_difference_gradient(torch.zeros(1), values, steps)
    torch.testing.assert_close(estimate, slopes)  # d/m with m = 4 used directions, not 6
    nothing = forward_difference_gradient(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2, d))
    assert torch.equal(nothing, torch.zeros(1, d))


def test_estimator_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="first two"):
        forward_difference_gradient(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 4, 5))


# --------------------------------------------------------------------------------------------
# Perturbations and quantisation
# --------------------------------------------------------------------------------------------


def test_float_perturbations_have_the_rms_change_per_pixel_asked():
    images = torch.full((3, 1, 8, 8), 0.5)
    directions = sample_directions(3, 5, (1, 8, 8), rng=rng(0))
    perturbed, steps = perturb(images, directions, smoothing=0.02)
    assert perturbed.shape == steps.shape == (3, 5, 1, 8, 8) and perturbed.dtype == torch.float32
    rms = steps.flatten(2).pow(2).mean(dim=2).sqrt()
    torch.testing.assert_close(rms, torch.full((3, 5), 0.02))
    torch.testing.assert_close(steps, 0.02 * 8 * directions)


def test_uint8_perturbations_are_quantised_and_steps_are_the_actual_displacements():
    images = quantize_images(torch.rand(4, 1, 8, 8, generator=rng(0)))
    directions = sample_directions(4, 3, (1, 8, 8), rng=rng(1))
    perturbed, steps = perturb(images, directions, smoothing=0.05)
    assert perturbed.dtype == torch.uint8 and perturbed.shape == (4, 3, 1, 8, 8)
    assert torch.equal(steps, dequantize_images(perturbed) - dequantize_images(images).unsqueeze(1))
    # Within half a level of the clamped nominal step.
    nominal = (dequantize_images(images).unsqueeze(1) + 0.05 * 8 * directions).clamp(0, 1)
    assert float((dequantize_images(perturbed) - nominal).abs().max()) <= 0.5 / 255 + 1e-6


def test_perturbations_are_clamped_to_the_image_range():
    images = torch.zeros(2, 1, 4, 4)
    directions = sample_directions(2, 3, (1, 4, 4), rng=rng(2))
    perturbed, steps = perturb(images, directions, smoothing=0.2)
    assert float(perturbed.min()) >= 0.0 and float(perturbed.max()) <= 1.0
    assert bool((steps >= 0).all())  # pixels at 0 can only move up


def test_actual_quantised_and_clamped_steps_recover_a_linear_gradient():
    # Linear f through uint8 queries, a quarter of the pixels at 0 (clamped): the differences
    # are exactly a·δ along the actual δ, so m = d actual steps recover a; DFME's sum with the
    # nominal μ·√d·u does not.
    d, batch, m, smoothing = 64, 32, 64, 3 / 255
    slopes = torch.randn(batch, 1, 8, 8, generator=rng(0))
    images = 0.25 + 0.5 * torch.rand(batch, 1, 8, 8, generator=rng(1))
    images[:, :, :2] = 0.0
    images = quantize_images(images)
    directions = sample_directions(batch, m, (1, 8, 8), rng=rng(2))
    perturbed, steps = perturb(images, directions, smoothing=smoothing)
    assert bool((steps[:, :, :, :2] >= 0).all())  # clamped rows only move up
    base_values = (slopes * dequantize_images(images)).flatten(1).sum(1)
    values = (slopes.unsqueeze(1) * dequantize_images(perturbed)).flatten(2).sum(2)
    actual = forward_difference_gradient(base_values, values, steps)
    torch.testing.assert_close(actual, slopes, atol=2e-3, rtol=2e-3)
    radius = smoothing * math.sqrt(d)
    nominal = d / m * torch.einsum("bm,bmd->bd", (values - base_values[:, None]) / radius,
                                   directions.flatten(2))
    assert float(cosine(nominal, slopes).mean()) < 0.97 < float(cosine(actual, slopes).min())


# --------------------------------------------------------------------------------------------
# Batch objectives, one sample moved at a time
# --------------------------------------------------------------------------------------------


def test_replace_one_values_match_a_loop_on_a_batch_level_objective():
    base = torch.randn(5, 4, generator=rng(0))
    perturbed = torch.randn(5, 3, 4, generator=rng(1))

    def objective(logits):
        return one_hot_loss(logits) + 20.0 * class_balance_loss(logits, temperature=2.0)

    value, values = replace_one_values(objective, base, perturbed)
    torch.testing.assert_close(value, objective(base))
    for i in range(5):
        for j in range(3):
            moved = base.clone()
            moved[i] = perturbed[i, j]
            torch.testing.assert_close(values[i, j], objective(moved))


def test_estimate_of_a_batch_objective_through_a_linear_teacher_matches_autograd():
    # t = W·x per sample; F = one-hot + class balance of the batch: ∂F/∂x_i depends on every sample.
    d, classes, batch = 16, 5, 6
    weight = torch.randn(classes, d, generator=rng(0), dtype=torch.float64)
    x = torch.rand(batch, d, generator=rng(1), dtype=torch.float64).requires_grad_()

    def objective(logits):
        return one_hot_loss(logits) + 3.0 * class_balance_loss(logits)

    objective(x @ weight.T).backward()
    steps = 1e-4 * sample_directions(batch, d, (d,), rng=rng(2)).double()
    with torch.no_grad():
        value, values = replace_one_values(objective, x @ weight.T, (x.unsqueeze(1) + steps) @ weight.T)
        estimate = forward_difference_gradient(value, values, steps)
    torch.testing.assert_close(estimate, x.grad, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def make_trainer(*, steps=1, lr=1e-3, batch_size=6, directions=4, num_classes=0, **method):
    cfg = config_from_dict({
        "method": {"name": "cudfkd", "generator_steps": steps, "generator_lr": lr, **method},
        "federation": {"mode": "logits_only"},
    })
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = build_generator("dcgan", latent_dim=8, width=4, depth=2, image_size=8, channels=1,
                                    num_classes=num_classes)
    trainer = ZerothOrderGeneratorTrainer(
        generator, cfg.method, cfg.curriculum, batch_size=batch_size, num_directions=directions,
        smoothing=0.02, seed=3)
    return trainer, build_student(cfg, dataset_info("digits"))


def linear_teacher(samples: torch.Tensor) -> torch.Tensor:
    weight = torch.randn(10, 64, generator=rng(42))
    return as_float_images(samples).flatten(1) @ weight.T


def test_plan_shapes_determinism_and_no_side_effect_on_g():
    trainer, _ = make_trainer(batch_size=6, directions=4)
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    query = trainer.plan(2)
    assert query.samples.dtype == torch.uint8 and query.samples.shape == (6 * 5, 1, 8, 8)
    assert query.steps.shape == (6, 4, 1, 8, 8) and query.num_samples == 30
    for name, value in trainer.generator.state_dict().items():
        assert torch.equal(value, before[name]), name  # BN running statistics included
    # Perturbation j of sample i sits at row n + i·m + j and is x_i plus its step.
    base = dequantize_images(query.samples[:6])
    torch.testing.assert_close(dequantize_images(query.samples[6 + 2 * 4 + 3]), base[2] + query.steps[2, 3])
    again = trainer.plan(2)
    assert torch.equal(again.samples, query.samples) and torch.equal(again.latent, query.latent)
    assert not torch.equal(trainer.plan(3).samples, query.samples)


def test_a_step_moves_g_and_lowers_the_teacher_objective():
    # m = d: an (almost) exact estimate, so a small Adam step must lower F(T(G(z))).
    trainer, student = make_trainer(batch_size=8, directions=64, lr=1e-4, adversarial_weight=0.0)
    progress = Progress.of_round(0, 10)
    weights = trainer.term_weights(progress)
    objective = trainer.teacher_objective(weights, labels=None, student_logits=None)
    query = trainer.plan(0)

    def current_value():
        with torch.no_grad():
            trainer.generator.train()
            return float(objective(linear_teacher(trainer.generator(query.latent))))

    before_value = current_value()
    before = {k: v.clone() for k, v in trainer.generator.named_parameters()}
    metrics = trainer.step(query, linear_teacher(query.samples), student=student, progress=progress)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.generator.named_parameters())
    assert current_value() < before_value
    assert metrics["zo_query_samples"] == 8 * 65
    expected_one_hot = one_hot_loss(linear_teacher(query.samples[:8]))
    assert metrics["generator_zo_one_hot"] == pytest.approx(float(expected_one_hot))
    assert {"generator_loss", "generator_zo_class_balance", "zo_gradient_norm", "zo_step_norm",
            "weight_one_hot", "weight_class_balance"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_the_adversarial_term_goes_through_the_student_with_teacher_logits_detached():
    trainer, student = make_trainer(adversarial_weight=1.0, one_hot_weight=0.0, class_balance_weight=0.0)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    query = trainer.plan(0)
    logits = linear_teacher(query.samples).requires_grad_()
    metrics = trainer.step(query, logits, student=student, progress=Progress.of_round(0, 10))
    assert logits.grad is None
    assert metrics["generator_adversarial"] < 0 and metrics["zo_gradient_norm"] == 0.0
    assert "generator_zo_one_hot" not in metrics and "generator_zo_adversarial" not in metrics
    for name, value in student.state_dict().items():  # S in eval mode, no step on S
        assert torch.equal(value, student_before[name]), name


def test_optimizer_state_round_trips_and_resumes_identically():
    progress = Progress.of_round(0, 10)
    first, student = make_trainer(steps=2)
    query = first.plan(0)
    first.step(query, linear_teacher(query.samples), student=student, progress=progress)
    second, _ = make_trainer(steps=2)
    # Through bytes, as a checkpoint: a state_dict shares the optimizer's moment tensors.
    buffer = io.BytesIO()
    torch.save({"generator": first.generator.state_dict(), "trainer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second.generator.load_state_dict(saved["generator"])
    second.load_state_dict(saved["trainer"])
    for trainer in (first, second):
        next_query = trainer.plan(1)
        trainer.step(next_query, linear_teacher(next_query.samples), student=student,
                     progress=Progress.of_round(1, 10))
    for (name, a), b in zip(first.generator.state_dict().items(), second.generator.state_dict().values()):
        assert torch.equal(a, b), name


def test_step_rejects_logits_of_the_wrong_size():
    trainer, student = make_trainer()
    query = trainer.plan(0)
    with pytest.raises(ValueError, match="logits for the query"):
        trainer.step(query, torch.zeros(query.num_samples - 1, 10), student=student,
                     progress=Progress.of_round(0, 10))


def test_a_conditional_generator_asks_the_one_hot_term_for_its_labels():
    trainer, student = make_trainer(adversarial_weight=0.0, class_balance_weight=0.0, num_classes=10)
    query = trainer.plan(0)
    assert query.labels is not None and query.labels.shape == (6,)
    logits = linear_teacher(query.samples)
    metrics = trainer.step(query, logits, student=student, progress=Progress.of_round(0, 10))
    expected = torch.nn.functional.cross_entropy(logits[:6], query.labels)
    assert metrics["generator_zo_one_hot"] == pytest.approx(float(expected))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "words"), [
    ("zo_smoothing", 1 / 255, "two uint8 levels"),
    ("zo_smoothing", 0.6, "two uint8 levels"),
    ("zo_directions", 0, ">= 1"),
    ("zo_batch_size", 1, ">= 2"),
])
def test_config_rejects_unusable_zeroth_order_settings(key, value, words):
    from fed_dfkd.config import ConfigError

    with pytest.raises(ConfigError, match=f"federation.{key}") as error:
        config_from_dict({"federation": {key: value}})
    assert words in str(error.value)


def test_config_accepts_the_smallest_smoothing_and_no_queries():
    cfg = config_from_dict({"federation": {"zo_smoothing": 2 / 255, "zo_batch_size": 0}})
    assert cfg.federation.zo_batch_size == 0
