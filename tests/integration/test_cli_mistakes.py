"""Mistakes a user makes on the command line give one line naming the problem and exit code 2,
never a traceback (README "Commands"): regression tests for cases that once crashed, exited 0 or
started processes before failing. Each runs in well under a second, except the few that load
the digits dataset (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fed_dfkd.cli.main import main
from runhelpers import QUICKSTART, set_args

pytestmark = pytest.mark.integration

FAST = [
    "federation.rounds=1",
    "distill.student_steps=2",
    "method.generator_steps=1",
    "models.pretrain.epochs=1",
    "distill.batch_size=32",
    "method.negative_bank_size=64",
    "runtime.progress=none",
]
GARBAGE = bytes(range(256)) * 8  # not a zip archive, not a pickle


def error_line(capsys, command: str) -> str:
    """The command's only line on stderr (log lines aside), checked to be its error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines()
             if " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fed-dfkd {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    """A pretrain folder with the central digits teacher (one epoch)."""
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["pretrain", "--config", str(QUICKSTART), "--out", str(out), "--central",
            "--no-clients", *set_args(FAST)]
    assert main(argv) == 0
    return out


def distill(out: Path, *extra: str) -> int:
    return main(["distill", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST), *extra])


# --- distill ----------------------------------------------------------------------------------


def test_distill_teachers_that_is_not_a_folder(tmp_path, capsys):
    missing, a_file = tmp_path / "missing", tmp_path / "teacher.pt"
    a_file.write_bytes(b"")
    for teachers in (missing, a_file):
        assert distill(tmp_path / "out", "--teachers", str(teachers)) == 2
        line = error_line(capsys, "distill")
        assert f"--teachers {teachers}: no such folder" in line


def test_distill_teachers_pointing_at_the_teachers_subfolder_names_its_parent(teachers, tmp_path, capsys):
    assert distill(tmp_path / "out", "--teachers", str(teachers / "teachers")) == 2
    line = error_line(capsys, "distill")
    assert "looks like the teachers/ folder itself" in line and str(teachers) in line


def test_distill_with_a_teacher_of_another_dataset_is_refused(teachers, tmp_path, capsys):
    """It would run (the models do not care about the image size) and report nonsense."""
    other = tmp_path / "other"
    (other / "teachers").mkdir(parents=True)
    saved = torch.load(teachers / "teachers" / "central.pt", weights_only=True)
    saved["manifest"]["dataset"] = "mnist"
    torch.save(saved, other / "teachers" / "central.pt")
    assert distill(tmp_path / "out", "--teachers", str(other)) == 2
    line = error_line(capsys, "distill")
    assert "does not fit data.dataset 'digits'" in line and "dataset 'mnist'" in line
    assert not (tmp_path / "out" / "checkpoints" / "last.pt").exists()


def test_distill_with_a_garbage_teacher_file_names_it_without_torch_advice(tmp_path, capsys):
    folder = tmp_path / "pretrain"
    (folder / "teachers").mkdir(parents=True)
    (folder / "teachers" / "central.pt").write_bytes(GARBAGE)
    assert distill(tmp_path / "out", "--teachers", str(folder)) == 2
    line = error_line(capsys, "distill")
    assert f"teacher file {folder / 'teachers' / 'central.pt'} cannot be read" in line
    assert "not a fed-dfkd teacher" in line and "weights_only" not in line


def test_distill_resume_of_a_simulate_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"server": {}, "round": 1, "resume_key": "0123456789abcdef"},
               out / "checkpoints" / "last.pt")
    assert distill(out, "--resume") == 2
    line = error_line(capsys, "distill")
    assert f"{out / 'checkpoints' / 'last.pt'} is not the checkpoint of a `fed-dfkd distill` run" in line


def test_corrupt_idx_files_name_the_folder_and_the_fix(tmp_path, capsys):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(GARBAGE)
    assert distill(tmp_path / "out", "--set", "data.dataset=fashion_mnist",
                   "--data-root", str(tmp_path / "root")) == 2
    line = error_line(capsys, "distill")
    assert f"cannot read the IDX files in {raw}" in line and "AssertionError" in line
    assert "damaged or not uncompressed IDX files" in line and "AssertionError()" not in line


def test_audit_of_a_run_whose_config_no_longer_loads_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "config.resolved.yaml").write_text("federation: {rounds: 0}\n")
    assert main(["audit", "--run", str(run)]) == 2
    line = error_line(capsys, "audit")
    assert f"{run / 'config.resolved.yaml'}: config error at federation.rounds" in line


# --- simulate ---------------------------------------------------------------------------------


def simulate(out: Path, teachers: Path, *extra: str) -> int:
    return main(["simulate", "--config", str(QUICKSTART), "--out", str(out), "--teachers",
                 str(teachers), *set_args([*FAST, "federation.num_clients=1"]), *extra])


def test_simulate_teachers_mistakes(teachers, tmp_path, capsys):
    assert simulate(tmp_path / "a", tmp_path / "missing") == 2
    assert "no such folder" in error_line(capsys, "simulate")
    assert simulate(tmp_path / "b", teachers / "teachers" / "central.pt") == 2
    assert "no such folder" in error_line(capsys, "simulate")


def test_simulate_with_teachers_of_another_dataset_stops_before_the_federation(teachers, tmp_path, capsys):
    """Every owner would refuse every round: exit 1 after four attempts, before the fix."""
    other = tmp_path / "other" / "teachers"
    other.mkdir(parents=True)
    saved = torch.load(teachers / "teachers" / "central.pt", weights_only=True)
    saved["manifest"].update(partition_id=0, num_clients=1)
    torch.save(saved, other / "client_0.pt")
    (other / "client_0.json").write_text(json.dumps({**saved["manifest"], "dataset": "kmnist"}))
    assert simulate(tmp_path / "run", other.parent) == 2
    line = error_line(capsys, "simulate")
    assert "client_0.pt does not fit data.dataset 'digits'" in line and "'kmnist'" in line


@pytest.mark.parametrize("overrides, message", [
    (["distill.mixup=1", "distill.relabel_augmented=true"],
     "distill.relabel_augmented needs the teachers in the server's process"),
    (["distill.feature_weight=1"], "distill.feature_weight needs the teachers' penultimate features"),
])
def test_simulate_refuses_what_only_distill_can_run_before_pretraining_a_teacher(tmp_path, capsys, overrides,
                                                                                 message):
    out = tmp_path / "run"
    argv = ["simulate", "--config", str(QUICKSTART), "--out", str(out), *set_args([*FAST, *overrides])]
    assert main(argv) == 2
    assert message in error_line(capsys, "simulate")
    assert not (out / "teachers").exists()


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device, expected", [
    ("cuda:x", "--device 'cuda:x' is not a device"),
    ("cuda:3", "--device is 'cuda:3' but this machine has 1 CUDA device(s)"),
])
def test_a_device_torch_cannot_use_is_named(monkeypatch, tmp_path, capsys, device, expected):
    """As on a machine with one GPU (the checks run before any model is moved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["audit", "--run", str(tmp_path), "--device", device]) == 2
    assert expected in error_line(capsys, "audit")


