"""The ClientApp called directly with hand-built messages (platform.md §4.2).

Two tiny teachers are pretrained once for the module; round instructions come from the real
server core (:class:`~fed_dfkd.federated.FederatedServer`) through the real codec, and the
references from a :class:`~fed_dfkd.teacher_host.TeacherHost` served the same rounds in a row.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from client.state import HOST_STATE_RECORD, read_host_state
from fed_dfkd.config import load_config
from fed_dfkd.data import dataset_info
from fed_dfkd.data.teachers import load_teacher, pretrain_teachers, teacher_path
from fed_dfkd.federated import FederatedServer
from fed_dfkd.protocol import ClientUpdate, PrivacySpecData, RefusalData, RoundInstruction
from fed_dfkd.teacher_host import TeacherHost
from fed_dfkd.transport import keys
from fed_dfkd.transport.codec import (
    instruction_from_recorddict,
    instruction_to_recorddict,
    make_message,
    manifest_from_recorddict,
    round_spec_to_proto,
    update_from_recorddict,
)
from fed_dfkd.transport.validation import check_payload_keys, generator_update_shapes

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quickstart.yaml"
OVERRIDES = (
    "models.pretrain.epochs=2",
    "federation.num_clients=2",
    "federation.rounds=3",
    "method.generator_steps=1",
    "distill.student_steps=2",
    "distill.batch_size=16",
    "method.negative_bank_size=64",
)


@dataclasses.dataclass
class Setup:
    out: Path
    rounds: list[RoundInstruction]
    # What a fresh TeacherHost of partition 0 answers when it serves rounds[0], rounds[1], ... in a row.
    reference: list[ClientUpdate]
    fresh_round1: ClientUpdate  # a fresh host serving rounds[1] alone
    host0: TeacherHost


def _host(cfg: Any, out: Path, partition_id: int) -> TeacherHost:
    teacher, manifest = load_teacher(teacher_path(out, partition_id))
    return TeacherHost(cfg, teacher, manifest, dataset_info(cfg.data.dataset))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    client_app.clear_host_cache()
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(CONFIG, OVERRIDES)
    pretrain_teachers(cfg, out, device="cpu")
    server = FederatedServer(cfg, dataset_info(cfg.data.dataset))
    host = _host(cfg, out, 0)
    rounds, reference = [], []
    for _ in range(2):
        planned, samples = server.plan_round()
        # Through the wire codec: plan_round's state dicts alias the server's live weights,
        # which complete_round then changes in place.
        instruction = instruction_from_recorddict(instruction_to_recorddict(planned))
        update = host.serve(instruction)
        assert isinstance(update, ClientUpdate)
        rounds.append(instruction)
        reference.append(update)
        server.complete_round(samples, [update])
    fresh = _host(cfg, out, 0).serve(rounds[1])
    assert isinstance(fresh, ClientUpdate)
    yield Setup(out=out, rounds=rounds, reference=reference, fresh_round1=fresh, host0=host)
    client_app.clear_host_cache()


def _context(setup: Setup, *, node_id: int, partition_id: int, **node: Any) -> Context:
    run_config = {"config": str(CONFIG), "overrides": "; ".join(OVERRIDES), "teachers": str(setup.out)}
    # Each node its own owner folder, unless a test shares one on purpose.
    node = {"owner-dir": tempfile.mkdtemp(prefix="owner-"), **node}
    node_config = {"partition-id": partition_id, "num-partitions": 2, **node}
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


_message_ids = iter(range(1_000_000))


def _send(
    context: Context, content: RecordDict, *, round: int,
    message_type: str = keys.MESSAGE_TYPE_TRAIN_DISTILL,
) -> tuple[Message, ClientUpdate | RefusalData, Message]:
    message = make_message(content, dst_node_id=context.node_id, message_type=message_type,
                           group_id=round, run_id=1, message_id=f"m-{next(_message_ids)}")
    reply = client_app.app(message, context)
    return reply, update_from_recorddict(reply.content), message


def _serve(context: Context, instruction: RoundInstruction, **kwargs: Any) -> ClientUpdate:
    _, decoded, _ = _send(context, instruction_to_recorddict(instruction), round=instruction.round,
                          **kwargs)
    assert isinstance(decoded, ClientUpdate), decoded
    return decoded


def _refusal(context: Context, content: RecordDict, *, round: int, **kwargs: Any) -> RefusalData:
    reply, decoded, _ = _send(context, content, round=round, **kwargs)
    check_payload_keys(reply.content, keys.ALLOWED_REPLY_KEYS)
    assert isinstance(decoded, RefusalData), decoded
    return decoded


def _assert_same_update(got: ClientUpdate, expected: ClientUpdate) -> None:
    assert got.generator_delta is not None and expected.generator_delta is not None
    assert list(got.generator_delta) == list(expected.generator_delta)
    for name, tensor in expected.generator_delta.items():
        assert torch.equal(got.generator_delta[name], tensor), name
    assert torch.equal(got.logits, expected.logits.half())


# --- a served round -------------------------------------------------------------------------------


def test_reply_holds_exactly_the_allowed_payloads(setup: Setup) -> None:
    instruction = setup.rounds[0]
    context = _context(setup, node_id=11, partition_id=1)
    reply, update, message = _send(context, instruction_to_recorddict(instruction), round=0)

    shapes = generator_update_shapes(instruction.generator_state)
    check_payload_keys(reply.content, keys.ALLOWED_REPLY_KEYS,
                       model_array_names={keys.GENERATOR_UPDATE_RECORD: shapes})
    assert set(reply.content) == {keys.GENERATOR_UPDATE_RECORD, keys.LOGITS_RECORD, keys.REPORT_RECORD}
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.metadata.dst_node_id == message.metadata.src_node_id
    assert reply.metadata.message_type == keys.MESSAGE_TYPE_TRAIN_DISTILL

    assert isinstance(update, ClientUpdate)
    num_classes = dataset_info("digits").num_classes
    assert update.logits.dtype == torch.float16
    assert tuple(update.logits.shape) == (instruction.samples.shape[0], num_classes)
    assert update.generator_delta is not None
    assert {k: tuple(v.shape) for k, v in update.generator_delta.items()} == shapes
    assert all(v.dtype == torch.float32 for v in update.generator_delta.values())
    assert any(bool(v.abs().sum() > 0) for v in update.generator_delta.values())

    _, manifest = load_teacher(teacher_path(setup.out, 1))
    assert update.report.round == 0
    assert update.report.partition_id == 1
    assert update.report.train_size == manifest.train_size
    assert list(update.report.class_histogram) == manifest.class_histogram
    assert "generator_loss" in update.report.metrics


def test_state_persists_in_context_across_rounds(setup: Setup) -> None:
    context = _context(setup, node_id=10, partition_id=0)
    first = _serve(context, setup.rounds[0])
    stored = read_host_state(context.state)
    assert stored is not None and stored.round == 0
    second = _serve(context, setup.rounds[1])

    _assert_same_update(first, setup.reference[0])
    _assert_same_update(second, setup.reference[1])
    # The state matters: a host with no history answers round 1 differently.
    assert not all(
        torch.equal(second.generator_delta[k], v) for k, v in setup.fresh_round1.generator_delta.items()
    )


def test_state_survives_a_fresh_process(setup: Setup) -> None:
    """Deployment starts a process per message: only Context.state carries over."""
    context = _context(setup, node_id=12, partition_id=0)
    _serve(context, setup.rounds[0])
    client_app.clear_host_cache()
    _assert_same_update(_serve(context, setup.rounds[1]), setup.reference[1])


def test_a_new_flower_run_continues_from_the_owners_own_copy(setup: Setup, tmp_path: Path) -> None:
    """A resumed server is a new Flower run in a deployment: Context.state starts empty. The
    owner's folder keeps its state per run key, so the round after the restart is the same."""
    before = _context(setup, node_id=14, partition_id=0, **{"owner-dir": str(tmp_path)})
    _serve(before, setup.rounds[0])
    client_app.clear_host_cache()
    after = _context(setup, node_id=15, partition_id=0, **{"owner-dir": str(tmp_path)})
    _assert_same_update(_serve(after, setup.rounds[1]), setup.reference[1])
    assert [p.name for p in tmp_path.iterdir()] == [f"client_0.{setup.rounds[0].run_key}.state.pt"]


