"""Teacher pretraining: one classifier per data owner's partition (``fed-dfkd pretrain``).

Each owner k trains a private teacher T_k on its partition of the train split (DESIGN.md §1);
optionally a *central* teacher is trained on the whole train split, the non-federated reference.
Teachers take images in [0, 1]: the dataset's normalisation is a layer inside the saved model
(:class:`~fed_dfkd.models.normalized.NormalizedClassifier`).

On disk, under ``OUT/teachers/``::

    client_{k}.pt     {"manifest": dict, "state_dict": NormalizedClassifier state,
                       "feature_statistics": dict (DP teachers with a summary release only)}
    client_{k}.json   the same manifest, readable without torch; the cache key
    central.pt/.json  the central teacher, when asked for
    partitions.json   every client's partition size and class histogram (the simulation's
                      ground truth, not something an owner releases)

A teacher whose manifest carries the current :func:`teacher_config_hash` is reused instead of
retrained. Training is plain cross-entropy, min_θ (1/N) Σ_i CE(T_θ(x_i), y_i), over whole
in-memory tensors (no data-loader workers: indexing a tensor is faster for data this size).

With ``privacy.level: record`` every teacher (the central one too) is trained with DP-SGD
instead (:mod:`fed_dfkd.privacy.dpsgd`; BatchNorm becomes GroupNorm) and, with
``privacy.summary``, its owner releases private feature statistics and a noisy class histogram
(:mod:`fed_dfkd.privacy.feature_statistics`). The manifest then carries the noisy histogram and
count, never the exact ones, and ``privacy`` holds the owner's ledger and its total ε.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_dfkd.adversarial import pgd_l2, recalibrate_batchnorm
from fed_dfkd.augment import random_shift
from fed_dfkd.config import ExperimentConfig, PretrainConfig, config_hash, config_to_dict
from fed_dfkd.errors import UserError
from fed_dfkd.losses.bn_statistics import num_channels
from fed_dfkd.metrics import accuracy
from fed_dfkd.models import build_classifier, to_memory_format
from fed_dfkd.models.normalized import NormalizedClassifier, freeze
from fed_dfkd.registry import UnknownNameError
from fed_dfkd.runs import atomic_torch_save, atomic_write_json

__all__ = [
    "PRIVACY_KEYS",
    "TeacherManifest",
    "teacher_config_hash",
    "teacher_seed",
    "train_classifier",
    "predict_logits",
    "evaluate_accuracy",
    "pretrain_teachers",
    "teacher_path",
    "load_teacher",
    "load_teachers",
    "TEACHERS_DIR",
    "PARTITIONS_FILE",
]

logger = logging.getLogger(__name__)

#: Sub-folder of ``--out`` that holds the teachers.
TEACHERS_DIR = "teachers"
PARTITIONS_FILE = "partitions.json"

#: Largest random shift, in pixels, of the light augmentation (``models.pretrain.augment``).
_MAX_SHIFT = 2


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass
class TeacherManifest:
    """What is known about a teacher without its weights (DESIGN.md §5 ``TeacherManifest``).

    ``partition_id`` is the owner's index, ``None`` for the central teacher; ``test_accuracy`` is
    a fraction in [0, 1] on the coordinator's test split; ``config_hash`` is
    :func:`teacher_config_hash` of the config it was trained under.

    ``privacy`` is ``None`` for a non-private teacher. For a record-level DP teacher it holds
    (:data:`PRIVACY_KEYS`) the owner's total ``epsilon`` at ``delta`` by ``accountant`` over
    everything it releases, DP-SGD's ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``
    and ``steps``, the ``summary_noise_multiplier`` (``None``: no summary release), and the
    ledger itself as ``history`` (:meth:`~fed_dfkd.privacy.Accountant.state_dict`). Then
    ``train_size`` and ``class_histogram`` are the noisy released values (``0`` and ``[]`` when
    nothing was released) and ``history`` holds only each epoch's number and learning rate:
    training loss and accuracy are computed from the private records without noise.
    """

    architecture: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    dataset: str
    partition_id: int | None
    num_clients: int
    train_size: int
    class_histogram: list[int]
    test_accuracy: float
    config_hash: str
    created_at: str
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """``client_{k}`` or ``central``: the file stem and the name in logs and tables."""
        return "central" if self.partition_id is None else f"client_{self.partition_id}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> TeacherManifest:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming the field for anything malformed."""
        if not isinstance(raw, dict):
            raise ValueError(f"a teacher manifest is a mapping, got {type(raw).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"unknown manifest field(s): {', '.join(map(str, unknown))}")
        optional = {"history", "privacy"}
        missing = [name for name in names if name not in raw and name not in optional]
        if missing:
            raise ValueError(f"manifest is missing field(s): {', '.join(missing)}")
        values = dict(raw)
        for name in ("num_classes", "in_channels", "image_size", "num_clients", "train_size"):
            values[name] = _expect_int(values[name], name)
        if values["partition_id"] is not None:
            values["partition_id"] = _expect_int(values["partition_id"], "partition_id")
        for name in ("architecture", "dataset", "config_hash", "created_at"):
            if not isinstance(values[name], str):
                raise ValueError(f"manifest field {name} must be a string, got {values[name]!r}")
        for name in ("test_accuracy", "wall_seconds"):
            if isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
                raise ValueError(f"manifest field {name} must be a number, got {values[name]!r}")
            values[name] = float(values[name])
        for name in ("mean", "std"):
            values[name] = [float(v) for v in _expect_list(values[name], name)]
        values["class_names"] = [str(v) for v in _expect_list(values["class_names"], "class_names")]
        histogram = _expect_list(values["class_histogram"], "class_histogram")
        values["class_histogram"] = [_expect_int(v, "class_histogram") for v in histogram]
        values["history"] = list(_expect_list(values.get("history", []), "history"))
        values["privacy"] = _check_privacy(values.get("privacy"))
        # A DP teacher whose owner released no summary has no histogram to show.
        no_histogram = values["privacy"] is not None and not values["class_histogram"]
        if len(values["class_histogram"]) != values["num_classes"] and not no_histogram:
            raise ValueError(
                f"class_histogram has {len(values['class_histogram'])} entries, "
                f"expected num_classes = {values['num_classes']}"
            )
        return cls(**values)


#: Keys every DP teacher's ``manifest.privacy`` has (the reports read them).
PRIVACY_KEYS = (
    "level", "epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate",
    "steps", "history", "summary_noise_multiplier", "summary_clip", "dpsgd_epsilon",
    "target_epsilon", "secure_rng",
)


def _check_privacy(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"manifest field privacy must be a mapping or null, got {raw!r}")
    missing = [key for key in PRIVACY_KEYS if key not in raw]
    if missing:
        raise ValueError(f"manifest field privacy is missing {', '.join(missing)}")
    values = dict(raw)
    for key in ("epsilon", "dpsgd_epsilon"):
        # The JSON copy writes ε = ∞ (no noise) as null.
        value = values[key]
        if value is None:
            values[key] = math.inf
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"manifest field privacy.{key} must be a number, got {value!r}")
        else:
            values[key] = float(value)
    if not isinstance(values["history"], dict):
        raise ValueError("manifest field privacy.history must be an accountant state (a mapping)")
    return values


