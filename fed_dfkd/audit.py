"""Membership-inference audit of a finished run (``fed-dfkd audit``; docs/audit.md).

An attacker holds a model's logits on an example ``(x, y)`` and guesses whether ``x`` was in the
training data of that model (a *member*) or not. Each attack here maps logits and the true label
to a score, higher meaning "more likely a member"; sweeping a threshold over the scores gives a
ROC curve, summarised by its AUC (0.5: no better than a coin) and by the true-positive rate at a
1 % false-positive rate (Carlini et al. 2022, "Membership Inference Attacks From First
Principles": what matters is confident inference on a few examples, not average accuracy).

Attacks (all without shadow models):

* ``loss``: Yeom et al. 2018, ``s = −CE(z, y) = log p_y``.
* ``mentr``: the modified entropy of Song & Mittal 2021, ``s = −Mentr(p, y)``.
* ``calibrated``: the logit-scaled confidence ``φ = log p_y − log(1 − p_y)``, standardised per
  class with the mean and standard deviation of φ on *reference* non-members, as the offline
  variant of LiRA (Carlini et al. 2022) with one Gaussian per class instead of per example.

Targets: the student (members: every owner's training images; the student never saw them, so
what it leaks went through the teachers) and every teacher the run used (members: its owner's
partition). Non-members are the held-out test split, which no model was trained on. It is cut
once, with a seeded generator, into a *reference* half (only used to fit the calibrated attack's
statistics, never scored) and an *evaluation* half (scored by every attack). Each target is
scored on as many members as non-members, with the same class histogram (both subsampled,
seeded, to at most ``max_examples``): an AUC of 0.5 is chance whatever the set sizes, and a
teacher of a non-IID owner is not "detected" merely because its owner's classes differ from the
test split's.

The metric and attack functions are pure (tensors or arrays in, numbers out). The driver at the
bottom reads a run folder (:func:`load_run`), runs the attacks (:func:`run_audit`) and writes
``audit.json``, ``audit.md`` and ``plots/audit_roc.png`` (:func:`write_audit`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fed_dfkd.errors import UserError
from fed_dfkd.registry import Registry

__all__ = [
    "ATTACKS",
    "AttackResult",
    "AuditTarget",
    "ClassStatistics",
    "LoadedRun",
    "RocCurve",
    "attack_model",
    "balanced_subsample",
    "class_matched_subsample",
    "calibrated_scores",
    "format_table",
    "load_run",
    "logit_confidence",
    "loss_scores",
    "modified_entropy_scores",
    "roc_auc",
    "roc_curve",
    "run_audit",
    "split_reference",
    "tpr_at_fpr",
    "write_audit",
]

logger = logging.getLogger(__name__)

#: The false-positive rate at which the TPR is reported.
LOW_FPR = 0.01
#: Classes with fewer reference non-members than this use the statistics of all classes.
MIN_CLASS_COUNT = 5
#: Floor of a standard deviation used to standardise φ (a class whose reference φ are all equal).
MIN_STD = 1e-6

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
AUDIT_PLOT = "audit_roc.png"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _check_scores(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_member)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and is_member must be 1-d of one length, got {s.shape} and {y.shape}")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_member must hold booleans or 0/1")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if y.all() or not y.any():
        raise ValueError("need at least one member and one non-member")
    return s, y


def roc_auc(scores: Any, is_member: Any) -> float:
    """Area under the ROC curve, ``AUC = P(s_m > s_n) + ½·P(s_m = s_n)``.

    ``s_m`` is the score of a random member, ``s_n`` of a random non-member. Computed as the
    Mann–Whitney statistic with mid-ranks for ties, ``(R_m − n_m(n_m + 1)/2) / (n_m·n_n)``,
    where ``R_m`` is the sum of the members' ranks: the area under the ROC curve drawn through
    every threshold, ties included (what ``sklearn.metrics.roc_auc_score`` gives).
    """
    s, y = _check_scores(scores, is_member)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of each distinct value's last copy
    mid_ranks = ends - (counts - 1) / 2.0
    ranks = mid_ranks[inverse.reshape(-1)]
    members = int(y.sum())
    non_members = y.size - members
    return float((ranks[y].sum() - members * (members + 1) / 2.0) / (members * non_members))


@dataclass(frozen=True)
class RocCurve:
    """ROC points, one per distinct score (by decreasing threshold), after ``(0, 0)``.

    Point ``i`` classifies ``s ≥ thresholds[i]`` as member; ``thresholds[0] = +inf``.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores: Any, is_member: Any) -> RocCurve:
    """The ROC curve through every distinct score (no point dropped; ties are one point)."""
    s, y = _check_scores(scores, is_member)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # The last position of each run of equal scores: everything up to it is called a member.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    true_positives = np.cumsum(y_sorted)[last]
    false_positives = last + 1 - true_positives
    members = int(y.sum())
    non_members = y.size - members
    return RocCurve(
        fpr=np.r_[0.0, false_positives / non_members],
        tpr=np.r_[0.0, true_positives / members],
        thresholds=np.r_[np.inf, s_sorted[last]],
    )


