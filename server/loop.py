"""The federation's round loop on a Flower ``Grid`` (DESIGN.md §3, issue 3 item 4).

Per round:

1. sample m = max(1, round(``federation.sample_rate`` x K)) of the K connected node ids, seeded by
   ``derive_seed(runtime.seed, "sample-clients", round)`` over the sorted ids;
2. send each sampled node one message: the :class:`~fed_dfkd.protocol.RoundInstruction` of
   :meth:`~fed_dfkd.federated.FederatedServer.plan_round` (G, S, the uint8 pseudo-batches and the
   ``RoundSpec``);
3. push, then pull the open message ids every :data:`POLL_INTERVAL` seconds until every node has
   answered or ``federation.round_timeout`` has passed (a bounded wait: a dead node costs at most
   the timeout);
4. triage every reply: a Flower error, an undecodable reply or one that fails
   :func:`~fed_dfkd.transport.validate_update` is *rejected* and a typed refusal is *refused*,
   each with its reason logged; the valid updates are sorted by partition id, so aggregation
   does not depend on the engine's node ids;
5. with at least ``federation.min_replies`` valid updates, complete the round (ΔG into G, logits
   into targets, student steps), evaluate the student on the server's test split, append the
   metrics line, write the checkpoint atomically and update ``report.json``.

**Too few valid replies.** The round is not completed (nothing of it reaches G or S) and is tried
again with a fresh sample of clients (``derive_seed(seed, "sample-clients", round, attempt)``),
at most :data:`ROUND_RETRIES` more times. If it still falls short, the server stops cleanly: the
report says ``status: "stopped"`` with a ``stop_reason`` naming the round and the counts, every
completed round stays on disk and ``--resume`` can continue later. Bytes, rejections and
refusals of failed attempts are counted in the totals and in the round that finally completes.

**Outputs** are those of ``fed-dfkd distill`` (``config.resolved.yaml``, ``metrics.jsonl``,
``report.json``, ``checkpoints/last.pt``, ``plots/accuracy.png``, ``plots/samples.png``); the
report adds ``mode``, ``engine``, ``sample_rate``, ``bytes_up``, ``bytes_down`` (measured with
:func:`~fed_dfkd.transport.recorddict_num_bytes` on every instruction sent and every reply
received), ``bytes_per_round``, ``rejected_replies``, ``refusals`` and per-round ``replies`` and
``bytes``.

**Resume.** Every random stream is derived from the seed and the round index, so the server's
state is :meth:`FederatedServer.state_dict` plus the history and the counters. Client-local state
(G's optimizer moments, negative banks) lives in the clients' ``Context.state``; a grid that can
snapshot it (the in-process engine: :class:`CheckpointableGrid`) has it saved with every
checkpoint, one file per node and version under ``checkpoints/clients/`` (only the nodes served
since the last checkpoint are written, so a round with 10 of 100 clients writes 10 files), and
the checkpoint names the files it goes with. A resumed simulation so continues exactly. On other
grids (Flower's Ray simulation, deployment) client-local state is not restored.

**Teachers.** They never reach the server in a deployment. When the run config names a readable
pretrain folder (simulation), the report takes the teachers' accuracies from their manifests and
the ensemble's accuracy (plus the student's agreement with it) from loading them; otherwise the
teachers' accuracies come from the manifests clients attach to their replies, if any, and the
ensemble accuracy is ``None``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from fed_dfkd.aggregation import aggregate_logits
from fed_dfkd.config import ExperimentConfig, dump_config, load_config
from fed_dfkd.errors import UserError
from fed_dfkd.evaluation import Evaluator, evaluate_round, predict_logits
from fed_dfkd.federated import FederatedServer, check_federation_settings, teacher_weights
from fed_dfkd.metrics import accuracy, per_class_accuracy
from fed_dfkd.privacy.client_level import sampled_per_round
from fed_dfkd.progress import RoundProgress
from fed_dfkd.protocol import ClientUpdate, RefusalData, RoundInstruction
from fed_dfkd.reporting import build_report, write_plots
from fed_dfkd.runs import RunDirectory
from fed_dfkd.runtime import resolve_device, resume_key
from fed_dfkd.samples import as_float_images
from fed_dfkd.seeding import make_rng
from fed_dfkd.transport import (
    InvalidMessage,
    instruction_to_recorddict,
    keys,
    make_message,
    recorddict_num_bytes,
    update_from_recorddict,
    update_to_recorddict,
    validate_update,
)
from fed_dfkd.transport.codec import TORCH_DTYPES

logger = logging.getLogger(__name__)

#: Seconds between two pulls of the open message ids.
POLL_INTERVAL = 0.2
#: How many more times a round with too few valid replies is tried, with new clients.
ROUND_RETRIES = 3
#: The run-config keys the ServerApp reads.
RUN_CONFIG_KEYS = ("config", "overrides", "out", "teachers", "resume", "engine")
#: Separator of the overrides in the run config (TOML values cannot be lists in ``--run-config``).
OVERRIDE_SEPARATOR = ";"
#: Pseudo-samples kept for ``plots/samples.png``.
PLOT_SAMPLES = 64
#: The folder that holds ``server/`` (the repository, or the FAB ``flwr run`` installs): a relative
#: config path not found in the working directory is looked up here.
APP_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Settings


def split_overrides(text: str) -> tuple[str, ...]:
    """``"a.b=1; c.d=x"`` -> ``("a.b=1", "c.d=x")``; empty pieces are dropped."""
    return tuple(piece.strip() for piece in str(text).split(OVERRIDE_SEPARATOR) if piece.strip())


def join_overrides(overrides: Sequence[str]) -> str:
    """Inverse of :func:`split_overrides`; an override holding the separator is a UserError."""
    for override in overrides:
        if OVERRIDE_SEPARATOR in override:
            raise UserError(f"--set {override!r}: a value may not contain {OVERRIDE_SEPARATOR!r} "
                            "in a federated run (the run config joins overrides with it)")
    return OVERRIDE_SEPARATOR.join(overrides)


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise UserError(f"run config {key!r} must be true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """What the ServerApp needs beyond the experiment config (the run config's keys).

    ``config``: the experiment YAML; ``overrides``: ``section.key=value`` strings; ``out``: the
    run folder; ``teachers``: a pretrain folder the server may read for reference accuracies
    (simulation only; ``None`` in a deployment); ``resume``: continue the run in ``out``;
    ``engine``: the engine's name, for the report.
    """

    config: Path
    out: Path
    overrides: tuple[str, ...] = ()
    teachers: Path | None = None
    resume: bool = False
    engine: str = "deployment"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ServerSettings":
        for key in ("config", "out"):
            if not str(run_config.get(key, "") or "").strip():
                raise UserError(f"run config {key!r} is missing or empty; the ServerApp needs "
                                f"{', '.join(RUN_CONFIG_KEYS)} (config and out required)")
        teachers = str(run_config.get("teachers", "") or "").strip()
        config = Path(str(run_config["config"]).strip()).expanduser()
        if not config.is_absolute() and not config.is_file() and (APP_ROOT / config).is_file():
            config = APP_ROOT / config
        return cls(
            config=config,
            out=Path(str(run_config["out"])).expanduser(),
            overrides=split_overrides(run_config.get("overrides", "") or ""),
            teachers=Path(teachers).expanduser() if teachers else None,
            resume=_as_bool(run_config.get("resume", False), "resume"),
            engine=str(run_config.get("engine", "") or "deployment"),
        )

    def to_run_config(self) -> dict[str, str | bool]:
        """The run config for these settings (paths made absolute: clients may run elsewhere)."""
        return {
            "config": str(self.config.resolve()),
            "overrides": join_overrides(self.overrides),
            "out": str(self.out.resolve()),
            "teachers": str(self.teachers.resolve()) if self.teachers is not None else "",
            "resume": bool(self.resume),
            "engine": self.engine,
        }


def open_run(out: Path, cfg: ExperimentConfig, *, resume: bool) -> tuple[RunDirectory, dict | None]:
    """The run folder and its checkpoint, with the rules of ``fed-dfkd distill``.

    A folder that holds a run needs ``resume``; ``resume`` needs a checkpoint made under the same
    :func:`~fed_dfkd.runtime.resume_key`. Settings a federation cannot run are refused here
    too (:func:`~fed_dfkd.federated.check_federation_settings`), before any teacher is pretrained.
    Anything else is a :class:`UserError`.
    """
    check_federation_settings(cfg)
    run_dir = RunDirectory(out)
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None and not resume:
        raise UserError(
            f"{out} already holds a run ({checkpoint.get('round', '?')} rounds done); pass --resume "
            "to continue it, or choose another --out"
        )
    if resume and checkpoint is None:
        raise UserError(f"--resume: no checkpoint in {run_dir.checkpoint_path.parent}")
    if checkpoint is not None and checkpoint.get("resume_key") != resume_key(cfg):
        raise UserError(
            f"--resume: the config differs from the one the run in {out} was started with "
            f"(see {run_dir.config_path}); only runtime.progress/threads/device may change"
        )
    if checkpoint is not None and "server" not in checkpoint:
        raise UserError(f"--resume: {run_dir.checkpoint_path} is not a federated run's checkpoint "
                        "(was it written by `fed-dfkd distill`?)")
    return run_dir, checkpoint


# --------------------------------------------------------------------------------------------
# Sampling and the bounded exchange


def sample_nodes(
    node_ids: Sequence[int], *, sample_rate: float, seed: int, round_index: int, attempt: int = 0
) -> list[int]:
    """m = max(1, round(sample_rate x K)) of the K node ids, seeded by the round (and attempt).

    The ids are sorted first, so the choice depends only on the seed, the round and the set of
    ids; the chosen ids come back sorted.
    """
    ordered = sorted(set(int(n) for n in node_ids))
    if not ordered:
        return []
    count = sampled_per_round(num_clients=len(ordered), sample_rate=sample_rate)
    labels: tuple[object, ...] = ("sample-clients", round_index)
    if attempt:
        labels += (attempt,)
    order = torch.randperm(len(ordered), generator=make_rng(seed, *labels))[:count]
    return [ordered[i] for i in sorted(order.tolist())]


def exchange(
    grid: Grid, messages: Sequence[Message], *, timeout: float, poll_interval: float = POLL_INTERVAL
) -> tuple[list[Message], list[int]]:
    """Push ``messages``, then pull the open ids until all are answered or ``timeout`` passes.

    Returns the replies in arrival order and the destination node ids that did not answer in
    time (or whose message could not be pushed).
    """
    pushed = {str(i) for i in grid.push_messages(list(messages)) if i}
    # Flower's grids write the id they assign into each message's metadata.
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    unpushed = [node for mid, node in node_of.items() if mid not in pushed]
    open_ids = set(pushed)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while open_ids:
        for reply in grid.pull_messages(sorted(open_ids)):
            answered = reply.metadata.reply_to_message_id
            if answered in open_ids:
                open_ids.discard(answered)
                replies.append(reply)
        remaining = deadline - time.monotonic()
        if not open_ids or remaining <= 0:
            break
        time.sleep(min(poll_interval, remaining))
    return replies, unpushed + sorted(node_of[mid] for mid in open_ids)


@runtime_checkable
class CheckpointableGrid(Protocol):
    """A grid that can snapshot and restore its nodes' ``Context.state`` (the in-process engine).

    States are keyed by partition id, which survives a restart (node ids need not).
    """

    def node_states(self) -> dict[int, Any]:
        """Each node's current state (picklable), by partition id."""

    def changed_partitions(self) -> set[int]:
        """The partitions served since the previous call (their state may have changed)."""

    def load_node_states(self, states: Mapping[int, Any]) -> None:
        """Restore the given nodes' states."""


class NodeStateStore:
    """Client-local states of a :class:`CheckpointableGrid`, one file per node and version.

    ``save`` writes the changed nodes' states as ``partition_{k}.round_{r}.pt`` (atomically, never
    over a file a committed checkpoint names) and returns the partition -> file map the checkpoint
    stores; ``committed`` then deletes the files neither the new nor the previous checkpoint
    names, so ``previous.pt`` stays usable.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[int, str] = {}
        self.previous: dict[int, str] = {}

    def save(self, grid: CheckpointableGrid, *, round_number: int) -> dict[int, str]:
        from fed_dfkd.runs import atomic_torch_save

        changed = grid.changed_partitions()
        for partition, state in grid.node_states().items():
            if partition in changed or partition not in self.files:
                name = f"partition_{partition}.round_{round_number}.pt"
                atomic_torch_save(state, self.folder / name)
                self.files[partition] = name
        return dict(self.files)

    def committed(self) -> None:
        keep = set(self.files.values()) | set(self.previous.values())
        for path in self.folder.glob("partition_*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self.previous = dict(self.files)

    def load(self, grid: CheckpointableGrid, files: Mapping[int, str]) -> None:
        states = {}
        for partition, name in files.items():
            path = self.folder / name
            try:
                # A file this program wrote into the user's own run folder (see RunDirectory).
                states[int(partition)] = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
                raise UserError(f"--resume: client state {path} cannot be read "
                                f"({type(error).__name__}); the checkpoint names it") from error
        grid.load_node_states(states)
        self.files, self.previous = dict(files), dict(files)


# --------------------------------------------------------------------------------------------
# Evaluation and teacher reference


class StudentEvaluator:
    """Student accuracy on the server's test split, when no teacher is at hand."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def evaluate(self, student: torch.nn.Module) -> dict[str, Any]:
        logits = predict_logits(student, self.images, batch_size=self.batch_size)
        return {"student_accuracy": accuracy(logits, self.labels),
                "per_class_accuracy": per_class_accuracy(logits, self.labels, int(logits.shape[1]))}


@dataclass
class TeacherReference:
    """The teachers' test accuracies (by partition) and, when loadable, the ensemble's evaluator."""

    accuracies: dict[int, float] = field(default_factory=dict)
    evaluator: Evaluator | None = None

    @property
    def ensemble_accuracy(self) -> float | None:
        return self.evaluator.ensemble_accuracy if self.evaluator is not None else None

    @property
    def ensemble_per_class(self) -> list[float | None] | None:
        return self.evaluator.ensemble_per_class if self.evaluator is not None else None

    def ordered_accuracies(self) -> list[float]:
        return [self.accuracies[k] for k in sorted(self.accuracies)]


def load_teacher_reference(
    folder: Path | None, cfg: ExperimentConfig, splits: Any, *, device: torch.device
) -> TeacherReference:
    """Read the pretrain folder's manifests and, if every teacher loads, build the evaluator."""
    from fed_dfkd.data.teachers import TEACHERS_DIR, TeacherManifest, load_teachers

    reference = TeacherReference()
    if folder is None:
        return reference
    for k in range(cfg.federation.num_clients):
        path = folder / TEACHERS_DIR / f"client_{k}.json"
        try:
            manifest = TeacherManifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            logger.info("no teacher manifest for partition %d at %s (%s)", k, path, error)
            continue
        reference.accuracies[k] = float(manifest.test_accuracy)
    try:
        loaded = load_teachers(folder, source="clients", num_clients=cfg.federation.num_clients,
                               device=device)
    except UserError as error:
        logger.info("teachers not readable by the server (%s); no ensemble accuracy", error)
        return reference
    reference.evaluator = Evaluator(
        splits.test_images, splits.test_labels, [model for model, _ in loaded],
        rule=cfg.distill.ensemble, weights=[[float(c) for c in m.class_histogram] for _, m in loaded],
        batch_size=cfg.data.eval_batch_size,
    )
    return reference


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class Totals:
    """Counters over the whole run (saved in the checkpoint)."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_sent: int = 0
    rejected_replies: int = 0
    refusals: int = 0
    missing_replies: int = 0
    failed_attempts: int = 0
    # federation.measure_float32_baseline: the same rounds as a float32 exchange.
    baseline_bytes_down: int = 0
    baseline_bytes_up: int = 0

    def add(self, other: "Totals") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def state_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: Mapping[str, int] | None) -> "Totals":
        return cls(**{k: int(v) for k, v in (state or {}).items() if k in cls.__dataclass_fields__})


@dataclass
class Attempt:
    """One try of a round: the valid updates, what was dropped and the bytes moved."""

    updates: list[ClientUpdate]
    sampled: int
    counts: Totals


class TooFewClients(Exception):
    """A round had fewer valid replies than ``federation.min_replies`` on every attempt.

    ``budget_exhausted``: every client that could have answered refused because its privacy
    budget would be exceeded, the planned end of a budgeted run rather than a failure.
    """

    def __init__(self, message: str, *, budget_exhausted: bool = False) -> None:
        super().__init__(message)
        self.budget_exhausted = budget_exhausted


class ServerLoop:
    """The whole federation on one grid: run folder, rounds, checkpoints and report."""

    def __init__(self, grid: Grid, settings: ServerSettings, *, run_id: int = 0) -> None:
        self.grid, self.settings, self.run_id = grid, settings, run_id
        self.cfg = load_config(settings.config, settings.overrides)
        self.run_dir, self.checkpoint = open_run(settings.out, self.cfg, resume=settings.resume)

    # -- one round ------------------------------------------------------------------------------

    def _connected_nodes(self, *, wanted: int) -> list[int]:
        """The connected node ids, waiting (bounded by the round timeout) for ``wanted`` of them."""
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= wanted or time.monotonic() >= deadline:
                return nodes
            time.sleep(POLL_INTERVAL)

    def _triage(self, reply: Message, *, round_index: int, num_samples: int) -> ClientUpdate | RefusalData | str:
        """The reply's decoded update, its refusal, or the reason to reject it."""
        fe = self.cfg.federation
        if reply.has_error():
            return f"error reply (code {reply.error.code}): {reply.error.reason}"
        try:
            decoded = update_from_recorddict(reply.content)
        except InvalidMessage as error:
            return f"undecodable reply: {error.reason}"
        if isinstance(decoded, RefusalData):
            return decoded
        try:
            validate_update(
                decoded, expected_round=round_index, num_samples=num_samples,
                num_classes=self.server.info.num_classes,
                generator_shapes=(self.server.generator_shapes()
                                  if fe.mode == "generator_and_logits" else None),
                max_update_norm=fe.max_update_norm,
                expected_logit_dtype=TORCH_DTYPES[fe.logit_dtype],
            )
        except InvalidMessage as error:
            return f"invalid update: {error.reason}"
        return decoded

    def _attempt(self, content: Any, *, round_index: int, num_samples: int, attempt: int) -> Attempt:
        fe, counts = self.cfg.federation, Totals()
        # The first round of this process waits for the whole federation to connect; later
        # ones only for enough nodes to reach min_replies.
        nodes = self._connected_nodes(wanted=fe.min_replies if self.nodes_seen else fe.num_clients)
        self.nodes_seen = True
        sampled = sample_nodes(nodes, sample_rate=fe.sample_rate, seed=self.cfg.runtime.seed,
                               round_index=round_index, attempt=attempt)
        message_type = keys.MESSAGE_TYPE_BY_MODE[fe.mode]
        messages = [
            make_message(content, dst_node_id=node, message_type=message_type,
                         group_id=str(round_index), run_id=self.run_id)
            for node in sampled
        ]
        counts.bytes_down = recorddict_num_bytes(content) * len(messages)
        counts.messages_sent = len(messages)
        replies, missing = exchange(self.grid, messages, timeout=fe.round_timeout)
        counts.missing_replies = len(missing)
        for node in missing:
            logger.warning("round %d: node %d did not answer within %g s", round_index + 1, node,
                           fe.round_timeout)
        updates: list[ClientUpdate] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error():
                counts.bytes_up += recorddict_num_bytes(reply.content)
            outcome = self._triage(reply, round_index=round_index, num_samples=num_samples)
            if isinstance(outcome, str):
                counts.rejected_replies += 1
                logger.warning("round %d: rejected the reply of node %d: %s", round_index + 1, node,
                               outcome)
            elif isinstance(outcome, RefusalData):
                counts.refusals += 1
                self.refusal_reasons[outcome.reason] = self.refusal_reasons.get(outcome.reason, 0) + 1
                logger.warning("round %d: node %d refused (%s): %s", round_index + 1, node,
                               outcome.reason, outcome.message)
            else:
                updates.append(outcome)
                if outcome.manifest is not None and outcome.manifest.test_accuracy is not None:
                    self.reply_accuracies[outcome.report.partition_id] = outcome.manifest.test_accuracy
        # Aggregation order by partition, not by arrival or node id: engines agree.
        updates.sort(key=lambda u: u.report.partition_id)
        return Attempt(updates=updates, sampled=len(sampled), counts=counts)

    def run_round(self) -> dict[str, Any]:
        """Plan, exchange and complete one round; its metrics record (before evaluation)."""
        fe = self.cfg.federation
        started = time.perf_counter()
        round_index = self.server.round
        instruction, samples = self.server.plan_round()
        content = instruction_to_recorddict(instruction, state_dtype=fe.state_dtype)
        num_samples = instruction.num_samples
        baseline_down = self._float32_baseline_down(instruction, samples) if fe.measure_float32_baseline else 0
        round_counts = Totals()
        budget_refusals_before = self.refusal_reasons.get("budget_exhausted", 0)
        for attempt in range(ROUND_RETRIES + 1):
            result = self._attempt(content, round_index=round_index, num_samples=num_samples,
                                   attempt=attempt)
            round_counts.add(result.counts)
            self.totals.add(result.counts)
            valid = len(result.updates)
            if valid >= fe.min_replies:
                break
            round_counts.failed_attempts += 1
            self.totals.failed_attempts += 1
            what = (f"round {round_index + 1}: {valid} valid replies of {result.sampled} sampled "
                    f"(federation.min_replies = {fe.min_replies})")
            if attempt == ROUND_RETRIES:
                reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.refusal_reasons.items()))
                budget_refusals = self.refusal_reasons.get("budget_exhausted", 0) - budget_refusals_before
                only_budget = (budget_refusals > 0 and budget_refusals == round_counts.refusals
                               and not round_counts.rejected_replies and not round_counts.missing_replies)
                raise TooFewClients(f"too few clients: {what} on each of {ROUND_RETRIES + 1} attempts"
                                    + (f" (refusals so far: {reasons})" if reasons else ""),
                                    budget_exhausted=only_budget)
            logger.warning("%s; trying again with another sample (attempt %d of %d)", what,
                           attempt + 2, ROUND_RETRIES + 1)
        if fe.measure_float32_baseline:
            # The same round as the straightforward float32 exchange, serialised the same way:
            # what every sampled client would have been sent, what every valid reply would hold.
            baseline = Totals(
                baseline_bytes_down=baseline_down * round_counts.messages_sent,
                baseline_bytes_up=sum(recorddict_num_bytes(update_to_recorddict(
                    u, update_dtype="float32", logit_dtype="float32")) for u in result.updates))
            round_counts.add(baseline)
            self.totals.add(baseline)
        metrics = self.server.complete_round(samples, result.updates, started=started)
        self._keep_plot_samples(samples, result.updates)
        metrics.update({
            "replies": len(result.updates), "sampled": result.sampled,
            "rejected": round_counts.rejected_replies, "refusals": round_counts.refusals,
            "missing": round_counts.missing_replies, "attempts": round_counts.failed_attempts + 1,
            "bytes_up": round_counts.bytes_up, "bytes_down": round_counts.bytes_down,
            "bytes": round_counts.bytes_up + round_counts.bytes_down,
        })
        if fe.measure_float32_baseline:
            metrics["baseline_bytes"] = round_counts.baseline_bytes_up + round_counts.baseline_bytes_down
        return metrics

    def _float32_baseline_down(self, instruction: RoundInstruction, samples: torch.Tensor) -> int:
        """Bytes of this round's instruction with float32 G, S and float32 pixels."""
        # The plain exchange sends G even where the owners can build it (a reset G).
        generator = dict(instruction.generator_state)
        if instruction.mode == "generator_and_logits" and not generator:
            generator = self.server.coordinator.generator.state_dict()
        plain = dataclasses.replace(
            instruction, sample_transport="pixels", sample_batches=0, generator_state=generator,
            samples=torch.zeros(0, dtype=torch.uint8))
        content = instruction_to_recorddict(plain, state_dtype="float32")
        images = as_float_images(samples.flatten(0, 1)).float()
        content[keys.SAMPLES_RECORD] = ArrayRecord({keys.SAMPLES_ARRAY: Array(images.cpu().numpy())})
        return recorddict_num_bytes(content)

    def _keep_plot_samples(self, samples: torch.Tensor, updates: Sequence[ClientUpdate]) -> None:
        """The round's first pseudo-batch and the clients' ensemble labels, for samples.png."""
        first = samples[0][:PLOT_SAMPLES].cpu()
        logits = torch.stack([u.logits[: len(first)].float() for u in updates])
        predicted = aggregate_logits(logits, rule=self.cfg.distill.ensemble,
                                     weights=teacher_weights(updates)).argmax(1)
        self.plot_samples = first
        self.plot_labels = [self.server.info.class_names[int(k)] for k in predicted]

    # -- the run --------------------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        cfg, totals = self.cfg, self.totals
        rounds = len(self.history)
        accuracies = (self.reference.ordered_accuracies() if self.reference.accuracies
                      else [self.reply_accuracies[k] for k in sorted(self.reply_accuracies)])
        moved = totals.bytes_up + totals.bytes_down
        return build_report(
            cfg, history=self.history,
            wall_seconds=self.wall_offset + time.perf_counter() - self.started,
            teacher_accuracies=accuracies, ensemble_accuracy=self.reference.ensemble_accuracy,
            class_names=self.server.info.class_names,
            ensemble_per_class=self.reference.ensemble_per_class,
            extra={
                "engine": self.settings.engine, "mode": cfg.federation.mode,
                # The pretrain folder the owners' teachers came from (fed-dfkd audit reads it).
                "teachers_dir": None if self.settings.teachers is None else str(self.settings.teachers.resolve()),
                "sample_rate": cfg.federation.sample_rate, "teacher_source": "clients",
                "data_source": self.data_source, "device": str(self.device),
                "bytes_up": totals.bytes_up, "bytes_down": totals.bytes_down,
                "bytes_per_round": moved / rounds if rounds else None,
                "bytes_per_client_round": moved / totals.messages_sent if totals.messages_sent else None,
                "state_dtype": cfg.federation.state_dtype, "update_dtype": cfg.federation.update_dtype,
                "logit_dtype": cfg.federation.logit_dtype,
                "sample_transport": cfg.federation.sample_transport,
                **self._baseline_report(moved),
                "rejected_replies": totals.rejected_replies, "refusals": totals.refusals,
                "missing_replies": totals.missing_replies, "failed_attempts": totals.failed_attempts,
                "status": self.status, "stop_reason": self.stop_reason,
                "refusal_reasons": dict(sorted(self.refusal_reasons.items())),
                **self.server.privacy.report(),
            },
        )

    def _baseline_report(self, moved: int) -> dict[str, Any]:
        totals = self.totals
        if not self.cfg.federation.measure_float32_baseline:
            return {}
        baseline = totals.baseline_bytes_up + totals.baseline_bytes_down
        return {
            "float32_baseline_bytes_up": totals.baseline_bytes_up,
            "float32_baseline_bytes_down": totals.baseline_bytes_down,
            "float32_baseline_bytes_per_client_round": (
                baseline / totals.messages_sent if totals.messages_sent else None),
            "bytes_reduction_vs_float32": baseline / moved if moved else None,
        }

    def _checkpoint(self, wall_seconds: float) -> None:
        state: dict[str, Any] = {
            "server": self.server.state_dict(), "round": self.server.round,
            "history": self.history, "wall_seconds": wall_seconds,
            "resume_key": resume_key(self.cfg), "totals": self.totals.state_dict(),
            "reply_accuracies": dict(self.reply_accuracies),
            "refusal_reasons": dict(self.refusal_reasons),
            "plot_samples": self.plot_samples, "plot_labels": self.plot_labels,
        }
        if isinstance(self.grid, CheckpointableGrid):
            state["client_state_files"] = self.node_store.save(self.grid, round_number=self.server.round)
        self.run_dir.save_checkpoint(state)
        if isinstance(self.grid, CheckpointableGrid):
            self.node_store.committed()

    def _restore(self, checkpoint: Mapping[str, Any]) -> None:
        self.server.load_state_dict(checkpoint["server"])
        self.history = list(checkpoint["history"])
        self.wall_offset = float(checkpoint["wall_seconds"])
        self.totals = Totals.from_state(checkpoint.get("totals"))
        self.reply_accuracies = dict(checkpoint.get("reply_accuracies") or {})
        self.refusal_reasons = dict(checkpoint.get("refusal_reasons") or {})
        self.plot_samples = checkpoint.get("plot_samples")
        self.plot_labels = checkpoint.get("plot_labels")
        files = checkpoint.get("client_state_files")
        if files is not None and isinstance(self.grid, CheckpointableGrid):
            self.node_store.load(self.grid, files)
        elif self.server.round:
            logger.warning("resuming on a grid whose clients keep their own state: client-local "
                           "state (generator optimizer moments, negative banks) is not restored "
                           "from the checkpoint")
        dropped = self.run_dir.metrics.truncate_after(self.server.round)
        logger.info("resuming after round %d (%d uncommitted metric lines dropped)",
                    self.server.round, dropped)

    def run(self) -> dict[str, Any]:
        """Run the remaining rounds; returns the final report (also in ``report.json``)."""
        from fed_dfkd.data import load_experiment_data

        cfg = self.cfg
        self.device = resolve_device(cfg.runtime)
        self.run_dir.write_config(dump_config(cfg))
        splits = load_experiment_data(cfg)
        self.data_source = splits.source
        logger.info("server data: %s (%d test images for evaluation)", splits.source,
                    len(splits.test_labels))
        self.reference = load_teacher_reference(self.settings.teachers, cfg, splits, device=self.device)
        evaluator: Evaluator | StudentEvaluator = self.reference.evaluator or StudentEvaluator(
            splits.test_images, splits.test_labels, batch_size=cfg.data.eval_batch_size)
        if self.reference.accuracies:
            logger.info("teachers: %s; ensemble %s",
                        ", ".join(f"{a:.4f}" for a in self.reference.ordered_accuracies()),
                        "n/a" if self.reference.ensemble_accuracy is None
                        else f"{self.reference.ensemble_accuracy:.4f}")

        self.server = FederatedServer(cfg, splits.info, device=self.device)
        self.history: list[dict[str, Any]] = []
        self.wall_offset = 0.0
        self.totals = Totals()
        self.reply_accuracies: dict[int, float] = {}
        self.refusal_reasons: dict[str, int] = {}
        self.plot_samples: torch.Tensor | None = None
        self.plot_labels: list[str] | None = None
        self.status, self.stop_reason = "running", None
        self.nodes_seen = False
        self.node_store = NodeStateStore(self.run_dir.checkpoints_dir / "clients")
        if self.checkpoint is not None:
            self._restore(self.checkpoint)

        self.started = time.perf_counter()
        total = cfg.federation.rounds
        with RoundProgress(total, mode=cfg.runtime.progress, desc="federation",
                           initial=self.server.round) as bar:
            while not self.server.finished:
                try:
                    metrics = self.run_round()
                except TooFewClients as error:
                    if error.budget_exhausted:
                        self.status = "budget_exhausted"
                        self.stop_reason = f"the clients' privacy budgets are spent: {error}"
                        logger.warning("ending the federation: %s", self.stop_reason)
                    else:
                        self.status, self.stop_reason = "stopped", str(error)
                        logger.error("stopping the federation: %s", error)
                    break
                r = metrics["round"]
                if r % cfg.distill.eval_every == 0 or r == total:
                    metrics.update(evaluate_round(evaluator, self.server.coordinator))
                metrics["step"] = r
                metrics["wall_seconds"] = self.wall_offset + time.perf_counter() - self.started
                self.history.append(metrics)
                # metrics line first, then the checkpoint: a crash in between leaves an extra
                # line that --resume drops, never a lost round.
                self.run_dir.metrics.append(metrics)
                self._checkpoint(metrics["wall_seconds"])
                self.run_dir.write_report(self._report())
                shown = {k: metrics[k] for k in ("student_accuracy", "replies") if k in metrics}
                shown.update({k: metrics[k] for k in ("rejected", "refusals", "missing") if metrics[k]})
                if metrics.get("epsilon") is not None:
                    shown["epsilon"] = metrics["epsilon"]
                shown.update(bytes=metrics["bytes"], seconds=metrics["seconds"])
                bar.update(r, shown)
        if self.status == "running":
            self.status = "completed"
        final = self._report()
        self.run_dir.write_report(final)
        write_plots(self.run_dir.plots_dir, self.history,
                    teacher_accuracy=final["best_teacher_accuracy"],
                    ensemble_accuracy=final["ensemble_accuracy"], samples=self.plot_samples,
                    sample_labels=self.plot_labels, epsilon_budget=final.get("epsilon_max"),
                    per_class=final["per_class_accuracy"])
        logger.info("federation %s after %d rounds: student accuracy %s, %d bytes up, %d down, "
                    "%d rejected, %d refused", self.status, final["rounds_completed"],
                    _fmt(final["student_accuracy"]), self.totals.bytes_up, self.totals.bytes_down,
                    self.totals.rejected_replies, self.totals.refusals)
        return final


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def run_server(grid: Grid, settings: ServerSettings, *, run_id: int = 0) -> dict[str, Any]:
    """Run (or resume) the federation described by ``settings`` on ``grid``; the final report."""
    return ServerLoop(grid, settings, run_id=run_id).run()
