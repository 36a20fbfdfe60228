"""Mode ``logits_only`` end to end, in-process: black-box teachers, G trained on the server.

- the run completes; every instruction is a ``query.logits`` message whose samples are the
  student's batches followed by the zeroth-order queries, and no reply carries a generator update;
- G's weights change every round (the server's zeroth-order steps), and with ``zo_batch_size: 0``
  they do not (G stays at its initialisation, as before this mode trained G);
- the queries cost exactly their extra samples on the wire, both ways;
- resume: a server stopped after round 2 and resumed ends in the state of an uninterrupted run,
  G's server optimizer included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message

import server.loop as loop
from fed_dfkd.cli.main import main
from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator
from fed_dfkd.data import dataset_info
from fed_dfkd.federated import FederatedServer
from fed_dfkd.transport import keys
from runhelpers import QUICKSTART, assert_same_state, load_checkpoint, read_metrics, read_report, set_args, stop_before_round

pytestmark = pytest.mark.integration

ROUNDS, CLIENTS, QUERIES, DIRECTIONS = 3, 3, 8, 2
BATCH, STUDENT_STEPS = 32, 2
FAST = [
    f"federation.rounds={ROUNDS}",
    "distill.student_steps=2",
    # One labelled batch per student step, no replay (the quickstart file labels 5 and replays 4).
    "distill.pseudo_batches=null",
    "distill.replay_rounds=0",
    "method.generator_steps=1",
    "models.pretrain.epochs=2",
    f"distill.batch_size={BATCH}",
    "method.negative_bank_size=64",
    "runtime.progress=none",
    f"federation.num_clients={CLIENTS}",
    "federation.mode=logits_only",
    f"federation.zo_batch_size={QUERIES}",
    f"federation.zo_directions={DIRECTIONS}",
]
QUERY_SAMPLES = QUERIES * (1 + DIRECTIONS)
IMAGE_BYTES = 8 * 8  # digits: one uint8 channel of 8x8
CLASSES = 10


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def initial_generator_state() -> dict[str, torch.Tensor]:
    cfg = load_config(QUICKSTART, FAST)
    return build_pseudo_generator(cfg, dataset_info(cfg.data.dataset)).state_dict()


class Run:
    """An in-process run with every message recorded and G's weights after every round."""

    def __init__(self, out: Path, teachers: Path, overrides: list[str]) -> None:
        self.out = out
        self.instructions: list[Message] = []
        self.replies: list[Message] = []
        self.generator_after_round: list[dict[str, torch.Tensor]] = []
        self.report = self._run(teachers, overrides)

    def _run(self, teachers: Path, overrides: list[str]) -> dict[str, Any]:
        from client.app import app as client_app
        from fed_dfkd.engine.inprocess import run_inprocess

        def recording_client(message: Message, context: Context) -> Message:
            self.instructions.append(message)
            reply = client_app(message, context)
            self.replies.append(reply)
            return reply

        complete_round = FederatedServer.complete_round

        def snapshot(server: FederatedServer, *args: Any, **kwargs: Any) -> dict[str, Any]:
            metrics = complete_round(server, *args, **kwargs)
            self.generator_after_round.append(
                {k: v.detach().clone() for k, v in server.coordinator.generator.state_dict().items()})
            return metrics

        settings = loop.ServerSettings(config=QUICKSTART, out=self.out, overrides=tuple(overrides),
                                       teachers=teachers, engine="inprocess")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FederatedServer, "complete_round", snapshot)
            run_inprocess(settings.to_run_config(), num_nodes=CLIENTS, client_app=recording_client)
        return read_report(self.out)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST)]) == 0
    return out


@pytest.fixture(scope="module")
def zeroth_order_run(tmp_path_factory, teachers) -> Run:
    return Run(tmp_path_factory.mktemp("zo") / "run", teachers, FAST)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, teachers) -> Run:
    """The same federation with the queries off: G is never trained."""
    return Run(tmp_path_factory.mktemp("fixed") / "run", teachers, [*FAST, "federation.zo_batch_size=0"])


