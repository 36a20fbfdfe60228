"""Unit tests for fed_dfkd.losses: closed-form values on tiny tensors, gradient paths, hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fed_dfkd.losses import (
    BatchNormStatistics,
    activation_loss,
    adi_competition,
    adversarial_js,
    adversarial_kl,
    adversarial_l1,
    adversarial_loss,
    batch_entropy,
    class_balance_loss,
    js_star,
    kd_kl,
    kd_kl_per_sample,
    kd_l1,
    kd_l1_per_sample,
    kd_loss,
    kd_per_sample,
    negative_window_ranks,
    one_hot_loss,
    r2m_infonce,
    relation_infonce,
    relation_infonce_per_sample,
    total_variation,
    unit,
)

LN2 = math.log(2.0)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# --------------------------------------------------------------------------------------------
# KD


def test_kd_kl_per_sample_closed_form_at_unit_temperature() -> None:
    student = torch.zeros(2, 3)
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])  # softmax [1/2, 1/4, 1/4]; uniform
    expected_first = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    loss = kd_kl_per_sample(student, teacher, temperature=1.0)
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(expected_first, abs=1e-6)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-7)


def test_kd_kl_per_sample_scales_logits_and_multiplies_by_t_squared() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[LN2, 0.0, 0.0]])
    temperature = 2.0
    p_teacher = softmax([LN2 / 2, 0.0, 0.0])
    p_student = softmax([0.5, 0.0, -0.5])
    expected = temperature**2 * kl(p_teacher, p_student)
    loss = kd_kl_per_sample(student, teacher, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_direction_is_teacher_to_student() -> None:
    a = torch.tensor([[2.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    forward = kd_kl_per_sample(a, b, temperature=1.0).item()
    expected = kl(softmax([0.0, 1.0, 0.0]), softmax([2.0, 0.0, 0.0]))
    assert forward == pytest.approx(expected, rel=1e-5)
    assert forward != pytest.approx(kd_kl_per_sample(b, a, temperature=1.0).item(), rel=1e-3)


def test_kd_l1_per_sample_is_mean_over_classes() -> None:
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 4.0, 3.0], [3.0, -3.0, 0.0]])
    assert kd_l1_per_sample(student, teacher).tolist() == pytest.approx([1.0, 2.0])
    assert kd_l1(student, teacher).item() == pytest.approx(1.5)


def test_kd_batch_forms_are_means_and_dispatch_matches() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=generator)
    teacher = torch.randn(4, 5, generator=generator)
    per_sample = kd_kl_per_sample(student, teacher, temperature=4.0)
    batch_mean = kd_kl(student, teacher, temperature=4.0)
    assert batch_mean.item() == pytest.approx(per_sample.mean().item())
    torch.testing.assert_close(
        kd_per_sample(student, teacher, divergence="kl", temperature=4.0), per_sample
    )
    torch.testing.assert_close(
        kd_per_sample(student, teacher, divergence="l1", temperature=4.0),
        kd_l1_per_sample(student, teacher),
    )
    assert kd_loss(student, teacher, divergence="l1", temperature=1.0).item() == pytest.approx(
        kd_l1(student, teacher).item()
    )


def test_kd_unknown_divergence_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="kl.*l1"):
        kd_per_sample(torch.zeros(1, 2), torch.zeros(1, 2), divergence="l2", temperature=1.0)


def test_kd_rejects_bad_shapes_and_temperature() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kd_kl_per_sample(torch.zeros(2, 3), torch.zeros(2, 4), temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_per_sample(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


# --------------------------------------------------------------------------------------------
# BN statistics


def _bn_layer(mean: list[float], var: list[float]) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(len(mean))
    layer.running_mean.copy_(torch.tensor(mean))
    layer.running_var.copy_(torch.tensor(var))
    with torch.no_grad():  # a non-trivial affine map: the loss must use the INPUT statistics
        layer.weight.fill_(3.0)
        layer.bias.fill_(-7.0)
    return layer.eval()


def _batch_with_statistics(mean: list[float], std: list[float]) -> torch.Tensor:
    # Per channel the values m − s, m + s, m − s, m + s: mean m and biased variance s² exactly.
    signs = torch.tensor([-1.0, 1.0, -1.0, 1.0]).reshape(2, 1, 1, 2)
    channels = [m + s * signs for m, s in zip(mean, std)]
    return torch.cat(channels, dim=1)  # [2, C, 1, 2]


def test_bn_loss_is_zero_when_batch_reproduces_running_statistics() -> None:
    model = nn.Sequential(_bn_layer([1.0, -2.0], [4.0, 0.25]))
    x = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    with BatchNormStatistics(model) as bn_statistics:
        model(x)
        loss = bn_statistics.loss()
    assert bn_statistics.num_layers == 1
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_bn_loss_uses_unsquared_norms() -> None:
    model = nn.Sequential(_bn_layer([1.0, -2.0], [4.0, 0.25]))
    # Mean off by (3, 4) → ‖·‖ = 5; variance off by (5, 12) (std 3 vs 2, std 3.5 vs 0.5) → 13.
    x = _batch_with_statistics([4.0, 2.0], [3.0, math.sqrt(12.25)])
    with BatchNormStatistics(model) as bn_statistics:
        model(x)
        assert bn_statistics.loss().item() == pytest.approx(5.0 + 13.0, rel=1e-5)
        assert [t.item() for t in bn_statistics.layer_losses()] == pytest.approx([18.0], rel=1e-5)


def test_bn_standardized_scale_divides_each_channel_by_the_target_spread() -> None:
    eps = 1e-5
    model = nn.Sequential(_bn_layer([1.0, -2.0], [4.0, 0.25]))
    # The same batch as above: mean gaps (3, 4), variance gaps (5, 12), now in units of the
    # running spread: means (3/√(4+ε), 4/√(0.25+ε)), variances (5/(4+ε), 12/(0.25+ε)).
    x = _batch_with_statistics([4.0, 2.0], [3.0, math.sqrt(12.25)])
    expected = math.hypot(3 / math.sqrt(4 + eps), 4 / math.sqrt(0.25 + eps)) + math.hypot(
        5 / (4 + eps), 12 / (0.25 + eps))
    with BatchNormStatistics(model, scale="standardized") as bn_statistics:
        model(x)
        assert bn_statistics.loss().item() == pytest.approx(expected, rel=1e-5)


def test_bn_standardized_scale_ignores_a_layer_s_activation_scale() -> None:
    # Scaling a layer's input and its running statistics by k (std by k, variance by k²)
    # multiplies the absolute loss by about k² and leaves the standardized one unchanged.
    def loss(k: float, scale: str) -> float:
        model = nn.Sequential(_bn_layer([k * 1.0, k * -2.0], [k * k * 4.0, k * k * 0.25]))
        x = _batch_with_statistics([k * 4.0, k * 2.0], [k * 3.0, k * math.sqrt(12.25)])
        with BatchNormStatistics(model, scale=scale) as bn_statistics:
            model(x)
            return bn_statistics.loss().item()

    assert loss(10.0, "standardized") == pytest.approx(loss(1.0, "standardized"), rel=1e-4)
    assert loss(10.0, "absolute") > 50 * loss(1.0, "absolute")
    with pytest.raises(ValueError, match="scale must be one of"):
        BatchNormStatistics(nn.Sequential(_bn_layer([0.0], [1.0])), scale="relative")  # type: ignore[arg-type]


def test_bn_variance_is_biased() -> None:
    layer = nn.BatchNorm2d(1).eval()
    layer.running_mean.fill_(1.0)
    layer.running_var.fill_(1.0)  # biased variance of {0, 2}; the unbiased one is 2
    x = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1)
    with BatchNormStatistics(layer) as bn_statistics:
        layer(x)
        assert bn_statistics.loss().item() == pytest.approx(0.0, abs=1e-7)


def test_bn_batchnorm1d_on_flat_features() -> None:
    layer = nn.BatchNorm1d(2).eval()
    x = torch.tensor([[1.0, 3.0], [3.0, 3.0]])  # means (2, 3), biased variances (1, 0)
    with BatchNormStatistics(layer) as bn_statistics:
        layer(x)
        loss = bn_statistics.loss()
    # running stats are (0, 0) and (1, 1): ‖(2, 3)‖ + ‖(0, −1)‖
    assert loss.item() == pytest.approx(math.sqrt(13.0) + 1.0, rel=1e-6)


def test_bn_gradient_flows_to_the_input() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), _bn_layer([0.0, 0.0], [1.0, 1.0]))
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with BatchNormStatistics(model) as bn_statistics:
        model(x)
        bn_statistics.loss().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bn_hooks_removed_after_context_and_after_exception() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), _bn_layer([0.0, 0.0], [1.0, 1.0]))
    with BatchNormStatistics(model) as bn_statistics:
        assert _has_hooks(model)
        model(torch.randn(2, 1, 2, 2))
    assert not _has_hooks(model)
    before = bn_statistics.loss().item()
    model(torch.randn(2, 1, 2, 2) + 10.0)  # outside the block: nothing recorded
    assert bn_statistics.loss().item() == pytest.approx(before)

    with pytest.raises(RuntimeError, match="boom"):
        with BatchNormStatistics(model):
            model(torch.randn(2, 1, 2, 2))
            raise RuntimeError("boom")
    assert not _has_hooks(model)


def test_bn_last_forward_wins() -> None:
    model = nn.Sequential(_bn_layer([1.0, -2.0], [4.0, 0.25]))
    exact = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    with BatchNormStatistics(model) as bn_statistics:
        model(exact + 5.0)
        assert bn_statistics.loss().item() > 1.0
        model(exact)
        assert bn_statistics.loss().item() == pytest.approx(0.0, abs=1e-6)


class _Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = _bn_layer([0.0], [1.0])
        self.second = _bn_layer([0.0], [1.0])
        self.use_second = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return self.second(x) if self.use_second else x


def test_bn_statistics_of_an_earlier_forward_are_not_reused() -> None:
    model = _Branching()
    with BatchNormStatistics(model) as bn_statistics:
        model(torch.randn(2, 1, 2, 2))
        bn_statistics.loss()
        model.use_second = False
        model(torch.randn(2, 1, 2, 2))
        with pytest.raises(RuntimeError, match="second"):
            bn_statistics.loss()


class _Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def test_bn_ensemble_sums_over_all_teachers() -> None:
    first = nn.Sequential(_bn_layer([1.0, -2.0], [4.0, 0.25]))
    second = nn.Sequential(_bn_layer([0.0, 0.0], [4.0, 0.25]))  # mean off by (1, −2): ‖·‖ = √5
    ensemble = _Ensemble([first, second])
    x = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    with BatchNormStatistics(ensemble) as bn_statistics:
        ensemble(x)
        assert bn_statistics.num_layers == 2
        assert bn_statistics.layer_names == ["members.0.0", "members.1.0"]
        assert bn_statistics.loss().item() == pytest.approx(math.sqrt(5.0), rel=1e-5)


def test_bn_targets_replace_running_statistics() -> None:
    model = nn.Sequential(_bn_layer([100.0, 100.0], [9.0, 9.0]))
    x = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    targets = {"0": (torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25]))}
    with BatchNormStatistics(model, targets=targets) as bn_statistics:
        model(x)
        assert bn_statistics.loss().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="not BatchNorm"):
        BatchNormStatistics(model, targets={"missing": targets["0"]})
    with pytest.raises(ValueError, match="shape"):
        BatchNormStatistics(model, targets={"0": (torch.zeros(3), torch.zeros(3))})


def test_bn_model_without_batch_norm_gives_zero() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with BatchNormStatistics(model) as bn_statistics:
        model(torch.randn(2, 3))
        loss = bn_statistics.loss()
    assert bn_statistics.num_layers == 0
    assert loss.shape == () and loss.item() == 0.0


def test_bn_loss_before_any_forward_raises() -> None:
    model = nn.Sequential(_bn_layer([0.0], [1.0]))
    with BatchNormStatistics(model) as bn_statistics:
        with pytest.raises(RuntimeError, match="no BatchNorm statistics"):
            bn_statistics.loss()


# --------------------------------------------------------------------------------------------
# Entropy priors


def test_one_hot_loss_closed_form() -> None:
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, math.log(3.0), 0.0]])
    expected = 0.5 * (-math.log(0.5) - math.log(0.6))
    assert one_hot_loss(teacher).item() == pytest.approx(expected, rel=1e-6)


def test_class_balance_and_batch_entropy_closed_form() -> None:
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN2, 0.0]])
    mean_probabilities = [0.375, 0.375, 0.25]
    expected = sum(p * math.log(p) for p in mean_probabilities)
    assert class_balance_loss(teacher).item() == pytest.approx(expected, rel=1e-6)
    assert batch_entropy(teacher).item() == pytest.approx(-expected, rel=1e-6)


def test_class_balance_uses_temperature_and_is_minimal_for_uniform_mean() -> None:
    teacher = torch.tensor([[2 * LN2, 0.0, 0.0]])  # at T = 2: softmax [1/2, 1/4, 1/4]
    expected = 0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)
    assert class_balance_loss(teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    balanced = torch.eye(3) * 5.0  # three confident samples, one per class: p̄ uniform
    assert class_balance_loss(balanced).item() == pytest.approx(-math.log(3.0), rel=1e-6)
    assert class_balance_loss(balanced).item() < class_balance_loss(teacher).item()


def test_class_balance_with_a_prior_is_the_kl_to_it() -> None:
    teacher = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN2, 0.0]])  # p̄ = [3/8, 3/8, 1/4]
    mean_probabilities = [0.375, 0.375, 0.25]
    prior = torch.tensor([6.0, 1.0, 1.0])  # unnormalised counts: π = [3/4, 1/8, 1/8]
    expected = sum(p * math.log(p / q) for p, q in zip(mean_probabilities, [0.75, 0.125, 0.125]))
    assert class_balance_loss(teacher, prior=prior).item() == pytest.approx(expected, rel=1e-5)
    # Uniform π: the plain loss plus log C (same gradients).
    uniform = class_balance_loss(teacher, prior=torch.ones(3)).item()
    assert uniform == pytest.approx(class_balance_loss(teacher).item() + math.log(3.0), rel=1e-5)
    # Zero exactly when p̄ = π, and not at the uniform mean any more.
    matching = torch.log(torch.tensor([[0.75, 0.125, 0.125]]))
    assert class_balance_loss(matching, prior=prior).item() == pytest.approx(0.0, abs=1e-6)
    balanced = torch.eye(3) * 5.0
    assert class_balance_loss(balanced, prior=prior).item() > 0.1
    with pytest.raises(ValueError, match="positive"):
        class_balance_loss(teacher, prior=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="prior must be"):
        class_balance_loss(teacher, prior=torch.ones(2))


def test_class_balance_is_finite_when_a_class_probability_underflows() -> None:
    teacher = torch.tensor([[200.0, 0.0], [200.0, 0.0]])
    loss = class_balance_loss(teacher)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_activation_loss() -> None:
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, -4.0]])).item() == pytest.approx(-2.5)


# --------------------------------------------------------------------------------------------
# Adversarial terms


def test_adversarial_kl_closed_form_and_teacher_gradient() -> None:
    student = torch.zeros(2, 3, requires_grad=True)
    teacher = torch.tensor([[3 * LN2, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = adversarial_kl(student, teacher)  # τ = 3: softmax(t/3) = [1/2, 1/4, 1/4]
    expected = -9.0 * (0.5 * math.log(1.5) + 0.5 * math.log(0.75)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert teacher.grad is not None and teacher.grad.abs().sum().item() > 0
    assert student.grad is not None and student.grad.abs().sum().item() > 0


def test_adversarial_l1() -> None:
    student = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = torch.tensor([[0.0, 4.0, 3.0]], requires_grad=True)
    loss = adversarial_l1(student, teacher)
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert teacher.grad.abs().sum().item() > 0


def test_js_star_closed_form_inside_the_clamp_range() -> None:
    student = torch.zeros(1, 3)  # P = 1/3 each
    teacher = torch.tensor([[3 * LN2, 0.0, 0.0]])  # Q = [1/2, 1/4, 1/4] at τ = 3
    p, q = [1 / 3] * 3, [0.5, 0.25, 0.25]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * kl(m, p) + 0.5 * kl(m, q)  # KL(M‖·), not KL(·‖M)
    assert js_star(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert adversarial_js(student, teacher).item() == pytest.approx(-expected, rel=1e-5)
    assert adi_competition(student, teacher).item() == pytest.approx(1.0 - expected, rel=1e-5)


def test_js_star_clamps_after_forming_the_mixture() -> None:
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[100.0, 0.0, 0.0]])
    p, q_clamped = [1 / 3] * 3, [0.99, 0.01, 0.01]
    m = [2 / 3, 1 / 6, 1 / 6]  # from the unclamped Q = [1, 0, 0]
    expected = 0.5 * kl(m, p) + 0.5 * kl(m, q_clamped)
    assert js_star(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_adi_competition_clips_at_one() -> None:
    student = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 100.0, 0.0]])
    # P → [.99, .01, .01], Q → [.01, .99, .01], M → [.5, .5, .01]: JS* = ½ ln 25.25 > 1
    value = js_star(student, teacher, temperature=1.0)
    assert value.item() == pytest.approx(0.5 * math.log(25.25), rel=1e-4)
    competition = adi_competition(student, teacher, temperature=1.0)
    assert competition.item() == pytest.approx(0.0, abs=1e-7)


def test_adversarial_loss_dispatch() -> None:
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 4, generator=generator)
    teacher = torch.randn(3, 4, generator=generator)
    assert adversarial_loss(student, teacher, divergence="kl").item() == pytest.approx(
        adversarial_kl(student, teacher, temperature=3.0).item()
    )
    assert adversarial_loss(student, teacher, divergence="l1").item() == pytest.approx(
        adversarial_l1(student, teacher).item()
    )
    assert adversarial_loss(student, teacher, divergence="js").item() == pytest.approx(
        adversarial_js(student, teacher).item()
    )
    assert adversarial_loss(student, teacher, divergence="adi").item() == pytest.approx(
        adi_competition(student, teacher).item()
    )
    with pytest.raises(ValueError, match="adi, js, kl, l1"):
        adversarial_loss(student, teacher, divergence="mse")


def test_total_variation_four_directions() -> None:
    image = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).reshape(1, 1, 2, 2)
    # right: |1|, |2| → 1.5; down: |2|, |3| → 2.5; down-right: |4 − 0| = 4; down-left: |2 − 1| = 1
    assert total_variation(image).item() == pytest.approx(9.0)
    assert total_variation(torch.full((2, 3, 4, 4), 0.7)).item() == 0.0


# --------------------------------------------------------------------------------------------
# Contrastive terms


def test_unit() -> None:
    torch.testing.assert_close(unit(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def _negatives_with_cosines(cosines: list[float]) -> torch.Tensor:
    # Unit rows at angle θ_j from e₁, so their similarity to q = e₁ is cos θ_j.
    return torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])


COSINES = [-0.9, 0.6, 0.0, -0.5, 0.9, 0.3, 0.1, -0.2]  # K = 8, deliberately unsorted


def _expected_r2m(positive: float, kept: list[float], temperature: float) -> float:
    numerator = math.exp(positive / temperature)
    return -math.log(numerator / (numerator + sum(math.exp(n / temperature) for n in kept)))


@pytest.mark.parametrize(
    ("window_start", "window_width", "kept"),
    [
        (0.0, 0.25, [-0.9, -0.5]),  # easiest k-fraction
        (0.25, 0.5, [-0.2, 0.0, 0.1, 0.3]),
        (0.75, 0.25, [0.6, 0.9]),  # hardest k-fraction
        (0.0, 1.0, sorted(COSINES)),
    ],
)
def test_r2m_window_keeps_the_right_ranks(
    window_start: float, window_width: float, kept: list[float]
) -> None:
    anchors = torch.tensor([[2.0, 0.0]])  # not unit: the function normalises
    positives = torch.tensor([[0.5, 0.5]])  # cos 45° with the anchor
    negatives = _negatives_with_cosines(COSINES) * 3.0
    loss = r2m_infonce(
        anchors,
        positives,
        negatives,
        window_start=window_start,
        window_width=window_width,
        temperature=0.5,
    )
    assert loss.item() == pytest.approx(_expected_r2m(math.sqrt(0.5), kept, 0.5), rel=1e-5)


def test_r2m_ranks_each_row_separately_and_flows_to_anchors_only() -> None:
    generator = torch.Generator().manual_seed(3)
    anchors = torch.randn(3, 4, generator=generator, requires_grad=True)
    positives = torch.randn(3, 4, generator=generator)
    negatives = unit(torch.randn(10, 4, generator=generator))
    loss = r2m_infonce(
        anchors, positives, negatives, window_start=0.3, window_width=0.4, temperature=0.1
    )
    q = unit(anchors.detach())
    expected = []
    for i in range(3):
        similarities = sorted((q[i] @ negatives.T).tolist())[3:7]
        positive = float(q[i] @ unit(positives[i]))
        expected.append(_expected_r2m(positive, similarities, 0.1))
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    loss.backward()
    assert anchors.grad is not None and anchors.grad.abs().sum().item() > 0


def test_negative_window_ranks_bounds_and_round_off() -> None:
    assert negative_window_ranks(8, window_start=0.25, window_width=0.5) == (2, 6)
    assert negative_window_ranks(3, window_start=0.0, window_width=0.1) == (0, 1)  # at least one
    assert negative_window_ranks(3, window_start=0.9, window_width=0.1) == (2, 3)
    assert 0.29 * 100 < 29  # the float round-off the tolerance absorbs
    assert negative_window_ranks(100, window_start=0.29, window_width=0.01) == (29, 30)
    assert negative_window_ranks(10, window_start=1 - 0.3, window_width=0.3) == (7, 10)
    with pytest.raises(ValueError, match="window_start"):
        negative_window_ranks(8, window_start=0.8, window_width=0.5)
    with pytest.raises(ValueError, match="window_width"):
        negative_window_ranks(8, window_start=0.0, window_width=0.0)


def test_relation_infonce_per_sample_closed_form() -> None:
    identity = torch.eye(2)
    temperature = 0.5
    aligned = relation_infonce_per_sample(identity, identity * 4.0, temperature=temperature)
    expected_aligned = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert aligned.tolist() == pytest.approx([expected_aligned] * 2, rel=1e-5)
    swapped = relation_infonce_per_sample(identity, identity.flip(0), temperature=temperature)
    expected_swapped = -math.log(1.0 / (math.exp(2.0) + 1.0))
    assert swapped.tolist() == pytest.approx([expected_swapped] * 2, rel=1e-5)
    assert relation_infonce(identity, identity.flip(0), temperature=temperature).item() == (
        pytest.approx(expected_swapped, rel=1e-5)
    )


def test_relation_infonce_rows_are_teacher_rows() -> None:
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # d = [[1, 0], [1, 0]]: row 0 picks d_00 = 1, row 1 picks d_11 = 0
    values = relation_infonce_per_sample(teacher, student, temperature=1.0)
    expected = [-math.log(math.e / (math.e + 1)), -math.log(1 / (math.e + 1))]
    assert values.tolist() == pytest.approx(expected, rel=1e-6)
