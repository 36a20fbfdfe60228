"""The round protocol's domain objects: what the server asks and what a client answers.

Plain dataclasses of Python values and torch tensors (DESIGN.md §3). They know nothing of the
wire: ``fed_dfkd.transport`` converts them to and from protobuf messages (``protos/``) and
Flower records, and validates what a peer sent. Enumerations are lower-case strings, as in the
config (``federation.mode``), so the core never sees protobuf enum numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

# Bumped whenever the meaning of a message changes; a peer with another version is refused.
PROTOCOL_VERSION = 1

MODES = ("generator_and_logits", "logits_only")
TENSOR_DTYPES = ("float32", "float16")
SAMPLE_TRANSPORTS = ("pixels", "seed")
PRIVACY_LEVELS = ("none", "central", "local")
REFUSAL_REASONS = (
    "protocol_mismatch",
    "incompatible_manifest",
    "budget_exhausted",
    "bad_request",
    "internal_error",
)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _require_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")


def _counts(name: str, values: Any) -> tuple[int, ...]:
    counts = tuple(int(v) for v in values)
    if any(c < 0 for c in counts):
        raise ValueError(f"{name} must hold non-negative counts; got {counts}")
    return counts


@dataclass(frozen=True, kw_only=True)
class PrivacySpecData:
    """Client-level privacy parameters of a round (DESIGN.md §4).

    ``generator_clip`` is C_g and ``logit_clip`` is C_l, the L2 bounds of a release; the Gaussian
    noise has standard deviation ``noise_multiplier`` x the clip bound.
    """

    level: str = "none"
    generator_clip: float = 0.0
    logit_clip: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0

    def __post_init__(self) -> None:
        _require_choice("privacy.level", self.level, PRIVACY_LEVELS)


@dataclass(frozen=True, kw_only=True)
class RoundSpecData:
    """The scalar part of a round instruction (protobuf ``RoundSpec``).

    ``progress`` is the curriculum clock p = completed rounds / total rounds. ``adversarial_weight``
    and ``negative_window_start`` are the server's schedule values at p; clients use and log them.
    Clients derive their random streams with ``derive_seed(seed, "generator-steps", round)``.
    """

    protocol_version: int = PROTOCOL_VERSION
    round: int
    total_rounds: int
    progress: float
    mode: str = "generator_and_logits"
    method: str
    config_hash: str = ""
    generator_steps: int
    batch_size: int
    seed: int
    adversarial_weight: float = 0.0
    negative_window_start: float = 0.0
    privacy: PrivacySpecData | None = None
    update_dtype: str = "float32"
    logit_dtype: str = "float16"
    sample_transport: str = "pixels"
    sample_batches: int = 0
    run_key: str = ""

    def __post_init__(self) -> None:
        for name in ("round", "total_rounds", "generator_steps", "batch_size", "seed"):
            _require_non_negative_int(name, getattr(self, name))
        if not 0.0 <= self.progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1]; got {self.progress}")
        _require_choice("mode", self.mode, MODES)
        _require_choice("update_dtype", self.update_dtype, TENSOR_DTYPES)
        _require_choice("logit_dtype", self.logit_dtype, TENSOR_DTYPES)
        _require_choice("sample_transport", self.sample_transport, SAMPLE_TRANSPORTS)
        _require_non_negative_int("sample_batches", self.sample_batches)
        if self.sample_transport == "seed" and (self.sample_batches < 1 or self.mode != "generator_and_logits"):
            raise ValueError("sample_transport seed needs sample_batches >= 1 and mode "
                             "generator_and_logits (the client regenerates them from G)")

    @property
    def spec(self) -> RoundSpecData:
        """The scalar fields alone (drops the tensors of a :class:`RoundInstruction`)."""
        return RoundSpecData(**{f.name: getattr(self, f.name) for f in fields(RoundSpecData)})


@dataclass(frozen=True, kw_only=True, eq=False)
class RoundInstruction(RoundSpecData):
    """One round's message to one client: the spec plus G's and S's weights and the samples X.

    ``samples`` is the round's pseudo-batch quantised to uint8, ``[N, C, H, W]``. In mode
    ``logits_only`` the client never touches G or S, so both state dicts may be empty.
    """

    generator_state: dict[str, Tensor] = field(default_factory=dict)
    student_state: dict[str, Tensor] = field(default_factory=dict)
    samples: Tensor

    # Tensors have no single truth value, so the inherited field-wise equality cannot apply.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def num_samples(self) -> int:
        """Rows the client answers logits for: the pixels sent, or the batches it regenerates."""
        if self.sample_transport == "seed":
            return self.sample_batches * self.batch_size
        return int(self.samples.shape[0])


@dataclass(frozen=True, kw_only=True)
class ClientReportData:
    """A client's report on its round (protobuf ``ClientReport``).

    ``metrics`` holds every local loss term by name. ``epsilon`` is the cumulative privacy spent
    at ``delta``; both are None when the client accounts no privacy.
    """

    protocol_version: int = PROTOCOL_VERSION
    round: int
    partition_id: int
    train_size: int
    class_histogram: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None
    update_norm: float = 0.0
    seconds: float = 0.0
    teacher_hash: str = ""

    def __post_init__(self) -> None:
        _require_non_negative_int("round", self.round)
        _require_non_negative_int("train_size", self.train_size)
        histogram = _counts("class_histogram", self.class_histogram)
        object.__setattr__(self, "class_histogram", histogram)
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in self.metrics.items()})


@dataclass(frozen=True, kw_only=True, eq=False)
class ClientUpdate:
    """A client's answer to a round: ΔG_k (None in ``logits_only``), T_k(X) logits ``[N, classes]``
    (float16 on the wire by default) and its report; optionally its teacher's manifest."""

    generator_delta: dict[str, Tensor] | None = None
    logits: Tensor
    report: ClientReportData
    manifest: TeacherManifestData | None = None

    @property
    def protocol_version(self) -> int:
        return self.report.protocol_version

    @property
    def round(self) -> int:
        return self.report.round


@dataclass(frozen=True, kw_only=True)
class RefusalData:
    """A client's typed refusal to serve a round (protobuf ``Refusal``), instead of an exception."""

    protocol_version: int = PROTOCOL_VERSION
    round: int
    reason: str
    message: str = ""
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0

    def __post_init__(self) -> None:
        _require_non_negative_int("round", self.round)
        _require_choice("reason", self.reason, REFUSAL_REASONS)


@dataclass(frozen=True, kw_only=True)
class TeacherManifestData:
    """Public description of a teacher (protobuf ``TeacherManifest``): never its weights."""

    protocol_version: int = PROTOCOL_VERSION
    architecture: str
    num_classes: int
    in_channels: int
    image_height: int
    image_width: int
    dataset: str
    hash: str
    test_accuracy: float | None = None
    class_histogram: tuple[int, ...] = ()
    train_size: int = 0

    def __post_init__(self) -> None:
        for name in ("num_classes", "in_channels", "image_height", "image_width", "train_size"):
            _require_non_negative_int(name, getattr(self, name))
        histogram = _counts("class_histogram", self.class_histogram)
        object.__setattr__(self, "class_histogram", histogram)
