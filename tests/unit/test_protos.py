"""The wire schema: generated code is fresh, versioned, and its field numbers are pinned."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from fed_dfkd.proto.v1 import client_report_pb2, refusal_pb2, round_spec_pb2, teacher_manifest_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos" / "fed_dfkd" / "proto" / "v1"
GENERATED_DIR = REPO_ROOT / "fed_dfkd" / "proto" / "v1"
MODULES = (round_spec_pb2, client_report_pb2, refusal_pb2, teacher_manifest_pb2)

# Messages sent on their own (as ConfigRecord bytes); anything else must be embedded in one.
WIRE_MESSAGES = {"RoundSpec", "ClientReport", "Refusal", "TeacherManifest"}

# Field numbers are part of the wire format: changing one breaks every peer. Adding a field adds
# a line here; a removed field stays here (and in the .proto's `reserved`).
PINNED_FIELD_NUMBERS = {
    "PrivacySpec": {
        "level": 1, "generator_clip": 2, "logit_clip": 3, "noise_multiplier": 4, "delta": 5,
    },
    "RoundSpec": {
        "protocol_version": 1, "round": 2, "total_rounds": 3, "progress": 4, "mode": 5,
        "method": 6, "config_hash": 7, "generator_steps": 8, "batch_size": 9, "seed": 10,
        "adversarial_weight": 11, "negative_window_start": 12, "privacy": 13,
        "update_dtype": 14, "logit_dtype": 15, "sample_transport": 16, "sample_batches": 17, "run_key": 18,
    },
    "ClientReport": {
        "protocol_version": 1, "round": 2, "partition_id": 3, "train_size": 4,
        "class_histogram": 5, "metrics": 6, "epsilon": 7, "delta": 8, "update_norm": 9,
        "seconds": 10, "teacher_hash": 11,
    },
    "Refusal": {
        "protocol_version": 1, "round": 2, "reason": 3, "message": 4, "epsilon_spent": 5,
        "epsilon_budget": 6,
    },
    "TeacherManifest": {
        "protocol_version": 1, "architecture": 2, "num_classes": 3, "in_channels": 4,
        "image_height": 5, "image_width": 6, "dataset": 7, "hash": 8, "test_accuracy": 9,
        "class_histogram": 10, "train_size": 11,
    },
}


def _top_level_messages():
    for module in MODULES:
        yield from module.DESCRIPTOR.message_types_by_name.values()


def _all_enums():
    for module in MODULES:
        yield from module.DESCRIPTOR.enum_types_by_name.values()
        for message in module.DESCRIPTOR.message_types_by_name.values():
            yield from message.enum_types


def test_regenerating_gives_the_committed_files_byte_for_byte(tmp_path):
    proto_files = sorted(p.relative_to(REPO_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    assert proto_files, "no .proto files found"
    # The command of scripts/gen_protos.sh, with the output into a temporary folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", *proto_files],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
    )
    fresh_dir = tmp_path / "fed_dfkd" / "proto" / "v1"
    fresh = sorted(p.name for p in fresh_dir.iterdir())
    committed = sorted(p.name for p in GENERATED_DIR.glob("*_pb2.py*"))
    assert fresh == committed, "generated files differ from the .proto list: run scripts/gen_protos.sh"
    for name in fresh:
        assert (fresh_dir / name).read_bytes() == (GENERATED_DIR / name).read_bytes(), (
            f"{name} is stale: run scripts/gen_protos.sh"
        )


def test_generated_code_comes_from_the_pinned_generator():
    for module in MODULES:
        header = Path(module.__file__).read_text().splitlines()[:6]
        assert any(re.fullmatch(r"# Protobuf Python Version: 6\.33\.\d+", line) for line in header), header


def test_regenerate_script_runs_the_documented_command_and_package_is_importable():
    script = REPO_ROOT / "scripts" / "gen_protos.sh"
    assert script.stat().st_mode & 0o111, "scripts/gen_protos.sh must be executable"
    assert ("-m grpc_tools.protoc -I protos --python_out=. --pyi_out=. "
            "protos/fed_dfkd/proto/v1/*.proto") in script.read_text()
    assert (REPO_ROOT / "fed_dfkd" / "proto" / "__init__.py").is_file()
    assert (GENERATED_DIR / "__init__.py").is_file()


def test_every_file_is_in_the_v1_package_and_states_the_field_number_rule():
    for module in MODULES:
        assert module.DESCRIPTOR.package == "fed_dfkd.proto.v1"
    for path in PROTO_DIR.glob("*.proto"):
        text = path.read_text()
        assert "package fed_dfkd.proto.v1;" in text
        assert "never reused" in text, f"{path.name} must state that field numbers are never reused"


def test_every_wire_message_carries_protocol_version_as_field_one():
    found = set()
    for message in _top_level_messages():
        if message.name not in WIRE_MESSAGES:
            continue
        found.add(message.name)
        field = message.fields_by_number[1]
        assert field.name == "protocol_version"
        assert field.type == FieldDescriptor.TYPE_UINT32
    assert found == WIRE_MESSAGES


def test_messages_without_a_version_are_only_embedded_in_versioned_ones():
    embedded_types = {
        field.message_type.name
        for message in _top_level_messages()
        if message.name in WIRE_MESSAGES
        for field in message.fields
        if field.message_type is not None and not field.message_type.GetOptions().map_entry
    }
    for message in _top_level_messages():
        if message.name not in WIRE_MESSAGES:
            assert message.name in embedded_types, f"{message.name} is neither a wire message nor embedded"


def test_field_numbers_are_pinned():
    actual = {
        message.name: {field.name: field.number for field in message.fields}
        for message in _top_level_messages()
    }
    assert actual == PINNED_FIELD_NUMBERS


def test_every_enum_has_an_unspecified_zero_value():
    for enum in _all_enums():
        zero = enum.values_by_number[0].name
        assert zero.endswith("UNSPECIFIED"), f"{enum.full_name}'s zero value is {zero}"


def test_optional_fields_distinguish_unset_from_zero():
    report = client_report_pb2.ClientReport(protocol_version=1)
    assert not report.HasField("epsilon")
    report.epsilon = 0.0
    assert report.HasField("epsilon")
    manifest = teacher_manifest_pb2.TeacherManifest(protocol_version=1)
    assert not manifest.HasField("test_accuracy")


@pytest.mark.parametrize("message_type", [
    round_spec_pb2.RoundSpec, client_report_pb2.ClientReport, refusal_pb2.Refusal,
    teacher_manifest_pb2.TeacherManifest,
])
def test_a_newer_peer_unknown_field_survives_a_parse(message_type):
    # Forward compatibility: field 999 (varint 5) from a later schema is kept, not an error.
    data = message_type(protocol_version=1).SerializeToString() + bytes([0xB8, 0x3E, 0x05])
    parsed = message_type.FromString(data)
    assert parsed.protocol_version == 1
    assert parsed.SerializeToString() == data
