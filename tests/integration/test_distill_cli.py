"""``fed-dfkd distill`` end to end on the quickstart config, shrunk to seconds: the run folder it
writes, refusing to overwrite a run, and the resume oracle (interrupted + resumed == uninterrupted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


import pytest
import torch
import yaml

import fed_dfkd.reporting as reporting
from fed_dfkd.centralized import CentralDistillation
from fed_dfkd.cli.main import main
from fed_dfkd.config import DistillConfig, config_from_dict, load_config
from fed_dfkd.data.teachers import teacher_path
from runhelpers import PNG_MAGIC, QUICKSTART, REPO, TIMING_KEYS, assert_same_state, load_checkpoint, read_metrics, set_args

pytestmark = pytest.mark.integration

ROUNDS = 3
FAST = [
    f"federation.rounds={ROUNDS}",
    "distill.student_steps=3",
    "method.generator_steps=1",
    "models.pretrain.epochs=2",
    "distill.batch_size=32",
    "method.negative_bank_size=64",
    "runtime.progress=none",
]
# Per-round values that measure time, not results.


def distill(out: Path, *extra: str, teachers: Path | None = None, overrides: list[str] = FAST) -> int:
    argv = ["distill", "--config", str(QUICKSTART), "--out", str(out), *set_args(overrides)]
    if teachers is not None:
        argv += ["--teachers", str(teachers)]
    return main([*argv, *extra])


def documented_report_keys() -> list[str]:
    """The top-level keys named in fed_dfkd/reporting.py's docstring ("Report keys ... history")."""
    section = reporting.__doc__.split("Report keys", 1)[1].split("(one dict", 1)[0]
    return re.findall(r"``(\w+)``", section)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    """The central teacher, pretrained once for the whole module."""
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["pretrain", "--config", str(QUICKSTART), "--out", str(out), "--central", "--no-clients",
            *set_args(FAST)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory, teachers) -> Path:
    """Run A: three rounds, uninterrupted. Read only: copy it before writing."""
    out = tmp_path_factory.mktemp("run") / "a"
    assert distill(out, teachers=teachers) == 0
    return out


def count_rounds(monkeypatch) -> dict[str, int]:
    """Count CentralDistillation.run_round calls from now on."""
    original = CentralDistillation.run_round
    calls = {"count": 0}

    def counted(self):
        calls["count"] += 1
        return original(self)

    monkeypatch.setattr(CentralDistillation, "run_round", counted)
    return calls


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------


