"""Differential privacy for fed-dfkd (DESIGN.md §4); the only package that imports opacus.

* :mod:`~fed_dfkd.privacy.accountants`: cumulative (ε, δ) of subsampled Gaussian releases,
  Opacus RDP and PRV, created by name from :data:`ACCOUNTANTS`;
* :mod:`~fed_dfkd.privacy.mechanisms`: L2 clipping and the Gaussian mechanism (torch only;
  noise from torch's seeded PRNG, not a cryptographically secure one);
* :mod:`~fed_dfkd.privacy.budget`: ε_max at δ, checked before every release;
* :mod:`~fed_dfkd.privacy.dpsgd`: record level, DP-SGD teachers (BatchNorm → GroupNorm) and the
  calibration of σ for a whole owner's ledger;
* :mod:`~fed_dfkd.privacy.feature_statistics`: record level, the one Gaussian release of
  per-channel feature statistics and a class histogram that replaces a DP teacher's BN prior.

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
from fed_dfkd.privacy.dpsgd import (
    DPSGDResult,
    calibrate_noise_multiplier,
    dp_sgd_sample_rate,
    is_dp_compatible,
    make_dp_compatible,
    train_dp_sgd,
)
from fed_dfkd.privacy.feature_statistics import (
    FeatureStatistics,
    exact_feature_statistics,
    normalization_layer_names,
    probe_scales,
    release_feature_statistics,
    sample_moments,
)
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
    "DPSGDResult",
    "FeatureStatistics",
    "GaussianMechanism",
    "PrivacyBudget",
    "PrvAccountant",
    "RdpAccountant",
    "accountant_epsilon",
    "calibrate_noise_multiplier",
    "clip_by_l2",
    "clip_rows",
    "dp_sgd_sample_rate",
    "epsilon_after",
    "exact_feature_statistics",
    "gaussian_noise_like",
    "is_dp_compatible",
    "l2_norm",
    "make_accountant",
    "make_budget",
    "make_dp_compatible",
    "noise_multiplier_for",
    "normalization_layer_names",
    "probe_scales",
    "release_feature_statistics",
    "sample_moments",
    "train_dp_sgd",
]
