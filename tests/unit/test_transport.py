"""Transport: codec round trips, strict decoding, reply validation, the allowed-payload list and
message builders."""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fed_dfkd.proto.v1 import client_report_pb2, refusal_pb2, round_spec_pb2, teacher_manifest_pb2
from fed_dfkd.protocol import (
    PROTOCOL_VERSION,
    REFUSAL_REASONS,
    ClientReportData,
    ClientUpdate,
    PrivacySpecData,
    RefusalData,
    RoundInstruction,
    RoundSpecData,
    TeacherManifestData,
)
from fed_dfkd.transport import codec, keys
from fed_dfkd.transport.codec import (
    SERVER_NODE_ID,
    client_report_from_proto,
    client_report_to_proto,
    instruction_from_recorddict,
    instruction_to_recorddict,
    make_message,
    manifest_from_proto,
    manifest_to_proto,
    recorddict_num_bytes,
    refusal_from_proto,
    refusal_to_proto,
    refusal_to_recorddict,
    reply_to,
    round_spec_from_proto,
    round_spec_to_proto,
    update_from_recorddict,
    update_to_recorddict,
)
from fed_dfkd.transport.validation import (
    InvalidMessage,
    check_payload_keys,
    generator_update_shapes,
    update_l2_norm,
    validate_update,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES, NUM_CLASSES = 6, 4


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(**overrides) -> RoundSpecData:
    values = dict(
        round=3, total_rounds=10, progress=0.3, mode="generator_and_logits", method="adadfkd",
        config_hash="c0ffee", generator_steps=5, batch_size=NUM_SAMPLES, seed=2**62 + 7,
        adversarial_weight=0.75, negative_window_start=0.125,
    )
    values.update(overrides)
    return RoundSpecData(**values)


def _generator_state() -> dict[str, torch.Tensor]:
    # Deliberately not in sorted order: the wire must keep the dict's order.
    g = _rng(1)
    return {
        "z.weight": torch.randn(3, 2, generator=g),
        "a.bias": torch.randn(3, generator=g),
        "bn.num_batches_tracked": torch.tensor(12),
        "bn.running_mean": torch.randn(3, generator=g),
    }


def _instruction(**overrides) -> RoundInstruction:
    spec = _spec(**overrides)
    return RoundInstruction(
        **{f.name: getattr(spec, f.name) for f in dataclasses.fields(RoundSpecData)},
        generator_state=_generator_state(),
        student_state={"fc.weight": torch.randn(4, 5, generator=_rng(2)),
                       "conv.weight": torch.randn(2, 1, 3, 3, generator=_rng(3))},
        samples=torch.randint(0, 256, (NUM_SAMPLES, 1, 8, 8), dtype=torch.uint8, generator=_rng(4)),
    )


def _report(**overrides) -> ClientReportData:
    values = dict(
        round=3, partition_id=2, train_size=123, class_histogram=(40, 0, 50, 33),
        metrics={"bn_statistics": 0.5, "adversarial": -1.25, "one_hot": 2.0},
        update_norm=1.5, seconds=0.25, teacher_hash="abc123",
    )
    values.update(overrides)
    return ClientReportData(**values)


def _manifest(**overrides) -> TeacherManifestData:
    values = dict(
        architecture="lenet5", num_classes=NUM_CLASSES, in_channels=1, image_height=8,
        image_width=8, dataset="digits", hash="abc123", test_accuracy=0.91,
        class_histogram=(40, 0, 50, 33), train_size=123,
    )
    values.update(overrides)
    return TeacherManifestData(**values)


def _delta() -> dict[str, torch.Tensor]:
    g = _rng(5)
    return {name: torch.randn(tuple(shape), generator=g) * 0.01
            for name, shape in generator_update_shapes(_generator_state()).items()}


def _update(**overrides) -> ClientUpdate:
    values = dict(
        generator_delta=_delta(),
        logits=torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=_rng(6)) * 5,
        report=_report(),
    )
    values.update(overrides)
    return ClientUpdate(**values)


