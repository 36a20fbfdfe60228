"""A client's state across rounds, kept in Flower's ``Context.state`` (DESIGN.md §3, §4).

The :class:`~fed_dfkd.teacher_host.TeacherHost`'s state (G's Adam moments, the method's negative
bank, projection and random stream) is serialised with ``torch.save`` into bytes and stored in one
ConfigRecord of ``context.state``, so it survives in every engine: deployment starts a process
per message and only ``Context.state`` carries over, simulation may reuse one host for several
nodes.

Next to the state after the last served round the record keeps the state *before* it, so a round
the server sends again (a retry, or a server resumed after a crash mid-round) is served from
exactly the same start and gets the same answer.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, RecordDict

#: Name of the ConfigRecord in ``context.state`` that holds the host state.
HOST_STATE_RECORD = "fed_dfkd.teacher_host"

_ROUND_KEY = "round"
_STATE_KEY = "state"
_PREVIOUS_KEY = "previous_state"
_HOST_KEY = "host_key"


def encode_state(state: Mapping[str, Any]) -> bytes:
    """``torch.save`` of a host's ``state_dict()`` into bytes."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def decode_state(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_state`, on the CPU. ``weights_only``: the state holds tensors and
    plain values only, so nothing is unpickled."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"stored host state is a {type(state).__name__}, not a dict")
    return state


@dataclass(frozen=True, kw_only=True)
class StoredHostState:
    """What ``context.state`` holds for a host.

    ``state`` is the host state after serving round ``round``; ``previous_state`` the state it
    started that round from. ``host_key`` names the experiment config and teacher that produced
    them, so a state is never loaded into another host.
    """

    round: int
    state: bytes
    previous_state: bytes
    host_key: str


def read_host_state(context_state: RecordDict) -> StoredHostState | None:
    """The stored host state, or None when this node has served no round yet.

    A record that is there but malformed raises ``ValueError`` naming what is wrong: starting
    from scratch would silently drop the negative bank (and, later, privacy accounting).
    """
    if HOST_STATE_RECORD not in context_state:
        return None
    record = context_state[HOST_STATE_RECORD]
    if not isinstance(record, ConfigRecord):
        raise ValueError(
            f"context.state[{HOST_STATE_RECORD!r}] is a {type(record).__name__}, not a ConfigRecord"
        )
    expected = {_ROUND_KEY: int, _STATE_KEY: bytes, _PREVIOUS_KEY: bytes, _HOST_KEY: str}
    for key, kind in expected.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"context.state[{HOST_STATE_RECORD!r}][{key!r}] must be {kind.__name__}, "
                f"got {type(value).__name__}"
            )
    return StoredHostState(
        round=record[_ROUND_KEY],
        state=record[_STATE_KEY],
        previous_state=record[_PREVIOUS_KEY],
        host_key=record[_HOST_KEY],
    )


def write_host_state(context_state: RecordDict, stored: StoredHostState) -> None:
    """Store (replace) the host state in ``context_state``."""
    context_state[HOST_STATE_RECORD] = ConfigRecord(
        {
            _ROUND_KEY: stored.round,
            _STATE_KEY: stored.state,
            _PREVIOUS_KEY: stored.previous_state,
            _HOST_KEY: stored.host_key,
        }
    )


# --- the owner's privacy ledger -------------------------------------------------------------------


def read_owner_ledger(path: Path) -> dict[str, Any] | None:
    """The owner's ledger state kept in ``path`` (JSON), or None when there is none yet.

    A file that is there but unreadable raises ``ValueError``: starting a fresh ledger would
    forget the privacy already spent.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"privacy ledger {path} is damaged: {error}") from error
    if not isinstance(state, dict) or "runs" not in state:
        raise ValueError(f"privacy ledger {path} is not a ledger (no 'runs')")
    return state


def write_owner_ledger(path: Path, state: Mapping[str, Any]) -> None:
    """Replace the ledger in ``path`` atomically (a crash leaves the old or the new one)."""
    from fed_dfkd.runs import atomic_write_json

    atomic_write_json(path, dict(state))


# --- the owner's copy of its host state -----------------------------------------------------------


def write_host_state_file(path: Path, stored: StoredHostState) -> None:
    """Keep ``stored`` in ``path`` too (atomically): a new Flower run starts with an empty
    ``Context.state``, and a resumed server is a new Flower run in a deployment."""
    from fed_dfkd.runs import atomic_torch_save

    atomic_torch_save({
        "round": stored.round,
        "host_key": stored.host_key,
        "state": torch.frombuffer(bytearray(stored.state), dtype=torch.uint8),
        "previous_state": torch.frombuffer(bytearray(stored.previous_state), dtype=torch.uint8),
    }, path)


def read_host_state_file(path: Path) -> StoredHostState | None:
    """The host state kept in ``path``, or None when there is none; ``ValueError`` if damaged."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return StoredHostState(
            round=int(data["round"]), host_key=str(data["host_key"]),
            state=bytes(data["state"].numpy().tobytes()),
            previous_state=bytes(data["previous_state"].numpy().tobytes()),
        )
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise ValueError(f"{path}: {type(error).__name__}: {error}") from error
