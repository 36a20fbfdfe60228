"""The per-class BN-statistics prior (``method.bn_statistics_per_class``): the loss in closed
form, the owner's per-class statistics, how they travel from pretraining to the owner, and the
errors when they are missing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fed_dfkd.config import ConfigError, load_config
from fed_dfkd.data.teachers import class_feature_statistics, load_teacher, pretrain_teachers, teacher_path
from fed_dfkd.errors import UserError
from fed_dfkd.losses.bn_statistics import BatchNormStatistics
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer
from fed_dfkd.teacher_host import TeacherHost
from fed_dfkd.data import dataset_info
from fed_dfkd.coordinator import build_pseudo_generator, build_student

from tests.unit.test_teachers import CONFIG_YAML


def _bn_model(channels: int = 3) -> nn.Module:
    model = nn.Sequential(nn.BatchNorm2d(channels))
    model.eval()
    return model


def _class_stats(x: torch.Tensor, rows: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.full((classes, x.shape[1]), float("nan"))
    variances = torch.full((classes, x.shape[1]), float("nan"))
    for k in range(classes):
        chosen = rows == k
        if chosen.any():
            var, mean = torch.var_mean(x[chosen], dim=(0, 2, 3), correction=0)
            means[k], variances[k] = mean, var
    return means, variances


# --------------------------------------------------------------------------------------------
# The loss


def test_exact_class_statistics_give_zero_and_a_shift_costs_its_row_share() -> None:
    torch.manual_seed(0)
    model = _bn_model()
    x = torch.randn(10, 3, 4, 4)
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    means, variances = _class_stats(x, rows, 3)
    with BatchNormStatistics(model, class_targets={"0": (means, variances)}, row_classes=rows) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(0.0, abs=1e-5)
    shifted = means.clone()
    shifted[1] += torch.tensor([0.3, 0.0, 0.4])  # ‖δ‖ = 0.5 on class 1's 6 of 10 rows
    with BatchNormStatistics(model, class_targets={"0": (shifted, variances)}, row_classes=rows) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(0.6 * 0.5, abs=1e-5)


def test_the_batch_as_a_whole_is_not_what_is_matched() -> None:
    """Two classes whose statistics average to the running ones: the global prior is satisfied
    by a batch of either class's mix, the per-class one only by each class looking like itself."""
    torch.manual_seed(1)
    model = _bn_model(1)
    x = torch.cat([torch.full((4, 1, 2, 2), -1.0), torch.full((4, 1, 2, 2), 1.0)])
    model[0].running_mean.fill_(0.0)
    model[0].running_var.fill_(1.0)
    means = torch.tensor([[-1.0], [1.0]])
    variances = torch.zeros(2, 1)
    right = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    swapped = 1 - right
    with BatchNormStatistics(model) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(0.0, abs=1e-6)
    with BatchNormStatistics(model, class_targets={"0": (means, variances)}, row_classes=right) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(0.0, abs=1e-6)
    with BatchNormStatistics(model, class_targets={"0": (means, variances)}, row_classes=swapped) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(2.0, abs=1e-6)  # every row 2 from its class mean


def test_classes_with_one_row_or_no_target_fall_back_to_the_running_statistics() -> None:
    torch.manual_seed(2)
    model = _bn_model()
    model[0].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model[0].running_var.copy_(torch.tensor([0.9, 1.1, 1.3]))
    x = torch.randn(4, 3, 4, 4)
    rows = torch.tensor([0, 1, 2, 2])  # classes 0 and 1: one row each; class 2 has no target
    means, variances = _class_stats(x, rows, 3)
    means[2], variances[2] = float("nan"), float("nan")
    with BatchNormStatistics(model) as plain:
        model(x)
        expected = float(plain.loss())
    with BatchNormStatistics(model, class_targets={"0": (means, variances)}, row_classes=rows) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(expected, rel=1e-6)


def test_standardized_gaps_use_each_class_own_spread() -> None:
    model = _bn_model(1)
    x = torch.tensor([0.0, 2.0, 10.0, 14.0]).reshape(4, 1, 1, 1)
    rows = torch.tensor([0, 0, 1, 1])
    # Class 0 rows: mean 1, var 1; class 1: mean 12, var 4. Targets: mean 0 var 1, mean 12 var 4.
    means, variances = torch.tensor([[0.0], [12.0]]), torch.tensor([[1.0], [4.0]])
    with BatchNormStatistics(model, class_targets={"0": (means, variances)}, row_classes=rows,
                             scale="standardized") as bn:
        model(x)
        eps = model[0].eps
        assert float(bn.loss()) == pytest.approx(0.5 * (1.0 / math.sqrt(1 + eps)), rel=1e-5)


def test_gradients_reach_the_input_and_bad_targets_are_named() -> None:
    model = _bn_model()
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    targets = {"0": (torch.zeros(2, 3), torch.ones(2, 3))}
    with BatchNormStatistics(model, class_targets=targets, row_classes=rows) as bn:
        model(x)
        bn.loss().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"class_targets\['0'\]"):
        BatchNormStatistics(model, class_targets={"0": (torch.zeros(3), torch.ones(3))}, row_classes=rows)
    with pytest.raises(ValueError, match="not normalisation layers"):
        BatchNormStatistics(model, class_targets={"nope": (torch.zeros(2, 3), torch.ones(2, 3))},
                            row_classes=rows)
    with pytest.raises(ValueError, match="go together"):
        BatchNormStatistics(model, class_targets=targets)


