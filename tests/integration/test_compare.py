"""``bench/compare.py``, which makes the method tables of bench/results/: one shared teacher,
one run per variant and seed, a table of means and spreads, finished runs reused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fed_dfkd.config import load_config
from fed_dfkd.data.teachers import pretrain_teachers
from runhelpers import QUICKSTART, REPO, tiny

pytestmark = pytest.mark.integration

OVERRIDES = [*tiny(rounds=1, clients=1), "distill.eval_every=1"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("compare-teachers")
    (manifest,) = pretrain_teachers(load_config(QUICKSTART, OVERRIDES), out, central=True, clients=False)
    return out, float(manifest.test_accuracy)


def _compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "bench" / "compare.py"), "--config", str(QUICKSTART),
               "--out", str(out), "--variant", "adadfkd:method.name=adadfkd",
               "--variant", "dafl:method.name=dafl,method.class_balance_weight=5",
               "--seeds", "adadfkd=0,1", *(a for kv in OVERRIDES for a in ("--set", kv)), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_one_run_per_variant_and_seed_on_the_given_teacher(teachers, tmp_path: Path) -> None:
    folder, accuracy = teachers
    done = _compare(tmp_path, "--teachers", str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "teachers-run").exists()  # the given teacher, not a new one
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["seed"]) for r in rows] == [("adadfkd", "0"), ("adadfkd", "1"), ("dafl", "0")]
    assert all(float(r["teacher_accuracy"]) == pytest.approx(accuracy, abs=1e-9) for r in rows)
    resolved = (tmp_path / "dafl-seed0" / "config.resolved.yaml").read_text()
    assert "name: dafl" in resolved and "class_balance_weight: 5.0" in resolved
    assert "seed: 1" in (tmp_path / "adadfkd-seed1" / "config.resolved.yaml").read_text()
    table = (tmp_path / "results.md").read_text().splitlines()
    adadfkd = [float(r["student_accuracy"]) for r in rows[:2]]
    mean = sum(adadfkd) / 2
    assert table[2].startswith(f"| adadfkd | 2 | {mean:.4f} ± ")
    assert table[3].startswith(f"| dafl | 1 | {float(rows[2]['student_accuracy']):.4f} |")

    stamp = (tmp_path / "dafl-seed0" / "report.json").stat().st_mtime_ns
    again = _compare(tmp_path, "--teachers", str(folder))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "dafl-seed0" / "report.json").stat().st_mtime_ns == stamp  # reused
    assert (tmp_path / "results.md").read_text().splitlines() == table

    # A finished run under another config is refused before any work, not tabulated as this one.
    changed = _compare(tmp_path, "--teachers", str(folder), "--set", "distill.lr=0.01")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert f"{tmp_path / 'adadfkd-seed0'} holds a finished run made under another config" in changed.stderr
    assert (tmp_path / "dafl-seed0" / "report.json").stat().st_mtime_ns == stamp
    elsewhere = tmp_path / "other-teachers"
    elsewhere.mkdir()
    (elsewhere / "teachers").symlink_to(folder / "teachers")
    moved = _compare(tmp_path, "--teachers", str(elsewhere))
    assert moved.returncode == 2 and "finished run on the teachers in" in moved.stderr


def test_a_teacher_folder_without_a_central_teacher_is_refused(tmp_path: Path) -> None:
    done = _compare(tmp_path / "out", "--teachers", str(tmp_path))
    assert done.returncode == 2
    assert f"--teachers {tmp_path}: no teachers/central.pt there" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
