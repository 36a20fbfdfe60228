"""Unit tests for fed_dfkd.curriculum: schedules, self-paced weighting, the negative bank."""

from __future__ import annotations

import math

import pytest
import torch

from fed_dfkd.curriculum import (
    NegativeBank,
    SelfPacedResult,
    SelfPacedWeighting,
    adversarial_weight,
    check_progress,
    cosine,
    linear,
    negative_window_start,
    ramp,
    self_paced_weights,
)
from fed_dfkd.losses import r2m_infonce, unit

GRID = [i / 40 for i in range(41)]


# --------------------------------------------------------------------------------------------
# Schedules


def test_ramp_exact_values_range_and_monotonicity() -> None:
    assert ramp(0.0, begin=0.25, end=0.75) == 0.0
    assert ramp(0.25, begin=0.25, end=0.75) == 0.0
    assert ramp(0.5, begin=0.25, end=0.75) == pytest.approx(0.5)
    assert ramp(0.75, begin=0.25, end=0.75) == 1.0
    assert ramp(1.0, begin=0.25, end=0.75) == 1.0
    values = [ramp(p, begin=0.25, end=0.75) for p in GRID]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] < values[-1]


def test_ramp_step_when_begin_equals_end_and_rejects_reversed_bounds() -> None:
    assert ramp(0.49, begin=0.5, end=0.5) == 0.0
    assert ramp(0.5, begin=0.5, end=0.5) == 1.0
    with pytest.raises(ValueError, match="begin"):
        ramp(0.5, begin=0.75, end=0.25)


@pytest.mark.parametrize("progress", [-0.01, 1.01, float("nan"), float("inf")])
def test_progress_outside_unit_interval_raises(progress: float) -> None:
    with pytest.raises(ValueError, match="progress"):
        check_progress(progress)
    with pytest.raises(ValueError, match="progress"):
        linear(progress, start=0.0, end=1.0)


def test_progress_round_off_is_clamped() -> None:
    assert check_progress(1.0 + 1e-12) == 1.0
    assert check_progress(-1e-12) == 0.0
    assert linear(1.0 + 1e-12, start=2.0, end=4.0) == 4.0
    assert cosine(-1e-12, base=0.1) == pytest.approx(0.1)


def test_adversarial_weight_reproduces_the_reference_plateau() -> None:
    # §3.2 example: adv0 = 0, grad_adv = 0.5, E = 250, begin/end fractions 0.25/0.75 → 62.5
    growth = 0.5 * 250 * (0.75 - 0.25)
    assert adversarial_weight(0.1, initial=0.0, growth=growth, begin=0.25, end=0.75) == 0.0
    assert adversarial_weight(0.5, initial=0.0, growth=growth, begin=0.25, end=0.75) == (
        pytest.approx(31.25)
    )
    assert adversarial_weight(1.0, initial=0.0, growth=growth, begin=0.25, end=0.75) == 62.5
    assert adversarial_weight(0.3, initial=2.0, growth=0.0, begin=0.25, end=0.75) == 2.0


def test_negative_window_start_stays_inside_the_queue() -> None:
    width = 0.25
    values = [negative_window_start(p, width=width, begin=0.2, end=0.8) for p in GRID]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.75)
    assert all(0.0 <= h and h + width <= 1.0 + 1e-12 for h in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="width"):
        negative_window_start(0.5, width=1.5, begin=0.2, end=0.8)


def test_linear_and_cosine() -> None:
    assert linear(0.0, start=1.5, end=12.0) == 1.5
    assert linear(0.5, start=1.5, end=12.0) == pytest.approx(6.75)
    assert linear(1.0, start=1.5, end=12.0) == 12.0
    assert cosine(0.0, base=0.1) == pytest.approx(0.1)
    assert cosine(0.5, base=0.1, final=0.02) == pytest.approx(0.06)
    assert cosine(1.0, base=0.1, final=0.02) == pytest.approx(0.02)
    values = [cosine(p, base=0.1) for p in GRID]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------------------
# Self-paced weights


def reference_log_weight(loss: float, pace: float) -> float:
    return (1 + math.exp(-pace)) / (1 + math.exp(loss - pace))


