"""``fed-dfkd simulate`` end to end on the quickstart config, shrunk to seconds.

- in-process: every output of ``fed-dfkd distill`` plus the federation's report keys (issue 3
  item 6), one metrics line per round, the run folder rules;
- malformed replies (NaN logits, wrong logits shape, another protocol version, an oversize ΔG)
  from one of three nodes are rejected with their reason logged, and the run goes on;
- too few valid replies: the round is retried, then the server stops cleanly with a clear report;
- resume: a server stopped after round 2 and resumed ends in the state of an uninterrupted run;
- the Ray engine (slow): same result as the in-process engine within float tolerance.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import server.loop as loop
from fed_dfkd.augment import blend_pairs
from fed_dfkd.cli.main import main
from fed_dfkd.config import load_config
from fed_dfkd.protocol import ClientUpdate
from fed_dfkd.seeding import make_rng
from fed_dfkd.transport import update_from_recorddict, update_to_recorddict
from runhelpers import PNG_MAGIC, QUICKSTART, REPO, TIMING_KEYS, assert_same_state, load_checkpoint, read_metrics, read_report, set_args, stop_before_round, tiny

pytestmark = pytest.mark.integration

ROUNDS = 3
FAST = tiny(rounds=ROUNDS)
FEDERATION_REPORT_KEYS = ("mode", "engine", "sample_rate", "bytes_up", "bytes_down",
                          "bytes_per_round", "rejected_replies", "refusals")
HISTORY_KEYS = ("round", "student_accuracy", "replies", "bytes", "seconds")


def simulate(out: Path, *extra: str, teachers: Path | None = None, overrides: list[str] = FAST) -> int:
    argv = ["simulate", "--config", str(QUICKSTART), "--out", str(out), *set_args(overrides)]
    if teachers is not None:
        argv += ["--teachers", str(teachers)]
    return main([*argv, *extra])


def client_states(out: Path) -> dict[int, Any]:
    """The clients' Context.state the last checkpoint names, by partition id."""
    files = load_checkpoint(out)["client_state_files"]
    return {k: torch.load(out / "checkpoints" / "clients" / name, map_location="cpu", weights_only=False)
            for k, name in files.items()}


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    """The three owners' teachers, pretrained once for the module."""
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(out), *set_args(FAST)]) == 0
    return out


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory, teachers) -> Path:
    """Three rounds, uninterrupted, in-process. Read only."""
    out = tmp_path_factory.mktemp("run") / "a"
    assert simulate(out, teachers=teachers) == 0
    return out


# --------------------------------------------------------------------------------------------
# The run folder and the report
# --------------------------------------------------------------------------------------------


def test_simulate_inprocess_writes_every_output_and_report_key(tmp_path, capsys):
    out = tmp_path / "run"
    assert simulate(out) == 0  # no --teachers: pretrains the owners' teachers under OUT/teachers
    assert "student accuracy" in capsys.readouterr().out
    assert all((out / "teachers" / f"client_{k}.pt").is_file() for k in range(3))
    assert not (out / "teachers" / "central.pt").exists()
    for name in ("config.resolved.yaml", "metrics.jsonl", "report.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    for name in ("accuracy.png", "samples.png", "per_class.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [m["round"] for m in metrics] == [1, 2, 3]
    assert all(m["replies"] == 3 and m["sampled"] == 3 and m["rejected"] == 0 for m in metrics)
    assert all(m["bytes"] == m["bytes_up"] + m["bytes_down"] > 0 for m in metrics)

    report = read_report(out)
    missing = [k for k in FEDERATION_REPORT_KEYS if k not in report]
    assert not missing, f"report.json lacks {missing}"
    assert report["mode"] == "generator_and_logits" and report["engine"] == "inprocess"
    assert report["sample_rate"] == 1.0 and report["status"] == "completed"
    assert report["rejected_replies"] == 0 and report["refusals"] == 0
    assert report["rounds_completed"] == ROUNDS
    assert report["bytes_up"] == sum(m["bytes_up"] for m in metrics)
    assert report["bytes_down"] == sum(m["bytes_down"] for m in metrics)
    assert report["bytes_per_round"] == pytest.approx((report["bytes_up"] + report["bytes_down"]) / ROUNDS)
    # Down: one instruction (G, S, the uint8 samples, the spec), the same to each of 3 clients.
    assert all(m["bytes_down"] % 3 == 0 for m in metrics)
    # The teachers' accuracies come from their manifests; the ensemble from loading them.
    manifests = [json.loads((out / "teachers" / f"client_{k}.json").read_text()) for k in range(3)]
    assert report["teacher_accuracies"] == [m["test_accuracy"] for m in manifests]
    assert 0 <= report["ensemble_accuracy"] <= 1
    assert [h["round"] for h in report["history"]] == [1, 2, 3]
    for entry in report["history"]:
        assert all(key in entry for key in HISTORY_KEYS), entry
        assert entry["replies"] == 3 and entry["bytes"] > 0 and 0 <= entry["student_accuracy"] <= 1
    assert report["student_accuracy"] == report["history"][-1]["student_accuracy"]

    checkpoint = load_checkpoint(out)
    assert checkpoint["round"] == ROUNDS and checkpoint["server"]["coordinator"]["round"] == ROUNDS
    # Each client's Context.state, one file per node and version; only the files the last two
    # checkpoints name are kept.
    files = checkpoint["client_state_files"]
    assert set(files) == {0, 1, 2} and all(name.endswith(f".round_{ROUNDS}.pt") for name in files.values())
    previous = torch.load(out / "checkpoints" / "previous.pt", map_location="cpu", weights_only=False)
    kept = {p.name for p in (out / "checkpoints" / "clients").iterdir()}
    assert kept == set(files.values()) | set(previous["client_state_files"].values())


def test_a_second_run_into_the_same_folder_is_refused(completed_run, tmp_path, teachers, capsys):
    before = (completed_run / "metrics.jsonl").read_bytes()
    assert simulate(completed_run, teachers=teachers) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert (completed_run / "metrics.jsonl").read_bytes() == before


def test_resume_without_a_checkpoint_is_refused(tmp_path, teachers, capsys):
    assert simulate(tmp_path / "empty", "--resume", teachers=teachers) == 2
    assert "no checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_state", ["restored", "lost"])
