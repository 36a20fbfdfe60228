"""The strict experiment config: loading, type checks, cross-field rules, overrides, hashing, and
the ``validate-config`` command."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fed_dfkd.cli.main import main
from fed_dfkd.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from fed_dfkd.errors import UserError
from fed_dfkd.synthesis import SYNTHESIZERS, method_defaults

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def config_error(raw: dict | None = None, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(raw or {}, overrides)
    return raised.value


# --------------------------------------------------------------------------------------------
# Every shipped config
# --------------------------------------------------------------------------------------------


def test_the_configs_folder_holds_the_quickstart():
    assert QUICKSTART in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    # Every method weight is resolved: the written config shows the values used.
    assert all(getattr(cfg.method, f.name) is not None for f in dataclasses.fields(cfg.method)
               if f.default is None)
    copy_path = tmp_path / "resolved.yaml"
    copy_path.write_text(dump_config(cfg))
    assert load_config(copy_path) == cfg


def test_the_quickstart_says_what_it_says():
    cfg = load_config(QUICKSTART)
    assert cfg.data.dataset == "digits"
    assert cfg.method.name == "adadfkd"
    assert cfg.models.generator.latent_dim == 32
    assert cfg.models.pretrain.lr == 0.002
    assert cfg.distill.teacher_source == "central"
    assert cfg.federation.num_clients == 5


def test_an_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == config_from_dict({})


# --------------------------------------------------------------------------------------------
# Unknown keys and wrong types name the dotted field
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, field_path",
    [
        ({"bogus": 1}, "bogus"),
        ({"data": {"bogus": 1}}, "data.bogus"),
        ({"models": {"generator": {"bogus": 1}}}, "models.generator.bogus"),
        ({"models": {"pretrain": {"epochs": 2, "bogus": 1}}}, "models.pretrain.bogus"),
        ({"runtime": {"sed": 1}}, "runtime.sed"),
    ],
)
def test_an_unknown_key_at_any_depth_is_named(raw, field_path):
    error = config_error(raw)
    assert error.field_path == field_path
    assert field_path in str(error)
    assert "unknown key" in str(error)


def test_an_unknown_key_lists_the_valid_ones():
    message = str(config_error({"federation": {"round": 3}}))
    for key in ("num_clients", "rounds", "sample_rate", "min_replies", "mode"):
        assert key in message


@pytest.mark.parametrize(
    "raw, field_path, says",
    [
        ({"federation": {"rounds": "ten"}}, "federation.rounds", "integer"),
        ({"federation": {"rounds": 3.5}}, "federation.rounds", "integer"),
        ({"federation": {"rounds": 3.0}}, "federation.rounds", "integer"),
        ({"federation": {"rounds": True}}, "federation.rounds", "integer"),
        ({"distill": {"lr": True}}, "distill.lr", "number"),
        ({"distill": {"lr": "fast"}}, "distill.lr", "number"),
        ({"models": {"teacher": ["cnn_digits_bn"]}}, "models.teacher", "string"),
        ({"data": {"dataset": True}}, "data.dataset", "string"),  # YAML 1.1 `yes`
        ({"curriculum": {"enabled": 1}}, "curriculum.enabled", "true or false"),
        ({"data": {"train_subset": "all"}}, "data.train_subset", "int"),
        ({"method": {"generator_betas": [0.9]}}, "method.generator_betas", "list"),
        ({"method": {"generator_betas": ["a", 0.9]}}, "method.generator_betas[0]", "number"),
        ({"data": 5}, "data", "mapping"),
        ({"models": {"generator": [16]}}, "models.generator", "mapping"),
    ],
)
def test_a_wrong_type_is_named(raw, field_path, says):
    error = config_error(raw)
    assert error.field_path == field_path
    assert says in str(error)


@pytest.mark.parametrize(
    "raw, field_path, valid",
    [
        ({"data": {"partition": "random"}}, "data.partition", ["iid", "dirichlet"]),
        ({"distill": {"ensemble": "max"}}, "distill.ensemble", ["mean", "weighted", "median", "trimmed_mean"]),
        ({"runtime": {"progress": True}}, "runtime.progress", ["auto", "bar", "lines", "none"]),
        ({"method": {"adversarial_divergence": "kld"}}, "method.adversarial_divergence", ["kl", "l1", "js", "adi"]),
    ],
)
def test_a_literal_violation_lists_the_valid_values(raw, field_path, valid):
    error = config_error(raw)
    assert error.field_path == field_path
    for value in valid:
        assert repr(value) in str(error)


def test_an_optional_value_takes_null():
    cfg = config_from_dict({"data": {"train_subset": None, "root": None}})
    assert cfg.data.train_subset is None and cfg.data.root is None
    error = config_error({"distill": {"lr": None}})
    assert error.field_path == "distill.lr"


def test_an_int_is_accepted_for_a_float_and_stored_as_a_float():
    cfg = config_from_dict({"distill": {"lr": 1}, "method": {"generator_betas": [0, 0]}})
    assert cfg.distill.lr == 1.0 and type(cfg.distill.lr) is float
    assert cfg.method.generator_betas == (0.0, 0.0)


def test_configs_are_frozen():
    cfg = config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.distill.lr = 0.5  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Cross-field rules and registered names
# --------------------------------------------------------------------------------------------


def test_min_replies_cannot_exceed_the_sampled_clients():
    base = {"num_clients": 4, "sample_rate": 0.5}
    assert config_from_dict({"federation": {**base, "min_replies": 2}}).federation.min_replies == 2
    error = config_error({"federation": {**base, "min_replies": 3}})
    assert error.field_path == "federation.min_replies"
    assert "= 2" in str(error)


@pytest.mark.parametrize("prefix", ["adversarial", "negative"])
@pytest.mark.parametrize("begin, end", [(0.5, 0.5), (0.75, 0.25)])
def test_a_ramp_must_begin_before_it_ends(prefix, begin, end):
    error = config_error({"curriculum": {f"{prefix}_begin": begin, f"{prefix}_end": end}})
    assert error.field_path == f"curriculum.{prefix}_end"


@pytest.mark.parametrize("key, value", [("pace_start", 0.0), ("pace_start", -0.1), ("pace_end", 1.5)])
def test_a_quantile_pace_must_be_in_the_unit_interval(key, value):
    error = config_error({"curriculum": {"pace": "quantile", key: value}})
    assert error.field_path == f"curriculum.{key}"
    assert "(0, 1]" in str(error)


def test_an_absolute_pace_may_exceed_one():
    cfg = config_from_dict({"curriculum": {"pace": "absolute", "pace_start": 1.5, "pace_end": 4.0}})
    assert cfg.curriculum.pace_end == 4.0


@pytest.mark.parametrize("level", ["record", "client"])
def test_a_privacy_level_needs_exactly_one_of_target_epsilon_and_noise(level):
    assert config_error({"privacy": {"level": level}}).field_path == "privacy.target_epsilon"
    both = {"level": level, "target_epsilon": 1.0, "noise_multiplier": 1.0}
    assert config_error({"privacy": both}).field_path == "privacy.target_epsilon"
    extra = {"distill": {"ensemble": "mean"}, "federation": {"update_aggregation": "mean"}}
    assert config_from_dict({"privacy": {"level": level, "target_epsilon": 2.0}, **extra}).privacy.target_epsilon == 2.0


@pytest.mark.parametrize("ensemble", ["weighted", "class_weighted", "consensus"])
def test_client_level_privacy_refuses_aggregations_that_read_private_histograms(ensemble):
    cfg = {"privacy": {"level": "client", "noise_multiplier": 1.0},
           "federation": {"update_aggregation": "mean"}, "distill": {"ensemble": ensemble}}
    assert config_error(cfg).field_path == "distill.ensemble"
    cfg["distill"]["ensemble"] = "mean"
    cfg["federation"]["update_aggregation"] = "weighted_mean"
    assert config_error(cfg).field_path == "federation.update_aggregation"


@pytest.mark.parametrize("ensemble", ["weighted", "class_weighted", "consensus"])
def test_record_level_without_the_summary_refuses_aggregations_that_need_histograms(ensemble):
    cfg = {"privacy": {"level": "record", "target_epsilon": 1.0, "summary": False},
           "distill": {"ensemble": ensemble}}
    assert config_error(cfg).field_path == "distill.ensemble"
    cfg["privacy"]["summary"] = True
    assert config_from_dict(cfg).distill.ensemble == ensemble


@pytest.mark.parametrize("key,value", [("target_epsilon", 0.0), ("target_epsilon", -1.0),
                                       ("noise_multiplier", -0.5), ("generator_clip", 0.0),
                                       ("logit_clip", -1.0), ("epsilon_max", 0.0),
                                       ("max_grad_norm", 0.0)])
def test_privacy_numbers_out_of_range_are_named(key, value):
    assert config_error({"privacy": {key: value}}).field_path == f"privacy.{key}"


@pytest.mark.parametrize("device", ["tpu", "gpu", "CUDA", ""])
def test_a_bad_device_is_rejected(device):
    assert config_error({"runtime": {"device": device}}).field_path == "runtime.device"


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:1"])
def test_good_devices_load(device):
    assert config_from_dict({"runtime": {"device": device}}).runtime.device == device


@pytest.mark.parametrize(
    "raw, field_path, listed",
    [
        ({"method": {"name": "cudfdk"}}, "method.name", SYNTHESIZERS.names()),
        ({"data": {"dataset": "imagenet"}}, "data.dataset", ["digits"]),
        ({"models": {"student": "resnet1000"}}, "models.student", ["cnn_digits_half"]),
        ({"models": {"generator": {"arch": "stylegan"}}}, "models.generator.arch", ["dcgan"]),
    ],
)
def test_an_unknown_registered_name_lists_the_valid_ones(raw, field_path, listed):
    error = config_error(raw)
    assert error.field_path == field_path
    for name in listed:
        assert name in str(error)


@pytest.mark.parametrize(
    "raw, field_path",
    [
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"federation": {"sample_rate": 1.5}}, "federation.sample_rate"),
        ({"distill": {"batch_size": 1}}, "distill.batch_size"),
        ({"distill": {"temperature": 0}}, "distill.temperature"),
        ({"distill": {"target_temperature": 0}}, "distill.target_temperature"),
        ({"distill": {"student_ema": 1.0}}, "distill.student_ema"),
        ({"distill": {"student_ema": -0.1}}, "distill.student_ema"),
        ({"distill": {"student_ema": float("nan")}}, "distill.student_ema"),
        ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
        ({"method": {"generator_betas": [0.9, 1.0]}}, "method.generator_betas"),
        ({"method": {"r2m_weight": float("nan")}}, "method.r2m_weight"),
        ({"models": {"generator": {"width": 0}}}, "models.generator.width"),
        ({"curriculum": {"negative_window": 0}}, "curriculum.negative_window"),
        ({"runtime": {"seed": -1}}, "runtime.seed"),
        ({"runtime": {"threads": 0}}, "runtime.threads"),
    ],
)
def test_out_of_range_values_are_named(raw, field_path):
    assert config_error(raw).field_path == field_path


@pytest.mark.parametrize(
    "override",
    [
        "distill.temperature=.inf",
        "distill.lr=.inf",
        "method.generator_lr=.inf",
        "curriculum.sharpness=.inf",
        "distill.momentum=.nan",
        "distill.momentum=-0.5",
        "distill.weight_decay=-1",
        "models.pretrain.weight_decay=-1",
    ],
)
def test_non_finite_or_negative_optimizer_knobs_are_rejected(override):
    error = config_error(overrides=(override,))
    assert error.field_path == override.split("=")[0]


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("federation.rounds=3", "federation.rounds", 3),
        ("distill.lr=0.5", "distill.lr", 0.5),
        ("distill.lr=1.0e-3", "distill.lr", 1e-3),
        ("curriculum.enabled=false", "curriculum.enabled", False),
        ("curriculum.enabled=true", "curriculum.enabled", True),
        ("data.train_subset=null", "data.train_subset", None),
        ("data.train_subset=", "data.train_subset", None),
        ("method.generator_betas=[0.5, 0.9]", "method.generator_betas", [0.5, 0.9]),
        ("method.name=cudfkd", "method.name", "cudfkd"),
        ("data.root=/a=b", "data.root", "/a=b"),
        (" federation.rounds = 7 ", "federation.rounds", 7),
    ],
)
def test_parse_override_reads_yaml_scalars(text, key, value):
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize(
    "override, section, field, value",
    [
        ("federation.rounds=3", "federation", "rounds", 3),
        ("distill.lr=1e-3", "distill", "lr", 0.001),  # YAML 1.1 reads 1e-3 as a string
        ("distill.lr=2", "distill", "lr", 2.0),
        ("curriculum.enabled=false", "curriculum", "enabled", False),
        ("data.train_subset=null", "data", "train_subset", None),
        ("method.generator_betas=[0.5, 0.9]", "method", "generator_betas", (0.5, 0.9)),
        ("runtime.progress=none", "runtime", "progress", "none"),  # a string, not null
    ],
)
def test_overrides_are_typed_like_the_yaml(override, section, field, value):
    cfg = load_config(QUICKSTART, [override])
    got = getattr(getattr(cfg, section), field)
    assert got == value and type(got) is type(value)


def test_an_override_reaches_a_nested_key_and_keeps_its_siblings():
    base = load_config(QUICKSTART)
    cfg = load_config(QUICKSTART, ["models.generator.width=8"])
    assert cfg.models.generator.width == 8
    assert cfg.models.generator.latent_dim == base.models.generator.latent_dim == 32
    assert dataclasses.replace(cfg, models=base.models) == base


def test_overrides_apply_in_order_and_beat_the_file():
    cfg = load_config(QUICKSTART, ["federation.rounds=3", "federation.rounds=4"])
    assert cfg.federation.rounds == 4


def test_an_override_can_fill_a_section_the_file_leaves_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\nmodels:\n")
    cfg = load_config(path, ["data.dirichlet_alpha=0.1", "models.generator.depth=3"])
    assert cfg.data.dirichlet_alpha == 0.1 and cfg.models.generator.depth == 3


@pytest.mark.parametrize(
    "override, field_path",
    [
        ("models.generator.bogus=1", "models.generator.bogus"),
        ("nosuch.key=1", "nosuch"),
        ("distill.nosuch=1", "distill.nosuch"),
    ],
)
def test_an_override_cannot_create_an_unknown_key(override, field_path):
    with pytest.raises(ConfigError) as raised:
        load_config(QUICKSTART, [override])
    assert raised.value.field_path == field_path


@pytest.mark.parametrize("override", ["federation.rounds", "federation.rounds:3", "a..b=1", ".a=1",
                                      "federation.rounds.x=1", "distill.lr=[1,"])
def test_a_malformed_override_is_a_config_error(override):
    with pytest.raises(ConfigError):
        load_config(QUICKSTART, [override])


# --------------------------------------------------------------------------------------------
# Method defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHESIZERS.names())
def test_method_defaults_fill_nulls(name):
    cfg = config_from_dict({"method": {"name": name, "class_balance_weight": None}})
    for key, value in method_defaults(name).items():
        assert getattr(cfg.method, key) == value


def test_explicit_method_weights_win_over_the_defaults_even_zero():
    assert method_defaults("cudfkd")["class_balance_weight"] == 20.0
    assert method_defaults("adadfkd")["r2m_weight"] > 0
    cfg = config_from_dict({"method": {"name": "adadfkd", "class_balance_weight": 5,
                                       "r2m_weight": 0, "adversarial_divergence": "js"}})
    assert cfg.method.class_balance_weight == 5.0
    assert cfg.method.r2m_weight == 0.0
    assert cfg.method.adversarial_divergence == "js"
    assert cfg.method.bn_statistics_weight == method_defaults("adadfkd")["bn_statistics_weight"]


def test_switching_method_by_override_takes_the_new_methods_defaults():
    # Weights the file sets stay; the ones it leaves null come from the new method.
    cfg = load_config(QUICKSTART, ["method.name=dfad"])
    assert cfg.method.adversarial_divergence == "l1"
    assert cfg.method.one_hot_weight == 0.0 and cfg.method.class_balance_weight == 0.0


# --------------------------------------------------------------------------------------------
# Hash and dump
# --------------------------------------------------------------------------------------------


def test_config_hash_is_stable():
    first, second = load_config(QUICKSTART), load_config(QUICKSTART)
    assert first is not second
    assert config_hash(first) == config_hash(second)
    assert len(config_hash(first)) == 16 and int(config_hash(first), 16) >= 0
    # A config that spells the method weights out equals the one that left them null.
    explicit = config_from_dict(config_to_dict(first))
    assert config_hash(explicit) == config_hash(first)


def test_config_hash_is_the_same_in_another_process():
    code = ("from fed_dfkd.config import load_config, config_hash; "
            f"print(config_hash(load_config({str(QUICKSTART)!r})))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == config_hash(load_config(QUICKSTART))


@pytest.mark.parametrize("override", ["federation.rounds=61", "runtime.seed=1", "method.r2m_weight=0.2",
                                      "models.generator.width=8", "distill.ensemble=median",
                                      "curriculum.enabled=false"])
def test_config_hash_changes_with_any_value(override):
    assert config_hash(load_config(QUICKSTART, [override])) != config_hash(load_config(QUICKSTART))


def test_config_hash_of_a_section():
    cfg = load_config(QUICKSTART)
    assert config_hash(cfg.data) != config_hash(cfg)
    assert config_hash(cfg.data) == config_hash(load_config(QUICKSTART, ["federation.rounds=3"]).data)


@pytest.mark.parametrize("overrides", [(), ("method.name=dafl", "method.generator_betas=[0.5, 0.9]",
                                            "data.train_subset=100", "runtime.threads=1")])
def test_dump_then_load_gives_the_same_config(tmp_path, overrides):
    cfg = load_config(QUICKSTART, list(overrides))
    text = dump_config(cfg)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert list(yaml.safe_load(text)) == ["data", "models", "method", "distill", "curriculum",
                                          "federation", "privacy", "runtime"]


# --------------------------------------------------------------------------------------------
# load_config errors and the validate-config command
# --------------------------------------------------------------------------------------------


def test_load_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError):
        load_config(listed)


def _stderr_lines(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return captured.out, captured.err.strip().splitlines()


def test_validate_config_with_an_unknown_override_prints_one_line_and_exits_2(capsys):
    assert main(["validate-config", str(QUICKSTART), "--set", "bad.key=1"]) == 2
    out, err = _stderr_lines(capsys)
    assert out == ""
    assert len(err) == 1, err
    assert "bad" in err[0] and "Traceback" not in err[0]


def test_validate_config_with_a_wrong_type_names_the_field(capsys):
    assert main(["validate-config", str(QUICKSTART), "--set", "federation.rounds=many"]) == 2
    _, err = _stderr_lines(capsys)
    assert len(err) == 1 and "federation.rounds" in err[0]


def test_validate_config_on_a_missing_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["validate-config", str(missing)]) == 2
    _, err = _stderr_lines(capsys)
    assert len(err) == 1 and str(missing) in err[0]


def test_validate_config_on_invalid_yaml_exits_2_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\nmodels: {\n")
    assert main(["validate-config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("case", ["file", "override"])
def test_yaml_syntax_errors_are_reported_on_one_line(tmp_path, capsys, case):
    if case == "file":
        bad = tmp_path / "bad.yaml"
        bad.write_text("data: [1, 2\nmodels: {\n")
        argv = ["validate-config", str(bad)]
    else:
        argv = ["validate-config", str(QUICKSTART), "--set", "distill.lr=[1,"]
    assert main(argv) == 2
    _, err = _stderr_lines(capsys)
    assert len(err) == 1, err


def test_validate_config_without_a_file_argument_exits_2(capsys):
    assert main(["validate-config"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_validate_config_prints_the_resolved_config(capsys):
    assert main(["validate-config", str(QUICKSTART), "--set", "federation.rounds=7"]) == 0
    out, err = _stderr_lines(capsys)
    assert err == []
    printed = config_from_dict(yaml.safe_load(out))
    assert printed == load_config(QUICKSTART, ["federation.rounds=7"])
    assert printed.federation.rounds == 7
    assert printed.method.r2m_weight == method_defaults("adadfkd")["r2m_weight"]


# --------------------------------------------------------------------------------------------
# Rules found in review (session 3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    # Client-level noise calibrated from a target ε still scales with the clips.
    (("privacy.level=client", "privacy.target_epsilon=4", "distill.ensemble=mean",
      "federation.update_aggregation=mean", "privacy.generator_clip=.inf"), "privacy.generator_clip"),
    (("privacy.level=client", "privacy.target_epsilon=4", "distill.ensemble=mean",
      "federation.update_aggregation=mean", "privacy.logit_clip=.inf"), "privacy.logit_clip"),
    # G upsamples by 2**depth, which must divide the dataset's image size (digits: 8).
    (("data.dataset=digits", "models.generator.depth=4"), "models.generator.depth"),
    (("federation.max_update_norm=0",), "federation.max_update_norm"),
    (("federation.max_update_norm=-1",), "federation.max_update_norm"),
    (("federation.round_timeout=-5",), "federation.round_timeout"),
])
def test_rules_found_in_review_name_their_field(overrides, field):
    assert config_error(overrides=overrides).field_path == field


def test_infinite_clips_stay_allowed_without_noise():
    cfg = config_from_dict({}, ("privacy.level=client", "privacy.noise_multiplier=0",
                                "distill.ensemble=mean", "federation.update_aggregation=mean",
                                "privacy.generator_clip=.inf", "privacy.logit_clip=.inf"))
    assert cfg.privacy.generator_clip == float("inf")


def test_a_float_or_null_key_reports_why_a_value_is_refused():
    error = config_error(overrides=("method.adversarial_weight=.inf",))
    assert error.field_path == "method.adversarial_weight" and "finite" in str(error)


def test_a_depth_that_divides_the_image_size_loads():
    assert config_from_dict({}, ("data.dataset=fashion_mnist", "models.generator.depth=2")).models.generator.depth == 2


@pytest.mark.parametrize("content, message", [
    (b"federation:\n  rounds: 2020-01-01\n", "federation.rounds: must be a plain value"),
    (b"data:\n  root: !!binary aGVsbG8=\n", "data.root: must be a plain value"),
    (b"a: &x [*x]\n", "refers to itself"),
    (b"federation:\n  rounds: 2\nfederation:\n  rounds: 3\n", "'federation' appears twice"),
    (b"federation:\n  rounds: 2\n  rounds: 3\n", "'rounds' appears twice"),
    (b"\xff\xfe\x00federation", "is not UTF-8 text"),
])
def test_config_files_that_are_not_plain_yaml_data_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_config(path)


@pytest.mark.parametrize("device", ["cuda:x", "cudafoo", "gpu", "cuda:", "cpu:0"])
def test_a_device_name_torch_cannot_parse_is_a_config_error(device):
    with pytest.raises(ConfigError, match="runtime.device"):
        load_config(QUICKSTART, [f"runtime.device={device}"])


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:1"])
def test_valid_device_names_pass_the_config_check(device):
    assert load_config(QUICKSTART, [f"runtime.device={device}"]).runtime.device == device