@pytest.mark.parametrize("pace", [0.3, 1.5, 6.0])
def test_log_weight_closed_form(pace: float) -> None:
    losses = torch.tensor([0.0, pace, 0.1, 2.0, 8.0], dtype=torch.float64)
    weights = self_paced_weights(losses, pace=pace, kind="log")
    assert weights[0].item() == pytest.approx(1.0)
    assert weights[1].item() == pytest.approx((1 + math.exp(-pace)) / 2)
    expected = [reference_log_weight(loss, pace) for loss in losses.tolist()]
    assert weights.tolist() == pytest.approx(expected)


def test_log_weight_is_monotone_decreasing_and_finite_at_extremes() -> None:
    losses = torch.linspace(0.0, 50.0, 101)
    weights = self_paced_weights(losses, pace=2.0, kind="log")
    assert bool((weights[1:] < weights[:-1]).all())
    extreme = self_paced_weights(torch.tensor([0.0, 1e4]), pace=-200.0, kind="log")
    assert bool(torch.isfinite(extreme).all())
    assert self_paced_weights(torch.tensor([1e4]), pace=2.0, kind="log").item() == 0.0


def test_hard_and_soft_weights() -> None:
    losses = torch.tensor([0.5, 1.0, 1.5])
    assert self_paced_weights(losses, pace=1.0, kind="hard").tolist() == [1.0, 0.0, 0.0]
    soft = self_paced_weights(torch.tensor([0.5, 1.0, 3.0]), pace=2.0, kind="soft")
    assert soft.tolist() == pytest.approx([0.75, 0.5, 0.0])
    with pytest.raises(ValueError, match="pace > 0"):
        self_paced_weights(losses, pace=0.0, kind="soft")
    with pytest.raises(ValueError, match="kind"):
        self_paced_weights(losses, pace=1.0, kind="linear")


def test_weights_carry_no_gradient() -> None:
    losses = torch.tensor([0.2, 0.9], requires_grad=True)
    assert not self_paced_weights(losses, pace=1.0, kind="log").requires_grad
    result = SelfPacedWeighting(pace_start=0.5, pace_end=1.0)(losses * 2, 0.0)
    assert not result.weights.requires_grad


def test_absolute_pace_reproduces_the_reference() -> None:
    weighting = SelfPacedWeighting(
        kind="log", granularity="sample", pace="absolute", pace_start=1.5, pace_end=12.0
    )
    losses = torch.tensor([0.05, 0.4, 3.0, 9.0])
    result = weighting(losses, 0.5)
    assert isinstance(result, SelfPacedResult)
    assert result.pace == pytest.approx(6.75)
    assert result.quantile_level is None
    assert result.weights.tolist() == pytest.approx(
        [reference_log_weight(l, 6.75) for l in losses.tolist()], rel=1e-5
    )
    assert result.mean_weight == pytest.approx(result.weights.mean().item())
    assert result.admitted_fraction == pytest.approx(0.75)  # 9.0 > 6.75 gets weight < ½


def test_quantile_pace_hard_admits_about_q_of_the_batch() -> None:
    losses = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float() / 100 + 0.01
    weighting = SelfPacedWeighting(kind="hard", pace="quantile", pace_start=0.3, pace_end=1.0)
    start = weighting(losses, 0.0)
    assert start.quantile_level == pytest.approx(0.3)
    assert abs(start.admitted_fraction - 0.3) <= 0.011
    assert float((start.weights * (losses > start.pace).float()).sum()) == 0.0  # easy ones only
    middle = weighting(losses, 0.5)
    assert abs(middle.admitted_fraction - 0.65) <= 0.011
    assert weighting(losses, 1.0).admitted_fraction == 1.0  # q = 1 admits every sample


def test_quantile_pace_log_is_scale_free() -> None:
    losses = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4], dtype=torch.float64)
    weighting = SelfPacedWeighting(kind="log", pace="quantile", pace_start=0.5, pace_end=0.5)
    result = weighting(losses, 0.3)
    assert result.pace == pytest.approx(0.1)  # the median
    kappa = 5.0
    expected = [
        (1 + math.exp(-kappa)) / (1 + math.exp(kappa * (loss / 0.1 - 1)))
        for loss in losses.tolist()
    ]
    assert result.weights.tolist() == pytest.approx(expected)
    assert result.weights[0].item() == pytest.approx(1.0)
    assert result.weights[2].item() == pytest.approx((1 + math.exp(-kappa)) / 2)
    scaled = weighting(losses * 1000.0, 0.3)
    assert scaled.weights.tolist() == pytest.approx(result.weights.tolist())