def _validate(update: ClientUpdate, **overrides) -> float:
    kwargs = dict(
        expected_round=3, num_samples=NUM_SAMPLES, num_classes=NUM_CLASSES,
        generator_shapes=generator_update_shapes(_generator_state()), max_update_norm=10.0,
    )
    kwargs.update(overrides)
    return validate_update(update, **kwargs)


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def _with_record(content: RecordDict, name: str, record) -> RecordDict:
    content = copy.deepcopy(content)
    content[name] = record
    return content


# --- domain objects -----------------------------------------------------------------------------


def test_protocol_module_does_not_import_flower():
    tree = ast.parse((REPO_ROOT / "fed_dfkd" / "protocol.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "flwr" not in imported and "google" not in imported


def test_instruction_spec_is_its_scalar_part_and_instructions_compare_by_identity():
    instruction = _instruction()
    assert instruction.spec == _spec()
    assert type(instruction.spec) is RoundSpecData
    assert instruction == instruction and instruction != _instruction()


@pytest.mark.parametrize("bad", [
    dict(mode="generator_only"), dict(update_dtype="bfloat16"), dict(progress=1.5),
    dict(round=-1), dict(seed=-3),
])
def test_spec_rejects_values_outside_the_protocol(bad):
    with pytest.raises(ValueError):
        _spec(**bad)


def test_domain_objects_are_frozen_and_normalise_sequences():
    report = _report(class_histogram=[1, 2, 3, 4])
    assert report.class_histogram == (1, 2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.round = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="reason"):
        RefusalData(round=0, reason="tired")
    with pytest.raises(ValueError, match="privacy.level"):
        PrivacySpecData(level="record")


# --- protobuf round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("privacy", [
    None,
    PrivacySpecData(level="local", generator_clip=1.5, logit_clip=2.0, noise_multiplier=0.8, delta=1e-5),
])
def test_round_spec_round_trips_through_bytes(privacy):
    spec = _spec(privacy=privacy, mode="logits_only", update_dtype="float16", logit_dtype="float32")
    data = round_spec_to_proto(spec).SerializeToString()
    decoded = round_spec_from_proto(round_spec_pb2.RoundSpec.FromString(data))
    assert decoded == spec
    assert decoded.seed == 2**62 + 7  # the 63-bit derived seeds fit uint64 exactly


def test_round_spec_from_an_instruction_leaves_the_tensors_out():
    message = round_spec_to_proto(_instruction())
    assert round_spec_from_proto(message) == _spec()


@pytest.mark.parametrize("epsilon, delta", [(None, None), (0.0, 1e-5), (3.25, 1e-6)])
def test_client_report_round_trips_and_keeps_unset_privacy_apart_from_zero(epsilon, delta):
    report = _report(epsilon=epsilon, delta=delta)
    data = client_report_to_proto(report).SerializeToString()
    decoded = client_report_from_proto(client_report_pb2.ClientReport.FromString(data))
    assert decoded == report
    assert decoded.epsilon == epsilon and decoded.delta == delta


@pytest.mark.parametrize("reason", REFUSAL_REASONS)
def test_refusal_round_trips_for_every_reason(reason):
    refusal = RefusalData(round=7, reason=reason, message="spent", epsilon_spent=4.5, epsilon_budget=4.0)
    data = refusal_to_proto(refusal).SerializeToString()
    assert refusal_from_proto(refusal_pb2.Refusal.FromString(data)) == refusal


@pytest.mark.parametrize("accuracy", [None, 0.0, 0.875])
def test_manifest_round_trips(accuracy):
    manifest = _manifest(test_accuracy=accuracy)
    data = manifest_to_proto(manifest).SerializeToString()
    assert manifest_from_proto(teacher_manifest_pb2.TeacherManifest.FromString(data)) == manifest


@pytest.mark.parametrize("to_proto, from_proto, obj", [
    (round_spec_to_proto, round_spec_from_proto, _spec(protocol_version=2)),
    (client_report_to_proto, client_report_from_proto, _report(protocol_version=2)),
    (refusal_to_proto, refusal_from_proto, RefusalData(protocol_version=2, round=0, reason="bad_request")),
    (manifest_to_proto, manifest_from_proto, _manifest(protocol_version=2)),
])
def test_every_decoder_rejects_another_protocol_version(to_proto, from_proto, obj):
    with pytest.raises(InvalidMessage, match=r"protocol_version 2 != 1"):
        from_proto(to_proto(obj))
    missing = to_proto(obj)
    missing.protocol_version = 0
    with pytest.raises(InvalidMessage, match="protocol_version is missing"):
        from_proto(missing)


