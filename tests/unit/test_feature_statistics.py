"""Private feature statistics (fed_dfkd.privacy.feature_statistics) and the BN prior that uses
them: the release against an exact oracle, its noise scale and histogram, and the generalised
BatchNormStatistics against GroupNorm targets (closed forms, hooks removed, ensemble names)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fed_dfkd.config import config_from_dict
from fed_dfkd.data import load_dataset
from fed_dfkd.losses import BatchNormStatistics
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier, TeacherEnsemble
from fed_dfkd.privacy import (
    FeatureStatistics,
    exact_feature_statistics,
    make_dp_compatible,
    normalization_layer_names,
    probe_scales,
    release_feature_statistics,
    sample_moments,
)
from fed_dfkd.synthesis import Progress, build_synthesizer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, train_subset=300)


@pytest.fixture(scope="module")
def dp_teacher(digits) -> NormalizedClassifier:
    """An untrained DP-compatible digits CNN (BatchNorm already replaced by GroupNorm)."""
    info = digits.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    return make_dp_compatible(NormalizedClassifier(net, info.mean, info.std)).eval()


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# The release


def test_layers_are_the_group_norms_that_replaced_batch_norm(dp_teacher) -> None:
    assert normalization_layer_names(dp_teacher) == ["net.features.1", "net.features.4", "net.features.8"]
    assert all(isinstance(dict(dp_teacher.named_modules())[name], nn.GroupNorm)
               for name in normalization_layer_names(dp_teacher))


def test_identity_layer_oracle_by_hand() -> None:
    """A GroupNorm on the raw input: the statistics are those of the images themselves."""
    model = nn.Sequential(nn.GroupNorm(2, 2))
    images = torch.randn(50, 2, 3, 4, generator=_rng(1)) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + 3.0
    labels = torch.arange(50) % 3
    released = release_feature_statistics(model, images, labels, num_classes=3, clip=1e6,
                                           noise_multiplier=0.0, rng=_rng(), batch_size=7)
    var, mean = torch.var_mean(images.double(), dim=(0, 2, 3), correction=0)
    got_mean, got_var = released.layers["0"]
    assert torch.allclose(got_mean.double(), mean, rtol=1e-6)
    assert torch.allclose(got_var.double(), var, rtol=1e-5)
    assert released.class_histogram == [17, 17, 16]
    assert released.count == pytest.approx(50.0, abs=1e-9)


def test_no_noise_and_a_huge_clip_give_the_exact_statistics(dp_teacher, digits) -> None:
    images, labels = digits.train_images, digits.train_labels
    released = release_feature_statistics(dp_teacher, images, labels, num_classes=10, clip=1e8,
                                           noise_multiplier=0.0, rng=_rng(), batch_size=64)
    exact = exact_feature_statistics(dp_teacher, images, labels, num_classes=10)
    assert released.layers.keys() == exact.layers.keys()
    for name, (mean, var) in exact.layers.items():
        assert torch.allclose(released.layers[name][0], mean, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(released.layers[name][1], var, rtol=1e-4, atol=1e-6), name
    assert released.class_histogram == exact.class_histogram == torch.bincount(labels, minlength=10).tolist()
    assert released.count == pytest.approx(len(labels), abs=1e-6)
    assert not _has_hooks(dp_teacher)


def test_release_reproduces_standardise_clip_sum_noise_by_hand() -> None:
    """Step by step: probe scales, rows [f/S, a·onehot] clipped jointly to C, N(0, (σC)²)."""
    model = nn.Sequential(nn.GroupNorm(1, 1))
    images = torch.tensor([3.0, 1.0, 0.0, 0.5, -2.0, 2.0]).view(3, 1, 1, 2)
    labels = torch.tensor([0, 1, 1])
    sigma, clip, seed = 0.3, 2.0, 11
    released = release_feature_statistics(model, images, labels, num_classes=2, clip=clip,
                                           noise_multiplier=sigma, rng=_rng(seed), num_probes=64)
    rng = _rng(seed)  # the release draws the probes first, then the noise
    scales = probe_scales(model, image_shape=(1, 1, 2), rng=rng, num_probes=64) * math.sqrt(2)
    # Probes U[0, 1]^2: block RMS √E[m²] = √(1/4 + 1/24) for the means, √(7/45) for the squares.
    assert scales[0] / math.sqrt(2) == pytest.approx(math.sqrt(1 / 4 + 1 / 24), rel=0.1)
    assert scales[1] / math.sqrt(2) == pytest.approx(math.sqrt(7 / 45), rel=0.1)
    features = torch.tensor([[2.0, 5.0], [0.25, 0.125], [0.0, 4.0]], dtype=torch.float64)  # (mean, mean x²)
    label_norm = clip * math.sqrt(0.5)
    rows = torch.cat([features / scales, torch.eye(2, dtype=torch.float64)[labels] * label_norm], dim=1)
    rows = rows * torch.clamp(clip / rows.norm(dim=1, keepdim=True), max=1.0)
    sums = rows.sum(0) + torch.randn(4, generator=rng, dtype=torch.float64) * sigma * clip
    histogram = sums[2:] / label_norm
    count = float(histogram.sum())
    mean, mean_square = sums[0] * scales[0] / count, sums[1] * scales[1] / count
    assert released.count == pytest.approx(count, rel=1e-12)
    assert released.layers["0"][0].item() == pytest.approx(float(mean), rel=1e-6)
    assert released.layers["0"][1].item() == pytest.approx(max(float(mean_square - mean**2), 1e-5), rel=1e-5)
    assert released.class_histogram == [max(round(float(h)), 0) for h in histogram]


def test_clipping_down_weights_a_record_instead_of_shrinking_the_statistics() -> None:
    """Without noise, the statistics are a weighted mean: equal records stay exact when clipped."""
    model = nn.Sequential(nn.GroupNorm(1, 1))
    images = torch.full((40, 1, 2, 2), 0.7)
    labels = torch.zeros(40, dtype=torch.int64)
    released = release_feature_statistics(model, images, labels, num_classes=2, clip=1e-3,
                                           noise_multiplier=0.0, rng=_rng())
    assert released.layers["0"][0].item() == pytest.approx(0.7, rel=1e-6)
    assert released.count < 40  # every record was clipped: the weighted count shrinks instead


def _zero_mean_images(n: int) -> torch.Tensor:
    # Each image is (+1, -1): spatial mean 0 and mean of squares 1, so Σ_i m_i = 0 exactly.
    return torch.tensor([1.0, -1.0]).repeat(n, 1).view(n, 1, 1, 2)


@pytest.mark.parametrize(("sigma", "clip", "n"), [(1.0, 3.0, 400), (2.0, 6.0, 200)])
def test_noise_on_the_mean_is_sigma_clip_over_n(sigma: float, clip: float, n: int) -> None:
    """std(μ̃) = σ_s·C·S/n, S = the means block's probe RMS·√D (no record clipped at these C)."""
    model = nn.Sequential(nn.GroupNorm(1, 1))
    images, labels = _zero_mean_images(n), torch.arange(n) % 2
    errors = torch.tensor([
        release_feature_statistics(model, images, labels, num_classes=2, clip=clip,
                                   noise_multiplier=sigma, rng=_rng(seed)).layers["0"][0].item()
        for seed in range(300)
    ])
    scale = math.sqrt(1 / 4 + 1 / 24) * math.sqrt(2)  # the means block: RMS of the mean of 2 U[0, 1]
    # The noisy count moves the divisor by ~2σC/(an) relative: negligible next to σCS/n.
    assert float(errors.std()) == pytest.approx(sigma * clip * scale / n, rel=0.15)
    assert abs(float(errors.mean())) < 4 * sigma * clip * scale / n / math.sqrt(300)


