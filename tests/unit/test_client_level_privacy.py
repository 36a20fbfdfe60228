"""Client-level mechanisms and ledgers (fed_dfkd.privacy.client_level): calibration, the identity
at σ = 0, the noise scale, and ledgers that count each round once."""

from __future__ import annotations

import math

import pytest
import torch

from fed_dfkd.config import config_from_dict
from fed_dfkd.privacy.accountants import accountant_epsilon
from fed_dfkd.privacy.client_level import (
    ClientLedger,
    clip_contribution,
    noise_contribution,
    plan_client_level,
    sampled_per_round,
)


def _cfg(**privacy):
    return config_from_dict({
        "privacy": {"level": "client", **privacy},
        "federation": {"num_clients": 20, "sample_rate": 0.25, "rounds": 30,
                       "update_aggregation": "mean", "min_replies": 1},
        "distill": {"ensemble": "mean"},
    })


def test_central_plan_calibrates_sigma_over_the_rounds_at_the_sampling_rate():
    plan = plan_client_level(_cfg(target_epsilon=3.0))
    assert plan.sample_rate == 5 / 20 and plan.rounds_accounted == 30
    assert plan.releases_per_round == 2
    assert plan.accounted_noise == pytest.approx(plan.noise_multiplier / math.sqrt(2))
    assert 3.0 - 0.02 <= plan.planned_epsilon() <= 3.0
    assert plan.epsilon_max == 3.0  # the target is the default budget


def test_local_plan_has_no_amplification_and_counts_expected_participations():
    plan = plan_client_level(_cfg(target_epsilon=3.0, mechanism="local"))
    assert plan.sample_rate == 1.0 and plan.rounds_accounted == math.ceil(30 * 5 / 20)
    assert 3.0 - 0.02 <= plan.planned_epsilon() <= 3.0
    central = plan_client_level(_cfg(target_epsilon=3.0))
    assert plan.noise_multiplier > central.noise_multiplier  # no amplification by sampling


def test_a_given_sigma_is_used_as_is_and_logits_only_is_one_release():
    cfg = config_from_dict({
        "privacy": {"level": "client", "noise_multiplier": 1.3},
        "federation": {"mode": "logits_only", "update_aggregation": "mean"},
        "distill": {"ensemble": "mean"},
    })
    plan = plan_client_level(cfg)
    assert plan.noise_multiplier == 1.3 and plan.releases_per_round == 1
    assert plan.accounted_noise == 1.3 and math.isinf(plan.epsilon_max)


def test_sampled_per_round_matches_the_server_rule():
    assert sampled_per_round(num_clients=100, sample_rate=0.1) == 10
    assert sampled_per_round(num_clients=3, sample_rate=0.1) == 1
    assert sampled_per_round(num_clients=5, sample_rate=1.0) == 5


def test_no_clipping_and_zero_noise_is_the_identity_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    logits = torch.randn(6, 10, generator=gen) * 30
    clipped, clipped_logits = clip_contribution(delta, logits, generator_clip=math.inf,
                                                logit_clip=math.inf)
    noisy, noisy_logits = noise_contribution(clipped, clipped_logits, noise_multiplier=0.0,
                                             generator_clip=math.inf, logit_clip=math.inf, rng=gen)
    assert all(torch.equal(noisy[k], delta[k]) for k in delta)
    assert torch.equal(noisy_logits, logits)