def test_unknown_or_unset_enum_values_are_rejected_by_name():
    message = round_spec_to_proto(_spec())
    message.mode = 7  # a value from a schema this side does not know
    with pytest.raises(InvalidMessage, match=r"round_spec\.mode has unknown value 7"):
        round_spec_from_proto(message)
    message.mode = round_spec_pb2.RoundSpec.MODE_UNSPECIFIED
    with pytest.raises(InvalidMessage, match=r"round_spec\.mode is unset"):
        round_spec_from_proto(message)
    refusal = refusal_to_proto(RefusalData(round=0, reason="bad_request"))
    refusal.reason = refusal_pb2.Refusal.REASON_UNSPECIFIED
    with pytest.raises(InvalidMessage, match=r"refusal\.reason is unset"):
        refusal_from_proto(refusal)


def test_decoded_values_outside_the_protocol_are_invalid_messages():
    message = round_spec_to_proto(_spec())
    message.progress = 2.0
    with pytest.raises(InvalidMessage, match="round_spec: progress must be in"):
        round_spec_from_proto(message)


# --- instruction records ------------------------------------------------------------------------


def test_instruction_round_trips_keeping_key_order_dtypes_and_values():
    instruction = _instruction()
    content = instruction_to_recorddict(instruction)
    assert set(content) == {"generator", "student", "samples", "spec"}
    assert isinstance(content["spec"]["round_spec"], bytes)
    decoded = instruction_from_recorddict(copy.deepcopy(content))
    assert decoded.spec == instruction.spec
    _assert_same_tensors(decoded.generator_state, instruction.generator_state)
    _assert_same_tensors(decoded.student_state, instruction.student_state)
    assert decoded.samples.dtype == torch.uint8
    assert torch.equal(decoded.samples, instruction.samples)


def test_instruction_state_dtype_casts_floating_weights_only():
    content = instruction_to_recorddict(_instruction(), state_dtype="float16")
    decoded = instruction_from_recorddict(content)
    assert decoded.generator_state["z.weight"].dtype == torch.float16
    assert decoded.generator_state["bn.num_batches_tracked"].dtype == torch.int64
    assert decoded.samples.dtype == torch.uint8


def test_logits_only_instruction_sends_neither_generator_nor_student():
    instruction = dataclasses.replace(
        _instruction(mode="logits_only"), generator_state={}, student_state={}
    )
    content = instruction_to_recorddict(instruction)
    assert set(content) == {"samples", "spec"}
    decoded = instruction_from_recorddict(content)
    assert decoded.mode == "logits_only"
    assert decoded.generator_state == {} and decoded.student_state == {}


def test_a_generator_the_owners_build_themselves_travels_as_an_empty_record():
    content = instruction_to_recorddict(dataclasses.replace(_instruction(), generator_state={}))
    assert "generator" in content and len(content["generator"]) == 0
    decoded = instruction_from_recorddict(content)
    assert decoded.generator_state == {} and decoded.student_state


def test_generator_and_logits_instruction_without_generator_is_rejected():
    content = instruction_to_recorddict(_instruction())
    del content["generator"]
    with pytest.raises(InvalidMessage, match="missing record 'generator'"):
        instruction_from_recorddict(content)


