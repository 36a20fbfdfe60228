"""Differential privacy for fed-dfkd (DESIGN.md §4); the only package that imports opacus.

* :mod:`~fed_dfkd.privacy.accountants`: cumulative (ε, δ) of subsampled Gaussian releases,
  Opacus RDP and PRV, created by name from :data:`ACCOUNTANTS`;
* :mod:`~fed_dfkd.privacy.mechanisms`: L2 clipping and the Gaussian mechanism (torch only;
  noise from torch's seeded PRNG, not a cryptographically secure one);
* :mod:`~fed_dfkd.privacy.budget`: ε_max at δ, checked before every release.

Opacus is imported lazily, on the first ε computation, so importing this package is cheap.
"""

from fed_dfkd.privacy.accountants import (
    ACCOUNTANTS,
    Accountant,
    PrvAccountant,
    RdpAccountant,
    accountant_epsilon,
    epsilon_after,
    make_accountant,
    noise_multiplier_for,
)
from fed_dfkd.privacy.budget import BudgetExceeded, PrivacyBudget, make_budget
from fed_dfkd.privacy.mechanisms import (
    GaussianMechanism,
    clip_by_l2,
    clip_rows,
    gaussian_noise_like,
    l2_norm,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetExceeded",
    "GaussianMechanism",
    "PrivacyBudget",
    "PrvAccountant",
    "RdpAccountant",
    "accountant_epsilon",
    "clip_by_l2",
    "clip_rows",
    "epsilon_after",
    "gaussian_noise_like",
    "l2_norm",
    "make_accountant",
    "make_budget",
    "noise_multiplier_for",
]
