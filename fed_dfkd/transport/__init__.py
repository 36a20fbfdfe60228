"""The adapter between the protocol's domain objects and Flower: the only library package that
imports ``flwr`` (DESIGN.md §2).

- :mod:`~fed_dfkd.transport.keys`: message types, record names and the allowed-payload list;
- :mod:`~fed_dfkd.transport.codec`: symmetric codecs (protobuf, records) and message builders;
- :mod:`~fed_dfkd.transport.validation`: :class:`InvalidMessage` and reply checks.
"""

from fed_dfkd.transport import keys
from fed_dfkd.transport.codec import (
    SERVER_NODE_ID,
    client_report_from_proto,
    client_report_to_proto,
    instruction_from_recorddict,
    instruction_to_recorddict,
    make_message,
    manifest_from_proto,
    manifest_from_recorddict,
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

__all__ = [
    "SERVER_NODE_ID",
    "InvalidMessage",
    "check_payload_keys",
    "client_report_from_proto",
    "client_report_to_proto",
    "generator_update_shapes",
    "instruction_from_recorddict",
    "instruction_to_recorddict",
    "keys",
    "make_message",
    "manifest_from_proto",
    "manifest_from_recorddict",
    "manifest_to_proto",
    "recorddict_num_bytes",
    "refusal_from_proto",
    "refusal_to_proto",
    "refusal_to_recorddict",
    "reply_to",
    "round_spec_from_proto",
    "round_spec_to_proto",
    "update_from_recorddict",
    "update_l2_norm",
    "update_to_recorddict",
    "validate_update",
]
