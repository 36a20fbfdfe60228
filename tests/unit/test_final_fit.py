"""The final fit (``distill.final_fit_steps``): a fresh student trained on the whole pool at the
end of the last round, and :func:`fed_dfkd.distill.fit_student`, which trains it."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator, build_student
from fed_dfkd.data import DatasetInfo
from fed_dfkd.distill import ReplayBuffer, fit_student
from fed_dfkd.evaluation import evaluate_round
from fed_dfkd.synthesis import Progress

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


class _Recorder:
    """A trainer that records what :func:`fit_student` gives it."""

    def __init__(self) -> None:
        self.student = torch.nn.Linear(1, 1)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Progress]] = []

    def train_round(self, images, targets, progress):
        self.calls.append((images, targets, progress))
        return {"kd_loss": float(len(self.calls))}


def _pool(size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose every pixel, and targets whose every entry, hold the sample's index."""
    codes = torch.arange(size, dtype=torch.uint8)
    return codes.view(size, 1, 1, 1).expand(size, 1, 2, 2).clone(), codes.view(size, 1).float().expand(size, 3)


def test_fit_runs_exactly_its_steps_in_chunks_that_span_the_progress() -> None:
    trainer = _Recorder()
    images, targets = _pool()
    after: list[tuple[int, int]] = []
    report = fit_student(trainer, images, targets, steps=7, chunk=3, batch_size=4,
                         rng=torch.Generator().manual_seed(0), after_chunk=lambda i, n: after.append((i, n)))
    assert [call[0].shape[:2] for call in trainer.calls] == [(3, 4), (3, 4), (1, 4)]
    assert [call[2].fraction for call in trainer.calls] == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert after == [(0, 3), (1, 3), (2, 3)]
    assert report == {"kd_loss": 3.0}  # the last chunk's report
    for batches, batch_targets, _ in trainer.calls:
        assert batches.dtype == torch.float32 and batches.max() <= 1.0  # as_float_images
        codes = torch.round(batches[:, :, 0, 0, 0] * 255)
        assert torch.equal(codes, batch_targets[..., 0])  # each target stays with its image


def test_fit_draws_from_the_whole_pool_and_follows_weights() -> None:
    images, targets = _pool()
    trainer = _Recorder()
    fit_student(trainer, images, targets, steps=50, chunk=10, batch_size=8, rng=torch.Generator().manual_seed(1))
    drawn = torch.cat([t[..., 0].flatten() for _, t, _ in trainer.calls])
    assert set(drawn.long().tolist()) == set(range(20))
    weights = torch.zeros(20)
    weights[[3, 11]] = 1.0
    trainer = _Recorder()
    fit_student(trainer, images, targets, steps=5, chunk=5, batch_size=8,
                rng=torch.Generator().manual_seed(1), weights=weights)
    assert set(trainer.calls[0][1][..., 0].long().flatten().tolist()) == {3, 11}


def test_fit_hands_each_chunk_to_the_transform_before_training() -> None:
    images, targets = _pool()
    trainer, seen = _Recorder(), []

    def invert(batches: torch.Tensor, index: int) -> torch.Tensor:
        seen.append(index)
        return 255 - batches

    fit_student(trainer, images, targets, steps=4, chunk=2, batch_size=3,
                rng=torch.Generator().manual_seed(0), transform=invert)
    assert seen == [0, 1]
    for batches, batch_targets, _ in trainer.calls:
        assert torch.equal(torch.round(batches[:, :, 0, 0, 0] * 255), 255 - batch_targets[..., 0])


@pytest.mark.parametrize("steps, chunk", [(0, 1), (3, 0)])
def test_fit_refuses_no_steps(steps: int, chunk: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        fit_student(_Recorder(), *_pool(), steps=steps, chunk=chunk, batch_size=2, rng=torch.Generator())


def test_replay_samples_flattens_every_stored_round() -> None:
    buffer = ReplayBuffer(5)
    for r in range(3):
        buffer.add(torch.full((2, 4, 1, 2, 2), r, dtype=torch.uint8), torch.full((2, 4, 3), float(r)))
    images, targets = buffer.samples()
    assert images.shape == (24, 1, 2, 2) and targets.shape == (24, 3)
    assert torch.bincount(images[:, 0, 0, 0].long()).tolist() == [8, 8, 8]


def _config(**distill):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd"},
        "curriculum": {"enabled": False},
        "distill": {"batch_size": 8, "student_steps": 2, "pseudo_batches": 2, "replay_rounds": 10,
                    "replay_sampling": "samples", **distill},
        "federation": {"rounds": 3},
    })