def tpr_at_fpr(curve: RocCurve, *, max_fpr: float = LOW_FPR) -> float:
    """The largest TPR among the curve's thresholds whose FPR is ≤ ``max_fpr`` (no interpolation).

    With ``n`` non-members this can only resolve FPRs in steps of ``1/n``: at 1 % it needs
    ``n ≥ 100`` to allow even one false positive.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    return float(curve.tpr[curve.fpr <= max_fpr].max())  # (0, 0) is always there


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with C >= 2, got {list(logits.shape)}")
    labels = torch.as_tensor(labels, dtype=torch.int64, device=logits.device)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [{logits.shape[0]}], got {list(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must be in [0, {logits.shape[1]})")
    # float64: confident models put p_y within 1e-8 of 1, where float32 rounds 1 − p_y to 0.
    return logits.detach().double(), labels


def loss_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """Loss attack (Yeom et al. 2018): ``s = −CE(z, y) = log softmax(z)_y``.

    Training drives the loss of members down, so a low loss (a high score) suggests a member.
    """
    z, y = _check_logits(logits, labels)
    return torch.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)


def _log_one_minus_softmax(z: Tensor) -> Tensor:
    """``log(1 − p_i)`` for ``p = softmax(z)``, without cancellation.

    ``log1p(−p_i)`` is exact for every class but the most likely one (``p_i ≤ ½``); for that one
    ``1 − p_i = Σ_{j≠i} p_j``, so ``log(1 − p_i) = logsumexp_{j≠i} z_j − logsumexp_j z_j``, which
    stays finite when ``p_i`` rounds to 1.
    """
    log_p = torch.log_softmax(z, dim=1)
    result = torch.log1p(-log_p.exp())
    top = z.argmax(dim=1, keepdim=True)
    others = z.scatter(1, top, float("-inf"))
    result.scatter_(1, top, (torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1))[:, None])
    return result


def modified_entropy_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """Modified-entropy attack (Song & Mittal 2021, Eq. 8): ``s = −Mentr(p, y)`` with

    ``Mentr(p, y) = −(1 − p_y)·log p_y − Σ_{i≠y} p_i·log(1 − p_i)``.

    Mentr is 0 for a confident, correct prediction and grows both with uncertainty and with
    confidence in a wrong class (which plain entropy misses), so a low Mentr suggests a member.
    One global threshold (swept by the ROC) instead of the paper's per-class thresholds from
    shadow models.
    """
    z, y = _check_logits(logits, labels)
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    log_q = _log_one_minus_softmax(z)  # log(1 − p_i)
    log_p_y = log_p.gather(1, y[:, None]).squeeze(1)
    log_q_y = log_q.gather(1, y[:, None]).squeeze(1)
    wrong = p * log_q  # p_i·log(1 − p_i); 0·(finite) where p_i underflows
    wrong_sum = wrong.sum(dim=1) - wrong.gather(1, y[:, None]).squeeze(1)
    mentr = -log_q_y.exp() * log_p_y - wrong_sum
    return -mentr


def logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit-scaled confidence (Carlini et al. 2022, Eq. 4): ``φ = log p_y − log(1 − p_y)``.

    Computed exactly as ``φ = z_y − logsumexp_{j≠y} z_j`` (since ``p_y/(1 − p_y) =
    e^{z_y} / Σ_{j≠y} e^{z_j}``), which stays finite where ``p_y`` rounds to 1. Unlike ``p_y``,
    φ is roughly Gaussian over training runs, which is what the calibration below assumes.
    """
    z, y = _check_logits(logits, labels)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, dim=1)