@pytest.mark.parametrize("name, record, message", [
    ("teacher", ArrayRecord({"fc.weight": Array(np.zeros((2, 2), np.float32))}), "unknown record 'teacher'"),
    ("samples", ArrayRecord({"samples": Array(np.zeros((1, 1, 2, 2), np.uint8)),
                             "images": Array(np.zeros((1, 1, 2, 2), np.float32))}),
     r"unknown array name\(s\) images in record 'samples'"),
    ("samples", ArrayRecord({"samples": Array(np.zeros((1, 1, 2, 2), np.float32))}),
     "samples must be uint8"),
    ("samples", ArrayRecord({"samples": Array(np.zeros((4, 4), np.uint8))}), r"uint8 \[N, C, H, W\]"),
    ("spec", MetricRecord({"round": 1}), "record 'spec' must be a ConfigRecord, got MetricRecord"),
    ("spec", ConfigRecord({"round_spec": b"\xff\xff\xff"}), "spec.round_spec is not a valid RoundSpec"),
    ("spec", ConfigRecord({"round_spec": "text"}), "spec.round_spec must be protobuf bytes"),
    ("spec", ConfigRecord({"spec_v2": b""}), "unknown key 'spec_v2' in record 'spec'"),
    ("spec", ConfigRecord({}), "missing key 'round_spec' in record 'spec'"),
])
def test_malformed_instructions_are_rejected_naming_the_problem(name, record, message):
    content = _with_record(instruction_to_recorddict(_instruction()), name, record)
    with pytest.raises(InvalidMessage, match=message):
        instruction_from_recorddict(content)


def test_instruction_with_another_protocol_version_is_rejected():
    content = instruction_to_recorddict(_instruction(protocol_version=PROTOCOL_VERSION + 1))
    with pytest.raises(InvalidMessage, match="round_spec.protocol_version 2 != 1"):
        instruction_from_recorddict(content)


# --- reply records ------------------------------------------------------------------------------


def test_update_round_trips_with_float16_within_half_precision_bounds():
    update = _update(manifest=_manifest())
    content = update_to_recorddict(update, update_dtype="float16")
    decoded = update_from_recorddict(copy.deepcopy(content))
    assert isinstance(decoded, ClientUpdate)
    assert decoded.report == update.report and decoded.manifest == update.manifest
    assert decoded.logits.dtype == torch.float16  # the default logit dtype
    assert list(decoded.generator_delta) == list(update.generator_delta)
    for name, sent in update.generator_delta.items():
        received = decoded.generator_delta[name]
        assert received.dtype == torch.float16
        # Round to nearest in float16 (normal range): relative error at most 2^-11.
        assert torch.all((received.float() - sent).abs() <= sent.abs() * 2**-11 + 2**-24)
    assert torch.all((decoded.logits.float() - update.logits).abs() <= update.logits.abs() * 2**-11)


def test_update_in_float32_is_exact():
    update = _update()
    decoded = update_from_recorddict(
        update_to_recorddict(update, update_dtype="float32", logit_dtype="float32")
    )
    _assert_same_tensors(decoded.generator_delta, update.generator_delta)
    assert torch.equal(decoded.logits, update.logits)
    assert decoded.manifest is None


def test_logits_only_update_has_no_generator_record_and_decodes_to_none():
    content = update_to_recorddict(_update(generator_delta=None))
    assert set(content) == {"logits", "report"}
    decoded = update_from_recorddict(content)
    assert decoded.generator_delta is None
    assert _validate(decoded, generator_shapes=None) == 0.0


def test_refusal_reply_round_trips_with_its_manifest():
    refusal = RefusalData(round=2, reason="incompatible_manifest", message="10 classes, run has 4")
    content = refusal_to_recorddict(refusal, manifest=_manifest(num_classes=10))
    assert update_from_recorddict(content) == refusal
    assert codec.manifest_from_recorddict(content) == _manifest(num_classes=10)


def test_a_reply_with_both_update_and_refusal_is_rejected():
    content = update_to_recorddict(_update())
    content["refusal"] = refusal_to_recorddict(RefusalData(round=3, reason="internal_error"))["refusal"]
    with pytest.raises(InvalidMessage, match="not both"):
        update_from_recorddict(content)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__("teacher_state", ArrayRecord({"w": Array(np.zeros(3, np.float32))})),
     "unknown record 'teacher_state'"),
    (lambda c: c["logits"].__setitem__("features", Array(np.zeros((6, 8), np.float16))),
     r"unknown array name\(s\) features in record 'logits'"),
    (lambda c: c.__delitem__("report"), "missing record 'report'"),
    (lambda c: c.__delitem__("logits"), "missing record 'logits'"),
    (lambda c: c.__setitem__("report", ConfigRecord({"client_report": b"\x0a"})),
     "report.client_report is not a valid ClientReport"),
    (lambda c: c.__setitem__("report", ConfigRecord({"client_report": client_report_to_proto(
        _report(protocol_version=9)).SerializeToString()})),
     "client_report.protocol_version 9 != 1"),
    (lambda c: c.__setitem__("logits", ConfigRecord({"logits": b""})),
     "record 'logits' must be an ArrayRecord, got ConfigRecord"),
])
def test_malformed_replies_are_rejected_naming_the_problem(mutate, message):
    content = update_to_recorddict(_update())
    mutate(content)
    with pytest.raises(InvalidMessage, match=message):
        update_from_recorddict(content)