def _expect_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"manifest field {name} must be an integer, got {value!r}")
    return value


def _expect_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"manifest field {name} must be a list, got {value!r}")
    return list(value)


#: The ``privacy`` fields that shape a record-level DP teacher (and its summary release).
_RECORD_PRIVACY_FIELDS = (
    "level", "delta", "accountant", "target_epsilon", "noise_multiplier", "max_grad_norm",
    "summary", "summary_noise_multiplier", "summary_clip",
)


def teacher_config_hash(cfg: ExperimentConfig) -> str:
    """Hash of exactly the config parts that determine a teacher.

    The ``data`` section (but not ``eval_batch_size``, which changes no result),
    ``models.teacher``, ``models.pretrain``, ``federation.num_clients`` (it shapes the
    partitions) and ``runtime.seed``; with ``privacy.level: record`` also the DP-SGD and summary
    settings (so a non-DP teacher is never reused for a DP config, nor the other way round).
    Changing anything else (method, distillation, rounds, client-level privacy) keeps the cached
    teachers.
    """
    data = config_to_dict(cfg.data)
    data.pop("eval_batch_size")
    payload: dict[str, Any] = {
        "data": data,
        "teacher": cfg.models.teacher,
        "pretrain": _pretrain_for_hash(cfg),
        "num_clients": cfg.federation.num_clients,
        "seed": cfg.runtime.seed,
    }
    if cfg.privacy.level == "record":
        # Only then: non-private configs keep the hashes (and caches) they always had.
        payload["privacy"] = {name: getattr(cfg.privacy, name) for name in _RECORD_PRIVACY_FIELDS}
    return config_hash(payload)


def _pretrain_for_hash(cfg: ExperimentConfig) -> dict[str, Any]:
    """``models.pretrain`` as hashed: the adversarial keys only when adversarial training is on,
    so the configs without it keep the hashes (and cached teachers) they had before it existed."""
    pretrain = config_to_dict(cfg.models.pretrain)
    if not cfg.models.pretrain.adversarial_epsilon:
        pretrain.pop("adversarial_epsilon")
        pretrain.pop("adversarial_steps")
    return pretrain