def test_noisy_histogram_sums_to_about_n(dp_teacher, digits) -> None:
    images, labels = digits.train_images, digits.train_labels
    sigma, clip = 1.0, 2.0  # digits records have ‖f̃‖ < C·√(1 − ρ) = 1.41 here: none clipped
    released = release_feature_statistics(dp_teacher, images, labels, num_classes=10, clip=clip,
                                           noise_multiplier=sigma, rng=_rng(3))
    per_class_std = sigma * clip / (clip * math.sqrt(0.5))  # σC / a = σ√2
    assert all(c >= 0 for c in released.class_histogram)
    assert abs(released.count - len(labels)) < 5 * per_class_std * math.sqrt(10)
    assert abs(sum(released.class_histogram) - len(labels)) < 5 * per_class_std * math.sqrt(10) + 5
    exact = torch.bincount(labels, minlength=10)
    assert (torch.tensor(released.class_histogram) - exact).abs().max() < 5 * per_class_std + 1
    assert released.class_histogram != exact.tolist()  # it is noisy
    for mean, var in released.layers.values():
        assert (var >= 1e-5).all() and torch.isfinite(mean).all()


def test_release_is_seeded_and_restores_the_mode(dp_teacher, digits) -> None:
    images, labels = digits.train_images[:64], digits.train_labels[:64]
    dp_teacher.train()
    try:
        runs = [release_feature_statistics(dp_teacher, images, labels, num_classes=10, clip=5.0,
                                           noise_multiplier=2.0, rng=_rng(seed)) for seed in (4, 4, 5)]
        assert dp_teacher.training
    finally:
        dp_teacher.eval()
    same = [torch.equal(runs[0].layers[k][0], runs[1].layers[k][0]) for k in runs[0].layers]
    different = [torch.equal(runs[0].layers[k][0], runs[2].layers[k][0]) for k in runs[0].layers]
    assert all(same) and not any(different)


