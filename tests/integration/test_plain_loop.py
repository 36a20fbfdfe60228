"""``bench/plain_loop.py``, the yardstick the framework's distillation is measured against
(bench/results/fmnist_tuning.md): it runs on a pretrained teacher, stops at its step budget,
reports the teacher's own test accuracy, and a seed reproduces it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fed_dfkd.config import load_config
from fed_dfkd.data.teachers import pretrain_teachers, teacher_path
from runhelpers import QUICKSTART, REPO

pytestmark = pytest.mark.integration

OVERRIDES = ["models.pretrain.epochs=2", "federation.num_clients=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("plain")
    cfg = load_config(QUICKSTART, OVERRIDES)
    manifests = pretrain_teachers(cfg, out, central=True, clients=False)
    (manifest,) = manifests
    return teacher_path(out, None), float(manifest.test_accuracy)


def _command(teacher_file: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "bench" / "plain_loop.py"), "--config", str(QUICKSTART),
        "--teacher", str(teacher_file), "--seconds", "600", "--eval-seconds", "600",
        "--batch", "32", "--g-steps", "1", "--s-steps", "3", "--cosine-steps", "9",
        *(arg for kv in OVERRIDES for arg in ("--set", kv)), *extra,
    ]


def _run(teacher_file: Path, *extra: str) -> dict:
    done = subprocess.run(_command(teacher_file, *extra), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_runs_to_its_step_budget_and_reports_the_teacher(teacher: tuple[Path, float]) -> None:
    path, accuracy = teacher
    result = _run(path)
    (last,) = result["history"]  # one evaluation: the budget ends the run before eval-seconds
    assert last["student_steps"] == 9 and last["iterations"] == 3
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["teacher_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_a_seed_reproduces_the_run_and_another_seed_changes_it(teacher: tuple[Path, float]) -> None:
    path, _ = teacher
    first, again = _run(path, "--mixup", "0.5"), _run(path, "--mixup", "0.5")
    assert first["student_checksum"] == again["student_checksum"]
    assert first["final_accuracy"] == again["final_accuracy"]
    other = _run(path, "--mixup", "0.5", "--set", "runtime.seed=1")
    assert other["student_checksum"] != first["student_checksum"]


def _pool_command(teacher_file: Path, mode: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "bench" / "plain_loop.py"), "--config", str(QUICKSTART),
        "--teacher", str(teacher_file), "--seconds", "8", "--eval-seconds", "600",
        "--batch", "16", "--g-steps", "2", "--s-steps", "2", "--pool", mode,
        *(arg for kv in OVERRIDES for arg in ("--set", kv)), *extra,
    ]


@pytest.mark.parametrize("mode", ["fresh", "fixed", "optimized"])
def test_the_pool_modes_train_one_batch_per_iteration(teacher: tuple[Path, float], mode: str) -> None:
    path, _ = teacher
    done = subprocess.run(_pool_command(path, mode), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (last,) = result["history"]
    assert last["iterations"] >= 1 and last["student_steps"] == 2 * last["iterations"]
    assert 0.0 <= result["final_accuracy"] <= 1.0


def test_a_missing_teacher_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    done = subprocess.run(_command(missing), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(missing) in done.stderr and done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--mixup", "1.5"], ["--g-betas", "0.9"],
                                 ["--seconds", "nan"], ["--adv", "hinge"], ["--pool", "all"],
                                 ["--pool", "fixed", "--mixup", "0.5"]])
def test_a_bad_argument_is_a_usage_error(bad: list[str], tmp_path: Path) -> None:
    done = subprocess.run(_command(tmp_path / "unused.pt", *bad), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("plain_loop.py: error:")
