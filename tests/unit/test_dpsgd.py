"""Record-level DP teachers: σ calibration over an owner's whole ledger, DP-SGD with Opacus, the
manifest's ε against the accountants, GroupNorm architecture round trips, the config hash."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from fed_dfkd.cli.main import main
from fed_dfkd.config import load_config
from fed_dfkd.data.datasets import load_experiment_data
from fed_dfkd.data.partition import partition
from fed_dfkd.data.teachers import (
    TeacherManifest,
    _save_teacher,
    _train_one_teacher,
    load_teacher,
    load_teachers,
    pretrain_teachers,
    teacher_config_hash,
    teacher_path,
)
from fed_dfkd.privacy import (
    accountant_epsilon,
    calibrate_noise_multiplier,
    dp_sgd_sample_rate,
    epsilon_after,
    is_dp_compatible,
    make_accountant,
    make_dp_compatible,
    noise_multiplier_for,
    train_dp_sgd,
)

DELTA = 1e-5

CONFIG_YAML = """\
data:
  dataset: digits
  partition: iid
  train_subset: 240
models:
  teacher: cnn_digits_bn
  pretrain: {epochs: 2, batch_size: 32, lr: 0.002}
federation:
  num_clients: 2
  min_replies: 1
privacy:
  level: record
  target_epsilon: 4.0
  summary_noise_multiplier: 5.0
  summary_clip: 10.0
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "dp.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture(scope="module")
def splits(config_file: Path):
    return load_experiment_data(load_config(config_file))


@pytest.fixture(scope="module")
def pretrained(config_file: Path, splits, tmp_path_factory: pytest.TempPathFactory):
    """Two DP client teachers at a target ε of 4, shared by the tests below."""
    cfg = load_config(config_file)
    out = tmp_path_factory.mktemp("run")
    return cfg, out, pretrain_teachers(cfg, out, splits=splits)


def _client_data(cfg, splits, k: int):
    labels = splits.train_labels.numpy()
    parts = partition(labels, cfg.federation.num_clients, scheme=cfg.data.partition,
                      alpha=cfg.data.dirichlet_alpha, seed=cfg.runtime.seed,
                      min_partition_size=cfg.data.min_partition_size)
    return torch.as_tensor(parts[k], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Calibration


def test_calibration_without_other_releases_is_opacus_calibration() -> None:
    """Same bisection as Opacus's get_noise_multiplier: the same σ to the last bit."""
    for q, steps in ((0.01, 1000), (1.0, 100)):
        ours = calibrate_noise_multiplier(target_epsilon=8.0, delta=DELTA, sample_rate=q, steps=steps,
                                          accountant="rdp")
        theirs = noise_multiplier_for(target_epsilon=8.0, delta=DELTA, sample_rate=q, steps=steps,
                                      accountant="rdp")
        assert ours == theirs


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_hits_the_total_epsilon_of_the_composed_ledger(accountant: str) -> None:
    summary = [(5.0, 1.0, 1)]
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=0.1, steps=60,
                                       accountant=accountant, extra_history=summary)
    total = accountant_epsilon(accountant, ((sigma, 0.1, 60), *summary), DELTA)
    assert 4.0 - 0.01 <= total <= 4.0
    # The summary costs something: DP-SGD alone gets less than the whole target.
    alone = epsilon_after(noise_multiplier=sigma, sample_rate=0.1, steps=60, delta=DELTA,
                          accountant=accountant)
    assert alone < total
    assert sigma > calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA, sample_rate=0.1,
                                              steps=60, accountant=accountant)


def test_calibration_refuses_a_target_the_other_releases_already_spend() -> None:
    cost = epsilon_after(noise_multiplier=0.5, sample_rate=1.0, steps=1, delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="other releases alone"):
        calibrate_noise_multiplier(target_epsilon=cost * 0.9, delta=DELTA, sample_rate=0.1, steps=10,
                                   accountant="rdp", extra_history=[(0.5, 1.0, 1)])
    assert dp_sgd_sample_rate(240, 32) == 1 / 8 and dp_sgd_sample_rate(256, 32) == 1 / 8


# --------------------------------------------------------------------------------------------
# DP-SGD itself


