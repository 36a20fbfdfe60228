"""``fed_dfkd.sweep``: the grid and its overrides, the summary math, the table, and the driver's
resume rules (with a fake executor that writes what the real commands would)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import pytest

from fed_dfkd.config import load_config
from fed_dfkd.errors import UserError
from fed_dfkd.sweep import (
    CSV_COLUMNS,
    AUDIT_COLUMNS,
    SweepSpec,
    achieved_epsilon,
    audit_columns,
    collect_rows,
    format_epsilon,
    format_markdown,
    is_finished,
    mean_std,
    parse_epsilons,
    parse_seeds,
    plan_sweep,
    plot_accuracy_vs_epsilon,
    run_overrides,
    run_state,
    run_sweep,
    summarize,
    write_csv,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ("federation.num_clients=3",)


# --------------------------------------------------------------------------------------------
# Arguments


def test_epsilons_parse_in_order_with_inf_as_no_dp():
    assert parse_epsilons("0.5, 1,2,4,8,inf") == (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    assert parse_epsilons("∞,1e-1") == (math.inf, 0.1)


@pytest.mark.parametrize("text", ["0", "1,0", "-1", "abc", "", "1,,2", "1,", "nan", "2,2.0", "-inf"])
def test_bad_epsilon_lists_are_user_errors(text):
    with pytest.raises(UserError, match="--epsilons"):
        parse_epsilons(text)


def test_seeds_parse_and_reject_negatives_garbage_and_repeats():
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    for text in ("-1", "x", "1,1", ""):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(text)


def test_epsilon_names_are_short_and_exact():
    assert [format_epsilon(e) for e in (4.0, 0.5, 1e-5, math.inf, 1234567.0)] == \
        ["4", "0.5", "1e-05", "inf", "1234567"]
    assert parse_epsilons(",".join(format_epsilon(e) for e in (0.1, 1 / 3, 8.0))) == (0.1, 1 / 3, 8.0)


def _spec(**changes) -> SweepSpec:
    fields = dict(config=QUICKSTART, level="client", epsilons=(4.0, math.inf), seeds=(0,),
                  overrides=SMALL)
    fields.update(changes)
    return SweepSpec(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(level="client", command="distill"), "needs --command simulate"),
    (dict(level="record", mechanism="local"), "--mechanism applies to --level client"),
    (dict(level="record", teachers=Path("/tmp")), "--teachers cannot be used with --level record"),
    (dict(level="user"), "--level must be one of"),
    (dict(mechanism="secure"), "--mechanism must be one of"),
    (dict(overrides=("privacy.target_epsilon=3",)), "sets privacy.target_epsilon itself"),
    (dict(overrides=("runtime.seed = 3",)), "sets runtime.seed itself"),
])
def test_bad_sweep_arguments_are_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        _spec(**changes)


# --------------------------------------------------------------------------------------------
# The grid


def test_client_level_forces_the_plain_mean_on_every_run_the_infinite_baseline_included():
    finite, forced = run_overrides(level="client", mechanism="local", epsilon=2.0, seed=3,
                                   extra=("distill.lr=0.01",))
    assert forced == ("distill.ensemble=mean", "federation.update_aggregation=mean")
    assert finite == (*forced, "distill.lr=0.01", "privacy.level=client",
                      "privacy.target_epsilon=2", "privacy.noise_multiplier=null",
                      "privacy.mechanism=local", "runtime.seed=3")
    baseline, forced_inf = run_overrides(level="client", mechanism="local", epsilon=math.inf, seed=3)
    assert forced_inf == forced and baseline[:2] == forced

    # The quickstart config says class_weighted: the overrides make both runs valid and alike.
    dp = load_config(QUICKSTART, [*SMALL, *finite])
    none = load_config(QUICKSTART, [*SMALL, *baseline])
    assert (dp.privacy.level, dp.privacy.target_epsilon, dp.privacy.mechanism) == ("client", 2.0, "local")
    assert (none.privacy.level, none.privacy.target_epsilon) == ("none", None)
    for cfg in (dp, none):
        assert cfg.distill.ensemble == "mean" and cfg.federation.update_aggregation == "mean"
        assert cfg.runtime.seed == 3 and cfg.privacy.noise_multiplier is None


def test_record_level_forces_nothing_and_clears_a_configured_noise_multiplier():
    overrides, forced = run_overrides(level="record", mechanism=None, epsilon=0.5, seed=0,
                                      extra=("privacy.noise_multiplier=1.0",))
    assert forced == ()
    cfg = load_config(QUICKSTART, overrides)  # the sweep's null comes after the user's value
    assert (cfg.privacy.level, cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier) == \
        ("record", 0.5, None)
    assert cfg.distill.ensemble == "class_weighted"  # the config's own, untouched


def test_the_plan_is_every_epsilon_for_each_seed_in_turn():
    runs = plan_sweep(_spec(epsilons=(1.0, math.inf, 0.5), seeds=(0, 2), mechanism="local"))
    assert [r.name for r in runs] == [
        "client-local_eps1_seed0", "client-local_epsinf_seed0", "client-local_eps0.5_seed0",
        "client-local_eps1_seed2", "client-local_epsinf_seed2", "client-local_eps0.5_seed2",
    ]
    assert [r.privacy_level for r in runs[:3]] == ["client", "none", "client"]
    assert runs[3].overrides[-1] == "runtime.seed=2" and runs[3].overrides[:3] == (
        "distill.ensemble=mean", "federation.update_aggregation=mean", "federation.num_clients=3")
    record = plan_sweep(_spec(level="record", command="distill", epsilons=(8.0,)))
    assert record[0].name == "record-distill_eps8_seed0" and record[0].series == "record-distill"


# --------------------------------------------------------------------------------------------
# Summary math


def test_mean_and_sample_std():
    mean, std = mean_std([0.8, 0.9, None, float("nan")])
    assert mean == pytest.approx(0.85) and std == pytest.approx(math.sqrt(0.005))
    assert mean_std([0.7]) == (0.7, None)
    assert mean_std([]) == (None, None)
    assert mean_std([math.inf, math.inf]) == (math.inf, None)


def _row(series, target, seed, accuracy, *, status="completed", epsilon=None, **extra):
    return {"series": series, "target_epsilon": target, "seed": seed, "student_accuracy": accuracy,
            "status": status, "epsilon": target if epsilon is None else epsilon,
            "ensemble_accuracy": 0.9, **extra}


ROWS = [
    _row("client-central", 1.0, 0, 0.6, epsilon=0.99),
    _row("client-central", 1.0, 1, 0.8, epsilon=0.97),
    _row("client-central", 1.0, 2, None, status="failed"),
    _row("client-central", math.inf, 0, 1.0),
    _row("client-central", math.inf, 1, 0.8),
    _row("record", 4.0, 0, 0.5, mia_loss_auc=0.52, mia_best_auc=0.61),
    _row("record", 4.0, 1, 0.3, status="running"),
]


def test_summary_groups_by_series_and_epsilon_counting_finished_runs_only():
    summary = summarize(ROWS)
    assert [(s.series, s.target_epsilon, s.runs, s.planned) for s in summary] == [
        ("client-central", 1.0, 2, 3), ("client-central", math.inf, 2, 2), ("record", 4.0, 1, 2)]
    one, baseline, record = summary
    assert one.accuracy_mean == pytest.approx(0.7)
    assert one.accuracy_std == pytest.approx(math.sqrt(0.02))
    assert one.epsilon_mean == pytest.approx(0.98)
    assert one.relative_accuracy == pytest.approx(0.7 / 0.9)
    assert baseline.relative_accuracy == pytest.approx(1.0) and baseline.epsilon_mean == math.inf
    assert record.relative_accuracy is None  # no ε = ∞ run in that series
    assert record.mia["mia_best_auc"] == (0.61, None)


def test_markdown_shows_the_summary_and_every_run():
    text = format_markdown(ROWS, date="DATE", machine="MACHINE",
                           series_notes={"client-central": {"commands": ["fed-dfkd privacy sweep X"],
                                                            "forced": ["distill.ensemble=mean"]}})
    assert "Written DATE on MACHINE." in text
    assert "`fed-dfkd privacy sweep X`" in text and "`distill.ensemble=mean`" in text
    assert "| client-central | 1 | 2/3 | 0.7000 ± 0.1414 | 0.980 ± 0.014 | 0.778 | 0.9000 |" in text
    assert "| client-central | ∞ | 2/2 | 0.9000 ± 0.1414 | ∞ | 1.000 |" in text
    assert text.count("\n| client-central | 1 | ") == 1 + 3  # summary + three runs


def test_csv_has_one_line_per_run_with_inf_and_audit_columns_when_audited(tmp_path):
    rows = [dict(r, audit=r["series"] == "record") for r in ROWS]
    write_csv(tmp_path / "s.csv", rows)
    with open(tmp_path / "s.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == [*CSV_COLUMNS, *AUDIT_COLUMNS]
    assert len(read) == len(ROWS)
    assert read[3]["target_epsilon"] == "inf" and float(read[3]["epsilon"]) == math.inf
    assert read[0]["target_epsilon"] == "1" and float(read[0]["epsilon"]) == 0.99
    assert read[2]["student_accuracy"] == "" and read[5]["mia_best_auc"] == "0.61"
    write_csv(tmp_path / "plain.csv", ROWS)
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


def test_plot_is_written_with_and_without_data(tmp_path):
    plot_accuracy_vs_epsilon(tmp_path / "a.png", ROWS)
    plot_accuracy_vs_epsilon(tmp_path / "empty.png", [])
    for name in ("a.png", "empty.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------------
# Reading run folders


def test_audit_columns_take_the_loss_attack_and_the_strongest():
    audit = {"targets": {"student": {"attacks": {
        "loss": {"auc": 0.55, "tpr_at_1pct_fpr": 0.02},
        "mentr": {"auc": 0.57, "tpr_at_1pct_fpr": 0.01},
        "calibrated": {"auc": 0.53, "tpr_at_1pct_fpr": 0.04},
    }}, "client_0": {"attacks": {"loss": {"auc": 0.9, "tpr_at_1pct_fpr": 0.5}}}}}
    assert audit_columns(audit) == {"mia_loss_auc": 0.55, "mia_loss_tpr_at_1pct_fpr": 0.02,
                                    "mia_best_auc": 0.57, "mia_best_auc_attack": "mentr",
                                    "mia_best_tpr_at_1pct_fpr": 0.04}
    assert set(audit_columns(None).values()) == {None}
    assert set(audit_columns({"targets": {}}).values()) == {None}


def test_achieved_epsilon_reads_the_report_then_the_dp_teachers(tmp_path):
    assert achieved_epsilon({"epsilon": None}, {"privacy_level": "none"}) == math.inf
    assert achieved_epsilon({"epsilon": 3.5}, {"privacy_level": "client"}) == 3.5
    assert achieved_epsilon({"epsilon": None, "epsilon_infinite": True},
                            {"privacy_level": "client"}) == math.inf
    (tmp_path / "teachers").mkdir()
    for name, epsilon in (("client_0", 1.9), ("client_1", 1.95)):
        (tmp_path / "teachers" / f"{name}.json").write_text(
            json.dumps({"privacy": {"epsilon": epsilon, "delta": 1e-5}}))
    spec = {"privacy_level": "record", "teachers_dir": str(tmp_path),
            "teacher_names": ["client_0", "client_1"]}
    assert achieved_epsilon({}, spec) == 1.95  # `distill` reports no ε: the worst teacher's
    assert achieved_epsilon({}, dict(spec, teacher_names=["client_7"])) is None


def test_finished_means_completed_budget_exhausted_or_every_distill_round(tmp_path):
    assert is_finished({"status": "completed"}) and is_finished({"status": "budget_exhausted"})
    assert not is_finished({"status": "running", "rounds_completed": 2, "rounds_total": 2})
    assert not is_finished({"status": "stopped"}) and not is_finished(None)
    assert is_finished({"rounds_completed": 3, "rounds_total": 3})
    assert not is_finished({"rounds_completed": 2, "rounds_total": 3})

    run = tmp_path / "run"
    assert run_state(run) == "new"
    run.mkdir()
    (run / "sweep_run.json").write_text("{}")
    assert run_state(run) == "new"
    (run / "metrics.jsonl").write_text("{\"step\": 1}\n")
    assert run_state(run) == "restart"
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "previous.pt").write_bytes(b"x")
    assert run_state(run) == "resume"
    (run / "report.json").write_text(json.dumps({"status": "completed"}))
    assert run_state(run) == "finished"


# --------------------------------------------------------------------------------------------
# The driver, with a fake executor


class FakeCommands:
    """Writes what pretrain/simulate/audit write, as far as the sweep reads it."""

    def __init__(self, *, fail: Sequence[str] = (), stop: Sequence[str] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail, self.stop = set(fail), set(stop)

    def __call__(self, argv: Sequence[str]) -> int:
        argv = list(argv)
        self.calls.append(argv)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        if argv[0] == "pretrain":
            from fed_dfkd.data.teachers import teacher_config_hash

            out = Path(argv[argv.index("--out") + 1]) / "teachers"
            out.mkdir(parents=True, exist_ok=True)
            cfg = load_config(argv[argv.index("--config") + 1], sets)
            for k in range(cfg.federation.num_clients):
                (out / f"client_{k}.json").write_text(
                    json.dumps({"config_hash": teacher_config_hash(cfg)}))
                (out / f"client_{k}.pt").write_bytes(b"weights")
            return 0
        if argv[0] == "audit":
            run = Path(argv[argv.index("--run") + 1])
            (run / "audit.json").write_text(json.dumps({"targets": {"student": {"attacks": {
                "loss": {"auc": 0.51, "tpr_at_1pct_fpr": 0.01}}}}}))
            return 0
        out = Path(argv[argv.index("--out") + 1])
        if out.name in self.fail:
            raise UserError(f"cannot reach the target for {out.name}")
        level = next(s.split("=", 1)[1] for s in sets if s.startswith("privacy.level="))
        epsilon = next(s.split("=", 1)[1] for s in sets if s.startswith("privacy.target_epsilon="))
        status = "stopped" if out.name in self.stop else "completed"
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"state")
        (out / "report.json").write_text(json.dumps({
            "status": status, "student_accuracy": 0.5, "ensemble_accuracy": 0.9,
            "rounds_completed": 2, "rounds_total": 2, "wall_seconds": 1.0,
            "privacy_level": level, "epsilon": None if level == "none" else float(epsilon) * 0.99,
            "delta": None if level == "none" else 1e-5}))
        return 0 if status == "completed" else 1


def _commands(fake: FakeCommands, name: str) -> list[list[str]]:
    return [c for c in fake.calls if c[0] in ("simulate", "distill") and Path(c[c.index("--out") + 1]).name == name]


def test_a_sweep_runs_the_grid_shares_teachers_and_a_rerun_does_nothing(tmp_path):
    spec = _spec(seeds=(0, 1), audit=True)
    fake = FakeCommands()
    outcome = run_sweep(spec, tmp_path, execute=fake)
    assert outcome.actions == {"client-central_eps4_seed0": "new", "client-central_epsinf_seed0": "new",
                               "client-central_eps4_seed1": "new", "client-central_epsinf_seed1": "new"}
    assert outcome.unfinished == []
    # Client-level DP leaves the teachers alone: one pretraining per seed, shared by every ε.
    assert [c[0] for c in fake.calls].count("pretrain") == 2
    assert [c[0] for c in fake.calls].count("audit") == 4
    assert "--resume" not in sum(fake.calls, [])
    rows = collect_rows(tmp_path)
    assert [(r["target_epsilon"], r["seed"], r["privacy_level"]) for r in rows] == [
        (4.0, 0, "client"), (4.0, 1, "client"), (math.inf, 0, "none"), (math.inf, 1, "none")]
    assert rows[0]["epsilon"] == pytest.approx(3.96) and rows[2]["epsilon"] == math.inf
    assert rows[0]["mia_loss_auc"] == 0.51
    for name in ("sweep.csv", "sweep.md"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "plots" / "accuracy_vs_epsilon.png").read_bytes().startswith(PNG_MAGIC)

    again = FakeCommands()
    outcome = run_sweep(spec, tmp_path, execute=again)
    assert again.calls == [] and set(outcome.actions.values()) == {"reused"}


def test_a_failed_run_does_not_stop_the_others_and_is_retried(tmp_path):
    spec = _spec()
    outcome = run_sweep(spec, tmp_path, execute=FakeCommands(fail=["client-central_eps4_seed0"]))
    assert outcome.actions == {"client-central_eps4_seed0": "failed", "client-central_epsinf_seed0": "new"}
    assert outcome.unfinished == ["client-central_eps4_seed0"]
    failed = next(r for r in collect_rows(tmp_path) if r["target_epsilon"] == 4.0)
    assert failed["status"] == "failed" and "cannot reach" in failed["error"]
    assert "cannot reach" in (tmp_path / "sweep.md").read_text()

    retry = FakeCommands()
    outcome = run_sweep(spec, tmp_path, execute=retry)
    assert outcome.actions == {"client-central_eps4_seed0": "new", "client-central_epsinf_seed0": "reused"}
    assert outcome.unfinished == [] and collect_rows(tmp_path)[0]["error"] is None


def test_interrupted_runs_are_resumed_from_a_checkpoint_or_restarted_cleanly(tmp_path):
    spec = _spec(epsilons=(4.0, 2.0, math.inf))
    run_sweep(spec, tmp_path, execute=FakeCommands(stop=["client-central_eps4_seed0"]))
    runs = tmp_path / "runs"
    # eps2: killed before its first checkpoint (a stale metrics line, no checkpoint).
    (runs / "client-central_eps2_seed0" / "report.json").unlink()
    (runs / "client-central_eps2_seed0" / "checkpoints" / "last.pt").unlink()
    (runs / "client-central_eps2_seed0" / "metrics.jsonl").write_text("{\"step\": 1}\n")

    fake = FakeCommands()
    outcome = run_sweep(spec, tmp_path, execute=fake)
    assert outcome.actions == {"client-central_eps4_seed0": "resumed",
                               "client-central_eps2_seed0": "restarted",
                               "client-central_epsinf_seed0": "reused"}
    assert _commands(fake, "client-central_eps4_seed0")[0][-1] == "--resume"
    assert "--resume" not in _commands(fake, "client-central_eps2_seed0")[0]
    assert not (runs / "client-central_eps2_seed0" / "metrics.jsonl").exists()  # wiped


def test_a_rerun_with_other_settings_is_refused_before_anything_runs(tmp_path):
    run_sweep(_spec(epsilons=(math.inf,)), tmp_path, execute=FakeCommands())
    fake = FakeCommands()
    with pytest.raises(UserError, match="holds a run of another experiment"):
        run_sweep(_spec(epsilons=(4.0, math.inf), overrides=(*SMALL, "distill.lr=0.5")),
                  tmp_path, execute=fake)
    assert fake.calls == []
    foreign = tmp_path / "runs" / "client-central_eps4_seed0"
    foreign.mkdir()
    (foreign / "report.json").write_text("{}")
    with pytest.raises(UserError, match="not made by `fed-dfkd privacy sweep`"):
        run_sweep(_spec(epsilons=(4.0,)), tmp_path, execute=fake)


def test_a_bad_override_fails_before_any_folder_is_made(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="distill.ensemble"):
        run_sweep(_spec(overrides=("distill.ensemble=weighted",)), out, execute=FakeCommands())
    assert not out.exists()


def test_given_teachers_must_match_every_run(tmp_path):
    teachers = tmp_path / "pretrained"
    FakeCommands()(["pretrain", "--config", str(QUICKSTART), "--out", str(teachers),
                    *sum((["--set", s] for s in (*SMALL, "runtime.seed=0")), [])])
    fake = FakeCommands()
    run_sweep(_spec(teachers=teachers), tmp_path / "a", execute=fake)
    assert "pretrain" not in [c[0] for c in fake.calls]
    assert all(c[c.index("--teachers") + 1] == str(teachers) for c in fake.calls)
    with pytest.raises(UserError, match="seed 1"):
        run_sweep(_spec(teachers=teachers, seeds=(0, 1)), tmp_path / "b", execute=FakeCommands())
