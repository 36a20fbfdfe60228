"""DAFL (Chen et al., ICCV 2019), benchmark form (algorithms.md §2.1).

L_G = w_oh·L_oh + w_act·L_act + w_bal·Σ p̄ log p̄ (natural log, T = 1): no BN prior and no
adversary. The benchmark weights are used (balance 20, activation 0.1 as in CMI).
"""

from fed_dfkd.synthesis.base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("dafl")
class DAFL(Synthesizer):
    name = "dafl"
    defaults = {
        "bn_statistics_weight": 0.0,
        "one_hot_weight": 1.0,
        "class_balance_weight": 20.0,
        "class_balance_temperature": 1.0,
        "activation_weight": 0.1,
        "adversarial_weight": 0.0,
        "adversarial_divergence": "kl",
        "total_variation_weight": 0.0,
        "r2m_weight": 0.0,
        "relation_weight": 0.0,
    }
