"""``runtime.memory_format``: classifiers built in channels_last compute what contiguous ones do,
keep their layout through a state dict, travel on the wire in the logical order, and the setting
is a runtime choice (applied by resolve_device, outside the resume key)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fed_dfkd.config import ExperimentConfig, RuntimeConfig
from fed_dfkd.models import build_classifier
from fed_dfkd.models.registries import memory_format, set_memory_format
from fed_dfkd.runtime import resolve_device, resume_key
from fed_dfkd.transport.codec import _tensors_from_record, _tensors_to_record

CASES = [("cnn_digits_bn", 1, 8), ("lenet5_bn", 1, 28), ("wrn16_2", 1, 28), ("resnet18", 3, 32)]


@pytest.fixture(autouse=True)
def contiguous_afterwards():
    yield
    set_memory_format("contiguous")


def build(name: str, channels: int, size: int, fmt: str) -> torch.nn.Module:
    set_memory_format(fmt)
    torch.manual_seed(0)
    return build_classifier(name, num_classes=10, in_channels=channels, image_size=size)


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("name,channels,size", CASES)
def test_channels_last_computes_what_contiguous_does(name, channels, size):
    plain = build(name, channels, size, "contiguous").eval()
    nhwc = build(name, channels, size, "channels_last").eval()
    assert all(w.is_contiguous() for w in conv_weights(plain))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc))
    # (a 1-channel input conv is both layouts at once; the others are NHWC only)
    assert any(not w.is_contiguous() for w in conv_weights(nhwc))
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
    set_memory_format("channels_last")
    nhwc = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    nhwc.load_state_dict(plain.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc))
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


def test_resolve_device_applies_the_setting_for_the_process():
    resolve_device(RuntimeConfig(memory_format="channels_last"))
    assert memory_format() == "channels_last"
    resolve_device(RuntimeConfig())
    assert memory_format() == "contiguous"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        set_memory_format("nhwc")
    assert memory_format() == "contiguous"


def test_the_memory_format_is_outside_the_resume_key():
    cfg = ExperimentConfig()
    other = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, memory_format="channels_last"))
    assert resume_key(other) == resume_key(cfg)
