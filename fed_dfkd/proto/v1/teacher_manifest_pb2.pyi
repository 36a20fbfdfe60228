from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TeacherManifest(_message.Message):
    __slots__ = ("protocol_version", "architecture", "num_classes", "in_channels", "image_height", "image_width", "dataset", "hash", "test_accuracy", "class_histogram", "train_size")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CLASS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    architecture: str
    num_classes: int
    in_channels: int
    image_height: int
    image_width: int
    dataset: str
    hash: str
    test_accuracy: float
    class_histogram: _containers.RepeatedScalarFieldContainer[int]
    train_size: int
    def __init__(self, protocol_version: _Optional[int] = ..., architecture: _Optional[str] = ..., num_classes: _Optional[int] = ..., in_channels: _Optional[int] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., dataset: _Optional[str] = ..., hash: _Optional[str] = ..., test_accuracy: _Optional[float] = ..., class_histogram: _Optional[_Iterable[int]] = ..., train_size: _Optional[int] = ...) -> None: ...