def test_recorddict_num_bytes_counts_arrays_and_protobuf_bytes_exactly():
    update = _update(generator_delta=None)
    content = update_to_recorddict(update)
    buffer = io.BytesIO()
    np.save(buffer, update.logits.to(torch.float16).numpy(), allow_pickle=False)
    report_bytes = client_report_to_proto(update.report).SerializeToString(deterministic=True)
    expected = (len(buffer.getvalue()) + len("logits")
                + len(report_bytes) + len("client_report"))
    assert recorddict_num_bytes(content) == expected


def test_float16_halves_the_bytes_of_a_large_update():
    big = {"w": torch.randn(256, 256, generator=_rng(7))}
    half = recorddict_num_bytes(update_to_recorddict(_update(generator_delta=big), update_dtype="float16"))
    full = recorddict_num_bytes(update_to_recorddict(_update(generator_delta=big), update_dtype="float32"))
    assert 0.49 < half / full < 0.51


# --- validation ---------------------------------------------------------------------------------


def test_valid_update_passes_and_returns_its_l2_norm():
    delta = {"z.weight": torch.zeros(3, 2), "a.bias": torch.tensor([3.0, 0.0, 0.0]),
             "bn.running_mean": torch.tensor([0.0, 4.0, 0.0], dtype=torch.float16)}
    assert _validate(_update(generator_delta=delta)) == pytest.approx(5.0)
    assert update_l2_norm(delta) == pytest.approx(5.0)


def test_generator_update_shapes_skip_integer_buffers():
    assert generator_update_shapes(_generator_state()) == {
        "z.weight": (3, 2), "a.bias": (3,), "bn.running_mean": (3,)
    }


def _with_delta(**changes) -> dict[str, torch.Tensor]:
    delta = _delta()
    for name, value in changes.items():
        if value is None:
            del delta[name.replace("__", ".")]
        else:
            delta[name.replace("__", ".")] = value
    return delta


def _nan_logits() -> torch.Tensor:
    logits = torch.zeros(NUM_SAMPLES, NUM_CLASSES, dtype=torch.float16)
    logits[2, 1] = math.nan
    return logits


