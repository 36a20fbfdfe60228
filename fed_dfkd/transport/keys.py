"""Message types and record names: the explicit list of what may cross the wire (DESIGN.md §5).

A round instruction (server -> client) is a RecordDict of

- ``generator``: ArrayRecord, G's state dict (absent in ``logits_only``);
- ``student``: ArrayRecord, S's state dict (absent in ``logits_only``);
- ``samples``: ArrayRecord with one uint8 array ``samples`` ``[N, C, H, W]``;
- ``spec``: ConfigRecord with the serialised ``RoundSpec`` under ``round_spec``.

A reply (client -> server) is either an update,

- ``generator_update``: ArrayRecord, ΔG_k with G's names and shapes (absent in ``logits_only``);
- ``logits``: ArrayRecord with one array ``logits`` ``[N, classes]``;
- ``report``: ConfigRecord with the serialised ``ClientReport`` under ``client_report``;

or a refusal, ``refusal``: ConfigRecord with the serialised ``Refusal`` under ``refusal``. Either
kind may add ``manifest``: ConfigRecord with the serialised ``TeacherManifest`` under
``teacher_manifest``. Nothing else is allowed: no teacher parameter and no real image has a
place here, and :func:`fed_dfkd.transport.validation.check_payload_keys` rejects any other name.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal, Mapping

# Message types (Flower routes ``<category>.<action>`` to ``@app.train("distill")`` and
# ``@app.query("logits")``).
MESSAGE_TYPE_TRAIN_DISTILL = "train.distill"
MESSAGE_TYPE_QUERY_LOGITS = "query.logits"
MESSAGE_TYPE_BY_MODE: Mapping[str, str] = MappingProxyType(
    {"generator_and_logits": MESSAGE_TYPE_TRAIN_DISTILL, "logits_only": MESSAGE_TYPE_QUERY_LOGITS}
)

# Instruction records.
GENERATOR_RECORD = "generator"
STUDENT_RECORD = "student"
SAMPLES_RECORD = "samples"
SPEC_RECORD = "spec"

# Reply records.
GENERATOR_UPDATE_RECORD = "generator_update"
LOGITS_RECORD = "logits"
REPORT_RECORD = "report"
REFUSAL_RECORD = "refusal"
MANIFEST_RECORD = "manifest"

# Keys inside ConfigRecords, each holding one serialised protobuf message as bytes.
ROUND_SPEC_KEY = "round_spec"
CLIENT_REPORT_KEY = "client_report"
REFUSAL_KEY = "refusal"
TEACHER_MANIFEST_KEY = "teacher_manifest"

# Array names inside ArrayRecords with a fixed content.
SAMPLES_ARRAY = "samples"
LOGITS_ARRAY = "logits"

ALLOWED_INSTRUCTION_KEYS = frozenset(
    {GENERATOR_RECORD, STUDENT_RECORD, SAMPLES_RECORD, SPEC_RECORD}
)
ALLOWED_REPLY_KEYS = frozenset(
    {GENERATOR_UPDATE_RECORD, LOGITS_RECORD, REPORT_RECORD, REFUSAL_RECORD, MANIFEST_RECORD}
)

RecordKind = Literal["array", "config"]

# The kind of record each name must hold.
RECORD_KINDS: Mapping[str, RecordKind] = MappingProxyType(
    {
        GENERATOR_RECORD: "array",
        STUDENT_RECORD: "array",
        SAMPLES_RECORD: "array",
        SPEC_RECORD: "config",
        GENERATOR_UPDATE_RECORD: "array",
        LOGITS_RECORD: "array",
        REPORT_RECORD: "config",
        REFUSAL_RECORD: "config",
        MANIFEST_RECORD: "config",
    }
)

# The array names an ArrayRecord with a fixed content may hold.
ALLOWED_ARRAY_NAMES: Mapping[str, frozenset[str]] = MappingProxyType(
    {SAMPLES_RECORD: frozenset({SAMPLES_ARRAY}), LOGITS_RECORD: frozenset({LOGITS_ARRAY})}
)

# ArrayRecords whose names are a model's state-dict keys (G's or S's): the caller that knows the
# model passes them to ``check_payload_keys(..., model_array_names=...)``.
MODEL_RECORDS = frozenset({GENERATOR_RECORD, STUDENT_RECORD, GENERATOR_UPDATE_RECORD})

# The keys each ConfigRecord may hold (each value is protobuf bytes).
ALLOWED_CONFIG_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        SPEC_RECORD: frozenset({ROUND_SPEC_KEY}),
        REPORT_RECORD: frozenset({CLIENT_REPORT_KEY}),
        REFUSAL_RECORD: frozenset({REFUSAL_KEY}),
        MANIFEST_RECORD: frozenset({TEACHER_MANIFEST_KEY}),
    }
)
