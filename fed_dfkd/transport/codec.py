"""Symmetric codecs between the protocol's domain objects and the wire (DESIGN.md §5).

Scalars travel as protobuf messages (``fed_dfkd.proto.v1``) serialised into ConfigRecord bytes;
tensors travel in Flower ArrayRecords, in the order of their dict. Every ``*_to_*`` has its
``*_from_*``. Decoding is strict: a missing or unknown record, a wrong record type, undecodable
bytes, an unknown enum value or another ``protocol_version`` raises
:class:`~fed_dfkd.transport.validation.InvalidMessage` naming what is wrong. The content checks
that need the round's context (shapes, finite values, norms) are in
:func:`~fed_dfkd.transport.validation.validate_update`.

Outside a running Flower app, ``Message(...)`` needs the runtime's task identity, so
:func:`make_message` and :func:`reply_to` build the ``Metadata`` explicitly; engines and tests use
them, and a ServerApp passes its ``context.run_id``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import fields
from typing import Any, Callable, Mapping, TypeVar

import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    RecordDict,
)
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from torch import Tensor

from fed_dfkd.proto.v1 import client_report_pb2, refusal_pb2, round_spec_pb2, teacher_manifest_pb2
from fed_dfkd.protocol import (
    PROTOCOL_VERSION,
    ClientReportData,
    ClientUpdate,
    PrivacySpecData,
    RefusalData,
    RoundInstruction,
    RoundSpecData,
    TeacherManifestData,
)
from fed_dfkd.transport import keys
from fed_dfkd.transport.validation import InvalidMessage, check_payload_keys

# Flower's SUPERLINK_NODE_ID: the SuperLink refuses an instruction from any other source node.
SERVER_NODE_ID = 1

TORCH_DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}

_MODE_TO_PROTO = {
    "generator_and_logits": round_spec_pb2.RoundSpec.GENERATOR_AND_LOGITS,
    "logits_only": round_spec_pb2.RoundSpec.LOGITS_ONLY,
}
_DTYPE_TO_PROTO = {
    "float32": round_spec_pb2.RoundSpec.FLOAT32,
    "float16": round_spec_pb2.RoundSpec.FLOAT16,
}
_TRANSPORT_TO_PROTO = {
    "pixels": round_spec_pb2.RoundSpec.PIXELS,
    "seed": round_spec_pb2.RoundSpec.SEED,
}
_LEVEL_TO_PROTO = {
    "none": round_spec_pb2.PrivacySpec.NONE,
    "central": round_spec_pb2.PrivacySpec.CENTRAL,
    "local": round_spec_pb2.PrivacySpec.LOCAL,
}
_REASON_TO_PROTO = {
    "protocol_mismatch": refusal_pb2.Refusal.PROTOCOL_MISMATCH,
    "incompatible_manifest": refusal_pb2.Refusal.INCOMPATIBLE_MANIFEST,
    "budget_exhausted": refusal_pb2.Refusal.BUDGET_EXHAUSTED,
    "bad_request": refusal_pb2.Refusal.BAD_REQUEST,
    "internal_error": refusal_pb2.Refusal.INTERNAL_ERROR,
}

_P = TypeVar("_P", bound=ProtoMessage)
_D = TypeVar("_D")


def _from_enum(table: Mapping[str, int], value: int, field_name: str) -> str:
    for name, number in table.items():
        if number == value:
            return name
    if value == 0:
        raise InvalidMessage(f"{field_name} is unset")
    raise InvalidMessage(f"{field_name} has unknown value {value}; known: {', '.join(table)}")


def _check_version(message: ProtoMessage, what: str) -> None:
    version = getattr(message, "protocol_version")
    if version == 0:
        raise InvalidMessage(f"{what}.protocol_version is missing")
    if version != PROTOCOL_VERSION:
        raise InvalidMessage(
            f"{what}.protocol_version {version} != {PROTOCOL_VERSION}, the version this side speaks"
        )


def _build(what: str, factory: Callable[..., _D], **values: Any) -> _D:
    """A domain object from decoded values; its own invariants become InvalidMessage."""
    try:
        return factory(**values)
    except ValueError as error:
        raise InvalidMessage(f"{what}: {error}") from error


# --- RoundSpec ----------------------------------------------------------------------------------


def round_spec_to_proto(spec: RoundSpecData) -> round_spec_pb2.RoundSpec:
    """The scalar fields of ``spec`` (a RoundInstruction's tensors are left out)."""
    message = round_spec_pb2.RoundSpec(
        protocol_version=spec.protocol_version,
        round=spec.round,
        total_rounds=spec.total_rounds,
        progress=spec.progress,
        mode=_MODE_TO_PROTO[spec.mode],
        method=spec.method,
        config_hash=spec.config_hash,
        generator_steps=spec.generator_steps,
        batch_size=spec.batch_size,
        seed=spec.seed,
        adversarial_weight=spec.adversarial_weight,
        negative_window_start=spec.negative_window_start,
        update_dtype=_DTYPE_TO_PROTO[spec.update_dtype],
        logit_dtype=_DTYPE_TO_PROTO[spec.logit_dtype],
        sample_transport=_TRANSPORT_TO_PROTO[spec.sample_transport],
        sample_batches=spec.sample_batches,
        run_key=spec.run_key,
    )
    if spec.privacy is not None:
        message.privacy.CopyFrom(
            round_spec_pb2.PrivacySpec(
                level=_LEVEL_TO_PROTO[spec.privacy.level],
                generator_clip=spec.privacy.generator_clip,
                logit_clip=spec.privacy.logit_clip,
                noise_multiplier=spec.privacy.noise_multiplier,
                delta=spec.privacy.delta,
            )
        )
    return message


def round_spec_from_proto(message: round_spec_pb2.RoundSpec) -> RoundSpecData:
    _check_version(message, "round_spec")
    privacy = None
    if message.HasField("privacy"):
        privacy = _build(
            "round_spec.privacy",
            PrivacySpecData,
            level=_from_enum(_LEVEL_TO_PROTO, message.privacy.level, "round_spec.privacy.level"),
            generator_clip=message.privacy.generator_clip,
            logit_clip=message.privacy.logit_clip,
            noise_multiplier=message.privacy.noise_multiplier,
            delta=message.privacy.delta,
        )
    return _build(
        "round_spec",
        RoundSpecData,
        protocol_version=message.protocol_version,
        round=message.round,
        total_rounds=message.total_rounds,
        progress=message.progress,
        mode=_from_enum(_MODE_TO_PROTO, message.mode, "round_spec.mode"),
        method=message.method,
        config_hash=message.config_hash,
        generator_steps=message.generator_steps,
        batch_size=message.batch_size,
        seed=message.seed,
        adversarial_weight=message.adversarial_weight,
        negative_window_start=message.negative_window_start,
        privacy=privacy,
        update_dtype=_from_enum(_DTYPE_TO_PROTO, message.update_dtype, "round_spec.update_dtype"),
        logit_dtype=_from_enum(_DTYPE_TO_PROTO, message.logit_dtype, "round_spec.logit_dtype"),
        sample_transport=_from_enum(_TRANSPORT_TO_PROTO, message.sample_transport,
                                    "round_spec.sample_transport"),
        sample_batches=message.sample_batches,
        run_key=message.run_key,
    )


# --- ClientReport -------------------------------------------------------------------------------


def client_report_to_proto(report: ClientReportData) -> client_report_pb2.ClientReport:
    message = client_report_pb2.ClientReport(
        protocol_version=report.protocol_version,
        round=report.round,
        partition_id=report.partition_id,
        train_size=report.train_size,
        class_histogram=list(report.class_histogram),
        metrics=dict(report.metrics),
        update_norm=report.update_norm,
        seconds=report.seconds,
        teacher_hash=report.teacher_hash,
    )
    # Optional fields: unset means "no privacy accounted", which is not epsilon = 0.
    if report.epsilon is not None:
        message.epsilon = report.epsilon
    if report.delta is not None:
        message.delta = report.delta
    return message


def client_report_from_proto(message: client_report_pb2.ClientReport) -> ClientReportData:
    _check_version(message, "client_report")
    return _build(
        "client_report",
        ClientReportData,
        protocol_version=message.protocol_version,
        round=message.round,
        partition_id=message.partition_id,
        train_size=message.train_size,
        class_histogram=tuple(message.class_histogram),
        metrics={name: message.metrics[name] for name in sorted(message.metrics)},
        epsilon=message.epsilon if message.HasField("epsilon") else None,
        delta=message.delta if message.HasField("delta") else None,
        update_norm=message.update_norm,
        seconds=message.seconds,
        teacher_hash=message.teacher_hash,
    )


# --- Refusal ------------------------------------------------------------------------------------


def refusal_to_proto(refusal: RefusalData) -> refusal_pb2.Refusal:
    return refusal_pb2.Refusal(
        protocol_version=refusal.protocol_version,
        round=refusal.round,
        reason=_REASON_TO_PROTO[refusal.reason],
        message=refusal.message,
        epsilon_spent=refusal.epsilon_spent,
        epsilon_budget=refusal.epsilon_budget,
    )


def refusal_from_proto(message: refusal_pb2.Refusal) -> RefusalData:
    _check_version(message, "refusal")
    return _build(
        "refusal",
        RefusalData,
        protocol_version=message.protocol_version,
        round=message.round,
        reason=_from_enum(_REASON_TO_PROTO, message.reason, "refusal.reason"),
        message=message.message,
        epsilon_spent=message.epsilon_spent,
        epsilon_budget=message.epsilon_budget,
    )


# --- TeacherManifest ----------------------------------------------------------------------------


def manifest_to_proto(manifest: TeacherManifestData) -> teacher_manifest_pb2.TeacherManifest:
    message = teacher_manifest_pb2.TeacherManifest(
        protocol_version=manifest.protocol_version,
        architecture=manifest.architecture,
        num_classes=manifest.num_classes,
        in_channels=manifest.in_channels,
        image_height=manifest.image_height,
        image_width=manifest.image_width,
        dataset=manifest.dataset,
        hash=manifest.hash,
        class_histogram=list(manifest.class_histogram),
        train_size=manifest.train_size,
    )
    if manifest.test_accuracy is not None:
        message.test_accuracy = manifest.test_accuracy
    return message


def manifest_from_proto(message: teacher_manifest_pb2.TeacherManifest) -> TeacherManifestData:
    _check_version(message, "teacher_manifest")
    return _build(
        "teacher_manifest",
        TeacherManifestData,
        protocol_version=message.protocol_version,
        architecture=message.architecture,
        num_classes=message.num_classes,
        in_channels=message.in_channels,
        image_height=message.image_height,
        image_width=message.image_width,
        dataset=message.dataset,
        hash=message.hash,
        test_accuracy=message.test_accuracy if message.HasField("test_accuracy") else None,
        class_histogram=tuple(message.class_histogram),
        train_size=message.train_size,
    )


# --- records ------------------------------------------------------------------------------------


def _proto_record(key: str, message: ProtoMessage) -> ConfigRecord:
    # Deterministic: map fields are sorted, so equal content gives equal bytes.
    return ConfigRecord({key: message.SerializeToString(deterministic=True)})


def _parse_proto_record(
    content: RecordDict, record_name: str, key: str, message_type: type[_P]
) -> _P:
    if record_name not in content:
        raise InvalidMessage(f"missing record {record_name!r}")
    record = content[record_name]
    if not isinstance(record, ConfigRecord):
        raise InvalidMessage(
            f"record {record_name!r} must be a ConfigRecord, got {type(record).__name__}"
        )
    if key not in record:
        raise InvalidMessage(f"missing key {key!r} in record {record_name!r}")
    data = record[key]
    if not isinstance(data, bytes):
        raise InvalidMessage(
            f"{record_name}.{key} must be protobuf bytes, got {type(data).__name__}"
        )
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidMessage(
            f"{record_name}.{key} is not a valid {message_type.__name__} ({error})"
        ) from error
    return message


def _tensors_to_record(tensors: Mapping[str, Tensor], *, dtype: torch.dtype | None) -> ArrayRecord:
    """An ArrayRecord in the dict's key order; floating tensors cast to ``dtype`` when given."""
    arrays = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        arrays[name] = Array(tensor.contiguous().numpy())
    return ArrayRecord(array_dict=arrays)


def _tensors_from_record(content: RecordDict, record_name: str) -> dict[str, Tensor]:
    record = content[record_name]
    if not isinstance(record, ArrayRecord):
        raise InvalidMessage(
            f"record {record_name!r} must be an ArrayRecord, got {type(record).__name__}"
        )
    tensors: dict[str, Tensor] = {}
    for name, array in record.items():
        try:
            ndarray = array.numpy()
            tensor = torch.from_numpy(ndarray)
        except (TypeError, ValueError, OSError, EOFError) as error:
            raise InvalidMessage(
                f"{record_name}[{name!r}] is not a decodable tensor ({error})"
            ) from error
        if tuple(tensor.shape) != tuple(array.shape):
            raise InvalidMessage(
                f"{record_name}[{name!r}] holds shape {tuple(tensor.shape)}, "
                f"declares {tuple(array.shape)}"
            )
        tensors[name] = tensor
    return tensors


def _single_tensor(content: RecordDict, record_name: str, array_name: str) -> Tensor:
    if record_name not in content:
        raise InvalidMessage(f"missing record {record_name!r}")
    tensors = _tensors_from_record(content, record_name)
    if list(tensors) != [array_name]:
        raise InvalidMessage(
            f"record {record_name!r} must hold exactly one array {array_name!r}, "
            f"holds {sorted(tensors) or 'none'}"
        )
    return tensors[array_name]


def _manifest_record(manifest: TeacherManifestData) -> ConfigRecord:
    return _proto_record(keys.TEACHER_MANIFEST_KEY, manifest_to_proto(manifest))


def manifest_from_recorddict(content: RecordDict) -> TeacherManifestData | None:
    """The teacher manifest a reply carries, or None when it carries none."""
    if keys.MANIFEST_RECORD not in content:
        return None
    message = _parse_proto_record(
        content,
        keys.MANIFEST_RECORD,
        keys.TEACHER_MANIFEST_KEY,
        teacher_manifest_pb2.TeacherManifest,
    )
    return manifest_from_proto(message)


def instruction_to_recorddict(
    instruction: RoundInstruction, *, state_dtype: str | None = None
) -> RecordDict:
    """The round message content. Empty state dicts (``logits_only``) send no record, except
    G's in ``generator_and_logits``, which then travels empty (``method.generator_reset``: the
    owners build the round's G themselves); ``state_dtype`` casts G's and S's floating weights
    (None keeps their dtype)."""
    cast = TORCH_DTYPES[state_dtype] if state_dtype is not None else None
    content = RecordDict()
    if instruction.generator_state or instruction.mode == "generator_and_logits":
        content[keys.GENERATOR_RECORD] = _tensors_to_record(instruction.generator_state, dtype=cast)
    if instruction.student_state:
        content[keys.STUDENT_RECORD] = _tensors_to_record(instruction.student_state, dtype=cast)
    content[keys.SAMPLES_RECORD] = _tensors_to_record(
        {keys.SAMPLES_ARRAY: instruction.samples}, dtype=None
    )
    content[keys.SPEC_RECORD] = _proto_record(keys.ROUND_SPEC_KEY, round_spec_to_proto(instruction))
    return content


def instruction_from_recorddict(content: RecordDict) -> RoundInstruction:
    """Decode a round message; G's and S's records are required unless the mode is logits_only."""
    check_payload_keys(content, keys.ALLOWED_INSTRUCTION_KEYS)
    spec = round_spec_from_proto(
        _parse_proto_record(
            content, keys.SPEC_RECORD, keys.ROUND_SPEC_KEY, round_spec_pb2.RoundSpec
        )
    )
    samples = _single_tensor(content, keys.SAMPLES_RECORD, keys.SAMPLES_ARRAY)
    if samples.dtype != torch.uint8 or samples.dim() != 4:
        raise InvalidMessage(
            f"samples must be uint8 [N, C, H, W], got {samples.dtype} {tuple(samples.shape)}"
        )
    states: dict[str, dict[str, Tensor]] = {}
    for record_name in (keys.GENERATOR_RECORD, keys.STUDENT_RECORD):
        if record_name in content:
            states[record_name] = _tensors_from_record(content, record_name)
        elif spec.mode == "logits_only":
            states[record_name] = {}
        else:
            raise InvalidMessage(f"missing record {record_name!r} (mode {spec.mode})")
    values = {f.name: getattr(spec, f.name) for f in fields(RoundSpecData)}
    return RoundInstruction(
        **values,
        generator_state=states[keys.GENERATOR_RECORD],
        student_state=states[keys.STUDENT_RECORD],
        samples=samples,
    )


def update_to_recorddict(
    update: ClientUpdate, *, update_dtype: str = "float32", logit_dtype: str = "float16"
) -> RecordDict:
    """A client's reply content. Pass the round's ``RoundSpec.update_dtype`` and ``logit_dtype``:
    ΔG and the logits are cast to them (logits float16 by default)."""
    content = RecordDict()
    if update.generator_delta is not None:
        content[keys.GENERATOR_UPDATE_RECORD] = _tensors_to_record(
            update.generator_delta, dtype=TORCH_DTYPES[update_dtype]
        )
    content[keys.LOGITS_RECORD] = _tensors_to_record(
        {keys.LOGITS_ARRAY: update.logits}, dtype=TORCH_DTYPES[logit_dtype]
    )
    content[keys.REPORT_RECORD] = _proto_record(
        keys.CLIENT_REPORT_KEY, client_report_to_proto(update.report)
    )
    if update.manifest is not None:
        content[keys.MANIFEST_RECORD] = _manifest_record(update.manifest)
    return content


def refusal_to_recorddict(
    refusal: RefusalData, *, manifest: TeacherManifestData | None = None
) -> RecordDict:
    """A refusal reply, optionally with the client's teacher manifest (for
    ``incompatible_manifest``, so the server can log what the client holds)."""
    content = RecordDict()
    content[keys.REFUSAL_RECORD] = _proto_record(keys.REFUSAL_KEY, refusal_to_proto(refusal))
    if manifest is not None:
        content[keys.MANIFEST_RECORD] = _manifest_record(manifest)
    return content


def update_from_recorddict(content: RecordDict) -> ClientUpdate | RefusalData:
    """Decode a reply: a ClientUpdate, or a RefusalData when the client refused the round.

    Tensors keep their wire dtype (float16 logits stay float16); the content checks are
    :func:`~fed_dfkd.transport.validation.validate_update`.
    """
    check_payload_keys(content, keys.ALLOWED_REPLY_KEYS)
    if keys.REFUSAL_RECORD in content:
        mixed = sorted(
            name
            for name in (keys.GENERATOR_UPDATE_RECORD, keys.LOGITS_RECORD, keys.REPORT_RECORD)
            if name in content
        )
        if mixed:
            raise InvalidMessage(
                f"a reply holds an update or a refusal, not both (refusal with {', '.join(mixed)})"
            )
        return refusal_from_proto(
            _parse_proto_record(content, keys.REFUSAL_RECORD, keys.REFUSAL_KEY, refusal_pb2.Refusal)
        )
    report = client_report_from_proto(
        _parse_proto_record(
            content, keys.REPORT_RECORD, keys.CLIENT_REPORT_KEY, client_report_pb2.ClientReport
        )
    )
    logits = _single_tensor(content, keys.LOGITS_RECORD, keys.LOGITS_ARRAY)
    delta = None
    if keys.GENERATOR_UPDATE_RECORD in content:
        delta = _tensors_from_record(content, keys.GENERATOR_UPDATE_RECORD)
    return ClientUpdate(
        generator_delta=delta,
        logits=logits,
        report=report,
        manifest=manifest_from_recorddict(content),
    )


def recorddict_num_bytes(content: RecordDict) -> int:
    """Bytes of the serialised payload: every array's bytes (with its small numpy header) and
    every config value, plus the names. Used for ``bytes_up`` / ``bytes_down``."""
    return sum(record.count_bytes() for record in content.values())


# --- messages -----------------------------------------------------------------------------------


def make_message(
    content: RecordDict,
    *,
    dst_node_id: int,
    message_type: str,
    group_id: str | int,
    run_id: int = 0,
    message_id: str | None = None,
    ttl: float = DEFAULT_TTL,
    src_node_id: int = SERVER_NODE_ID,
) -> Message:
    """An instruction message with explicit Metadata, usable with or without Flower's runtime.

    ``group_id`` is the round. A running ServerApp passes ``run_id=context.run_id``; Flower's
    grids replace ``message_id`` with the message's content id when they push it.
    """
    metadata = Metadata(
        run_id=run_id,
        message_id=message_id if message_id is not None else uuid.uuid4().hex,
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=str(group_id),
        created_at=time.time(),
        ttl=ttl,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def reply_to(
    message: Message,
    content: RecordDict | Error,
    *,
    message_id: str | None = None,
    ttl: float | None = None,
) -> Message:
    """A reply (content, or a Flower ``Error``) to ``message`` with explicit Metadata.

    As Flower's own replies: source and destination swapped, same run, group and type, and a
    TTL that ends no later than the instruction's.
    """
    source = message.metadata
    now = time.time()
    remaining = source.created_at + source.ttl - now
    metadata = Metadata(
        run_id=source.run_id,
        message_id=message_id if message_id is not None else uuid.uuid4().hex,
        src_node_id=source.dst_node_id,
        dst_node_id=source.src_node_id,
        reply_to_message_id=source.message_id,
        group_id=source.group_id,
        created_at=now,
        ttl=min(ttl, remaining) if ttl is not None else remaining,
        message_type=source.message_type,
        src_task_id=source.dst_task_id,
        dst_task_id=source.src_task_id,
    )
    if isinstance(content, Error):
        return Message(error=content, metadata=metadata)
    return Message(content=content, metadata=metadata)
