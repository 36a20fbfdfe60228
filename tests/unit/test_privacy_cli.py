"""``fed-dfkd privacy plan``: printed values equal the library's, bad arguments are one line and
exit code 2."""

from __future__ import annotations

import pytest

from fed_dfkd.cli.main import main
from fed_dfkd.privacy import epsilon_after, noise_multiplier_for

DELTA = 1e-5


def _plan(capsys, *arguments: str) -> tuple[int, dict[str, float], list[str]]:
    code = main(["privacy", "plan", *arguments])
    captured = capsys.readouterr()
    values = {}
    for line in captured.out.splitlines():
        key, value = line.split(": ")
        values[key] = float(value)
    return code, values, [line for line in captured.err.splitlines() if line.strip()]


def test_plan_for_a_target_prints_the_calibrated_noise_multiplier_and_its_epsilon(capsys):
    code, values, err = _plan(capsys, "--target-epsilon", "8", "--delta", "1e-5",
                              "--rounds", "100", "--sample-rate", "1")
    assert code == 0 and err == []
    assert list(values) == ["noise_multiplier", "epsilon"]
    expected = noise_multiplier_for(target_epsilon=8.0, delta=DELTA, sample_rate=1.0, steps=100,
                                    accountant="rdp")
    assert values["noise_multiplier"] == expected == pytest.approx(6.377, abs=1e-3)
    assert values["epsilon"] == epsilon_after(noise_multiplier=expected, sample_rate=1.0,
                                              steps=100, delta=DELTA, accountant="rdp")
    assert 8.0 - 0.01 <= values["epsilon"] <= 8.0


@pytest.mark.parametrize("accountant, expected", [("rdp", 2.101), ("prv", 1.838)])
def test_plan_for_a_noise_multiplier_prints_its_epsilon(capsys, accountant, expected):
    code, values, err = _plan(capsys, "--noise-multiplier", "1.0", "--delta", "1e-5",
                              "--rounds", "1000", "--sample-rate", "0.01",
                              "--accountant", accountant)
    assert code == 0 and err == []
    assert list(values) == ["epsilon"]
    assert values["epsilon"] == pytest.approx(expected, abs=1e-3)


def test_plan_with_an_infinite_target_needs_no_noise(capsys):
    code, values, _ = _plan(capsys, "--target-epsilon", "inf", "--delta", "1e-5",
                            "--rounds", "10", "--sample-rate", "0.1")
    assert code == 0 and values == {"noise_multiplier": 0.0, "epsilon": float("inf")}


GOOD = {"--delta": "1e-5", "--rounds": "10", "--sample-rate": "0.1"}


def _arguments(**changes: str | None) -> list[str]:
    options = {"--target-epsilon": "4", **GOOD}
    options.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
    return [part for key, value in options.items() if value is not None for part in (key, value)]


@pytest.mark.parametrize("arguments, mentions", [
    (_arguments(noise_multiplier="1.0"), "exactly one"),
    (_arguments(target_epsilon=None), "exactly one"),
    (_arguments(sample_rate="0"), "--sample-rate"),
    (_arguments(sample_rate="1.5"), "--sample-rate"),
    (_arguments(delta="0"), "--delta"),
    (_arguments(delta="1"), "--delta"),
    (_arguments(rounds="0"), "--rounds"),
    (_arguments(target_epsilon="-1"), "--target-epsilon"),
    (_arguments(target_epsilon=None, noise_multiplier="-1"), "--noise-multiplier"),
    (_arguments(accountant="gdp"), "valid: prv, rdp"),
    (_arguments(target_epsilon="0.01", sample_rate="1", rounds="1"), "cannot reach"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, arguments, mentions):
    code, values, err = _plan(capsys, *arguments)
    assert code == 2 and values == {}
    assert len(err) == 1, err
    assert mentions in err[0] and err[0].startswith("fed-dfkd privacy: error:")


def test_privacy_without_an_action_exits_2(capsys):
    assert main(["privacy"]) == 2
    assert "Traceback" not in capsys.readouterr().err
