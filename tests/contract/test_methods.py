"""Contract tests: one harness over every registered synthesis method.

Every method in ``SYNTHESIZERS`` is held to the same interface promises (style.md habit 2): a
generator step descends its own objective, leaves teacher and student untouched, leaves no hooks
behind, round-trips its state, is reproducible from its seeds, and reports in one shape. A method
added to the registry is covered here without touching this file.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fed_dfkd.synthesis.base as synthesis_base
from fed_dfkd.config import ExperimentConfig, MethodConfig, PretrainConfig, config_from_dict
from fed_dfkd.data import load_dataset
from fed_dfkd.data.teachers import train_classifier
from fed_dfkd.models import Classifier, Generator, build_classifier, build_generator
from fed_dfkd.models.normalized import NormalizedClassifier
from fed_dfkd.registry import UnknownNameError
from fed_dfkd.synthesis import (
    SYNTHESIZERS,
    Progress,
    SynthesisReport,
    Synthesizer,
    build_generator_optimizer,
    build_synthesizer,
    method_defaults,
)

METHODS = SYNTHESIZERS.names()
BATCH_SIZE = 16
LATENT_DIM = 16
GENERATOR_WIDTH = 8
IMAGE_SIZE = 8
# Mid-run: every curriculum ramp (adversarial weight, R2M window) is strictly inside its range.
MID_RUN = Progress(fraction=0.5, round=5)

# Methods plus the options that add state of their own (AdaDFKD's reference projection draws a
# fresh random matrix per call from the synthesizer's RNG, which must then round-trip too).
STATEFUL_VARIANTS = [pytest.param(name, {}, id=name) for name in METHODS] + [
    pytest.param("adadfkd", {"projection": "fresh_random_reference"}, id="adadfkd-fresh_projection"),
]

# The config keys a method must default (a config may leave them null).
DEFAULTED_KEYS = [f.name for f in dataclasses.fields(MethodConfig) if f.default is None]


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def fitted_teacher(digits) -> NormalizedClassifier:
    """cnn_digits_bn fitted for two epochs: real BN running statistics and confident logits."""
    info = digits.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_classifier("cnn_digits_bn", num_classes=info.num_classes,
                               in_channels=info.in_channels, image_size=info.image_size)
    teacher = NormalizedClassifier(net, info.mean, info.std)
    train_classifier(teacher, digits.train_images, digits.train_labels,
                     config=PretrainConfig(epochs=2, batch_size=64, lr=2e-3), seed=0, device="cpu")
    teacher.eval()
    return teacher


def method_config(name: str, **overrides: Any) -> ExperimentConfig:
    """The method's resolved config (its defaults filled in) with small, test-sized knobs."""
    method = {"name": name, "generator_lr": 1e-3, "generator_steps": 1, "negative_bank_size": 64}
    method.update(overrides)
    return config_from_dict({"method": method})


class Setup:
    """Teacher, student, generator, its optimizer and the synthesizer of one method."""

    def __init__(
        self,
        teacher: Classifier,
        name: str,
        *,
        student_arch: str = "cnn_digits_half",
        model_seed: int = 0,
        synthesizer_seed: int = 0,
        **method_overrides: Any,
    ) -> None:
        self.cfg = method_config(name, **method_overrides)
        self.teacher = copy.deepcopy(teacher)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            self.student = NormalizedClassifier(
                build_classifier(student_arch, num_classes=10, in_channels=1, image_size=IMAGE_SIZE),
                teacher.normalize.mean.flatten().tolist(), teacher.normalize.std.flatten().tolist(),
            )
            self.generator: Generator = build_generator(
                "dcgan", latent_dim=LATENT_DIM, width=GENERATOR_WIDTH, depth=2,
                image_size=IMAGE_SIZE, channels=1,
            )
        self.optimizer = build_generator_optimizer(self.generator, self.cfg.method)
        self.synthesizer = build_synthesizer(
            self.cfg.method, self.cfg.curriculum, batch_size=BATCH_SIZE,
            teacher_feature_dim=self.teacher.feature_dim,
            student_feature_dim=self.student.feature_dim, seed=synthesizer_seed,
        )

    def step(self, rng_seed: int, progress: Progress = MID_RUN) -> SynthesisReport:
        return self.synthesizer.step(
            teacher=self.teacher, student=self.student, generator=self.generator,
            optimizer=self.optimizer, progress=progress,
            rng=torch.Generator().manual_seed(rng_seed),
        )


