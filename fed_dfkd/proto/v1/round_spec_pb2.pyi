from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrivacySpec(_message.Message):
    __slots__ = ("level", "generator_clip", "logit_clip", "noise_multiplier", "delta")
    class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        LEVEL_UNSPECIFIED: _ClassVar[PrivacySpec.Level]
        NONE: _ClassVar[PrivacySpec.Level]
        CENTRAL: _ClassVar[PrivacySpec.Level]
        LOCAL: _ClassVar[PrivacySpec.Level]
    LEVEL_UNSPECIFIED: PrivacySpec.Level
    NONE: PrivacySpec.Level
    CENTRAL: PrivacySpec.Level
    LOCAL: PrivacySpec.Level
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_CLIP_FIELD_NUMBER: _ClassVar[int]
    LOGIT_CLIP_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    level: PrivacySpec.Level
    generator_clip: float
    logit_clip: float
    noise_multiplier: float
    delta: float
    def __init__(self, level: _Optional[_Union[PrivacySpec.Level, str]] = ..., generator_clip: _Optional[float] = ..., logit_clip: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class RoundSpec(_message.Message):
    __slots__ = ("protocol_version", "round", "total_rounds", "progress", "mode", "method", "config_hash", "generator_steps", "batch_size", "seed", "adversarial_weight", "negative_window_start", "privacy", "update_dtype", "logit_dtype", "sample_transport", "sample_batches", "run_key")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[RoundSpec.Mode]
        GENERATOR_AND_LOGITS: _ClassVar[RoundSpec.Mode]
        LOGITS_ONLY: _ClassVar[RoundSpec.Mode]
    MODE_UNSPECIFIED: RoundSpec.Mode
    GENERATOR_AND_LOGITS: RoundSpec.Mode
    LOGITS_ONLY: RoundSpec.Mode
    class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TENSOR_DTYPE_UNSPECIFIED: _ClassVar[RoundSpec.TensorDtype]
        FLOAT32: _ClassVar[RoundSpec.TensorDtype]
        FLOAT16: _ClassVar[RoundSpec.TensorDtype]
    TENSOR_DTYPE_UNSPECIFIED: RoundSpec.TensorDtype
    FLOAT32: RoundSpec.TensorDtype
    FLOAT16: RoundSpec.TensorDtype
    class SampleTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SAMPLE_TRANSPORT_UNSPECIFIED: _ClassVar[RoundSpec.SampleTransport]
        PIXELS: _ClassVar[RoundSpec.SampleTransport]
        SEED: _ClassVar[RoundSpec.SampleTransport]
    SAMPLE_TRANSPORT_UNSPECIFIED: RoundSpec.SampleTransport
    PIXELS: RoundSpec.SampleTransport
    SEED: RoundSpec.SampleTransport
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    RUN_KEY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    total_rounds: int
    progress: float
    mode: RoundSpec.Mode
    method: str
    config_hash: str
    generator_steps: int
    batch_size: int
    seed: int
    adversarial_weight: float
    negative_window_start: float
    privacy: PrivacySpec
    update_dtype: RoundSpec.TensorDtype
    logit_dtype: RoundSpec.TensorDtype
    sample_transport: RoundSpec.SampleTransport
    sample_batches: int
    run_key: str
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., progress: _Optional[float] = ..., mode: _Optional[_Union[RoundSpec.Mode, str]] = ..., method: _Optional[str] = ..., config_hash: _Optional[str] = ..., generator_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., adversarial_weight: _Optional[float] = ..., negative_window_start: _Optional[float] = ..., privacy: _Optional[_Union[PrivacySpec, _Mapping]] = ..., update_dtype: _Optional[_Union[RoundSpec.TensorDtype, str]] = ..., logit_dtype: _Optional[_Union[RoundSpec.TensorDtype, str]] = ..., sample_transport: _Optional[_Union[RoundSpec.SampleTransport, str]] = ..., sample_batches: _Optional[int] = ..., run_key: _Optional[str] = ...) -> None: ...