def test_sample_moments_layout(dp_teacher, digits) -> None:
    moments = sample_moments(dp_teacher, digits.train_images[:5])
    assert moments.shape == (5, 2 * (32 + 64 + 128)) and moments.dtype == torch.float64
    # mean of squares >= square of the mean, channel by channel
    first_means, first_squares = moments[:, :32], moments[:, 32:64]
    assert (first_squares + 1e-9 >= first_means.square()).all()


def test_release_rejects_bad_arguments(dp_teacher, digits) -> None:
    images, labels = digits.train_images[:8], digits.train_labels[:8]
    with pytest.raises(ValueError, match="clip"):
        release_feature_statistics(dp_teacher, images, labels, num_classes=10, clip=math.inf,
                                   noise_multiplier=1.0, rng=_rng())
    with pytest.raises(ValueError, match="labels"):
        release_feature_statistics(dp_teacher, images, labels, num_classes=3, clip=1.0,
                                   noise_multiplier=1.0, rng=_rng())
    with pytest.raises(ValueError, match="normalisation layer"):
        release_feature_statistics(dp_teacher, images, labels, num_classes=10, clip=1.0,
                                   noise_multiplier=1.0, rng=_rng(), layers=["net.fc"])


def test_statistics_round_trip_through_a_weights_only_file(dp_teacher, digits) -> None:
    released = release_feature_statistics(dp_teacher, digits.train_images[:32], digits.train_labels[:32],
                                          num_classes=10, clip=5.0, noise_multiplier=1.0, rng=_rng())
    buffer = io.BytesIO()
    torch.save(released.state_dict(), buffer)
    buffer.seek(0)
    loaded = FeatureStatistics.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.class_histogram == released.class_histogram and loaded.count == released.count
    for name, (mean, var) in released.layers.items():
        assert torch.equal(loaded.layers[name][0], mean) and torch.equal(loaded.layers[name][1], var)
    with pytest.raises(ValueError, match="lack"):
        FeatureStatistics.from_state_dict({"layers": {}})


# --------------------------------------------------------------------------------------------
# The generalised BN prior


def _batch_with_statistics(mean: list[float], std: list[float]) -> torch.Tensor:
    # Per channel the values m − s, m + s, m − s, m + s: mean m and biased variance s² exactly.
    signs = torch.tensor([-1.0, 1.0, -1.0, 1.0]).reshape(2, 1, 1, 2)
    return torch.cat([m + s * signs for m, s in zip(mean, std)], dim=1)


def test_group_norm_targets_zero_when_matched_and_by_hand_otherwise() -> None:
    model = nn.Sequential(nn.GroupNorm(2, 2))
    x = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    exact = {"0": (torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25]))}
    with BatchNormStatistics(model, targets=exact) as prior:
        assert _has_hooks(model)
        model(x)
        assert prior.layer_names == ["0"]
        assert prior.loss().item() == pytest.approx(0.0, abs=1e-6)
    assert not _has_hooks(model)
    # Mean off by (3, 4): ‖·‖ = 5; variance off by (5, 12): 13.
    off = {"0": (torch.tensor([-2.0, -6.0]), torch.tensor([9.0, 12.25]))}
    with BatchNormStatistics(model, targets=off) as prior:
        model(x)
        assert prior.loss().item() == pytest.approx(18.0, rel=1e-5)
    assert not _has_hooks(model)