def test_runtime_device_with_a_bad_cuda_index_is_a_config_mistake(monkeypatch):
    from fed_dfkd.config import load_config
    from fed_dfkd.errors import UserError
    from fed_dfkd.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(QUICKSTART, ["runtime.device=cuda:3"])
    with pytest.raises(UserError, match="runtime.device is 'cuda:3' but this machine has 1 CUDA"):
        resolve_device(cfg.runtime)
    # A name torch cannot parse never gets this far: the config check refuses it.
    with pytest.raises(UserError, match="runtime.device"):
        load_config(QUICKSTART, ["runtime.device=cudafoo"])


# --- certs, superlink, supernode, deploy-local ------------------------------------------------


def test_certs_out_that_is_a_file_or_under_one(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["certs", "--out", str(a_file)]) == 2
    assert f"{a_file} exists and is not a folder" in error_line(capsys, "certs")
    assert main(["certs", "--out", str(a_file / "sub")]) == 2
    assert f"cannot create the certificate folder {a_file / 'sub'}" in error_line(capsys, "certs")


def test_certs_validity_past_the_year_9999(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "certs"), "--days", "99999999"]) == 2
    assert "99999999 days ends after the year 9999" in error_line(capsys, "certs")
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:abc", ":9092", "127.0.0.1:0"])
def test_supernode_superlink_address_with_a_bad_port(tmp_path, capsys, address):
    """Checked here: Flower's SuperNode used to start and then fail with exit 1 and a screenful."""
    argv = ["supernode", "--superlink", address, "--partition-id", "0", "--teachers",
            str(tmp_path), "--port", "9100", "--insecure"]
    assert main(argv) == 2
    assert f"--superlink must be HOST:PORT with a port in 1..65535, got {address!r}" in error_line(
        capsys, "supernode")


