"""CuDFKD (Li et al., Information Sciences 2023; algorithms.md §3).

Generator: the DFQ objective with BN prior, one-hot, class balance (the reference's
λ_ent·H(p̄) with λ_ent = −20 is ``class_balance_weight = 20``) and the adversarial KL at τ = 3
whose weight follows the curriculum ramp λ_adv(p) = adv0 + Δ_adv·ramp(p) (§12.3; set
``curriculum.adversarial_growth``). The student side (self-paced weighting) lives in
``fed_dfkd.distill``. The adversarial term is not masked (reference HEAD, §3.1).
"""

from fed_dfkd.synthesis.base import SYNTHESIZERS, Synthesizer

CUDFKD_DEFAULTS = {
    "bn_statistics_weight": 1.0,
    "one_hot_weight": 1.0,
    "class_balance_weight": 20.0,
    "class_balance_temperature": 1.0,
    "activation_weight": 0.0,
    "adversarial_weight": 1.0,
    "adversarial_divergence": "kl",
    "total_variation_weight": 0.0,
    "r2m_weight": 0.0,
    "relation_weight": 0.0,
}


@SYNTHESIZERS.register("cudfkd")
class CuDFKD(Synthesizer):
    name = "cudfkd"
    defaults = CUDFKD_DEFAULTS
