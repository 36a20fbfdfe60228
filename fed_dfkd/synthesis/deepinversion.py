"""DeepInversion / ADI, generator variant (algorithms.md §2.3, project choice).

The original optimises an image tensor for 1000 steps per batch; here G is trained on the same
objective instead, so it fits the one generator interface and the federated round:
L_G = w_bn·L_bn + w_oh·L_oh + w_adv·(1 − clip(JS*, 0, 1)) + w_tv·TV(x̃), with argmax pseudo-
labels (no conditional generator) and the benchmark weights (bn 10, oh 1, adv 1, tv 1e-3).
"""

from fed_dfkd.synthesis.base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(Synthesizer):
    name = "deepinversion"
    defaults = {
        "bn_statistics_weight": 10.0,
        "one_hot_weight": 1.0,
        "class_balance_weight": 0.0,
        "class_balance_temperature": 1.0,
        "activation_weight": 0.0,
        "adversarial_weight": 1.0,
        "adversarial_divergence": "adi",
        "total_variation_weight": 1e-3,
        "r2m_weight": 0.0,
        "relation_weight": 0.0,
    }