def test_nodes_sharing_a_process_keep_separate_states(setup: Setup) -> None:
    node_a = _context(setup, node_id=20, partition_id=0)
    node_b = _context(setup, node_id=21, partition_id=1)
    # A second node with the same teacher shares the cached host with node_a.
    node_c = _context(setup, node_id=22, partition_id=0)
    assert client_app.host_for(node_a) is client_app.host_for(node_c)
    assert client_app.host_for(node_a) is not client_app.host_for(node_b)

    a0 = _serve(node_a, setup.rounds[0])
    _serve(node_b, setup.rounds[0])
    _serve(node_b, setup.rounds[1])
    c0 = _serve(node_c, setup.rounds[0])  # served by a host that has just served node_a
    a1 = _serve(node_a, setup.rounds[1])

    _assert_same_update(a0, setup.reference[0])
    _assert_same_update(c0, setup.reference[0])
    _assert_same_update(a1, setup.reference[1])


def test_a_repeated_round_gets_the_same_answer(setup: Setup) -> None:
    context = _context(setup, node_id=30, partition_id=0)
    _serve(context, setup.rounds[0])
    _assert_same_update(_serve(context, setup.rounds[0]), setup.reference[0])
    _assert_same_update(_serve(context, setup.rounds[1]), setup.reference[1])

    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert refusal.reason == "bad_request"
    assert "older than round 1" in refusal.message


