"""Pure loss functions ``(tensors, *, knobs) -> Tensor``; each docstring names its equation in
docs/algorithms.md."""

from fed_dfkd.losses.adversarial import (
    ADVERSARIAL_DIVERGENCES,
    adi_competition,
    adversarial_js,
    adversarial_kl,
    adversarial_l1,
    adversarial_loss,
    js_star,
    total_variation,
)
from fed_dfkd.losses.bn_statistics import BatchNormStatistics
from fed_dfkd.losses.contrastive import (
    negative_window_ranks,
    r2m_infonce,
    relation_infonce,
    relation_infonce_per_sample,
    unit,
)
from fed_dfkd.losses.entropy import (
    activation_loss,
    batch_entropy,
    class_balance_loss,
    one_hot_loss,
    prior_adjusted_cross_entropy,
)
from fed_dfkd.losses.kd import (
    KD_DIVERGENCES,
    kd_kl,
    kd_kl_per_sample,
    kd_l1,
    kd_l1_per_sample,
    kd_loss,
    kd_per_sample,
    feature_hint_per_sample,
)

__all__ = [
    "ADVERSARIAL_DIVERGENCES",
    "BatchNormStatistics",
    "KD_DIVERGENCES",
    "activation_loss",
    "adi_competition",
    "adversarial_js",
    "adversarial_kl",
    "adversarial_l1",
    "adversarial_loss",
    "batch_entropy",
    "class_balance_loss",
    "feature_hint_per_sample",
    "js_star",
    "kd_kl",
    "kd_kl_per_sample",
    "kd_l1",
    "kd_l1_per_sample",
    "kd_loss",
    "kd_per_sample",
    "negative_window_ranks",
    "one_hot_loss",
    "prior_adjusted_cross_entropy",
    "r2m_infonce",
    "relation_infonce",
    "relation_infonce_per_sample",
    "total_variation",
    "unit",
]
