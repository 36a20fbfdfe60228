"""Client-level differential privacy for the rounds of a federation (DESIGN.md §4).

One client's contribution to a round is its generator update ΔG_k and its logits T_k(X) on the
round's N pseudo-samples. Both are clipped, ΔG_k jointly to L2 norm C_g, every logit row to
C_l (so the whole logit matrix to C_l·√N), and Gaussian noise of standard deviation σ times the
bound is added:

* ``central`` (trusted aggregator, as DP-FedAvg, McMahan et al. 2018): the server clips each
  reply, sums, adds N(0, (σC_g)²) to ΣΔG and N(0, (σC_l√N)²) to Σ logits, and divides by the
  number of clients it samples, m. One accountant, sampling rate q = m / K, one step per round.
* ``local``: each client clips and noises its own release before it leaves. Its participation
  is visible, so there is no amplification by sampling: q = 1, one step per release, one
  accountant per client.

Two releases with the same σ on sensitivities C_g and C_l√N are, jointly, one Gaussian mechanism
on the concatenation (ΔG/C_g, logits/(C_l√N)) of sensitivity √2 with noise σ: the accountant
records σ/√2 per round in mode ``generator_and_logits`` and σ in ``logits_only`` (one release).

The m sampled clients are drawn without replacement, a fixed number per round; the accountant
treats each round as Poisson sampling at q = m/K, the usual approximation (as in DP-FedAvg
implementations). The noise comes from torch's seeded PRNG, not a cryptographically secure one
(Opacus's ``secure_mode`` needs torchcsprng, which has no build here): see docs/privacy.md.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_dfkd.privacy.accountants import accountant_epsilon, make_accountant, noise_multiplier_for
from fed_dfkd.privacy.mechanisms import clip_by_l2, clip_rows, gaussian_noise_like
from fed_dfkd.protocol import PrivacySpecData

logger = logging.getLogger(__name__)

__all__ = [
    "ClientLevelPlan",
    "ClientLedger",
    "OwnerLedger",
    "clip_contribution",
    "noise_contribution",
    "plan_client_level",
    "sampled_per_round",
]


def sampled_per_round(*, num_clients: int, sample_rate: float) -> int:
    """m = max(1, round(q x K)), the clients the server samples each round (server.loop)."""
    return min(num_clients, max(1, round(sample_rate * num_clients)))


@dataclass(frozen=True, kw_only=True)
class ClientLevelPlan:
    """The numbers of a run's client-level mechanism, fixed before round 1.

    ``noise_multiplier`` σ is per release (noise std = σ x clip bound); ``accounted_noise`` is
    the σ the accountant records per round (σ/√2 when ΔG and logits are both released);
    ``sample_rate`` the accountant's q (m/K in central mode, 1 in local mode) and
    ``rounds_accounted`` the steps the calibration assumed (rounds, or a client's expected
    participations in local mode).
    """

    mechanism: str
    noise_multiplier: float
    generator_clip: float
    logit_clip: float
    releases_per_round: int
    sample_rate: float
    rounds_accounted: int
    delta: float
    accountant: str
    target_epsilon: float | None
    epsilon_max: float

    @property
    def accounted_noise(self) -> float:
        return self.noise_multiplier / math.sqrt(self.releases_per_round)

    def round_spec(self) -> PrivacySpecData:
        """The ``RoundSpec.privacy`` that carries this plan to the clients."""
        return PrivacySpecData(level=self.mechanism, generator_clip=self.generator_clip,
                               logit_clip=self.logit_clip, noise_multiplier=self.noise_multiplier,
                               delta=self.delta)

    def planned_epsilon(self) -> float:
        """ε at δ after the planned releases (∞ with σ = 0)."""
        if self.noise_multiplier == 0.0:
            return math.inf
        entry = (self.accounted_noise, self.sample_rate, self.rounds_accounted)
        return accountant_epsilon(self.accountant, (entry,), self.delta)


def plan_client_level(cfg: Any) -> ClientLevelPlan:
    """Calibrate σ for ``cfg`` (an ExperimentConfig with ``privacy.level == "client"``).

    With ``privacy.target_epsilon`` the whole run's ε at δ is the target: in central mode over
    ``federation.rounds`` steps at q = m/K, in local mode over a client's expected number of
    participations, ⌈rounds x m/K⌉, at q = 1 (a client sampled more often than that refuses
    once its ``epsilon_max``, by default the target, would be exceeded).
    """
    pr, fe = cfg.privacy, cfg.federation
    if pr.level != "client":
        raise ValueError(f"plan_client_level needs privacy.level client, got {pr.level!r}")
    m = sampled_per_round(num_clients=fe.num_clients, sample_rate=fe.sample_rate)
    releases = 2 if fe.mode == "generator_and_logits" else 1
    if pr.mechanism == "central":
        q, steps = m / fe.num_clients, fe.rounds
    else:
        q, steps = 1.0, max(1, math.ceil(fe.rounds * m / fe.num_clients))
    if pr.target_epsilon is not None:
        accounted = noise_multiplier_for(target_epsilon=pr.target_epsilon, delta=pr.delta,
                                         sample_rate=q, steps=steps, accountant=pr.accountant)
        sigma = accounted * math.sqrt(releases)
    else:
        sigma = float(pr.noise_multiplier)
    epsilon_max = pr.epsilon_max if pr.epsilon_max is not None else (
        pr.target_epsilon if pr.target_epsilon is not None else math.inf)
    plan = ClientLevelPlan(
        mechanism=pr.mechanism, noise_multiplier=sigma, generator_clip=pr.generator_clip,
        logit_clip=pr.logit_clip, releases_per_round=releases, sample_rate=q,
        rounds_accounted=steps, delta=pr.delta, accountant=pr.accountant,
        target_epsilon=pr.target_epsilon, epsilon_max=float(epsilon_max),
    )
    logger.info("client-level DP (%s): σ = %.4g per release (%.4g accounted), C_g = %g, C_l = %g "
                "per logit row, q = %.4g over %d steps, ε_max = %s at δ = %g (%s)",
                plan.mechanism, sigma, plan.accounted_noise, plan.generator_clip, plan.logit_clip,
                q, steps, plan.epsilon_max, plan.delta, plan.accountant)
    return plan


def clip_contribution(
    generator_delta: Mapping[str, Tensor] | None, logits: Tensor, *, generator_clip: float,
    logit_clip: float,
) -> tuple[dict[str, Tensor] | None, Tensor]:
    """ΔG clipped jointly to C_g and every logit row to C_l (new tensors, float32)."""
    delta = None
    if generator_delta is not None:
        delta, _ = clip_by_l2({k: v.float() for k, v in generator_delta.items()},
                              max_norm=generator_clip)
    clipped_logits, _ = clip_rows(logits.float(), max_norm=logit_clip)
    return delta, clipped_logits


def noise_contribution(
    generator_delta: Mapping[str, Tensor] | None, logits: Tensor, *, noise_multiplier: float,
    generator_clip: float, logit_clip: float, rng: torch.Generator,
) -> tuple[dict[str, Tensor] | None, Tensor]:
    """Add N(0, (σC_g)²) to every ΔG entry and N(0, (σC_l√N)²) to every logit.

    ``generator_delta`` and ``logits`` are one (clipped) contribution or a sum of them: the
    noise depends only on the bounds, the number of logit rows N and σ. σ = 0 adds nothing.
    """
    if noise_multiplier == 0.0:
        delta = None if generator_delta is None else dict(generator_delta)
        return delta, logits
    if not (math.isfinite(generator_clip) and math.isfinite(logit_clip)):
        raise ValueError("noise needs finite clip bounds (its standard deviation is σ x bound)")
    delta = None
    if generator_delta is not None:
        noise = gaussian_noise_like(dict(generator_delta), std=noise_multiplier * generator_clip,
                                    rng=rng)
        delta = {k: v + noise[k] for k, v in generator_delta.items()}
    logit_std = noise_multiplier * logit_clip * math.sqrt(logits.shape[0])
    noisy_logits = logits + gaussian_noise_like(logits, std=logit_std, rng=rng)
    return delta, noisy_logits


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def _none_as_inf(value: Any) -> float:
    return math.inf if value is None else float(value)


class ClientLedger:
    """One party's cumulative privacy spend under a budget ε_max, counted once per round.

    ``spend_round(r, σ, q)`` records the releases of rounds not recorded yet: in central mode
    the subsampled mechanism runs every round whether or not this client was picked, so serving
    round r brings the ledger to r + 1 steps (``every_round=True``); in local mode one release
    per served round. Serving a round again (a retry, a resumed server) records nothing more.
    """

    def __init__(self, *, accountant: str, delta: float, epsilon_max: float) -> None:
        self.accountant = make_accountant(accountant)
        self.delta = float(delta)
        self.epsilon_max = float(epsilon_max)
        self.rounds_recorded = 0  # rounds [0, rounds_recorded) are in the ledger

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.delta)

    def _steps_for(self, round_index: int, *, every_round: bool) -> int:
        if round_index < self.rounds_recorded:
            return 0
        return round_index + 1 - self.rounds_recorded if every_round else 1

    def epsilon_if(self, round_index: int, *, noise_multiplier: float, sample_rate: float,
                   every_round: bool) -> float:
        """ε after recording round ``round_index`` (nothing recorded)."""
        steps = self._steps_for(round_index, every_round=every_round)
        if steps == 0:
            return self.epsilon
        trial = self.accountant.copy()
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return trial.epsilon(delta=self.delta)

    def spend_round(self, round_index: int, *, noise_multiplier: float, sample_rate: float,
                    every_round: bool) -> float:
        """Record round ``round_index``'s releases; the new cumulative ε."""
        steps = self._steps_for(round_index, every_round=every_round)
        if steps:
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                 steps=steps)
            self.rounds_recorded = round_index + 1
        return self.epsilon

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values (ε_max = ∞ is written as null)."""
        return {**self.accountant.state_dict(), "delta": self.delta,
                "epsilon_max": _finite_or_none(self.epsilon_max),
                "rounds_recorded": self.rounds_recorded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("epsilon_max", self.epsilon_max), ("delta", self.delta)):
            if _none_as_inf(state[key]) != mine:
                raise ValueError(f"ledger state has {key} = {state[key]}, this run {mine}: a "
                                 "budget that changes across a restart is refused")
        self.accountant.load_state_dict(state)
        self.rounds_recorded = int(state["rounds_recorded"])


class OwnerLedger:
    """An owner's client-level spend over every run it served, under one budget ε_max.

    Each run (a server's ``run_key``, constant across its restarts) has its own
    :class:`ClientLedger`, which counts each of that run's rounds once, and the secret seed of
    the owner's local noise in that run (so a round served again releases exactly the same
    values and costs nothing more). ε is that of all runs' releases composed. The state is plain
    JSON: the ClientApp keeps it in a file on the owner's side, so it survives the server, the
    SuperNode and ``Context.state``.
    """

    def __init__(self, *, accountant: str, delta: float, epsilon_max: float) -> None:
        self.accountant_name = accountant
        self.delta = float(delta)
        self.epsilon_max = float(epsilon_max)
        self.runs: dict[str, ClientLedger] = {}
        self.noise_seeds: dict[str, int] = {}

    def reset(self) -> None:
        """Forget every run (a ledger that has recorded nothing)."""
        self.runs, self.noise_seeds = {}, {}

    def run(self, run_key: str) -> tuple[ClientLedger, int]:
        """The run's ledger and noise seed, created (with a fresh secret seed) on first use."""
        if run_key not in self.runs:
            self.runs[run_key] = ClientLedger(accountant=self.accountant_name, delta=self.delta,
                                              epsilon_max=self.epsilon_max)
            self.noise_seeds[run_key] = secrets.randbits(62)
        return self.runs[run_key], self.noise_seeds[run_key]

    def _history(self, extra: tuple[str, ClientLedger] | None = None) -> tuple:
        entries: list[tuple[float, float, int]] = []
        for key, ledger in self.runs.items():
            if extra is not None and key == extra[0]:
                continue
            entries.extend(ledger.accountant.history)
        if extra is not None:
            entries.extend(extra[1].accountant.history)
        return tuple(entries)

    @property
    def epsilon(self) -> float:
        return accountant_epsilon(self.accountant_name, self._history(), self.delta)

    def epsilon_if(self, run_key: str, round_index: int, *, noise_multiplier: float,
                   sample_rate: float, every_round: bool) -> float:
        """Total ε if round ``round_index`` of run ``run_key`` were released (nothing spent)."""
        ledger = self.runs.get(run_key) or ClientLedger(
            accountant=self.accountant_name, delta=self.delta, epsilon_max=self.epsilon_max)
        steps = ledger._steps_for(round_index, every_round=every_round)
        if steps == 0:
            return self.epsilon
        trial = ClientLedger(accountant=self.accountant_name, delta=self.delta,
                             epsilon_max=self.epsilon_max)
        trial.load_state_dict(ledger.state_dict())
        trial.spend_round(round_index, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                          every_round=every_round)
        return accountant_epsilon(self.accountant_name, self._history((run_key, trial)), self.delta)

    def spend_round(self, run_key: str, round_index: int, *, noise_multiplier: float,
                    sample_rate: float, every_round: bool) -> float:
        """Record the round's releases in its run; the new total ε."""
        ledger, _ = self.run(run_key)
        ledger.spend_round(round_index, noise_multiplier=noise_multiplier,
                           sample_rate=sample_rate, every_round=every_round)
        return self.epsilon

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant_name, "delta": self.delta,
            "epsilon_max": _finite_or_none(self.epsilon_max),
            "runs": {key: {"ledger": ledger.state_dict(), "noise_seed": self.noise_seeds[key]}
                     for key, ledger in self.runs.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("accountant", self.accountant_name), ("delta", self.delta),
                          ("epsilon_max", self.epsilon_max)):
            theirs = state[key] if key == "accountant" else _none_as_inf(state[key])
            if theirs != mine:
                raise ValueError(f"the owner's ledger was kept with {key} = {state[key]}, this "
                                 f"run has {mine}: a ledger is never reinterpreted")
        runs: dict[str, ClientLedger] = {}
        seeds: dict[str, int] = {}
        for key, entry in dict(state["runs"]).items():
            ledger = ClientLedger(accountant=self.accountant_name, delta=self.delta,
                                  epsilon_max=self.epsilon_max)
            ledger.load_state_dict(entry["ledger"])
            runs[str(key)], seeds[str(key)] = ledger, int(entry["noise_seed"])
        self.runs, self.noise_seeds = runs, seeds
