"""Accuracy against ε: the grid, the runs and the table behind ``fed-dfkd privacy sweep`` (issue 4).

A sweep runs one experiment per (target ε, seed) at one privacy level and collects their
``report.json`` files into ``DIR/sweep.csv``, ``DIR/sweep.md`` and
``DIR/plots/accuracy_vs_epsilon.png``.

* **Series.** The runs of one level, client-level mechanism and command form a *series*:
  ``record``, ``record-distill``, ``client-central``, ``client-local``. Each run lives in
  ``DIR/runs/<series>_eps<ε>_seed<s>/``. Several sweeps (a record and a client sweep, say) may
  share one ``DIR``: the table and the plot cover every run under ``DIR/runs``, one curve per
  series.
* **Overrides.** A finite ε sets ``privacy.level=<level>``, ``privacy.target_epsilon=ε`` (and
  clears ``privacy.noise_multiplier``); ε = ∞ sets ``privacy.level=none``, with the same other
  overrides as the DP runs of its series, so the baseline compares like for like. Client level
  also forces ``distill.ensemble=mean`` and ``federation.update_aggregation=mean`` (the rules
  of :func:`fed_dfkd.config._check`), on its ∞ baseline too. ``runtime.seed`` is the seed.
  Extra ``--set`` overrides apply to every run, after the forced ones; the keys the sweep itself
  sets (:data:`SWEEP_KEYS`) are refused there.
* **Teachers** are pretrained once per teacher config (:func:`~fed_dfkd.data.teachers.
  teacher_config_hash`) into ``DIR/teacher_cache/<hash>/`` and shared by the runs that need
  them: at client level every ε of a seed shares one set; at record level each ε has its own,
  since the DP-SGD teachers are what the privacy protects.
* **Resumable.** A run whose ``report.json`` says ``completed`` or ``budget_exhausted`` (a
  ``distill`` run: all rounds done) is reused; one with a checkpoint is resumed with
  ``--resume``; one interrupted before its first checkpoint is deleted and started again. Each
  run folder holds ``sweep_run.json`` with what it was planned as (its config's
  :func:`~fed_dfkd.runtime.resume_key` included), so a rerun with other arguments that would map
  to the same folder is refused instead of mixing two experiments.

This module does no training itself: :func:`run_sweep` hands each command line
(``pretrain``/``simulate``/``distill``/``audit``) to an executor the CLI passes in.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from fed_dfkd.errors import UserError
from fed_dfkd.runs import atomic_write_json, atomic_write_text

__all__ = [
    "AUDIT_COLUMNS",
    "CSV_COLUMNS",
    "CLIENT_LEVEL_FORCED",
    "COMMANDS",
    "LEVELS",
    "MECHANISMS",
    "PlannedRun",
    "SWEEP_KEYS",
    "SummaryRow",
    "SweepOutcome",
    "SweepSpec",
    "achieved_epsilon",
    "audit_columns",
    "collect_rows",
    "format_epsilon",
    "format_markdown",
    "is_finished",
    "mean_std",
    "parse_epsilons",
    "parse_seeds",
    "plan_sweep",
    "plot_accuracy_vs_epsilon",
    "run_name",
    "run_overrides",
    "run_state",
    "run_sweep",
    "series_name",
    "summarize",
    "write_csv",
    "write_outputs",
]

logger = logging.getLogger(__name__)

LEVELS = ("record", "client")
COMMANDS = ("simulate", "distill")
MECHANISMS = ("central", "local")
#: Statuses of a run that is over and whose numbers count (``report.json``'s ``status``).
FINISHED_STATUSES = ("completed", "budget_exhausted")
#: Keys the sweep sets on every run; ``--set`` may not touch them.
SWEEP_KEYS = ("privacy.level", "privacy.target_epsilon", "privacy.noise_multiplier",
              "privacy.mechanism", "runtime.seed")
#: Client-level DP bounds each client's share of a plain sum (config rules): also on ε = ∞.
CLIENT_LEVEL_FORCED = ("distill.ensemble=mean", "federation.update_aggregation=mean")

RUNS_DIR = "runs"
TEACHER_CACHE_DIR = "teacher_cache"
RUN_SPEC_NAME = "sweep_run.json"
SWEEP_CSV = "sweep.csv"
SWEEP_MD = "sweep.md"
PLOT_NAME = "accuracy_vs_epsilon.png"
#: Relative slack when checking an achieved ε against its target (calibration rounds down to it).
EPSILON_SLACK = 1e-3

#: Executes one ``fed-dfkd`` command line in-process; returns its exit code, raises UserError.
Executor = Callable[[Sequence[str]], int]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"0.5,1,inf"`` -> ``(0.5, 1.0, inf)``: targets > 0, ``inf`` (or ``∞``) meaning no DP.

    Zero, negative, NaN, unparsable and repeated values are a :class:`UserError`.
    """
    values: list[float] = []
    pieces = [piece.strip() for piece in str(text).split(",")]
    if not any(pieces):
        raise UserError("--epsilons: give a comma-separated list of targets > 0, "
                        "e.g. 0.5,1,2,4,8,inf")
    for piece in pieces:
        if not piece:
            raise UserError(f"--epsilons {text!r}: an empty item (two commas, or a trailing one)")
        try:
            value = math.inf if piece in ("∞", "+∞") else float(piece)
        except ValueError:
            raise UserError(f"--epsilons: {piece!r} is not a number (use numbers > 0, or inf for "
                            "no DP)") from None
        if math.isnan(value) or value <= 0:
            raise UserError(f"--epsilons: every ε must be > 0 (inf: no DP), got {piece!r}")
        if math.isinf(value) and piece.lower().lstrip("+") not in ("inf", "infinity", "∞"):
            # float("1e999") is inf: a typo must not turn into a run without DP.
            raise UserError(f"--epsilons: {piece!r} is too large for a number; write inf for no DP")
        if value in values:
            raise UserError(f"--epsilons: {piece!r} is listed twice")
        values.append(value)
    return tuple(values)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: distinct integers >= 0, else a :class:`UserError`."""
    seeds: list[int] = []
    for piece in (piece.strip() for piece in str(text).split(",")):
        try:
            seed = int(piece)
        except ValueError:
            raise UserError(f"--seeds: {piece!r} is not an integer (e.g. --seeds 0,1,2)") from None
        if seed < 0:
            raise UserError(f"--seeds: seeds must be >= 0, got {seed}")
        if seed in seeds:
            raise UserError(f"--seeds: {seed} is listed twice")
        seeds.append(seed)
    return tuple(seeds)


def format_epsilon(epsilon: float) -> str:
    """Shortest exact text of ε for names and tables: ``4``, ``0.5``, ``1e-05``, ``inf``."""
    if math.isinf(epsilon):
        return "inf"
    text = repr(float(epsilon))
    return text[:-2] if text.endswith(".0") else text


def series_name(level: str, mechanism: str | None, command: str) -> str:
    """``record``, ``record-distill``, ``client-central`` or ``client-local``."""
    name = f"client-{mechanism or 'central'}" if level == "client" else level
    return f"{name}-distill" if command == "distill" else name


def run_name(series: str, epsilon: float, seed: int) -> str:
    """The run folder's name under ``DIR/runs``: ``<series>_eps<ε>_seed<s>``."""
    return f"{series}_eps{format_epsilon(epsilon)}_seed{seed}"


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """Everything ``fed-dfkd privacy sweep`` was asked for; checked on construction.

    ``overrides`` are the user's ``--set`` values (``data.root`` from ``--data-root`` included),
    applied to every run. ``command_line`` is recorded in each run folder and in ``sweep.md``.
    """

    config: Path
    level: str
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    command: str = "simulate"
    mechanism: str | None = None
    overrides: tuple[str, ...] = ()
    teachers: Path | None = None
    engine: str = "inprocess"
    audit: bool = False
    command_line: str = ""

    def __post_init__(self) -> None:
        from fed_dfkd.config import parse_override

        if self.level not in LEVELS:
            raise UserError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.command not in COMMANDS:
            raise UserError(f"--command must be one of {', '.join(COMMANDS)}, got {self.command!r}")
        if not self.epsilons:
            raise UserError("--epsilons: give at least one ε")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed")
        if self.level == "client":
            if self.command != "simulate":
                raise UserError("--level client needs --command simulate: client-level DP protects "
                                "an owner's releases in a federation, which `distill` has none of")
            if self.mechanism is None:  # the config's default; frozen, hence object.__setattr__
                object.__setattr__(self, "mechanism", "central")
            if self.mechanism not in MECHANISMS:
                raise UserError(f"--mechanism must be one of {', '.join(MECHANISMS)}, "
                                f"got {self.mechanism!r}")
        elif self.mechanism is not None:
            raise UserError("--mechanism applies to --level client only (record level is DP-SGD)")
        if self.level == "record" and self.teachers is not None:
            raise UserError("--teachers cannot be used with --level record: the DP-SGD "
                            "teachers are what record-level privacy protects, each ε trains "
                            "its own")
        for override in self.overrides:
            key, _ = parse_override(override)
            if key in SWEEP_KEYS:
                raise UserError(f"--set {override!r}: the sweep sets {key} itself (use --level, "
                                "--epsilons, --mechanism and --seeds)")

    @property
    def series(self) -> str:
        return series_name(self.level, self.mechanism, self.command)


