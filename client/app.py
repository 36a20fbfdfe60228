"""The Flower ClientApp: one data owner's teacher answering one round per message (DESIGN.md §3.4).

Handlers:

- ``train.distill`` (mode ``generator_and_logits``): the teacher's logits on the round's samples
  and ΔG from local generator steps, with a ``ClientReport``;
- ``query.logits`` (mode ``logits_only``): the logits alone; no generator work, no state.

Where things come from:

- ``context.run_config["config"]``: the experiment YAML (a relative path is looked up in the
  working directory, then in the app's folder); ``context.run_config["overrides"]``: optional
  ``section.key=value`` items separated by ``;``;
- ``context.node_config["teacher-path"]``: a teacher file from ``fed-dfkd pretrain``; or a
  pretrain ``--out`` folder, ``context.node_config["teachers-dir"]`` (else
  ``context.run_config["teachers"]``, as in simulation) with
  ``context.node_config["partition-id"]``;
- ``context.node_config["device"]`` (optional): overrides ``runtime.device``.

The :class:`~fed_dfkd.teacher_host.TeacherHost` is built once per process and cached; its state
lives in ``context.state`` (:mod:`client.state`) and is loaded before every round it serves, so a
host that one process shares between nodes never mixes their states.

A handler never raises: whatever it cannot serve gets a typed ``Refusal`` reply (with the
teacher's manifest when the teacher is loaded) and one warning line in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from google.protobuf.message import DecodeError

from fed_dfkd.config import ExperimentConfig, load_config
from fed_dfkd.data import dataset_info
from fed_dfkd.data.teachers import TeacherManifest, load_teacher, teacher_path
from fed_dfkd.errors import UserError
from fed_dfkd.proto.v1 import round_spec_pb2
from fed_dfkd.protocol import (
    PROTOCOL_VERSION,
    ClientUpdate,
    RefusalData,
    RoundInstruction,
    TeacherManifestData,
)
from fed_dfkd.runtime import resolve_device
from fed_dfkd.teacher_host import TeacherHost
from fed_dfkd.transport import keys
from fed_dfkd.transport.codec import (
    instruction_from_recorddict,
    refusal_to_recorddict,
    update_to_recorddict,
)
from fed_dfkd.transport.validation import InvalidMessage

from client.state import (
    StoredHostState,
    decode_state,
    encode_state,
    read_host_state,
    read_host_state_file,
    read_owner_ledger,
    write_host_state,
    write_host_state_file,
    write_owner_ledger,
)

logger = logging.getLogger("fed_dfkd.client")

#: The folder that holds ``client/`` (the repository, or the installed FAB): relative config
#: paths are also looked up here, because ``flwr run`` packs ``configs/*.yaml`` into the app.
APP_ROOT = Path(__file__).resolve().parents[1]

# Run and node config keys (Flower's names are kebab-case).
RUN_CONFIG_KEY = "config"
RUN_OVERRIDES_KEY = "overrides"
RUN_TEACHERS_KEY = "teachers"
NODE_TEACHER_PATH_KEY = "teacher-path"
NODE_TEACHERS_DIR_KEY = "teachers-dir"
NODE_PARTITION_ID_KEY = "partition-id"
NODE_DEVICE_KEY = "device"
#: Folder of what an owner keeps on its own disk (node config wins over run config): its privacy
#: ledger and its state in each run. By default next to the teacher file, so both outlive
#: SuperNodes, servers and Flower runs (a resumed server starts a new Flower run).
OWNER_DIR_KEY = "owner-dir"

GENERATOR_AND_LOGITS = "generator_and_logits"
LOGITS_ONLY = "logits_only"


class ClientSetupError(Exception):
    """This node cannot host its teacher; ``reason`` is the refusal reason to answer with."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _HostEntry:
    """A cached host, the state it was built with, and the lock that serialises its rounds."""

    host: TeacherHost
    initial_state: bytes
    host_key: str
    manifest: TeacherManifestData
    teacher_file: Path
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_HOSTS: dict[tuple[str, tuple[str, ...], str, str], _HostEntry] = {}
_HOSTS_LOCK = threading.Lock()
_LOG_OUTPUT_READY = False