def test_logits_only_query_answers_logits_alone(setup: Setup) -> None:
    instruction = dataclasses.replace(setup.rounds[0], mode="logits_only", generator_state={},
                                      student_state={})
    content = instruction_to_recorddict(instruction)
    assert keys.GENERATOR_RECORD not in content and keys.STUDENT_RECORD not in content
    context = _context(setup, node_id=40, partition_id=0)
    reply, update, _ = _send(context, content, round=0, message_type=keys.MESSAGE_TYPE_QUERY_LOGITS)

    check_payload_keys(reply.content, keys.ALLOWED_REPLY_KEYS)
    assert isinstance(update, ClientUpdate)
    assert update.generator_delta is None
    assert keys.GENERATOR_UPDATE_RECORD not in reply.content
    assert torch.equal(update.logits, setup.host0.logits(instruction.samples).half())
    assert update.report.metrics == {}
    assert HOST_STATE_RECORD not in context.state


def test_one_log_line_per_served_round(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    context = _context(setup, node_id=50, partition_id=1)
    with caplog.at_level(logging.INFO, logger="fed_dfkd.client"):
        _serve(context, setup.rounds[0])
        _serve(context, setup.rounds[1])
    served = [r for r in caplog.records if r.name == "fed_dfkd.client" and " served " in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in served] == ["round 0", "round 1"]


# --- refusals ------------------------------------------------------------------------------------


def _with_spec(instruction: RoundInstruction, spec_bytes: bytes) -> RecordDict:
    content = instruction_to_recorddict(instruction)
    content[keys.SPEC_RECORD] = ConfigRecord({keys.ROUND_SPEC_KEY: spec_bytes})
    return content


def test_wrong_protocol_version_is_refused(setup: Setup) -> None:
    spec = round_spec_to_proto(setup.rounds[1])
    spec.protocol_version = 2
    context = _context(setup, node_id=60, partition_id=0)
    refusal = _refusal(context, _with_spec(setup.rounds[1], spec.SerializeToString()), round=1)
    assert refusal.reason == "protocol_mismatch"
    assert refusal.round == 1
    assert "2" in refusal.message
    assert HOST_STATE_RECORD not in context.state


@pytest.mark.parametrize(
    ("change", "reason", "words"),
    [
        ({"config_hash": "0123456789abcdef"}, "incompatible_manifest", "another experiment config"),
        ({"samples": torch.zeros(4, 1, 9, 9, dtype=torch.uint8)}, "incompatible_manifest",
         "uint8 [N, 1, 8, 8]"),
        ({"method": "dfad"}, "bad_request", "method"),
        # A server may not impose (or drop) a privacy mechanism the owner did not agree to.
        ({"privacy": PrivacySpecData(level="central", generator_clip=1.0, logit_clip=1.0,
                                     noise_multiplier=0.1, delta=1e-5)},
         "bad_request", "privacy mechanism"),
    ],
    ids=["config-hash", "sample-shape", "method", "privacy"],
)
def test_an_instruction_the_teacher_cannot_serve_is_refused(
    setup: Setup, change: dict[str, Any], reason: str, words: str
) -> None:
    instruction = dataclasses.replace(setup.rounds[1], **change)
    context = _context(setup, node_id=61, partition_id=0)
    reply, refusal, _ = _send(context, instruction_to_recorddict(instruction), round=1)
    assert isinstance(refusal, RefusalData)
    assert (refusal.reason, refusal.round) == (reason, 1)
    assert words in refusal.message
    manifest = manifest_from_recorddict(reply.content)
    _, teacher_manifest = load_teacher(teacher_path(setup.out, 0))
    assert manifest is not None
    assert (manifest.dataset, manifest.architecture, manifest.hash) == (
        "digits", teacher_manifest.architecture, teacher_manifest.config_hash)
    shape = (manifest.num_classes, manifest.in_channels, manifest.image_height, manifest.image_width)
    assert shape == (10, 1, 8, 8)
    assert manifest.train_size == teacher_manifest.train_size
    assert list(manifest.class_histogram) == teacher_manifest.class_histogram
    assert HOST_STATE_RECORD not in context.state


@pytest.mark.parametrize(
    "damage",
    ["garbage-spec", "unknown-record", "missing-samples"],
)
def test_an_undecodable_instruction_is_a_bad_request(setup: Setup, damage: str) -> None:
    content = instruction_to_recorddict(setup.rounds[1])
    if damage == "garbage-spec":
        garbage = b"\xff\xff\xff\xff not a protobuf"
        content[keys.SPEC_RECORD] = ConfigRecord({keys.ROUND_SPEC_KEY: garbage})
    elif damage == "unknown-record":
        content["teacher_weights"] = ConfigRecord({"x": b"1"})
    else:
        del content[keys.SAMPLES_RECORD]
    context = _context(setup, node_id=62, partition_id=0)
    refusal = _refusal(context, content, round=1)
    assert refusal.reason == "bad_request"
    assert refusal.round == 1  # from the spec, or the message's group id when it is unreadable
    assert refusal.message.startswith("undecodable instruction")


@pytest.mark.parametrize(
    ("message_type", "mode"),
    [
        (keys.MESSAGE_TYPE_TRAIN_DISTILL, "logits_only"),
        (keys.MESSAGE_TYPE_QUERY_LOGITS, "generator_and_logits"),
    ],
)
def test_a_mode_the_message_type_does_not_serve_is_refused(
    setup: Setup, message_type: str, mode: str
) -> None:
    instruction = setup.rounds[0]
    if mode == "logits_only":
        instruction = dataclasses.replace(instruction, mode=mode, generator_state={}, student_state={})
    context = _context(setup, node_id=63, partition_id=0)
    refusal = _refusal(context, instruction_to_recorddict(instruction), round=0,
                       message_type=message_type)
    assert refusal.reason == "bad_request"
    assert keys.MESSAGE_TYPE_BY_MODE[mode] in refusal.message


def test_a_missing_teacher_file_is_refused(setup: Setup, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    context = _context(setup, node_id=70, partition_id=0, **{"teacher-path": str(missing)})
    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert refusal.reason == "internal_error"
    assert str(missing) in refusal.message


def test_no_teacher_configured_is_refused(setup: Setup) -> None:
    context = _context(setup, node_id=71, partition_id=0)
    del context.run_config["teachers"]
    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert refusal.reason == "internal_error"
    assert "teacher-path" in refusal.message


def test_a_missing_config_is_refused(setup: Setup) -> None:
    context = _context(setup, node_id=72, partition_id=0)
    context.run_config["config"] = "configs/no_such_experiment.yaml"
    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert refusal.reason == "internal_error"
    assert "no_such_experiment.yaml" in refusal.message


def test_another_partitions_teacher_is_an_incompatible_manifest(setup: Setup, tmp_path: Path) -> None:
    wrong = teacher_path(tmp_path, 0)
    wrong.parent.mkdir(parents=True)
    shutil.copy(teacher_path(setup.out, 1), wrong)
    context = _context(setup, node_id=73, partition_id=0, **{"teachers-dir": str(tmp_path)})
    reply, refusal, _ = _send(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert isinstance(refusal, RefusalData)
    assert refusal.reason == "incompatible_manifest"
    assert "client_1" in refusal.message


def test_a_relative_config_path_is_found_in_the_app_folder(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    context = _context(setup, node_id=74, partition_id=0)
    context.run_config["config"] = "configs/quickstart.yaml"
    _assert_same_update(_serve(context, setup.rounds[0]), setup.reference[0])


def test_a_failure_while_serving_is_an_internal_error(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: TeacherHost, instruction: RoundInstruction) -> ClientUpdate:
        raise RuntimeError("synthesis blew up")

    monkeypatch.setattr(TeacherHost, "serve", broken)
    context = _context(setup, node_id=75, partition_id=0)
    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[0]), round=0)
    assert refusal.reason == "internal_error"
    assert "synthesis blew up" in refusal.message
    assert HOST_STATE_RECORD not in context.state


def test_a_damaged_stored_state_is_refused_not_reset(setup: Setup) -> None:
    context = _context(setup, node_id=76, partition_id=0)
    context.state[HOST_STATE_RECORD] = ConfigRecord({"round": 0})
    refusal = _refusal(context, instruction_to_recorddict(setup.rounds[1]), round=1)
    assert refusal.reason == "internal_error"
    assert HOST_STATE_RECORD in refusal.message