@pytest.mark.parametrize("update, overrides, message", [
    (lambda: _update(report=_report(protocol_version=2)), {}, "protocol_version 2 != expected 1"),
    (lambda: _update(report=_report(round=2)), {}, "reply is for round 2, expected round 3"),
    (lambda: _update(report=_report(class_histogram=(1, 2))), {}, "class_histogram has 2 entries"),
    (lambda: _update(logits=torch.zeros(NUM_SAMPLES, NUM_CLASSES + 1)), {},
     r"logits shape \(6, 5\) != expected \(6, 4\)"),
    (lambda: _update(logits=torch.zeros(NUM_SAMPLES - 1, NUM_CLASSES)), {}, "logits shape"),
    (lambda: _update(logits=torch.zeros(NUM_SAMPLES, NUM_CLASSES, dtype=torch.float64)), {},
     "logits dtype torch.float64 not allowed"),
    (lambda: _update(logits=torch.zeros(NUM_SAMPLES, NUM_CLASSES)), {"expected_logit_dtype": torch.float16},
     "logits dtype torch.float32 not allowed"),
    (lambda: _update(logits=_nan_logits()), {}, r"logits hold 1 non-finite value\(s\)"),
    (lambda: _update(logits=torch.full((NUM_SAMPLES, NUM_CLASSES), 2e4)), {}, "logits magnitude"),
    (lambda: _update(generator_delta=_with_delta(a__bias=torch.full((3,), math.inf))), {},
     r"generator_update\['a.bias'\] holds non-finite values"),
    (lambda: _update(generator_delta=_with_delta(a__bias=torch.zeros(4))), {},
     r"generator_update\['a.bias'\] shape \(4,\) != generator's \(3,\)"),
    (lambda: _update(generator_delta=_with_delta(a__bias=None)), {}, "missing a.bias"),
    (lambda: _update(generator_delta=_with_delta(teacher__fc=torch.zeros(3))), {}, "unknown teacher.fc"),
    (lambda: _update(generator_delta=_with_delta(a__bias=torch.zeros(3, dtype=torch.int64))), {},
     "dtype torch.int64 not allowed"),
    (lambda: _update(generator_delta=None), {}, "missing generator_update"),
    (lambda: _update(), {"generator_shapes": None}, "generator_update sent in a round that asked for logits only"),
    (lambda: _update(generator_delta={n: torch.ones(s) for n, s in
                                      generator_update_shapes(_generator_state()).items()}),
     {"max_update_norm": 3.0}, r"L2 norm 3\.464 exceeds the bound 3"),
])
def test_invalid_updates_are_rejected_with_their_reason(update, overrides, message):
    with pytest.raises(InvalidMessage, match=message) as caught:
        _validate(update(), **overrides)
    assert caught.value.reason == str(caught.value)


def test_norm_bound_is_optional_and_inclusive():
    ones = {n: torch.ones(s) for n, s in generator_update_shapes(_generator_state()).items()}
    assert _validate(_update(generator_delta=ones), max_update_norm=None) == pytest.approx(math.sqrt(12))
    assert _validate(_update(generator_delta=ones), max_update_norm=math.sqrt(12) + 1e-9) > 0


def test_wire_audit_rejects_teacher_weights_real_images_and_unknown_keys():
    instruction = instruction_to_recorddict(_instruction())
    reply = update_to_recorddict(_update())
    names = {"generator": list(_generator_state()),
             "student": ["fc.weight", "conv.weight"],
             "generator_update": list(generator_update_shapes(_generator_state()))}
    check_payload_keys(instruction, keys.ALLOWED_INSTRUCTION_KEYS, model_array_names=names)
    check_payload_keys(reply, keys.ALLOWED_REPLY_KEYS, model_array_names=names)

    teacher = ArrayRecord(torch_state_dict={"conv1.weight": torch.zeros(6, 1, 5, 5),
                                            "fc3.bias": torch.zeros(10)})
    with pytest.raises(InvalidMessage, match="unknown record 'teacher'"):
        check_payload_keys(_with_record(reply, "teacher", teacher), keys.ALLOWED_REPLY_KEYS)
    # Disguised as a generator update: names the generator does not have.
    with pytest.raises(InvalidMessage, match="conv1.weight, fc3.bias in record 'generator_update'"):
        check_payload_keys(_with_record(reply, "generator_update", teacher), keys.ALLOWED_REPLY_KEYS,
                           model_array_names=names)
    image = ArrayRecord(torch_state_dict={"images": torch.rand(1, 1, 8, 8)})
    with pytest.raises(InvalidMessage, match="unknown record 'real_images'"):
        check_payload_keys(_with_record(instruction, "real_images", image), keys.ALLOWED_INSTRUCTION_KEYS)
    # The server's instruction records are not allowed in a reply, nor the reverse.
    with pytest.raises(InvalidMessage, match="unknown record 'samples'"):
        check_payload_keys(_with_record(reply, "samples", instruction["samples"]), keys.ALLOWED_REPLY_KEYS)
    with pytest.raises(InvalidMessage, match="unknown record 'logits'"):
        check_payload_keys(_with_record(instruction, "logits", reply["logits"]),
                           keys.ALLOWED_INSTRUCTION_KEYS)
    with pytest.raises(InvalidMessage, match="unknown key 'note' in record 'report'"):
        extra = copy.deepcopy(reply["report"])
        extra["note"] = b"hello"
        check_payload_keys(_with_record(reply, "report", extra), keys.ALLOWED_REPLY_KEYS)