@pytest.mark.parametrize("options, expected", [
    (["--port", "70000"], "--port must be a port number in 1..65535, got 70000"),
    (["--port", "9100", "--max-wait-time", "-1"], "--max-wait-time must be > 0 seconds"),
    (["--port", "9100", "--grace", "-1"], "--grace must be a finite number of seconds >= 0"),
])
def test_supernode_bad_numbers(tmp_path, capsys, options, expected):
    argv = ["supernode", "--superlink", "127.0.0.1:9092", "--partition-id", "0", "--teachers",
            str(tmp_path), "--insecure", *options]
    assert main(argv) == 2
    assert expected in error_line(capsys, "supernode")


def test_supernode_with_a_garbage_teacher_fails_before_starting_flower(tmp_path, capsys):
    teacher = tmp_path / "client_0.pt"
    teacher.write_bytes(GARBAGE)
    argv = ["supernode", "--superlink", "127.0.0.1:9092", "--partition-id", "0",
            "--teacher-path", str(teacher), "--port", "9100", "--insecure"]
    assert main(argv) == 2
    assert f"teacher file {teacher} cannot be read" in error_line(capsys, "supernode")


@pytest.mark.parametrize("options, expected", [
    (["--port", "70000"], "--port must be a port number in 1..65535, got 70000"),
    (["--port", "0"], "--port must be a port number in 1..65535, got 0"),
    (["--grace", "-1"], "--grace must be a finite number of seconds >= 0, got -1.0"),
])
def test_superlink_bad_numbers(capsys, options, expected):
    assert main(["superlink", "--insecure", *options]) == 2
    assert expected in error_line(capsys, "superlink")


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_deploy_local_timeout_must_be_positive_and_finite(tmp_path, capsys, timeout):
    """It used to start a SuperLink and SuperNodes, then report "the run was not started"."""
    out = tmp_path / "out"
    argv = ["deploy-local", "--clients", "1", "--timeout", timeout, "--config", str(QUICKSTART),
            "--out", str(out), *set_args(FAST)]
    assert main(argv) == 2
    assert "--timeout must be a finite number of seconds > 0" in error_line(capsys, "deploy-local")
    assert not out.exists()


# --- privacy sweep ----------------------------------------------------------------------------


def sweep(tmp_path: Path, config: Path, epsilons: str) -> int:
    return main(["privacy", "sweep", "--config", str(config), "--level", "record", "--epsilons",
                 epsilons, "--out", str(tmp_path / "sweep"), *set_args(FAST)])


def test_sweep_config_that_is_a_folder_is_not_called_missing(tmp_path, capsys):
    assert sweep(tmp_path, tmp_path, "1") == 2
    line = error_line(capsys, "privacy")
    assert f"cannot read config file {tmp_path}: Is a directory" in line and "not found" not in line


def test_sweep_epsilon_that_overflows_is_not_taken_for_inf(tmp_path, capsys):
    """float("1e999") is inf, which would have run without DP."""
    assert sweep(tmp_path, QUICKSTART, "1,1e999") == 2
    assert "--epsilons: '1e999' is too large for a number; write inf for no DP" in error_line(
        capsys, "privacy")
    assert not (tmp_path / "sweep").exists()
