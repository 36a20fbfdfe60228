"""``federation.generators: per_owner``: the server keeps each owner's fitted generator apart and
draws the next round's samples from every one of them, on the latents each was fitted to."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import build_pseudo_generator
from fed_dfkd.data import DatasetInfo
from fed_dfkd.data.teachers import TeacherManifest
from fed_dfkd.federated import FederatedServer
from fed_dfkd.models import build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.protocol import ClientUpdate, RefusalData
from fed_dfkd.samples import assigned_labels, draw_pseudo_batches, round_latents
from fed_dfkd.seeding import make_rng
from fed_dfkd.teacher_host import TeacherHost

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))
BATCH = 10


def _config(federation: dict | None = None, method: dict | None = None, distill: dict | None = None,
            **sections):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half",
                   **sections.pop("models", {})},
        "method": {"name": "adadfkd", "generator_reset": True, "generator_latents": "round",
                   "generator_steps": 2, **(method or {})},
        "distill": {"batch_size": BATCH, "student_steps": 2, "optimizer": "sgd", "pseudo_batches": 1,
                    "replay_rounds": 100, "replay_sampling": "samples", **(distill or {})},
        "federation": {"rounds": 4, "num_clients": 3, "generators": "per_owner", **(federation or {})},
        **sections,
    })


# --------------------------------------------------------------------------------------------
# The classes an owner's batch is fitted to


def test_labels_are_balanced_without_counts_and_proportional_with_them() -> None:
    rng = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    balanced = assigned_labels(20, 10, rng=rng())
    assert torch.bincount(balanced, minlength=10).tolist() == [2] * 10
    # The balanced draw is the one round_latents made before owners existed.
    assert torch.equal(balanced, (torch.arange(20) % 10)[torch.randperm(20, generator=rng())])
    # 60 / 30 / 10 % of 10 rows: 6, 3, 1.
    own = assigned_labels(10, 4, rng=rng(), class_counts=[60, 30, 10, 0])
    assert torch.bincount(own, minlength=4).tolist() == [6, 3, 1, 0]
    assert not torch.equal(own, torch.sort(own).values)  # shuffled
    # Quotas 3.5 / 3.5 / 3.0 of 10: the floors give 9, the one left goes to the lower class.
    assert torch.bincount(assigned_labels(10, 3, rng=rng(), class_counts=[7, 7, 6]),
                          minlength=3).tolist() == [4, 3, 3]
    # Largest remainder: quotas 0.4 / 0.6 / 4.0 of 5 give 0, 1, 4.
    assert torch.bincount(assigned_labels(5, 3, rng=rng(), class_counts=[2, 3, 20]),
                          minlength=3).tolist() == [0, 1, 4]
    # No counts at all (a DP teacher that released none): balanced.
    assert torch.equal(assigned_labels(20, 10, rng=rng(), class_counts=[0] * 10), balanced)
    assert torch.equal(assigned_labels(20, 10, rng=rng(), class_counts=[]), balanced)


@pytest.mark.parametrize("counts", [[1, 2], [1, -1, 3]])
def test_bad_counts_are_refused(counts) -> None:
    with pytest.raises(ValueError, match="class_counts"):
        assigned_labels(6, 3, rng=torch.Generator().manual_seed(0), class_counts=counts)


def test_each_owner_has_its_own_seeded_latents_and_the_counts_leave_z_alone() -> None:
    generator = build_pseudo_generator(_config(), INFO)

    def latents(**kw):
        return round_latents(generator, seed=3, round_index=5, batch_size=BATCH, num_classes=10, **kw)

    shared, first, again, second = latents(), latents(owner=1), latents(owner=1), latents(owner=2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[0], shared[0])
    skewed = latents(owner=1, class_counts=[9, 1] + [0] * 8)
    assert torch.equal(skewed[0], first[0])
    assert torch.bincount(skewed[1], minlength=10).tolist() == [9, 1] + [0] * 8


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides, field", [
    ({"method": {"generator_reset": False}}, "method.generator_reset"),
    ({"method": {"generator_latents": "fresh"}}, "method.generator_latents"),
    ({"models": {"generator": {"conditional": True}}}, "models.generator.conditional"),
    ({"privacy": {"level": "client", "mechanism": "central", "noise_multiplier": 1.0,
                  "generator_clip": 1.0, "logit_clip": 1.0},
      "distill": {"ensemble": "mean"}, "federation": {"update_aggregation": "mean"}}, "privacy.mechanism"),
])
def test_per_owner_refuses_what_it_cannot_serve(overrides, field) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        _config(**overrides)
    assert "per_owner" in str(error.value)


def test_logits_only_cannot_have_per_owner_generators() -> None:
    with pytest.raises(ConfigError, match="per_owner"):
        _config(federation={"mode": "logits_only"}, method={"generator_reset": False,
                                                             "generator_latents": "fresh"})


# --------------------------------------------------------------------------------------------
# The server


def _teacher(seed: int) -> NormalizedClassifier:
    torch.manual_seed(seed)
    net = build_classifier("cnn_digits_bn", num_classes=10, in_channels=1, image_size=8)
    return NormalizedClassifier(net, INFO.mean, INFO.std).eval()


def _manifest(partition: int, histogram: list[int]) -> TeacherManifest:
    return TeacherManifest(
        architecture="cnn_digits_bn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.25],
        class_names=list(INFO.class_names), dataset="digits", partition_id=partition, num_clients=3,
        train_size=sum(histogram), class_histogram=histogram, test_accuracy=0.5, config_hash="x",
        created_at="now", wall_seconds=0.0,
    )


HISTOGRAMS = {0: [50, 50, 0, 0, 0, 0, 0, 0, 0, 0], 2: [0, 0, 0, 0, 0, 0, 0, 10, 20, 70]}


def _hosts(cfg) -> dict[int, TeacherHost]:
    return {k: TeacherHost(cfg, _teacher(k), _manifest(k, h), INFO) for k, h in HISTOGRAMS.items()}


def _serve(hosts: dict[int, TeacherHost], instruction) -> list[ClientUpdate]:
    updates = [host.serve(instruction) for host in hosts.values()]
    assert not any(isinstance(u, RefusalData) for u in updates)
    return updates  # type: ignore[return-value]


def test_each_owner_fits_its_own_batch_to_its_own_classes(monkeypatch) -> None:
    cfg = _config()
    host = _hosts(cfg)[2]
    seen = []
    original = host.synthesizer.step
    monkeypatch.setattr(host.synthesizer, "step",
                        lambda **kw: (seen.append(kw["latents"]), original(**kw))[1])
    instruction, _ = FederatedServer(cfg, INFO).plan_round()
    host.serve(instruction)
    z, y = seen[0]
    expected = round_latents(host.generator, seed=0, round_index=1, batch_size=BATCH, num_classes=10, owner=2)
    assert torch.equal(z, expected[0])
    assert torch.bincount(y, minlength=10).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 7]
    # owner_labels: balanced asks the same owner for every class.
    cfg = _config(federation={"owner_labels": "balanced"})
    host = _hosts(cfg)[2]
    seen.clear()
    original = host.synthesizer.step
    monkeypatch.setattr(host.synthesizer, "step",
                        lambda **kw: (seen.append(kw["latents"]), original(**kw))[1])
    host.serve(FederatedServer(cfg, INFO).plan_round()[0])
    assert torch.equal(seen[0][0], expected[0])
    assert torch.bincount(seen[0][1], minlength=10).tolist() == [1] * 10


def test_the_next_round_draws_exactly_the_batch_each_owner_fitted() -> None:
    cfg = _config()
    server, hosts = FederatedServer(cfg, INFO), _hosts(cfg)
    instruction, samples = server.plan_round()
    assert samples.shape == (1, BATCH, 1, 8, 8)  # round 0: nobody has fitted a G yet
    # The fresh G does not travel: every owner builds the round's seeded initialisation.
    assert instruction.generator_state == {}
    sent = build_pseudo_generator(cfg, INFO, reset_round=0).state_dict()
    updates = _serve(hosts, instruction)
    server.complete_round(samples, updates)
    assert sorted(server.owner_generators) == [0, 2]
    for update in updates:
        kept = server.owner_generators[update.report.partition_id]
        for name, delta in update.generator_delta.items():
            torch.testing.assert_close(kept[name], sent[name] + delta)
    # The server's own G was not moved by the updates: it is the fresh G it sent.
    for name, tensor in server.coordinator.generator.state_dict().items():
        assert torch.equal(tensor, sent[name]), name

    instruction, samples = server.plan_round()
    assert samples.shape == (2, BATCH, 1, 8, 8)
    for index, (owner, host) in enumerate(sorted(hosts.items())):
        # The owner's local G after its steps, on the latents it fitted: the same pixels.
        fitted = draw_pseudo_batches(
            host.generator, num_batches=1, batch_size=BATCH, rng=make_rng(0, "unused"),
            batch_statistics=True,
            latents=round_latents(host.generator, seed=0, round_index=1, batch_size=BATCH,
                                  num_classes=10, owner=owner))
        difference = (samples[index].int() - fitted[0].int()).abs()
        assert int(difference.max()) <= 1, owner  # float rounding at a uint8 level's edge
        assert float(difference.float().mean()) < 0.01
    assert not torch.equal(samples[0], samples[1])
    # The samples travel as pixels, every owner's batch.
    assert torch.equal(instruction.samples, samples.flatten(0, 1))


def test_an_owner_that_does_not_reply_is_not_drawn_from() -> None:
    cfg = _config()
    server, hosts = FederatedServer(cfg, INFO), _hosts(cfg)
    instruction, samples = server.plan_round()
    server.complete_round(samples, _serve(hosts, instruction))
    instruction, samples = server.plan_round()
    server.complete_round(samples, _serve({2: hosts[2]}, instruction))
    assert sorted(server.owner_generators) == [2]
    assert server.plan_round()[1].shape == (1, BATCH, 1, 8, 8)


def test_the_kept_generators_survive_a_checkpoint() -> None:
    cfg = _config()
    server, hosts = FederatedServer(cfg, INFO), _hosts(cfg)
    instruction, samples = server.plan_round()
    server.complete_round(samples, _serve(hosts, instruction))
    state = server.state_dict()
    resumed = FederatedServer(cfg, INFO)
    resumed.load_state_dict(state)
    assert sorted(resumed.owner_generators) == [0, 2]
    assert torch.equal(resumed.plan_round()[1], server.plan_round()[1])
    del state["owner_generators"]
    with pytest.raises(ValueError, match="per-owner generators"):
        FederatedServer(cfg, INFO).load_state_dict(state)


def test_shared_generators_still_average_the_updates() -> None:
    cfg = _config(federation={"generators": "shared"})
    server, hosts = FederatedServer(cfg, INFO), _hosts(cfg)
    instruction, samples = server.plan_round()
    sent = build_pseudo_generator(cfg, INFO, reset_round=0).state_dict()
    updates = _serve(hosts, instruction)
    server.complete_round(samples, updates)
    assert server.owner_generators == {}
    sizes = [u.report.train_size for u in updates]
    name = next(k for k, v in updates[0].generator_delta.items() if v.dim() > 1)
    mean = sum(s * u.generator_delta[name] for s, u in zip(sizes, updates)) / sum(sizes)
    torch.testing.assert_close(server.coordinator.generator.state_dict()[name], sent[name] + mean)
    assert server.plan_round()[1].shape == (1, BATCH, 1, 8, 8)


def test_an_owner_that_keeps_its_generator_refuses_a_round_without_one() -> None:
    cfg = _config(federation={"generators": "shared"}, method={"generator_reset": False})
    instruction, _ = FederatedServer(cfg, INFO).plan_round()
    assert instruction.generator_state
    refusal = _hosts(cfg)[0].serve(dataclasses.replace(instruction, generator_state={}))
    assert isinstance(refusal, RefusalData) and refusal.reason == "bad_request"
    assert "no generator weights" in refusal.message
