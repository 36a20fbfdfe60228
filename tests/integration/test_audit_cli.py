"""``fed-dfkd audit --run DIR`` on a `fed-dfkd distill` run shrunk to seconds (two owners'
teachers): the files it writes, the values in range, the --teachers override and one-line
errors for a missing or damaged run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fed_dfkd.cli.main import main
from runhelpers import PNG_MAGIC, QUICKSTART, set_args

pytestmark = pytest.mark.integration

FAST = [
    "federation.rounds=2",
    "federation.num_clients=2",
    "distill.teacher_source=clients",
    "distill.student_steps=3",
    "method.generator_steps=1",
    "models.pretrain.epochs=2",
    "distill.batch_size=32",
    "method.negative_bank_size=64",
    "runtime.progress=none",
]
TARGETS = ("student", "client_0", "client_1")
ATTACKS = ("loss", "mentr", "calibrated")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished distill run with its teachers in DIR/teachers. Read only: copy it to change it."""
    out = tmp_path_factory.mktemp("audit") / "run"
    argv = ["distill", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST)]
    assert main(argv) == 0
    return out


def test_audit_writes_json_markdown_and_plot(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    capsys.readouterr()
    assert main(["audit", "--run", str(run), "--max-examples", "100", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["target", "attack", "AUC", "TPR@1%FPR", "members",
                                           "non-members"]
    assert "privacy: level none" in out

    audit = json.loads((run / "audit.json").read_text())
    assert audit["privacy"]["level"] == "none" and audit["privacy"]["epsilon"] is None
    assert audit["seed"] == 3 and audit["max_examples"] == 100 and audit["class_matched"] is True
    assert list(audit["targets"]) == list(TARGETS)
    report = json.loads((run / "report.json").read_text())
    pool = audit["non_member_pool"]
    assert pool + audit["reference_non_members"] == 360  # digits' test split (20 % of 1797)
    for name, target in audit["targets"].items():
        assert target["kind"] == ("student" if name == "student" else "teacher")
        assert list(target["attacks"]) == list(ATTACKS)
        for result in target["attacks"].values():
            assert set(result) == {"auc", "tpr_at_1pct_fpr", "members", "non_members"}
            assert 0.0 <= result["auc"] <= 1.0 and 0.0 <= result["tpr_at_1pct_fpr"] <= 1.0
            assert result["members"] == result["non_members"]
            assert 10 <= result["members"] <= 100
    # Members of the student: both owners' partitions, i.e. the whole train split.
    teacher_sizes = [audit["targets"][f"client_{k}"]["member_pool"] for k in range(2)]
    assert teacher_sizes == report_sizes(run)
    assert audit["targets"]["student"]["member_pool"] == sum(teacher_sizes) == 1437
    assert report["teacher_source"] == "clients"

    md = (run / "audit.md").read_text()
    assert "| student | loss |" in md and "| client_1 | calibrated |" in md
    assert (run / "plots" / "audit_roc.png").read_bytes()[:8] == PNG_MAGIC

    # Seeded: the same command gives the same numbers.
    assert main(["audit", "--run", str(run), "--max-examples", "100", "--seed", "3"]) == 0
    assert json.loads((run / "audit.json").read_text())["targets"] == audit["targets"]


def report_sizes(run: Path) -> list[int]:
    """Each owner's partition size, as pretraining recorded it."""
    partitions = json.loads((run / "teachers" / "partitions.json").read_text())
    return [client["size"] for client in partitions["clients"]]


def test_teachers_elsewhere_need_the_override(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    shutil.move(str(run / "teachers"), str(pretrained / "teachers"))
    # The copied report names the original folder: point it at the copy, whose teachers moved.
    report = json.loads((run / "report.json").read_text())
    report["teachers_dir"] = str(run)
    (run / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["audit", "--run", str(run), "--max-examples", "20"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "no teacher at" in err and "--teachers DIR" in err.strip().splitlines()[-1]
    assert main(["audit", "--run", str(run), "--max-examples", "20",
                 "--teachers", str(pretrained)]) == 0
    audit = json.loads((run / "audit.json").read_text())
    assert audit["teachers_dir"] == str(pretrained)
    assert list(audit["targets"]) == list(TARGETS)
    # Recorded in the report, the folder needs no override.
    report["teachers_dir"] = str(pretrained)
    (run / "report.json").write_text(json.dumps(report))
    assert main(["audit", "--run", str(run), "--max-examples", "20"]) == 0
    assert json.loads((run / "audit.json").read_text())["teachers_dir"] == str(pretrained)


def test_missing_run_folder_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["audit", "--run", str(missing)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == f"fed-dfkd audit: error: --run {missing}: no such folder"
    assert not missing.exists()  # nothing created


def test_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["audit", "--run", str(tmp_path)]) == 2
    assert "not a fed-dfkd run folder" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_missing_or_damaged_checkpoint_is_one_line_exit_2(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("teachers"))
    for name in ("last.pt", "previous.pt"):
        (run / "checkpoints" / name).unlink(missing_ok=True)
    assert main(["audit", "--run", str(run)]) == 2
    assert "no checkpoint" in one_line(capsys.readouterr().err)

    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["audit", "--run", str(run)]) == 2
    assert "cannot be read" in one_line(capsys.readouterr().err)


def test_bad_max_examples_is_exit_2(run_dir, capsys):
    assert main(["audit", "--run", str(run_dir), "--max-examples", "0"]) == 2
    assert "--max-examples must be >= 1" in one_line(capsys.readouterr().err)