def test_distill_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(out) == 0  # no --teachers: pretrains its own under OUT/teachers
    assert "student accuracy" in capsys.readouterr().out
    assert (out / "teachers" / "central.pt").is_file()

    resolved = config_from_dict(yaml.safe_load((out / "config.resolved.yaml").read_text()))
    assert resolved == load_config(QUICKSTART, FAST)

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(0 <= m["student_accuracy"] <= 1 for m in metrics)

    report = json.loads((out / "report.json").read_text())
    keys = documented_report_keys()
    assert len(keys) >= 10 and "student_accuracy" in keys and "history" in keys
    missing = [key for key in keys if key not in report]
    assert not missing, f"report.json lacks documented keys {missing}"
    assert report["rounds_completed"] == ROUNDS
    assert report["method"] == "adadfkd" and report["dataset"] == "digits"
    for key in ("student_accuracy", "ensemble_accuracy", "best_teacher_accuracy", "agreement"):
        assert 0 <= report[key] <= 1, key
    assert report["teacher_accuracies"] and all(0 <= a <= 1 for a in report["teacher_accuracies"])
    assert report["best_teacher_accuracy"] == max(report["teacher_accuracies"])
    assert [h["step"] for h in report["history"]] == [1, 2, 3]
    assert all(0 <= h["student_accuracy"] <= 1 for h in report["history"])
    assert report["student_accuracy"] == report["history"][-1]["student_accuracy"]
    per_class = report["per_class_accuracy"]
    assert per_class["classes"] == [str(k) for k in range(10)] and len(per_class["student"]) == 10
    assert all(0 <= a <= 1 for a in per_class["student"] + per_class["ensemble"])
    # The report takes the last evaluated round of metrics.jsonl.
    assert read_metrics(out)[-1]["per_class_accuracy"] == per_class["student"]

    checkpoint = load_checkpoint(out)
    assert checkpoint["round"] == ROUNDS and checkpoint["engine"]["coordinator"]["round"] == ROUNDS
    for name in ("accuracy.png", "samples.png", "per_class.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(completed_run, tmp_path, teachers, capsys):
    out = copy_run(completed_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert distill(out, teachers=teachers) == 2
    line = one_line(capsys.readouterr().err)
    assert "--resume" in line and str(out) in line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resuming_a_finished_run_runs_no_more_rounds(completed_run, tmp_path, teachers, monkeypatch):
    out = copy_run(completed_run, tmp_path)
    rounds = count_rounds(monkeypatch)
    assert distill(out, "--resume", teachers=teachers) == 0
    assert rounds["count"] == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert_same_state(load_checkpoint(out)["engine"], load_checkpoint(completed_run)["engine"])


# --------------------------------------------------------------------------------------------
# The resume oracle
# --------------------------------------------------------------------------------------------


# Replay keeps labelled batches of past rounds in the engine state: resume must restore them too.
REPLAY = ["distill.replay_rounds=1", "distill.pseudo_batches=2"]
# The averaged student is engine state too.
EMA = ["distill.student_ema=0.8"]
# So is the feature hint's map P, with its optimizer group.
FEATURE = ["distill.feature_weight=0.5"]
# A reset of G's input layer alone keeps the body and its Adam moments across rounds.
RESET_INPUT = ["method.generator_reset=true", "method.generator_reset_scope=input",
               "method.generator_latents=round", "distill.pseudo_batches=1"]


@pytest.mark.parametrize("variant", ["default", "replay", "ema", "feature", "reset_input"])
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(completed_run, tmp_path, teachers,
                                                                    monkeypatch, capsys, variant):
    overrides = FAST
    if variant == "replay":
        if not {"replay_rounds", "pseudo_batches"} <= {f.name for f in dataclasses.fields(DistillConfig)}:
            pytest.skip("distill.replay_rounds is not in this version of the config")
        overrides = [*FAST, *REPLAY]
    if variant == "ema":
        overrides = [*FAST, *EMA]
    if variant == "feature":
        overrides = [*FAST, *FEATURE]
    if variant == "reset_input":
        overrides = [*FAST, *RESET_INPUT]
    if variant != "default":
        completed_run = tmp_path / "a"
        assert distill(completed_run, teachers=teachers, overrides=overrides) == 0
    out = tmp_path / "b"
    original = CentralDistillation.run_round
    calls = {"count": 0}

    def interrupted_in_round_three(self):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt  # Ctrl-C as round 3 starts
        return original(self)

    monkeypatch.setattr(CentralDistillation, "run_round", interrupted_in_round_three)
    assert distill(out, teachers=teachers, overrides=overrides) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    # Two completed rounds are kept, and nothing of the third.
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out)["round"] == 2

    resumed_rounds = count_rounds(monkeypatch)
    assert distill(out, "--resume", teachers=teachers, overrides=overrides) == 0
    assert resumed_rounds["count"] == 1, "resume must run only the missing round"

    resumed, uninterrupted = load_checkpoint(out), load_checkpoint(completed_run)
    # Student, generator, their optimizers, the self-paced and synthesizer state: bit-exact.
    for name in ("student", "generator"):
        assert_same_state(resumed["engine"]["coordinator"][name],
                          uninterrupted["engine"]["coordinator"][name], name)
    assert_same_state(resumed["engine"], uninterrupted["engine"])

    metrics_resumed, metrics_uninterrupted = read_metrics(out), read_metrics(completed_run)
    assert [m["step"] for m in metrics_resumed] == [m["step"] for m in metrics_uninterrupted] == [1, 2, 3]
    for a, b in zip(metrics_resumed, metrics_uninterrupted):
        assert a.keys() == b.keys()
        assert_same_state({k: v for k, v in a.items() if k not in TIMING_KEYS},
                          {k: v for k, v in b.items() if k not in TIMING_KEYS}, f"round {a['step']}")
    report = json.loads((out / "report.json").read_text())
    assert report["rounds_completed"] == ROUNDS
    assert [h["step"] for h in report["history"]] == [1, 2, 3]
    if variant == "ema":
        assert resumed["engine"]["coordinator"]["trainer"]["ema"] is not None
    if variant == "feature":
        assert resumed["engine"]["coordinator"]["trainer"]["projection"] is not None
        assert all(m["feature_loss"] > 0 for m in metrics_resumed)


def test_resume_after_a_crash_between_metrics_and_checkpoint_redoes_the_round(completed_run, tmp_path, teachers,
                                                                               monkeypatch):
    # A metrics line without its checkpoint (a crash after append, before save): resume drops it.
    out = copy_run(completed_run, tmp_path)
    state = load_checkpoint(out)
    previous = torch.load(out / "checkpoints" / "previous.pt", map_location="cpu", weights_only=False)
    assert previous["round"] == ROUNDS - 1
    shutil.copy(out / "checkpoints" / "previous.pt", out / "checkpoints" / "last.pt")
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    rounds = count_rounds(monkeypatch)
    assert distill(out, "--resume", teachers=teachers) == 0
    assert rounds["count"] == 1
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert_same_state(load_checkpoint(out)["engine"], state["engine"])


def test_resume_with_a_changed_config_is_refused(completed_run, tmp_path, teachers, capsys):
    out = copy_run(completed_run, tmp_path)
    resolved_before = (out / "config.resolved.yaml").read_text()
    assert distill(out, "--resume", teachers=teachers, overrides=[*FAST, "distill.lr=0.5"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "config differs" in line
    assert (out / "config.resolved.yaml").read_text() == resolved_before


def test_resume_may_change_how_the_run_is_shown(completed_run, tmp_path, teachers):
    out = copy_run(completed_run, tmp_path)
    assert distill(out, "--resume", teachers=teachers, overrides=[*FAST, "runtime.progress=lines",
                                                                  "runtime.threads=1",
                                                                  "runtime.memory_format=contiguous"]) == 0


def test_a_contiguous_run_matches_the_channels_last_one(completed_run, tmp_path, teachers):
    """runtime.memory_format (channels_last in the quickstart file) only reorders the arithmetic:
    the first round's generator step (the teacher and the initial student, no optimiser step yet)
    agrees to float rounding, and the run ends where the NHWC one does, up to what rounding does
    to a few Adam steps."""
    out = tmp_path / "nchw"
    assert distill(out, teachers=teachers, overrides=[*FAST, "runtime.memory_format=contiguous"]) == 0
    ours, theirs = read_metrics(out), read_metrics(completed_run)
    assert len(ours) == len(theirs) == ROUNDS
    assert ours[0]["generator_loss"] == pytest.approx(theirs[0]["generator_loss"], rel=1e-4)
    report, reference = (json.loads((d / "report.json").read_text()) for d in (out, completed_run))
    assert report["teacher_accuracies"] == reference["teacher_accuracies"]
    assert report["student_accuracy"] == pytest.approx(reference["student_accuracy"], abs=0.05)
    # Each run did use its layout: the checkpointed students' convolutions; the teacher was
    # pretrained under the file's (NHWC).
    saved_teacher = torch.load(teacher_path(teachers, None), weights_only=True)["state_dict"]
    for state, nhwc in ((load_checkpoint(completed_run)["engine"]["coordinator"]["student"], True),
                        (load_checkpoint(out)["engine"]["coordinator"]["student"], False),
                        (saved_teacher, True)):
        convs = [t for t in state.values() if t.dim() == 4 and t.shape[1] > 1]
        assert convs and all(t.is_contiguous(memory_format=torch.channels_last) != t.is_contiguous()
                             and t.is_contiguous(memory_format=torch.channels_last) == nhwc for t in convs)


def test_resume_without_a_checkpoint_is_refused(tmp_path, teachers, capsys):
    out = tmp_path / "empty"
    assert distill(out, "--resume", teachers=teachers) == 2
    line = one_line(capsys.readouterr().err)
    assert "no checkpoint" in line


@pytest.mark.parametrize("resume", [True, False])
def test_a_corrupt_checkpoint_is_named(completed_run, tmp_path, teachers, capsys, resume):
    out = copy_run(completed_run, tmp_path)
    metrics_before = (out / "metrics.jsonl").read_bytes()
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert distill(out, *(["--resume"] if resume else []), teachers=teachers) == 2
    line = one_line(capsys.readouterr().err)
    assert str(out / "checkpoints" / "last.pt") in line
    assert "previous.pt" in line  # the way out is named too
    # Nothing was deleted or rewritten.
    assert (out / "checkpoints" / "last.pt").read_bytes() == b"not a checkpoint"
    assert (out / "metrics.jsonl").read_bytes() == metrics_before


# --------------------------------------------------------------------------------------------
# Progress lines (a subprocess: pytest's own log handlers would hide the missing configuration)
# --------------------------------------------------------------------------------------------


def test_distill_logs_one_line_per_round_off_a_terminal(tmp_path, teachers):
    overrides = [o for o in FAST if not o.startswith("runtime.progress")]
    command = [sys.executable, "-m", "fed_dfkd.cli.main", "distill", "--config", str(QUICKSTART),
               "--out", str(tmp_path / "run"), "--teachers", str(teachers),
               *set_args([*overrides, "runtime.progress=lines", "runtime.threads=1"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for r in range(1, ROUNDS + 1):
        assert f"round {r}/{ROUNDS}" in result.stderr


def test_with_an_averaged_student_the_average_is_what_is_reported_and_audited(tmp_path, teachers):
    from fed_dfkd.audit import _student_state
    from fed_dfkd.coordinator import build_student
    from fed_dfkd.data.datasets import load_experiment_data
    from fed_dfkd.data.teachers import evaluate_accuracy

    out = tmp_path / "ema"
    assert distill(out, teachers=teachers, overrides=[*FAST, *EMA]) == 0
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    coordinator = checkpoint["engine"]["coordinator"]
    average, trained = coordinator["trainer"]["ema"], coordinator["student"]
    assert any(not torch.equal(average[k], trained[k]) for k in trained)
    cfg = load_config(out / "config.resolved.yaml")
    splits = load_experiment_data(cfg)
    student = build_student(cfg, splits.info)
    student.load_state_dict(average)
    report = json.loads((out / "report.json").read_text())
    expected = evaluate_accuracy(student, splits.test_images, splits.test_labels, batch_size=1024)
    assert report["student_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert _student_state(checkpoint, out) is average