def test_the_run_completes_with_logit_queries_only(zeroth_order_run):
    report = zeroth_order_run.report
    assert report["status"] == "completed" and report["rounds_completed"] == ROUNDS
    assert report["mode"] == "logits_only" and report["rejected_replies"] == 0
    assert len(zeroth_order_run.instructions) == len(zeroth_order_run.replies) == ROUNDS * CLIENTS
    labelled = STUDENT_STEPS * BATCH
    for message in zeroth_order_run.instructions:
        assert message.metadata.message_type == keys.MESSAGE_TYPE_QUERY_LOGITS
        assert keys.GENERATOR_RECORD not in message.content and keys.STUDENT_RECORD not in message.content
        samples = message.content[keys.SAMPLES_RECORD][keys.SAMPLES_ARRAY].numpy()
        assert samples.shape == (labelled + QUERY_SAMPLES, 1, 8, 8) and samples.dtype.name == "uint8"
    for reply in zeroth_order_run.replies:
        assert not reply.has_error()
        assert keys.GENERATOR_UPDATE_RECORD not in reply.content
        assert reply.content[keys.LOGITS_RECORD][keys.LOGITS_ARRAY].numpy().shape == (
            labelled + QUERY_SAMPLES, CLASSES)

    metrics = read_metrics(zeroth_order_run.out)
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    for m in metrics:
        assert m["zo_query_samples"] == QUERY_SAMPLES
        assert m["zo_gradient_norm"] > 0 and m["zo_step_norm"] > 0
        for key in ("generator_zo_one_hot", "generator_zo_class_balance", "generator_loss",
                    "weight_one_hot", "weight_class_balance"):
            assert key in m, key
    assert "zeroth_order" in load_checkpoint(zeroth_order_run.out)["server"]


def test_g_moves_every_round_and_stays_put_without_queries(zeroth_order_run, untrained_run):
    initial = initial_generator_state()
    states = [initial, *zeroth_order_run.generator_after_round]
    assert len(states) == ROUNDS + 1
    for before, after in zip(states, states[1:]):
        assert not same_weights(before, after)
    assert len(untrained_run.generator_after_round) == ROUNDS
    assert all(same_weights(initial, state) for state in untrained_run.generator_after_round)
    assert "zeroth_order" not in load_checkpoint(untrained_run.out)["server"]


def test_the_queries_cost_exactly_their_extra_samples_on_the_wire(zeroth_order_run, untrained_run):
    queried, fixed = zeroth_order_run.report, untrained_run.report
    down = queried["bytes_down"] - fixed["bytes_down"]
    up = queried["bytes_up"] - fixed["bytes_up"]
    messages = ROUNDS * CLIENTS
    # Down: the uint8 query images; up: their float16 logits. Nothing else changes.
    assert down == messages * QUERY_SAMPLES * IMAGE_BYTES
    assert up == messages * QUERY_SAMPLES * CLASSES * 2


def test_a_stopped_and_resumed_server_equals_an_uninterrupted_run(
    zeroth_order_run, tmp_path, teachers, monkeypatch, capsys
):
    out = tmp_path / "resumed"
    stop_before_round(monkeypatch, 2)  # Ctrl-C as round 3 starts
    argv = ["simulate", "--config", str(QUICKSTART), "--out", str(out), "--teachers", str(teachers),
            *set_args(FAST)]
    assert main(argv) == 130
    monkeypatch.undo()
    assert load_checkpoint(out)["round"] == 2
    assert main([*argv, "--resume"]) == 0

    resumed, uninterrupted = load_checkpoint(out), load_checkpoint(zeroth_order_run.out)
    # Each run has its own run key (owners' ledgers); everything else is bit-identical.
    resumed["server"].pop("run_key"), uninterrupted["server"].pop("run_key")
    assert_same_state(resumed["server"], uninterrupted["server"], "server")
    assert resumed["server"]["zeroth_order"]["generator_optimizer"]["state"]  # Adam moments saved
    assert read_report(out)["bytes_down"] == zeroth_order_run.report["bytes_down"]
