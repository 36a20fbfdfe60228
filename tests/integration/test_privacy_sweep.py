"""``fed-dfkd privacy sweep`` end to end (issue 4): a tiny client-level sweep on digits.

- the table (CSV, markdown) and the plot are written; the finite-ε run meets its target and the
  ε = ∞ run has no DP; the audit's numbers reach the table;
- rerunning the same command redoes nothing (no report, audit or teacher file rewritten);
- an interrupted run is resumed with ``--resume`` by the next sweep;
- a bad ε list is one line on stderr, exit code 2, and writes nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from fed_dfkd.cli.main import main
from runhelpers import PNG_MAGIC, QUICKSTART, read_report, set_args, tiny

pytestmark = pytest.mark.integration

FAST = [
    *tiny(),
    "runtime.threads=1",
]
TARGET = 4.0
FINITE, BASELINE = "client-central_eps4_seed0", "client-central_epsinf_seed0"


def sweep_argv(out: Path, *extra: str) -> list[str]:
    return ["privacy", "sweep", "--config", str(QUICKSTART), "--level", "client",
            "--epsilons", "4,inf", "--audit", "--out", str(out), *set_args(FAST), *extra]


def read_csv(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "sweep.csv", newline="") as handle:
        return {Path(row["run"]).name: row for row in csv.DictReader(handle)}


def written_files(out: Path) -> dict[str, int]:
    """mtime (ns) of every file a run or a pretraining writes, by path."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for folder in ("runs", "teacher_cache") for p in (out / folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main(sweep_argv(out)) == 0
    return out


def test_the_sweep_writes_the_table_and_the_plot(swept):
    rows = read_csv(swept)
    assert set(rows) == {FINITE, BASELINE}
    finite, baseline = rows[FINITE], rows[BASELINE]
    assert finite["privacy_level"] == "client" and finite["target_epsilon"] == "4"
    assert 0 < float(finite["epsilon"]) <= TARGET + 0.01
    assert baseline["privacy_level"] == "none" and baseline["epsilon"] == "inf"
    for row in rows.values():
        assert row["status"] == "completed" and row["rounds_completed"] == "2"
        assert 0 <= float(row["student_accuracy"]) <= 1
        assert 0 <= float(row["mia_loss_auc"]) <= 1 and row["mia_best_auc_attack"]
        assert float(row["mia_best_auc"]) >= float(row["mia_loss_auc"])

    report, none = read_report(swept / "runs" / FINITE), read_report(swept / "runs" / BASELINE)
    assert report["privacy_level"] == "client" and report["epsilon"] == float(finite["epsilon"])
    assert none["privacy_level"] == "none" and none["epsilon"] is None
    audit = json.loads((swept / "runs" / FINITE / "audit.json").read_text())
    assert audit["targets"]["student"]["attacks"]["loss"]["auc"] == float(finite["mia_loss_auc"])
    # Like for like: the baseline runs with the aggregation client-level DP forces.
    for name in rows:
        resolved = (swept / "runs" / name / "config.resolved.yaml").read_text()
        assert "ensemble: mean" in resolved and "update_aggregation: mean" in resolved
    # Client-level DP leaves the teachers alone: both runs share one pretraining.
    assert len(list((swept / "teacher_cache").iterdir())) == 1

    markdown = (swept / "sweep.md").read_text()
    assert "| client-central | 4 | 1/1 |" in markdown and "| client-central | ∞ | 1/1 |" in markdown
    assert "`distill.ensemble=mean`" in markdown and "fed-dfkd privacy sweep --config" in markdown
    assert (swept / "plots" / "accuracy_vs_epsilon.png").read_bytes().startswith(PNG_MAGIC)


def test_rerunning_the_same_command_redoes_nothing(swept, caplog, capsys):
    before = written_files(swept)
    with caplog.at_level(logging.INFO, logger="fed_dfkd.sweep"):
        assert main(sweep_argv(swept)) == 0
    assert written_files(swept) == before
    reused = [r.getMessage() for r in caplog.records if "reusing the finished run" in r.getMessage()]
    assert len(reused) == 2
    assert "0 run now, 2 reused, 0 failed" in capsys.readouterr().out


def test_an_interrupted_run_is_resumed(swept, tmp_path, caplog):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    # As if killed after the last round's checkpoint, before the final report.
    report_path = out / "runs" / FINITE / "report.json"
    report = json.loads(report_path.read_text())
    report_path.write_text(json.dumps(dict(report, status="running")))
    with caplog.at_level(logging.INFO, logger="fed_dfkd.sweep"):
        assert main(sweep_argv(out)) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(FINITE in m and "resuming the interrupted run (2 of 2 rounds done)" in m for m in messages)
    assert read_report(out / "runs" / FINITE)["status"] == "completed"
    assert read_csv(out)[FINITE]["status"] == "completed"


@pytest.mark.parametrize("epsilons", ["0,1", "-2", "four", "1,1"])
def test_a_bad_epsilon_list_is_exit_code_2(tmp_path, capsys, epsilons):
    out = tmp_path / "never"
    code = main(["privacy", "sweep", "--config", str(QUICKSTART), "--level", "client",
                 "--epsilons", epsilons, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "--epsilons" in err[0]
    assert not out.exists()


def test_client_level_with_distill_is_exit_code_2(tmp_path, capsys):
    code = main(["privacy", "sweep", "--config", str(QUICKSTART), "--level", "client",
                 "--command", "distill", "--epsilons", "1", "--out", str(tmp_path / "never")])
    assert code == 2 and "needs --command simulate" in capsys.readouterr().err


def test_an_unknown_level_is_exit_code_2(tmp_path, capsys):
    code = main(["privacy", "sweep", "--config", str(QUICKSTART), "--level", "user",
                 "--epsilons", "1", "--out", str(tmp_path / "never")])
    assert code == 2 and "invalid choice: 'user'" in capsys.readouterr().err