@dataclass(frozen=True)
class ClassStatistics:
    """Per-class mean and standard deviation of φ on non-members (the "OUT" Gaussians)."""

    mean: Tensor  # [C], float64
    std: Tensor  # [C], float64, ≥ MIN_STD
    counts: Tensor  # [C], reference examples per class

    @classmethod
    def fit(
        cls, phi: Tensor, labels: Tensor, *, num_classes: int, min_class_count: int = MIN_CLASS_COUNT
    ) -> "ClassStatistics":
        """μ_c, σ_c of ``phi`` over the examples of class c (σ with Bessel's correction).

        A class with fewer than ``min_class_count`` examples takes the statistics of all of them
        (the global Gaussian); σ is floored at ``MIN_STD``.
        """
        phi = phi.detach().double().cpu()
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if phi.numel() < 2:
            raise ValueError(f"need at least 2 reference non-members, got {phi.numel()}")
        global_mean, global_std = phi.mean(), phi.std()
        mean = torch.full((num_classes,), float(global_mean), dtype=torch.float64)
        std = torch.full((num_classes,), float(global_std), dtype=torch.float64)
        counts = torch.bincount(labels, minlength=num_classes)
        for c in range(num_classes):
            if counts[c] >= max(2, min_class_count):
                values = phi[labels == c]
                mean[c], std[c] = values.mean(), values.std()
        return cls(mean=mean, std=std.clamp_min(MIN_STD), counts=counts)

    def standardize(self, phi: Tensor, labels: Tensor) -> Tensor:
        """``(φ − μ_y) / σ_y``."""
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        return (phi.detach().double().cpu() - self.mean[labels]) / self.std[labels]


def calibrated_scores(
    logits: Tensor,
    labels: Tensor,
    *,
    reference_logits: Tensor,
    reference_labels: Tensor,
    min_class_count: int = MIN_CLASS_COUNT,
) -> Tensor:
    """Class-calibrated confidence: ``s = (φ(x, y) − μ_y) / σ_y``.

    ``φ`` is :func:`logit_confidence`; ``μ_c, σ_c`` are its mean and standard deviation over the
    reference non-members of class c (:class:`ClassStatistics`). Offline LiRA (Carlini et al.
    2022, §VI) compares φ with the Gaussian it would follow had x not been trained on; its
    one-sided likelihood ratio is monotone in this z-score. Here one Gaussian per class stands
    for the per-example ones (no shadow models), which removes the class's difficulty from the
    score: an example of a hard class with a high φ stands out. The reference examples must not
    be among the scored ones, or their own φ would sit in the statistics.
    """
    phi = logit_confidence(logits, labels)
    reference = logit_confidence(reference_logits, reference_labels)
    statistics = ClassStatistics.fit(reference, reference_labels, num_classes=logits.shape[1],
                                     min_class_count=min_class_count)
    return statistics.standardize(phi, labels)


AttackFn = Callable[..., Tensor]
#: name -> ``fn(logits, labels, *, reference_logits, reference_labels) -> scores [N]``.
ATTACKS: Registry[AttackFn] = Registry("membership attack")


@ATTACKS.register("loss")
def _loss_attack(logits: Tensor, labels: Tensor, **_: Any) -> Tensor:
    return loss_scores(logits, labels)


@ATTACKS.register("mentr")
def _mentr_attack(logits: Tensor, labels: Tensor, **_: Any) -> Tensor:
    return modified_entropy_scores(logits, labels)


@ATTACKS.register("calibrated")
def _calibrated_attack(
    logits: Tensor, labels: Tensor, *, reference_logits: Tensor, reference_labels: Tensor
) -> Tensor:
    return calibrated_scores(logits, labels, reference_logits=reference_logits,
                             reference_labels=reference_labels)


#: The order the attacks are run, reported and plotted in.
ATTACK_ORDER = ("loss", "mentr", "calibrated")


# --------------------------------------------------------------------------------------------
# Attacking one model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    """One attack on one target; :meth:`to_dict` is what ``audit.json`` holds."""

    auc: float
    tpr_at_low_fpr: float
    members: int
    non_members: int
    curve: RocCurve

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_low_fpr,
                "members": self.members, "non_members": self.non_members}


