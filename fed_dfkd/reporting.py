"""``report.json`` and the plots every training command writes (DESIGN.md §7).

Report keys (issue 2): ``method``, ``dataset``, ``num_clients``, ``dirichlet_alpha``,
``rounds_completed``, ``wall_seconds``, ``student_accuracy``, ``teacher_accuracies``,
``ensemble_accuracy``, ``best_teacher_accuracy``, ``agreement``, ``probability_loyalty`` and
``history`` (one dict per round with at least ``step`` and ``student_accuracy``), and
``per_class_accuracy`` (student and ensemble per test class). Accuracies are fractions in
[0, 1]. Later engines add their own keys through ``extra``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from fed_dfkd.config import ExperimentConfig, config_hash

# Per-round keys copied from metrics.jsonl into report["history"] (the full record stays in
# metrics.jsonl).
HISTORY_KEYS = (
    "step", "round", "student_accuracy", "agreement", "probability_loyalty", "generator_loss",
    "student_loss", "kd_loss", "mean_weight", "admitted_fraction", "pace", "seconds",
    "replies", "bytes", "epsilon", "student_accuracy_before_fit",
)


def last_evaluated(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    for record in reversed(history):
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def build_report(
    cfg: ExperimentConfig,
    *,
    history: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    teacher_accuracies: Sequence[float],
    ensemble_accuracy: float,
    extra: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    ensemble_per_class: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    accuracies = [r["student_accuracy"] for r in history if r.get("student_accuracy") is not None]
    student_accuracy = last_evaluated(history, "student_accuracy")
    best_teacher = max(teacher_accuracies) if teacher_accuracies else None
    report: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "num_clients": cfg.federation.num_clients,
        "dirichlet_alpha": cfg.data.dirichlet_alpha if cfg.data.partition == "dirichlet" else None,
        "partition": cfg.data.partition,
        "rounds_completed": len(history),
        "rounds_total": cfg.federation.rounds,
        "wall_seconds": wall_seconds,
        "student_accuracy": student_accuracy,
        "best_student_accuracy": max(accuracies) if accuracies else None,
        # The online student's accuracy when distill.final_fit_steps replaced it, else None.
        "student_accuracy_before_fit": last_evaluated(history, "student_accuracy_before_fit"),
        "teacher_accuracies": list(teacher_accuracies),
        "ensemble_accuracy": ensemble_accuracy,
        "best_teacher_accuracy": best_teacher,
        "student_to_teacher": (
            student_accuracy / best_teacher if student_accuracy is not None and best_teacher else None
        ),
        "student_to_ensemble": (
            student_accuracy / ensemble_accuracy
            if student_accuracy is not None and ensemble_accuracy else None
        ),
        "agreement": last_evaluated(history, "agreement"),
        "probability_loyalty": last_evaluated(history, "probability_loyalty"),
        "teacher_architecture": cfg.models.teacher,
        "student_architecture": cfg.models.student,
        "seed": cfg.runtime.seed,
        "config_hash": config_hash(cfg),
    }
    report["per_class_accuracy"] = per_class_report(history, class_names, ensemble_per_class)
    report.update(extra or {})
    report["history"] = [{k: r[k] for k in HISTORY_KEYS if k in r} for r in history]
    return report


def per_class_report(
    history: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None,
    ensemble_per_class: Sequence[float | None] | None,
) -> dict[str, Any] | None:
    """``report["per_class_accuracy"]``: the last evaluated student's accuracy on each class of
    the test split beside the teachers' ensemble's, with the class names; None before any
    evaluation (or when the evaluations carried no per-class accuracies)."""
    student = next((r["per_class_accuracy"] for r in reversed(history) if r.get("per_class_accuracy")), None)
    if student is None:
        return None
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(student))]
    return {"classes": names, "student": list(student),
            "ensemble": list(ensemble_per_class) if ensemble_per_class is not None else None}


def write_plots(
    plots_dir: Path,
    history: Sequence[Mapping[str, Any]],
    *,
    teacher_accuracy: float | None,
    ensemble_accuracy: float | None,
    samples: Any = None,
    sample_labels: Sequence[str] | None = None,
    epsilon_budget: float | None = None,
    per_class: Mapping[str, Any] | None = None,
) -> None:
    from fed_dfkd.plots import plot_accuracy, plot_curves, plot_epsilon, plot_per_class, save_image_grid

    plot_accuracy(plots_dir / "accuracy.png", list(history),
                  teacher_accuracy=teacher_accuracy, ensemble_accuracy=ensemble_accuracy)
    if any(r.get("mean_weight") is not None for r in history):
        plot_curves(plots_dir / "curriculum.png", list(history), x="step",
                    ys={"mean self-paced weight": "mean_weight", "admitted fraction": "admitted_fraction",
                        "adversarial weight": "weight_adversarial"},
                    title="Curriculum: what the student is paced on", ylabel="value", xlabel="round")
    if any(r.get("epsilon") is not None for r in history):
        plot_epsilon(plots_dir / "epsilon.png", list(history), epsilon_budget=epsilon_budget)
    if per_class is not None:
        plot_per_class(plots_dir / "per_class.png", per_class["classes"],
                       {"student": per_class["student"], "teacher ensemble": per_class["ensemble"]})
    if samples is not None:
        save_image_grid(plots_dir / "samples.png", samples, nrow=8,
                        labels=list(sample_labels) if sample_labels is not None else None)


def record_level_privacy(cfg: Any, manifests: Sequence[Any]) -> dict[str, Any]:
    """The report's privacy keys when the teachers themselves are the DP release (record level).

    Each owner's ε is its DP-SGD teacher's (and its summary release's), fixed before the first
    round: everything released later is post-processing. The federation's ε is the worst
    owner's. ``per_client_epsilon`` is keyed by partition id (``central`` for a central teacher).
    """
    if cfg.privacy.level != "record":
        return {"privacy_level": cfg.privacy.level,
                "epsilon": None, "delta": None, "accountant": None, "per_client_epsilon": {}}
    per_client = {}
    for manifest in manifests:
        privacy = getattr(manifest, "privacy", None) or {}
        key = "central" if manifest.partition_id is None else str(manifest.partition_id)
        per_client[key] = float(privacy["epsilon"]) if "epsilon" in privacy else None
    known = [e for e in per_client.values() if e is not None]
    return {
        "privacy_level": "record", "privacy_mechanism": "dp-sgd",
        "epsilon": max(known) if known else None, "delta": cfg.privacy.delta,
        "accountant": cfg.privacy.accountant, "per_client_epsilon": per_client,
        "secure_rng": False,
    }