def test_a_server_stopped_after_round_two_and_resumed_equals_an_uninterrupted_run(
    completed_run, tmp_path, teachers, monkeypatch, capsys, context_state
):
    """``lost``: as in a deployment, where the resumed server is a new Flower run and every
    Context.state starts empty; the owners continue from their own copies (OUT/owners)."""
    out = tmp_path / "b"
    original = stop_before_round(monkeypatch, 2)  # Ctrl-C as round 3 starts
    assert simulate(out, teachers=teachers) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out)["round"] == 2
    run_key = load_checkpoint(out)["server"]["run_key"]

    calls = {"count": 0}

    def counted(self):
        calls["count"] += 1
        return original(self)

    monkeypatch.setattr(loop.ServerLoop, "run_round", counted)
    if context_state == "lost":
        from client.app import clear_host_cache

        monkeypatch.setattr(loop.NodeStateStore, "load", lambda self, grid, files: None)
        clear_host_cache()
    assert simulate(out, "--resume", teachers=teachers) == 0
    assert calls["count"] == 1, "resume must run only the missing round"

    resumed, uninterrupted = load_checkpoint(out), load_checkpoint(completed_run)
    # G, S, the student's optimizer and curriculum, and every client's local state: bit-exact.
    # The same run to its owners (their ledgers), a different run from the uninterrupted one.
    assert resumed["server"].pop("run_key") == run_key != uninterrupted["server"].pop("run_key")
    assert_same_state(resumed["server"], uninterrupted["server"], "server")
    assert_same_state(client_states(out), client_states(completed_run), "client states")
    assert_same_state(resumed["totals"], uninterrupted["totals"], "totals")
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(completed_run))
    report = read_report(out)
    assert report["rounds_completed"] == ROUNDS and report["status"] == "completed"
    assert report["bytes_up"] == read_report(completed_run)["bytes_up"]


PER_OWNER = FAST + ["federation.generators=per_owner", "method.generator_reset=true",
                    "method.generator_latents=round", "distill.pseudo_batches=1",
                    "distill.replay_rounds=100", "distill.replay_sampling=samples",
                    "distill.final_fit_steps=5"]


def assert_interrupted_run_resumes_to(state: dict[str, Any], cut: Path, *, teachers: Path,
                                      overrides: list[str], monkeypatch) -> None:
    """A run into ``cut`` stopped as round 3 starts, then resumed, ends in the server ``state``
    of the uninterrupted run (its ``run_key`` aside: each run draws its own)."""
    stop_before_round(monkeypatch, 2)
    assert simulate(cut, teachers=teachers, overrides=overrides) == 130
    monkeypatch.undo()
    assert simulate(cut, "--resume", teachers=teachers, overrides=overrides) == 0
    resumed = load_checkpoint(cut)["server"]
    resumed.pop("run_key")
    assert_same_state(resumed, {k: v for k, v in state.items() if k != "run_key"}, "server")


