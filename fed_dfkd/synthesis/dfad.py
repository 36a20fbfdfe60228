"""DFAD-style adversarial distillation (Fang et al. 2019; algorithms.md §2.2).

G maximises the student-teacher logit L1 distance (L_G = −‖S(x) − T(x)‖₁); nothing else.
Pair it with ``distill.divergence: l1`` for the original min-max on the same distance.
"""

from fed_dfkd.synthesis.base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("dfad")
class DFAD(Synthesizer):
    name = "dfad"
    defaults = {
        "bn_statistics_weight": 0.0,
        "one_hot_weight": 0.0,
        "class_balance_weight": 0.0,
        "class_balance_temperature": 1.0,
        "activation_weight": 0.0,
        "adversarial_weight": 1.0,
        "adversarial_divergence": "l1",
        "total_variation_weight": 0.0,
        "r2m_weight": 0.0,
        "relation_weight": 0.0,
    }