def test_quantile_soft_weight() -> None:
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    weighting = SelfPacedWeighting(kind="soft", pace="quantile", pace_start=0.75, pace_end=0.75)
    result = weighting(losses, 0.0)
    assert result.pace == pytest.approx(0.4)
    assert result.weights.tolist() == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-6)


def test_all_zero_losses_do_not_produce_nan() -> None:
    for kind in ("hard", "soft", "log"):
        result = SelfPacedWeighting(kind=kind, pace_start=0.5, pace_end=1.0)(torch.zeros(4), 0.0)
        assert bool(torch.isfinite(result.weights).all()), kind


def test_batch_granularity_weights_the_mean() -> None:
    losses = torch.tensor([0.5, 1.0, 3.0, 7.5])
    weighting = SelfPacedWeighting(
        kind="log", granularity="batch", pace="absolute", pace_start=2.0, pace_end=2.0
    )
    result = weighting(losses, 0.4)
    v_mean = reference_log_weight(3.0, 2.0)
    assert result.weights.tolist() == pytest.approx([v_mean] * 4, rel=1e-6)
    student_loss = (result.weights * losses).mean()
    assert student_loss.item() == pytest.approx(v_mean * 3.0, rel=1e-6)


def test_batch_granularity_quantile_uses_a_history_of_batch_means() -> None:
    weighting = SelfPacedWeighting(
        kind="hard", granularity="batch", pace="quantile", pace_start=0.5, pace_end=0.5, history=3
    )
    first = weighting(torch.tensor([1.0, 3.0]), 0.0)  # history [2]: λ = 2, admitted (≤)
    assert first.pace == pytest.approx(2.0) and first.weights.tolist() == [1.0, 1.0]
    weighting(torch.tensor([4.0, 4.0]), 0.0)  # history [2, 4]
    weighting(torch.tensor([6.0, 6.0]), 0.0)  # history [2, 4, 6]
    fourth = weighting(torch.tensor([9.0, 11.0]), 0.0)  # history [4, 6, 10]: median 6 < 10
    assert fourth.pace == pytest.approx(6.0)
    assert fourth.weights.tolist() == [0.0, 0.0]
    assert weighting.state_dict() == {"batch_loss_history": pytest.approx([4.0, 6.0, 10.0])}


def test_sample_granularity_is_stateless() -> None:
    weighting = SelfPacedWeighting(pace_start=0.5, pace_end=1.0)
    weighting(torch.tensor([0.1, 0.2]), 0.0)
    assert weighting.state_dict() == {"batch_loss_history": []}


def test_state_dict_round_trip() -> None:
    def make() -> SelfPacedWeighting:
        return SelfPacedWeighting(
            kind="log",
            granularity="batch",
            pace="quantile",
            pace_start=0.3,
            pace_end=0.9,
            history=4,
        )

    original = make()
    generator = torch.Generator().manual_seed(5)
    for step in range(6):
        original(torch.rand(8, generator=generator) * (step + 1), step / 10)
    restored = make()
    restored.load_state_dict(original.state_dict())
    assert restored.state_dict() == original.state_dict()
    losses = torch.rand(8, generator=generator)
    a, b = original(losses, 0.7), restored(losses, 0.7)
    assert a.pace == b.pace
    torch.testing.assert_close(a.weights, b.weights)
    with pytest.raises(ValueError, match="batch_loss_history"):
        restored.load_state_dict({"history": []})


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"kind": "exp"}, "kind"),
        ({"granularity": "class"}, "granularity"),
        ({"pace": "linear"}, "pace"),
        ({"pace_start": 0.0}, "pace_start"),
        ({"pace_end": 1.5}, "pace_end"),
        ({"sharpness": 0.0}, "sharpness"),
        ({"history": 0}, "history"),
        ({"kind": "soft", "pace": "absolute", "pace_start": -1.0}, "pace_start"),
    ],
)
def test_constructor_validates_arguments(arguments: dict, name: str) -> None:
    full = {"pace_start": 0.5, "pace_end": 1.0, **arguments}
    with pytest.raises(ValueError, match=name):
        SelfPacedWeighting(**full)


def test_call_validates_losses_and_progress() -> None:
    weighting = SelfPacedWeighting(pace_start=0.5, pace_end=1.0)
    with pytest.raises(ValueError, match="NaN"):
        weighting(torch.tensor([0.1, float("nan")]), 0.0)
    with pytest.raises(ValueError, match="batch"):
        weighting(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="progress"):
        weighting(torch.tensor([0.1]), 1.5)


