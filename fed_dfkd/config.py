"""Typed, strict experiment configuration.

One YAML file per experiment with the sections ``data``, ``models``, ``method``, ``distill``,
``curriculum``, ``federation``, ``privacy`` and ``runtime`` (DESIGN.md §6). Every section is a
frozen dataclass; loading rejects unknown keys and wrong types with a :class:`ConfigError`
that names the dotted field, and checks the rules that span several fields. Any key can be
overridden with ``section.key=value`` strings (the CLI's ``--set``); values are parsed as YAML
scalars, so ``--set method.name=cudfkd --set distill.batch_size=128`` do what they say.

Method loss weights left as ``null`` take the method's own defaults (each synthesis module
declares them); the resolved config, written next to every result, shows the values used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from fed_dfkd.errors import UserError

__all__ = [
    "ConfigError",
    "DataConfig",
    "GeneratorConfig",
    "PretrainConfig",
    "ModelsConfig",
    "MethodConfig",
    "DistillConfig",
    "CurriculumConfig",
    "FederationConfig",
    "PrivacyConfig",
    "RuntimeConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "config_hash",
]


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or breaks a rule; names the field."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        super().__init__(f"config error at {field_path or '<root>'}: {message}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Which data the teachers were trained on, and how it is split between owners."""

    dataset: str = "digits"
    root: str | None = None
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    test_fraction: float = 0.2
    # Seeds the train/test split and subsets; kept apart from runtime.seed so that runs with
    # different seeds are scored on the same held-out images (and a teacher never sees them).
    split_seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    # Batch size of every evaluation pass over the test split (memory only; results do not
    # depend on it).
    eval_batch_size: int = 1024


@dataclass(frozen=True)
class GeneratorConfig:
    """DCGAN-style generator (algorithms.md §1.4, scaled down per §12.5)."""

    arch: str = "dcgan"
    latent_dim: int = 32
    width: int = 16
    depth: int = 2
    init: Literal["dcgan", "default"] = "dcgan"
    # Class-conditional G: the one-hot term targets a sampled class instead of the argmax.
    conditional: bool = False