def _tiny_data(n: int = 64):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = 0.3 * torch.rand(n, 1, 4, 4, generator=generator) + 0.5 * labels.view(n, 1, 1, 1)
    return images, labels


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(64, 2))


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.1)


def test_opacus_records_the_history_we_account_and_the_same_epsilon() -> None:
    images, labels = _tiny_data()
    model = make_dp_compatible(_tiny_model())
    trained, result = train_dp_sgd(model, images, labels, epochs=3, batch_size=16, make_optimizer=_sgd,
                                   noise_multiplier=1.1, max_grad_norm=1.0, delta=DELTA,
                                   accountant="rdp", seed=0, device="cpu")
    assert (result.sample_rate, result.steps, result.empty_batches) == (0.25, 12, 0)
    assert result.opacus_history == [(1.1, 0.25, 12)]
    ours = epsilon_after(noise_multiplier=1.1, sample_rate=0.25, steps=12, delta=DELTA, accountant="rdp")
    assert result.opacus_epsilon == pytest.approx(ours, rel=1e-12)
    # Opacus's hooks and per-sample gradients are gone; the model is an ordinary module again.
    assert trained is model and not any(m._forward_hooks or m._backward_hooks for m in trained.modules())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in trained.parameters())
    assert [r["epoch"] for r in result.epochs] == [1, 2, 3]


def test_dp_sgd_is_reproducible_and_noise_matters() -> None:
    images, labels = _tiny_data()

    def weights(sigma: float, seed: int) -> torch.Tensor:
        model, _ = train_dp_sgd(make_dp_compatible(_tiny_model()), images, labels, epochs=1,
                                batch_size=16, make_optimizer=_sgd, noise_multiplier=sigma,
                                max_grad_norm=1.0, delta=DELTA, accountant="rdp", seed=seed,
                                device="cpu")
        return model[4].weight.detach().clone()

    assert torch.equal(weights(1.0, 0), weights(1.0, 0))
    assert not torch.equal(weights(1.0, 0), weights(1.0, 1))
    assert not torch.equal(weights(1.0, 0), weights(0.0, 0))


def test_batch_norm_is_refused_and_fixed() -> None:
    images, labels = _tiny_data()
    model = _tiny_model()
    assert not is_dp_compatible(model)
    with pytest.raises(ValueError, match="make_dp_compatible"):
        train_dp_sgd(model, images, labels, epochs=1, batch_size=16, make_optimizer=_sgd,
                     noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, accountant="rdp", seed=0,
                     device="cpu")
    fixed = make_dp_compatible(model)
    assert isinstance(fixed[1], nn.GroupNorm) and (fixed[1].num_groups, fixed[1].num_channels) == (4, 4)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is left alone
    assert fixed[2].inplace is False and is_dp_compatible(fixed)


# --------------------------------------------------------------------------------------------
# DP teachers through pretrain_teachers


def _ledger(manifest: TeacherManifest):
    ledger = make_accountant(manifest.privacy["accountant"])
    ledger.load_state_dict(manifest.privacy["history"])
    return ledger


def test_dp_teachers_reach_the_target_over_their_whole_ledger(pretrained, splits) -> None:
    cfg, _, manifests = pretrained
    assert [m.name for m in manifests] == ["client_0", "client_1"]
    for manifest in manifests:
        p = manifest.privacy
        assert p is not None and p["level"] == "record" and p["secure_rng"] is False
        assert 4.0 - 0.01 <= p["epsilon"] <= 4.0
        size = len(_client_data(cfg, splits, manifest.partition_id))
        assert p["sample_rate"] == 1 / math.ceil(size / 32)
        assert p["steps"] == 2 * math.ceil(size / 32)
        ledger = _ledger(manifest)
        assert ledger.history == [(p["noise_multiplier"], p["sample_rate"], p["steps"]), (5.0, 1.0, 1)]
        assert p["epsilon"] == ledger.epsilon(delta=DELTA)
        assert p["dpsgd_epsilon"] == epsilon_after(
            noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=p["steps"],
            delta=DELTA, accountant="rdp")
        assert p["dpsgd_epsilon"] < p["epsilon"]
        assert (p["summary_noise_multiplier"], p["summary_clip"]) == (5.0, 10.0)