# --------------------------------------------------------------------------------------------
# Negative bank


def test_negative_bank_initial_rows_are_seeded_unit_gaussians() -> None:
    bank = NegativeBank(4, 6, rng=torch.Generator().manual_seed(0))
    assert bank.negatives.shape == (6, 4)
    torch.testing.assert_close(bank.negatives.norm(dim=1), torch.ones(6))
    again = NegativeBank(4, 6, rng=torch.Generator().manual_seed(0))
    other = NegativeBank(4, 6, rng=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bank.negatives, again.negatives)
    assert not torch.allclose(bank.negatives, other.negatives)
    assert bank.filled == 0 and bank.pointer == 0


def _sequential_ring(
    initial: torch.Tensor, batches: list[torch.Tensor]
) -> tuple[torch.Tensor, int]:
    rows, pointer = initial.clone(), 0
    for batch in batches:
        for key in unit(batch):
            rows[pointer] = key
            pointer = (pointer + 1) % rows.shape[0]
    return rows, pointer


def test_negative_bank_push_wraps_around() -> None:
    bank = NegativeBank(3, 5, rng=torch.Generator().manual_seed(0))
    initial = bank.negatives.clone()
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(3, 3, generator=generator) * 4
    second = torch.randn(3, 3, generator=generator)
    bank.push(first)
    torch.testing.assert_close(bank.negatives[:3], unit(first))
    torch.testing.assert_close(bank.negatives[3:], initial[3:])
    assert (bank.pointer, bank.filled) == (3, 3)
    bank.push(second)  # rows 3, 4, then 0: 5 is not a multiple of 3
    torch.testing.assert_close(bank.negatives[0], unit(second)[2])
    torch.testing.assert_close(bank.negatives[3:], unit(second)[:2])
    assert (bank.pointer, bank.filled) == (1, 5)
    expected, pointer = _sequential_ring(initial, [first, second])
    torch.testing.assert_close(bank.negatives, expected)
    assert bank.pointer == pointer


def test_negative_bank_batch_larger_than_bank() -> None:
    bank = NegativeBank(2, 5, rng=torch.Generator().manual_seed(0))
    initial = bank.negatives.clone()
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 2, generator=generator), torch.randn(7, 2, generator=generator)]
    for batch in batches:
        bank.push(batch)
    expected, pointer = _sequential_ring(initial, batches)
    torch.testing.assert_close(bank.negatives, expected)
    assert bank.pointer == pointer == 4
    assert bank.filled == 5


def test_negative_bank_push_detaches_and_keeps_earlier_tensors_intact() -> None:
    bank = NegativeBank(2, 4, rng=torch.Generator().manual_seed(0))
    anchors = torch.randn(2, 2, requires_grad=True)
    keys = torch.randn(2, 2, requires_grad=True)
    held = bank.negatives
    snapshot = held.clone()
    loss = r2m_infonce(
        anchors, keys.detach(), bank.negatives, window_start=0.0, window_width=1.0, temperature=0.1
    )
    bank.push(keys * 2)
    assert not bank.negatives.requires_grad
    torch.testing.assert_close(held, snapshot)
    loss.backward()  # the bank used by the loss was not written in place
    assert anchors.grad is not None


def test_negative_bank_state_round_trip() -> None:
    bank = NegativeBank(3, 4, rng=torch.Generator().manual_seed(0))
    bank.push(torch.randn(3, 3))
    restored = NegativeBank(3, 4, rng=torch.Generator().manual_seed(9))
    restored.load_state_dict(bank.state_dict())
    torch.testing.assert_close(restored.negatives, bank.negatives)
    assert (restored.pointer, restored.filled) == (bank.pointer, bank.filled) == (3, 3)
    keys = torch.randn(2, 3)
    bank.push(keys)
    restored.push(keys)
    torch.testing.assert_close(restored.negatives, bank.negatives)
    assert restored.pointer == bank.pointer == 1


def test_negative_bank_rejects_bad_input() -> None:
    bank = NegativeBank(3, 4, rng=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="keys"):
        bank.push(torch.randn(2, 5))
    state = bank.state_dict()
    with pytest.raises(ValueError, match="shape"):
        bank.load_state_dict({**state, "negatives": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="pointer"):
        bank.load_state_dict({**state, "pointer": 4})
    with pytest.raises(ValueError, match="size"):
        NegativeBank(3, 0, rng=torch.Generator())