def test_per_owner_generators_run_and_resume_to_the_uninterrupted_state(tmp_path, teachers, monkeypatch):
    """Each round after the first draws one batch per owner that replied to the last one, and the
    kept generators are part of the checkpoint: an interrupted run resumes to the same state.
    The last round's final fit on the pool is part of that round (resumed too), and
    bench/pool_retrain.py redoes it from the checkpoint to the reported accuracy."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert simulate(whole, teachers=teachers, overrides=PER_OWNER) == 0
    state = load_checkpoint(whole)["server"]
    assert sorted(state["owner_generators"]) == [0, 1, 2]
    # The pool: round 1 drew one batch from the fresh G, rounds 2 and 3 one batch per owner.
    pool = state["coordinator"]["replay"]["entries"]
    assert [tuple(images.shape[:2]) for images, _ in pool] == [(1, 32), (3, 32), (3, 32)]
    assert [h["replies"] for h in read_report(whole)["history"]] == [3, 3, 3]

    assert_interrupted_run_resumes_to(state, cut, teachers=teachers, overrides=PER_OWNER, monkeypatch=monkeypatch)
    last = read_metrics(whole)[-1]
    assert last["final_fit_samples"] == 7 * 32 and "final_fit_samples" not in read_metrics(whole)[-2]

    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool_retrain.py"), "--run", str(whole)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    final = done.stdout.strip().splitlines()[-1]
    assert final.startswith("chunk 3/3 (5 steps)")
    report = read_report(whole)
    assert float(final.rsplit(" ", 1)[1]) == pytest.approx(report["student_accuracy"], abs=5e-5)
    assert report["student_accuracy_before_fit"] == last["student_accuracy_before_fit"]  # the online one

    # --relabel with the run's own rule (class_weighted) and teachers gives back the pool's
    # targets, up to the float16 logits of the wire; consensus labels the same samples too.
    spec = importlib.util.spec_from_file_location("pool_retrain", REPO / "bench" / "pool_retrain.py")
    retrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retrain)
    images, stored = retrain.pool(whole, None, "all")
    again = retrain.relabeller(teachers / "teachers", 3, "class_weighted")(images)
    assert torch.allclose(again.exp(), stored.float().exp(), atol=2e-3)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool_retrain.py"), "--run", str(whole),
                           "--teachers", str(teachers / "teachers"), "--relabel", "consensus",
                           "--mixup-queries", "64", "--steps", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "relabelled by consensus: mean top probability" in done.stdout
    assert "pool 288 samples" in done.stdout  # 7 batches of 32 and 64 labelled blends
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool_retrain.py"), "--run", str(whole),
                           "--mixup-queries", "64"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0 and "--mixup-queries needs --relabel" in done.stderr


def test_query_batches_join_the_pool_and_resume_to_the_uninterrupted_state(tmp_path, teachers, monkeypatch):
    """``distill.hard_samples`` and ``distill.mixup_queries``: from round 2 on, one batch of pooled
    samples pushed towards the student's mistakes and one of blends of pooled pairs travel with the
    owners' batches, are labelled by every owner and pooled; the seeded draws resume to the same
    state, and bench/pool_retrain.py's ``--select generated`` drops exactly those batches again."""
    overrides = PER_OWNER + ["distill.hard_samples=32", "distill.mixup_queries=32"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert simulate(whole, teachers=teachers, overrides=overrides) == 0
    state = load_checkpoint(whole)["server"]
    pool = state["coordinator"]["replay"]["entries"]
    assert [tuple(images.shape[:2]) for images, _ in pool] == [(1, 32), (5, 32), (5, 32)]
    # The hard batch of round 3 is round 2's pool moved by at most the radius (0.1: 25.5 levels).
    earlier = torch.cat([pool[0][0].flatten(0, 1), pool[1][0].flatten(0, 1)])
    hard = pool[2][0][3].float()
    distance = (hard[:, None] - earlier.float()[None]).abs().amax(dim=(2, 3, 4)).min(dim=1).values
    assert distance.max() <= 0.1 * 255 + 0.5 and distance.max() > 0
    # Its blended batch: the round's seeded blends of exactly that pool, labelled by the owners
    # like the rest (the consensus of the three teachers on the blends, through float16).
    cfg = load_config(whole / "config.resolved.yaml")
    blends = blend_pairs(earlier, 32, alpha=cfg.distill.mixup_query_alpha,
                         generator=make_rng(cfg.runtime.seed, "mixup-queries", 2))
    assert torch.equal(pool[2][0][4], blends)
    spec = importlib.util.spec_from_file_location("pool_retrain", REPO / "bench" / "pool_retrain.py")
    retrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retrain)
    again = retrain.relabeller(teachers / "teachers", 3, cfg.distill.ensemble)(blends)
    assert torch.allclose(again.softmax(1), pool[2][1][4].float().softmax(1), atol=2e-3)
    assert [h["replies"] for h in read_report(whole)["history"]] == [3, 3, 3]

    assert_interrupted_run_resumes_to(state, cut, teachers=teachers, overrides=overrides, monkeypatch=monkeypatch)

    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool_retrain.py"), "--run", str(whole),
                           "--select", "generated", "--steps", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("pool 224 samples")  # 7 generated batches of 32