# --------------------------------------------------------------------------------------------
# The owner's statistics


def test_class_statistics_are_what_batchnorm_records_on_each_class_alone() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    images = torch.rand(25, 1, 6, 6)
    model(images)
    labels = torch.tensor([0] * 10 + [2] * 15)
    stats = class_feature_statistics(model, images, labels, num_classes=3, batch_size=7)
    assert stats["counts"] == [10, 0, 15]
    mean, var = stats["layers"]["1"]["mean"], stats["layers"]["1"]["var"]
    with torch.no_grad():
        features = model[0](images)
    for k in (0, 2):
        expected_var, expected_mean = torch.var_mean(features[labels == k], dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean[k], expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var[k], expected_var, rtol=1e-4, atol=1e-6)
    assert bool(torch.isnan(mean[1]).all()) and bool(torch.isnan(var[1]).all())


# --------------------------------------------------------------------------------------------
# From pretraining to the owner


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("config") / "c.yaml"
    path.write_text(CONFIG_YAML + "method:\n  generator_latents: round\n  generator_reset: true\n"
                    "distill:\n  pseudo_batches: 1\n")
    cfg = load_config(path)
    out = tmp_path_factory.mktemp("run")
    manifests = pretrain_teachers(cfg, out)
    return cfg, out, manifests


def test_pretraining_stores_them_and_loading_attaches_them(teachers) -> None:
    cfg, out, manifests = teachers
    model, manifest = load_teacher(teacher_path(out, 0))
    targets = model.class_feature_targets
    assert targets and all(name in dict(model.named_modules()) for name in targets)
    for mean, var in targets.values():
        assert mean.shape[0] == manifest.num_classes
        seen = torch.tensor(manifest.class_histogram) > 0
        assert bool(torch.isfinite(mean[seen]).all()) and bool(torch.isnan(mean[~seen]).all())


def test_a_teacher_file_from_before_gets_them_when_the_method_asks(teachers, caplog) -> None:
    cfg, out, _ = teachers
    path = teacher_path(out, 1)
    saved = torch.load(path, weights_only=True)
    kept = saved.pop("class_feature_statistics")
    torch.save(saved, path)
    assert not load_teacher(path)[0].class_feature_targets
    pretrain_teachers(cfg, out)  # the method does not ask: the file stays as it is
    assert "class_feature_statistics" not in torch.load(path, weights_only=True)
    from dataclasses import replace

    asking = replace(cfg, method=replace(cfg.method, bn_statistics_per_class=True))
    with caplog.at_level("INFO"):
        pretrain_teachers(asking, out)
    assert "per-class feature statistics added" in caplog.text
    again = torch.load(path, weights_only=True)["class_feature_statistics"]
    for name, entry in kept["layers"].items():
        torch.testing.assert_close(again["layers"][name]["mean"], entry["mean"], equal_nan=True)


def test_an_owner_fits_with_them_and_refuses_to_start_without(teachers) -> None:
    cfg, out, _ = teachers
    from dataclasses import replace

    asking = replace(cfg, method=replace(cfg.method, bn_statistics_per_class=True))
    info = dataset_info(cfg.data.dataset)
    teacher, manifest = load_teacher(teacher_path(out, 0))
    host = TeacherHost(asking, teacher, manifest, info)
    assert host.teacher.class_feature_targets
    teacher.class_feature_targets = {}
    with pytest.raises(UserError, match="per-class"):
        TeacherHost(asking, teacher, manifest, info)


def test_the_generator_step_lowers_the_per_class_objective(teachers) -> None:
    cfg, out, _ = teachers
    from dataclasses import replace

    method = replace(cfg.method, bn_statistics_per_class=True, bn_statistics_weight=1.0, one_hot_weight=0.0,
                     adversarial_weight=0.0, class_balance_weight=0.0, generator_steps=1)
    cfg = replace(cfg, method=method)
    info = dataset_info(cfg.data.dataset)
    teacher, _ = load_teacher(teacher_path(out, 0))
    generator = build_pseudo_generator(cfg, info)
    student = build_student(cfg, info)
    synthesizer = build_synthesizer(method, cfg.curriculum, batch_size=32, teacher_feature_dim=teacher.feature_dim,
                                    student_feature_dim=student.feature_dim, seed=0)
    optimizer = build_generator_optimizer(generator, method)
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(32, generator.latent_dim, generator=rng)
    y = torch.arange(32) % 2
    losses = [synthesizer.step(teacher=teacher, student=student, generator=generator, optimizer=optimizer,
                               progress=Progress(fraction=0.0, round=0), rng=rng, latents=(z, y)).loss
              for _ in range(15)]
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("extra, field", [
    ("method:\n  bn_statistics_per_class: true\n", "method.bn_statistics_per_class"),
])
def test_it_needs_assigned_classes(tmp_path: Path, extra: str, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG_YAML + extra)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*generator_latents"):
        load_config(path)