def _round_data(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(100 + index)
    images = torch.randint(0, 256, (2, 8, 1, 8, 8), dtype=torch.uint8, generator=rng)
    return images, torch.randn(16, 10, generator=rng) * 3


def _student_state(coordinator: Coordinator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in coordinator.student.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_last_round_fits_and_its_student_depends_on_the_pool_alone() -> None:
    plain, fitted = Coordinator(_config(), INFO), Coordinator(_config(final_fit_steps=6), INFO)
    perturbed = Coordinator(_config(final_fit_steps=6), INFO)
    with torch.no_grad():  # an online student that went elsewhere
        for parameter in perturbed.student.parameters():
            parameter.add_(0.5)
    for r in range(3):
        reports = [c.train_student(*_round_data(r)) for c in (plain, fitted, perturbed)]
        for c in (plain, fitted, perturbed):
            c.end_round()
        if r < 2:  # the rounds before the last are untouched by the option
            assert _same(_student_state(plain), _student_state(fitted))
            assert not any(k.startswith("final_fit") for k in reports[1])
    assert reports[1]["final_fit_samples"] == 48.0  # 3 rounds x 2 batches x 8
    assert "final_fit_samples" not in reports[0]
    assert not _same(_student_state(plain), _student_state(fitted))
    # A fresh student from the seeded initialisation: where the online student was is forgotten.
    assert _same(_student_state(fitted), _student_state(perturbed))
    initial = build_student(_config(), INFO).state_dict()
    assert not _same(_student_state(fitted), {k: v.clone() for k, v in initial.items()})


def test_the_fitted_student_replaces_the_evaluated_average_too() -> None:
    c = Coordinator(_config(final_fit_steps=4, student_ema=0.5), INFO)
    for r in range(3):
        c.train_student(*_round_data(r))
        c.end_round()
    reference = Coordinator(_config(final_fit_steps=4, student_ema=0.5), INFO)
    reference.replay = c.replay
    reference.round = 2
    reference.final_fit()
    assert _same(_student_state(c), _student_state(reference))
    assert _same(c.evaluated_student.state_dict(), reference.evaluated_student.state_dict())


def _fit_three_rounds(**distill) -> Coordinator:
    c = Coordinator(_config(final_fit_steps=4, **distill), INFO)
    for r in range(3):
        c.train_student(*_round_data(r))
        c.end_round()
    return c


def test_the_fit_s_own_target_temperature_acts_on_the_fit_alone() -> None:
    # The online rounds of a run with only the fit's temperature set are those of the plain run;
    # its fit is the fit of a run whose targets have that temperature throughout, on the same pool.
    plain, own = Coordinator(_config(), INFO), Coordinator(_config(final_fit_target_temperature=0.5), INFO)
    for r in range(2):
        for c in (plain, own):
            c.train_student(*_round_data(r))
            c.end_round()
        assert _same(_student_state(plain), _student_state(own))
    fitted = _fit_three_rounds(final_fit_target_temperature=0.5)
    sharp = Coordinator(_config(final_fit_steps=4, target_temperature=0.5), INFO)
    sharp.replay, sharp.round = fitted.replay, 2
    sharp.final_fit()
    assert _same(_student_state(fitted), _student_state(sharp))
    assert not _same(_student_state(fitted), _student_state(_fit_three_rounds()))
    # Set, it overrides distill.target_temperature for the fit: 1 there is the plain fit.
    unsharpened, overridden = (Coordinator(_config(final_fit_steps=4, **d), INFO) for d in (
        {}, {"target_temperature": 0.5, "final_fit_target_temperature": 1.0}))
    for c in (unsharpened, overridden):
        c.replay, c.round = fitted.replay, 2
        c.final_fit()
    assert _same(_student_state(overridden), _student_state(unsharpened))
    assert not _same(_student_state(overridden), _student_state(sharp))


@pytest.mark.parametrize("key, value", [("final_fit_steps", -1), ("final_fit_target_temperature", 0.0)])
def test_bad_final_fit_settings_are_refused(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"distill.{key}"):
        _config(**{key: value})


class _Checksum:
    """An evaluator whose "accuracy" identifies the student it was given."""

    def evaluate(self, student):
        return {"student_accuracy": float(sum(p.double().sum() for p in student.state_dict().values()))}


def test_the_last_round_s_evaluation_also_scores_the_student_the_fit_replaced() -> None:
    plain, fitted = Coordinator(_config(), INFO), Coordinator(_config(final_fit_steps=4), INFO)
    evaluator = _Checksum()
    for r in range(3):
        for c in (plain, fitted):
            c.train_student(*_round_data(r))
            c.end_round()
        metrics = evaluate_round(evaluator, fitted)
        assert ("student_accuracy_before_fit" in metrics) == (r == 2)
    online = evaluator.evaluate(plain.evaluated_student)["student_accuracy"]
    assert metrics["student_accuracy_before_fit"] == online  # the online student, before the fit
    assert metrics["student_accuracy"] == evaluator.evaluate(fitted.evaluated_student)["student_accuracy"]
    assert metrics["student_accuracy"] != online
    assert fitted.pre_fit_student is None  # taken once, not kept in memory
    assert "student_accuracy_before_fit" not in evaluate_round(evaluator, fitted)


def test_the_fit_logs_about_one_line_per_tenth_and_its_last_step(caplog: pytest.LogCaptureFixture) -> None:
    # 45 steps in chunks of 2: 23 chunks, a line every 2 chunks and at the last one.
    c = Coordinator(_config(final_fit_steps=45), INFO)
    for r in range(2):
        c.train_student(*_round_data(r))
        c.end_round()
    with caplog.at_level("INFO", logger="fed_dfkd.coordinator"):
        c.train_student(*_round_data(2))  # the last of 3 rounds
    lines = [r.getMessage() for r in caplog.records if r.name == "fed_dfkd.coordinator"]
    assert lines[0] == "final fit: a fresh student, 45 steps on 48 pooled samples"
    steps = [int(line.split()[2].split("/")[0]) for line in lines[1:]]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 45]
    assert all(line.split()[2].endswith("/45") for line in lines[1:])
