"""Teacher pretraining: training loop, manifests, caching, loading, and the `pretrain` command."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from torch import nn

from fed_dfkd.cli.main import main
from fed_dfkd.config import PretrainConfig, load_config
from fed_dfkd.data.datasets import load_dataset
from fed_dfkd.data.teachers import (
    TeacherManifest,
    evaluate_accuracy,
    load_teacher,
    load_teachers,
    predict_logits,
    pretrain_teachers,
    teacher_config_hash,
    teacher_path,
    train_classifier,
)
from fed_dfkd.errors import UserError
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier

CONFIG_YAML = """\
data:
  dataset: digits
  partition: dirichlet
  dirichlet_alpha: 0.5
  train_subset: 300
models:
  teacher: cnn_digits_bn
  pretrain:
    epochs: 2
    batch_size: 64
federation:
  num_clients: 2
  min_replies: 1
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "teachers.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture(scope="module")
def pretrained(config_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One small pretraining (two clients and a central teacher), shared by the tests below."""
    cfg = load_config(config_file)
    out = tmp_path_factory.mktemp("run")
    manifests = pretrain_teachers(cfg, out, central=True)
    return cfg, out, manifests


# --------------------------------------------------------------------------------------------
# train_classifier, predict_logits, evaluate_accuracy


def _toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(n) % 2
    # Class 1 is brighter everywhere: separable by a linear model with a wide margin.
    images = 0.5 * torch.rand(n, 1, 4, 4, generator=generator) + 0.5 * labels.view(n, 1, 1, 1)
    return images, labels


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_training_is_reproducible_from_its_seed() -> None:
    images, labels = _toy_data()
    config = PretrainConfig(epochs=3, batch_size=8, augment=True)
    runs = []
    for seed in (5, 5, 6):
        model = _toy_model()
        history = train_classifier(model, images, labels, config=config, seed=seed, device="cpu")
        runs.append((model[1].weight.detach().clone(), history))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0])
    assert [record["epoch"] for record in runs[0][1]] == [1, 2, 3]


def test_training_lowers_the_loss() -> None:
    images, labels = _toy_data(64)
    config = PretrainConfig(epochs=20, batch_size=16, lr=0.05, lr_schedule="constant")
    history = train_classifier(_toy_model(), images, labels, config=config, seed=0, device="cpu")
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert all(0.0 <= record["accuracy"] <= 1.0 for record in history)


@pytest.mark.parametrize(
    ("schedule", "optimizer", "expected_factors"),
    # One batch per epoch, so epoch e's last step is step e-1 of T = 2:
    # cosine lr_t = lr * (1 + cos(pi t / T)) / 2 -> lr, lr / 2.
    [("cosine", "adam", [1.0, 0.5]), ("constant", "sgd", [1.0, 1.0])],
)
def test_learning_rate_schedule(schedule: str, optimizer: str, expected_factors: list[float]) -> None:
    images, labels = _toy_data(8)
    config = PretrainConfig(epochs=2, batch_size=8, lr=0.1, lr_schedule=schedule, optimizer=optimizer)
    history = train_classifier(_toy_model(), images, labels, config=config, seed=0, device="cpu")
    assert [record["lr"] for record in history] == pytest.approx([0.1 * f for f in expected_factors])


def test_predict_logits_and_accuracy_by_hand() -> None:
    model = nn.Flatten()  # the two "pixels" are the two logits
    images = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 1, 1, 1])  # the third is wrong
    model.train()
    logits = predict_logits(model, images, batch_size=3)
    assert torch.equal(logits, images.view(4, 2))
    assert model.training  # mode restored
    assert evaluate_accuracy(model, images, labels, batch_size=2) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------
# Manifests and the config hash


def _manifest(**changes) -> TeacherManifest:
    fields = dict(
        architecture="cnn_digits_bn", num_classes=3, in_channels=1, image_size=8, mean=[0.3],
        std=[0.4], class_names=["a", "b", "c"], dataset="digits", partition_id=None,
        num_clients=2, train_size=6, class_histogram=[1, 2, 3], test_accuracy=0.5,
        config_hash="abc", created_at="2024-01-01T00:00:00+00:00", wall_seconds=1.5,
    )
    fields.update(changes)
    return TeacherManifest(**fields)


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest(partition_id=1, history=[{"epoch": 1, "loss": 0.5}])
    assert TeacherManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.name == "client_1" and _manifest().name == "central"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("config_hash"), "missing"),
        (lambda d: d.update(extra=1), "unknown"),
        (lambda d: d.update(num_classes="3"), "num_classes"),
        (lambda d: d.update(class_histogram=[1, 2]), "class_histogram"),
    ],
)
def test_manifest_rejects_malformed_dicts(change, message: str) -> None:
    raw = _manifest().to_dict()
    change(raw)
    with pytest.raises(ValueError, match=message):
        TeacherManifest.from_dict(raw)


def test_hash_follows_exactly_the_fields_that_shape_a_teacher(config_file: Path) -> None:
    base = load_config(config_file)
    reference = teacher_config_hash(base)
    relevant = [
        "models.pretrain.epochs=3", "models.pretrain.lr=0.01", "models.teacher=cnn_digits",
        "data.dirichlet_alpha=0.1", "data.train_subset=200", "federation.num_clients=3",
        "runtime.seed=1",
    ]
    for override in relevant:
        assert teacher_config_hash(load_config(config_file, [override])) != reference, override
    irrelevant = ["data.eval_batch_size=7", "federation.rounds=3", "method.name=dafl",
                  "distill.lr=0.5", "runtime.device=auto"]
    for override in irrelevant:
        assert teacher_config_hash(load_config(config_file, [override])) == reference, override


# --------------------------------------------------------------------------------------------
# pretrain_teachers


def test_pretrain_writes_loadable_teachers(pretrained) -> None:
    cfg, out, manifests = pretrained
    assert [m.name for m in manifests] == ["client_0", "client_1", "central"]
    splits = load_dataset("digits", seed=0, train_subset=300)
    for manifest in manifests:
        path = teacher_path(out, manifest.partition_id)
        assert path.is_file()
        assert TeacherManifest.from_dict(json.loads(path.with_suffix(".json").read_text())) == manifest
        model, loaded = load_teacher(path)
        assert loaded == manifest
        assert isinstance(model, NormalizedClassifier) and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert manifest.config_hash == teacher_config_hash(cfg)
        assert len(manifest.history) == cfg.models.pretrain.epochs
        # The loaded weights give the accuracy measured right after training.
        accuracy = evaluate_accuracy(model, splits.test_images, splits.test_labels, batch_size=128)
        assert accuracy == pytest.approx(manifest.test_accuracy)
    central = manifests[-1]
    assert central.train_size == 300
    assert central.class_histogram == torch.bincount(splits.train_labels, minlength=10).tolist()


def test_partitions_are_disjoint_and_histograms_add_up(pretrained) -> None:
    cfg, out, manifests = pretrained
    record = json.loads((out / "teachers" / "partitions.json").read_text())
    clients = record["clients"]
    assert [c["partition_id"] for c in clients] == [0, 1]
    assert sum(c["size"] for c in clients) == record["train_size"] == 300
    histograms = np.array([c["class_histogram"] for c in clients])
    assert histograms.sum() == 300
    assert [sum(c["class_histogram"]) for c in clients] == [c["size"] for c in clients]
    assert [m.class_histogram for m in manifests[:2]] == histograms.tolist()
    # Disjointness: the partitions' class counts add up to the whole train split's.
    splits = load_dataset("digits", seed=0, train_subset=300)
    assert histograms.sum(axis=0).tolist() == torch.bincount(splits.train_labels, minlength=10).tolist()
    assert all(m.train_size >= cfg.data.min_partition_size for m in manifests[:2])


def test_second_call_reuses_cached_teachers(pretrained, caplog: pytest.LogCaptureFixture) -> None:
    cfg, out, manifests = pretrained
    before = {p: p.stat().st_mtime_ns for p in (out / "teachers").glob("*.pt")}
    with caplog.at_level(logging.INFO, logger="fed_dfkd.data.teachers"):
        again = pretrain_teachers(cfg, out, central=True)
    assert again == manifests
    assert sum("reusing" in r.getMessage() for r in caplog.records) == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_changed_config_or_force_retrains(pretrained, tmp_path: Path, caplog) -> None:
    cfg, out, manifests = pretrained
    run = tmp_path / "run"
    (run / "teachers").mkdir(parents=True)
    for path in (out / "teachers").glob("client_*"):
        (run / "teachers" / path.name).write_bytes(path.read_bytes())
    splits = load_dataset("digits", seed=0, train_subset=300)
    changed = replace(cfg, models=replace(cfg.models, pretrain=replace(cfg.models.pretrain, epochs=1)))
    with caplog.at_level(logging.INFO, logger="fed_dfkd.data.teachers"):
        retrained = pretrain_teachers(changed, run, splits=splits)
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    assert [len(m.history) for m in retrained] == [1, 1]
    assert all(m.config_hash == teacher_config_hash(changed) != teacher_config_hash(cfg) for m in retrained)
    caplog.clear()
    before = {p: p.stat().st_mtime_ns for p in (run / "teachers").glob("*.pt")}
    with caplog.at_level(logging.INFO, logger="fed_dfkd.data.teachers"):
        pretrain_teachers(changed, run, splits=splits, force=True)
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in before.items())


# --------------------------------------------------------------------------------------------
# Loading


def test_load_teachers_by_source(pretrained) -> None:
    cfg, out, manifests = pretrained
    clients = load_teachers(out, source="clients", num_clients=2, expected_hash=teacher_config_hash(cfg))
    assert [m for _, m in clients] == manifests[:2]
    (central_model, central_manifest), = load_teachers(out, source="central", num_clients=2)
    assert central_manifest.partition_id is None
    x = torch.rand(3, 1, 8, 8)
    assert central_model(x).shape == (3, 10)


def test_load_teachers_tells_the_user_to_pretrain(pretrained, tmp_path: Path) -> None:
    cfg, out, _ = pretrained
    with pytest.raises(UserError, match="fed-dfkd pretrain"):
        load_teachers(tmp_path, source="clients", num_clients=2)
    with pytest.raises(UserError, match="fed-dfkd pretrain"):
        load_teachers(out, source="clients", num_clients=3)  # client_2 was never trained
    with pytest.raises(UserError, match="2 clients"):
        load_teachers(out, source="clients", num_clients=1)
    with pytest.raises(UserError, match="another config"):
        load_teachers(out, source="clients", num_clients=2, expected_hash="0" * 16)


def test_load_teacher_rejects_bad_files(pretrained, tmp_path: Path) -> None:
    _, out, _ = pretrained
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher_path(out, 0).read_bytes()[:200])
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(teacher_path(out, 0), weights_only=True)
    saved["manifest"]["architecture"] = "cnn_digits_half_bn"  # weights of the wrong width
    torch.save(saved, mismatched)
    for path in (garbage, foreign, truncated, mismatched, tmp_path / "missing.pt"):
        with pytest.raises(UserError, match=str(path.name)):
            load_teacher(path)


def test_loaded_teacher_matches_a_fresh_build(pretrained) -> None:
    _, out, manifests = pretrained
    model, manifest = load_teacher(teacher_path(out, 1))
    net = build_classifier(manifest.architecture, num_classes=10, in_channels=1, image_size=8)
    fresh = NormalizedClassifier(net, manifest.mean, manifest.std)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    # The normalisation is inside the model: it takes [0, 1] images.
    assert torch.allclose(model.normalize(torch.full((1, 1, 1, 1), manifest.mean[0])), torch.zeros(1))


# --------------------------------------------------------------------------------------------
# The command


def test_cli_pretrain_prints_a_table(pretrained, config_file: Path, capsys) -> None:
    _, out, manifests = pretrained
    code = main(["pretrain", "--config", str(config_file), "--out", str(out), "--central"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["teacher", "train", "size", "test", "accuracy"]
    for line, manifest in zip(lines[1:], manifests):
        name, size, accuracy = line.split()
        assert (name, int(size)) == (manifest.name, manifest.train_size)
        assert math.isclose(float(accuracy), manifest.test_accuracy, abs_tol=5e-5)
    assert (out / "teachers" / "config.resolved.yaml").is_file()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--set", "models.pretrain.epochz=3"], "models.pretrain.epochz"),
        (["--set", "models.pretrain.epochs=many"], "models.pretrain.epochs"),
        (["--no-clients"], "--no-clients"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(
    config_file: Path, tmp_path: Path, capsys, extra, needle
) -> None:
    code = main(["pretrain", "--config", str(config_file), "--out", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1
    assert needle in captured.err
    assert not (tmp_path / "out" / "teachers").exists()


# --------------------------------------------------------------------------------------------
# Quality


def test_digits_teacher_reaches_95_percent() -> None:
    """cnn_digits_bn on the whole digits train split, 15 epochs (about 4 s on one core)."""
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    model = NormalizedClassifier(net, splits.info.mean, splits.info.std)
    config = PretrainConfig(epochs=15, batch_size=64)
    train_classifier(model, splits.train_images, splits.train_labels, config=config, seed=0, device="cpu")
    assert evaluate_accuracy(model, splits.test_images, splits.test_labels, batch_size=512) >= 0.95


def test_training_logs_one_info_line_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    images, labels = _toy_data(8)
    config = PretrainConfig(epochs=3, batch_size=4, lr=0.01)
    with caplog.at_level(logging.INFO, logger="fed_dfkd.data.teachers"):
        train_classifier(_toy_model(), images, labels, config=config, seed=0, device="cpu",
                         progress_desc="teacher x")
    lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [f"teacher x epoch {e}/3" for e in (1, 2, 3)]
