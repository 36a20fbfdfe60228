from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ClientReport(_message.Message):
    __slots__ = ("protocol_version", "round", "partition_id", "train_size", "class_histogram", "metrics", "epsilon", "delta", "update_norm", "seconds", "teacher_hash")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_HASH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    partition_id: int
    train_size: int
    class_histogram: _containers.RepeatedScalarFieldContainer[int]
    metrics: _containers.ScalarMap[str, float]
    epsilon: float
    delta: float
    update_norm: float
    seconds: float
    teacher_hash: str
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., partition_id: _Optional[int] = ..., train_size: _Optional[int] = ..., class_histogram: _Optional[_Iterable[int]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., update_norm: _Optional[float] = ..., seconds: _Optional[float] = ..., teacher_hash: _Optional[str] = ...) -> None: ...
