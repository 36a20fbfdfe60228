"""The run folder: atomic writes, metrics.jsonl, checkpoints, and progress reporting."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
import torch

from fed_dfkd.errors import UserError
from fed_dfkd.progress import RoundProgress, format_metric, format_metrics
from fed_dfkd.runs import (
    MetricsLog,
    RunDirectory,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _strict_json(text: str):
    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_text_creates_parents_replaces_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second, longer content")
    assert target.read_text() == "second, longer content"
    assert os.listdir(target.parent) == ["file.txt"]


def test_atomic_write_bytes_round_trip(tmp_path):
    target = tmp_path / "blob.bin"
    data = bytes(range(256)) * 3
    atomic_write_bytes(target, data)
    assert target.read_bytes() == data
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.pt"
    atomic_torch_save({"value": torch.tensor([1.0, 2.0])}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"unpicklable": lambda: None}, target)  # torch.save fails mid-write
    assert os.listdir(tmp_path) == ["state.pt"]
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["value"], torch.tensor([1.0, 2.0]))


def test_atomic_write_json_writes_standard_json_with_non_finite_floats_as_null(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"z": 1, "a": float("nan"), "nested": [float("inf"), -float("inf"),
                                                                     0.5, (2, "x")], "ok": True})
    text = target.read_text()
    assert _strict_json(text) == {"z": 1, "a": None, "nested": [None, None, 0.5, [2, "x"]],
                                  "ok": True}
    assert list(_strict_json(text)) == ["z", "a", "nested", "ok"]  # insertion order kept
    assert text.startswith('{\n  "z": 1,')  # indent 2


# --- metrics.jsonl ------------------------------------------------------------------------------


def test_metrics_log_round_trip_and_missing_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.records() == []
    log.append({"step": 1, "student_accuracy": 0.5})
    log.append({"step": 2, "student_accuracy": float("nan"), "loss": 0.25})
    assert log.records() == [{"step": 1, "student_accuracy": 0.5},
                             {"step": 2, "student_accuracy": None, "loss": 0.25}]
    lines = (tmp_path / "metrics.jsonl").read_text().split("\n")
    assert len(lines) == 3 and lines[-1] == ""  # one line per record, each newline-terminated
    for line in lines[:-1]:
        _strict_json(line)


@pytest.mark.parametrize("record", [{"loss": 1.0}, {"step": 1.0}, {"step": "1"}, {"step": True}])
def test_metrics_log_rejects_a_record_without_integer_step(tmp_path, record):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="step"):
        log.append(record)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with caplog.at_level(logging.WARNING, logger="fed_dfkd.runs"):
        records = MetricsLog(path).records()
    assert records == [{"step": 1, "loss": 0.5}]
    assert any("incomplete last line" in message for message in caplog.messages)


def test_a_last_line_without_newline_counts_as_torn_even_if_it_parses(tmp_path):
    # The newline is the commit mark: records() and append() must agree on what was written.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    assert MetricsLog(path).records() == [{"step": 1}]


def test_append_after_a_torn_line_cuts_it_instead_of_gluing_onto_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    log = MetricsLog(path)
    log.append({"step": 2, "loss": 0.125})
    assert path.read_text() == '{"step": 1}\n{"step": 2, "loss": 0.125}\n'
    assert log.records() == [{"step": 1}, {"step": 2, "loss": 0.125}]


def test_truncate_after_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.append({"step": step, "value": step * 10})
    path.write_text(path.read_text() + '{"step": 6')  # and a torn line from the crash
    dropped = log.truncate_after(3)
    assert dropped == 2
    assert [record["step"] for record in log.records()] == [1, 2, 3]
    assert path.read_text().endswith('"value": 30}\n')
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    # Resuming appends round 4 again exactly once.
    log.append({"step": 4, "value": 41})
    assert [record["value"] for record in log.records()] == [10, 20, 30, 41]


def test_truncate_after_on_a_missing_file_does_nothing(tmp_path):
    assert MetricsLog(tmp_path / "metrics.jsonl").truncate_after(3) == 0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_damaged_middle_line_is_a_user_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl, line 2"):
        MetricsLog(path).records()
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"line 2.*integer \"step\""):
        MetricsLog(path).records()


# --- RunDirectory -------------------------------------------------------------------------------


def test_run_directory_layout(tmp_path):
    run = RunDirectory(tmp_path / "out")
    root = tmp_path / "out"
    assert (root / "checkpoints").is_dir() and (root / "plots").is_dir()
    assert run.config_path == root / "config.resolved.yaml"
    assert run.metrics_path == root / "metrics.jsonl"
    assert run.report_path == root / "report.json"
    assert run.checkpoint_path == root / "checkpoints" / "last.pt"
    assert run.plots_dir == root / "plots"
    assert run.metrics.path == run.metrics_path
    run.write_config("data:\n  dataset: digits\n")
    run.write_report({"final_accuracy": 0.9, "epsilon": float("inf")})
    assert run.config_path.read_text() == "data:\n  dataset: digits\n"
    assert _strict_json(run.report_path.read_text()) == {"final_accuracy": 0.9, "epsilon": None}


def test_out_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match="taken"):
        RunDirectory(tmp_path / "taken")


def test_checkpoint_round_trip_and_previous_kept(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.load_checkpoint() is None
    first = {"round": 1, "weights": torch.arange(6.0).reshape(2, 3), "rng": torch.get_rng_state()}
    run.save_checkpoint(first)
    loaded = run.load_checkpoint()
    assert loaded["round"] == 1 and torch.equal(loaded["weights"], first["weights"])
    assert torch.equal(loaded["rng"], first["rng"])
    assert not (tmp_path / "checkpoints" / "previous.pt").exists()

    run.save_checkpoint({"round": 2, "weights": torch.ones(2)})
    assert run.load_checkpoint()["round"] == 2
    previous = torch.load(tmp_path / "checkpoints" / "previous.pt", weights_only=False)
    assert previous["round"] == 1
    run.save_checkpoint({"round": 3})
    assert torch.load(tmp_path / "checkpoints" / "previous.pt", weights_only=False)["round"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.pt", "previous.pt"]


def test_a_temporary_left_by_a_killed_save_is_removed_on_open(tmp_path):
    RunDirectory(tmp_path).save_checkpoint({"round": 1})
    stale = tmp_path / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    run = RunDirectory(tmp_path)
    assert not stale.exists()
    assert run.load_checkpoint() == {"round": 1}


def test_a_crash_between_the_renames_falls_back_to_previous(tmp_path):
    run = RunDirectory(tmp_path)
    run.save_checkpoint({"round": 1})
    run.save_checkpoint({"round": 2})
    run.checkpoint_path.unlink()  # the state right after last.pt -> previous.pt
    assert run.load_checkpoint() == {"round": 1}


def test_a_corrupt_checkpoint_is_a_user_error_naming_the_file(tmp_path):
    run = RunDirectory(tmp_path)
    run.save_checkpoint({"round": 1})
    run.save_checkpoint({"round": 2})
    data = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(UserError) as caught:
        run.load_checkpoint()
    message = str(caught.value)
    assert str(run.checkpoint_path) in message and "cannot be read" in message
    assert "previous.pt" in message  # tells the user how to resume one round earlier
    assert run.checkpoint_path.exists()  # nothing deleted


def test_a_checkpoint_that_is_not_a_dict_is_a_user_error(tmp_path):
    run = RunDirectory(tmp_path)
    torch.save([1, 2, 3], run.checkpoint_path)
    with pytest.raises(UserError, match=r"last\.pt holds a list"):
        run.load_checkpoint()


# --- progress -----------------------------------------------------------------------------------


def test_format_metric_is_compact():
    assert format_metric(0.912345) == "0.9123"
    assert format_metric(0.41) == "0.41"
    assert format_metric(1.2) == "1.2"
    assert format_metric(3) == "3"
    assert format_metric(1.2e-5) == "1.2e-05"
    assert format_metric(float("nan")) == "nan"
    assert format_metric(torch.tensor(0.25)) == "0.25"
    assert format_metrics({"a": 0.5, "b": 2}) == "a=0.5 b=2"


def test_lines_mode_logs_one_line_per_update(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="fed_dfkd.progress"):
        with RoundProgress(40, mode="lines", stream=stream) as progress:
            progress.update(3, {"student_accuracy": 0.912345, "loss": 0.41, "seconds": 1.2})
            progress.update(4, {})
    records = [record for record in caplog.records if record.name == "fed_dfkd.progress"]
    assert [record.getMessage() for record in records] == [
        "round 3/40 student_accuracy=0.9123 loss=0.41 seconds=1.2",
        "round 4/40",
    ]
    assert all(record.levelno == logging.INFO for record in records)
    assert stream.getvalue() == ""


def test_lines_mode_names_desc_and_unit(caplog):
    with caplog.at_level(logging.INFO, logger="fed_dfkd.progress"):
        with RoundProgress(5, mode="lines", desc="teacher 2", unit="epoch") as progress:
            progress.update(1, {"loss": 2.0})
    assert caplog.messages == ["teacher 2: epoch 1/5 loss=2"]


def test_none_mode_emits_nothing(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        with RoundProgress(10, mode="none", stream=stream) as progress:
            for step in range(1, 11):
                progress.update(step, {"loss": 1.0})
    assert caplog.records == [] and stream.getvalue() == ""


def test_auto_mode_uses_lines_when_the_stream_is_not_a_terminal():
    assert RoundProgress(3, mode="auto", stream=io.StringIO()).mode == "lines"


def test_bar_mode_writes_the_bar_and_metrics_to_the_stream(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="fed_dfkd.progress"):
        with RoundProgress(4, mode="bar", stream=stream, initial=1) as progress:
            for step in range(2, 5):
                progress.update(step, {"student_accuracy": 0.75})
    output = stream.getvalue()
    assert "4/4" in output and "student_accuracy=0.75" in output
    assert caplog.records == []


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, bar, lines, none"):
        RoundProgress(3, mode="fancy")