# --------------------------------------------------------------------------------------------
# Malformed replies and too few clients
# --------------------------------------------------------------------------------------------


def _recode(content: RecordDict, change: Callable[[ClientUpdate], ClientUpdate]) -> RecordDict:
    update = update_from_recorddict(content)
    assert isinstance(update, ClientUpdate)
    return update_to_recorddict(change(update), update_dtype="float32", logit_dtype="float16")


def nan_logits(update: ClientUpdate) -> ClientUpdate:
    logits = update.logits.clone()
    logits[0, 0] = float("nan")
    return dataclasses.replace(update, logits=logits)


def wrong_logits_shape(update: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(update, logits=update.logits[:, :-1].clone())


def other_protocol_version(update: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(update, report=dataclasses.replace(update.report, protocol_version=2))


def oversize_update(update: ClientUpdate) -> ClientUpdate:
    delta = {name: tensor * 1e6 for name, tensor in update.generator_delta.items()}
    return dataclasses.replace(update, generator_delta=delta)


# One corruption per round, each with the words its logged reason must contain.
CORRUPTIONS = [
    (nan_logits, "non-finite"),
    (wrong_logits_shape, "logits shape"),
    (other_protocol_version, "protocol_version 2"),
    (oversize_update, "L2 norm"),
]


def corrupting(client_app: Callable[[Message, Context], Message], *, partition: int):
    """The real ClientApp, whose replies from ``partition`` are corrupted (round r: CORRUPTIONS[r])."""

    def call(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] != partition:
            return reply
        change = CORRUPTIONS[int(message.metadata.group_id)][0]
        return Message(content=_recode(reply.content, change), reply_to=message)

    return call


def run_inprocess(out: Path, teachers: Path, overrides: list[str], *, client_app=None) -> dict[str, Any]:
    from client.app import app as real_client_app
    from fed_dfkd.engine.inprocess import run_inprocess as run

    settings = loop.ServerSettings(config=QUICKSTART, out=out, overrides=tuple(overrides),
                                   teachers=teachers, engine="inprocess")
    run(settings.to_run_config(), num_nodes=3, client_app=client_app or real_client_app)
    return read_report(out)


def test_malformed_replies_are_rejected_with_their_reason_and_the_run_goes_on(tmp_path, teachers, caplog):
    from client.app import app as client_app

    rounds = len(CORRUPTIONS)
    overrides = [*FAST, f"federation.rounds={rounds}", "federation.max_update_norm=1000"]
    with caplog.at_level(logging.WARNING, logger="server.loop"):
        report = run_inprocess(tmp_path / "run", teachers, overrides,
                               client_app=corrupting(client_app, partition=1))
    assert report["status"] == "completed" and report["rounds_completed"] == rounds
    assert report["rejected_replies"] == rounds and report["refusals"] == 0
    assert [h["replies"] for h in report["history"]] == [2] * rounds
    metrics = read_metrics(tmp_path / "run")
    assert [m["rejected"] for m in metrics] == [1] * rounds
    rejections = [r.getMessage() for r in caplog.records if "rejected the reply" in r.getMessage()]
    assert len(rejections) == rounds
    for r, (_, words) in enumerate(CORRUPTIONS):
        assert f"round {r + 1}:" in rejections[r] and words in rejections[r], rejections[r]


def test_too_few_valid_replies_retry_the_round_then_stop_cleanly(tmp_path, teachers, caplog, monkeypatch):
    from client.app import app as client_app

    def refuse_partitions_1_and_2(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_config["partition-id"] == 0 or int(message.metadata.group_id) == 0:
            return reply
        return Message(content=_recode(reply.content, nan_logits), reply_to=message)

    monkeypatch.setattr(loop, "POLL_INTERVAL", 0.01)
    overrides = [*FAST, "federation.min_replies=2"]
    with caplog.at_level(logging.WARNING, logger="server.loop"):
        report = run_inprocess(tmp_path / "run", teachers, overrides, client_app=refuse_partitions_1_and_2)
    assert report["status"] == "stopped" and report["rounds_completed"] == 1
    assert "too few clients" in report["stop_reason"] and "round 2" in report["stop_reason"]
    attempts = loop.ROUND_RETRIES + 1
    assert report["failed_attempts"] == attempts
    assert report["rejected_replies"] == 2 * attempts
    assert "stopping the federation" in caplog.text
    assert load_checkpoint(tmp_path / "run")["round"] == 1  # round 1 stays, resumable


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_client_sampling_is_seeded_by_round_and_sized_by_the_rate():
    nodes = [1005, 1001, 1003, 1002, 1004, 1000]
    first = loop.sample_nodes(nodes, sample_rate=0.5, seed=0, round_index=4)
    assert len(first) == 3 and first == sorted(first) and set(first) <= set(nodes)
    assert loop.sample_nodes(list(reversed(nodes)), sample_rate=0.5, seed=0, round_index=4) == first
    draws = {tuple(loop.sample_nodes(nodes, sample_rate=0.5, seed=0, round_index=r)) for r in range(20)}
    assert len(draws) > 1  # rounds differ
    assert loop.sample_nodes(nodes, sample_rate=0.01, seed=0, round_index=0).__len__() == 1
    assert loop.sample_nodes(nodes, sample_rate=1.0, seed=3, round_index=7) == sorted(nodes)


# --------------------------------------------------------------------------------------------
# The Ray engine
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ray_engine_gives_the_in_process_result(tmp_path):
    pytest.importorskip("ray")
    overrides = [*FAST, "federation.rounds=2", "federation.num_clients=2"]
    pretrain = tmp_path / "pretrain"
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(pretrain), *set_args(overrides)]) == 0
    assert simulate(tmp_path / "inprocess", teachers=pretrain, overrides=overrides) == 0
    assert simulate(tmp_path / "ray", "--engine", "ray", teachers=pretrain, overrides=overrides) == 0
    ray_report, inprocess_report = read_report(tmp_path / "ray"), read_report(tmp_path / "inprocess")
    assert ray_report["engine"] == "ray" and ray_report["rounds_completed"] == 2
    assert [h["replies"] for h in ray_report["history"]] == [2, 2]
    assert [h["student_accuracy"] for h in ray_report["history"]] == [
        h["student_accuracy"] for h in inprocess_report["history"]]
    assert ray_report["bytes_down"] == inprocess_report["bytes_down"]
    ray_student = load_checkpoint(tmp_path / "ray")["server"]["coordinator"]["student"]
    inprocess_student = load_checkpoint(tmp_path / "inprocess")["server"]["coordinator"]["student"]
    for name, tensor in inprocess_student.items():
        torch.testing.assert_close(ray_student[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert (tmp_path / "ray" / ".flwr").is_dir()  # Flower's state under the run folder


# --------------------------------------------------------------------------------------------
# Run config
# --------------------------------------------------------------------------------------------


def test_server_settings_round_trip_through_the_run_config(tmp_path):
    settings = loop.ServerSettings(config=QUICKSTART, out=tmp_path / "run",
                                   overrides=("federation.rounds=2", "distill.lr=0.1"),
                                   teachers=tmp_path / "pretrain", resume=True, engine="ray")
    run_config = settings.to_run_config()
    assert run_config["overrides"] == "federation.rounds=2;distill.lr=0.1"
    assert loop.ServerSettings.from_run_config(run_config) == settings
    # Flower's TOML run config: a string bool, an empty teachers folder (deployment).
    parsed = loop.ServerSettings.from_run_config({**run_config, "resume": "false", "teachers": ""})
    assert parsed.resume is False and parsed.teachers is None
    with pytest.raises(loop.UserError, match="'out'"):
        loop.ServerSettings.from_run_config({"config": str(QUICKSTART)})
    with pytest.raises(loop.UserError, match="resume"):
        loop.ServerSettings.from_run_config({**run_config, "resume": "maybe"})
    with pytest.raises(loop.UserError, match="may not contain"):
        loop.ServerSettings(config=QUICKSTART, out=tmp_path, overrides=("a.b=x;y",)).to_run_config()
