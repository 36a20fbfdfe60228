"""Client-level DP in a simulated federation (issue 4): oracles, the accountant, budgets, resume.

- σ = 0 with no clipping equals the run without DP (central: within float summation order;
  local: bit-identical);
- the reported ε is the Opacus accountant's own number for the run's (σ, q, rounds) history;
- a client refuses the exact release that would exceed ε_max, the server stops cleanly with a
  report that says why, and no ε beyond the budget is ever recorded;
- the ledger survives a server restart: nothing double-spent, nothing forgotten.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import server.loop as loop
from fed_dfkd.cli.main import main
from runhelpers import PNG_MAGIC, QUICKSTART, load_checkpoint, read_metrics, read_report, set_args, stop_before_round, tiny

pytestmark = pytest.mark.integration

ROUNDS = 3
FAST = [
    *tiny(rounds=ROUNDS),
    # Client-level DP keeps histograms and sizes private: plain means.
    "distill.ensemble=mean",
    "federation.update_aggregation=mean",
]
CENTRAL = ["privacy.level=client", "privacy.mechanism=central"]
LOCAL = ["privacy.level=client", "privacy.mechanism=local"]
NO_CLIP = ["privacy.noise_multiplier=0", "privacy.generator_clip=.inf", "privacy.logit_clip=.inf"]


def simulate(out: Path, teachers: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["simulate", "--config", str(QUICKSTART), "--out", str(out), "--teachers", str(teachers),
            *set_args([*FAST, *overrides])]
    return main([*argv, "--resume"] if resume else argv)


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST)]) == 0
    return out


@pytest.fixture(scope="module")
def no_dp_run(tmp_path_factory, teachers) -> Path:
    out = tmp_path_factory.mktemp("run") / "none"
    assert simulate(out, teachers) == 0
    return out


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out)["server"]["coordinator"]["student"]


def test_local_mechanism_with_zero_noise_and_no_clipping_is_bit_identical_to_no_dp(no_dp_run, tmp_path, teachers):
    out = tmp_path / "local0"
    assert simulate(out, teachers, *LOCAL, *NO_CLIP) == 0
    for name, tensor in _student(no_dp_run).items():
        assert torch.equal(_student(out)[name], tensor), name
    report = read_report(out)
    assert report["privacy_level"] == "client" and report["privacy_mechanism"] == "local"
    # σ = 0 is no privacy, said plainly (JSON has no infinity).
    assert report["epsilon"] is None and report["epsilon_infinite"] is True


def test_central_mechanism_with_zero_noise_and_no_clipping_equals_no_dp(no_dp_run, tmp_path, teachers):
    out = tmp_path / "central0"
    assert simulate(out, teachers, *CENTRAL, *NO_CLIP) == 0
    expected = _student(no_dp_run)
    for name, tensor in _student(out).items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=1e-4, msg=name)
    got = [m["student_accuracy"] for m in read_metrics(out)]
    assert got == pytest.approx([m["student_accuracy"] for m in read_metrics(no_dp_run)], abs=0.02)


def test_central_epsilon_is_the_opacus_accountants_number_per_round(tmp_path, teachers):
    out = tmp_path / "central"
    assert simulate(out, teachers, *CENTRAL, "privacy.noise_multiplier=1.2") == 0
    # All 3 clients sampled (q = 1); ΔG and logits released together: σ/√2 per round.
    sigma = 1.2 / math.sqrt(2)
    metrics = read_metrics(out)
    for r, record in enumerate(metrics, start=1):
        assert record["epsilon"] == pytest.approx(opacus_epsilon([(sigma, 1.0, r)]), rel=1e-9)
    report = read_report(out)
    assert report["epsilon"] == pytest.approx(opacus_epsilon([(sigma, 1.0, ROUNDS)]), rel=1e-9)
    assert report["delta"] == 1e-5 and report["accountant"] == "rdp"
    assert report["per_client_epsilon"] == {str(k): report["epsilon"] for k in range(3)}
    assert report["secure_rng"] is False
    assert (out / "plots" / "epsilon.png").read_bytes().startswith(PNG_MAGIC)


def test_a_target_epsilon_is_met_not_exceeded(tmp_path, teachers):
    out = tmp_path / "target"
    assert simulate(out, teachers, *CENTRAL, "privacy.target_epsilon=4") == 0
    report = read_report(out)
    assert 4 - 0.02 <= report["epsilon"] <= 4.0


def test_a_client_refuses_the_exact_release_past_its_budget_and_the_server_stops_cleanly(tmp_path, teachers):
    sigma = 2.0
    # Local mode: every served round is one release at q = 1 with σ/√2 accounted.
    after_two = opacus_epsilon([(sigma / math.sqrt(2), 1.0, 2)])
    after_three = opacus_epsilon([(sigma / math.sqrt(2), 1.0, 3)])
    budget = (after_two + after_three) / 2
    out = tmp_path / "budget"
    assert simulate(out, teachers, *LOCAL, f"privacy.noise_multiplier={sigma}",
                    f"privacy.epsilon_max={budget}") == 0
    report = read_report(out)
    assert report["rounds_completed"] == 2
    assert report["status"] == "budget_exhausted" and "budget" in report["stop_reason"]
    assert report["refusal_reasons"] == {"budget_exhausted": report["refusals"]}
    assert report["refusals"] == 3 * (loop.ROUND_RETRIES + 1)
    assert report["epsilon_max"] == pytest.approx(budget)
    for epsilon in report["per_client_epsilon"].values():
        assert epsilon == pytest.approx(after_two, rel=1e-9) and epsilon <= budget
    assert max(m["epsilon"] for m in read_metrics(out)) <= budget


@pytest.mark.parametrize("mechanism", ["central", "local"])
def test_the_ledger_survives_a_server_restart(tmp_path, teachers, monkeypatch, capsys, mechanism):
    dp = ["privacy.level=client", f"privacy.mechanism={mechanism}", "privacy.noise_multiplier=1.5"]
    whole = tmp_path / "whole"
    assert simulate(whole, teachers, *dp) == 0
    out = tmp_path / "restarted"
    stop_before_round(monkeypatch, 2)  # Ctrl-C as round 3 starts
    assert simulate(out, teachers, *dp) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert simulate(out, teachers, *dp, resume=True) == 0
    resumed, uninterrupted = read_report(out), read_report(whole)
    assert resumed["epsilon"] == pytest.approx(uninterrupted["epsilon"], rel=1e-12)
    assert resumed["per_client_epsilon"] == pytest.approx(uninterrupted["per_client_epsilon"], rel=1e-12)
    assert [m["epsilon"] for m in read_metrics(out)] == pytest.approx(
        [m["epsilon"] for m in read_metrics(whole)], rel=1e-12)
    if mechanism == "central":
        ledger = load_checkpoint(out)["server"]["privacy"]["ledger"]
        assert ledger["steps"] == [ROUNDS] and ledger["rounds_recorded"] == ROUNDS


def test_owners_that_lost_their_context_state_still_charge_nothing_twice(tmp_path, teachers, monkeypatch, capsys):
    """A deployment's server restart starts a new Flower run: Context.state is empty again. The
    owners' ledger files (here OUT/owners) carry the spend and the run's noise seeds."""
    import json

    dp = [*LOCAL, "privacy.noise_multiplier=1.5"]
    whole = tmp_path / "whole"
    assert simulate(whole, teachers, *dp) == 0
    out = tmp_path / "restarted"
    original = stop_before_round(monkeypatch, 2)  # Ctrl-C as round 3 starts
    assert simulate(out, teachers, *dp) == 130
    monkeypatch.setattr(loop.ServerLoop, "run_round", original)
    # The clients come back with nothing: no Context.state restored from the checkpoint.
    monkeypatch.setattr(loop.NodeStateStore, "load", lambda self, grid, files: None)
    from client.app import clear_host_cache

    clear_host_cache()
    capsys.readouterr()
    assert simulate(out, teachers, *dp, resume=True) == 0
    assert read_report(out)["per_client_epsilon"] == pytest.approx(
        read_report(whole)["per_client_epsilon"], rel=1e-12)
    for k in range(3):
        kept = json.loads((out / "owners" / f"client_{k}.ledger.json").read_text())
        (run,) = kept["runs"].values()  # one run, across the restart
        assert run["ledger"]["steps"] == [ROUNDS] and run["ledger"]["rounds_recorded"] == ROUNDS