def clear_host_cache() -> None:
    """Forget every cached host (tests, and engines that run several experiments in a process)."""
    with _HOSTS_LOCK:
        _HOSTS.clear()


# --- where the config and the teacher are -------------------------------------------------------


def parse_overrides(text: Any) -> tuple[str, ...]:
    """``"a.b=1; c.d=x"`` -> ``("a.b=1", "c.d=x")``; empty items are dropped."""
    if text is None:
        return ()
    if not isinstance(text, str):
        raise ClientSetupError(
            "internal_error",
            f"run config {RUN_OVERRIDES_KEY!r} must be a string of section.key=value items "
            f"separated by ';', got {type(text).__name__}",
        )
    return tuple(item.strip() for item in text.split(";") if item.strip())


def resolve_config_path(value: Any) -> Path:
    """The experiment YAML named by the run config: as given, else relative to :data:`APP_ROOT`."""
    if not isinstance(value, str) or not value.strip():
        raise ClientSetupError(
            "internal_error",
            f"the run config has no {RUN_CONFIG_KEY!r} (the experiment YAML path); "
            f"pass it with --run-config '{RUN_CONFIG_KEY}=\"configs/quickstart.yaml\"'",
        )
    path = Path(value.strip()).expanduser()
    if path.is_absolute() or path.is_file():
        return path
    in_app = APP_ROOT / path
    if in_app.is_file():
        return in_app
    raise ClientSetupError(
        "internal_error",
        f"config file {value} not found in {Path.cwd()} nor in the app folder {APP_ROOT}",
    )