def test_clipping_bounds_the_update_jointly_and_each_logit_row():
    delta = {"w": torch.full((4,), 3.0), "b": torch.full((5,), 4.0)}  # norm sqrt(36 + 80)
    logits = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    clipped, rows = clip_contribution(delta, logits, generator_clip=1.0, logit_clip=1.0)
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in clipped.values()))
    assert norm == pytest.approx(1.0)
    torch.testing.assert_close(rows, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_noise_has_std_sigma_times_the_bound_and_sqrt_rows_for_logits():
    rng = torch.Generator().manual_seed(1)
    delta = {"w": torch.zeros(200_000)}
    logits = torch.zeros(16, 10_000)
    noisy, noisy_logits = noise_contribution(delta, logits, noise_multiplier=0.5,
                                             generator_clip=2.0, logit_clip=3.0, rng=rng)
    assert float(noisy["w"].std()) == pytest.approx(0.5 * 2.0, rel=0.01)
    assert float(noisy_logits.std()) == pytest.approx(0.5 * 3.0 * math.sqrt(16), rel=0.01)


def test_noise_needs_finite_bounds():
    with pytest.raises(ValueError, match="finite clip"):
        noise_contribution(None, torch.zeros(2, 2), noise_multiplier=1.0, generator_clip=1.0,
                           logit_clip=math.inf, rng=torch.Generator())


def test_central_ledger_counts_every_round_up_to_the_served_one_once():
    ledger = ClientLedger(accountant="rdp", delta=1e-5, epsilon_max=math.inf)
    ledger.spend_round(4, noise_multiplier=1.0, sample_rate=0.1, every_round=True)
    assert ledger.accountant.history == [(1.0, 0.1, 5)]
    ledger.spend_round(4, noise_multiplier=1.0, sample_rate=0.1, every_round=True)  # a retry
    ledger.spend_round(6, noise_multiplier=1.0, sample_rate=0.1, every_round=True)
    assert ledger.accountant.history == [(1.0, 0.1, 7)]
    assert ledger.epsilon == accountant_epsilon("rdp", ((1.0, 0.1, 7),), 1e-5)


def test_local_ledger_counts_one_release_per_served_round():
    ledger = ClientLedger(accountant="rdp", delta=1e-5, epsilon_max=math.inf)
    for r in (0, 3, 3, 9):
        ledger.spend_round(r, noise_multiplier=2.0, sample_rate=1.0, every_round=False)
    assert ledger.accountant.history == [(2.0, 1.0, 3)]
    assert ledger.epsilon_if(10, noise_multiplier=2.0, sample_rate=1.0, every_round=False) == \
        accountant_epsilon("rdp", ((2.0, 1.0, 4),), 1e-5)
    assert ledger.accountant.history == [(2.0, 1.0, 3)]  # a what-if spends nothing


def test_the_ledger_round_trips_and_refuses_another_budget():
    ledger = ClientLedger(accountant="prv", delta=1e-5, epsilon_max=8.0)
    ledger.spend_round(2, noise_multiplier=1.0, sample_rate=0.2, every_round=True)
    again = ClientLedger(accountant="prv", delta=1e-5, epsilon_max=8.0)
    again.load_state_dict(ledger.state_dict())
    assert again.epsilon == ledger.epsilon and again.rounds_recorded == 3
    other = ClientLedger(accountant="prv", delta=1e-5, epsilon_max=4.0)
    with pytest.raises(ValueError, match="epsilon_max"):
        other.load_state_dict(ledger.state_dict())


def test_an_owner_ledger_composes_its_runs_and_counts_each_round_once():
    import json

    from fed_dfkd.privacy.client_level import OwnerLedger

    owner = OwnerLedger(accountant="rdp", delta=1e-5, epsilon_max=math.inf)
    for r in (0, 1, 1):  # round 1 served twice (a retry): one release
        owner.spend_round("run-a", r, noise_multiplier=2.0, sample_rate=1.0, every_round=False)
    owner.spend_round("run-b", 0, noise_multiplier=2.0, sample_rate=1.0, every_round=False)
    assert owner.epsilon == accountant_epsilon("rdp", ((2.0, 1.0, 3),), 1e-5)
    assert owner.epsilon_if("run-a", 1, noise_multiplier=2.0, sample_rate=1.0,
                            every_round=False) == owner.epsilon
    assert owner.epsilon_if("run-b", 5, noise_multiplier=2.0, sample_rate=1.0,
                            every_round=False) == accountant_epsilon("rdp", ((2.0, 1.0, 4),), 1e-5)
    # Through JSON (the owner's file) and back: the same ledger, the same secret seeds.
    again = OwnerLedger(accountant="rdp", delta=1e-5, epsilon_max=math.inf)
    again.load_state_dict(json.loads(json.dumps(owner.state_dict(), allow_nan=False)))
    assert again.epsilon == owner.epsilon and again.noise_seeds == owner.noise_seeds
    assert again.run("run-a")[0].rounds_recorded == 2
    assert owner.noise_seeds["run-a"] != owner.noise_seeds["run-b"]


def test_an_owner_ledger_is_never_reinterpreted_under_another_budget():
    from fed_dfkd.privacy.client_level import OwnerLedger

    owner = OwnerLedger(accountant="rdp", delta=1e-5, epsilon_max=3.0)
    owner.spend_round("r", 0, noise_multiplier=1.0, sample_rate=1.0, every_round=False)
    for accountant, delta, budget in (("prv", 1e-5, 3.0), ("rdp", 1e-6, 3.0), ("rdp", 1e-5, 6.0)):
        with pytest.raises(ValueError, match="never reinterpreted"):
            OwnerLedger(accountant=accountant, delta=delta, epsilon_max=budget).load_state_dict(
                owner.state_dict())
