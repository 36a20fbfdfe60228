"""fed_dfkd.privacy: accountants against Opacus's own numbers, calibration, persistence, budgets,
and the Gaussian mechanism (identity without DP, clipping norms, noise scale, seeding)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from fed_dfkd.privacy import (
    ACCOUNTANTS,
    BudgetExceeded,
    GaussianMechanism,
    PrivacyBudget,
    accountant_epsilon,
    clip_by_l2,
    clip_rows,
    epsilon_after,
    gaussian_noise_like,
    l2_norm,
    make_accountant,
    make_budget,
    noise_multiplier_for,
)
from fed_dfkd.registry import UnknownNameError

DELTA = 1e-5

# --------------------------------------------------------------------------------------------
# Accountants
# --------------------------------------------------------------------------------------------


def test_the_registry_offers_rdp_and_prv_and_never_gdp():
    assert ACCOUNTANTS.names() == ["prv", "rdp"]
    for name in ("rdp", "prv"):
        assert make_accountant(name).mechanism == name
    with pytest.raises(UnknownNameError, match="gdp.*valid: prv, rdp"):
        make_accountant("gdp")
    with pytest.raises(UnknownNameError):
        epsilon_after(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=DELTA, accountant="gdp")


# Values measured with Opacus 1.6.0 (shared/docs/platform.md §6.2).
PINNED = [
    ("rdp", 1.0, 1.0, 100, 96.116),
    ("prv", 1.0, 1.0, 100, 91.830),
    ("rdp", 1.0, 0.01, 1000, 2.101),
    ("prv", 1.0, 0.01, 1000, 1.838),
]


@pytest.mark.parametrize("name, sigma, q, steps, expected", PINNED)
def test_epsilon_matches_the_pinned_opacus_numbers(name, sigma, q, steps, expected):
    accountant = make_accountant(name)
    accountant.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert accountant.epsilon(delta=DELTA) == pytest.approx(expected, abs=1e-3)
    assert epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA,
                         accountant=name) == accountant.epsilon(delta=DELTA)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_equals_the_opacus_accountant_on_the_same_history(name):
    from opacus.accountants import create_accountant

    releases = [(1.0, 0.05)] * 30 + [(1.5, 0.1)] * 20 + [(1.0, 0.05)] * 10
    ours, oracle = make_accountant(name), create_accountant(mechanism=name)
    for sigma, q in releases:
        ours.step(noise_multiplier=sigma, sample_rate=q)
        oracle.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.history == oracle.history == [(1.0, 0.05, 30), (1.5, 0.1, 20), (1.0, 0.05, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = oracle.get_epsilon(delta=DELTA)
    assert ours.epsilon(delta=DELTA) == expected
    assert 0 < expected < math.inf


def test_steps_collapse_like_single_steps_and_history_is_a_copy():
    one_by_one, at_once = make_accountant("rdp"), make_accountant("rdp")
    for _ in range(7):
        one_by_one.step(noise_multiplier=1.2, sample_rate=0.1)
    at_once.step(noise_multiplier=1.2, sample_rate=0.1, steps=3)
    at_once.step(noise_multiplier=1.2, sample_rate=0.1, steps=4)
    assert one_by_one.history == at_once.history == [(1.2, 0.1, 7)]
    at_once.step(noise_multiplier=1.2, sample_rate=0.2, steps=2)
    assert at_once.history == [(1.2, 0.1, 7), (1.2, 0.2, 2)]
    assert at_once.total_steps == 9
    at_once.history.clear()
    assert len(at_once.history) == 2


def test_epsilon_is_cumulative_and_monotone():
    accountant = make_accountant("rdp")
    assert accountant.epsilon(delta=DELTA) == 0.0
    previous = 0.0
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        now = accountant.epsilon(delta=DELTA)
        assert now > previous
        previous = now
    assert previous == epsilon_after(noise_multiplier=1.0, sample_rate=0.01, steps=300,
                                     delta=DELTA, accountant="rdp")


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_no_noise_is_infinite_epsilon(name):
    accountant = make_accountant(name)
    accountant.step(noise_multiplier=2.0, sample_rate=0.5, steps=3)
    accountant.step(noise_multiplier=0.0, sample_rate=0.5)
    assert accountant.epsilon(delta=DELTA) == math.inf


@pytest.mark.parametrize("kwargs, error", [
    (dict(noise_multiplier=1.0, sample_rate=0.0), ValueError),
    (dict(noise_multiplier=1.0, sample_rate=1.5), ValueError),
    (dict(noise_multiplier=-1.0, sample_rate=0.5), ValueError),
    (dict(noise_multiplier=float("nan"), sample_rate=0.5), ValueError),
    (dict(noise_multiplier=float("inf"), sample_rate=0.5), ValueError),
    (dict(noise_multiplier=1.0, sample_rate=0.5, steps=0), ValueError),
    (dict(noise_multiplier=1.0, sample_rate=0.5, steps=2.0), TypeError),
    (dict(noise_multiplier="1", sample_rate=0.5), TypeError),
])
def test_bad_releases_are_rejected_and_leave_the_history_alone(kwargs, error):
    accountant = make_accountant("rdp")
    accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    with pytest.raises(error):
        accountant.step(**kwargs)
    assert accountant.history == [(1.0, 0.5, 1)]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_delta_must_be_in_the_open_unit_interval(delta):
    accountant = make_accountant("rdp")
    accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="delta"):
        accountant.epsilon(delta=delta)


def test_harmless_opacus_warnings_are_silenced_only_around_our_calls():
    from opacus.accountants import RDPAccountant

    # The same history makes Opacus itself warn, so this test can fail.
    history = [(50.0, 0.01, 1)]
    oracle = RDPAccountant()
    oracle.history = list(history)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        oracle.get_epsilon(delta=DELTA)
    assert any("Optimal order" in str(w.message) for w in seen)

    filters_before = list(warnings.filters)
    accountant_epsilon.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        accountant_epsilon("rdp", tuple(history), DELTA)
        warnings.warn("an unrelated warning still shows", UserWarning)
    assert [str(w.message) for w in seen] == ["an unrelated warning still shows"]
    assert warnings.filters == filters_before


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_state_dict_round_trips_through_json(name):
    accountant = make_accountant(name)
    accountant.step(noise_multiplier=1.0, sample_rate=0.01, steps=500)
    accountant.step(noise_multiplier=0.8, sample_rate=0.02, steps=100)
    state = accountant.state_dict()
    assert state == {"mechanism": name, "sigma": [1.0, 0.8], "q": [0.01, 0.02],
                     "steps": [500, 100]}
    assert all(type(state[key]) is list for key in ("sigma", "q", "steps"))
    restored = make_accountant(name)
    restored.load_state_dict(json.loads(json.dumps(state, allow_nan=False)))
    assert restored.history == accountant.history
    assert restored.epsilon(delta=DELTA) == accountant.epsilon(delta=DELTA)


def test_state_dict_fits_a_flower_config_record():
    records = pytest.importorskip("flwr.app")
    accountant = make_accountant("rdp")
    assert dict(records.ConfigRecord(accountant.state_dict())) == accountant.state_dict()
    accountant.step(noise_multiplier=1.1, sample_rate=0.1, steps=3)
    restored = make_accountant("rdp")
    restored.load_state_dict(dict(records.ConfigRecord(accountant.state_dict())))
    assert restored.history == [(1.1, 0.1, 3)]


def test_load_state_dict_rejects_a_foreign_or_broken_state():
    rdp, prv = make_accountant("rdp"), make_accountant("prv")
    rdp.step(noise_multiplier=1.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="'rdp'"):
        prv.load_state_dict(rdp.state_dict())
    with pytest.raises(ValueError, match="differ in length"):
        rdp.load_state_dict({"mechanism": "rdp", "sigma": [1.0], "q": [], "steps": [1]})
    with pytest.raises(ValueError, match="lacks steps"):
        rdp.load_state_dict({"mechanism": "rdp", "sigma": [1.0], "q": [0.5]})
    with pytest.raises(ValueError, match="sample_rate"):
        rdp.load_state_dict({"mechanism": "rdp", "sigma": [1.0], "q": [2.0], "steps": [1]})
    assert rdp.history == [(1.0, 0.5, 1)]


def test_copy_is_independent():
    accountant = make_accountant("rdp")
    accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    twin = accountant.copy()
    twin.step(noise_multiplier=1.0, sample_rate=0.5)
    assert accountant.history == [(1.0, 0.5, 1)] and twin.history == [(1.0, 0.5, 2)]
    assert type(twin) is type(accountant)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q, steps, expected", [(1.0, 100, 6.377), (0.01, 1000, 0.6158)])
def test_rdp_calibration_matches_the_pinned_opacus_numbers(q, steps, expected):
    sigma = noise_multiplier_for(target_epsilon=8.0, delta=DELTA, sample_rate=q, steps=steps,
                                 accountant="rdp")
    assert sigma == pytest.approx(expected, abs=1e-3)
    reached = epsilon_after(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA,
                            accountant="rdp")
    assert 8.0 - 0.01 <= reached <= 8.0  # Opacus's default tolerance, never above the target


def test_prv_calibration_round_trip():
    tolerance = 0.25  # coarse, to keep PRV's bisection to a few evaluations
    sigma = noise_multiplier_for(target_epsilon=4.0, delta=DELTA, sample_rate=1.0, steps=10,
                                 accountant="prv", epsilon_tolerance=tolerance)
    reached = epsilon_after(noise_multiplier=sigma, sample_rate=1.0, steps=10, delta=DELTA,
                            accountant="prv")
    assert 4.0 - tolerance <= reached <= 4.0


def test_calibration_edges():
    assert noise_multiplier_for(target_epsilon=math.inf, delta=DELTA, sample_rate=0.1, steps=10,
                                accountant="rdp") == 0.0
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=0.0, delta=DELTA, sample_rate=0.1, steps=10,
                             accountant="rdp")
    # RDP's conversion cannot go below log(1/δ)/(α_max − 1) ≈ 0.19: out of reach, said so.
    with pytest.raises(ValueError, match="cannot reach"):
        noise_multiplier_for(target_epsilon=0.01, delta=DELTA, sample_rate=1.0, steps=1,
                             accountant="rdp")


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------

ROUND = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100)  # one round of releases


def _epsilon_after_rounds(rounds: int) -> float:
    return epsilon_after(noise_multiplier=1.0, sample_rate=0.01, steps=100 * rounds,
                         delta=DELTA, accountant="rdp")


@pytest.mark.parametrize("between", [True, False])
def test_the_budget_refuses_exactly_the_release_that_would_exceed_it(between):
    eps3, eps4 = _epsilon_after_rounds(3), _epsilon_after_rounds(4)
    # Strictly between the 3rd and 4th release, or exactly at the 3rd (ε ≤ ε_max is allowed).
    epsilon_max = (eps3 + eps4) / 2 if between else eps3
    budget = make_budget(epsilon_max=epsilon_max, delta=DELTA, accountant="rdp")
    released = 0
    while budget.can_release(**ROUND):
        budget.spend(**ROUND)
        released += 1
        assert released <= 10
    assert released == 3
    assert budget.epsilon == eps3 <= epsilon_max
    history = budget.accountant.history
    with pytest.raises(BudgetExceeded) as caught:
        budget.spend(**ROUND)
    assert caught.value.epsilon_after == eps4 > epsilon_max
    assert budget.accountant.history == history  # a refused spend records nothing


def test_can_release_never_changes_the_ledger():
    budget = make_budget(epsilon_max=100.0, delta=DELTA, accountant="rdp")
    budget.spend(**ROUND)
    before = budget.accountant.history
    assert budget.can_release(noise_multiplier=0.5, sample_rate=0.2, steps=50)
    assert budget.epsilon_if(**ROUND) == _epsilon_after_rounds(2)
    assert budget.accountant.history == before


def test_a_checked_sequence_of_mixed_releases_never_exceeds_the_budget():
    budget = make_budget(epsilon_max=3.0, delta=DELTA, accountant="rdp")
    releases = [(1.0, 0.01, 200), (2.0, 0.05, 50), (0.8, 0.01, 300), (5.0, 1.0, 1)] * 4
    refused = 0
    for sigma, q, steps in releases:
        if budget.can_release(noise_multiplier=sigma, sample_rate=q, steps=steps):
            budget.spend(noise_multiplier=sigma, sample_rate=q, steps=steps)
        else:
            refused += 1
        assert budget.epsilon <= 3.0
    assert refused > 0 and budget.accountant.total_steps > 0


def test_the_ledger_survives_a_restart_without_double_counting():
    budget = make_budget(epsilon_max=5.0, delta=DELTA, accountant="prv")
    budget.spend(**ROUND)
    budget.spend(noise_multiplier=1.5, sample_rate=0.02, steps=50)
    saved = json.loads(json.dumps(budget.state_dict()))

    restarted = make_budget(epsilon_max=5.0, delta=DELTA, accountant="prv")
    restarted.load_state_dict(saved)
    assert restarted.accountant.history == budget.accountant.history
    assert restarted.epsilon == budget.epsilon
    # Loading the same ledger twice replaces it; it does not add it again.
    restarted.load_state_dict(saved)
    assert restarted.epsilon == budget.epsilon

    with pytest.raises(ValueError, match="epsilon_max"):
        make_budget(epsilon_max=6.0, delta=DELTA, accountant="prv").load_state_dict(saved)
    with pytest.raises(ValueError, match="'prv'"):
        make_budget(epsilon_max=5.0, delta=DELTA, accountant="rdp").load_state_dict(saved)


def test_an_infinite_budget_accounts_but_never_refuses():
    budget = PrivacyBudget(epsilon_max=math.inf, delta=DELTA, accountant=make_accountant("rdp"))
    assert budget.can_release(noise_multiplier=0.0, sample_rate=1.0, steps=1000)
    budget.spend(**ROUND)
    assert budget.epsilon == _epsilon_after_rounds(1)
    budget.spend(noise_multiplier=0.0, sample_rate=1.0)
    assert budget.epsilon == math.inf
    with pytest.raises(ValueError):
        budget.can_release(noise_multiplier=1.0, sample_rate=0.0)
    assert json.loads(json.dumps(budget.state_dict()))["epsilon_max"] == math.inf


@pytest.mark.parametrize("epsilon_max, delta",
                         [(0.0, DELTA), (-1.0, DELTA), (1.0, 0.0), (1.0, 1.0)])
def test_a_budget_needs_positive_epsilon_and_delta_in_the_unit_interval(epsilon_max, delta):
    with pytest.raises(ValueError):
        make_budget(epsilon_max=epsilon_max, delta=delta, accountant="rdp")


# --------------------------------------------------------------------------------------------
# Mechanisms
# --------------------------------------------------------------------------------------------


def _release() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"weight": torch.randn(4, 3, generator=g) * 10, "bias": torch.randn(3, generator=g)}


def test_no_noise_and_no_clipping_is_exactly_the_identity():
    mechanism = GaussianMechanism(clip=math.inf, noise_multiplier=0.0)
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    release = _release()
    out = mechanism.release(release, rng=rng)
    assert out.keys() == release.keys()
    assert all(torch.equal(out[k], release[k]) and out[k] is not release[k] for k in release)
    single = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 1e6
    assert torch.equal(mechanism.release(single, rng=rng), single)
    assert torch.equal(rng.get_state(), state)  # nothing drawn
    assert mechanism.noise_std == 0.0


def test_noisy_mechanism_needs_a_finite_clip():
    with pytest.raises(ValueError, match="finite clip"):
        GaussianMechanism(clip=math.inf, noise_multiplier=1.0)
    for clip, sigma in [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1), (1.0, math.nan)]:
        with pytest.raises(ValueError):
            GaussianMechanism(clip=clip, noise_multiplier=sigma)


def test_clip_by_l2_is_joint_over_all_tensors():
    release = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert l2_norm(release) == 5.0
    clipped, norm = clip_by_l2(release, max_norm=1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    assert l2_norm(clipped) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(release["a"], torch.tensor([3.0, 0.0]))  # input untouched

    loose, norm = clip_by_l2(release, max_norm=5.0)  # at the bound: unchanged
    assert norm == 5.0 and all(torch.equal(loose[k], release[k]) for k in release)

    single, norm = clip_by_l2(torch.tensor([6.0, 8.0]), max_norm=5.0)
    assert norm == 10.0 and torch.allclose(single, torch.tensor([3.0, 4.0]))


def test_clip_by_l2_rejects_what_it_cannot_bound():
    with pytest.raises(ValueError, match="dtype"):
        clip_by_l2({"count": torch.tensor([1, 2])}, max_norm=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_by_l2(torch.tensor([1.0, math.inf]), max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_l2(torch.ones(2), max_norm=0.0)


def test_clip_rows_bounds_each_row():
    logits = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, norms = clip_rows(logits, max_norm=1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 0.0]))
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.equal(clipped[1:], logits[1:])  # rows within the bound are exact
    unclipped, _ = clip_rows(logits, max_norm=math.inf)
    assert torch.equal(unclipped, logits)


def test_noise_has_the_calibrated_standard_deviation():
    mechanism = GaussianMechanism(clip=2.0, noise_multiplier=1.5)
    assert mechanism.noise_std == 3.0
    zeros = torch.zeros(200_000)  # norm 0: clipping leaves it alone, so out is the noise
    out = mechanism.release(zeros, rng=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(3.0, rel=0.05)
    assert abs(out.mean().item()) < 5 * 3.0 / math.sqrt(zeros.numel())


def test_release_clips_before_adding_noise():
    big = torch.full((10_000,), 100.0)  # norm 1e4, clipped to 1: each entry 0.01
    out = GaussianMechanism(clip=1.0, noise_multiplier=0.5).release(
        big, rng=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(0.01, abs=5 * 0.5 / math.sqrt(big.numel()))
    assert out.std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.equal(big, torch.full((10_000,), 100.0))


def test_seeded_noise_is_reproducible_and_the_seed_matters():
    mechanism = GaussianMechanism(clip=1.0, noise_multiplier=1.0)
    first = mechanism.release(_release(), rng=torch.Generator().manual_seed(7))
    again = mechanism.release(_release(), rng=torch.Generator().manual_seed(7))
    other = mechanism.release(_release(), rng=torch.Generator().manual_seed(8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["weight"], other["weight"])


def test_gaussian_noise_like_keeps_structure_and_draws_nothing_at_zero():
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    release = {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(4)}
    zeros = gaussian_noise_like(release, std=0.0, rng=rng)
    assert torch.equal(rng.get_state(), state)
    assert all(torch.equal(zeros[k], torch.zeros_like(release[k])) for k in release)
    noise = gaussian_noise_like(release, std=1.0, rng=rng)
    assert {k: (v.shape, v.dtype) for k, v in noise.items()} == \
        {k: (v.shape, v.dtype) for k, v in release.items()}
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(release, std=-1.0, rng=rng)
