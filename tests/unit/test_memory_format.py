"""``runtime.memory_format``: classifiers laid out channels_last compute what contiguous ones do,
keep their layout through a state dict, travel on the wire in the logical order; every place that
holds a teacher or the student applies the run's setting, and it is a runtime choice (outside the
resume key), with no process-wide state."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from fed_dfkd.centralized import CentralDistillation
from fed_dfkd.config import ExperimentConfig, config_from_dict
from fed_dfkd.coordinator import build_student
from fed_dfkd.data import dataset_info
from fed_dfkd.data.teachers import TeacherManifest
from fed_dfkd.models import build_classifier, to_memory_format
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.runtime import resume_key
from fed_dfkd.teacher_host import TeacherHost
from fed_dfkd.transport.codec import _tensors_from_record, _tensors_to_record

CASES = [("cnn_digits_bn", 1, 8), ("lenet5_bn", 1, 28), ("wrn16_2", 1, 28), ("resnet18", 3, 32)]


def build(name: str, channels: int, size: int, fmt: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return to_memory_format(build_classifier(name, num_classes=10, in_channels=channels, image_size=size), fmt)


def is_nhwc(model: torch.nn.Module) -> bool:
    """Every conv weight NHWC, and one that is not also NCHW (a 1-channel input conv is both)."""
    weights = conv_weights(model)
    return (bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
            and any(not w.is_contiguous() for w in weights))


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("name,channels,size", CASES)
def test_channels_last_computes_what_contiguous_does(name, channels, size):
    plain = build(name, channels, size, "contiguous").eval()
    nhwc = build(name, channels, size, "channels_last").eval()
    assert all(w.is_contiguous() for w in conv_weights(plain))
    assert is_nhwc(nhwc)
    # Same seed, same values: only the layout differs.
    for a, b in zip(plain.state_dict().values(), nhwc.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_a, features_a = plain.forward_features(x)
        logits_b, features_b = nhwc.forward_features(x)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features_b, features_a, rtol=1e-4, atol=1e-4)


def test_training_steps_agree_to_float_rounding():
    models = [build("cnn_digits_bn", 1, 8, fmt) for fmt in ("contiguous", "channels_last")]
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 10
    for model in models:
        # SGD: its step is linear in the gradient (Adam divides near-zero gradients by their own
        # size, so a rounding difference there becomes a step-sized one).
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_a_state_dict_loads_across_layouts_and_keeps_the_target_layout():
    plain = build("cnn_digits_bn", 1, 8, "contiguous")
    torch.manual_seed(5)
    source = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    nhwc = build("cnn_digits_bn", 1, 8, "channels_last")
    nhwc.load_state_dict(source.state_dict())
    assert is_nhwc(nhwc)
    for a, b in zip(nhwc.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    plain.load_state_dict(source.state_dict())
    source_nhwc = source.to(memory_format=torch.channels_last)
    plain.load_state_dict(source_nhwc.state_dict())
    for a, b in zip(plain.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)


def test_channels_last_weights_travel_in_logical_order():
    nhwc = build("cnn_digits_bn", 1, 8, "channels_last")
    state = nhwc.state_dict()
    decoded = _tensors_from_record({"student": _tensors_to_record(state, dtype=None)}, "student")
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(decoded[name], tensor), name


def digits_config(fmt: str) -> ExperimentConfig:
    return config_from_dict({"models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
                             "runtime": {"memory_format": fmt}})


def digits_teacher() -> tuple[NormalizedClassifier, TeacherManifest]:
    info = dataset_info("digits")
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    manifest = TeacherManifest(
        architecture="cnn_digits_bn", num_classes=10, in_channels=1, image_size=8, mean=list(info.mean),
        std=list(info.std), class_names=[str(c) for c in range(10)], dataset="digits", partition_id=0,
        num_clients=1, train_size=10, class_histogram=[1] * 10, test_accuracy=0.5, config_hash="x",
        created_at="2026-12-07", wall_seconds=0.0)
    return NormalizedClassifier(net, info.mean, info.std), manifest


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_every_holder_of_a_model_applies_the_runs_setting(fmt):
    cfg, info = digits_config(fmt), dataset_info("digits")
    teacher, manifest = digits_teacher()
    host = TeacherHost(cfg, teacher, manifest, info)
    central = CentralDistillation(cfg, [digits_teacher()[0]], info, teacher_weights=[[1.0] * 10])
    models = {"student": build_student(cfg, info), "owner's teacher": host.teacher,
              "owner's student": host.student, "central teacher": central.teachers[0]}
    for name, model in models.items():
        assert is_nhwc(model) == (fmt == "channels_last"), name


def test_the_setting_leaves_no_process_state_behind():
    build_student(digits_config("channels_last"), dataset_info("digits"))
    assert not is_nhwc(build_student(digits_config("contiguous"), dataset_info("digits")))
    assert not is_nhwc(build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8))


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        to_memory_format(torch.nn.Conv2d(1, 2, 3), "nhwc")


def test_the_memory_format_is_outside_the_resume_key():
    cfg = ExperimentConfig()
    other = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, memory_format="channels_last"))
    assert resume_key(other) == resume_key(cfg)


def test_the_config_offers_exactly_the_layouts_the_models_know():
    from fed_dfkd.config import RuntimeConfig
    from fed_dfkd.models import MEMORY_FORMATS

    allowed = typing.get_args(typing.get_type_hints(RuntimeConfig)["memory_format"])
    assert set(allowed) == set(MEMORY_FORMATS)
