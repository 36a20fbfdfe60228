from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Refusal(_message.Message):
    __slots__ = ("protocol_version", "round", "reason", "message", "epsilon_spent", "epsilon_budget")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Refusal.Reason]
        PROTOCOL_MISMATCH: _ClassVar[Refusal.Reason]
        INCOMPATIBLE_MANIFEST: _ClassVar[Refusal.Reason]
        BUDGET_EXHAUSTED: _ClassVar[Refusal.Reason]
        BAD_REQUEST: _ClassVar[Refusal.Reason]
        INTERNAL_ERROR: _ClassVar[Refusal.Reason]
    REASON_UNSPECIFIED: Refusal.Reason
    PROTOCOL_MISMATCH: Refusal.Reason
    INCOMPATIBLE_MANIFEST: Refusal.Reason
    BUDGET_EXHAUSTED: Refusal.Reason
    BAD_REQUEST: Refusal.Reason
    INTERNAL_ERROR: Refusal.Reason
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    reason: Refusal.Reason
    message: str
    epsilon_spent: float
    epsilon_budget: float
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., reason: _Optional[_Union[Refusal.Reason, str]] = ..., message: _Optional[str] = ..., epsilon_spent: _Optional[float] = ..., epsilon_budget: _Optional[float] = ...) -> None: ...
