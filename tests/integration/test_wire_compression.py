"""What travels per round, and what it would cost as the straightforward float32 exchange.

- ``sample_transport: seed`` sends no pixels: each client regenerates the round's samples from
  the G it receives; with float32 weights the run is bit-identical to sending the pixels;
- ``measure_float32_baseline`` serialises the same rounds as float32 G, S and images down and
  float32 ΔG and logits up, in the same run, and reports both byte counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_dfkd.cli.main import main
from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import dataset_info
from runhelpers import QUICKSTART, load_checkpoint, read_metrics, read_report, set_args, tiny

pytestmark = pytest.mark.integration

FAST = tiny()


def simulate(out: Path, teachers: Path, *overrides: str) -> dict:
    argv = ["simulate", "--config", str(QUICKSTART), "--out", str(out), "--teachers", str(teachers),
            *set_args([*FAST, *overrides])]
    assert main(argv) == 0
    return read_report(out)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST)]) == 0
    return out


def test_seeded_samples_give_the_pixel_run_bit_for_bit_with_fewer_bytes(tmp_path, teachers):
    pixels = simulate(tmp_path / "pixels", teachers)
    seeded = simulate(tmp_path / "seed", teachers, "federation.sample_transport=seed")
    a = load_checkpoint(tmp_path / "pixels")["server"]["coordinator"]
    b = load_checkpoint(tmp_path / "seed")["server"]["coordinator"]
    for part in ("student", "generator"):
        for name, tensor in a[part].items():
            assert torch.equal(b[part][name], tensor), f"{part}.{name}"
    assert seeded["bytes_up"] == pixels["bytes_up"]
    # 2 rounds x 3 clients x 2 batches x 32 samples x 64 uint8 pixels no longer go down (the
    # spec grows by two small fields per message).
    saved = pixels["bytes_down"] - seeded["bytes_down"]
    assert 2 * 3 * (2 * 32 * 64 - 16) <= saved <= 2 * 3 * 2 * 32 * 64
    assert [m["student_accuracy"] for m in read_metrics(tmp_path / "seed")] == \
        [m["student_accuracy"] for m in read_metrics(tmp_path / "pixels")]


def test_float16_weights_with_seeded_samples_still_agree_on_every_sample(tmp_path, teachers):
    report = simulate(tmp_path / "f16", teachers, "federation.sample_transport=seed",
                      "federation.state_dtype=float16", "federation.update_dtype=float16")
    assert report["status"] == "completed" and report["rejected_replies"] == 0
    assert report["state_dtype"] == "float16" and report["sample_transport"] == "seed"


def test_the_float32_baseline_is_measured_on_serialised_messages_in_the_same_run(tmp_path, teachers):
    report = simulate(tmp_path / "both", teachers, "federation.measure_float32_baseline=true",
                      "federation.sample_transport=seed", "federation.state_dtype=float16",
                      "federation.update_dtype=float16")
    cfg = load_config(QUICKSTART, FAST)
    info = dataset_info("digits")
    floats = lambda m: sum(v.numel() for v in m.state_dict().values() if v.is_floating_point())
    g, s = floats(build_pseudo_generator(cfg, info)), floats(build_student(cfg, info))
    n = 2 * 32  # samples per round
    tensor_bytes_down = 4 * (g + s + n * 64)
    tensor_bytes_up = 4 * (g + n * 10)
    per_client = report["float32_baseline_bytes_per_client_round"]
    expected = tensor_bytes_down + tensor_bytes_up
    # Serialisation adds names, array headers and the small protobuf messages: under 5 %.
    assert expected <= per_client <= expected * 1.05
    actual = report["bytes_per_client_round"]
    assert report["bytes_reduction_vs_float32"] == pytest.approx(per_client / actual, rel=1e-9)
    assert report["bytes_reduction_vs_float32"] > 1.5  # tiny rounds; bench/ has the real ones
    assert all("baseline_bytes" in m for m in read_metrics(tmp_path / "both"))


def test_a_reset_generator_is_built_by_the_owners_not_sent_and_the_baseline_still_counts_it(
        tmp_path, teachers):
    pool = ["method.generator_reset=true", "method.generator_latents=round", "distill.pseudo_batches=1",
            "distill.replay_rounds=100", "distill.replay_sampling=samples",
            "federation.measure_float32_baseline=true"]
    report = simulate(tmp_path / "reset", teachers, *pool)
    assert report["status"] == "completed" and report["rejected_replies"] == 0
    cfg = load_config(QUICKSTART, [*FAST, *pool])
    info = dataset_info("digits")
    floats = lambda m: sum(v.numel() for v in m.state_dict().values() if v.is_floating_point())
    g, s = floats(build_pseudo_generator(cfg, info)), floats(build_student(cfg, info))
    n = 32  # one batch per round
    # Down: S (float32) and the uint8 pixels; G's weights are not on the wire.
    down = report["bytes_down"] / (2 * 3)
    assert 4 * s + n * 64 <= down <= (4 * s + n * 64) * 1.1 < 4 * g
    # The plain exchange it is measured against sends G down and float32 pixels.
    assert report["float32_baseline_bytes_per_client_round"] >= 4 * (2 * g + s + n * 64 + n * 10)
