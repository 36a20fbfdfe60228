"""Checks on what a peer sent: allowed payload names, and the content of a client's update.

Every failure raises :class:`InvalidMessage` with a reason that names the offending record,
array or field, so the server can drop the reply with one clear log line (DESIGN.md §3 step 5)
and a client can answer a malformed instruction with a ``bad_request`` refusal.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from fed_dfkd.protocol import PROTOCOL_VERSION, ClientUpdate
from fed_dfkd.transport import keys

# Floating dtypes a peer may send for logits and generator updates.
WIRE_FLOAT_DTYPES = (torch.float16, torch.float32)


class InvalidMessage(ValueError):
    """A message from a peer that this side must not use; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _names(values: Collection[str]) -> str:
    return ", ".join(sorted(values)) or "(none)"


def check_payload_keys(
    content: RecordDict,
    allowed: Collection[str],
    *,
    model_array_names: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Reject any record, array name or config key not on the explicit wire list (keys.py).

    ``allowed`` is the set of record names for this direction (``ALLOWED_INSTRUCTION_KEYS`` or
    ``ALLOWED_REPLY_KEYS``). The array names of the model records (``generator``, ``student``,
    ``generator_update``) are a model's state-dict keys, so they are checked only against
    ``model_array_names[record]`` when the caller passes it.
    """
    model_array_names = model_array_names or {}
    for record_name, record in content.items():
        if record_name not in allowed:
            raise InvalidMessage(
                f"unknown record {record_name!r}; allowed records: {_names(allowed)}"
            )
        kind = keys.RECORD_KINDS[record_name]
        expected_type, article = (ArrayRecord, "an") if kind == "array" else (ConfigRecord, "a")
        if not isinstance(record, expected_type):
            raise InvalidMessage(
                f"record {record_name!r} must be {article} {expected_type.__name__}, "
                f"got {type(record).__name__}"
            )
        if kind == "array":
            if record_name in keys.ALLOWED_ARRAY_NAMES:
                permitted: Collection[str] | None = keys.ALLOWED_ARRAY_NAMES[record_name]
            else:
                permitted = model_array_names.get(record_name)
            if permitted is not None:
                unknown = [name for name in record.keys() if name not in permitted]
                if unknown:
                    raise InvalidMessage(
                        f"unknown array name(s) {_names(unknown)} in record {record_name!r}"
                    )
        else:
            permitted = keys.ALLOWED_CONFIG_KEYS[record_name]
            for key, value in record.items():
                if key not in permitted:
                    raise InvalidMessage(
                        f"unknown key {key!r} in record {record_name!r}; "
                        f"allowed: {_names(permitted)}"
                    )
                if not isinstance(value, bytes):
                    raise InvalidMessage(
                        f"{record_name}.{key} must be protobuf bytes, got {type(value).__name__}"
                    )


def generator_update_shapes(generator_state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The names and shapes a generator update must have: G's floating-point entries.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are counted by the server, not sent.
    """
    return {
        name: tuple(tensor.shape)
        for name, tensor in generator_state.items()
        if tensor.is_floating_point()
    }


def update_l2_norm(delta: Mapping[str, Tensor]) -> float:
    """||ΔG||_2 over every entry, accumulated in float64 so float16 entries cannot overflow."""
    total = 0.0
    for tensor in delta.values():
        total += float(tensor.detach().to(torch.float64).square().sum())
    return math.sqrt(total)


def _check_logits(
    logits: object,
    *,
    num_samples: int,
    num_classes: int,
    max_abs_logit: float,
    expected_dtype: torch.dtype | None,
) -> None:
    if not isinstance(logits, Tensor):
        raise InvalidMessage(f"logits must be a tensor, got {type(logits).__name__}")
    allowed = (expected_dtype,) if expected_dtype is not None else WIRE_FLOAT_DTYPES
    if logits.dtype not in allowed:
        raise InvalidMessage(
            f"logits dtype {logits.dtype} not allowed; expected one of "
            f"{', '.join(str(d) for d in allowed)}"
        )
    if tuple(logits.shape) != (num_samples, num_classes):
        raise InvalidMessage(
            f"logits shape {tuple(logits.shape)} != expected {(num_samples, num_classes)}"
        )
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        raise InvalidMessage(f"logits hold {int((~finite).sum())} non-finite value(s) (NaN or inf)")
    if logits.numel() and float(logits.abs().max()) > max_abs_logit:
        raise InvalidMessage(
            f"logits magnitude {float(logits.abs().max()):.4g} exceeds the bound {max_abs_logit:g}"
        )


def _check_delta(
    delta: Mapping[str, Tensor] | None,
    *,
    generator_shapes: Mapping[str, tuple[int, ...]] | None,
    max_update_norm: float | None,
) -> float:
    if generator_shapes is None:
        if delta is not None:
            raise InvalidMessage("generator_update sent in a round that asked for logits only")
        return 0.0
    if delta is None:
        raise InvalidMessage("missing generator_update")
    missing = [name for name in generator_shapes if name not in delta]
    unknown = [name for name in delta if name not in generator_shapes]
    if missing or unknown:
        raise InvalidMessage(
            "generator_update names differ from the generator's: "
            f"missing {_names(missing)}; unknown {_names(unknown)}"
        )
    for name, tensor in delta.items():
        if not isinstance(tensor, Tensor):
            raise InvalidMessage(f"generator_update[{name!r}] is not a tensor")
        if tensor.dtype not in WIRE_FLOAT_DTYPES:
            raise InvalidMessage(
                f"generator_update[{name!r}] dtype {tensor.dtype} not allowed; "
                "expected torch.float16 or torch.float32"
            )
        if tuple(tensor.shape) != tuple(generator_shapes[name]):
            raise InvalidMessage(
                f"generator_update[{name!r}] shape {tuple(tensor.shape)} != generator's "
                f"{tuple(generator_shapes[name])}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidMessage(f"generator_update[{name!r}] holds non-finite values (NaN or inf)")
    norm = update_l2_norm(delta)
    if max_update_norm is not None and norm > max_update_norm:
        raise InvalidMessage(
            f"generator_update L2 norm {norm:.4g} exceeds the bound {max_update_norm:g}"
        )
    return norm


def validate_update(
    update: ClientUpdate,
    *,
    expected_round: int,
    num_samples: int,
    num_classes: int,
    generator_shapes: Mapping[str, tuple[int, ...]] | None,
    max_update_norm: float | None,
    max_abs_logit: float = 1e4,
    expected_logit_dtype: torch.dtype | None = None,
) -> float:
    """Check a decoded client update before the server uses it; return ||ΔG_k||_2 (0 if none).

    ``generator_shapes`` is None in mode ``logits_only`` (then the update must carry no ΔG), else
    the names and shapes ΔG must have (:func:`generator_update_shapes`). ``max_update_norm``
    bounds ||ΔG_k||_2 (None: no bound); ``max_abs_logit`` bounds |T_k(X)|. Raises
    :class:`InvalidMessage` on the first problem found.
    """
    report = update.report
    if report.protocol_version != PROTOCOL_VERSION:
        raise InvalidMessage(
            f"protocol_version {report.protocol_version} != expected {PROTOCOL_VERSION}"
        )
    if report.round != expected_round:
        raise InvalidMessage(f"reply is for round {report.round}, expected round {expected_round}")
    if report.class_histogram and len(report.class_histogram) != num_classes:
        raise InvalidMessage(
            f"report.class_histogram has {len(report.class_histogram)} entries, "
            f"expected {num_classes}"
        )
    _check_logits(
        update.logits,
        num_samples=num_samples,
        num_classes=num_classes,
        max_abs_logit=max_abs_logit,
        expected_dtype=expected_logit_dtype,
    )
    return _check_delta(
        update.generator_delta,
        generator_shapes=generator_shapes,
        max_update_norm=max_update_norm,
    )
