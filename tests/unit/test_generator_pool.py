"""A re-initialised generator per round and the pool of all rounds' samples
(``method.generator_reset``, ``distill.replay_rounds``, ``distill.replay_sampling``)."""

from __future__ import annotations

import pytest
import torch

from fed_dfkd.config import ConfigError, config_from_dict
from fed_dfkd.coordinator import Coordinator, build_pseudo_generator
from fed_dfkd.data import DatasetInfo
from fed_dfkd.distill import ReplayBuffer
from fed_dfkd.samples import round_latents

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), tuple(str(i) for i in range(10)))


def _config(method: dict | None = None, federation: dict | None = None, **distill):
    return config_from_dict({
        "data": {"dataset": "digits"},
        "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half"},
        "method": {"name": "adadfkd", **(method or {})},
        "distill": {"batch_size": 8, "student_steps": 2, "optimizer": "sgd", **distill},
        "federation": {"rounds": 4, **(federation or {})},
    })


def _round(index: int, batches: int = 2, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel, and targets whose every entry, hold (round, batch, sample)."""
    codes = torch.tensor([[index * 50 + b * 10 + s for s in range(batch)] for b in range(batches)],
                         dtype=torch.uint8)
    images = codes.view(batches, batch, 1, 1, 1).expand(batches, batch, 1, 2, 2).clone()
    targets = codes.view(batches, batch, 1).float().expand(batches, batch, 3).clone()
    return images, targets


def test_sample_replay_mixes_rounds_within_a_batch_and_keeps_each_target_with_its_image() -> None:
    buffer = ReplayBuffer(10, sampling="samples")
    for r in range(3):
        buffer.add(*_round(r))
    images, targets = buffer.schedule(50, rng=torch.Generator().manual_seed(0))
    assert images.shape == (50, 4, 1, 2, 2) and targets.shape == (50, 4, 3)
    codes = images[:, :, 0, 0, 0].long()
    assert torch.equal(targets[..., 0].long(), codes)  # pairs stay together
    assert torch.equal(images.amin(dim=(2, 3, 4)), images.amax(dim=(2, 3, 4)))  # whole samples
    rounds_per_batch = [len(set((row // 50).tolist())) for row in codes]
    assert max(rounds_per_batch) > 1  # one batch draws from several rounds
    assert set((codes // 50).flatten().tolist()) == {0, 1, 2}  # every stored round is reachable


def test_batch_replay_keeps_stored_batches_whole() -> None:
    buffer = ReplayBuffer(10)
    for r in range(3):
        buffer.add(*_round(r))
    images, _ = buffer.schedule(20, rng=torch.Generator().manual_seed(0))
    codes = images[:, :, 0, 0, 0].long()
    assert all(len(set((row // 10).tolist())) == 1 for row in codes)  # one (round, batch) each


def test_the_pool_keeps_replay_rounds_plus_one_rounds() -> None:
    buffer = ReplayBuffer(2, sampling="samples")
    for r in range(5):
        buffer.add(*_round(r))
    images, _ = buffer.batches()
    assert sorted(set((images[:, :, 0, 0, 0].long() // 50).flatten().tolist())) == [2, 3, 4]


def test_an_unknown_replay_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling"):
        ReplayBuffer(1, sampling="rows")
    with pytest.raises(ConfigError, match="distill.replay_sampling"):
        _config(replay_sampling="rows")


def test_reset_gives_the_round_s_seeded_initialisation_and_clears_the_optimizer() -> None:
    cfg = _config(method={"generator_reset": True})
    coordinator = Coordinator(cfg, INFO)
    generator = coordinator.generator
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.1)
    generator(generator.sample_latent(8, rng=torch.Generator().manual_seed(1))).mean().backward()
    optimizer.step()
    assert optimizer.state
    coordinator.round = 2
    coordinator.reset_generator(optimizer)
    assert not optimizer.state
    expected = build_pseudo_generator(cfg, INFO, reset_round=2).state_dict()
    for name, tensor in generator.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # A different round gives a different initialisation, and neither is the run's first G.
    other = build_pseudo_generator(cfg, INFO, reset_round=3).state_dict()
    first = build_pseudo_generator(cfg, INFO).state_dict()
    weights = [k for k, v in expected.items() if v.is_floating_point() and v.dim() > 1]
    assert weights
    assert all(not torch.equal(expected[k], other[k]) for k in weights)
    assert all(not torch.equal(expected[k], first[k]) for k in weights)
    # The optimizer still drives the same parameter objects after the reset.
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in generator.parameters()]


def test_an_input_reset_redraws_only_the_input_layer_and_its_moments() -> None:
    cfg = _config(method={"generator_reset": True, "generator_reset_scope": "input"})
    coordinator = Coordinator(cfg, INFO)
    generator = coordinator.generator
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.1)
    generator(generator.sample_latent(8, rng=torch.Generator().manual_seed(1))).mean().backward()
    optimizer.step()
    trained = {k: v.clone() for k, v in generator.state_dict().items()}
    coordinator.round = 2
    coordinator.reset_generator(optimizer)
    fresh = build_pseudo_generator(cfg, INFO, reset_round=2).state_dict()
    for name, tensor in generator.state_dict().items():
        expected = fresh[name] if name.startswith("project.") else trained[name]
        assert torch.equal(tensor, expected), name
    assert not torch.equal(trained["project.weight"], fresh["project.weight"])
    project = {id(p) for p in generator.project.parameters()}
    kept = {id(p) for p in optimizer.state}
    assert not kept & project  # the input layer's Adam moments went ...
    assert kept == {id(p) for p in generator.parameters()} - project  # ... and only they


def test_a_body_reset_every_k_rounds_redraws_all_of_g_in_those_rounds_only() -> None:
    cfg = _config(method={"generator_reset": True, "generator_reset_scope": "input",
                          "generator_body_reset_every": 3})
    coordinator = Coordinator(cfg, INFO)
    generator = coordinator.generator
    for round_index, whole in ((0, False), (2, False), (3, True), (4, False), (6, True)):
        with torch.no_grad():
            for parameter in generator.parameters():
                parameter.add_(1.0)  # stands for a round's training
        trained = {k: v.clone() for k, v in generator.state_dict().items()}
        coordinator.round = round_index
        coordinator.reset_generator()
        fresh = build_pseudo_generator(cfg, INFO, reset_round=round_index).state_dict()
        for name, tensor in generator.state_dict().items():
            redrawn = whole or name.startswith("project.")
            assert torch.equal(tensor, fresh[name] if redrawn else trained[name]), (round_index, name)
    with pytest.raises(ConfigError, match="method.generator_body_reset_every"):
        _config(method={"generator_reset": True, "generator_body_reset_every": 3})
    with pytest.raises(ConfigError, match="method.generator_body_reset_every"):
        _config(method={"generator_reset": True, "generator_reset_scope": "input", "generator_body_reset_every": -1})


def test_an_input_reset_needs_the_reset_and_a_federation_refuses_it() -> None:
    from fed_dfkd.errors import UserError
    from fed_dfkd.federated import check_federation_settings

    with pytest.raises(ConfigError, match="method.generator_reset_scope"):
        _config(method={"generator_reset_scope": "input"})
    with pytest.raises(ConfigError, match="method.generator_reset_scope"):
        _config(method={"generator_reset": True, "generator_reset_scope": "body"})
    cfg = _config(method={"generator_reset": True, "generator_reset_scope": "input"}, quantize_samples=True)
    with pytest.raises(UserError, match="generator_reset_scope: input"):
        check_federation_settings(cfg)


@pytest.mark.parametrize("federation, message", [
    ({"sample_transport": "seed"}, "sample_transport: pixels"),
    ({"mode": "logits_only"}, "generator_and_logits"),
])
def test_reset_refuses_transports_and_modes_it_cannot_serve(federation, message) -> None:
    with pytest.raises(ConfigError, match="method.generator_reset") as error:
        _config(method={"generator_reset": True}, federation=federation, quantize_samples=True)
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------
# method.generator_latents: round


def test_round_latents_are_seeded_balanced_and_differ_between_rounds() -> None:
    generator = Coordinator(_config(), INFO).generator
    z, y = round_latents(generator, seed=3, round_index=5, batch_size=20, num_classes=10)
    z2, y2 = round_latents(generator, seed=3, round_index=5, batch_size=20, num_classes=10)
    assert torch.equal(z, z2) and torch.equal(y, y2)
    assert z.shape == (20, generator.latent_dim)
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    assert not torch.equal(y, torch.arange(20) % 10)  # shuffled
    z3, _ = round_latents(generator, seed=3, round_index=6, batch_size=20, num_classes=10)
    assert not torch.equal(z, z3)


def _round_config(**distill):
    return _config(method={"generator_latents": "round", "generator_steps": 3},
                   pseudo_batches=1, **distill)


def test_the_steps_fit_next_round_s_batch_and_the_draw_is_that_batch() -> None:
    coordinator = Coordinator(_round_config(quantize_samples=False), INFO)
    coordinator.round = 4
    z_next, y_next = coordinator.step_latents()
    assert torch.equal(z_next, coordinator.latents(5)[0])
    assert torch.equal(y_next, coordinator.latents(5)[1])
    coordinator.round = 5
    generator = coordinator.generator
    running = [b.clone() for b in generator.buffers()]
    drawn = coordinator.draw_samples()
    assert drawn.shape == (1, 8, 1, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(running, generator.buffers()))  # untouched
    generator.train()
    with torch.no_grad():
        expected = generator(z_next)  # batch statistics, as the steps saw it
    torch.testing.assert_close(drawn[0], expected)


def test_every_generator_step_uses_the_given_batch_and_asks_for_its_classes(monkeypatch) -> None:
    from fed_dfkd.models import build_classifier
    from fed_dfkd.models.normalized import NormalizedClassifier, freeze
    from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer

    cfg = _round_config()
    coordinator = Coordinator(cfg, INFO)
    teacher = freeze(NormalizedClassifier(build_classifier("cnn_digits_bn", num_classes=10, in_channels=1,
                                                           image_size=8), INFO.mean, INFO.std))
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=8,
                                    teacher_feature_dim=teacher.feature_dim,
                                    student_feature_dim=coordinator.student.feature_dim, seed=0)
    seen_latents, seen_labels = [], []
    forward = type(coordinator.generator).forward
    monkeypatch.setattr(type(coordinator.generator), "forward",
                        lambda self, z, labels=None: (seen_latents.append(z.clone()), forward(self, z, labels))[1])
    objective = synthesizer.objective
    monkeypatch.setattr(synthesizer, "objective",
                        lambda **kw: (seen_labels.append(kw["labels"]), objective(**kw))[1])
    latents = coordinator.latents(1)
    synthesizer.step(teacher=teacher, student=coordinator.student, generator=coordinator.generator,
                     optimizer=build_generator_optimizer(coordinator.generator, cfg.method),
                     progress=Progress(fraction=0.0, round=0), rng=torch.Generator().manual_seed(0),
                     latents=latents)
    assert len(seen_latents) == len(seen_labels) == 3
    assert all(torch.equal(z, latents[0]) for z in seen_latents)
    assert all(torch.equal(y, latents[1]) for y in seen_labels)


@pytest.mark.parametrize("overrides, message", [
    ({"pseudo_batches": 2}, "distill.pseudo_batches"),
    ({"pseudo_batches": None}, "distill.pseudo_batches"),
])
def test_round_latents_need_one_pseudo_batch(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(method={"generator_latents": "round"}, **overrides)


def test_round_latents_refuse_the_seed_transport() -> None:
    with pytest.raises(ConfigError, match="method.generator_latents"):
        _config(method={"generator_latents": "round"}, federation={"sample_transport": "seed"},
                pseudo_batches=1, quantize_samples=True)