def teacher_location(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> tuple[Path, int | None]:
    """The teacher file of this node and, when it came from a pretrain folder, its partition id."""
    explicit = node_config.get(NODE_TEACHER_PATH_KEY)
    if isinstance(explicit, str) and explicit.strip():
        return Path(explicit.strip()).expanduser(), None
    folder = node_config.get(NODE_TEACHERS_DIR_KEY) or run_config.get(RUN_TEACHERS_KEY)
    if not isinstance(folder, str) or not folder.strip():
        raise ClientSetupError(
            "internal_error",
            f"no teacher configured: set node config {NODE_TEACHER_PATH_KEY!r} (a teacher .pt), "
            f"or {NODE_TEACHERS_DIR_KEY!r} (a `fed-dfkd pretrain --out` folder) with "
            f"{NODE_PARTITION_ID_KEY!r}; in simulation set run config {RUN_TEACHERS_KEY!r}",
        )
    partition_id = node_config.get(NODE_PARTITION_ID_KEY)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise ClientSetupError(
            "internal_error",
            f"node config {NODE_PARTITION_ID_KEY!r} must be a non-negative integer next to the "
            f"teachers folder {folder}, got {partition_id!r}",
        )
    return teacher_path(Path(folder.strip()).expanduser(), partition_id), partition_id


# --- the cached host ----------------------------------------------------------------------------


def manifest_data(manifest: TeacherManifest) -> TeacherManifestData:
    """The public part of a teacher's manifest, as it travels (never its weights)."""
    return TeacherManifestData(
        architecture=manifest.architecture,
        num_classes=manifest.num_classes,
        in_channels=manifest.in_channels,
        image_height=manifest.image_size,
        image_width=manifest.image_size,
        dataset=manifest.dataset,
        hash=manifest.config_hash,
        test_accuracy=manifest.test_accuracy,
        class_histogram=tuple(manifest.class_histogram),
        train_size=manifest.train_size,
    )


def _check_teacher_fits(
    cfg: ExperimentConfig, manifest: TeacherManifest, *, path: Path, partition_id: int | None
) -> None:
    info = dataset_info(cfg.data.dataset)
    problems = []
    if manifest.dataset != info.name:
        problems.append(f"dataset {manifest.dataset!r} != {info.name!r}")
    for name, expected in (
        ("num_classes", info.num_classes),
        ("in_channels", info.in_channels),
        ("image_size", info.image_size),
    ):
        if getattr(manifest, name) != expected:
            problems.append(f"{name} {getattr(manifest, name)} != {expected}")
    if partition_id is not None and manifest.partition_id != partition_id:
        problems.append(
            f"it is the teacher of {manifest.name}, this node is partition {partition_id}"
        )
    if problems:
        raise ClientSetupError(
            "incompatible_manifest",
            f"teacher {path} does not fit the experiment config: {'; '.join(problems)}",
        )


def _build_entry(
    config_path: Path, overrides: tuple[str, ...], teacher_file: Path, *,
    partition_id: int | None, device_name: str | None,
) -> _HostEntry:
    try:
        cfg = load_config(config_path, overrides)
        runtime = cfg.runtime
        if device_name is not None:
            runtime = dataclasses.replace(runtime, device=device_name)
        device = resolve_device(runtime)
        teacher, manifest = load_teacher(teacher_file, device=device)
    except UserError as error:
        raise ClientSetupError("internal_error", str(error)) from error
    _check_teacher_fits(cfg, manifest, path=teacher_file, partition_id=partition_id)
    host = TeacherHost(cfg, teacher, manifest, dataset_info(cfg.data.dataset), device=device)
    logger.info(
        "hosting teacher %s (%s, %d train images, test accuracy %.4f) from %s on %s",
        manifest.name, manifest.architecture, manifest.train_size, manifest.test_accuracy,
        teacher_file, device,
    )
    return _HostEntry(
        host=host,
        initial_state=encode_state(host.state_dict()),
        host_key=f"{host.config_key}/{manifest.config_hash}/{manifest.name}",
        manifest=manifest_data(manifest),
        teacher_file=teacher_file,
    )


def host_for(context: Context) -> _HostEntry:
    """This node's cached host, built on first use; :class:`ClientSetupError` if it cannot be."""
    run_config, node_config = context.run_config, context.node_config
    overrides = parse_overrides(run_config.get(RUN_OVERRIDES_KEY, ""))
    config_path = resolve_config_path(run_config.get(RUN_CONFIG_KEY))
    teacher_file, partition_id = teacher_location(node_config, run_config)
    device = node_config.get(NODE_DEVICE_KEY)
    device_name = str(device).strip() if device is not None and str(device).strip() else None
    key = (str(config_path.resolve()), overrides, str(teacher_file.resolve()), device_name or "")
    with _HOSTS_LOCK:
        entry = _HOSTS.get(key)
        if entry is None:
            # Failures are not cached: the operator may put the missing file in place.
            entry = _build_entry(
                config_path, overrides, teacher_file,
                partition_id=partition_id, device_name=device_name,
            )
            _HOSTS[key] = entry
    return entry


# --- one round ----------------------------------------------------------------------------------


def _peek_round_spec(content: RecordDict) -> round_spec_pb2.RoundSpec | None:
    """The instruction's RoundSpec if its bytes parse, before any other check: the round number
    for a refusal, and the peer's protocol version (the strict decoder reports every mismatch as
    a plain :class:`InvalidMessage`)."""
    try:
        record = content[keys.SPEC_RECORD] if keys.SPEC_RECORD in content else None
    except Exception:  # noqa: BLE001 - a damaged RecordDict is reported by the strict decoder
        return None
    if not isinstance(record, ConfigRecord):
        return None
    data = record.get(keys.ROUND_SPEC_KEY)
    if not isinstance(data, bytes):
        return None
    spec = round_spec_pb2.RoundSpec()
    try:
        spec.ParseFromString(data)
    except DecodeError:
        return None
    return spec


def _round_hint(message: Message, spec: round_spec_pb2.RoundSpec | None) -> int:
    if spec is not None:
        return int(spec.round)
    try:
        return max(int(message.metadata.group_id), 0)
    except (TypeError, ValueError):
        return 0


def _refuse(
    message: Message, *, round: int, reason: str, text: str,
    manifest: TeacherManifestData | None = None,
) -> Message:
    logger.warning("round %d: refused (%s): %s", round + 1, reason, text)
    refusal = RefusalData(round=round, reason=reason, message=text)
    return Message(content=refusal_to_recorddict(refusal, manifest=manifest), reply_to=message)


def _start_state(
    entry: _HostEntry, stored: StoredHostState | None, instruction: RoundInstruction
) -> bytes:
    """The host state to serve ``instruction`` from; ``ClientSetupError`` when there is none."""
    if stored is None:
        return entry.initial_state
    if stored.host_key != entry.host_key:
        raise ClientSetupError(
            "internal_error",
            f"this node's stored state belongs to another config or teacher ({stored.host_key}, "
            f"this host is {entry.host_key})",
        )
    if instruction.round > stored.round:
        return stored.state
    if instruction.round == stored.round:
        logger.info(
            "round %d: served again (a retry, or a resumed server) from the state it first "
            "started from",
            instruction.round,
        )
        return stored.previous_state
    raise ClientSetupError(
        "bad_request",
        f"round {instruction.round} is older than round {stored.round}, the last this node served",
    )


def owner_files(context: Context, entry: _HostEntry, run_key: str) -> tuple[Path, Path]:
    """This owner's privacy ledger and its host state in run ``run_key`` (see :data:`OWNER_DIR_KEY`)."""
    folder = context.node_config.get(OWNER_DIR_KEY) or context.run_config.get(OWNER_DIR_KEY)
    if isinstance(folder, str) and folder.strip():
        root = Path(folder.strip()).expanduser()
    else:
        root = entry.teacher_file.parent
    name = entry.host.manifest.name
    return root / f"{name}.ledger.json", root / f"{name}.{run_key or 'run'}.state.pt"


def _serve_round(
    entry: _HostEntry, instruction: RoundInstruction, context: Context
) -> ClientUpdate | RefusalData:
    host = entry.host
    refusal = host.check(instruction)
    if refusal is not None:
        return refusal
    if instruction.mode == LOGITS_ONLY and host.ledger is None:
        # No generator work and no privacy ledger, so no state is read or written.
        return host.serve(instruction)
    ledger_file, state_file = owner_files(context, entry, instruction.run_key)
    try:
        stored = read_host_state(context.state)
        if stored is None:
            # A new Flower run (the server restarted) or a new SuperNode: this owner's own copy.
            stored = read_host_state_file(state_file)
    except ValueError as error:
        raise ClientSetupError("internal_error", f"stored state is damaged: {error}") from error
    start = _start_state(entry, stored, instruction)
    try:
        host.load_state_dict(decode_state(start))
    except Exception as error:  # noqa: BLE001 - any failure means the stored state is unusable
        raise ClientSetupError(
            "internal_error", f"stored state cannot be loaded ({type(error).__name__}: {error})"
        ) from error
    if host.ledger is not None:
        # The file, not Context.state, is the truth: it survives a new run id after a server
        # restart, a restarted SuperNode, and the owner's other runs.
        try:
            kept = read_owner_ledger(ledger_file)
            # No file: this owner has released nothing under this folder yet (a cached host may
            # still hold another folder's ledger from an earlier run in this process).
            if kept is None:
                host.ledger.reset()
            else:
                host.ledger.load_state_dict(kept)
        except (ValueError, KeyError, TypeError) as error:
            raise ClientSetupError("internal_error", f"privacy ledger {ledger_file}: {error}") from error
    result = host.serve(instruction)
    if isinstance(result, ClientUpdate):
        if host.ledger is not None:
            # Written before the reply leaves: a release is never made without being recorded.
            write_owner_ledger(ledger_file, host.ledger.state_dict())
        served = StoredHostState(round=instruction.round, state=encode_state(host.state_dict()),
                                 previous_state=start, host_key=entry.host_key)
        write_host_state(context.state, served)
        write_host_state_file(state_file, served)
    return result


def handle(message: Message, context: Context, *, mode: str) -> Message:
    """Serve one instruction in ``mode``; every failure becomes a Refusal reply."""
    _ensure_log_output()
    # A message that carries an error instead of content is answered as an empty instruction.
    content = message.content if message.has_content() else RecordDict()
    spec = _peek_round_spec(content)
    round_hint = _round_hint(message, spec)
    if spec is not None and spec.protocol_version not in (0, PROTOCOL_VERSION):
        return _refuse(
            message, round=round_hint, reason="protocol_mismatch",
            text=f"client speaks protocol {PROTOCOL_VERSION}, server sent {spec.protocol_version}",
        )
    manifest = None
    try:
        entry = host_for(context)
        manifest = entry.manifest
        try:
            instruction = instruction_from_recorddict(content)
        except InvalidMessage as error:
            return _refuse(message, round=round_hint, reason="bad_request",
                           text=f"undecodable instruction: {error.reason}", manifest=manifest)
        if instruction.mode != mode:
            return _refuse(
                message, round=instruction.round, reason="bad_request", manifest=manifest,
                text=f"message type {message.metadata.message_type!r} serves mode {mode!r}, "
                f"the instruction asks for {instruction.mode!r} "
                f"(send {keys.MESSAGE_TYPE_BY_MODE[instruction.mode]!r})",
            )
        with entry.lock:
            result = _serve_round(entry, instruction, context)
    except ClientSetupError as error:
        return _refuse(message, round=round_hint, reason=error.reason, text=str(error),
                       manifest=manifest)
    except Exception as error:  # noqa: BLE001 - a handler answers, it never raises
        logger.exception("round %d: failed to serve", round_hint)
        return _refuse(message, round=round_hint, reason="internal_error",
                       text=f"{type(error).__name__}: {error}", manifest=manifest)
    if isinstance(result, RefusalData):
        return _refuse(message, round=result.round, reason=result.reason, text=result.message,
                       manifest=manifest)
    report = result.report
    logger.info(
        "round %d: %s served %s, %d samples, |dG| %.4g, generator loss %.4g, %.2f s",
        report.round, entry.host.manifest.name, mode, result.logits.shape[0],
        report.update_norm, report.metrics.get("generator_loss", float("nan")), report.seconds,
    )
    content = update_to_recorddict(
        result, update_dtype=instruction.update_dtype, logit_dtype=instruction.logit_dtype
    )
    return Message(content=content, reply_to=message)


def _ensure_log_output() -> None:
    """The app configures logging: when nothing else has (a SuperNode's ClientApp process), send
    ``fed_dfkd`` records of level INFO and above to stderr; otherwise leave it to the host."""
    global _LOG_OUTPUT_READY
    if _LOG_OUTPUT_READY:
        return
    _LOG_OUTPUT_READY = True
    package_logger = logging.getLogger("fed_dfkd")
    if logging.getLogger().handlers or package_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


app = ClientApp()


@app.train("distill")
def distill(message: Message, context: Context) -> Message:
    """``train.distill``: logits, ΔG and a ClientReport (mode ``generator_and_logits``)."""
    return handle(message, context, mode=GENERATOR_AND_LOGITS)


@app.query("logits")
def query_logits(message: Message, context: Context) -> Message:
    """``query.logits``: the teacher's logits alone (mode ``logits_only``)."""
    return handle(message, context, mode=LOGITS_ONLY)