def objective_value(synthesizer: Synthesizer, setup: Setup, latents: Tensor, progress: Progress) -> float:
    """The method's objective on fixed latents, with the modes ``step`` uses (G train, T/S eval)."""
    generator = copy.deepcopy(setup.generator).train()  # a copy: its BN buffers stay as they were
    setup.teacher.eval()
    setup.student.eval()
    with torch.no_grad():
        loss, _, _ = synthesizer.objective(
            teacher=setup.teacher, student=setup.student, images=generator(latents),
            progress=progress, weights=synthesizer.term_weights(progress),
        )
    return float(loss)


def cloned_state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_tensors_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [key for key in a if not torch.equal(a[key], b[key])]
    assert not changed, f"changed: {changed}"


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality of nested state (tensors bit-exact, RNG states included)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def roundtrip(state: Any) -> Any:
    """Through torch.save / torch.load, as a checkpoint on disk would be."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def all_forward_hooks(model: nn.Module) -> list[str]:
    return [
        f"{name or '<root>'}:{kind}"
        for name, module in model.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")
        if getattr(module, kind)
    ]


# --------------------------------------------------------------------------------------------
# The registry and the defaults
# --------------------------------------------------------------------------------------------


def test_the_registry_holds_the_five_paper_methods():
    assert {"dafl", "dfad", "deepinversion", "cudfkd", "adadfkd"} <= set(METHODS)


def test_an_unknown_method_name_raises_and_lists_the_valid_names(fitted_teacher):
    cfg = method_config("cudfkd")
    with pytest.raises(UnknownNameError) as raised:
        build_synthesizer(dataclasses.replace(cfg.method, name="no_such_method"), cfg.curriculum,
                          batch_size=4, teacher_feature_dim=8, student_feature_dim=8, seed=0)
    message = str(raised.value)
    assert "no_such_method" in message
    for name in METHODS:
        assert name in message
    with pytest.raises(UnknownNameError, match="no_such_method"):
        method_defaults("no_such_method")


@pytest.mark.parametrize("name", METHODS)
def test_method_defaults_cover_every_defaulted_key(name):
    assert DEFAULTED_KEYS, "MethodConfig has no defaulted keys: the harness is out of date"
    defaults = method_defaults(name)
    missing = sorted(set(DEFAULTED_KEYS) - set(defaults))
    assert not missing, f"{name} has no default for {missing}"
    resolved = config_from_dict({"method": {"name": name}}).method
    for key in DEFAULTED_KEYS:
        assert getattr(resolved, key) is not None
        assert getattr(resolved, key) == defaults[key]


# --------------------------------------------------------------------------------------------
# (a) a step descends the method's objective
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_a_generator_step_lowers_its_objective_on_its_latent_batch(fitted_teacher, name):
    setup = Setup(fitted_teacher, name, generator_lr=1e-4, generator_steps=1)
    latent_seed = 11
    latents = setup.generator.sample_latent(BATCH_SIZE, rng=torch.Generator().manual_seed(latent_seed))
    values = []
    for _ in range(3):
        # The objective as the step sees it: the method's state (e.g. AdaDFKD's bank) before it.
        frozen = copy.deepcopy(setup.synthesizer)
        before = objective_value(frozen, setup, latents, MID_RUN)
        setup.step(latent_seed)  # the same seed: the step draws exactly `latents`
        after = objective_value(frozen, setup, latents, MID_RUN)
        assert after < before, f"{name}: objective went from {before} to {after}"
        values.append((before, after))
    assert math.isfinite(values[-1][1])


# --------------------------------------------------------------------------------------------
# (b) teacher and student are untouched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_arch", ["cnn_digits_half", "cnn_digits_half_bn"])
@pytest.mark.parametrize("name", METHODS)
def test_a_step_changes_neither_teacher_nor_student(fitted_teacher, name, student_arch):
    setup = Setup(fitted_teacher, name, student_arch=student_arch, generator_steps=2)
    # Gradients enabled on both: only the step itself may keep them away from T and S.
    for parameter in [*setup.teacher.parameters(), *setup.student.parameters()]:
        parameter.requires_grad_(True)
    setup.student.train()  # as the student trainer leaves it
    teacher_before, student_before = cloned_state(setup.teacher), cloned_state(setup.student)
    generator_before = cloned_state(setup.generator)

    setup.step(3)

    assert_tensors_equal(teacher_before, cloned_state(setup.teacher))
    assert_tensors_equal(student_before, cloned_state(setup.student))
    assert [n for n, p in setup.teacher.named_parameters() if p.grad is not None] == []
    assert [n for n, p in setup.student.named_parameters() if p.grad is not None] == []
    assert setup.student.training, "the student's train mode must be restored"
    # ...while G did move (otherwise the checks above prove nothing).
    moved = [k for k in generator_before if not torch.equal(generator_before[k], setup.generator.state_dict()[k])]
    assert any(not k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)


@pytest.mark.parametrize("name", METHODS)
def test_a_step_leaves_the_teachers_mode_as_it_found_it(fitted_teacher, name):
    setup = Setup(fitted_teacher, name)
    setup.teacher.train()
    setup.step(3)
    assert setup.teacher.training


# --------------------------------------------------------------------------------------------
# (c) no hooks survive a step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_no_forward_hooks_remain_after_a_step(fitted_teacher, name):
    setup = Setup(fitted_teacher, name, generator_steps=2)
    assert all_forward_hooks(setup.teacher) == []
    setup.step(3)
    assert all_forward_hooks(setup.teacher) == []
    assert all_forward_hooks(setup.student) == []
    assert all_forward_hooks(setup.generator) == []


class _Boom(RuntimeError):
    pass


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise _Boom("injected failure")


@pytest.mark.parametrize("where", ["bn_statistics_loss", "teacher_head", "one_hot_loss"])
@pytest.mark.parametrize("name", METHODS)
def test_no_forward_hooks_remain_when_the_objective_raises(fitted_teacher, monkeypatch, name, where):
    # bn_statistics_weight > 0 for every method here, so the BN hooks are live when it raises.
    setup = Setup(fitted_teacher, name, bn_statistics_weight=1.0, one_hot_weight=1.0)
    if where == "bn_statistics_loss":
        monkeypatch.setattr(synthesis_base.BatchNormStatistics, "loss", _raise)
    elif where == "one_hot_loss":
        monkeypatch.setattr(synthesis_base, "one_hot_loss", _raise)
    else:  # inside the teacher's forward, after its BN layers have been recorded
        monkeypatch.setattr(setup.teacher.net.fc, "forward", _raise)
    setup.student.train()
    with pytest.raises(_Boom):
        setup.step(3)
    monkeypatch.undo()
    assert all_forward_hooks(setup.teacher) == []
    assert all_forward_hooks(setup.student) == []
    assert setup.student.training
    # The teacher still works and a later step runs normally.
    setup.step(4)
    assert all_forward_hooks(setup.teacher) == []


# --------------------------------------------------------------------------------------------
# (d) state round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", STATEFUL_VARIANTS)
def test_state_round_trip_continues_identically(fitted_teacher, name, options):
    original = Setup(fitted_teacher, name, generator_steps=2, **options)
    for seed in (1, 2):
        original.step(seed)
    saved = roundtrip({
        "synthesizer": original.synthesizer.state_dict(),
        "generator": original.generator.state_dict(),
        "optimizer": original.optimizer.state_dict(),
    })
    # A fresh instance built differently (other model init, other synthesizer seed): everything
    # that matters must come from the saved state.
    resumed = Setup(fitted_teacher, name, generator_steps=2, model_seed=7, synthesizer_seed=99, **options)
    if saved["synthesizer"]:
        with pytest.raises(AssertionError):
            assert_same_state(resumed.synthesizer.state_dict(), saved["synthesizer"])
    resumed.synthesizer.load_state_dict(saved["synthesizer"])
    resumed.generator.load_state_dict(saved["generator"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.teacher, resumed.student = original.teacher, original.student

    for seed in (3, 4):
        assert original.step(seed) == resumed.step(seed)
    assert_tensors_equal(cloned_state(original.generator), cloned_state(resumed.generator))
    assert_same_state(original.synthesizer.state_dict(), resumed.synthesizer.state_dict())
    assert_same_state(original.optimizer.state_dict(), resumed.optimizer.state_dict())


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_is_a_copy_not_a_view(fitted_teacher, name):
    setup = Setup(fitted_teacher, name)
    setup.step(1)
    snapshot = copy.deepcopy(setup.synthesizer.state_dict())
    state = setup.synthesizer.state_dict()
    setup.step(2)
    assert_same_state(state, snapshot)


# --------------------------------------------------------------------------------------------
# (e) reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", STATEFUL_VARIANTS)
def test_the_same_seed_reproduces_a_step_bit_exactly_and_another_does_not(fitted_teacher, name, options):
    first, second, other = (Setup(fitted_teacher, name, generator_steps=2, **options) for _ in range(3))
    report_first, report_second, report_other = first.step(5), second.step(5), other.step(6)

    assert report_first == report_second
    assert_tensors_equal(cloned_state(first.generator), cloned_state(second.generator))
    assert_same_state(first.synthesizer.state_dict(), second.synthesizer.state_dict())
    assert_same_state(first.optimizer.state_dict(), second.optimizer.state_dict())

    assert report_other.loss != report_first.loss
    generator_first, generator_other = cloned_state(first.generator), cloned_state(other.generator)
    assert any(not torch.equal(generator_first[k], generator_other[k]) for k in generator_first)


# --------------------------------------------------------------------------------------------
# (f) one report shape for every method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_the_report_has_one_shape_for_every_method(fitted_teacher, name):
    setup = Setup(fitted_teacher, name, generator_steps=1)
    report = setup.step(1)
    assert type(report) is SynthesisReport
    assert type(report.loss) is float and math.isfinite(report.loss)
    assert report.steps == 1

    weights = dict(report.weights)
    assert all(isinstance(k, str) for k in weights)
    assert all(type(v) is float and math.isfinite(v) for v in weights.values())
    base_terms = {"bn_statistics", "one_hot", "class_balance", "activation", "adversarial",
                  "total_variation"}
    assert base_terms <= set(weights), "every method weighs the shared terms"

    terms = dict(report.terms)
    assert all(type(v) is float and math.isfinite(v) for v in terms.values())
    # Exactly the terms with a non-zero weight are computed, and each has its weight.
    assert set(terms) == {k for k, w in weights.items() if w != 0.0}
    assert terms, f"{name} computes no term at all"
    # One step: the reported loss is the weighted sum of the reported terms.
    assert report.loss == pytest.approx(sum(weights[k] * v for k, v in terms.items()), rel=1e-5, abs=1e-6)

    extra = dict(report.extra)
    assert all(isinstance(k, str) and type(v) is float and math.isfinite(v) for k, v in extra.items())


@pytest.mark.parametrize("name", METHODS)
def test_the_report_averages_over_generator_steps(fitted_teacher, name):
    one_by_one = Setup(fitted_teacher, name, generator_steps=1)
    together = Setup(fitted_teacher, name, generator_steps=3)
    # generator_steps=3 with one rng draws the same three latent batches as three 1-step calls
    # on one shared rng.
    shared = torch.Generator().manual_seed(9)
    singles = [
        one_by_one.synthesizer.step(
            teacher=one_by_one.teacher, student=one_by_one.student, generator=one_by_one.generator,
            optimizer=one_by_one.optimizer, progress=MID_RUN, rng=shared,
        )
        for _ in range(3)
    ]
    report = together.step(9)
    assert report.steps == 3
    assert report.loss == pytest.approx(sum(r.loss for r in singles) / 3, rel=1e-6)
    for key, value in report.terms.items():
        assert value == pytest.approx(sum(r.terms[key] for r in singles) / 3, rel=1e-6)
    assert_tensors_equal(cloned_state(one_by_one.generator), cloned_state(together.generator))


@pytest.mark.parametrize("name", METHODS)
def test_zero_generator_steps_change_nothing(fitted_teacher, name):
    setup = Setup(fitted_teacher, name, generator_steps=0)
    generator_before = cloned_state(setup.generator)
    state_before = copy.deepcopy(setup.synthesizer.state_dict())
    report = setup.step(1)
    assert report.steps == 0 and report.loss == 0.0 and dict(report.terms) == {}
    assert_tensors_equal(generator_before, cloned_state(setup.generator))
    assert_same_state(state_before, setup.synthesizer.state_dict())


# --------------------------------------------------------------------------------------------
# The adversarial term's gradient path (method.adversarial_through_teacher)
# --------------------------------------------------------------------------------------------


def _adversarial_image_gradient(setup: Setup, images: Tensor) -> Tensor:
    images = images.clone().requires_grad_(True)
    # Every term off but the adversarial one, at weight 1.
    weights = {term: 0.0 for term in setup.synthesizer.term_weights(MID_RUN)} | {"adversarial": 1.0}
    loss, _, _ = setup.synthesizer.objective(
        teacher=setup.teacher, student=setup.student, images=images, progress=MID_RUN, weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, images)
    return grad


@pytest.mark.parametrize("name", ["adadfkd", "cudfkd", "dfad"])
def test_the_adversarial_term_can_reach_g_through_the_student_only(fitted_teacher, name):
    from fed_dfkd.losses import adversarial_loss
    from fed_dfkd.synthesis.base import ADVERSARIAL_TEMPERATURE

    images = torch.rand(BATCH_SIZE, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    both = Setup(fitted_teacher, name)
    student_only = Setup(fitted_teacher, name, adversarial_through_teacher=False)
    for setup in (both, student_only):
        setup.teacher.eval()
        setup.student.eval()
    # The oracle: the same divergence with the teacher's logits as constants.
    x = images.clone().requires_grad_(True)
    with torch.no_grad():
        fixed_teacher = student_only.teacher(x)
    expected = torch.autograd.grad(adversarial_loss(
        student_only.student(x), fixed_teacher,
        divergence=str(student_only.cfg.method.adversarial_divergence), temperature=ADVERSARIAL_TEMPERATURE,
    ), x)[0]
    got = _adversarial_image_gradient(student_only, images)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(_adversarial_image_gradient(both, images), got)