@dataclass(frozen=True)
class PretrainConfig:
    """How teachers are trained on their owners' data (``fed-dfkd pretrain``)."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    augment: bool = False
    # Adversarial training (fed_dfkd/adversarial.py): each batch is replaced by its PGD attack
    # inside an L2 ball of this radius in [0, 1] pixel space, then the BatchNorm statistics are
    # re-estimated on the clean images. 0: off.
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 3


@dataclass(frozen=True)
class ModelsConfig:
    teacher: str = "cnn_digits_bn"
    student: str = "cnn_digits_half"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass(frozen=True)
class MethodConfig:
    """The synthesis method and its generator objective (algorithms.md §2-§4).

    Weights left as ``None`` are filled from the method's defaults when the config is loaded.
    ``class_balance_weight`` is the positive weight w of ``w * sum_c pbar_c log pbar_c``; the
    reference's ``lambda_ent * H(pbar)`` with ``lambda_ent = -20`` is ``class_balance_weight = 20``.
    """

    name: str = "adadfkd"
    generator_lr: float = 1e-3
    generator_betas: tuple[float, float] = (0.9, 0.99)
    generator_steps: int = 1
    # Re-initialise G (seeded by the round) and its optimizer state every round, after the
    # round's pseudo-batches are drawn: each round's samples then come from a G trained for
    # generator_steps steps from scratch (DENSE / CMI style). Pair with a large
    # distill.replay_rounds, so the student trains on the pool of all rounds' samples.
    generator_reset: bool = False
    # What generator_reset re-draws: "all" of G (DENSE / CMI), or only its "input" layer (the
    # linear map of z, and of the label if conditional), its Adam moments cleared, while the
    # convolutional body and its moments carry over from round to round (after NAYER's noisy
    # layer: the body keeps what it learnt of the teacher's classes, the fresh input layer gives
    # each round's batch its own samples). "input" is `fed-dfkd distill` only.
    generator_reset_scope: Literal["all", "input"] = "all"
    # With generator_reset_scope "input": every that many rounds the whole of G (body included)
    # is re-drawn instead, so no body's line of history lasts longer than that (0: never).
    generator_body_reset_every: int = 0
    # "fresh": every generator step draws new latents, the one-hot term asks for the argmax (the
    # reference). "round": G's steps in round r all fit one seeded latent batch Z to balanced
    # assigned classes Y, and round r + 1's pseudo-batch is that batch, G(Z) (DENSE / CMI).
    generator_latents: Literal["fresh", "round"] = "fresh"
    # Boundary samples (generator_latents "round"): this fraction of each round's assigned rows
    # asks the teacher not for its class y alone but for the blend (1 − boundary_mix)·e_y +
    # boundary_mix·e_y', y' another class drawn per row, so part of the pool lies between two
    # classes where the teacher's relative logits carry what a confident sample does not. 0: off.
    boundary_fraction: float = 0.0
    boundary_mix: float = 0.5
    bn_statistics_weight: float | None = None
    # "absolute": the reference's L_bn; "standardized": each gap in units of the target's spread
    # (fed_dfkd/losses/bn_statistics.py), so every layer of a deep teacher counts alike.
    bn_statistics_scale: Literal["absolute", "standardized"] = "absolute"
    # Per class: each class's rows of G's batch are matched to the statistics of that class's
    # real images (the owner's, measured once at pretraining, never sent) instead of the whole
    # batch to the running statistics (fed_dfkd/losses/bn_statistics.py). Needs assigned classes
    # (generator_latents "round") and a teacher with BatchNorm.
    bn_statistics_per_class: bool = False
    one_hot_weight: float | None = None
    class_balance_weight: float | None = None
    class_balance_temperature: float | None = None
    # The class mix the class-balance term asks of the teacher: "uniform" (every reference), or
    # "teacher": the mix of the data it was trained on (each owner's class histogram, plus one
    # per class), so an owner's teacher that never saw a class is not asked to predict it.
    class_balance_prior: Literal["uniform", "teacher"] = "uniform"
    # Strength τ of the one-hot term's logit adjustment (fed_dfkd/losses/entropy.py,
    # prior_adjusted_cross_entropy): the teacher's logits less τ·log(its class counts), over the
    # classes it saw, so a skewed teacher's prior no longer hands almost any image to its
    # majority class (each owner's own histogram in a federation; the summed histograms for
    # `fed-dfkd distill` over several teachers). 0: the plain term.
    one_hot_prior_adjustment: float = 0.0
    activation_weight: float | None = None
    adversarial_weight: float | None = None
    adversarial_divergence: Literal["kl", "l1", "js", "adi"] | None = None
    # Whether the adversarial term's gradient also flows through the teacher's logits (true: every
    # reference) or only through the student's (false: algorithms.md §12 item 4, the teacher's
    # answer held fixed, so G cannot raise the divergence by pushing the teacher to extremes).
    adversarial_through_teacher: bool = True
    total_variation_weight: float | None = None
    # DeepInversion's jitter: at every generator step each image of G's batch is shifted by up
    # to this many pixels each way (zero padding, one seeded offset per image) before the
    # teacher and the student see it, so G is fitted to samples whose teacher answer survives a
    # small shift. 0: off (the reference loops).
    synthesis_jitter: int = 0
    r2m_weight: float | None = None
    relation_weight: float | None = None
    contrastive_temperature: float = 0.07
    negative_bank_size: int = 2048
    projection: Literal["fixed_seeded", "fresh_random_reference"] = "fixed_seeded"


@dataclass(frozen=True)
class DistillConfig:
    """Student training (algorithms.md §1.3, §3.3, §4.3)."""

    teacher_source: Literal["clients", "central"] = "clients"
    batch_size: int = 256
    # Pseudo-batches drawn from G per round (teachers label each once); null = student_steps.
    pseudo_batches: int | None = None
    student_steps: int = 10
    # Past rounds whose labelled pseudo-batches the student replays (0 = this round only).
    replay_rounds: int = 0
    # How replayed rounds are mixed: whole stored batches (one round's G per student batch), or
    # batches drawn sample by sample from the whole pool.
    replay_sampling: Literal["batches", "samples"] = "batches"
    # Server-side augmentation of the student's pseudo-batches (fed_dfkd/augment.py): a random
    # shift of up to augment_shift pixels, and a left-right mirror with probability 1/2 when
    # augment_flip (only where the classes are mirror-symmetric: not digits). The teachers'
    # targets are those of the unaugmented samples; no extra query or byte.
    augment_shift: int = 0
    augment_flip: bool = False
    # MixUp of the student's batches (fed_dfkd/augment.py, mixup_batches): each image blended
    # with another of its batch, the weight drawn from Beta(mixup, mixup) per image (0: off).
    # The target is the same blend of the two targets' logits unless relabel_augmented.
    mixup: float = 0.0
    # The teachers label the augmented (shifted, mirrored, mixed) images themselves at every
    # student step, instead of the images' stored targets: "function matching". Needs the
    # teachers in the server's process, so only `fed-dfkd distill`.
    relabel_augmented: bool = False
    # Feature distillation (FitNets' hint on the penultimate features): per sample, beta times
    # ||P f_S - f_T||^2 / (d var_batch(f_T)), P a linear map trained with the student. Needs the
    # teachers' features in the server's process, so only `fed-dfkd distill` (0: off).
    feature_weight: float = 0.0
    # How P starts: drawn from the run's "feature-projection" seed (nn.Linear's default init), or
    # at zero, so the hint passes no gradient to the student until P has learnt a map.
    feature_projection_init: Literal["seeded", "zero"] = "seeded"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    divergence: Literal["kl", "l1"] = "kl"
    temperature: float = 4.0
    # The aggregated targets' logits are divided by this before the KD and relation terms
    # (< 1 sharpens flat ensemble targets; 1: as aggregated).
    target_temperature: float = 1.0
    ensemble: Literal["mean", "weighted", "class_weighted", "consensus", "median", "trimmed_mean"] = "mean"
    quantize_samples: bool = True
    # Draw the student's pseudo-batches from G with its BatchNorm running statistics ("running",
    # the reference) or with each batch's own statistics ("batch", as in G's own steps).
    sample_statistics: Literal["running", "batch"] = "running"
    # Exponential moving average of the student's weights after every step, with this decay
    # (0: off). When on, the average is the student that is evaluated, reported and audited;
    # the owners' adversarial term still sees the trained student.
    student_ema: float = 0.0
    # After the last round's steps, replace the student by a fresh one trained this many steps
    # on every sample of the replay buffer (0: off).
    final_fit_steps: int = 0
    # target_temperature of the final fit alone (null: distill.target_temperature).
    final_fit_target_temperature: float | None = None
    # Hard samples (fed_dfkd/hard_samples.py): every round after the first, this many samples of
    # the replay buffer (a multiple of batch_size; 0: off) are pushed by hard_sample_steps PGD
    # steps within an L-infinity ball of hard_sample_radius ([0, 1] pixel units) towards the
    # student's divergence from their stored targets, and travel with the round's samples for the
    # teachers to label; labelled, they join the buffer.
    hard_samples: int = 0
    hard_sample_radius: float = 0.1
    hard_sample_steps: int = 5
    # MixUp queries: every round after the first, this many blends λ·x_i + (1 − λ)·x_j of random
    # pairs of the replay buffer (a multiple of batch_size; 0: off), λ ~ Beta(mixup_query_alpha,
    # mixup_query_alpha), travel with the round's samples for the teachers to label; labelled,
    # they join the buffer. The teachers' own answers on blends, where distill.mixup blends the
    # targets.
    mixup_queries: int = 0
    mixup_query_alpha: float = 1.0
    eval_every: int = 1


@dataclass(frozen=True)
class CurriculumConfig:
    """Easy-to-hard pacing; every schedule is a function of progress p in [0, 1] (§12.3)."""

    enabled: bool = True
    weighting: Literal["log", "hard", "soft"] = "log"
    granularity: Literal["sample", "batch"] = "sample"
    pace: Literal["quantile", "absolute"] = "quantile"
    # quantile pace: the admitted loss quantile grows from pace_start to pace_end;
    # absolute pace: lambda grows from pace_start (lambda_0) to pace_end (lambda_end).
    pace_start: float = 0.5
    pace_end: float = 1.0
    sharpness: float = 5.0
    history: int = 64
    adversarial_growth: float = 0.0
    adversarial_begin: float = 0.25
    adversarial_end: float = 0.75
    negative_window: float = 0.8
    negative_begin: float = 0.25
    negative_end: float = 0.75


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 1
    rounds: int = 40
    sample_rate: float = 1.0
    min_replies: int = 1
    mode: Literal["generator_and_logits", "logits_only"] = "generator_and_logits"
    # How client generator updates are combined (weights: the clients' train sizes).
    update_aggregation: Literal["weighted_mean", "mean", "median", "trimmed_mean"] = "weighted_mean"
    update_dtype: Literal["float32", "float16"] = "float32"
    logit_dtype: Literal["float32", "float16"] = "float16"
    # Dtype of G's and S's weights sent down each round.
    state_dtype: Literal["float32", "float16"] = "float32"
    # pixels: the round's uint8 pseudo-samples travel down; seed: no pixels travel, each client
    # regenerates them from the G it receives and the round's seeded stream (docs/architecture.md).
    sample_transport: Literal["pixels", "seed"] = "pixels"
    # shared: one G, the owners' updates averaged into it. per_owner: the server keeps each
    # replying owner's fitted G apart and draws the next round's samples from every one of them
    # (needs the DENSE-style pool: generator_reset and generator_latents round).
    generators: Literal["shared", "per_owner"] = "shared"
    # per_owner: the classes each owner's G is fitted to: own (in the proportions of the owner's
    # class histogram, which never leaves it) or balanced.
    owner_labels: Literal["own", "balanced"] = "own"
    # Also serialise, every round, the straightforward float32 exchange of the same round (float32
    # G, S and images down; float32 ΔG and logits up) and report its bytes next to the real ones.
    measure_float32_baseline: bool = False
    # A reply whose generator update has a larger L2 norm is dropped (null: no bound).
    max_update_norm: float | None = None
    round_timeout: float = 600.0
    # Mode logits_only: the server trains G from zeroth-order estimates (docs/methods.md). Query
    # samples G(z) per round (0: G is not trained), random directions per sample, and the RMS
    # change per pixel of a perturbation in [0, 1] units (L2 radius zo_smoothing * sqrt(C*H*W));
    # each query costs 1 + zo_directions samples on the wire. With zo_adversarial_through_teacher
    # the adversarial term's teacher path is estimated too (else only its exact student path).
    zo_batch_size: int = 64
    zo_directions: int = 4
    zo_smoothing: float = 0.02
    zo_adversarial_through_teacher: bool = False


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (DESIGN.md §4; docs/privacy.md).

    ``level: record`` trains every teacher with DP-SGD (Opacus) and makes everything its owner
    releases later post-processing of that teacher, plus one accounted release of private
    feature statistics and a noisy class histogram (``summary_*``). ``level: client`` protects
    an owner's whole participation with a Gaussian mechanism on every release, ``central`` (the
    server clips each contribution and noises the aggregate) or ``local`` (each client clips and
    noises its own release). ε is always cumulative, at ``delta``, by ``accountant``.

    ``target_epsilon`` (calibrated: each teacher's training at record level, the whole run at
    client level) and ``noise_multiplier`` are alternatives: give exactly one.
    """

    level: Literal["none", "record", "client"] = "none"
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    # Record level: DP-SGD (per-sample gradient clip) and the private summary release.
    max_grad_norm: float = 1.0
    summary: bool = True
    # σ_s and clip of the summary release (clip in units where a uniform-noise probe image's
    # rescaled features have norm about 1; bench/results/privacy_record.md: 5 and 1.5 helped,
    # 20 and 10 hurt).
    summary_noise_multiplier: float = 5.0
    summary_clip: float = 1.5
    # Client level.
    mechanism: Literal["central", "local"] = "central"
    generator_clip: float = 1.0
    logit_clip: float = 10.0
    epsilon_max: float | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    # How the classifiers' 4-d tensors are laid out in memory (torch.channels_last: NHWC). An
    # execution choice like threads: the same arithmetic in another order, so results agree to
    # float rounding, not bit for bit; on CPUs channels_last convolutions are often faster
    # (bench/results/memory_format.md).
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    progress: Literal["auto", "bar", "lines", "none"] = "auto"


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}
# Bounds where +inf (YAML .inf) means "no bound".
_INFINITY_ALLOWED = frozenset({"privacy.generator_clip", "privacy.logit_clip", "privacy.epsilon_max"})


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list [" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # X | None: X's own message (e.g. "must be finite") says more
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(path, f"must be a number, got {value!r}")
        if not math.isfinite(number) and not (path in _INFINITY_ALLOWED and number == math.inf):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"must be a mapping of keys, got {type(raw).__name__}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{path}.{key}" if path else str(key),
            f"unknown key; valid keys here: {', '.join(names)}",
        )
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(dotted, "override keys look like section.key=value")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines; the CLI promises one."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (plain
    ``safe_load`` keeps the last value silently, so a typo'd duplicate section would hide)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, path: str, parents: tuple[int, ...] = ()) -> None:
    """A ConfigError unless ``value`` is plain YAML data: mappings, lists, strings, numbers,
    booleans and null (not a date, bytes or a structure that contains itself)."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if id(value) in parents:
        raise ConfigError(path, "refers to itself (a recursive YAML alias)")
    if isinstance(value, dict):
        for key, child in value.items():
            _check_plain(child, f"{path}.{key}" if path else str(key), (*parents, id(value)))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            _check_plain(child, f"{path}[{i}]", (*parents, id(value)))
    else:
        raise ConfigError(path, f"must be a plain value (number, string, boolean, list or mapping), "
                                f"got a {type(value).__name__} ({value!r:.40})")


def parse_override(text: str) -> tuple[str, Any]:
    """``'a.b=value'`` -> ``('a.b', yaml-parsed value)``."""
    if "=" not in text:
        raise ConfigError(text, "override must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key.strip(), f"cannot parse value {raw!r}: {_one_line(exc)}") from None
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    _check_plain(raw, "")
    tree = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def config_from_dict(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Build, resolve and check an :class:`ExperimentConfig`."""
    tree = apply_overrides(dict(raw or {}), overrides)
    cfg = _build(ExperimentConfig, tree, "")
    cfg = _resolve_method_defaults(cfg)
    _check(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {_one_line(exc)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections")
    return config_from_dict(raw, overrides)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(value: Any) -> str:
    """Stable short hash of a config (section) for caching and manifests."""
    payload = json.dumps(config_to_dict(value), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Resolution and cross-field rules
# --------------------------------------------------------------------------------------------

_METHOD_DEFAULTED = (
    "bn_statistics_weight",
    "one_hot_weight",
    "class_balance_weight",
    "class_balance_temperature",
    "activation_weight",
    "adversarial_weight",
    "adversarial_divergence",
    "total_variation_weight",
    "r2m_weight",
    "relation_weight",
)


def _resolve_method_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    from fed_dfkd.registry import UnknownNameError
    from fed_dfkd.synthesis import method_defaults

    try:
        defaults = method_defaults(cfg.method.name)
    except UnknownNameError as exc:
        raise ConfigError("method.name", str(exc)) from None
    updates = {}
    for name in _METHOD_DEFAULTED:
        if getattr(cfg.method, name) is None:
            if name not in defaults:
                raise TypeError(f"method {cfg.method.name!r} declares no default for {name}")
            updates[name] = defaults[name]
    return replace(cfg, method=replace(cfg.method, **updates))


def _require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise ConfigError(path, message)


#: Smallest federation.zo_smoothing: two uint8 levels per pixel.
ZO_SMOOTHING_MIN = 2.0 / 255.0


def _check(cfg: ExperimentConfig) -> None:
    from fed_dfkd.data import dataset_info, dataset_names
    from fed_dfkd.models import CLASSIFIERS, GENERATORS

    d, m, me, di, cu, fe, pr, ru = (
        cfg.data, cfg.models, cfg.method, cfg.distill, cfg.curriculum, cfg.federation,
        cfg.privacy, cfg.runtime,
    )
    _require(d.dataset in dataset_names(), "data.dataset",
             f"unknown dataset {d.dataset!r}; valid: {', '.join(dataset_names())}")
    _require(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    _require(d.min_partition_size >= 1, "data.min_partition_size", "must be >= 1")
    _require(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    for name in ("train_subset", "test_subset"):
        value = getattr(d, name)
        _require(value is None or value > 0, f"data.{name}", "must be a positive integer or null")
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    _require(d.split_seed >= 0, "data.split_seed", "must be >= 0")

    for role in ("teacher", "student"):
        arch = getattr(m, role)
        _require(arch in CLASSIFIERS, f"models.{role}",
                 f"unknown classifier {arch!r}; valid: {', '.join(CLASSIFIERS.names())}")
    g = m.generator
    _require(g.arch in GENERATORS, "models.generator.arch",
             f"unknown generator {g.arch!r}; valid: {', '.join(GENERATORS.names())}")
    _require(g.latent_dim >= 1, "models.generator.latent_dim", "must be >= 1")
    _require(g.width >= 1, "models.generator.width", "must be >= 1")
    _require(g.depth >= 1, "models.generator.depth", "must be >= 1")
    image_size = dataset_info(d.dataset).image_size
    _require(image_size % 2**g.depth == 0, "models.generator.depth",
             f"G upsamples by 2**depth = {2**g.depth}, which must divide {d.dataset}'s image size "
             f"{image_size}: use a depth whose 2**depth divides {image_size}")
    p = m.pretrain
    _require(p.epochs >= 1, "models.pretrain.epochs", "must be >= 1")
    _require(p.batch_size >= 1, "models.pretrain.batch_size", "must be >= 1")
    _require(p.lr > 0, "models.pretrain.lr", "must be > 0")
    _require(p.momentum >= 0, "models.pretrain.momentum", "must be >= 0")
    _require(p.weight_decay >= 0, "models.pretrain.weight_decay", "must be >= 0")
    _require(p.adversarial_epsilon >= 0, "models.pretrain.adversarial_epsilon", "must be >= 0 (0: off)")
    _require(p.adversarial_steps >= 1, "models.pretrain.adversarial_steps", "must be >= 1")

    _require(me.generator_lr > 0, "method.generator_lr", "must be > 0")
    _require(all(0 <= b < 1 for b in me.generator_betas), "method.generator_betas",
             "both betas must be in [0, 1)")
    _require(me.generator_steps >= 0, "method.generator_steps", "must be >= 0")
    _require(me.generator_reset or me.generator_reset_scope == "all", "method.generator_reset_scope",
             "says what method.generator_reset re-draws: set generator_reset: true too")
    _require(math.isfinite(me.boundary_fraction) and 0 <= me.boundary_fraction <= 1, "method.boundary_fraction",
             "must be in [0, 1] (0: off)")
    _require(math.isfinite(me.boundary_mix) and 0 < me.boundary_mix <= 0.5, "method.boundary_mix",
             "must be in (0, 0.5] (the partner class's share of the asked blend)")
    _require(not me.boundary_fraction or me.generator_latents == "round", "method.boundary_fraction",
             "asks blends of the round's assigned classes: set method.generator_latents: round")
    _require(not me.boundary_fraction or not me.one_hot_prior_adjustment, "method.boundary_fraction",
             "cannot be combined with method.one_hot_prior_adjustment")
    _require(me.generator_body_reset_every >= 0, "method.generator_body_reset_every", "must be >= 0 (0: never)")
    _require(me.generator_body_reset_every == 0 or me.generator_reset_scope == "input",
             "method.generator_body_reset_every", "re-draws the body that generator_reset_scope: input keeps: "
             "set that too")
    _require(me.class_balance_temperature > 0, "method.class_balance_temperature", "must be > 0")
    _require(me.contrastive_temperature > 0, "method.contrastive_temperature", "must be > 0")
    _require(me.negative_bank_size >= 1, "method.negative_bank_size", "must be >= 1")
    for name in _METHOD_DEFAULTED:
        value = getattr(me, name)
        if isinstance(value, float):
            _require(math.isfinite(value), f"method.{name}", "must be finite")

    _require(di.batch_size >= 2, "distill.batch_size", "must be >= 2")
    _require(di.student_steps >= 1, "distill.student_steps", "must be >= 1")
    _require(di.pseudo_batches is None or di.pseudo_batches >= 1, "distill.pseudo_batches",
             "must be >= 1 or null")
    _require(di.replay_rounds >= 0, "distill.replay_rounds", "must be >= 0")
    _require(di.augment_shift >= 0, "distill.augment_shift", "must be >= 0 (pixels)")
    _require(math.isfinite(di.mixup) and di.mixup >= 0, "distill.mixup",
             "must be a finite number >= 0 (the Beta concentration; 0: off)")
    _require(not di.relabel_augmented or di.augment_shift or di.augment_flip or di.mixup,
             "distill.relabel_augmented",
             "relabels augmented images: set distill.augment_shift, augment_flip or mixup too")
    _require(di.lr > 0, "distill.lr", "must be > 0")
    _require(di.momentum >= 0, "distill.momentum", "must be >= 0")
    _require(di.weight_decay >= 0, "distill.weight_decay", "must be >= 0")
    _require(di.temperature > 0, "distill.temperature", "must be > 0")
    _require(di.target_temperature > 0, "distill.target_temperature", "must be > 0")
    _require(0.0 <= di.student_ema < 1.0, "distill.student_ema", "must be in [0, 1) (0: off)")
    _require(di.feature_weight >= 0 and math.isfinite(di.feature_weight), "distill.feature_weight",
             "must be a finite number >= 0 (0: off)")
    _require(di.final_fit_steps >= 0, "distill.final_fit_steps", "must be >= 0 (0: off)")
    _require(di.final_fit_target_temperature is None or di.final_fit_target_temperature > 0,
             "distill.final_fit_target_temperature", "must be > 0 or null")
    _require(di.eval_every >= 1, "distill.eval_every", "must be >= 1")
    _require(di.hard_samples >= 0 and di.hard_samples % di.batch_size == 0, "distill.hard_samples",
             f"must be 0 (off) or a multiple of distill.batch_size ({di.batch_size}): they travel "
             "as whole batches")
    _require(0 <= di.hard_sample_radius <= 1, "distill.hard_sample_radius",
             "must be in [0, 1] (pixel units of [0, 1] images)")
    _require(di.hard_sample_steps >= 1, "distill.hard_sample_steps", "must be >= 1")
    _require(di.mixup_queries >= 0 and di.mixup_queries % di.batch_size == 0, "distill.mixup_queries",
             f"must be 0 (off) or a multiple of distill.batch_size ({di.batch_size}): they travel "
             "as whole batches")
    _require(di.mixup_query_alpha > 0, "distill.mixup_query_alpha", "must be > 0 (Beta(a, a))")

    _require(cu.granularity in ("sample", "batch"), "curriculum.granularity", "sample or batch")
    if cu.pace == "quantile":
        _require(0 < cu.pace_start <= 1, "curriculum.pace_start",
                 "with pace: quantile it is a quantile level in (0, 1]")
        _require(0 < cu.pace_end <= 1, "curriculum.pace_end",
                 "with pace: quantile it is a quantile level in (0, 1]")
    else:
        _require(cu.pace_start > 0, "curriculum.pace_start", "must be > 0")
        _require(cu.pace_end > 0, "curriculum.pace_end", "must be > 0")
    _require(cu.sharpness > 0, "curriculum.sharpness", "must be > 0")
    _require(cu.history >= 1, "curriculum.history", "must be >= 1")
    for prefix in ("adversarial", "negative"):
        begin, end = getattr(cu, f"{prefix}_begin"), getattr(cu, f"{prefix}_end")
        _require(0 <= begin <= 1, f"curriculum.{prefix}_begin", "must be in [0, 1]")
        _require(0 <= end <= 1, f"curriculum.{prefix}_end", "must be in [0, 1]")
        _require(begin < end, f"curriculum.{prefix}_end",
                 f"must be greater than curriculum.{prefix}_begin ({begin})")
    _require(0 < cu.negative_window <= 1, "curriculum.negative_window", "must be in (0, 1]")

    _require(fe.num_clients >= 1, "federation.num_clients", "must be >= 1")
    _require(fe.rounds >= 1, "federation.rounds", "must be >= 1")
    _require(0 < fe.sample_rate <= 1, "federation.sample_rate", "must be in (0, 1]")
    _require(fe.min_replies >= 1, "federation.min_replies", "must be >= 1")
    sampled = max(1, round(fe.sample_rate * fe.num_clients))
    _require(fe.min_replies <= sampled, "federation.min_replies",
             f"must be <= the clients sampled per round "
             f"(sample_rate {fe.sample_rate} x num_clients {fe.num_clients} = {sampled})")
    _require(fe.zo_batch_size == 0 or fe.zo_batch_size >= 2, "federation.zo_batch_size",
             "must be 0 (no generator training in logits_only) or >= 2 (G runs with batch statistics)")
    _require(fe.zo_directions >= 1, "federation.zo_directions", "must be >= 1")
    _require(fe.max_update_norm is None or fe.max_update_norm > 0, "federation.max_update_norm",
             "must be > 0 or null (null: no bound); a bound <= 0 would reject every reply")
    _require(fe.round_timeout > 0, "federation.round_timeout", "must be > 0 (seconds)")
    _require(fe.sample_transport == "pixels" or fe.mode == "generator_and_logits",
             "federation.sample_transport",
             "seed needs mode generator_and_logits: in logits_only the clients hold no generator")
    # Both options change which G (or latents) a round's samples come from, so the owners must
    # receive the pixels (with seed they would regenerate them from the wrong G or latents), and
    # they must hold a generator.
    for active, name in ((me.generator_reset, "method.generator_reset"),
                         (me.generator_latents == "round", "method.generator_latents")):
        if active:
            _require(fe.sample_transport == "pixels", name,
                     "needs federation.sample_transport: pixels")
            _require(fe.mode == "generator_and_logits", name,
                     "needs federation.mode: generator_and_logits")
    if fe.generators == "per_owner":
        for ok, name, why in (
            (fe.mode == "generator_and_logits", "federation.mode", "generator_and_logits (owners fit G)"),
            (me.generator_reset, "method.generator_reset", "true (each owner fits a fresh G)"),
            (me.generator_latents == "round", "method.generator_latents",
             "round (the server redraws the batch each owner's G was fitted to)"),
            (not m.generator.conditional, "models.generator.conditional",
             "false (the server redraws an owner's batch from its latents alone)"),
            (not (pr.level == "client" and pr.mechanism == "central"), "privacy.mechanism",
             "local (central client-level DP noises the sum of the updates, and per-owner "
             "generators are never summed)"),
        ):
            _require(ok, name, f"federation.generators: per_owner needs {why}")
    _require(me.class_balance_prior == "uniform" or fe.mode == "generator_and_logits",
             "method.class_balance_prior",
             "teacher needs federation.mode: generator_and_logits (in logits_only the server's "
             "generator steps see the whole ensemble, not one owner's teacher)")
    _require(not me.bn_statistics_per_class or me.generator_latents == "round",
             "method.bn_statistics_per_class", "needs method.generator_latents: round (each row's class)")
    _require(not me.bn_statistics_per_class or fe.mode == "generator_and_logits",
             "method.bn_statistics_per_class", "needs federation.mode: generator_and_logits")
    _require(not me.bn_statistics_per_class or pr.level != "record", "method.bn_statistics_per_class",
             "cannot be used with privacy.level: record (a DP teacher has no exact per-class statistics)")
    _require(math.isfinite(me.one_hot_prior_adjustment) and me.one_hot_prior_adjustment >= 0,
             "method.one_hot_prior_adjustment", "must be a finite number >= 0 (0: off)")
    _require(not me.one_hot_prior_adjustment or fe.mode == "generator_and_logits",
             "method.one_hot_prior_adjustment",
             "needs federation.mode: generator_and_logits (in logits_only the server's generator "
             "steps see the whole ensemble, not one owner's teacher)")
    _require(0 <= me.synthesis_jitter < image_size, "method.synthesis_jitter",
             f"must be >= 0 and < the image size ({image_size} for {d.dataset}; pixels, 0: off): "
             "a shift by the whole image leaves it blank")
    _require(me.synthesis_jitter == 0 or fe.mode == "generator_and_logits", "method.synthesis_jitter",
             "needs federation.mode: generator_and_logits (the zeroth-order steps of logits_only "
             "query the owners on G's samples as drawn)")
    _require(me.generator_latents != "round" or di.pseudo_batches == 1, "distill.pseudo_batches",
             "method.generator_latents: round draws the one batch G was fitted to: set 1 "
             "(with distill.replay_rounds for more samples)")
    _require(not di.hard_samples or fe.sample_transport == "pixels", "distill.hard_samples",
             "needs federation.sample_transport: pixels (with seed the owners regenerate the "
             "round's samples from G and would never see the hard ones)")
    _require(not di.mixup_queries or fe.sample_transport == "pixels", "distill.mixup_queries",
             "needs federation.sample_transport: pixels (with seed the owners regenerate the "
             "round's samples from G and would never see the blends)")
    _require(fe.sample_transport == "pixels" or di.quantize_samples, "federation.sample_transport",
             "seed needs distill.quantize_samples: true, so both sides round to the same uint8 images")
    # A step of one uint8 level (1/255) per pixel is what rounding erases: ask for at least two.
    _require(ZO_SMOOTHING_MIN <= fe.zo_smoothing <= 0.5, "federation.zo_smoothing",
             f"must be in [2/255 = {ZO_SMOOTHING_MIN:.4f}, 0.5]: the RMS change per pixel must span "
             "at least two uint8 levels, or quantising the queries erases the perturbation")
    _require(0 < pr.delta < 1, "privacy.delta", "must be in (0, 1)")
    if pr.level != "none":
        _require((pr.target_epsilon is None) != (pr.noise_multiplier is None),
                 "privacy.target_epsilon",
                 f"privacy.level {pr.level} needs exactly one of privacy.target_epsilon and "
                 "privacy.noise_multiplier")
    _require(pr.target_epsilon is None or (math.isfinite(pr.target_epsilon) and pr.target_epsilon > 0),
             "privacy.target_epsilon", "must be a finite number > 0 or null (use level: none for ε = ∞)")
    _require(pr.noise_multiplier is None or (math.isfinite(pr.noise_multiplier) and pr.noise_multiplier >= 0),
             "privacy.noise_multiplier", "must be >= 0 or null")
    _require(pr.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
    _require(pr.summary_noise_multiplier > 0, "privacy.summary_noise_multiplier", "must be > 0")
    _require(pr.summary_clip > 0, "privacy.summary_clip", "must be > 0")
    _require(pr.generator_clip > 0, "privacy.generator_clip", "must be > 0 (inf: no clipping)")
    _require(pr.logit_clip > 0, "privacy.logit_clip", "must be > 0 (inf: no clipping)")
    _require(pr.epsilon_max is None or pr.epsilon_max > 0, "privacy.epsilon_max",
             "must be > 0 or null (null: target_epsilon, or no limit)")
    if pr.level == "record":
        _require(m.pretrain.adversarial_epsilon == 0, "models.pretrain.adversarial_epsilon",
                 "adversarial training is not combined with DP-SGD teachers (privacy.level: "
                 "record); set it to 0")
    if pr.level == "record" and not pr.summary:
        _require(di.ensemble not in ("weighted", "class_weighted", "consensus"), "distill.ensemble",
                 f"{di.ensemble!r} weighs teachers by their class histograms, which a DP teacher "
                 "releases only through the summary (privacy.summary: true)")
        _require(me.class_balance_prior == "uniform", "method.class_balance_prior",
                 "teacher needs the teacher's class histogram, which a DP teacher has only through "
                 "its summary (privacy.summary: true)")
        _require(not me.one_hot_prior_adjustment, "method.one_hot_prior_adjustment",
                 "needs the teacher's class histogram, which a DP teacher has only through its "
                 "summary (privacy.summary: true)")
    if pr.level == "client":
        if pr.noise_multiplier or pr.target_epsilon is not None:
            for clip in ("generator_clip", "logit_clip"):
                _require(math.isfinite(getattr(pr, clip)), f"privacy.{clip}",
                         "client-level noise needs finite clip bounds (the noise is σ x clip); "
                         ".inf only with noise_multiplier: 0")
        # The class histograms and train sizes behind these rules are the client's private data.
        _require(di.ensemble in ("mean", "median", "trimmed_mean"), "distill.ensemble",
                 f"{di.ensemble!r} weighs clients by their class histograms or sizes, which client-"
                 "level privacy keeps on the clients; use mean, median or trimmed_mean")
        _require(fe.update_aggregation == "mean", "federation.update_aggregation",
                 "client-level privacy bounds each client's share of the sum: use mean")
        if pr.mechanism == "central":
            _require(di.ensemble == "mean", "distill.ensemble",
                     "central client-level privacy noises a sum: use mean")

    _require(ru.seed >= 0, "runtime.seed", "must be >= 0")
    _require(re.fullmatch(r"cpu|auto|cuda(:\d+)?", ru.device) is not None,
             "runtime.device", f"must be cpu, auto, cuda or cuda:N; got {ru.device!r}")
    _require(ru.threads is None or ru.threads >= 1, "runtime.threads", "must be >= 1 or null")