def test_allowed_lists_cover_every_record_name_exactly():
    assert keys.ALLOWED_INSTRUCTION_KEYS | keys.ALLOWED_REPLY_KEYS == set(keys.RECORD_KINDS)
    assert not keys.ALLOWED_INSTRUCTION_KEYS & keys.ALLOWED_REPLY_KEYS
    array_records = {name for name, kind in keys.RECORD_KINDS.items() if kind == "array"}
    assert array_records == set(keys.ALLOWED_ARRAY_NAMES) | keys.MODEL_RECORDS
    config_records = {name for name, kind in keys.RECORD_KINDS.items() if kind == "config"}
    assert config_records == set(keys.ALLOWED_CONFIG_KEYS)
    assert keys.MESSAGE_TYPE_BY_MODE == {"generator_and_logits": "train.distill",
                                         "logits_only": "query.logits"}


# --- messages -----------------------------------------------------------------------------------


def test_make_message_builds_explicit_metadata_without_a_running_app():
    content = instruction_to_recorddict(_instruction())
    before = time.time()
    message = make_message(content, dst_node_id=42, message_type=keys.MESSAGE_TYPE_TRAIN_DISTILL,
                           group_id=3, run_id=9, ttl=60.0)
    other = make_message(content, dst_node_id=42, message_type="train.distill", group_id="3")
    md = message.metadata
    assert (md.run_id, md.src_node_id, md.dst_node_id, md.group_id) == (9, SERVER_NODE_ID, 42, "3")
    assert md.reply_to_message_id == "" and md.message_type == "train.distill" and md.ttl == 60.0
    assert before <= md.created_at <= time.time()
    assert md.message_id and md.message_id != other.metadata.message_id
    assert make_message(content, dst_node_id=1, message_type="query.logits", group_id=0,
                        message_id="m-1").metadata.message_id == "m-1"


def test_server_node_id_is_flowers_superlink_node_id():
    from flwr.common.constant import SUPERLINK_NODE_ID

    assert SERVER_NODE_ID == SUPERLINK_NODE_ID


def test_reply_to_swaps_ends_and_keeps_run_group_type_and_deadline():
    message = make_message(RecordDict(), dst_node_id=42, message_type="query.logits", group_id=5,
                           run_id=9, ttl=30.0)
    reply = reply_to(message, update_to_recorddict(_update(generator_delta=None)))
    md, source = reply.metadata, message.metadata
    assert (md.src_node_id, md.dst_node_id) == (42, SERVER_NODE_ID)
    assert md.reply_to_message_id == source.message_id and md.message_id != source.message_id
    assert (md.run_id, md.group_id, md.message_type) == (9, "5", "query.logits")
    assert md.created_at + md.ttl == pytest.approx(source.created_at + source.ttl, abs=1e-3)
    assert reply_to(message, RecordDict(), ttl=1.0).metadata.ttl == 1.0
    error_reply = reply_to(message, Error(code=0, reason="boom"))
    assert error_reply.has_error() and error_reply.error.reason == "boom"


def test_a_built_message_reaches_a_client_app_handler_and_survives_deepcopy():
    app = ClientApp()

    @app.train("distill")
    def serve(message: Message, context: Context) -> Message:
        instruction = instruction_from_recorddict(message.content)
        logits = torch.zeros(instruction.samples.shape[0], NUM_CLASSES)
        update = ClientUpdate(logits=logits, report=_report(round=instruction.round),
                              generator_delta=None)
        return Message(update_to_recorddict(update), reply_to=message)

    message = make_message(instruction_to_recorddict(_instruction()), dst_node_id=42,
                           message_type=keys.MESSAGE_TYPE_TRAIN_DISTILL, group_id=3, run_id=1)
    context = Context(run_id=1, node_id=42, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    reply = app(copy.deepcopy(message), context)
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    decoded = update_from_recorddict(reply.content)
    assert decoded.round == 3 and decoded.logits.shape == (NUM_SAMPLES, NUM_CLASSES)
