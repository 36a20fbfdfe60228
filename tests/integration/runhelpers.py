"""Helpers shared by the integration tests: reading a run folder and comparing states."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TIMING_KEYS = {"seconds", "wall_seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(*, rounds: int = 2, clients: int | None = 3, batch_size: int = 32) -> list[str]:
    """Overrides that shrink the quickstart to a federation of about a second: ``rounds`` rounds
    of one generator and two student steps, each on its own freshly labelled batch (no replay),
    2-epoch teachers (``clients=None`` keeps the config's number of clients)."""
    overrides = [
        f"federation.rounds={rounds}",
        "distill.student_steps=2",
        "distill.pseudo_batches=null",
        "distill.replay_rounds=0",
        "method.generator_steps=1",
        "models.pretrain.epochs=2",
        f"distill.batch_size={batch_size}",
        "method.negative_bank_size=64",
        "runtime.progress=none",
    ]
    if clients is not None:
        overrides.append(f"federation.num_clients={clients}")
    return overrides


def stop_before_round(monkeypatch: Any, round_index: int) -> Any:
    """Make the server stop as if by Ctrl-C when 0-based round ``round_index`` starts; returns the
    real ``ServerLoop.run_round`` (``monkeypatch.undo()`` or ``setattr`` it back to resume)."""
    import server.loop as loop

    original = loop.ServerLoop.run_round

    def stopped(self):
        if self.server.round == round_index:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.ServerLoop, "run_round", stopped)
    return original


def set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def load_checkpoint(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Bit-exact equality of nested checkpoint values (tensors, dicts, lists, Flower records)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif isinstance(a, RecordDict):
        assert isinstance(b, RecordDict) and repr(a) == repr(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