def teacher_seed(seed: int, partition_id: int | None) -> int:
    """Seed of one teacher's initialisation and shuffling, derived from ``runtime.seed``.

    Distinct per owner (and for the central teacher), so teachers are not initialised alike.
    """
    stream = 0 if partition_id is None else partition_id + 1
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def _batch_bounds(size: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each batch; a last batch of one joins the one before it.

    A one-image batch gives BatchNorm statistics from a single image and a very noisy step.
    """
    bounds = [(start, min(start + batch_size, size)) for start in range(0, size, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], size)
        bounds.pop()
    return bounds


def _make_optimizer(parameters: Any, config: PretrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; valid: adam, sgd")


def _learning_rate(config: PretrainConfig, step: int, total_steps: int) -> float:
    """lr at step t of T: constant, or lr·½(1 + cos(π·t/T)) with ``lr_schedule: cosine``."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return config.lr


def _check_images(images: Tensor, labels: Tensor | None = None) -> None:
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    config: PretrainConfig,
    seed: int,
    device: torch.device | str,
    progress_desc: str | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with cross-entropy, min_θ (1/N) Σ_i CE(model(x_i), y_i).

    ``images`` are whatever the model takes (for teachers: [0, 1] images, the model normalises).
    Shuffling and augmentation draw from a ``torch.Generator`` seeded with ``seed``. Adam or SGD
    per ``config.optimizer``; with ``lr_schedule: cosine`` the learning rate follows
    lr·½(1 + cos(π·t/T)) over the T steps of training. ``config.augment`` shifts each image by up
    to 2 pixels. With ``config.adversarial_epsilon`` ε > 0 each (augmented) batch is replaced by
    its ``adversarial_steps``-step L2 PGD attack of radius ε (:func:`pgd_l2`), min_θ
    (1/N) Σ_i max_{‖δ‖₂ ≤ ε} CE(model(x_i + δ), y_i), and after the last epoch the BatchNorm
    running statistics are re-estimated on the clean images (:func:`recalibrate_batchnorm`).
    ``progress_desc`` names a progress bar over epochs, shown on a terminal only.

    Returns one record per epoch: ``epoch``, ``loss`` and ``accuracy`` (means over the epoch's
    training batches as trained on, so on the attacked batches under adversarial training) and
    ``lr`` (at the epoch's last step).
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    _check_images(images, labels)
    device = torch.device(device)
    model.to(device)
    model.train()
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _make_optimizer(model.parameters(), config)

    size = images.shape[0]
    batches_per_epoch = len(_batch_bounds(size, config.batch_size))
    total_steps = config.epochs * batches_per_epoch
    step = 0
    history: list[dict[str, float]] = []
    epochs: Any = range(config.epochs)
    if progress_desc is not None:
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, nothing in a log file.
        epochs = tqdm(epochs, desc=progress_desc, unit="epoch", leave=False, disable=None)
    for epoch in epochs:
        order = torch.randperm(size, generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for start, end in _batch_bounds(size, config.batch_size):
            if config.lr_schedule == "cosine":
                lr = _learning_rate(config, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            index = order[start:end]
            batch, targets = images[index], labels[index]
            if config.augment:
                batch = random_shift(batch, max_shift=_MAX_SHIFT, generator=generator)
            if config.adversarial_epsilon > 0:
                batch = pgd_l2(model, batch, targets, epsilon=config.adversarial_epsilon,
                               steps=config.adversarial_steps)
            logits = model(batch)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * (end - start)
            correct += int((logits.detach().argmax(dim=1) == targets).sum())
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / size,
            "accuracy": correct / size,
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        if not math.isfinite(record["loss"]):
            raise UserError(
                f"teacher training diverged (loss {record['loss']}) in epoch {epoch + 1}; "
                f"lower models.pretrain.lr (now {config.lr})"
            )
        history.append(record)
        # INFO: one line per epoch in logs, so a long teacher shows that it moves.
        logger.info(
            "%s epoch %d/%d: loss %.4f, train accuracy %.4f, lr %.3g",
            progress_desc or "training", epoch + 1, config.epochs, record["loss"],
            record["accuracy"], record["lr"],
        )
    if config.adversarial_epsilon > 0:
        # The BN prior matches these statistics: those of the real images, not of the attacks.
        recalibrate_batchnorm(model, (images[start:end] for start, end in
                                      _batch_bounds(size, config.batch_size)))
    return history


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def predict_logits(model: nn.Module, images: Tensor, *, batch_size: int) -> Tensor:
    """Logits [N, C] of ``model`` on ``images``, in eval mode and without gradient, on the CPU.

    Batches go to the model's device; the model's train/eval mode is restored afterwards.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = [
                model(images[start : start + batch_size].to(device)).float().cpu()
                for start in range(0, images.shape[0], batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``images``; see :func:`predict_logits`."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return accuracy(predict_logits(model, images, batch_size=batch_size), labels.cpu())


# --------------------------------------------------------------------------------------------
# Pretraining all teachers
# --------------------------------------------------------------------------------------------


def teacher_path(out_dir: Path | str, partition_id: int | None) -> Path:
    """``OUT/teachers/client_{k}.pt``, or ``OUT/teachers/central.pt`` for ``None``."""
    name = "central" if partition_id is None else f"client_{partition_id}"
    return Path(out_dir) / TEACHERS_DIR / f"{name}.pt"


def _resolve_device(name: str) -> torch.device:
    from fed_dfkd.runtime import checked_device

    return checked_device(name, "runtime.device")


def _cached_manifest(path: Path, *, expected_hash: str, partition_id: int | None) -> TeacherManifest | None:
    """The manifest next to ``path`` if it is there, readable and made by the same config."""
    json_path = path.with_suffix(".json")
    if not (path.is_file() and json_path.is_file()):
        return None
    try:
        manifest = TeacherManifest.from_dict(json.loads(json_path.read_text()))
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s); training that teacher again", json_path, error)
        return None
    if manifest.config_hash != expected_hash or manifest.partition_id != partition_id:
        logger.info(
            "%s was trained under another config (hash %s, now %s); training it again",
            path, manifest.config_hash, expected_hash,
        )
        return None
    return manifest


def _train_one_teacher(
    cfg: ExperimentConfig,
    splits: Any,
    indices: np.ndarray | None,
    *,
    partition_id: int | None,
    expected_hash: str,
    device: torch.device,
) -> tuple[NormalizedClassifier, TeacherManifest, dict[str, Any] | None, dict[str, Any] | None]:
    """Train one teacher; returns it, its manifest, (DP teachers) its released feature statistics
    and (other teachers) its per-class statistics (:func:`class_feature_statistics`)."""
    info = splits.info
    if indices is None:
        images, labels = splits.train_images, splits.train_labels
    else:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images, labels = splits.train_images[index], splits.train_labels[index]
    seed = teacher_seed(cfg.runtime.seed, partition_id)
    name = "central" if partition_id is None else f"client_{partition_id}"
    started = time.perf_counter()
    # The architectures initialise from the global RNG; fork it so that seeding here leaves the
    # caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_classifier(
            cfg.models.teacher,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
        )
    model = NormalizedClassifier(to_memory_format(net, cfg.runtime.memory_format), info.mean, info.std)
    statistics: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    if cfg.privacy.level == "record":
        model, history, privacy, statistics = _train_private_teacher(
            cfg, model, images, labels, seed=seed, device=device, name=name,
            num_classes=info.num_classes,
        )
        if statistics is not None:
            train_size = max(int(round(statistics["count"])), 0)
            histogram = list(statistics["class_histogram"])
        else:
            train_size, histogram = 0, []  # nothing released: unknown
    else:
        history = train_classifier(
            model, images, labels, config=cfg.models.pretrain, seed=seed, device=device,
            progress_desc=f"teacher {name}",
        )
        train_size = int(labels.shape[0])
        histogram = torch.bincount(labels, minlength=info.num_classes).tolist()
    test_accuracy = evaluate_accuracy(
        model, splits.test_images, splits.test_labels, batch_size=cfg.data.eval_batch_size
    )
    class_statistics = None if cfg.privacy.level == "record" else class_feature_statistics(
        model, images, labels, num_classes=info.num_classes, batch_size=cfg.data.eval_batch_size)
    wall_seconds = time.perf_counter() - started
    manifest = TeacherManifest(
        architecture=cfg.models.teacher,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size,
        mean=[float(v) for v in info.mean],
        std=[float(v) for v in info.std],
        class_names=[str(v) for v in info.class_names],
        dataset=info.name,
        partition_id=partition_id,
        num_clients=cfg.federation.num_clients,
        train_size=train_size,
        class_histogram=[int(v) for v in histogram],
        test_accuracy=test_accuracy,
        config_hash=expected_hash,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(wall_seconds, 3),
        history=history,
        privacy=privacy,
    )
    return model, manifest, statistics, class_statistics


def _train_private_teacher(
    cfg: ExperimentConfig,
    model: NormalizedClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    seed: int,
    device: torch.device,
    name: str,
    num_classes: int,
) -> tuple[NormalizedClassifier, list[dict[str, float]], dict[str, Any], dict[str, Any] | None]:
    """Record level: DP-SGD, then the summary release, both in one ledger (docs/privacy.md).

    σ is ``privacy.noise_multiplier``, or calibrated so that the ledger's total ε (DP-SGD steps
    plus the summary release) is ``privacy.target_epsilon``. Returns the trained model, its
    per-epoch history (epoch and lr only), the manifest's ``privacy`` entry and the feature
    statistics' state dict (``None`` without ``privacy.summary``).
    """
    # Imported here: Opacus is only needed (and only paid for) by private teachers.
    from fed_dfkd.privacy import (
        calibrate_noise_multiplier,
        dp_sgd_sample_rate,
        make_accountant,
        make_dp_compatible,
        release_feature_statistics,
        train_dp_sgd,
    )
    from fed_dfkd.seeding import make_rng

    privacy, pretrain = cfg.privacy, cfg.models.pretrain
    try:
        model = make_dp_compatible(model)
    except ValueError as error:
        raise UserError(f"models.teacher {cfg.models.teacher!r} cannot be trained with DP-SGD "
                        f"(privacy.level record): {error}") from None
    size = int(labels.shape[0])
    sample_rate = dp_sgd_sample_rate(size, pretrain.batch_size)
    steps = pretrain.epochs * math.ceil(size / pretrain.batch_size)
    summary_entries = [(privacy.summary_noise_multiplier, 1.0, 1)] if privacy.summary else []
    if privacy.noise_multiplier is not None:
        sigma = float(privacy.noise_multiplier)
    else:
        try:
            sigma = calibrate_noise_multiplier(
                target_epsilon=float(privacy.target_epsilon), delta=privacy.delta,
                sample_rate=sample_rate, steps=steps, accountant=privacy.accountant,
                extra_history=summary_entries,
            )
        except ValueError as error:
            raise UserError(f"privacy.target_epsilon: teacher {name}: {error}; raise the target, "
                            "or privacy.summary_noise_multiplier") from None

    augment_rng = torch.Generator().manual_seed(seed)

    def augment(batch: Tensor) -> Tensor:
        return random_shift(batch, max_shift=_MAX_SHIFT, generator=augment_rng)

    model, result = train_dp_sgd(
        model, images, labels, epochs=pretrain.epochs, batch_size=pretrain.batch_size,
        make_optimizer=lambda parameters: _make_optimizer(parameters, pretrain),
        noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm, delta=privacy.delta,
        accountant=privacy.accountant, seed=seed, device=device,
        learning_rate=lambda step: _learning_rate(pretrain, step, steps),
        transform=augment if pretrain.augment else None, progress_desc=f"teacher {name}",
    )
    if not math.isfinite(result.epochs[-1]["loss"]):
        raise UserError(f"teacher training diverged (loss {result.epochs[-1]['loss']}); lower "
                        f"models.pretrain.lr (now {pretrain.lr})")
    ledger = make_accountant(privacy.accountant)
    ledger.step(noise_multiplier=sigma, sample_rate=result.sample_rate, steps=result.steps)
    dpsgd_epsilon = ledger.epsilon(delta=privacy.delta)
    statistics = None
    if privacy.summary:
        released = release_feature_statistics(
            model, images, labels, num_classes=num_classes, clip=privacy.summary_clip,
            noise_multiplier=privacy.summary_noise_multiplier,
            rng=make_rng(seed, "feature-statistics"),
        )
        ledger.step(noise_multiplier=privacy.summary_noise_multiplier, sample_rate=1.0, steps=1)
        statistics = released.state_dict()
    epsilon = ledger.epsilon(delta=privacy.delta)
    entry = {
        "level": "record",
        "epsilon": epsilon,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "noise_multiplier": sigma,
        "max_grad_norm": privacy.max_grad_norm,
        "sample_rate": result.sample_rate,
        "steps": result.steps,
        "history": ledger.state_dict(),
        "summary_noise_multiplier": privacy.summary_noise_multiplier if privacy.summary else None,
        "summary_clip": privacy.summary_clip if privacy.summary else None,
        "dpsgd_epsilon": dpsgd_epsilon,
        "target_epsilon": privacy.target_epsilon,
        # Noise from torch's PRNG; Opacus's secure RNG (torchcsprng) is not available here.
        "secure_rng": False,
    }
    history = [{"epoch": record["epoch"], "lr": record["lr"]} for record in result.epochs]
    logger.info(
        "teacher %s: DP-SGD σ = %.4f, C = %s, q = %.4f, %d steps (ε = %.3f); summary σ_s = %s; "
        "total ε = %.3f at δ = %g (%s)", name, sigma, privacy.max_grad_norm, result.sample_rate,
        result.steps, dpsgd_epsilon, entry["summary_noise_multiplier"], epsilon, privacy.delta,
        privacy.accountant,
    )
    return model, history, entry, statistics


CLASS_STATISTICS_KEY = "class_feature_statistics"


@torch.no_grad()
def class_feature_statistics(
    model: nn.Module, images: Tensor, labels: Tensor, *, num_classes: int, batch_size: int = 1024
) -> dict[str, Any]:
    """Per-class statistics of the inputs of ``model``'s normalisation layers on real images.

    For every normalisation layer l and class k: the per-channel mean and **biased** variance
    over the images of class k and all positions, i.e. the statistics BatchNorm would record on
    a batch of class k alone (``method.bn_statistics_per_class``). Computed once by the owner
    on its own training data with the trained teacher in eval mode; kept in its teacher file and
    never sent. Rows of classes with no image are NaN. Returns ``{"layers": {name: {"mean":
    [K, C], "var": [K, C]}}, "counts": [K]}`` (tensors and ints only).
    """
    from fed_dfkd.privacy.feature_statistics import normalization_layer_names, sample_moments

    names = normalization_layer_names(model)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    try:
        for start in range(0, images.shape[0], batch_size):
            moments = sample_moments(model, images[start : start + batch_size].to(device), layers=names).cpu()
            if sums is None:
                sums = torch.zeros(num_classes, moments.shape[1], dtype=torch.float64)
            batch_labels = labels[start : start + batch_size]
            sums.index_add_(0, batch_labels, moments)
            counts += torch.bincount(batch_labels, minlength=num_classes).double()
    finally:
        model.train(was_training)
    layers: dict[str, dict[str, Tensor]] = {}
    if sums is not None:
        means = sums / counts.clamp(min=1).unsqueeze(1)
        means[counts == 0] = float("nan")
        offset = 0
        modules = dict(model.named_modules())
        for name in names:
            channels = num_channels(modules[name])
            mean = means[:, offset : offset + channels]
            square = means[:, offset + channels : offset + 2 * channels]
            offset += 2 * channels
            layers[name] = {"mean": mean.float(), "var": (square - mean.square()).clamp(min=0).float()}
    return {"layers": layers, "counts": [int(c) for c in counts.tolist()]}


def _save_teacher(
    model: nn.Module, manifest: TeacherManifest, path: Path, statistics: dict[str, Any] | None = None,
    class_statistics: dict[str, Any] | None = None,
) -> None:
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    saved: dict[str, Any] = {"manifest": manifest.to_dict(), "state_dict": state}
    if statistics is not None:
        saved["feature_statistics"] = statistics
    if class_statistics is not None:
        saved[CLASS_STATISTICS_KEY] = class_statistics
    # Weights first: the .json is the cache key, so it must never announce a missing .pt.
    atomic_torch_save(saved, path)
    atomic_write_json(path.with_suffix(".json"), manifest.to_dict())


def pretrain_teachers(
    cfg: ExperimentConfig,
    out_dir: Path | str,
    *,
    central: bool = False,
    clients: bool = True,
    splits: Any = None,
    force: bool = False,
    device: torch.device | str | None = None,
) -> list[TeacherManifest]:
    """Train (or reuse) one teacher per owner and, with ``central``, one on all train data.

    The train split is partitioned into ``federation.num_clients`` parts (``data.partition``,
    ``data.dirichlet_alpha``, ``data.min_partition_size``, seed ``runtime.seed``). A teacher whose
    saved manifest has the current :func:`teacher_config_hash` is reused unless ``force``.
    ``splits`` (a :class:`~fed_dfkd.data.datasets.DatasetSplits`) skips loading the dataset;
    ``device`` overrides ``runtime.device``. Returns the manifests, clients first in order, then
    the central one.
    """
    # Imported here: fed_dfkd.data's package module may import this one.
    from fed_dfkd.data.datasets import load_experiment_data
    from fed_dfkd.data.partition import class_histograms, partition

    out_dir = Path(out_dir)
    teachers_dir = out_dir / TEACHERS_DIR
    expected_hash = teacher_config_hash(cfg)
    device = _resolve_device(cfg.runtime.device) if device is None else torch.device(device)
    if splits is None:
        splits = load_experiment_data(cfg)
    info = splits.info
    train_labels = splits.train_labels.cpu().numpy()

    jobs: list[tuple[int | None, np.ndarray | None]] = []
    if clients:
        num_clients = cfg.federation.num_clients
        partitions = partition(
            train_labels,
            num_clients,
            scheme=cfg.data.partition,
            alpha=cfg.data.dirichlet_alpha,
            seed=cfg.runtime.seed,
            min_partition_size=cfg.data.min_partition_size,
        )
        histograms = np.asarray(class_histograms(train_labels, partitions, info.num_classes))
        atomic_write_json(
            teachers_dir / PARTITIONS_FILE,
            {
                "dataset": info.name,
                "source": splits.source,
                "scheme": cfg.data.partition,
                "dirichlet_alpha": cfg.data.dirichlet_alpha,
                "min_partition_size": cfg.data.min_partition_size,
                "seed": cfg.runtime.seed,
                "num_clients": num_clients,
                "num_classes": info.num_classes,
                "train_size": int(train_labels.shape[0]),
                "config_hash": expected_hash,
                "clients": [
                    {
                        "partition_id": k,
                        "size": int(len(indices)),
                        "class_histogram": [int(v) for v in histograms[k]],
                    }
                    for k, indices in enumerate(partitions)
                ],
            },
        )
        jobs.extend((k, np.asarray(indices)) for k, indices in enumerate(partitions))
    if central:
        jobs.append((None, None))

    manifests: list[TeacherManifest] = []
    for partition_id, indices in jobs:
        path = teacher_path(out_dir, partition_id)
        cached = None if force else _cached_manifest(
            path, expected_hash=expected_hash, partition_id=partition_id
        )
        if cached is not None:
            logger.info(
                "teacher %s: reusing %s (test accuracy %.4f, config hash %s%s)",
                cached.name, path, cached.test_accuracy, expected_hash,
                "" if cached.privacy is None else f", ε = {cached.privacy['epsilon']:.3f}",
            )
            if cfg.method.bn_statistics_per_class and cached.privacy is None:
                _add_class_statistics(path, splits, indices, num_classes=info.num_classes,
                                      batch_size=cfg.data.eval_batch_size, device=device)
            manifests.append(cached)
            continue
        model, manifest, statistics, class_statistics = _train_one_teacher(
            cfg, splits, indices, partition_id=partition_id, expected_hash=expected_hash, device=device
        )
        _save_teacher(model, manifest, path, statistics, class_statistics)
        if manifest.privacy is None:
            logger.info(
                "teacher %s: %d train images, test accuracy %.4f, %.1f s -> %s",
                manifest.name, manifest.train_size, manifest.test_accuracy, manifest.wall_seconds,
                path,
            )
        else:
            logger.info(
                "teacher %s: DP, ε = %.3f at δ = %g; ~%d train images (noisy), test accuracy %.4f, "
                "%.1f s -> %s", manifest.name, manifest.privacy["epsilon"],
                manifest.privacy["delta"], manifest.train_size, manifest.test_accuracy,
                manifest.wall_seconds, path,
            )
        manifests.append(manifest)
    return manifests


def _add_class_statistics(path: Path, splits: Any, indices: np.ndarray | None, *, num_classes: int,
                          batch_size: int, device: torch.device) -> None:
    """Give a cached teacher file made before they existed its per-class statistics."""
    model, manifest = load_teacher(path, device=device)
    if model.class_feature_targets:
        return
    if indices is None:
        images, labels = splits.train_images, splits.train_labels
    else:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images, labels = splits.train_images[index], splits.train_labels[index]
    statistics = class_feature_statistics(model, images, labels, num_classes=num_classes, batch_size=batch_size)
    _save_teacher(model, manifest, path, class_statistics=statistics)
    logger.info("teacher %s: per-class feature statistics added", path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_teacher(
    path: Path | str, *, device: torch.device | str = "cpu"
) -> tuple[NormalizedClassifier, TeacherManifest]:
    """Load a teacher saved by :func:`pretrain_teachers`, frozen (eval mode, no gradients).

    A missing, damaged or foreign file raises :class:`~fed_dfkd.errors.UserError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file {path} not found; run `fed-dfkd pretrain` to create it")
    hint = "delete it or run `fed-dfkd pretrain --force` to train it again"
    try:
        # weights_only: a teacher file holds tensors and plain values only, nothing to unpickle.
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means the file is unusable
        raise UserError(f"teacher file {path} cannot be read ({_load_failure(error)}); it is "
                        f"damaged or not a fed-dfkd teacher: {hint}") from None
    if not isinstance(saved, dict) or "manifest" not in saved or "state_dict" not in saved:
        raise UserError(f"teacher file {path} is not a fed-dfkd teacher (no manifest and weights); {hint}")
    try:
        manifest = TeacherManifest.from_dict(saved["manifest"])
    except ValueError as error:
        raise UserError(f"teacher file {path} has a bad manifest: {error}; {hint}") from None
    try:
        net = build_classifier(
            manifest.architecture,
            num_classes=manifest.num_classes,
            in_channels=manifest.in_channels,
            image_size=manifest.image_size,
        )
        model = NormalizedClassifier(net, manifest.mean, manifest.std)
        if manifest.privacy is not None:
            # A DP teacher was trained with BatchNorm replaced (GroupNorm): rebuild it so.
            from fed_dfkd.privacy import make_dp_compatible

            model = make_dp_compatible(model)
    except (UnknownNameError, ValueError) as error:
        raise UserError(f"teacher file {path}: cannot build its model: {error}") from None
    try:
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(
            f"teacher file {path}: its weights do not fit a {manifest.architecture} ({first_line}); {hint}"
        ) from None
    model.to(device)
    freeze(model)
    if saved.get("feature_statistics") is not None:
        _attach_feature_statistics(model, saved["feature_statistics"], path=path, hint=hint)
    if saved.get(CLASS_STATISTICS_KEY) is not None:
        _attach_class_statistics(model, saved[CLASS_STATISTICS_KEY], path=path, hint=hint)
    return model, manifest


def fit_problems(manifest: TeacherManifest, info: Any) -> list[str]:
    """How a teacher's dataset and image shape differ from ``info`` (a ``DatasetInfo``), in words;
    ``[]`` when it fits. Such a teacher still loads and runs, with meaningless predictions."""
    problems = []
    if manifest.dataset != info.name:
        problems.append(f"dataset {manifest.dataset!r}, not {info.name!r}")
    for name in ("num_classes", "in_channels", "image_size"):
        if getattr(manifest, name) != getattr(info, name):
            problems.append(f"{name} {getattr(manifest, name)}, not {getattr(info, name)}")
    return problems


def _load_failure(error: Exception) -> str:
    """The reason ``torch.load`` gave, short: its first line, or for a pickle torch refused with
    ``weights_only`` the unpickler's own line (the first is advice to load unsafely)."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        text = detail[0].split(". ")[0].strip() if detail else ""
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _attach_feature_statistics(model: NormalizedClassifier, raw: Any, *, path: Path, hint: str) -> None:
    """Make the owner's released statistics the BN prior's targets (``model.feature_targets``)."""
    from fed_dfkd.privacy import FeatureStatistics

    try:
        statistics = FeatureStatistics.from_state_dict(raw)
        device = _model_device(model)
        model.set_feature_targets({
            name: (mean.to(device), var.to(device)) for name, (mean, var) in statistics.layers.items()
        })
    except (ValueError, TypeError, AttributeError) as error:
        raise UserError(f"teacher file {path} has bad feature statistics: {error}; {hint}") from None


def _attach_class_statistics(model: NormalizedClassifier, raw: Any, *, path: Path, hint: str) -> None:
    """The owner's per-class statistics as ``model.class_feature_targets``."""
    try:
        device = _model_device(model)
        model.set_class_feature_targets({
            str(name): (entry["mean"].to(device), entry["var"].to(device))
            for name, entry in dict(raw["layers"]).items()
        })
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"teacher file {path} has bad per-class feature statistics: {error}; {hint}") from None


def load_teachers(
    out_dir: Path | str,
    *,
    source: Literal["clients", "central"],
    num_clients: int,
    expected_hash: str | None = None,
    device: torch.device | str = "cpu",
) -> list[tuple[NormalizedClassifier, TeacherManifest]]:
    """The ``num_clients`` owners' teachers (``source="clients"``) or the central one, frozen.

    A missing teacher raises :class:`~fed_dfkd.errors.UserError` telling the user to run
    ``fed-dfkd pretrain``; so does a set of teachers made for another number of clients, or,
    when ``expected_hash`` is given, under another config (see :func:`teacher_config_hash`).
    """
    out_dir = Path(out_dir)
    if source == "clients":
        ids: Sequence[int | None] = list(range(num_clients))
        command = f"fed-dfkd pretrain --config CONFIG --out {out_dir}"
    elif source == "central":
        ids = [None]
        command = f"fed-dfkd pretrain --config CONFIG --out {out_dir} --central"
    else:
        raise ValueError(f"source must be 'clients' or 'central', got {source!r}")
    missing = [teacher_path(out_dir, k) for k in ids if not teacher_path(out_dir, k).is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        if (out_dir / missing[0].name).is_file():
            raise UserError(f"no teacher at {shown}: {out_dir} looks like the {TEACHERS_DIR}/ "
                            f"folder itself; pass the folder above it, {out_dir.parent}")
        raise UserError(f"no teacher at {shown}; run `{command}` first")
    teachers = [load_teacher(teacher_path(out_dir, k), device=device) for k in ids]
    for k, (_, manifest) in zip(ids, teachers):
        path = teacher_path(out_dir, k)
        if manifest.partition_id != k:
            raise UserError(
                f"teacher file {path} holds the teacher of "
                f"{manifest.name}, not of {path.stem}; run `{command} --force`"
            )
        if source == "clients" and manifest.num_clients != num_clients:
            raise UserError(
                f"teacher {path} was trained for {manifest.num_clients} clients, but "
                f"federation.num_clients is {num_clients}; run `{command} --force`"
            )
        if expected_hash is not None and manifest.config_hash != expected_hash:
            raise UserError(
                f"teacher {path} was trained under another config (hash {manifest.config_hash}, "
                f"this config gives {expected_hash}); run `{command}` to train matching teachers"
            )
    return teachers