def split_reference(count: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Cut ``range(count)`` at random into a reference half and an evaluation half (disjoint).

    The reference half (``count // 2``) only fits the calibrated attack; the evaluation half is
    what every attack scores as non-members. Both come back sorted.
    """
    if count < 4:
        raise ValueError(f"need at least 4 non-members to split, got {count}")
    order = torch.randperm(count, generator=generator)
    half = count // 2
    return order[:half].sort().values, order[half:].sort().values


def balanced_subsample(
    members: Tensor, non_members: Tensor, *, max_examples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random subsets of equal size ``n = min(len(members), len(non_members), max_examples)``."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    n = min(len(members), len(non_members), max_examples)
    pick_m = torch.randperm(len(members), generator=generator)[:n]
    pick_n = torch.randperm(len(non_members), generator=generator)[:n]
    return members[pick_m].sort().values, non_members[pick_n].sort().values


def class_matched_subsample(
    members: Tensor,
    member_labels: Tensor,
    non_members: Tensor,
    non_member_labels: Tensor,
    *,
    max_examples: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Random subsets of members and non-members with the *same class histogram*.

    Class c contributes ``k_c = min(#members of c, #non-members of c)`` of each; if ``Σ k_c``
    exceeds ``max_examples`` every ``k_c`` is scaled down (largest remainders first, so the
    total is exactly ``max_examples``). Why: an owner's partition is non-IID, its teacher is
    confident on its own classes, and a non-member set with the test split's class mix would let
    every attack score the class instead of the membership: even a model that memorised nothing
    would look leaky.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    member_labels = torch.as_tensor(member_labels, dtype=torch.int64).cpu()
    non_member_labels = torch.as_tensor(non_member_labels, dtype=torch.int64).cpu()
    if member_labels.shape != members.shape or non_member_labels.shape != non_members.shape:
        raise ValueError("one label per member and per non-member")
    classes = 1 + max((int(t.max()) for t in (member_labels, non_member_labels) if t.numel()), default=-1)
    counts = torch.minimum(torch.bincount(member_labels, minlength=classes),
                           torch.bincount(non_member_labels, minlength=classes))
    total = int(counts.sum())
    if total > max_examples:
        exact = counts.double() * max_examples / total
        scaled = exact.floor().long()
        remainder = max_examples - int(scaled.sum())
        # Stable sort: equal remainders go to the lower class index, so the result is deterministic.
        order = torch.sort(exact - scaled, descending=True, stable=True).indices
        scaled[order[:remainder]] += 1
        counts = scaled
    picked_m, picked_n = [], []
    for c in range(classes):
        k = int(counts[c])
        if k == 0:
            continue
        pool_m = members[member_labels == c]
        pool_n = non_members[non_member_labels == c]
        picked_m.append(pool_m[torch.randperm(len(pool_m), generator=generator)[:k]])
        picked_n.append(pool_n[torch.randperm(len(pool_n), generator=generator)[:k]])
    if not picked_m:
        return members[:0], non_members[:0]
    return torch.cat(picked_m).sort().values, torch.cat(picked_n).sort().values


def attack_model(
    member_logits: Tensor,
    member_labels: Tensor,
    non_member_logits: Tensor,
    non_member_labels: Tensor,
    *,
    reference_logits: Tensor,
    reference_labels: Tensor,
    attacks: Sequence[str] = ATTACK_ORDER,
    max_fpr: float = LOW_FPR,
) -> dict[str, AttackResult]:
    """Every attack on one model, from its logits on members, non-members and reference."""
    logits = torch.cat([member_logits, non_member_logits])
    labels = torch.cat([torch.as_tensor(member_labels), torch.as_tensor(non_member_labels)])
    is_member = np.r_[np.ones(len(member_logits), bool), np.zeros(len(non_member_logits), bool)]
    results = {}
    for name in attacks:
        scores = ATTACKS.get(name)(logits, labels, reference_logits=reference_logits,
                                   reference_labels=reference_labels)
        scores = scores.cpu().numpy()
        curve = roc_curve(scores, is_member)
        results[name] = AttackResult(
            auc=roc_auc(scores, is_member), tpr_at_low_fpr=tpr_at_fpr(curve, max_fpr=max_fpr),
            members=len(member_logits), non_members=len(non_member_logits), curve=curve,
        )
    return results


# --------------------------------------------------------------------------------------------
# The driver: a run folder in, audit.json / audit.md / plots/audit_roc.png out
# --------------------------------------------------------------------------------------------


@dataclass
class AuditTarget:
    """A model to attack and the indices (into the train split) of its training images."""

    name: str
    kind: str  # "student" or "teacher"
    model: nn.Module
    member_indices: Tensor
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedRun:
    """What :func:`run_audit` needs from a run folder (:func:`load_run`)."""

    root: Path
    cfg: Any  # ExperimentConfig
    report: dict[str, Any]
    splits: Any  # DatasetSplits
    targets: list[AuditTarget]
    teachers_dir: Path
    privacy: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read ({error}); the run folder is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _student_state(checkpoint: Mapping[str, Any], path: Path) -> Mapping[str, Tensor]:
    # distill saves {"engine": CentralDistillation.state_dict()}, the federation
    # {"server": FederatedServer.state_dict()}; both hold the Coordinator's state.
    for key in ("engine", "server"):
        holder = checkpoint.get(key)
        if isinstance(holder, Mapping):
            coordinator = holder.get("coordinator")
            if isinstance(coordinator, Mapping) and isinstance(coordinator.get("student"), Mapping):
                # With distill.student_ema the average is the reported student: audit that one.
                trainer = coordinator.get("trainer")
                if isinstance(trainer, Mapping) and isinstance(trainer.get("ema"), Mapping):
                    return trainer["ema"]
                return coordinator["student"]
    raise UserError(f"checkpoint {path} holds no student weights (no engine/server coordinator "
                    "state); it was not written by `fed-dfkd distill` or `fed-dfkd simulate`")


def _privacy_info(cfg: Any, report: Mapping[str, Any], manifests: Sequence[Any]) -> dict[str, Any]:
    """The run's privacy level and ε as recorded.

    ``report.json``'s ``privacy`` (or top-level ``epsilon``, or the last round's) first; the
    config's level and δ otherwise. At record level without a recorded ε, the largest of the
    teachers' manifest ε (each owner's total), since every owner has its own guarantee.
    """
    recorded = report.get("privacy") if isinstance(report.get("privacy"), Mapping) else {}
    level = recorded.get("level", cfg.privacy.level)
    info: dict[str, Any] = {
        "level": level,
        "delta": recorded.get("delta", cfg.privacy.delta if level != "none" else None),
        "epsilon": recorded.get("epsilon", report.get("epsilon")),
    }
    if info["epsilon"] is None:
        epsilons = [r["epsilon"] for r in report.get("history") or []
                    if isinstance(r, Mapping) and r.get("epsilon") is not None]
        info["epsilon"] = epsilons[-1] if epsilons else None
    if info["epsilon"] is None and level == "record":
        owners = [m.privacy["epsilon"] for m in manifests
                  if isinstance(getattr(m, "privacy", None), Mapping) and "epsilon" in m.privacy]
        if owners:
            info["epsilon"] = max(float(e) for e in owners)
            info["epsilon_source"] = "largest teacher manifest epsilon"
    if level == "client":
        info["mechanism"] = recorded.get("mechanism", cfg.privacy.mechanism)
    return info


#: The keys of a DP teacher's ``manifest.privacy`` copied into ``audit.json`` (not the ledger).
_MANIFEST_PRIVACY_KEYS = ("level", "epsilon", "delta", "accountant", "noise_multiplier",
                          "max_grad_norm", "dpsgd_epsilon", "target_epsilon")


def _manifest_details(manifest: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"test_accuracy": manifest.test_accuracy}
    privacy = getattr(manifest, "privacy", None)  # None for a teacher trained without DP
    if isinstance(privacy, Mapping):
        details["privacy"] = {key: privacy[key] for key in _MANIFEST_PRIVACY_KEYS if key in privacy}
    return details


def load_run(
    run: Path | str, *, teachers_dir: Path | str | None = None, device: torch.device | str = "cpu"
) -> LoadedRun:
    """Read a run folder: its config, report, student, teachers, data and partitions.

    The teachers are looked for in ``teachers_dir``, else ``report.json``'s ``teachers_dir``
    when recorded, else the run folder itself (``DIR/teachers/``). The partitions are recomputed
    from the run's config exactly as ``pretrain_teachers`` made them, and checked against each
    teacher's manifest (:func:`_check_partition`). Every problem is a :class:`UserError`.
    """
    from fed_dfkd.config import ConfigError, load_config
    from fed_dfkd.coordinator import build_student
    from fed_dfkd.data import load_experiment_data, partition
    from fed_dfkd.data.teachers import load_teachers, teacher_config_hash
    from fed_dfkd.runs import RunDirectory

    root = Path(run)
    if not root.is_dir():
        raise UserError(f"--run {root}: no such folder")
    config_path = root / RunDirectory.CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"--run {root}: not a fed-dfkd run folder (no {RunDirectory.CONFIG_NAME})")
    checkpoints = root / "checkpoints"
    if not ((checkpoints / "last.pt").is_file() or (checkpoints / "previous.pt").is_file()):
        raise UserError(f"--run {root}: no checkpoint in {checkpoints}; the run has not completed "
                        "a round")
    try:
        cfg = load_config(config_path)
    except ConfigError as error:  # the file names itself only in its YAML errors
        raise UserError(f"{config_path}: {error} (edited by hand, or written by another version "
                        "of fed-dfkd?)") from None
    report = _read_json(root / RunDirectory.REPORT_NAME) or {}
    run_dir = RunDirectory(root)
    checkpoint = run_dir.load_checkpoint()
    assert checkpoint is not None  # a checkpoint file exists, checked above

    splits = load_experiment_data(cfg)
    info = splits.info
    with torch.random.fork_rng(devices=[]):  # build_student seeds the global generator
        student = build_student(cfg, info)
    try:
        student.load_state_dict(_student_state(checkpoint, run_dir.checkpoint_path))
    except (RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {run_dir.checkpoint_path}: the student's weights do not fit "
                        f"models.student={cfg.models.student!r} ({first})") from None
    student.to(device).eval()

    if teachers_dir is None and isinstance(report.get("teachers_dir"), str) and report["teachers_dir"]:
        teachers_dir = report["teachers_dir"]
    teachers_root = Path(teachers_dir) if teachers_dir is not None else root
    source = report.get("teacher_source") or cfg.distill.teacher_source
    if source not in ("clients", "central"):
        raise UserError(f"{root / RunDirectory.REPORT_NAME}: unknown teacher_source {source!r}")
    num_clients = cfg.federation.num_clients
    try:
        loaded = load_teachers(teachers_root, source=source, num_clients=num_clients, device=device)
    except UserError as error:
        raise UserError(f"the run's teachers: {error} (or pass --teachers DIR, the folder they "
                        "were pretrained into)") from None

    train_labels = splits.train_labels.cpu()
    expected_hash = teacher_config_hash(cfg)
    targets: list[AuditTarget] = []
    if source == "central":
        (model, manifest), = loaded
        members = torch.arange(len(train_labels))
        _check_partition(manifest, members, train_labels, info.num_classes, teachers_root,
                         expected_hash=expected_hash)
        targets.append(AuditTarget(manifest.name, "teacher", model, members, _manifest_details(manifest)))
    else:
        parts = partition(train_labels.numpy(), num_clients, scheme=cfg.data.partition,
                          alpha=cfg.data.dirichlet_alpha, seed=cfg.runtime.seed,
                          min_partition_size=cfg.data.min_partition_size)
        for (model, manifest), indices in zip(loaded, parts):
            members = torch.as_tensor(np.sort(np.asarray(indices)), dtype=torch.int64)
            _check_partition(manifest, members, train_labels, info.num_classes, teachers_root,
                             expected_hash=expected_hash)
            targets.append(AuditTarget(manifest.name, "teacher", model, members,
                                       _manifest_details(manifest)))
    union = torch.unique(torch.cat([t.member_indices for t in targets]))
    student_target = AuditTarget("student", "student", student, union,
                                 {"members_from": f"the {source} teachers' training images"})
    return LoadedRun(root=root, cfg=cfg, report=report, splits=splits,
                     targets=[student_target, *targets], teachers_dir=teachers_root,
                     privacy=_privacy_info(cfg, report, [manifest for _, manifest in loaded]))


def _check_partition(manifest: Any, members: Tensor, train_labels: Tensor, num_classes: int,
                     teachers_root: Path | str, *, expected_hash: str | None = None) -> None:
    """Refuse a teacher whose training set is not the partition recomputed from the run's config.

    The same :func:`~fed_dfkd.data.teachers.teacher_config_hash` proves it (the hash covers the
    data, the number of owners and the seed). Otherwise a non-private teacher's manifest must
    hold the partition's exact size and class histogram; a DP teacher's holds only noisy ones,
    so it cannot be checked and a warning says so.
    """
    if expected_hash is not None and manifest.config_hash == expected_hash:
        return
    if getattr(manifest, "privacy", None) is not None:
        logger.warning("teacher %s in %s was pretrained under another config (hash %s) and its "
                       "manifest holds only noisy counts: its partition cannot be checked",
                       manifest.name, teachers_root, manifest.config_hash)
        return
    histogram = torch.bincount(train_labels[members], minlength=num_classes).tolist()
    if manifest.train_size != len(members) or list(manifest.class_histogram) != histogram:
        raise UserError(
            f"teacher {manifest.name} in {teachers_root}: its training set ({manifest.train_size} "
            f"images) is not the partition the run's config gives ({len(members)} images); the "
            "teachers were pretrained under another data/partition/seed config; pass the right "
            "--teachers DIR"
        )


def _logits(model: nn.Module, images: Tensor, *, batch_size: int) -> Tensor:
    from fed_dfkd.data.teachers import predict_logits

    if len(images) == 0:
        raise ValueError("no images")
    return predict_logits(model, images, batch_size=batch_size)


def run_audit(
    run: LoadedRun,
    *,
    max_examples: int = 2000,
    seed: int = 0,
    attacks: Sequence[str] = ATTACK_ORDER,
    match_classes: bool = True,
    batch_size: int = 512,
) -> dict[str, dict[str, AttackResult]]:
    """Attack every target of ``run``: target name -> attack name -> result.

    The test split is cut once into reference and evaluation halves (:func:`split_reference`,
    seeded by ``seed``); each target's members and evaluation non-members are subsampled to one
    size, with one class histogram (:func:`class_matched_subsample`; :func:`balanced_subsample`
    without ``match_classes``), from a stream derived from ``seed`` and the target's name, so
    adding a target changes no other's sample.
    """
    from fed_dfkd.seeding import make_rng

    for name in attacks:
        ATTACKS.get(name)  # an unknown name fails before any model runs
    splits = run.splits
    test_images, test_labels = splits.test_images, splits.test_labels.cpu()
    try:
        reference, evaluation = split_reference(len(test_labels), generator=make_rng(seed, "audit-reference"))
    except ValueError as error:
        raise UserError(f"the test split is too small to audit: {error}") from None
    results: dict[str, dict[str, AttackResult]] = {}
    train_labels = splits.train_labels.cpu()
    for target in run.targets:
        generator = make_rng(seed, "audit-sample", target.name)
        if match_classes:
            members, non_members = class_matched_subsample(
                target.member_indices, train_labels[target.member_indices], evaluation,
                test_labels[evaluation], max_examples=max_examples, generator=generator,
            )
        else:
            members, non_members = balanced_subsample(target.member_indices, evaluation,
                                                      max_examples=max_examples, generator=generator)
        if len(members) == 0:
            raise UserError(f"target {target.name}: no class has both training images and held-out "
                            "test images; nothing to compare")
        results[target.name] = attack_model(
            _logits(target.model, splits.train_images[members], batch_size=batch_size),
            train_labels[members],
            _logits(target.model, test_images[non_members], batch_size=batch_size),
            test_labels[non_members],
            reference_logits=_logits(target.model, test_images[reference], batch_size=batch_size),
            reference_labels=test_labels[reference],
            attacks=attacks,
        )
        logger.info("audit %s: %s", target.name, ", ".join(
            f"{name} AUC {r.auc:.3f}" for name, r in results[target.name].items()))
    return results


def audit_document(
    run: LoadedRun,
    results: Mapping[str, Mapping[str, AttackResult]],
    *,
    max_examples: int,
    seed: int,
    match_classes: bool = True,
) -> dict[str, Any]:
    """The content of ``audit.json``."""
    targets = {}
    for target in run.targets:
        entry: dict[str, Any] = {"kind": target.kind,
                                 "member_pool": int(len(target.member_indices))}
        entry.update(target.details)
        entry["attacks"] = {name: r.to_dict() for name, r in results[target.name].items()}
        targets[target.name] = entry
    test_size = len(run.splits.test_labels)
    return {
        "run": str(run.root),
        "teachers_dir": str(run.teachers_dir),
        "dataset": run.cfg.data.dataset,
        "method": run.report.get("method", run.cfg.method.name),
        "student_accuracy": run.report.get("student_accuracy"),
        "privacy": run.privacy,
        "seed": seed,
        "max_examples": max_examples,
        "low_fpr": LOW_FPR,
        "class_matched": match_classes,
        "reference_non_members": test_size // 2,
        "non_member_pool": test_size - test_size // 2,
        "attacks": list(next(iter(results.values())).keys()) if results else [],
        "targets": targets,
    }


def format_table(results: Mapping[str, Mapping[str, AttackResult]], *, markdown: bool = False) -> str:
    """One row per (target, attack): AUC, TPR at 1 % FPR and the set sizes."""
    header = ["target", "attack", "AUC", "TPR@1%FPR", "members", "non-members"]
    rows = [[target, name, f"{r.auc:.3f}", f"{r.tpr_at_low_fpr:.3f}", str(r.members), str(r.non_members)]
            for target, by_attack in results.items() for name, r in by_attack.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in [header, *rows])


def _markdown(document: Mapping[str, Any], results: Mapping[str, Mapping[str, AttackResult]]) -> str:
    privacy = document["privacy"]
    level = privacy.get("level") or "none"
    epsilon = privacy.get("epsilon")
    shown = f"level {level}" + (f", ε = {epsilon:.3g} at δ = {privacy.get('delta')}"
                                if isinstance(epsilon, (int, float)) and math.isfinite(epsilon) else "")
    lines = [
        f"# Membership-inference audit of `{document['run']}`",
        "",
        f"Dataset {document['dataset']}, method {document['method']}; privacy: {shown}.",
        f"Members: each target's training images; non-members: held-out test images "
        f"({document['non_member_pool']} scored, {document['reference_non_members']} reference "
        f"for the calibrated attack); as many members as non-members"
        f"{', class-matched' if document['class_matched'] else ''}, at most "
        f"{document['max_examples']} each, seed "
        f"{document['seed']}. AUC 0.5 = chance. See docs/audit.md.",
        "",
        format_table(results, markdown=True),
        "",
    ]
    return "\n".join(lines)


def _plot_roc(path: Path, results: Mapping[str, Mapping[str, AttackResult]]) -> None:
    """One log-log panel per attack, one ROC curve per target, with the chance diagonal."""
    from fed_dfkd.plots import _new_figure, _save_figure

    attacks = list(next(iter(results.values())).keys())
    figure = _new_figure(width_px=380 * len(attacks), height_px=400)
    smallest = min(r.non_members for by_attack in results.values() for r in by_attack.values())
    floor = 0.5 / max(1, smallest)  # below one false positive: where FPR 0 is drawn
    for index, name in enumerate(attacks):
        axes = figure.add_subplot(1, len(attacks), index + 1)
        axes.plot([floor, 1.0], [floor, 1.0], linestyle="--", color="0.5", linewidth=1.0,
                  label="chance")
        for target, by_attack in results.items():
            r = by_attack[name]
            axes.plot(np.maximum(r.curve.fpr, floor), np.maximum(r.curve.tpr, floor),
                      drawstyle="steps-post", linewidth=1.4, label=f"{target} ({r.auc:.2f})")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlim(floor, 1.0)
        axes.set_ylim(floor, 1.0)
        axes.axvline(LOW_FPR, color="tab:red", linestyle=":", linewidth=1.0, label="FPR 1 %")
        axes.set_title(f"{name} attack")
        axes.set_xlabel("false-positive rate")
        if index == 0:
            axes.set_ylabel("true-positive rate")
        axes.grid(True, which="both", alpha=0.25)
        axes.legend(loc="lower right", fontsize=7, title="target (AUC)", title_fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)


def write_audit(
    run: LoadedRun,
    results: Mapping[str, Mapping[str, AttackResult]],
    *,
    max_examples: int,
    seed: int,
    match_classes: bool = True,
) -> dict[str, Any]:
    """Write ``audit.json``, ``audit.md`` and ``plots/audit_roc.png``; returns the JSON document."""
    from fed_dfkd.runs import atomic_write_json, atomic_write_text

    document = audit_document(run, results, max_examples=max_examples, seed=seed,
                              match_classes=match_classes)
    atomic_write_json(run.root / AUDIT_JSON, document)
    atomic_write_text(run.root / AUDIT_MD, _markdown(document, results))
    _plot_roc(run.root / "plots" / AUDIT_PLOT, results)
    return document