@dataclass(frozen=True, kw_only=True)
class PlannedRun:
    """One run of the grid: where it goes and the overrides it runs with."""

    name: str
    series: str
    level: str
    mechanism: str | None
    command: str
    target_epsilon: float
    seed: int
    overrides: tuple[str, ...]
    forced: tuple[str, ...]

    @property
    def privacy_level(self) -> str:
        return "none" if math.isinf(self.target_epsilon) else self.level


def run_overrides(
    *, level: str, mechanism: str | None, epsilon: float, seed: int, extra: Sequence[str] = ()
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(all overrides, forced overrides)`` of one run, in the order they are applied.

    Forced aggregation rules first (client level, whatever ε), then the user's ``extra``, then
    the privacy and seed values the sweep owns. ε = ∞ is ``privacy.level=none``.
    """
    forced = CLIENT_LEVEL_FORCED if level == "client" else ()
    if math.isinf(epsilon):
        privacy = ("privacy.level=none", "privacy.target_epsilon=null",
                   "privacy.noise_multiplier=null")
    else:
        privacy = (f"privacy.level={level}", f"privacy.target_epsilon={format_epsilon(epsilon)}",
                   "privacy.noise_multiplier=null")
    if level == "client":
        privacy += (f"privacy.mechanism={mechanism or 'central'}",)
    return (*forced, *extra, *privacy, f"runtime.seed={seed}"), tuple(forced)


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """The grid, seed by seed (each pass gives a whole curve), ε in the order given."""
    runs = []
    for seed in spec.seeds:
        for epsilon in spec.epsilons:
            overrides, forced = run_overrides(level=spec.level, mechanism=spec.mechanism,
                                              epsilon=epsilon, seed=seed, extra=spec.overrides)
            runs.append(PlannedRun(
                name=run_name(spec.series, epsilon, seed), series=spec.series, level=spec.level,
                mechanism=spec.mechanism, command=spec.command, target_epsilon=epsilon, seed=seed,
                overrides=overrides, forced=forced,
            ))
    return runs


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if missing or unreadable (a run cut off mid-way)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def is_finished(report: Mapping[str, Any] | None) -> bool:
    """Whether ``report`` is of a run that is over: ``status`` completed/budget_exhausted, or,
    for ``distill`` (whose report has no status), every round done."""
    if not report:
        return False
    status = report.get("status")
    if status is not None:
        return status in FINISHED_STATUSES
    done, total = report.get("rounds_completed"), report.get("rounds_total")
    return isinstance(done, int) and isinstance(total, int) and done >= total


def run_state(run_dir: Path) -> str:
    """``finished``, ``resume`` (a checkpoint to continue from), ``restart`` (something on disk
    but no checkpoint: interrupted before round 1) or ``new``."""
    if is_finished(_read_json(run_dir / "report.json")):
        return "finished"
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.pt").is_file() or (checkpoints / "previous.pt").is_file():
        return "resume"
    if run_dir.is_dir() and any(p.name != RUN_SPEC_NAME for p in run_dir.iterdir()):
        return "restart"
    return "new"


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return math.inf if value in ("inf", "Infinity") else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _teacher_privacy(teachers_dir: str | None, names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``privacy`` entries of the DP teachers' manifests (record level), where readable."""
    if not teachers_dir:
        return []
    found = []
    for name in names:
        manifest = _read_json(Path(teachers_dir) / "teachers" / f"{name}.json")
        privacy = manifest.get("privacy") if manifest else None
        if isinstance(privacy, dict):
            found.append(privacy)
    return found


def achieved_epsilon(report: Mapping[str, Any], spec: Mapping[str, Any]) -> float | None:
    """The run's cumulative ε: ∞ without DP; else ``report.json``'s ``epsilon`` (∞ when it says
    ``epsilon_infinite``); else, at record level, the worst teacher's ε from the manifests."""
    if spec.get("privacy_level") == "none":
        return math.inf
    if report.get("epsilon_infinite"):
        return math.inf
    value = _float_or_none(report.get("epsilon"))
    if value is not None:
        return value
    teachers = _teacher_privacy(spec.get("teachers_dir"), spec.get("teacher_names") or [])
    values = [v for v in (_float_or_none(p.get("epsilon")) for p in teachers) if v is not None]
    return max(values) if values else None


def audit_columns(audit: Mapping[str, Any] | None) -> dict[str, Any]:
    """The student's membership-inference numbers from ``audit.json`` (``fed_dfkd.audit``).

    ``mia_loss_*``: the loss attack (Yeom et al.); ``mia_best_auc``: the highest AUC of any
    attack, and which; ``mia_best_tpr_at_1pct_fpr``: the highest TPR at 1 % FPR of any attack.
    """
    empty = {name: None for name in AUDIT_COLUMNS}
    try:
        attacks = audit["targets"]["student"]["attacks"]  # type: ignore[index]
    except (KeyError, TypeError):
        return empty
    if not isinstance(attacks, dict) or not attacks:
        return empty
    results = {name: r for name, r in attacks.items() if isinstance(r, dict)}
    aucs = {name: _float_or_none(r.get("auc")) for name, r in results.items()}
    aucs = {name: v for name, v in aucs.items() if v is not None}
    tprs = [v for v in (_float_or_none(r.get("tpr_at_1pct_fpr")) for r in results.values())
            if v is not None]
    loss = attacks.get("loss") if isinstance(attacks.get("loss"), dict) else {}
    best = max(aucs, key=aucs.__getitem__) if aucs else None
    return {
        "mia_loss_auc": _float_or_none(loss.get("auc")),
        "mia_loss_tpr_at_1pct_fpr": _float_or_none(loss.get("tpr_at_1pct_fpr")),
        "mia_best_auc": aucs[best] if best else None,
        "mia_best_auc_attack": best,
        "mia_best_tpr_at_1pct_fpr": max(tprs) if tprs else None,
    }


CSV_COLUMNS = (
    "series", "level", "mechanism", "command", "privacy_level", "target_epsilon", "epsilon",
    "delta", "accountant", "seed", "student_accuracy", "ensemble_accuracy",
    "best_teacher_accuracy", "status", "rounds_completed", "rounds_total", "wall_seconds", "run",
    "error",
)
AUDIT_COLUMNS = ("mia_loss_auc", "mia_loss_tpr_at_1pct_fpr", "mia_best_auc", "mia_best_auc_attack",
                 "mia_best_tpr_at_1pct_fpr")


def _row(run_dir: Path, spec: Mapping[str, Any], out: Path) -> dict[str, Any]:
    report = _read_json(run_dir / "report.json") or {}
    audit = _read_json(run_dir / "audit.json")
    status = report.get("status")
    if status is None and report:
        status = "completed" if is_finished(report) else "running"
    if spec.get("error") and not is_finished(report):
        status = "failed"
    level = spec.get("level")
    row: dict[str, Any] = {
        "series": spec.get("series"),
        "level": level,
        "mechanism": spec.get("mechanism") or ("dp-sgd" if level == "record" else None),
        "command": spec.get("command"),
        "privacy_level": report.get("privacy_level") or spec.get("privacy_level"),
        "target_epsilon": _target_epsilon(spec),
        "epsilon": achieved_epsilon(report, spec) if report else None,
        "delta": report.get("delta") if report.get("delta") is not None else spec.get("delta"),
        "accountant": report.get("accountant") or spec.get("accountant"),
        "seed": spec.get("seed"),
        "student_accuracy": report.get("student_accuracy"),
        "ensemble_accuracy": report.get("ensemble_accuracy"),
        "best_teacher_accuracy": report.get("best_teacher_accuracy"),
        "status": status or "pending",
        "rounds_completed": report.get("rounds_completed"),
        "rounds_total": report.get("rounds_total"),
        "wall_seconds": report.get("wall_seconds"),
        "run": os.path.relpath(run_dir, out),
        "error": spec.get("error"),
        "audit": audit is not None,
    }
    if row["privacy_level"] == "none":
        row["delta"] = row["accountant"] = None
    row.update(audit_columns(audit))
    return row


def _target_epsilon(spec: Mapping[str, Any]) -> float:
    # JSON has no infinity: sweep_run.json writes the ∞ target as null.
    value = _float_or_none(spec.get("target_epsilon"))
    return math.inf if value is None else value


def _sort_key(row: Mapping[str, Any]) -> tuple:
    return (str(row.get("series")), row["target_epsilon"], row.get("seed") or 0)


def collect_rows(out: Path) -> list[dict[str, Any]]:
    """One row per run folder under ``out/runs`` that a sweep made, sorted by series, ε, seed."""
    rows = []
    runs = Path(out) / RUNS_DIR
    if runs.is_dir():
        for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
            spec = _read_json(run_dir / RUN_SPEC_NAME)
            if spec is not None:
                rows.append(_row(run_dir, spec, Path(out)))
    return sorted(rows, key=_sort_key)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the numbers given, None/NaN skipped.

    No numbers: (None, None); one: (x, None). An infinite value makes the mean ∞ and the
    standard deviation None (ε = ∞ is a label, not a measurement to spread).
    """
    numbers = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not numbers:
        return None, None
    if any(math.isinf(v) for v in numbers):
        return math.inf, None
    mean = statistics.fmean(numbers)
    return mean, (statistics.stdev(numbers) if len(numbers) > 1 else None)


@dataclass(frozen=True)
class SummaryRow:
    """One (series, target ε) cell of the summary: mean ± std over the seeds that finished.

    ``relative_accuracy`` = mean accuracy / mean accuracy of the series at ε = ∞ (None without
    a finished baseline). ``runs`` counts the finished runs, ``planned`` every run listed.
    """

    series: str
    target_epsilon: float
    runs: int
    planned: int
    accuracy_mean: float | None
    accuracy_std: float | None
    epsilon_mean: float | None
    epsilon_std: float | None
    relative_accuracy: float | None
    ensemble_mean: float | None
    mia: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[SummaryRow]:
    """Group ``rows`` (from :func:`collect_rows`) by series and target ε; only finished runs
    with an accuracy count. Sorted by series, then ε (∞ last)."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["series"]), float(row["target_epsilon"])), []).append(row)
    finished = {key: [r for r in group if r.get("status") in FINISHED_STATUSES
                      and r.get("student_accuracy") is not None]
                for key, group in groups.items()}
    baselines = {series: mean_std(r["student_accuracy"] for r in group)[0]
                 for (series, epsilon), group in finished.items() if math.isinf(epsilon)}
    summary = []
    for (series, epsilon), group in sorted(finished.items()):
        accuracy = mean_std(r["student_accuracy"] for r in group)
        achieved = mean_std(r.get("epsilon") for r in group)
        baseline = baselines.get(series)
        relative = (accuracy[0] / baseline if accuracy[0] is not None and baseline else None)
        mia = {name: mean_std(r.get(name) for r in group)
               for name in ("mia_loss_auc", "mia_best_auc", "mia_best_tpr_at_1pct_fpr")}
        summary.append(SummaryRow(
            series=series, target_epsilon=epsilon, runs=len(group),
            planned=len(groups[(series, epsilon)]), accuracy_mean=accuracy[0],
            accuracy_std=accuracy[1], epsilon_mean=achieved[0], epsilon_std=achieved[1],
            relative_accuracy=relative,
            ensemble_mean=mean_std(r.get("ensemble_accuracy") for r in group)[0], mia=mia,
        ))
    return summary


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _csv_value(value: Any, column: str = "") -> str:
    if column == "target_epsilon" and isinstance(value, float):
        return format_epsilon(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    return str(value)


def _has_audit(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(row.get("audit") for row in rows)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One line per run (:data:`CSV_COLUMNS`, plus :data:`AUDIT_COLUMNS` when any run was
    audited); numbers in full precision, ε = ∞ as ``inf``, missing values empty."""
    columns = list(CSV_COLUMNS) + (list(AUDIT_COLUMNS) if _has_audit(rows) else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column), column) for column in columns])
    atomic_write_text(path, buffer.getvalue())


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _plus_minus(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "—"
    return _number(mean, digits) + (f" ± {std:.{digits}f}" if std is not None else "")


def _epsilon_label(value: float) -> str:
    return "∞" if math.isinf(value) else format_epsilon(value)


def _machine_line() -> str:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = "n/a"
    return (f"{platform.node() or 'unknown host'}: {platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch_version}")


def format_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    series_notes: Mapping[str, Mapping[str, Any]] | None = None,
    date: str | None = None,
    machine: str | None = None,
) -> str:
    """``sweep.md``: how it was made, the per-ε summary per series, then every run.

    ``series_notes`` maps a series to what its runs recorded (``commands``, ``forced``,
    ``aggregation``, ``devices``), from :func:`_series_notes`.
    """
    series_notes = series_notes or {}
    summary = summarize(rows)
    audited = _has_audit(rows)
    date = date or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Privacy sweep: student accuracy against ε", "",
             f"Written {date} on {machine or _machine_line()}.", ""]
    for series, notes in sorted(series_notes.items()):
        lines.append(f"**{series}**")
        for command in notes.get("commands", []):
            lines.append(f"- command: `{command}`")
        if notes.get("forced"):
            lines.append("- forced on every run of this series, ε = ∞ included: "
                         + ", ".join(f"`{o}`" for o in notes["forced"]))
        if notes.get("aggregation"):
            lines.append("- aggregation used: " + ", ".join(
                f"`{k}={v}`" for k, v in sorted(notes["aggregation"].items())))
        if notes.get("devices"):
            lines.append("- device: " + ", ".join(sorted(notes["devices"])))
        lines.append("")
    lines += [
        "ε = ∞ is the series' baseline without DP (`privacy.level: none`, every other override "
        "as in its DP runs). Achieved ε: the run's cumulative ε at δ from `report.json` (the "
        "worst owner's where each owner has its own; record level: the worst teacher's). "
        "Mean ± sample standard deviation (n − 1) over the seeds whose run finished "
        "(`completed` or `budget_exhausted`); relative = mean accuracy / mean accuracy of the "
        "same series at ε = ∞.",
        "",
        "## Summary",
        "",
    ]
    header = ["series", "target ε", "runs", "student accuracy", "achieved ε", "relative to ε = ∞",
              "teacher ensemble"]
    if audited:
        header += ["MIA loss AUC", "MIA best AUC", "MIA best TPR@1%FPR"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        cells = [s.series, _epsilon_label(s.target_epsilon), f"{s.runs}/{s.planned}",
                 _plus_minus(s.accuracy_mean, s.accuracy_std),
                 _plus_minus(s.epsilon_mean, s.epsilon_std, 3),
                 _number(s.relative_accuracy, 3), _number(s.ensemble_mean)]
        if audited:
            cells += [_plus_minus(*s.mia[name], 3)
                      for name in ("mia_loss_auc", "mia_best_auc", "mia_best_tpr_at_1pct_fpr")]
        lines.append("| " + " | ".join(cells) + " |")
    if not summary:
        lines.append("| " + " | ".join(["—"] * len(header)) + " |")
    lines += ["", "## Runs", ""]
    header = ["series", "target ε", "seed", "status", "student accuracy", "ensemble accuracy",
              "achieved ε", "δ", "rounds", "wall s"]
    if audited:
        header += ["MIA loss AUC", "MIA best AUC (attack)", "MIA best TPR@1%FPR"]
    header.append("run")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        rounds = (f"{row['rounds_completed']}/{row['rounds_total']}"
                  if row.get("rounds_completed") is not None else "—")
        achieved = row.get("epsilon")
        flag = ""
        if achieved is not None and math.isfinite(row["target_epsilon"]) and \
                achieved > row["target_epsilon"] * (1 + EPSILON_SLACK):
            flag = " (above target)"
        cells = [str(row["series"]), _epsilon_label(row["target_epsilon"]), str(row["seed"]),
                 str(row["status"]) + (f": {row['error']}" if row.get("error") else ""),
                 _number(row.get("student_accuracy")), _number(row.get("ensemble_accuracy")),
                 _number(achieved, 3) + flag,
                 "—" if row.get("delta") is None else f"{row['delta']:g}", rounds,
                 _number(row.get("wall_seconds"), 1)]
        if audited:
            best = _number(row.get("mia_best_auc"), 3)
            if row.get("mia_best_auc_attack"):
                best += f" ({row['mia_best_auc_attack']})"
            cells += [_number(row.get("mia_loss_auc"), 3), best,
                      _number(row.get("mia_best_tpr_at_1pct_fpr"), 3)]
        cells.append(f"`{row['run']}`" if row.get("run") else "—")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_epsilon(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Student accuracy against target ε (log axis), mean ± std over seeds, one curve per series.

    Each series' ε = ∞ baseline is a dashed horizontal line in the curve's colour; record-level
    series also show their teachers' ensemble accuracy (dotted), which DP-SGD changes with ε.
    """
    from matplotlib.ticker import FixedLocator, NullLocator

    from fed_dfkd.plots import _new_figure, _save_figure

    summary = summarize(rows)
    figure = _new_figure(width_px=760, height_px=480)
    axes = figure.add_subplot()
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                   "tab:olive", "tab:cyan"])
    ticks: set[float] = set()
    handles: list[Any] = []  # in series order: curve, teachers' ensemble, ∞ baseline
    for series in sorted({s.series for s in summary}):
        color = next(colors, "0.3")
        cells = [s for s in summary if s.series == series and s.accuracy_mean is not None]
        finite = [s for s in cells if math.isfinite(s.target_epsilon)]
        if finite:
            xs = [s.target_epsilon for s in finite]
            ticks.update(xs)
            handles.append(axes.errorbar(
                xs, [s.accuracy_mean for s in finite], yerr=[s.accuracy_std or 0.0 for s in finite],
                color=color, marker="o", markersize=4, linewidth=1.6, capsize=3, label=series))
            points = [(s.target_epsilon, s.ensemble_mean) for s in finite
                      if s.ensemble_mean is not None]
            if series.startswith("record") and points:
                handles += axes.plot(*zip(*points), color=color, linestyle=":", linewidth=1.2,
                                     marker=".", label=f"{series}: teachers' ensemble")
        for s in cells:
            if math.isinf(s.target_epsilon):
                handles.append(axes.axhline(s.accuracy_mean, color=color, linestyle="--",
                                            linewidth=1.2,
                                            label=f"{series}: ε = ∞ ({s.accuracy_mean:.3f})"))
    if ticks:
        axes.set_xscale("log")
        low, high = min(ticks), max(ticks)
        axes.set_xlim(low / 1.5, high * 1.5)
        axes.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([format_epsilon(t) for t in sorted(ticks)])
    if not handles:
        axes.text(0.5, 0.5, "no finished runs yet", transform=axes.transAxes, ha="center",
                  va="center", color="0.5", fontsize=14)
    values = [s.accuracy_mean for s in summary if s.accuracy_mean is not None]
    if values and all(0.0 <= v <= 1.0 for v in values):
        axes.set_ylim(0.0, 1.02)
    axes.set_title("Student accuracy against ε (mean ± std over seeds)")
    axes.set_xlabel("target ε (log scale)")
    axes.set_ylabel("student accuracy")
    axes.grid(True, alpha=0.3)
    if handles:
        axes.legend(handles=handles, loc="best", fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)


def _series_notes(out: Path) -> dict[str, dict[str, Any]]:
    """Per series: the sweep commands, forced overrides, aggregation and devices its runs used."""
    notes: dict[str, dict[str, Any]] = {}
    runs = out / RUNS_DIR
    if not runs.is_dir():
        return notes
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        spec = _read_json(run_dir / RUN_SPEC_NAME)
        if spec is None:
            continue
        entry = notes.setdefault(str(spec.get("series")), {"commands": [], "forced": [],
                                                           "aggregation": {}, "devices": set()})
        command = spec.get("command_line")
        if command and command not in entry["commands"]:
            entry["commands"].append(command)
        for override in spec.get("forced") or []:
            if override not in entry["forced"]:
                entry["forced"].append(override)
        entry["aggregation"].update(spec.get("aggregation") or {})
        device = (_read_json(run_dir / "report.json") or {}).get("device")
        if device:
            entry["devices"].add(str(device))
    return notes


def write_outputs(out: Path, *, plot: bool = True) -> list[dict[str, Any]]:
    """(Re)write ``sweep.csv``, ``sweep.md`` and, with ``plot``, the plot from every run in
    ``out/runs``; returns the rows."""
    rows = collect_rows(out)
    write_csv(out / SWEEP_CSV, rows)
    atomic_write_text(out / SWEEP_MD, format_markdown(rows, series_notes=_series_notes(out)))
    if plot:
        plot_accuracy_vs_epsilon(out / "plots" / PLOT_NAME, rows)
    return rows


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: run name -> ``reused``/``new``/``resumed``/``restarted``/
    ``failed``, and the rows of the table it wrote."""

    actions: dict[str, str]
    rows: list[dict[str, Any]]
    unfinished: list[str]


@dataclass
class _Prepared:
    run: PlannedRun
    directory: Path
    teachers: Path
    source: str
    teacher_names: list[str]
    record: dict[str, Any]
    config: Any  # ExperimentConfig


def _set_args(overrides: Sequence[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def _teachers_ready(folder: Path, names: Sequence[str], expected_hash: str) -> bool:
    for name in names:
        manifest = _read_json(folder / "teachers" / f"{name}.json")
        if manifest is None or manifest.get("config_hash") != expected_hash:
            return False
        if not (folder / "teachers" / f"{name}.pt").is_file():
            return False
    return True


def _prepare(spec: SweepSpec, out: Path) -> list[_Prepared]:
    """Load every run's config (bad overrides fail here, before any training) and check that
    the folders already there belong to the same experiment."""
    from fed_dfkd.config import load_config
    from fed_dfkd.data.teachers import teacher_config_hash
    from fed_dfkd.runtime import resume_key

    prepared = []
    for run in plan_sweep(spec):
        try:
            cfg = load_config(spec.config, run.overrides)
        except UserError as error:
            raise UserError(f"run {run.name}: {error}") from None
        source = cfg.distill.teacher_source if run.command == "distill" else "clients"
        names = (["central"] if source == "central"
                 else [f"client_{k}" for k in range(cfg.federation.num_clients)])
        teacher_hash = teacher_config_hash(cfg)
        if spec.teachers is not None:
            teachers = spec.teachers
            if not _teachers_ready(teachers, names, teacher_hash):
                raise UserError(
                    f"--teachers {teachers}: no {source} teachers trained under run {run.name}'s "
                    f"config (teacher config hash {teacher_hash}; seed {run.seed}); pretrain them "
                    "with that config and seed, or drop --teachers and let the sweep pretrain")
        else:
            teachers = out / TEACHER_CACHE_DIR / teacher_hash
        key = resume_key(cfg)
        directory = out / RUNS_DIR / run.name
        existing = _read_json(directory / RUN_SPEC_NAME)
        if directory.is_dir() and any(directory.iterdir()):
            if existing is None:
                raise UserError(f"{directory} exists and was not made by `fed-dfkd privacy sweep` "
                                "(no sweep_run.json); choose another --out")
            if existing.get("resume_key") != key or existing.get("command") != run.command:
                raise UserError(
                    f"{directory} holds a run of another experiment (its config or command differs "
                    f"from this sweep's: see {directory / 'config.resolved.yaml'}); rerun with the "
                    "same arguments, choose another --out, or delete that folder to redo it")
        record = {
            "name": run.name, "series": run.series, "level": run.level,
            "mechanism": run.mechanism, "command": run.command,
            "privacy_level": run.privacy_level,
            # null = ∞ (JSON has no infinity; every finite target is a number).
            "target_epsilon": None if math.isinf(run.target_epsilon) else run.target_epsilon,
            "seed": run.seed, "config": str(Path(spec.config).resolve()),
            "overrides": list(run.overrides), "forced": list(run.forced),
            "aggregation": {"distill.ensemble": cfg.distill.ensemble,
                            "federation.update_aggregation": cfg.federation.update_aggregation},
            "delta": cfg.privacy.delta if run.privacy_level != "none" else None,
            "accountant": cfg.privacy.accountant if run.privacy_level != "none" else None,
            "teachers_dir": str(teachers.resolve()), "teacher_names": names,
            "teacher_config_hash": teacher_hash, "resume_key": key,
            "command_line": spec.command_line,
            "error": None,
        }
        if existing is not None:
            # Keep where it came from; the error is refreshed by this attempt.
            record["command_line"] = existing.get("command_line") or spec.command_line
            record["error"] = existing.get("error")
        prepared.append(_Prepared(run=run, directory=directory, teachers=teachers, source=source,
                                  teacher_names=names, record=record, config=cfg))
    return prepared


def _epsilon_text(value: float | None) -> str:
    return "n/a" if value is None else ("∞" if math.isinf(value) else f"{value:.4g}")


def _accuracy_text(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def run_sweep(spec: SweepSpec, out: Path, *, execute: Executor) -> SweepOutcome:
    """Run the missing runs of ``spec`` into ``out`` and write the table and the plot.

    ``execute`` runs one ``fed-dfkd`` command line (``["simulate", "--config", ...]``) and
    returns its exit code; a :class:`UserError` it raises marks that run ``failed`` (the others
    still run, a rerun retries it). Everything else propagates. The table is rewritten after
    every run, the plot at the end (also when interrupted).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    prepared = _prepare(spec, out)  # every check before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out folder {out}: {error.strerror}") from None
    actions: dict[str, str] = {}
    total = len(prepared)
    try:
        for index, item in enumerate(prepared, start=1):
            actions[item.run.name] = _run_one(spec, item, execute=execute,
                                              label=f"run {index}/{total} {item.run.name}")
            write_outputs(out, plot=False)
    finally:
        rows = write_outputs(out)
    by_name = {Path(row["run"]).name: row for row in rows}
    unfinished = [item.run.name for item in prepared
                  if by_name.get(item.run.name, {}).get("status") not in FINISHED_STATUSES]
    return SweepOutcome(actions=actions, rows=rows, unfinished=unfinished)


def _run_one(spec: SweepSpec, item: _Prepared, *, execute: Executor, label: str) -> str:
    directory, run = item.directory, item.run
    state = run_state(directory)
    if state == "finished":
        report = _read_json(directory / "report.json") or {}
        audit = _maybe_audit(spec, item, execute=execute, label=label)
        logger.info("%s: reusing the finished run (%s); student accuracy %s, ε %s%s", label,
                    report.get("status") or "completed",
                    _accuracy_text(report.get("student_accuracy")),
                    _epsilon_text(achieved_epsilon(report, item.record)), audit)
        return "reused"
    if state == "restart":
        # No checkpoint: nothing to resume, and stale metrics lines must not mix into a new run.
        logger.info("%s: interrupted before its first checkpoint; deleting %s and starting again",
                    label, directory)
        shutil.rmtree(directory)
    elif state == "resume":
        report = _read_json(directory / "report.json") or {}
        logger.info("%s: resuming the interrupted run (%s of %s rounds done)", label,
                    report.get("rounds_completed", "?"), report.get("rounds_total", "?"))
    directory.mkdir(parents=True, exist_ok=True)
    record = dict(item.record, error=None)
    atomic_write_json(directory / RUN_SPEC_NAME, record)
    action = {"new": "new", "restart": "restarted", "resume": "resumed"}[state]
    started = time.perf_counter()
    try:
        if spec.teachers is None and not _teachers_ready(item.teachers, item.teacher_names,
                                                         item.record["teacher_config_hash"]):
            argv = ["pretrain", "--config", str(spec.config), "--out", str(item.teachers),
                    *_set_args(run.overrides)]
            if item.source == "central":
                argv += ["--central", "--no-clients"]
            code = execute(argv)
            if code != 0 or not _teachers_ready(item.teachers, item.teacher_names,
                                                item.record["teacher_config_hash"]):
                raise UserError(f"pretraining the teachers into {item.teachers} failed "
                                f"(exit {code})")
        argv = [run.command, "--config", str(spec.config), "--out", str(directory),
                "--teachers", str(item.teachers), *_set_args(run.overrides)]
        if run.command == "simulate":
            argv += ["--engine", spec.engine]
        if state == "resume":
            argv.append("--resume")
        code = execute(argv)
    except UserError as error:
        record["error"] = str(error)
        atomic_write_json(directory / RUN_SPEC_NAME, record)
        logger.error("%s: failed after %.1f s: %s", label, time.perf_counter() - started, error)
        return "failed"
    seconds = time.perf_counter() - started
    report = _read_json(directory / "report.json") or {}
    if not is_finished(report):
        logger.warning("%s: not finished after %.1f s (exit %d, status %s: %s); rerun the sweep "
                       "to resume it", label, seconds, code, report.get("status", "no report"),
                       report.get("stop_reason") or "see the log above")
        return action
    audit = _maybe_audit(spec, item, execute=execute, label=label)
    epsilon = achieved_epsilon(report, record)
    logger.info("%s: %s in %.1f s (%s); student accuracy %s, ε %s%s", label,
                report.get("status") or "completed", time.perf_counter() - started, action,
                _accuracy_text(report.get("student_accuracy")), _epsilon_text(epsilon), audit)
    target = run.target_epsilon
    if epsilon is not None and math.isfinite(target) and epsilon > target * (1 + EPSILON_SLACK):
        logger.warning("%s: achieved ε %.4g is above the target %s", label, epsilon,
                       format_epsilon(target))
    return action


def _maybe_audit(spec: SweepSpec, item: _Prepared, *, execute: Executor, label: str) -> str:
    """With ``--audit``: run ``fed-dfkd audit`` on a finished run that has no ``audit.json`` yet.

    Returns the text the run's log line ends with (empty without ``--audit``).
    """
    if not spec.audit:
        return ""
    path = item.directory / "audit.json"
    if not path.is_file():
        try:
            execute(["audit", "--run", str(item.directory), "--teachers", str(item.teachers),
                     "--device", item.config.runtime.device])
        except UserError as error:
            logger.error("%s: the audit failed: %s", label, error)
            return "; audit failed"
    columns = audit_columns(_read_json(path))
    return (f"; student MIA AUC {_epsilon_text(columns['mia_loss_auc'])} (loss attack), "
            f"{_epsilon_text(columns['mia_best_auc'])} ({columns['mia_best_auc_attack'] or 'n/a'}, "
            "the strongest)")