def test_dp_manifest_carries_only_released_values(pretrained, splits) -> None:
    cfg, out, manifests = pretrained
    for manifest in manifests:
        saved = torch.load(teacher_path(out, manifest.partition_id), weights_only=True)
        statistics = saved["feature_statistics"]
        assert manifest.class_histogram == statistics["class_histogram"]
        assert manifest.train_size == max(round(statistics["count"]), 0)
        # Training loss and accuracy come from the private records without noise: not kept.
        assert all(set(record) == {"epoch", "lr"} for record in manifest.history)
        on_disk = TeacherManifest.from_dict(json.loads(teacher_path(out, manifest.partition_id)
                                                       .with_suffix(".json").read_text()))
        assert on_disk == manifest


def test_given_sigma_gives_the_accountants_epsilon(config_file: Path, splits, tmp_path: Path) -> None:
    cfg = load_config(config_file, ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.3",
                                    "privacy.accountant=prv", "models.pretrain.epochs=1"])
    index = _client_data(cfg, splits, 0)
    model, manifest, _, _ = _train_one_teacher(cfg, splits, index.numpy(), partition_id=0,
                                            expected_hash="x", device=torch.device("cpu"))
    p = manifest.privacy
    q, steps = 1 / math.ceil(len(index) / 32), math.ceil(len(index) / 32)
    assert (p["noise_multiplier"], p["sample_rate"], p["steps"]) == (1.3, q, steps)
    assert p["epsilon"] == accountant_epsilon("prv", ((1.3, q, steps), (5.0, 1.0, 1)), DELTA)
    assert p["target_epsilon"] is None