def test_group_norm_without_target_is_not_hooked_and_batch_norm_keeps_running_statistics() -> None:
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    model = nn.Sequential(bn, nn.GroupNorm(1, 2), nn.GroupNorm(2, 2))
    with BatchNormStatistics(model) as prior:
        assert prior.layer_names == ["0"]
    x = _batch_with_statistics([1.0, -2.0], [2.0, 0.5])
    # The BN output is x normalised: per channel mean 0 and variance ~1 (eps aside).
    targets = {"2": (torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]))}
    with BatchNormStatistics(model, targets=targets) as prior:
        model(x)
        assert prior.layer_names == ["0", "2"]
        losses = [t.item() for t in prior.layer_losses()]
    assert losses[0] == pytest.approx(0.0, abs=1e-5)
    # BN turns each channel into (−1, 1, −1, 1); GN(1, 2) keeps that: the input of layer 2 has
    # channel means (0, 0) and variances ~1, so only the mean target's 3 counts.
    assert losses[1] == pytest.approx(3.0, abs=1e-3)
    assert not _has_hooks(model)
    with pytest.raises(ValueError, match="shape"):
        BatchNormStatistics(model, targets={"2": (torch.zeros(3), torch.zeros(3))})
    with pytest.raises(ValueError, match="not BatchNorm"):
        BatchNormStatistics(model, targets={"missing": targets["2"]})


def test_ensemble_exposes_its_members_targets_under_their_names(dp_teacher, digits) -> None:
    import copy

    first, second = copy.deepcopy(dp_teacher), copy.deepcopy(dp_teacher)
    exact = exact_feature_statistics(first, digits.train_images[:64], digits.train_labels[:64],
                                     num_classes=10)
    first.set_feature_targets(exact.targets())
    ensemble = TeacherEnsemble([first, second])
    assert sorted(ensemble.feature_targets) == [f"members.0.{n}" for n in sorted(exact.layers)]
    with BatchNormStatistics(ensemble, targets=ensemble.feature_targets) as prior:
        ensemble(digits.train_images[:64])
        # Member 0 sees exactly the batch its targets were measured on.
        assert prior.loss().item() == pytest.approx(0.0, abs=1e-4)
        assert prior.num_layers == 3
    with pytest.raises(ValueError, match="not a module"):
        first.set_feature_targets({"net.nothing": exact.layers["net.features.1"]})


def test_synthesizer_prior_uses_the_teachers_feature_targets(dp_teacher, digits) -> None:
    import copy

    teacher = copy.deepcopy(dp_teacher)
    cfg = config_from_dict({"method": {"name": "adadfkd", "negative_bank_size": 64}})
    student = NormalizedClassifier(
        build_classifier("cnn_digits_half", num_classes=10, in_channels=1, image_size=8),
        digits.info.mean, digits.info.std).eval()
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=16,
                                    teacher_feature_dim=teacher.feature_dim,
                                    student_feature_dim=student.feature_dim, seed=0)
    progress = Progress(fraction=0.5, round=5)
    weights = {**synthesizer.term_weights(progress), "bn_statistics": 1.0}
    images = digits.train_images[:16]
    with torch.no_grad():
        _, terms, _ = synthesizer.objective(teacher=teacher, student=student, images=images,
                                            progress=progress, weights=weights)
        assert terms["bn_statistics"].item() == 0.0  # no BatchNorm, no targets: no prior
        exact = exact_feature_statistics(teacher, images, digits.train_labels[:16], num_classes=10)
        shifted = {name: (mean + 1.0, var) for name, (mean, var) in exact.layers.items()}
        teacher.set_feature_targets(shifted)
        _, terms, _ = synthesizer.objective(teacher=teacher, student=student, images=images,
                                            progress=progress, weights=weights)
    # Each layer's mean is off by 1 in every channel: ‖·‖ = √C.
    expected = math.sqrt(32) + math.sqrt(64) + math.sqrt(128)
    assert terms["bn_statistics"].item() == pytest.approx(expected, rel=1e-3)
    assert not _has_hooks(teacher)
