"""Oracle: a federation of one client without DP is ``fed-dfkd distill`` with that teacher.

With one owner, float32 logits on the wire and the same seed, the federated round is the central
round moved across a (simulated) network: the client's generator steps give ΔG with
G + ΔG = G after the central steps, the ensemble of one teacher is its logits, and every random
stream is derived from the seed and the round. So the final students must agree to float
tolerance, and the per-round test accuracies exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fed_dfkd.cli.main import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ORACLE = [
    "federation.rounds=3",
    "distill.student_steps=2",
    "method.generator_steps=1",
    "models.pretrain.epochs=2",
    "distill.batch_size=32",
    "method.negative_bank_size=64",
    "runtime.progress=none",
    "federation.num_clients=1",
    "distill.teacher_source=clients",
    "federation.logit_dtype=float32",
]


# G re-initialised every round and the student on the pool of every round's samples.
POOL = ["method.generator_reset=true", "distill.replay_rounds=10", "distill.replay_sampling=samples"]
# ... and G's steps fitting one seeded batch to assigned classes, that batch being the next draw.
ROUND_LATENTS = [*POOL, "method.generator_latents=round", "distill.pseudo_batches=1"]
# ... and from the second round on, one batch of pooled samples pushed towards the student's
# mistakes and one of blends of pooled pairs, labelled by the teacher with the round's batch.
HARD = [*ROUND_LATENTS, "distill.hard_samples=32", "distill.mixup_queries=32"]


def command(name: str, out: Path, *extra: str, overrides: list[str] = ()) -> list[str]:
    return [name, "--config", str(QUICKSTART), "--out", str(out),
            *[arg for override in [*ORACLE, *overrides] for arg in ("--set", override)], *extra]


def history(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())["history"]


def student(out: Path, engine_key: str) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return checkpoint[engine_key]["coordinator"]["student"]


@pytest.mark.parametrize("overrides", [[], POOL, ROUND_LATENTS, HARD],
                         ids=["default", "generator-reset-pool", "round-latents", "hard-and-mixup-queries"])
def test_a_one_client_federation_equals_central_distillation(tmp_path, overrides):
    teachers = tmp_path / "pretrain"
    assert main(command("pretrain", teachers)) == 0
    assert main(command("distill", tmp_path / "central", "--teachers", str(teachers),
                        overrides=overrides)) == 0
    assert main(command("simulate", tmp_path / "federated", "--teachers", str(teachers),
                        overrides=overrides)) == 0

    central, federated = history(tmp_path / "central"), history(tmp_path / "federated")
    assert [h["round"] for h in federated] == [h["round"] for h in central] == [1, 2, 3]
    assert [h["student_accuracy"] for h in federated] == [h["student_accuracy"] for h in central]
    assert all(h["replies"] == 1 for h in federated)

    if overrides is HARD:  # the round's batch, plus a hard and a blended batch from round 2 on
        final = torch.load(tmp_path / "federated" / "checkpoints" / "last.pt", map_location="cpu",
                           weights_only=False)
        pooled = [images.shape[:2] for images, _ in final["server"]["coordinator"]["replay"]["entries"]]
        assert pooled == [(1, 32), (3, 32), (3, 32)]
    central_student = student(tmp_path / "central", "engine")
    federated_student = student(tmp_path / "federated", "server")
    assert central_student.keys() == federated_student.keys()
    for name, tensor in central_student.items():
        torch.testing.assert_close(federated_student[name], tensor, atol=1e-5, rtol=0, msg=name)
    # The student did move: equality is not two untouched initialisations.
    first = torch.load(tmp_path / "federated" / "checkpoints" / "previous.pt", map_location="cpu",
                       weights_only=False)
    assert first["round"] == 2
    assert any(not torch.equal(first["server"]["coordinator"]["student"][k], v)
               for k, v in federated_student.items() if v.is_floating_point())
