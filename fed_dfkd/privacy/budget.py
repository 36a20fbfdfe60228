"""A privacy budget: ε_max at δ, enforced before each release (DESIGN.md §4).

A party (a client in ``local`` mode, the server in ``central`` mode) owns one
:class:`PrivacyBudget` wrapping its :class:`~fed_dfkd.privacy.accountants.Accountant`. Before
each release it asks :meth:`PrivacyBudget.can_release`; only if the answer is yes does it
release and call :meth:`PrivacyBudget.spend`. The cumulative ε of the accountant therefore never
exceeds ε_max. The ledger (the accountant's history) is saved with :meth:`state_dict` and
restored with :meth:`load_state_dict`, so a restart neither forgets nor double-counts a release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fed_dfkd.privacy.accountants import Accountant, make_accountant

logger = logging.getLogger(__name__)


class BudgetExceeded(RuntimeError):
    """A release was spent that would take cumulative ε past ε_max.

    Raised by :meth:`PrivacyBudget.spend`; callers check :meth:`PrivacyBudget.can_release`
    first, so this signals a bug in the caller, not a normal refusal.
    """

    def __init__(self, *, epsilon_after: float, epsilon_max: float, delta: float) -> None:
        self.epsilon_after, self.epsilon_max, self.delta = epsilon_after, epsilon_max, delta
        super().__init__(f"release would reach ε = {epsilon_after:.4f} > ε_max = {epsilon_max} "
                         f"at δ = {delta}")


class PrivacyBudget:
    """ε_max at δ over every release recorded in ``accountant`` (which the budget steps)."""

    def __init__(self, *, epsilon_max: float, delta: float, accountant: Accountant) -> None:
        epsilon_max, delta = float(epsilon_max), float(delta)
        if not epsilon_max > 0:  # ∞ allowed: accounting without a limit
            raise ValueError(f"epsilon_max must be > 0, got {epsilon_max}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.epsilon_max = epsilon_max
        self.delta = delta
        self.accountant = accountant

    @property
    def epsilon(self) -> float:
        """Cumulative ε spent so far, at the budget's δ."""
        return self.accountant.epsilon(delta=self.delta)

    def epsilon_if(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Cumulative ε the release would bring (computed on a copy; nothing is spent)."""
        trial = self.accountant.copy()
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return trial.epsilon(delta=self.delta)

    def can_release(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """Would this release keep cumulative ε ≤ ε_max? Never changes the ledger."""
        if math.isinf(self.epsilon_max):
            # Validate the arguments all the same, without paying for an ε computation.
            self.accountant.copy().step(noise_multiplier=noise_multiplier,
                                        sample_rate=sample_rate, steps=steps)
            return True
        return self.epsilon_if(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                               steps=steps) <= self.epsilon_max

    def spend(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Record the release and return the new cumulative ε.

        Raises :class:`BudgetExceeded` (recording nothing) if it would exceed ε_max; check
        :meth:`can_release` first.
        """
        if math.isinf(self.epsilon_max):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                 steps=steps)
            return self.epsilon
        after = self.epsilon_if(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                steps=steps)
        if after > self.epsilon_max:
            raise BudgetExceeded(epsilon_after=after, epsilon_max=self.epsilon_max,
                                 delta=self.delta)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                             steps=steps)
        logger.debug("spent σ = %s, q = %s, %s steps: ε = %.4f of %s", noise_multiplier,
                     sample_rate, steps, after, self.epsilon_max)
        return after

    def state_dict(self) -> dict[str, Any]:
        """The ledger, flat: the accountant's parallel lists plus ``epsilon_max`` and ``delta``.

        Plain numbers, strings and lists only (a Flower ``ConfigRecord`` takes it as is). An
        infinite ``epsilon_max`` is written by ``json`` as ``Infinity``, which it reads back.
        """
        return {**self.accountant.state_dict(), "epsilon_max": self.epsilon_max,
                "delta": self.delta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger saved by :meth:`state_dict`.

        The saved ε_max and δ must equal this budget's: a budget that changes across a restart
        would make the saved ε mean something else, so it is refused rather than adopted.
        """
        for key, mine in (("epsilon_max", self.epsilon_max), ("delta", self.delta)):
            if key not in state:
                raise ValueError(f"budget state lacks {key}")
            if float(state[key]) != mine:
                raise ValueError(f"budget state has {key} = {state[key]}, this budget {mine}")
        self.accountant.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"PrivacyBudget(epsilon_max={self.epsilon_max}, delta={self.delta}, "
                f"accountant={self.accountant!r})")


def make_budget(*, epsilon_max: float, delta: float, accountant: str) -> PrivacyBudget:
    """A budget with a fresh accountant of the named kind."""
    return PrivacyBudget(epsilon_max=epsilon_max, delta=delta,
                         accountant=make_accountant(accountant))