def test_dp_teacher_has_no_batch_norm_and_loads_back_identically(config_file: Path, splits,
                                                                  tmp_path: Path) -> None:
    cfg = load_config(config_file, ["models.pretrain.epochs=1"])
    index = _client_data(cfg, splits, 1)
    model, manifest, statistics, _ = _train_one_teacher(cfg, splits, index.numpy(), partition_id=1,
                                                     expected_hash="h", device=torch.device("cpu"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert is_dp_compatible(model)
    path = tmp_path / "teachers" / "client_1.pt"
    _save_teacher(model, manifest, path, statistics)
    loaded, loaded_manifest = load_teacher(path)
    assert loaded_manifest == manifest
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(splits.test_images), model(splits.test_images))
    # The owner's released statistics are the prior's targets, on the GroupNorm layers.
    assert sorted(loaded.feature_targets) == ["net.features.1", "net.features.4", "net.features.8"]
    for name, (mean, var) in loaded.feature_targets.items():
        module = dict(loaded.named_modules())[name]
        assert isinstance(module, nn.GroupNorm) and mean.shape == var.shape == (module.num_channels,)
        assert torch.equal(mean, statistics["layers"][name]["mean"])


def test_without_summary_nothing_is_released(config_file: Path, splits) -> None:
    cfg = load_config(config_file, ["privacy.summary=false", "models.pretrain.epochs=1"])
    index = _client_data(cfg, splits, 0)
    _, manifest, statistics, _ = _train_one_teacher(cfg, splits, index.numpy(), partition_id=0,
                                                 expected_hash="h", device=torch.device("cpu"))
    assert statistics is None
    assert (manifest.train_size, manifest.class_histogram) == (0, [])
    assert manifest.privacy["summary_noise_multiplier"] is None
    assert len(_ledger(manifest).history) == 1
    assert 4.0 - 0.01 <= manifest.privacy["epsilon"] <= 4.0
    assert TeacherManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


# --------------------------------------------------------------------------------------------
# Caching and the config hash


def test_config_hash_separates_dp_and_non_dp_teachers(config_file: Path) -> None:
    dp = load_config(config_file)
    plain = load_config(config_file, ["privacy.level=none", "privacy.target_epsilon=null"])
    client = load_config(config_file, ["privacy.level=client", "federation.update_aggregation=mean"])
    assert teacher_config_hash(dp) != teacher_config_hash(plain)
    # Client-level DP does not change how teachers are trained.
    assert teacher_config_hash(client) == teacher_config_hash(plain)
    for override in ("privacy.target_epsilon=3", "privacy.max_grad_norm=2", "privacy.summary=false",
                     "privacy.summary_noise_multiplier=10", "privacy.summary_clip=3",
                     "privacy.accountant=prv", "privacy.delta=1e-6"):
        assert teacher_config_hash(load_config(config_file, [override])) != teacher_config_hash(dp), override


def test_cache_never_mixes_dp_and_non_dp_teachers(pretrained, splits, tmp_path: Path, caplog) -> None:
    cfg, out, manifests = pretrained
    assert pretrain_teachers(cfg, out, splits=splits) == manifests  # reused: same hash
    plain = replace(cfg, privacy=replace(cfg.privacy, level="none", target_epsilon=None))
    run = tmp_path / "run"
    (run / "teachers").mkdir(parents=True)
    for path in (out / "teachers").glob("client_*"):
        (run / "teachers" / path.name).write_bytes(path.read_bytes())
    plain_cfg = replace(plain, models=replace(plain.models, pretrain=replace(plain.models.pretrain, epochs=1)))
    retrained = pretrain_teachers(plain_cfg, run, splits=splits)
    assert all(m.privacy is None for m in retrained)
    model, _ = load_teacher(teacher_path(run, 0))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and model.feature_targets == {}
    with pytest.raises(Exception, match="another config"):
        load_teachers(run, source="clients", num_clients=2, expected_hash=teacher_config_hash(cfg))


def test_cli_pretrain_shows_epsilon(pretrained, config_file: Path, capsys) -> None:
    _, out, manifests = pretrained
    code = main(["pretrain", "--config", str(config_file), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[-3:] == ["epsilon", "(delta", "1e-05)"]
    for line, manifest in zip(lines[1:], manifests):
        cells = line.split()
        assert cells[0] == manifest.name and int(cells[1]) == manifest.train_size
        assert float(cells[-1]) == pytest.approx(manifest.privacy["epsilon"], abs=5e-4)


def test_loaded_dp_ensemble_names_every_members_targets(pretrained) -> None:
    from fed_dfkd.models.normalized import TeacherEnsemble

    _, out, _ = pretrained
    teachers = [model for model, _ in load_teachers(out, source="clients", num_clients=2)]
    ensemble = TeacherEnsemble(teachers)
    names = dict(ensemble.named_modules())
    assert len(ensemble.feature_targets) == 6
    assert all(isinstance(names[name], nn.GroupNorm) for name in ensemble.feature_targets)



def test_manifest_privacy_field_is_checked(pretrained) -> None:
    _, _, manifests = pretrained
    raw = manifests[0].to_dict()
    old = {key: value for key, value in raw.items() if key != "privacy"}
    old["class_histogram"] = [1] * 10
    assert TeacherManifest.from_dict(old).privacy is None  # manifests from before the field
    for bad, needle in (("yes", "mapping"), ({"epsilon": 1.0}, "missing"),
                        ({**raw["privacy"], "epsilon": "4"}, "privacy.epsilon")):
        with pytest.raises(ValueError, match=needle):
            TeacherManifest.from_dict({**raw, "privacy": bad})
    with pytest.raises(ValueError, match="class_histogram"):
        TeacherManifest.from_dict({**old, "class_histogram": []})  # only a DP teacher may have none


def test_an_nhwc_model_gets_the_per_sample_gradients_of_a_contiguous_one() -> None:
    """Opacus's convolution grad sampler gives wrong per-sample gradients for channels_last
    weights (0.06 off on cnn_digits_bn's second conv), which would clip the wrong norms;
    train_dp_sgd lays the model out contiguously first, so both layouts train the same."""
    from fed_dfkd.models import build_classifier, to_memory_format

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(48, 1, 8, 8, generator=generator), torch.arange(48) % 10

    def trained(layout: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = to_memory_format(build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8),
                               layout)
        model, _ = train_dp_sgd(make_dp_compatible(net), images, labels, epochs=1, batch_size=16,
                                make_optimizer=_sgd, noise_multiplier=0.0, max_grad_norm=0.5, delta=DELTA,
                                accountant="rdp", seed=0, device="cpu")
        return [p.detach().clone() for p in model.parameters()]

    for ours, reference in zip(trained("channels_last"), trained("contiguous")):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
